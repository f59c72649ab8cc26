"""The registration protocol against a scripted HTTP server (the real server is in tests/integration)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ftdeploy.errors import OllamaError
from ftdeploy.ollama import OllamaClient, normalize_host, parse_version


class Scripted(BaseHTTPRequestHandler):
    version = "0.17.4"
    blobs: set = set()
    create_lines: list = []
    uploads: list = []

    def log_message(self, *a):
        pass

    def _send(self, code, body=b"", ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/api/version":
            self._send(200, json.dumps({"version": self.version}).encode())
        else:
            self._send(404)

    def do_HEAD(self):
        digest = self.path.rsplit("/", 1)[-1]
        self._send(200 if digest in self.blobs else 404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        if self.path.startswith("/api/blobs/"):
            self.uploads.append(len(body))
            self.blobs.add(self.path.rsplit("/", 1)[-1])
            self._send(201)
        elif self.path == "/api/create":
            self._send(200, "".join(json.dumps(x) + "\n" for x in self.create_lines).encode(), "application/x-ndjson")
        else:
            self._send(404)


@pytest.fixture
def server():
    Scripted.blobs, Scripted.uploads, Scripted.version = set(), [], "0.17.4"
    Scripted.create_lines = [{"status": "parsing GGUF"}, {"status": "success"}]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_host_normalisation():
    assert normalize_host("0.0.0.0") == "http://0.0.0.0:11434"
    assert normalize_host("ollama:11434") == "http://ollama:11434"
    assert normalize_host("https://ollama.example") == "https://ollama.example:443"
    assert parse_version("0.17.4-rc1") == (0, 17, 4)


def test_upload_then_reupload_sends_nothing(server, tmp_path):
    client = OllamaClient(server)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"x" * 5000)
    assert client.push_blob(f, "sha256:abc") == 5004
    assert client.push_blob(f, "sha256:abc") == 0
    assert Scripted.uploads == [5004]


def test_create_reads_the_stream_to_success(server):
    assert OllamaClient(server).create("m", {"m.gguf": "sha256:abc"})[-1] == "success"


def test_an_error_inside_a_200_stream_is_a_failure(server):
    Scripted.create_lines = [{"status": "parsing GGUF"}, {"error": "invalid file magic"}]
    with pytest.raises(OllamaError, match="refused to create m: invalid file magic"):
        OllamaClient(server).create("m", {"m.gguf": "sha256:abc"})


def test_a_stream_that_ends_early_is_a_failure(server):
    Scripted.create_lines = [{"status": "parsing GGUF"}]
    with pytest.raises(OllamaError, match="ended without success"):
        OllamaClient(server).create("m", {"m.gguf": "sha256:abc"})


def test_too_old_a_server_is_refused_with_the_reason(server):
    Scripted.version = "0.16.2"
    with pytest.raises(OllamaError, match="version 0.16.2; ftdeploy needs 0.17.1 or later"):
        OllamaClient(server).require_version()
