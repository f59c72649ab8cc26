import json
import socket
import time

import pytest
from click.testing import CliRunner

from ftdeploy import __version__
from ftdeploy.cli import cli

COMMANDS = [[], ["train-and-serve"], ["data"], ["train"], ["merge"], ["export"], ["modelfile"], ["register"],
            ["verify"], ["doctor"], ["config"], ["ollama"], ["ollama", "status"], ["ollama", "stop"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "ftdeploy")
def test_every_command_has_help(args):
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from ftdeploy.cli import cli; cli(['--help'], standalone_mode=False); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_config_errors_are_one_message_and_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["config", "--set", "lora.r=x", "--set", "nope=1", "--quant", "q9"])
    assert result.exit_code == 2
    assert "lora.r: expected an integer" in result.output
    assert "nope: unknown key" in result.output
    assert "export.quant[0]: unknown quantization type 'q9'" in result.output
    # CliRunner keeps an uncaught exception in result.exception (never in the output): a clean exit is SystemExit.
    assert isinstance(result.exception, SystemExit), result.exception


def test_missing_config_file_is_named():
    result = CliRunner().invoke(cli, ["config", "--config", "does-not-exist.yaml"])
    assert result.exit_code == 2 and "does-not-exist.yaml: no such file" in result.output


def test_no_arguments_means_the_embedded_demo():
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 0
    assert "base_model: smollm2-135m-instruct" in result.output and "train: demo" in result.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_register_to_an_unreachable_explicit_host_fails_fast_naming_it(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 64)
    host = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["register", "--gguf", str(gguf), "--name", "x", "--ollama-host", host])
    assert result.exit_code == 1
    assert f"cannot reach the Ollama server at {host}" in result.output
    assert time.monotonic() - started < 20


def test_register_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = CliRunner().invoke(cli, ["register", "--gguf", str(bad), "--name", "x"])
    assert result.exit_code == 1
    assert f"{bad}: not a GGUF file" in result.output


def test_stage_without_its_input_says_which_stage_to_run(tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--runs-dir", str(tmp_path), "--name", "nothing-yet",
                                      "--base-model", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "no run named 'nothing-yet'" in result.output and "ftdeploy train-and-serve" in result.output
    # A run that exists but stopped before training: merge names the stage to run first.
    run = tmp_path / "half"
    (run / "data").mkdir(parents=True)
    (run / "manifest.json").write_text('{"stages": {"data": {"status": "done"}}}')
    result = CliRunner().invoke(cli, ["merge", "--runs-dir", str(tmp_path), "--name", "half",
                                      "--base-model", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "run `ftdeploy train` first" in result.output


def test_unknown_base_model_is_named(tmp_path):
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path), "--base-model", "./no/such/model"])
    assert result.exit_code == 1
    assert "--base-model ./no/such/model: no such file or directory" in result.output


def test_doctor_json_reports_each_check():
    result = CliRunner().invoke(cli, ["doctor", "--json", "--ollama-host", f"http://127.0.0.1:{_closed_port()}"])
    assert result.exit_code == 0
    names = {c["name"] for c in json.loads(result.output)["checks"]}
    assert {"python", "user", "hf-token", "torch", "cuda", "unsloth", "ollama", "llama_cpp_python"} <= names


def test_doctor_says_whether_a_hub_token_is_set_but_never_shows_it(monkeypatch):
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_doctor_secret_value")
    result = CliRunner().invoke(cli, ["doctor", "--json", "--ollama-host", f"http://127.0.0.1:{_closed_port()}"])
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert checks["hf-token"]["detail"] == "set (HF_TOKEN from the environment)"
    assert "hf_doctor_secret_value" not in result.output
    monkeypatch.delenv("HF_TOKEN")
    result = CliRunner().invoke(cli, ["doctor", "--json", "--ollama-host", f"http://127.0.0.1:{_closed_port()}"])
    assert "not set" in {c["name"]: c for c in json.loads(result.output)["checks"]}["hf-token"]["detail"]


def test_a_second_writer_on_the_same_run_is_refused_with_the_owners_pid(tmp_path):
    import os

    from ftdeploy.runs import Run

    run = Run(tmp_path / "busy")
    run.save_manifest(run.load_manifest())
    holder = run.acquire_lock()
    try:
        result = CliRunner().invoke(cli, ["merge", "--runs-dir", str(tmp_path), "--name", "busy"])
        assert result.exit_code == 1
        assert f"in use by another ftdeploy (pid {os.getpid()})" in result.output
    finally:
        holder.close()


def test_a_hub_model_that_cannot_be_downloaded_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path), "--base-model", "nobody/no-such-model"])
    assert result.exit_code == 1
    assert "--base-model nobody/no-such-model: cannot download from the Hugging Face Hub" in result.output
    assert not (tmp_path / "ftdeploy-demo" / "data").exists()


def test_each_stage_keeps_the_versions_and_host_it_ran_with(tmp_path, monkeypatch):
    """A run trained on a GPU host and served from another must not lose the training side's versions when the
    later stages overwrite the top-level ones."""
    import ftdeploy.runs as runs
    from ftdeploy.runs import Run

    run = Run(tmp_path / "split")
    monkeypatch.setattr(runs, "package_versions", lambda: {"torch": "2.11.0+cu130"})
    monkeypatch.setattr(runs.platform, "node", lambda: "gpu-host")
    with run.stage("train", "fp-train"):
        pass
    monkeypatch.setattr(runs, "package_versions", lambda: {"torch": "2.14.1"})
    monkeypatch.setattr(runs.platform, "node", lambda: "cpu-host")
    with run.stage("export", "fp-export"):
        pass
    manifest = run.load_manifest()
    assert manifest["stages"]["train"]["versions"] == {"torch": "2.11.0+cu130"}
    assert manifest["stages"]["train"]["host"] == "gpu-host"
    assert manifest["stages"]["export"]["versions"] == {"torch": "2.14.1"}
    assert manifest["versions"] == {"torch": "2.14.1"}
