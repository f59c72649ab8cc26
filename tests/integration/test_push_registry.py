"""`ftdeploy push` against a real registry: the CNCF distribution registry (built by scripts/setup.sh from its
Go module) on loopback, pushed to by the real Ollama server, and read back through the registry API."""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import smol_gguf_copy

from ftdeploy.cli import cli
from ftdeploy.local_server import free_port

pytestmark = pytest.mark.ollama


def _registry_binary():
    local = Path(sys.executable).parent / "registry"
    found = local if local.exists() else shutil.which("registry")
    if not found:
        pytest.fail("no registry binary: run scripts/setup.sh (it builds distribution's registry from its Go module)")
    return str(found)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "version": 0.1, "log": {"level": "error"}, "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    proc = subprocess.Popen([_registry_binary(), "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(root / "registry.log", "wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the registry did not start; log: {(root / 'registry.log').read_text()[-500:]}")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_push_publishes_the_model_and_another_server_pulls_and_runs_it(ollama_server, registry, tmp_path):
    gguf = smol_gguf_copy(tmp_path, "push")
    runner = CliRunner()
    result = runner.invoke(cli, ["register", "--gguf", str(gguf), "--name", "push-smol",
                                 "--ollama-host", ollama_server.host])
    assert result.exit_code == 0, result.output
    destination = f"{registry}/team/push-smol:v1"
    result = runner.invoke(cli, ["push", "--name", "push-smol", "--to", destination, "--insecure",
                                 "--ollama-host", ollama_server.host, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["destination"] == destination and out["statuses"][-1] == "success"
    assert out["bytes"] >= gguf.stat().st_size
    tags = requests.get(f"http://{registry}/v2/team/push-smol/tags/list", timeout=5).json()
    assert "v1" in tags["tags"]

    # The registry holds exactly the weights that were registered: manifest -> model layer -> the GGUF's bytes.
    # (Pulling it back with `ollama pull` needs a registry that redirects blob downloads, as ollama.com does;
    # Ollama 0.17.4 refuses a registry that serves blobs directly: "no Location header in response".)
    manifest = requests.get(f"http://{registry}/v2/team/push-smol/manifests/v1", timeout=5, headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()
    model_layers = [layer for layer in manifest["layers"] if layer["mediaType"] == "application/vnd.ollama.image.model"]
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert [layer["digest"] for layer in model_layers] == [digest]
    blob = requests.get(f"http://{registry}/v2/team/push-smol/blobs/{digest}", timeout=60)
    assert blob.status_code == 200 and "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
    template = [layer for layer in manifest["layers"] if layer["mediaType"] == "application/vnd.ollama.image.template"]
    assert template, manifest


def test_pushing_to_a_registry_that_is_not_there_fails_naming_it(ollama_server, tmp_path):
    gguf = smol_gguf_copy(tmp_path, "push2")
    runner = CliRunner()
    assert runner.invoke(cli, ["register", "--gguf", str(gguf), "--name", "push-smol2",
                               "--ollama-host", ollama_server.host]).exit_code == 0
    dead = f"127.0.0.1:{free_port()}"
    result = runner.invoke(cli, ["push", "--name", "push-smol2", "--to", f"{dead}/team/push-smol2", "--insecure",
                                 "--ollama-host", ollama_server.host])
    assert result.exit_code != 0 and "could not push" in result.output and dead in result.output
