"""`pip install ftdeploy` without extras: the light commands work in a venv that has no torch (issue 15)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_CACHE, smol_gguf_copy

pytestmark = [pytest.mark.ollama, pytest.mark.slow]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("base-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The wheelhouse scripts/setup.sh fills, when it is there; the index otherwise.
    wheels = Path(os.environ.get("FTDEPLOY_WHEELHOUSE",
                                 SHARED_CACHE / "wheels" / f"cp{sys.version_info[0]}{sys.version_info[1]}"))
    source = ["--no-index", "--find-links", str(wheels)] if any(wheels.glob("*.whl")) else []
    src = tmp_path_factory.mktemp("src") / "ftdeploy"  # a copy: building must not leave build/ in the checkout
    shutil.copytree(REPO, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "runs", ".wheelhouse", "build", "*.egg-info"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *source, str(src)], check=True, timeout=900)
    return venv


def test_the_base_install_has_no_torch_and_answers_help(base_venv):
    python = str(base_venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    for args in (["--help"], ["register", "--help"], ["modelfile", "--help"], ["verify", "--help"]):
        proc = subprocess.run([str(base_venv / "bin" / "ftdeploy"), *args], capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stderr)


def test_register_works_with_only_the_base_dependencies(base_venv, ollama_server, tmp_path):
    gguf = smol_gguf_copy(tmp_path, "base-venv")
    proc = subprocess.run([str(base_venv / "bin" / "ftdeploy"), "register", "--gguf", str(gguf), "--name", "base-venv",
                           "--ollama-host", ollama_server.host, "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "<|im_start|>" in ollama_server.client.show("base-venv")["template"]


def test_a_command_that_needs_the_training_stack_says_which_extra_to_install(base_venv, tmp_path):
    base = tmp_path / "base"  # a local checkpoint directory: reading its tokenizer needs transformers
    base.mkdir()
    # Shaped like a checkpoint (config, weights, tokenizer), so the folder check passes and loading is what fails.
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "model.safetensors").write_bytes(b"")
    (base / "tokenizer.json").write_text("{}")
    proc = subprocess.run([str(base_venv / "bin" / "ftdeploy"), "data", "--runs-dir", str(tmp_path / "runs"),
                           "--base-model", str(base)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "which is not installed here: pip install 'ftdeploy[train]'" in proc.stderr, proc.stderr
