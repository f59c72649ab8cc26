"""A server that accepts the connection and then says nothing, met by the real CLI in a subprocess: the command
fails within ollama.timeout (or ollama.long_timeout for a stalled create stream), says the host stopped answering
rather than that it cannot be reached, and prints no traceback."""

import subprocess
import sys
import time

import pytest
from conftest import json_reply

from ftdeploy.base_model import embedded_gguf


@pytest.fixture
def silent_server(scripted):
    return scripted()


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


def test_a_create_stream_that_goes_quiet_is_bounded_by_the_long_timeout(scripted, tmp_path):
    """The server answers the version and has the blob, then /api/create sends one status line and goes quiet."""
    create_head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"%x\r\n%s\r\n" % (len(b'{"status":"parsing GGUF"}\n'), b'{"status":"parsing GGUF"}\n'))
    have_blob = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    server = scripted({"GET /api/version": json_reply({"version": "0.17.4"}), "HEAD /api/blobs/": have_blob,
                       "POST /api/create": create_head})
    proc, took = _ftdeploy("register", "--gguf", str(embedded_gguf("smollm2-135m-instruct")), "--name", "quiet",
                           "--ollama-host", server.host, "--set", "ollama.long_timeout=2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the Ollama server at {server.host} stopped answering" in proc.stderr
    assert "create quiet" in proc.stderr and "ollama.long_timeout" in proc.stderr
    assert took < 40
