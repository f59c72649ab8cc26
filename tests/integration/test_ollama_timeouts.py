"""A server that accepts the connection and then says nothing, met by the real CLI in a subprocess: the command
fails within ollama.timeout (or ollama.long_timeout for a stalled create stream), says the host stopped answering
rather than that it cannot be reached, and prints no traceback."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from ftdeploy.base_model import embedded_gguf


class SilentAfter:
    """A loopback server that answers the requests it has a reply for ("GET /api/version": bytes) and closes the
    connection; any other request (all of them, with no replies) it reads and never answers, holding the
    connection open until the test ends. A reply without `Connection: close` is sent and then the server goes quiet."""

    def __init__(self, replies=None):
        self.replies = replies or {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            method, path = head.split(b" ", 2)[:2]
            reply = next((r for key, r in self.replies.items()
                          if f"{method.decode()} {path.decode()}".startswith(key)), None)
            if reply is not None:
                conn.sendall(reply)
                if b"Connection: close" in reply:
                    conn.close()
                    return
            while conn.recv(65536):  # read on, answer nothing
                pass
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


def _json_reply(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


@pytest.fixture
def silent_server():
    server = SilentAfter()
    yield server
    server.close()


def _ftdeploy(*args, limit=120):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True, timeout=limit)
    return proc, time.monotonic() - started


def _tiny_gguf(folder):
    path = folder / "m.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 64)
    return path


def test_register_against_a_server_that_never_answers_says_it_stopped_answering(silent_server, tmp_path):
    proc, took = _ftdeploy("register", "--gguf", str(_tiny_gguf(tmp_path)), "--name", "x",
                           "--ollama-host", silent_server.host, "--set", "ollama.timeout=2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the Ollama server at {silent_server.host} stopped answering" in proc.stderr
    assert "accepted the connection but sent no response within 2 s" in proc.stderr
    assert "ollama.timeout" in proc.stderr and "cannot reach" not in proc.stderr
    assert took < 30  # 2 s of waiting plus the interpreter's start on a busy machine; today it waited far longer


@pytest.mark.slow
def test_the_default_read_timeout_bounds_the_wait_without_any_setting(silent_server, tmp_path):
    """No --set: the default ollama.timeout (60 s at most) is what ends the wait."""
    proc, took = _ftdeploy("register", "--gguf", str(_tiny_gguf(tmp_path)), "--name", "x",
                           "--ollama-host", silent_server.host, limit=150)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "stopped answering" in proc.stderr
    assert took < 90


def test_a_create_stream_that_goes_quiet_is_bounded_by_the_long_timeout(tmp_path):
    """The server answers the version and has the blob, then /api/create sends one status line and goes quiet."""
    create_head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"%x\r\n%s\r\n" % (len(b'{"status":"parsing GGUF"}\n'), b'{"status":"parsing GGUF"}\n'))
    have_blob = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    server = SilentAfter({"GET /api/version": _json_reply({"version": "0.17.4"}), "HEAD /api/blobs/": have_blob,
                          "POST /api/create": create_head})
    try:
        proc, took = _ftdeploy("register", "--gguf", str(embedded_gguf("smollm2-135m-instruct")), "--name", "quiet",
                               "--ollama-host", server.host, "--set", "ollama.long_timeout=2")
    finally:
        server.close()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the Ollama server at {server.host} stopped answering" in proc.stderr
    assert "create quiet" in proc.stderr and "ollama.long_timeout" in proc.stderr
    assert took < 40
