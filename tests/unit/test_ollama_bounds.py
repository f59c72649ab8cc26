"""Every Ollama call has a connect bound and a read bound, and each way a server can fail after the connection
(silence, a stalled body, an upload it stops taking, a dropped connection, an answer that is not JSON) gives an
OllamaError that says which, rather than "cannot reach" or a traceback."""

import inspect
import json
import math
import socket
import time

import httpx
import pytest
from conftest import json_reply as _json_reply

from ftdeploy.config import OllamaConfig
from ftdeploy.errors import OllamaError
from ftdeploy.ollama import OllamaClient, UnreachableError, connect


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the bounds themselves


def test_the_default_read_timeout_is_at_most_a_minute_and_none_is_unbounded():
    cfg = OllamaConfig()
    assert 0 < cfg.timeout <= 60 and 0 < cfg.connect_timeout <= 30
    assert 0 < cfg.long_timeout < math.inf
    client = OllamaClient("http://127.0.0.1:1")
    assert (client.connect_timeout, client.timeout, client.long_timeout) == (cfg.connect_timeout, cfg.timeout,
                                                                             cfg.long_timeout)


@pytest.mark.parametrize("key", ["timeout", "connect_timeout", "long_timeout"])
@pytest.mark.parametrize("value", [0, -1, math.inf, None])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused_naming_the_key(key, value):
    with pytest.raises(OllamaError, match=f"ollama.{key}: expected a number of seconds"):
        OllamaClient("http://127.0.0.1:1", **{key: value})


class _Recorder:
    """Stands in for httpx.Client.send, under the official client and our own calls alike: records the bounds of
    every request and answers what each call path needs to finish."""

    def __init__(self):
        self.calls: list[tuple[str, str, object]] = []

    def __call__(self, request, **kw):
        bounds = request.extensions.get("timeout") or {}
        self.calls.append((request.method, request.url.path.split("/api/", 1)[1],
                           tuple(bounds.get(k) for k in ("connect", "read", "write"))))
        if request.method == "POST" and "/api/blobs/" in request.url.path:
            request.read()  # the upload's body, so the progress reader runs
        if request.method == "HEAD":
            return httpx.Response(404, request=request)
        stream = request.url.path.endswith(("/api/create", "/api/push"))
        answer = {"version": "0.17.4", "models": [], "message": {"role": "assistant"}, "model_info": {}}
        body = b'{"status":"success"}\n' if stream else json.dumps(answer).encode()
        return httpx.Response(200, content=body, request=request)


LONG_CALLS = {("POST", path) for path in ("blobs/sha256:abc", "create", "push", "generate", "chat")}


def test_every_call_path_sends_a_finite_connect_and_read_timeout(monkeypatch, tmp_path):
    recorder = _Recorder()
    monkeypatch.setattr(httpx.Client, "send", lambda client, request, **kw: recorder(request, **kw))
    client = OllamaClient("http://127.0.0.1:9", timeout=7, connect_timeout=2, long_timeout=99)
    blob = tmp_path / "m.gguf"
    blob.write_bytes(b"GGUF")
    exercised = {
        "is_up": lambda: client.is_up(), "version": client.version, "require_version": client.require_version,
        "has_blob": lambda: client.has_blob("sha256:abc"), "push_blob": lambda: client.push_blob(blob, "sha256:abc"),
        "create": lambda: client.create("m", {"m.gguf": "sha256:abc"}), "copy": lambda: client.copy("m", "n"),
        "push": lambda: client.push("team/m"), "show": lambda: client.show("m"), "list_models": client.list_models,
        "delete": lambda: client.delete("m"), "generate": lambda: client.generate("m", "hi"),
        "chat": lambda: client.chat("m", [{"role": "user", "content": "hi"}]),
    }
    public = {name for name, _ in inspect.getmembers(OllamaClient, inspect.isfunction) if not name.startswith("_")}
    assert public == set(exercised), "a new OllamaClient call needs a place in this test"
    for call in exercised.values():
        call()
    # the client's calls, and those of a client built from a config (connect)
    connect(OllamaConfig(host="http://127.0.0.1:9", timeout=5, connect_timeout=1, long_timeout=50), explicit=True)

    assert {p for _, p, _ in recorder.calls} >= {"version", "tags", "show", "copy", "delete", "blobs/sha256:abc"}
    for method, path, bounds in recorder.calls:
        assert all(isinstance(t, float) and 0 < t < math.inf for t in bounds), (method, path, bounds)
    long = {(m, p): t for m, p, t in recorder.calls if (m, p) in LONG_CALLS}
    # (connect, read, write): the long bound covers each wait for an answer and each send of a body
    assert long == dict.fromkeys(LONG_CALLS, (2.0, 99.0, 99.0))
    ordinary = {t for m, p, t in recorder.calls if (m, p) not in LONG_CALLS}
    assert ordinary == {(2.0, 7.0, 7.0), (1.0, 5.0, 5.0), (1.0, 3.0, 3.0)}  # the client's, connect's, is_up's probe


# ---------------------------------------------------------------- each way a connected server can fail


