"""Ollama failures carry their kind (unreachable, auth, TLS, not found, server), and the register stage treats only
"not found" as a model that is not there: a refused token or an untrusted certificate says so, instead of reading
as "not registered" (or being skipped over on the way to a create). Against the scripted loopback server."""

import json
import subprocess

import pytest
from click.testing import CliRunner
from conftest import json_reply

from ftdeploy.cli import cli
from ftdeploy.errors import (
    ModelNotFoundError,
    OllamaAuthError,
    OllamaError,
    OllamaServerError,
    OllamaTLSError,
    UnreachableError,
)
from ftdeploy.ollama import OllamaClient
from ftdeploy.stages.modelfile import ModelfileSpec
from ftdeploy.stages.register import push, register_adapter

VERSION = {"GET /api/version": json_reply({"version": "0.17.4"})}


def _status(code: int, error: str) -> bytes:
    body = json.dumps({"error": error}).encode()
    head = b"HTTP/1.1 %d Refused\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (code, len(body)) + body


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize(("code", "kind"), [(401, OllamaAuthError), (403, OllamaAuthError), (407, OllamaAuthError),
                                            (404, ModelNotFoundError), (500, OllamaServerError)])
def test_an_http_refusal_is_raised_as_its_kind(scripted, code, kind):
    server = scripted({"POST /api/show": _status(code, "no")})
    with pytest.raises(kind) as caught:
        OllamaClient(server.host).show("m")
    assert f"HTTP {code}" in str(caught.value) and server.host in str(caught.value)
    assert caught.value.kind == kind.kind


def test_the_kinds_are_distinct_and_all_ollama_errors():
    kinds = [UnreachableError, OllamaAuthError, OllamaTLSError, ModelNotFoundError, OllamaServerError]
    assert all(issubclass(k, OllamaError) for k in kinds)
    assert len({k.kind for k in kinds}) == len(kinds)


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_token_while_pushing_is_reported_as_such_not_as_not_registered(scripted, code):
    server = scripted({**VERSION, "POST /api/show": _status(code, "unauthorized")})
    with pytest.raises(OllamaError) as caught:
        push(OllamaClient(server.host, headers={"Authorization": "Bearer wrong"}), "m", "team/m", show_progress=False)
    message = str(caught.value)
    assert "not registered" not in message
    assert f"HTTP {code}" in message and "authentication" in message and "--ollama-header" in message
    assert isinstance(caught.value, OllamaAuthError)
    assert not any(line.startswith(("POST /api/copy", "POST /api/push")) for line in server.requests)


def test_the_push_command_says_the_server_refused_the_token(scripted):
    """Through the CLI: the version answers (a proxy that lets it through), the model's show is refused."""
    server = scripted({**VERSION, "POST /api/show": _status(403, "forbidden")})
    result = CliRunner().invoke(cli, ["push", "--name", "m", "--to", "team/m", "--ollama-host", server.host,
                                      "--ollama-header", "Authorization: Bearer wrong"])
    assert result.exit_code != 0
    assert "HTTP 403" in result.output and "authentication" in result.output
    assert "not registered" not in result.output and "ftdeploy register" not in result.output


def test_an_untrusted_certificate_while_pushing_is_a_tls_error_not_not_registered(scripted, self_signed):
    server = scripted({**VERSION, "POST /api/show": json_reply({"template": "", "model_info": {}})}, tls=self_signed)
    with pytest.raises(OllamaError) as caught:
        push(OllamaClient(server.host), "m", "team/m", show_progress=False)  # no --ollama-ca-cert
    message = str(caught.value)
    assert "not registered" not in message
    assert "TLS" in message and server.host in message and "--ollama-ca-cert" in message
    assert "certificate verify failed" in message
    assert isinstance(caught.value, OllamaTLSError)


def test_the_same_server_with_its_ca_trusted_answers(scripted, self_signed):
    cert, _ = self_signed
    server = scripted({**VERSION}, tls=self_signed)
    assert OllamaClient(server.host, verify=str(cert)).version() == "0.17.4"


def test_a_model_that_is_not_there_still_reads_as_not_registered(scripted):
    server = scripted({**VERSION, "POST /api/show": _status(404, "model 'm' not found")})
    with pytest.raises(ModelNotFoundError, match="m is not registered at .*run `ftdeploy register` first"):
        push(OllamaClient(server.host), "m", "team/m", show_progress=False)


def _adapter_inputs(folder):
    import numpy as np
    from gguf import GGUFWriter

    base = folder / "base.gguf"
    writer = GGUFWriter(str(base), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (adapter / "adapter_config.json").write_text("{}")
    return base, adapter


def test_a_refused_token_on_the_base_model_stops_an_adapter_deploy_before_any_create(scripted, tmp_path):
    """The base model's show is refused: that is not "the base is not registered yet" (which would go on to create
    it); the deploy stops with the refusal and creates nothing."""
    have_blob = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    server = scripted({**VERSION, "HEAD /api/blobs/": have_blob, "POST /api/show": _status(401, "unauthorized"),
                       "POST /api/create": json_reply(b'{"status":"success"}\n')})
    base, adapter = _adapter_inputs(tmp_path)
    spec = ModelfileSpec(gguf=str(base), template="{{ .Prompt }}", stops=[])
    client = OllamaClient(server.host, timeout=2, long_timeout=2)
    with pytest.raises(OllamaError) as caught:
        register_adapter(client, "tune", "base:q4_k_m", spec, base, adapter, show_progress=False)
    assert isinstance(caught.value, OllamaAuthError) and "HTTP 401" in str(caught.value)
    assert not any(line.startswith("POST /api/create") for line in server.requests)
