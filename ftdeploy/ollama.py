"""The only module that speaks HTTP to Ollama, and the one that starts a local server.

Registration is blob upload by sha256 (HEAD first, so an unchanged file uploads nothing)
then POST /api/create with files, template, system and parameters. The create stream
reports errors inside a 200 response, so it is read to the end and must finish with
{"status": "success"}.

Every request has two bounds (requests' (connect, read) timeout): `connect_timeout` to make the connection, and
a read timeout for each wait on the socket after it: `timeout` for ordinary calls, `long_timeout` for those that
are slow by nature (upload, create, push, generate, chat). A read timeout bounds one silence, so a stream of
progress lines may run for longer than it while lines keep arriving; a server that goes quiet fails the call.
Nothing waits without a bound.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import requests
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError

from .config import DEFAULT_OLLAMA_HOST, OLLAMA_CONNECT_TIMEOUT, OLLAMA_LONG_TIMEOUT, OLLAMA_TIMEOUT
from .errors import OllamaError

log = logging.getLogger(__name__)

PINNED_OLLAMA_VERSION = "v0.17.4"
MIN_VERSION = (0, 17, 1)  # CVE-2026-7482: GGUF out-of-bounds read before 0.17.1


def normalize_host(host: str | None) -> str:
    """`OLLAMA_HOST`-style values (`0.0.0.0`, `host:port`, URLs) -> a base URL."""
    host = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST).strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
    parsed = urlparse(host)
    if parsed.port is None:
        default_port = 443 if parsed.scheme == "https" else 11434
        host = f"{parsed.scheme}://{parsed.hostname}:{default_port}{parsed.path}"
    return host


def parse_version(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.lstrip("v").split("-")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits or 0))
    return tuple(nums)


@dataclass
class CreateResult:
    model: str
    digest: str
    uploaded_bytes: int
    statuses: list[str] = field(default_factory=list)


class _ProgressReader:
    """A file object with a length (so requests sends Content-Length, not chunks) that reports bytes read."""

    def __init__(self, fh: Any, size: int, progress: Callable[[int], None] | None):
        self.fh, self.size, self.progress = fh, size, progress

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        block = self.fh.read(n)
        if block and self.progress:
            self.progress(len(block))
        return block


class UnreachableError(OllamaError):
    """No connection could be made (refused, no route, name not resolved, connect timeout): the one failure
    after which the default address may be replaced by a local server."""


class OllamaClient:
    """Typed, small client over requests; errors say what to check."""

    def __init__(self, host: str | None = None, timeout: float = OLLAMA_TIMEOUT,
                 connect_timeout: float = OLLAMA_CONNECT_TIMEOUT, headers: dict[str, str] | None = None,
                 verify: bool | str = True, long_timeout: float = OLLAMA_LONG_TIMEOUT):
        for key, value in (("connect_timeout", connect_timeout), ("timeout", timeout), ("long_timeout", long_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise OllamaError(f"ollama.{key}: expected a number of seconds above 0 (and finite), got {value!r}")
        self.host = normalize_host(host)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.long_timeout = float(long_timeout)
        self.session = requests.Session()
        self.session.headers.update(expand_headers(headers or {}))
        # Given per request: a session-level `verify` loses to $REQUESTS_CA_BUNDLE in requests.
        self.verify = verify

    # -- transport
    def _request(self, method: str, path: str, *, retries: int = 2, long: bool = False,
                 send_timeout: float | None = None, **kw: Any) -> requests.Response:
        """One request, retried (with backoff) only when the connection failed or broke, never after a read
        timeout: a silent server fails once, after `timeout` (or `long_timeout` with long=True) seconds.
        `send_timeout` replaces the connect bound, which urllib3 also applies to each send of a request body."""
        read_timeout = self.long_timeout if long else self.timeout
        kw["timeout"] = (send_timeout or self.connect_timeout, read_timeout)
        kw.setdefault("verify", self.verify)
        what = f"{method} {path}"
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                return self.session.request(method, self.host + path, **kw)
            except requests.exceptions.SSLError as exc:
                raise OllamaError(
                    f"TLS with the Ollama server at {self.host} failed: {_ssl_reason(exc)}. If it uses a private CA, "
                    "pass --ollama-ca-cert CA.pem (ollama.ca_cert); ollama.insecure_tls=true skips the check (testing only)."
                ) from None
            except requests.RequestException as exc:
                kind = _failure_kind(exc)
                if kind == "silent":
                    silence = ("accepted the connection but stopped taking the upload or sent no response within {s} s"
                               if send_timeout else "accepted the connection but sent no response within {s} s")
                    raise self._silent_error(what, read_timeout, long, silence) from None
                if kind == "other":
                    raise OllamaError(f"{what} to the Ollama server at {self.host} failed: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}") from None
                if attempt == retries:
                    if kind == "dropped":
                        raise OllamaError(
                            f"the Ollama server at {self.host} accepted the connection but closed it without a "
                            f"complete answer ({what}). Check the server's log: it may have crashed or restarted, or a proxy "
                            "in front of it dropped the request."
                        ) from None
                    raise UnreachableError(
                        f"cannot reach the Ollama server at {self.host} ({type(exc).__name__}). "
                        "Check that Ollama is running there (`ollama serve`, or `docker compose up ollama`) "
                        "and that --ollama-host / OLLAMA_HOST points at it."
                    ) from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _silent_error(self, what: str, seconds: float, long: bool, silence: str) -> OllamaError:
        key = "ollama.long_timeout" if long else "ollama.timeout"
        return OllamaError(
            f"the Ollama server at {self.host} stopped answering: it {silence.format(s=f'{seconds:g}')} ({what}). "
            "Check the server's log for what it is doing (a hung or overloaded server, or a "
            f"proxy that holds requests); if it is only slow, raise {key} (--set {key}={max(int(seconds) * 4, 60)})."
        )

    def _json(self, resp: requests.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise OllamaError(f"{what}: {self.host} answered HTTP {resp.status_code} with something that is not JSON "
                              f"({resp.text[:120]!r}); is --ollama-host an Ollama server?") from None

    def _check(self, resp: requests.Response, what: str) -> requests.Response:
        if resp.status_code in (401, 403, 407):
            sent = ", ".join(sorted(self.session.headers.keys() - set(requests.utils.default_headers()))) or "none"
            raise OllamaError(f"{what}: {self.host} refused the request with HTTP {resp.status_code} "
                              f"(authentication; extra headers sent: {sent}). Check --ollama-header / ollama.headers.")
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("error", resp.text)
            except ValueError:
                detail = resp.text
            raise OllamaError(f"{what} failed at {self.host}: HTTP {resp.status_code}: {detail.strip()[:500]}")
        return resp

    # -- API
    def is_up(self) -> bool:
        try:
            resp = self.session.get(self.host + "/api/version", timeout=(1.0, 3.0), verify=self.verify)
            return resp.ok
        except requests.RequestException:
            return False

    def version(self) -> str:
        resp = self._check(self._request("GET", "/api/version", retries=0), "GET /api/version")
        body = self._json(resp, "GET /api/version")
        return str(body.get("version", "0")) if isinstance(body, dict) else "0"

    def require_version(self, minimum: tuple[int, ...] = MIN_VERSION) -> str:
        version = self.version()
        if parse_version(version) < minimum:
            raise OllamaError(
                f"the Ollama server at {self.host} is version {version}; ftdeploy needs "
                f"{'.'.join(map(str, minimum))} or later (earlier releases have a GGUF out-of-bounds read, "
                "CVE-2026-7482). Upgrade it, or run scripts/install-ollama.sh for the pinned build."
            )
        return version

    def has_blob(self, digest: str) -> bool:
        resp = self._request("HEAD", f"/api/blobs/{digest}")
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        self._check(resp, f"HEAD /api/blobs/{digest}")
        return False

    def push_blob(self, path: Path, digest: str, progress: Callable[[int], None] | None = None) -> int:
        """Upload `path` as blob `digest` unless the server has it; return the bytes sent."""
        if self.has_blob(digest):
            return 0
        size = path.stat().st_size
        with open(path, "rb") as fh:
            body = _ProgressReader(fh, size, progress)
            # has_blob has just reached the server, so the connect bound is free to cover each send of the body.
            resp = self._request("POST", f"/api/blobs/{digest}", data=body, retries=0, long=True,
                                 send_timeout=self.long_timeout)
        self._check(resp, f"upload of {path.name}")
        if resp.status_code not in (200, 201):
            raise OllamaError(f"upload of {path.name} to {self.host}: unexpected HTTP {resp.status_code}")
        return size

    def create(self, model: str, files: dict[str, str] | None = None, template: str | None = None,
               system: str | None = None, parameters: dict[str, Any] | None = None,
               on_status: Callable[[str], None] | None = None, from_model: str | None = None,
               adapters: dict[str, str] | None = None) -> list[str]:
        body: dict[str, Any] = {"model": model, "stream": True}
        if files:
            body["files"] = files
        if from_model is not None:
            body["from"] = from_model
        if adapters:
            body["adapters"] = adapters
        if template is not None:
            body["template"] = template
        if system is not None:
            body["system"] = system
        if parameters:
            body["parameters"] = parameters
        resp = self._check(self._request("POST", "/api/create", json=body, stream=True, retries=0, long=True),
                           f"create {model}")
        return self._read_stream(resp, f"create {model}", f"refused to create {model}",
                                 (lambda e: on_status(e.get("status", ""))) if on_status else None)

    def _read_stream(self, resp: requests.Response, what: str, refused: str,
                     on_event: Callable[[dict[str, Any]], None] | None) -> list[str]:
        """Read an NDJSON progress stream to its end: errors arrive inside a 200 response, and it must end in success.
        The read timeout (long_timeout) applies to each wait for more of the stream, not to the whole of it."""
        statuses = []
        lines = resp.iter_lines()
        while True:
            try:
                line = next(lines, None)
            except requests.RequestException as exc:
                kind = _failure_kind(exc)
                if kind == "silent":
                    raise self._silent_error(what, self.long_timeout, True, f"sent {len(statuses)} progress line(s), "
                                             "then nothing more for {s} s") from None
                raise OllamaError(f"{what} at {self.host}: the reply broke off after {len(statuses)} progress lines "
                                  f"({type(exc).__name__}); check the server's log") from None
            if line is None:
                break
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                raise OllamaError(f"{what} at {self.host}: the progress stream holds a line that is not a JSON object "
                                  f"({line[:120]!r}); is --ollama-host an Ollama server?")
            if "error" in event:
                raise OllamaError(f"Ollama at {self.host} {refused}: {event['error']}")
            statuses.append(event.get("status", ""))
            if on_event:
                on_event(event)
        if not statuses or statuses[-1] != "success":
            raise OllamaError(f"{what} at {self.host}: the stream ended without success "
                              f"(last status: {statuses[-1] if statuses else 'none'})")
        return statuses

    def copy(self, source: str, destination: str) -> None:
        self._check(self._request("POST", "/api/copy", json={"source": source, "destination": destination}),
                    f"copy {source} to {destination}")

    def push(self, model: str, insecure: bool = False, on_event: Callable[[dict[str, Any]], None] | None = None) -> list[str]:
        """Publish `model` (host/namespace/name:tag) to its registry; the stream must end in success."""
        body = {"model": model, "insecure": insecure, "stream": True}
        resp = self._check(self._request("POST", "/api/push", json=body, stream=True, retries=0, long=True),
                           f"push {model}")
        try:
            return self._read_stream(resp, f"push {model}", f"could not push {model}", on_event)
        except OllamaError as exc:
            raise OllamaError(f"{exc}{_push_hint(str(exc))}") from None

    def show(self, model: str) -> dict[str, Any]:
        return self._json(self._check(self._request("POST", "/api/show", json={"model": model}), f"show {model}"),
                          f"show {model}")

    def list_models(self) -> list[dict[str, Any]]:
        body = self._json(self._check(self._request("GET", "/api/tags"), "GET /api/tags"), "GET /api/tags")
        return body.get("models", []) if isinstance(body, dict) else []

    def delete(self, model: str) -> None:
        self._check(self._request("DELETE", "/api/delete", json={"model": model}), f"delete {model}")

    def generate(self, model: str, prompt: str, raw: bool = False, options: dict[str, Any] | None = None,
                 keep_alive: str | int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "raw": raw, "stream": False, "options": options or {}}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        # One JSON answer after the whole generation (stream false), which may first load the model: the long bound.
        resp = self._request("POST", "/api/generate", json=body, long=True)
        return self._json(self._check(resp, f"generate with {model}"), f"generate with {model}")

    def chat(self, model: str, messages: list[dict[str, str]], options: dict[str, Any] | None = None,
             keep_alive: str | int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "options": options or {}}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        resp = self._request("POST", "/api/chat", json=body, long=True)
        return self._json(self._check(resp, f"chat with {model}"), f"chat with {model}")


def expand_headers(headers: dict[str, str]) -> dict[str, str]:
    """`${VAR}` in a header value is read from the environment now; a missing variable is an error naming it."""
    from .config import ENV_REF_RE

    out = {}
    for name, value in headers.items():
        missing = [m.group(1) for m in ENV_REF_RE.finditer(value) if m.group(1) not in os.environ]
        if missing:
            raise OllamaError(f"ollama.headers.{name}: environment variable {missing[0]} is not set")
        out[name] = ENV_REF_RE.sub(lambda m: os.environ[m.group(1)], value)
    return out


def _push_hint(error: str) -> str:
    text = error.lower()
    if "unauthorized" in text or "not authorized" in text:
        return (" (the registry authenticates the Ollama server by its key: add the server's public key, "
                "~/.ollama/id_ed25519.pub on the server's host, to your account on the registry)")
    if "http response to https client" in text:
        return " (a plain-HTTP registry needs --insecure)"
    return ""


def _failure_kind(exc: BaseException) -> str:
    """What a requests failure means: 'connect' (no connection was made), 'silent' (connected, then a wait on the
    socket timed out), 'dropped' (connected, then the connection closed or broke), or 'other'. A timeout while a
    body is read arrives as a ConnectionError wrapping urllib3's ReadTimeoutError, and one while a request body is
    sent as 'Connection aborted.' wrapping TimeoutError, so the chain of causes is what tells them apart."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.ProxyError)):
        return "connect"
    if isinstance(exc, requests.ReadTimeout):
        return "silent"
    if not isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return "other"
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cause = todo.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ConnectTimeoutError):  # NewConnectionError and NameResolutionError derive from it
            return "connect"
        if isinstance(cause, (ReadTimeoutError, TimeoutError)):
            return "silent"
        todo.extend(c for c in (*cause.args, getattr(cause, "reason", None), cause.__cause__, cause.__context__)
                    if isinstance(c, BaseException))
    return "dropped"