def test_a_server_that_accepts_and_never_answers_fails_once_within_the_read_timeout(scripted):
    server = scripted()
    client = OllamaClient(server.host, timeout=1)
    started = time.monotonic()
    with pytest.raises(OllamaError) as caught:
        client.list_models()  # an ordinary call, retried on connection failures: not after a read timeout
    took = time.monotonic() - started
    message = str(caught.value)
    assert f"the Ollama server at {server.host} stopped answering" in message
    assert "accepted the connection but sent no response within 1 s (GET /api/tags)" in message
    assert "raise ollama.timeout" in message and "cannot reach" not in message
    assert not isinstance(caught.value, UnreachableError)
    assert took < 2.5 and len(server.connections) == 1


def test_a_body_that_stalls_after_the_headers_is_a_silence_not_an_unreachable_host(scripted):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod"
    server = scripted({"POST /api/show": head})
    silence = "stopped answering: it accepted the connection but sent no response within 1 s"
    with pytest.raises(OllamaError, match=silence):
        OllamaClient(server.host, timeout=1).show("m")
    assert len(server.connections) == 1


def test_generation_waits_for_the_long_timeout_not_the_ordinary_one(scripted):
    server = scripted()
    client = OllamaClient(server.host, timeout=0.5, long_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(OllamaError, match=r"within 1\.5 s \(POST /api/chat\).*raise ollama.long_timeout"):
        client.chat("m", [{"role": "user", "content": "hi"}])
    assert 1.4 < time.monotonic() - started < 4


def test_a_progress_stream_that_goes_quiet_fails_after_the_long_timeout(scripted):
    line = b'{"status":"pulling manifest"}\n'
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n" % (len(line), line))
    server = scripted({"POST /api/push": head})
    with pytest.raises(OllamaError, match=r"stopped answering: it sent 1 progress line\(s\), then nothing more for 1 s "
                                          r"\(push team/m\)"):
        OllamaClient(server.host, long_timeout=1).push("team/m")


def test_an_upload_the_server_stops_taking_fails_after_the_long_timeout(scripted, tmp_path):
    server = scripted({"HEAD /api/blobs/": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"},
                      read_body=False)
    blob = tmp_path / "big.gguf"
    with open(blob, "wb") as fh:
        fh.truncate(256 << 20)  # sparse: more than the loopback socket buffers hold
    started = time.monotonic()
    with pytest.raises(OllamaError, match="stopped taking the upload or sent no response within 1 s"):
        OllamaClient(server.host, long_timeout=1).push_blob(blob, "sha256:abc")
    assert time.monotonic() - started < 10


def test_a_connection_closed_without_an_answer_says_so(scripted):
    server = scripted(on_request="close")
    with pytest.raises(OllamaError, match="accepted the connection but closed it without a complete answer") as caught:
        OllamaClient(server.host).version()
    assert "cannot reach" not in str(caught.value)


def test_a_closed_port_still_cannot_be_reached():
    host = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(UnreachableError, match=f"cannot reach the Ollama server at {host}"):
        OllamaClient(host).version()


def test_an_answer_that_is_not_json_is_an_ollama_error(scripted):
    page = b"<html>hello</html>"
    server = scripted({"GET /api/version": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                           % (len(page), page)})
    with pytest.raises(OllamaError, match="not JSON.*is --ollama-host an Ollama server"):
        OllamaClient(server.host).version()


def test_a_progress_line_that_is_not_json_is_an_ollama_error(scripted):
    server = scripted({"POST /api/create": _json_reply(b"<html>")})
    with pytest.raises(OllamaError, match="progress stream holds a line that is not a JSON object"):
        OllamaClient(server.host).create("m", {"m.gguf": "sha256:abc"})


def test_a_chat_with_tool_call_ids_sends_them_with_the_long_bound(monkeypatch):
    """The official client drops tool_calls[].id and tool_call_id; Mistral's templates write them, so such a chat
    goes as plain JSON: the ids reach the server, under the same long bound and the same refusal messages."""
    sent = []

    def send(client, request, **kw):
        sent.append((json.loads(request.read()), request.extensions["timeout"]))
        if json.loads(request.read())["model"] == "gone":
            return httpx.Response(404, json={"error": "model 'gone' not found"}, request=request)
        return httpx.Response(200, json={"model": "m", "message": {"role": "assistant", "content": "14:32"},
                                         "done": True, "done_reason": "stop"}, request=request)

    monkeypatch.setattr(httpx.Client, "send", send)
    client = OllamaClient("http://127.0.0.1:9", timeout=7, connect_timeout=2, long_timeout=99)
    call = {"id": "tide00001", "function": {"name": "get_tide", "arguments": {"harbour": "Porthleven"}}}
    chat = [{"role": "user", "content": "Tide?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "14:32", "tool_call_id": "tide00001"}]
    reply = client.chat("m", chat, options={"temperature": 0})
    assert reply["message"]["content"] == "14:32" and reply["done_reason"] == "stop"
    body, bounds = sent[0]
    assert body["messages"][1]["tool_calls"][0]["id"] == "tide00001"
    assert body["messages"][2]["tool_call_id"] == "tide00001"
    assert body["stream"] is False and body["options"] == {"temperature": 0} and "tools" not in body
    assert (bounds["connect"], bounds["read"]) == (2.0, 99.0)
    with pytest.raises(OllamaError, match="model 'gone' not found"):
        client.chat("gone", chat)
