"""The only module that speaks HTTP to Ollama, and the one that starts a local server and waits for it.

The API calls go through the official client (`ollama` on PyPI, an httpx client): chat, generate, show, list,
copy, delete, push and create (with files, adapters, template, system and parameters); create and push are read
in the client's streaming form. What stays ours, and why:

* `version`: the client (0.6) has no call for GET /api/version, so it is a plain GET here.
* The blob upload (`has_blob`, `push_blob`): the client's `create_blob` has no HEAD check (it would upload an
  unchanged GGUF again), reports no progress, and hashes the file a second time; ours sends HEAD first, then
  the file in blocks with a Content-Length and a byte count to a progress bar, under the long bound.
* What happens around every call: the client turns a refused connection into a bare ConnectionError with a
  generic message and lets timeouts, dropped connections and TLS failures out as raw httpx exceptions. Ours
  retries only a connection that failed (never a read timeout), and maps each failure to a typed error
  (errors.py: UnreachableError, OllamaAuthError, OllamaTLSError, ModelNotFoundError, OllamaServerError) that
  names the host and what to check. A create or push stream must also end in {"status": "success"}.

Registration is blob upload by sha256 then POST /api/create; the create stream reports errors inside a 200
response, so it is read to the end.

Every request has two bounds: `connect_timeout` to make the connection, and a read timeout for each wait on the
socket after it (and for each send): `timeout` for ordinary calls, `long_timeout` for those that are slow by
nature (upload, create, push, generate, chat). The client takes one httpx timeout, so there are two clients,
sharing one connection pool. A read timeout bounds one silence, so a stream of progress lines may run for longer
than it while lines keep arriving; a server that goes quiet fails the call. Nothing waits without a bound.

httpx and the client load only when a client is made: `ftdeploy --help` does not pay for them.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlparse

from .defaults import DEFAULT_OLLAMA_HOST, OLLAMA_CONNECT_TIMEOUT, OLLAMA_LONG_TIMEOUT, OLLAMA_TIMEOUT
from .errors import (
    ModelNotFoundError,
    OllamaAuthError,
    OllamaError,
    OllamaServerError,
    OllamaTLSError,
    UnreachableError,
)
from .local_server import LocalServer, find_ollama_binary, save_local_server
from .paths import state_dir

if TYPE_CHECKING:
    import httpx
    from ollama import ChatResponse, GenerateResponse, ListResponse, ProgressResponse, ShowResponse

log = logging.getLogger(__name__)

MIN_VERSION = (0, 17, 1)  # CVE-2026-7482: GGUF out-of-bounds read before 0.17.1
UPLOAD_BLOCK = 1 << 20

T = TypeVar("T")

__all__ = ["MIN_VERSION", "OllamaClient", "UnreachableError", "connect", "ensure_server", "expand_headers",
           "normalize_host", "parse_version", "start_local_server"]


def normalize_host(host: str | None) -> str:
    """`OLLAMA_HOST`-style values (`0.0.0.0`, `host:port`, URLs) -> a base URL."""
    from .config import host_problem

    given = host
    host = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST).strip().rstrip("/")
    if problem := host_problem(host):
        source = "--ollama-host" if given else "$OLLAMA_HOST"
        raise OllamaError(f"{source}: {problem}")
    if "://" not in host:
        host = "http://" + host
    parsed = urlparse(host)
    if parsed.port is None:
        default_port = 443 if parsed.scheme == "https" else 11434
        name = f"[{parsed.hostname}]" if ":" in (parsed.hostname or "") else parsed.hostname  # IPv6 keeps its []
        host = f"{parsed.scheme}://{name}:{default_port}{parsed.path}"
    return host


def parse_version(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.lstrip("v").split("-")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits or 0))
    return tuple(nums)


class OllamaClient:
    """The official client with ftdeploy's bounds, retries and errors; answers are the client's typed models
    (ShowResponse, ChatResponse, …), which also read like dicts (`reply["message"]["content"]`)."""

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
        self.headers = expand_headers(headers or {})
        api_key = os.environ.get("OLLAMA_API_KEY")
        if api_key and not any(name.lower() == "authorization" for name in self.headers):
            # What the official client does by itself; done here so that our own calls (the upload) send it too.
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.verify = verify

        import httpx
        import ollama

        tls = _tls_context(verify)
        transport = httpx.HTTPTransport(verify=tls)  # one connection pool for the three clients
        common: dict[str, Any] = {"headers": self.headers, "verify": tls, "transport": transport}
        self._api = ollama.Client(self.host, timeout=self._bounds(self.timeout), **common)
        self._long_api = ollama.Client(self.host, timeout=self._bounds(self.long_timeout), **common)
        self._http = httpx.Client(base_url=self.host, timeout=self._bounds(self.timeout), follow_redirects=True,
                                  **common)

    def _bounds(self, read: float) -> httpx.Timeout:
        import httpx

        return httpx.Timeout(connect=self.connect_timeout, read=read, write=read, pool=self.connect_timeout)

    # -- failures
    def _call(self, what: str, fn: Callable[[], T], *, request: str | None = None, long: bool = False,
              retries: int = 2, upload: bool = False) -> T:
        """`fn()`, retried (with backoff) only when the connection failed or broke, never after a read timeout: a
        silent server fails once, after `timeout` (or `long_timeout` with long=True) seconds. `what` names the
        call in a refusal ("show m"), `request` the HTTP request in a transport failure ("POST /api/show")."""
        silence = ("accepted the connection but stopped taking the upload or sent no response within {s} s"
                   if upload else "accepted the connection but sent no response within {s} s")
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - _translate says which are ours; the rest are re-raised
                error, retry = self._translate(exc, what, long, silence, request)
                if error is None:
                    raise
                if not retry or attempt == retries:
                    raise error from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _translate(self, exc: BaseException, what: str, long: bool, silence: str,
                   request: str | None = None) -> tuple[OllamaError | None, bool]:
        """The typed error for a failure of the client or of httpx (None: not one of those), and whether a retry
        may help (only when no connection was made, or it broke before an answer)."""
        import httpx
        import pydantic
        from ollama import ResponseError

        if isinstance(exc, OllamaError):
            return exc, False
        if isinstance(exc, ResponseError):
            return self._refused(what, exc.status_code, exc.error), False
        if isinstance(exc, ConnectionError) and isinstance(exc.__context__, httpx.HTTPError):
            exc = exc.__context__  # the client's "Failed to connect to Ollama" hides httpx's reason
        if isinstance(exc, (json.JSONDecodeError, pydantic.ValidationError, TypeError)):
            return OllamaServerError(
                f"{what}: {self.host} answered with something that is not the JSON Ollama sends "
                f"({type(exc).__name__}: {str(exc)[:160]}); is --ollama-host an Ollama server?"), False
        if not isinstance(exc, httpx.HTTPError):
            return None, False
        kind = _failure_kind(exc)
        request = request or what
        if kind == "tls":
            return OllamaTLSError(
                f"TLS with the Ollama server at {self.host} failed: {_ssl_reason(exc)}. If it uses a private CA, "
                "pass --ollama-ca-cert CA.pem (ollama.ca_cert); ollama.insecure_tls=true skips the check "
                "(testing only)."
            ), False
        if kind == "silent":
            return self._silent_error(request, self.long_timeout if long else self.timeout, long, silence), False
        if kind == "dropped":
            return OllamaServerError(
                f"the Ollama server at {self.host} accepted the connection but closed it without a complete answer "
                f"({request}). Check the server's log: it may have crashed or restarted, or a proxy in front of it "
                "dropped the request."
            ), True
        if kind == "connect":
            return UnreachableError(
                f"cannot reach the Ollama server at {self.host} ({type(exc).__name__}). "
                "Check that Ollama is running there (`ollama serve`, or `docker compose up ollama`) "
                "and that --ollama-host / OLLAMA_HOST points at it."
            ), True
        return OllamaError(f"{request} to the Ollama server at {self.host} failed: "
                           f"{type(exc).__name__}: {str(exc)[:300]}"), False

    def _refused(self, what: str, status: int, detail: object) -> OllamaError:
        """The error for an HTTP error status: authentication, a missing model, or a server failure."""
        text = str(detail).strip()[:500]
        if status in (401, 403, 407):
            sent = ", ".join(sorted(self.headers)) or "none"
            return OllamaAuthError(f"{what}: {self.host} refused the request with HTTP {status} (authentication; "
                                   f"extra headers sent: {sent}). Check --ollama-header / ollama.headers.")
        if status == 404:
            return ModelNotFoundError(f"{what} failed at {self.host}: HTTP 404: {text}")
        return OllamaServerError(f"{what} failed at {self.host}: HTTP {status}: {text}")

    def _silent_error(self, what: str, seconds: float, long: bool, silence: str) -> OllamaError:
        key = "ollama.long_timeout" if long else "ollama.timeout"
        return OllamaServerError(
            f"the Ollama server at {self.host} stopped answering: it {silence.format(s=f'{seconds:g}')} ({what}). "
            "Check the server's log for what it is doing (a hung or overloaded server, or a "
            f"proxy that holds requests); if it is only slow, raise {key} (--set {key}={max(int(seconds) * 4, 60)})."
        )

    # -- our own requests (what the official client lacks)
    def _raw(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kw: Any) -> httpx.Response:
        from ollama import ResponseError

        resp = self._http.request(method, path, **kw)
        if resp.status_code >= 400 and resp.status_code not in ok:
            raise ResponseError(resp.text, resp.status_code)
        return resp

    def _json(self, resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError:
            raise OllamaServerError(f"{what}: {self.host} answered HTTP {resp.status_code} with something that is not "
                                    f"JSON ({resp.text[:120]!r}); is --ollama-host an Ollama server?") from None

    def is_up(self) -> bool:
        import httpx

        try:
            return self._http.get("/api/version", timeout=httpx.Timeout(3.0, connect=1.0)).is_success
        except httpx.HTTPError:
            return False

    def version(self) -> str:
        resp = self._call("GET /api/version", lambda: self._raw("GET", "/api/version"), retries=0)
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
        resp = self._call(f"HEAD /api/blobs/{digest}", lambda: self._raw("HEAD", f"/api/blobs/{digest}", ok=(404,)))
        return resp.status_code == 200

    def push_blob(self, path: Path, digest: str, progress: Callable[[int], None] | None = None) -> int:
        """Upload `path` as blob `digest` unless the server has it; return the bytes sent."""
        import httpx

        if self.has_blob(digest):
            return 0
        size = path.stat().st_size
        # The long bound covers each send of the body, as it covers each wait for the answer.
        bounds = httpx.Timeout(connect=self.connect_timeout, read=self.long_timeout, write=self.long_timeout,
                               pool=self.connect_timeout)

        def send() -> httpx.Response:
            with open(path, "rb") as fh:
                # An explicit Content-Length: httpx would otherwise send a generator body chunked.
                return self._raw("POST", f"/api/blobs/{digest}", content=_blocks(fh, progress), timeout=bounds,
                                 headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})

        resp = self._call(f"upload of {path.name}", send, request=f"POST /api/blobs/{digest}", long=True, retries=0,
                          upload=True)
        if resp.status_code not in (200, 201):
            raise OllamaServerError(f"upload of {path.name} to {self.host}: unexpected HTTP {resp.status_code}")
        return size

    # -- the official client's calls
    def create(self, model: str, files: dict[str, str] | None = None, template: str | None = None,
               system: str | None = None, parameters: dict[str, Any] | None = None,
               on_status: Callable[[str], None] | None = None, from_model: str | None = None,
               adapters: dict[str, str] | None = None, quantize: str | None = None) -> list[str]:
        """`quantize`: have Ollama quantize what it converted (safetensors files), e.g. "q4_K_M"."""

        def start() -> Iterator[ProgressResponse]:
            return self._long_api.create(model, from_=from_model, files=files or None, adapters=adapters or None,
                                         template=template, system=system, parameters=parameters or None,
                                         quantize=quantize, stream=True)

        return self._stream(f"create {model}", f"refused to create {model}", start,
                            (lambda e: on_status(e.status or "")) if on_status else None)

    def push(self, model: str, insecure: bool = False,
             on_event: Callable[[ProgressResponse], None] | None = None) -> list[str]:
        """Publish `model` (host/namespace/name:tag) to its registry; the stream must end in success."""
        try:
            return self._stream(f"push {model}", f"could not push {model}",
                                lambda: self._long_api.push(model, insecure=insecure, stream=True), on_event)
        except OllamaError as exc:
            raise type(exc)(f"{exc}{_push_hint(str(exc))}") from None

    def _stream(self, what: str, refused: str, start: Callable[[], Iterator[ProgressResponse]],
                on_event: Callable[[ProgressResponse], None] | None) -> list[str]:
        """Read a progress stream to its end: errors arrive inside a 200 response, and it must end in success.
        The read bound (long_timeout) applies to each wait for more of the stream, not to the whole of it. Never
        retried: a create or a push is not sent twice."""
        from ollama import ResponseError

        statuses: list[str] = []
        events = start()  # builds the request; nothing is sent before the first next()
        while True:
            try:
                event = next(events, None)
            except ResponseError as exc:
                if exc.status_code == -1:  # an {"error": …} line inside the 200 stream
                    raise OllamaServerError(f"Ollama at {self.host} {refused}: {exc.error}") from None
                raise self._refused(what, exc.status_code, exc.error) from None
            except (ValueError, TypeError, AttributeError):  # json.loads, `part.get`, or the response model failed
                raise OllamaServerError(f"{what} at {self.host}: the progress stream holds a line that is not a JSON "
                                        "object Ollama sends; is --ollama-host an Ollama server?") from None
            except Exception as exc:  # noqa: BLE001 - _translate says which are ours; the rest are re-raised
                silence = (f"sent {len(statuses)} progress line(s), then nothing more for {{s}} s" if statuses
                           else "accepted the connection but sent no response within {s} s")
                error, _ = self._translate(exc, what, True, silence)
                if error is None:
                    raise
                raise error from None
            if event is None:
                break
            statuses.append(event.status or "")
            if on_event:
                on_event(event)
        if not statuses or statuses[-1] != "success":
            raise OllamaServerError(f"{what} at {self.host}: the stream ended without success "
                                    f"(last status: {statuses[-1] if statuses else 'none'})")
        return statuses

    def copy(self, source: str, destination: str) -> None:
        self._call(f"copy {source} to {destination}", lambda: self._api.copy(source, destination),
                   request="POST /api/copy")

    def show(self, model: str) -> ShowResponse:
        """The model's template, parameters, Modelfile and model_info (`.modelinfo`); ModelNotFoundError when the
        server has no such model."""
        return self._call(f"show {model}", lambda: self._api.show(model), request="POST /api/show")

    def list_models(self) -> list[ListResponse.Model]:
        return list(self._call("GET /api/tags", self._api.list).models)

    def delete(self, model: str) -> None:
        self._call(f"delete {model}", lambda: self._api.delete(model), request="DELETE /api/delete")

    def generate(self, model: str, prompt: str, raw: bool = False, options: dict[str, Any] | None = None,
                 keep_alive: str | int | None = None, top_logprobs: int | None = None) -> GenerateResponse:
        """top_logprobs: return each generated token's log-probability and the most likely `top_logprobs` tokens'
        (0-20; Ollama gives log-probabilities of generated tokens only, not of a given text)."""
        # One JSON answer after the whole generation (not streamed), which may first load the model: the long bound.
        extra: dict[str, Any] = {} if top_logprobs is None else {"logprobs": True, "top_logprobs": top_logprobs}
        return self._call(f"generate with {model}", lambda: self._long_api.generate(
            model, prompt, raw=raw, options=options, keep_alive=keep_alive, **extra), request="POST /api/generate",
            long=True)

    def chat(self, model: str, messages: list[dict[str, Any]], options: dict[str, Any] | None = None,
             keep_alive: str | int | None = None, tools: list[dict[str, Any]] | None = None) -> ChatResponse:
        if _carries_call_ids(messages):
            # The official client (0.6.3) drops tool_calls[].id and tool_call_id, which Ollama's API takes and
            # Mistral's template writes; such a chat goes as plain JSON.
            body = {"model": model, "messages": messages, "tools": tools, "options": options, "stream": False,
                    "keep_alive": keep_alive}
            return self._call(f"chat with {model}", lambda: self._post_json(
                "/api/chat", {k: v for k, v in body.items() if v is not None}), request="POST /api/chat", long=True)
        return self._call(f"chat with {model}", lambda: self._long_api.chat(
            model, messages, options=options, keep_alive=keep_alive, tools=tools), request="POST /api/chat",
            long=True)

    def _post_json(self, path: str, body: dict[str, Any]) -> ChatResponse:
        from ollama import ChatResponse, ResponseError

        response = self._http.post(path, json=body, timeout=self._bounds(self.long_timeout))
        if response.status_code >= 400:
            try:
                error = response.json().get("error", response.text)
            except ValueError:
                error = response.text
            raise ResponseError(error, response.status_code)
        return ChatResponse.model_validate(response.json())


def _carries_call_ids(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("tool_call_id") or any(isinstance(c, dict) and c.get("id") for c in m.get("tool_calls") or [])
               for m in messages)


def _blocks(fh: BinaryIO, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    while block := fh.read(UPLOAD_BLOCK):
        if progress:
            progress(len(block))
        yield block


def _tls_context(verify: bool | str) -> bool | ssl.SSLContext:
    """True (the system's trust store via SSL_CERT_FILE, else certifi), False, or a context that trusts the CA
    bundle at `verify` (httpx deprecates passing the path itself)."""
    if not isinstance(verify, str):
        return verify
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise OllamaTLSError(f"ollama.ca_cert {verify}: not a readable CA bundle (PEM): {exc}") from None


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
    """What an httpx failure means: 'tls' (the handshake failed), 'connect' (no connection was made), 'silent'
    (connected, then a wait on the socket, or a send, timed out), 'dropped' (connected, then the connection closed
    or broke), or 'other'. httpx reports a TLS failure as a ConnectError, so the chain of causes is read first."""
    import httpx

    if _ssl_cause(exc) is not None:
        return "tls"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)):
        return "connect"
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return "silent"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError)):
        return "dropped"
    return "other"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cause = todo.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return cause
        todo.extend(c for c in (cause.__cause__, cause.__context__) if c is not None)
    return None


def _ssl_reason(exc: BaseException) -> str:
    text = str(_ssl_cause(exc) or exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "hostname mismatch", "self-signed",
                   "self signed"):
        if marker.lower() in text.lower():
            return marker.replace("_", " ").lower()
    return text[:200]


# ---------------------------------------------------------------- a local server (the process: local_server.py)


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
            log.info("started Ollama %s on %s (models in %s, log %s)", client.version(), server.host, models_dir,
                     log_path)
            return server
        time.sleep(0.25)
    server.stop()
    raise OllamaError(f"{binary} serve did not answer on {server.host} within {wait:.0f}s; see {log_path}")


def ensure_server(host: str | None, explicit: bool, start_local: bool = True, timeout: float = OLLAMA_TIMEOUT,
                  headers: dict[str, str] | None = None, verify: bool | str = True,
                  connect_timeout: float = OLLAMA_CONNECT_TIMEOUT,
                  long_timeout: float = OLLAMA_LONG_TIMEOUT) -> OllamaClient:
    """A client for a reachable server. Only the default address may be replaced by a local server, and only
    when no connection to it can be made; an address the user gave is used as is, and failure to reach it is an
    error naming it. A server that accepts the connection and then says nothing fails after `timeout`."""
    client = OllamaClient(host, timeout, connect_timeout, headers, verify, long_timeout)
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
    client = OllamaClient(server.host, timeout, connect_timeout, long_timeout=long_timeout)
    client.require_version()
    return client


def connect(ollama_cfg: Any, explicit: bool) -> OllamaClient:
    """`ensure_server` with the config's timeouts, headers and TLS settings (an `OllamaConfig`)."""
    o = ollama_cfg
    return ensure_server(o.host, explicit or bool(o.host), o.start_local, o.timeout, o.headers,
                         o.ca_cert or not o.insecure_tls, o.connect_timeout, o.long_timeout)
