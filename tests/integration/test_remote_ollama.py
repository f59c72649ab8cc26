"""A remote Ollama host as teams run it: the real server behind an https reverse proxy that wants a bearer
token. The proxy is the test's own (a few lines of http.client); everything behind it is the pinned Ollama."""

import http.client
import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from click.testing import CliRunner
from conftest import smol_gguf_copy

from ftdeploy.cli import cli

pytestmark = pytest.mark.ollama

TOKEN = "team-token-4d1f"


def _make_cert(folder):
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


def _proxy_handler(upstream):
    up = urlparse(upstream)

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        seen_tokens: list = []

        def log_message(self, *a):
            pass

        def _deny(self):
            body = b'{"error":"unauthorized"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.rfile.read(length)
                return self._deny()
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in ("host", "authorization", "connection"):
                    conn.putheader(key, value)
            conn.putheader("Host", f"{up.hostname}:{up.port}")
            conn.endheaders()
            remaining = length
            while remaining:
                chunk = self.rfile.read(min(1 << 20, remaining))
                conn.send(chunk)
                remaining -= len(chunk)
            resp = conn.getresponse()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                self.end_headers()
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while data := resp.read1(65536):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        do_GET = do_POST = do_HEAD = do_DELETE = _forward

    return Proxy


@pytest.fixture(scope="module")
def https_proxy(ollama_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = _make_cert(folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(ollama_server.host))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    return smol_gguf_copy(tmp_path_factory.mktemp("gguf"), "remote")


def _register(gguf, name, host, *extra, env=None):
    return CliRunner().invoke(cli, ["register", "--gguf", str(gguf), "--name", name, "--ollama-host", host,
                                    "--json", *extra],
                              env=env)


def _names(ollama_server):
    return {m.model for m in ollama_server.client.list_models()}


def test_register_through_an_https_proxy_with_a_token_from_the_environment(https_proxy, small_gguf, ollama_server):
    host, cert = https_proxy
    result = _register(small_gguf, "remote-smol", host, "--ollama-header", "Authorization: Bearer ${TEAM_TOKEN}",
                       "--ollama-ca-cert", str(cert), env={"TEAM_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["host"] == host and out["uploaded_bytes"] > 0
    assert "remote-smol:latest" in _names(ollama_server)
    assert TOKEN not in result.output
    # And the model answers through the proxy, with the same settings, to the official client a user would use.
    import ollama

    client = ollama.Client(host=host, headers={"Authorization": f"Bearer {TOKEN}"},
                           verify=ssl.create_default_context(cafile=str(cert)), timeout=300)
    reply = client.chat(model="remote-smol", messages=[{"role": "user", "content": "What is 2 + 2?"}],
                        options={"temperature": 0, "num_predict": 16})
    assert reply.message.content.strip()


def test_an_untrusted_certificate_is_a_tls_error_naming_the_option(https_proxy, small_gguf, ollama_server):
    host, _ = https_proxy
    result = _register(small_gguf, "remote-untrusted", host, "--ollama-header", f"Authorization: Bearer {TOKEN}")
    assert result.exit_code != 0
    assert "TLS" in result.output and host in result.output and "--ollama-ca-cert" in result.output
    assert "remote-untrusted:latest" not in _names(ollama_server)


def test_a_wrong_token_is_refused_with_the_host_and_nothing_registered(https_proxy, small_gguf, ollama_server):
    host, cert = https_proxy
    result = _register(small_gguf, "remote-denied", host, "--ollama-header", "Authorization: Bearer wrong",
                       "--ollama-ca-cert", str(cert))
    assert result.exit_code != 0
    assert "HTTP 401" in result.output and host in result.output and "wrong" not in result.output
    assert "remote-denied:latest" not in _names(ollama_server)
