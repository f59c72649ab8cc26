"""Faults injected for real: a training process killed mid-run, a damaged checkpoint, a full disk."""

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from ftdeploy.cli import cli

pytestmark = pytest.mark.slow

ARGS = ["--set", "train.max_steps=8", "--set", "train.save_steps=3", "--set", "train.batch_size=2"]


def _ftdeploy(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ftdeploy.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _losses(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return [h["loss"] for h in manifest["metrics"]["train"]["loss_history"]], manifest["metrics"]["train"]


def test_training_killed_with_sigkill_resumes_from_its_checkpoint_on_the_same_trajectory(tmp_path):
    runs = tmp_path / "runs"
    for name in ("straight", "killed"):
        proc = _ftdeploy("data", "--runs-dir", str(runs), "--name", name, *ARGS)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()

    straight = _ftdeploy("train", "--runs-dir", str(runs), "--name", "straight", *ARGS)
    assert straight.wait(timeout=900) == 0, straight.stderr.read()

    victim = _ftdeploy("train", "--runs-dir", str(runs), "--name", "killed", *ARGS)
    checkpoint = runs / "killed" / "checkpoints" / "checkpoint-3"
    deadline = time.monotonic() + 600
    while not (checkpoint / "trainer_state.json").is_file():
        assert victim.poll() is None, victim.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (runs / "killed" / "adapter").exists()  # the partial adapter was never published

    resumed = _ftdeploy("train", "--runs-dir", str(runs), "--name", "killed", *ARGS)
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert "resuming training from" in err

    expected, _ = _losses(runs / "straight")
    got, metrics = _losses(runs / "killed")
    assert metrics["resumed_from"].endswith(("checkpoint-3", "checkpoint-6"))
    assert len(got) == len(expected) == 8
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ftdeploy.stages.train import latest_checkpoint

    for step in (3, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        save_file({"w": torch.zeros(2, 2)}, str(ckpt / "adapter_model.safetensors"))
        (ckpt / "optimizer.pt").write_bytes(b"x")
        (ckpt / "scheduler.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    weights = tmp_path / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated mid-write
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{not json")
    assert latest_checkpoint(tmp_path) is None


def test_a_disk_too_small_for_merge_and_export_is_refused_before_any_work(tmp_path, monkeypatch):
    from ftdeploy.pipeline import preflight

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    (base / "model.safetensors").write_bytes(b"\0" * (4 << 20))  # ~1 M parameters in fp32
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1 << 20)
    result = CliRunner().invoke(cli, ["train-and-serve", "--runs-dir", str(tmp_path / "runs"),
                                      "--base-model", str(base), "--data", "demo",
                                      "--ollama-host", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "not enough disk" in result.output and "GiB needed" in result.output
    assert not (tmp_path / "runs" / "ftdeploy-demo" / "data").exists()


@pytest.mark.ollama
def test_ollama_killed_mid_upload_then_the_rerun_completes(tmp_path):
    """The server dies after the first megabytes of the blob; a rerun against a restarted server uploads
    the whole file again (no partial blob is taken for the real one) and the model answers."""
    import shutil

    from ftdeploy.base_model import embedded_gguf
    from ftdeploy.errors import OllamaError
    from ftdeploy.local_server import free_port
    from ftdeploy.ollama import OllamaClient, start_local_server
    from ftdeploy.runs import sha256_file

    gguf = tmp_path / "smol.gguf"
    shutil.copyfile(embedded_gguf("smollm2-135m-instruct"), gguf)
    digest = "sha256:" + sha256_file(gguf)
    port, models = free_port(), tmp_path / "models"
    server = start_local_server(port=port, models_dir=models, log_path=tmp_path / "serve.log", detach=False)
    client = OllamaClient(server.host)
    sent = []

    def kill_after_8_mib(n):
        sent.append(n)
        if sum(sent) >= 8 << 20 and server.pid:
            server.stop(timeout=5)

    with pytest.raises(OllamaError):
        client.push_blob(gguf, digest, progress=kill_after_8_mib)
    assert sum(sent) < gguf.stat().st_size

    server = start_local_server(port=port, models_dir=models, log_path=tmp_path / "serve2.log", detach=False)
    try:
        client = OllamaClient(server.host)
        assert not client.has_blob(digest)
        result = CliRunner().invoke(cli, ["register", "--gguf", str(gguf), "--name", "resumed", "--ollama-host",
                                          server.host, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output[result.output.index("{"):])["uploaded_bytes"] == gguf.stat().st_size
        import ollama

        reply = ollama.Client(host=server.host, timeout=300).chat(
            model="resumed", messages=[{"role": "user", "content": "Hi"}], options={"temperature": 0, "num_predict": 8})
        assert reply.message.content
    finally:
        server.stop()


def test_training_asked_for_again_after_it_finished_starts_over_instead_of_training_past_max_steps(tmp_path):
    """A finished training leaves its last checkpoint (at train.max_steps). `--force train`, `--from train` or
    `ftdeploy train` on the unchanged config must train the configured steps again, not resume from that checkpoint:
    transformers takes one more step before it checks, so each such rerun trained one step more ("step 3/2")."""
    from conftest import build_tiny_model_dir

    from ftdeploy import api

    base = build_tiny_model_dir(tmp_path / "base", pad="<|endoftext|>")
    overrides = {"base_model": str(base), "runs_dir": str(tmp_path / "runs"), "name": "again", "train.engine": "hf",
                 "train.max_steps": 2, "train.warmup_steps": 0, "train.batch_size": 2,
                 "train.gradient_accumulation": 1, "data.eval_split": 0}
    api.data(overrides=overrides, progress=False)
    first = api.train(overrides=overrides, progress=False)
    assert first.steps == 2 and (tmp_path / "runs" / "again" / "checkpoints" / "checkpoint-2").is_dir()
    again = api.train(overrides=overrides, progress=False)
    assert (again.steps, again.resumed_from) == (2, None)