def _ssl_reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "hostname mismatch", "self-signed", "self signed"):
        if marker.lower() in text.lower():
            return marker.replace("_", " ").lower()
    return text[:200]


# ---------------------------------------------------------------- a local server


def state_dir() -> Path:
    return Path(os.environ.get("FTDEPLOY_CACHE", Path.home() / ".cache" / "ftdeploy"))


def find_ollama_binary() -> Path | None:
    """$FTDEPLOY_OLLAMA_BIN, the pinned build from scripts/install-ollama.sh, then `ollama` on PATH."""
    env = os.environ.get("FTDEPLOY_OLLAMA_BIN")
    if env:
        return Path(env)
    pinned = state_dir() / "ollama" / PINNED_OLLAMA_VERSION / "ollama"
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return pinned
    on_path = shutil.which("ollama")
    return Path(on_path) if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    """An `ollama serve` started by ftdeploy, listening on loopback only."""

    host: str
    pid: int
    models_dir: Path
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            # reap if it is our child
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_local_server(port: int = 11434, models_dir: Path | None = None, log_path: Path | None = None,
                       binary: Path | None = None, wait: float = 60.0, detach: bool = True) -> LocalServer:
    """Start the pinned Ollama on 127.0.0.1:`port` and wait until it answers."""
    binary = binary or find_ollama_binary()
    if binary is None:
        raise OllamaError(
            "no Ollama server answers and no ollama binary was found: run scripts/install-ollama.sh "
            "(builds the pinned release), or start Ollama yourself and pass --ollama-host"
        )
    models_dir = models_dir or state_dir() / "ollama-models"
    models_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or state_dir() / "ollama-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    host = f"127.0.0.1:{port}"
    env = {**os.environ, "OLLAMA_HOST": host, "OLLAMA_MODELS": str(models_dir), "OLLAMA_NOPRUNE": "1"}
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen([str(binary), "serve"], env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=detach)
    server = LocalServer(host=f"http://{host}", pid=proc.pid, models_dir=models_dir, log_path=log_path)
    client = OllamaClient(server.host)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-800:]
            raise OllamaError(f"{binary} serve exited with code {proc.returncode}; its log ({log_path}) ends:\n{tail}")
        if client.is_up():
            log.info("started Ollama %s on %s (models in %s, log %s)", client.version(), server.host, models_dir, log_path)
            return server
        time.sleep(0.25)
    server.stop()
    raise OllamaError(f"{binary} serve did not answer on {server.host} within {wait:.0f}s; see {log_path}")


_PID_FILE = "ollama-serve.json"


def save_local_server(server: LocalServer) -> None:
    from .runs import atomic_write_text

    atomic_write_text(state_dir() / _PID_FILE, json.dumps({
        "host": server.host, "pid": server.pid, "models_dir": str(server.models_dir), "log": str(server.log_path),
    }))


def load_local_server() -> LocalServer | None:
    path = state_dir() / _PID_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    server = LocalServer(info["host"], info["pid"], Path(info["models_dir"]), Path(info["log"]))
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    return server


def forget_local_server() -> None:
    (state_dir() / _PID_FILE).unlink(missing_ok=True)


def ensure_server(host: str | None, explicit: bool, start_local: bool = True, timeout: float = OLLAMA_TIMEOUT,
                  headers: dict[str, str] | None = None, verify: bool | str = True,
                  connect_timeout: float = OLLAMA_CONNECT_TIMEOUT,
                  long_timeout: float = OLLAMA_LONG_TIMEOUT) -> OllamaClient:
    """A client for a reachable server. Only the default address may be replaced by a local server, and only
    when no connection to it can be made; an address the user gave is used as is, and failure to reach it is an
    error naming it. A server that accepts the connection and then says nothing fails after `timeout`."""
    timeouts = {"timeout": timeout, "connect_timeout": connect_timeout, "long_timeout": long_timeout}
    client = OllamaClient(host, headers=headers, verify=verify, **timeouts)
    try:
        client.require_version()  # the precise reason when it fails: TLS, authentication, silence, too old
        return client
    except UnreachableError:
        if explicit or not start_local:
            raise UnreachableError(
                f"cannot reach the Ollama server at {client.host}. Check that it is running and reachable "
                "from here; ftdeploy does not replace an address you gave with a local server."
            ) from None
    port = urlparse(client.host).port or 11434
    server = start_local_server(port=port)
    save_local_server(server)
    client = OllamaClient(server.host, **timeouts)
    client.require_version()
    return client


def connect(ollama_cfg: Any, explicit: bool) -> OllamaClient:
    """`ensure_server` with the config's timeouts, headers and TLS settings (an `OllamaConfig`)."""
    o = ollama_cfg
    return ensure_server(o.host, explicit or bool(o.host), o.start_local, o.timeout, o.headers,
                         o.ca_cert or not o.insecure_tls, o.connect_timeout, o.long_timeout)
