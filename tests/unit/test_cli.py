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


# ---------------------------------------------------------------- issue 24: runs that damage other runs

def _good_run(runs, name, done, **records):
    """A run whose `done` stages finished (with artifacts on disk for data and train), as a good run's records say."""
    from ftdeploy.runs import Run

    run = Run(runs / name)
    (run.path / "data").mkdir(parents=True)
    (run.path / "data" / "train.jsonl").write_text('{"input_ids": [1, 2], "labels": [1, 2]}\n')
    (run.path / "adapter").mkdir()
    (run.path / "adapter" / "adapter_config.json").write_text("{}")
    (run.path / "config.yaml").write_text(f"name: {name}\n# the config the good run was made with\n")
    stages = {s: {"status": "done", "fingerprint": f"fp-{s}", "outputs": {}} for s in done}
    stages |= records
    run.save_manifest({"stages": stages, "artifacts": {}, "metrics": {}})
    return run


def _records(run):
    return (run.path / "config.yaml").read_bytes(), run.manifest_path.read_bytes()


@pytest.fixture
def no_tokenizer(monkeypatch, tmp_path):
    """The data stage without a base model or tokenizer: `prepare` (set by the test) stands in for prepare_data."""
    import ftdeploy.data as data_stage
    import ftdeploy.tokenizer as tokenizer
    from ftdeploy import pipeline

    calls = {"tokenizer": 0}

    def load_tokenizer(*args, **kw):
        calls["tokenizer"] += 1
        return type("Tok", (), {"pad_token": "<pad>", "eos_token": "</s>"})(), None

    monkeypatch.setattr(pipeline.Context, "base", lambda self: tmp_path)
    monkeypatch.setattr(tokenizer, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(data_stage, "prepare_data", lambda *a: calls["prepare"](*a))
    return calls


def test_a_failed_data_command_leaves_a_good_runs_records_as_they_were(tmp_path, no_tokenizer):
    from ftdeploy.errors import DataError

    runs = tmp_path / "runs"
    run = _good_run(runs, "identity", ["data", "train"])
    before = _records(run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')

    def bad_rows(cfg, tokenizer, mapping, out_dir, seed, method):
        raise DataError(f"{bad}:1: no assistant message to learn from")

    no_tokenizer["prepare"] = bad_rows
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(runs), "--name", "identity", "--data", str(bad)])
    assert result.exit_code == 1 and f"{bad}:1: no assistant message" in result.output
    assert _records(run) == before  # config.yaml and the "done" data record, byte for byte
    assert run.stage_record("data")["status"] == "done"


def test_a_register_that_cannot_reach_its_host_leaves_the_runs_records_as_they_were(tmp_path):
    from ftdeploy.stages.modelfile import ModelfileSpec

    runs = tmp_path / "runs"
    run = _good_run(runs, "identity", ["data", "train", "merge", "export", "modelfile", "register"])
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 64)
    (run.path / "modelfile.json").write_text(ModelfileSpec(gguf=str(gguf), template="{{ .Prompt }}",
                                                           stops=["</s>"]).to_json())
    before = _records(run)
    host = f"http://127.0.0.1:{_closed_port()}"
    result = CliRunner().invoke(cli, ["register", "--runs-dir", str(runs), "--name", "identity", "--ollama-host", host])
    assert result.exit_code == 1 and f"cannot reach the Ollama server at {host}" in result.output
    assert _records(run) == before


def test_merge_never_merges_the_adapter_an_interrupted_train_left(tmp_path, monkeypatch):
    """The adapter/ of an earlier train is still there after a train that was stopped, or that ran before the data
    stage ran again: merging it would record "done" for a model that is not this run's."""
    import ftdeploy.stages.merge as merge_stage

    merged = []

    def merge(base, adapter_dir, merged_dir, trust_remote_code):
        merged.append(adapter_dir)
        merged_dir.mkdir()
        (merged_dir / "config.json").write_text("{}")
        return merged_dir

    monkeypatch.setattr(merge_stage, "merge", merge)
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (base / name).write_text("{}")
    runs = tmp_path / "runs"
    stopped = _good_run(runs, "stopped", ["data"], train={"status": "failed", "fingerprint": "fp-new",
                                                          "error": "stopped (exit status 143)"})
    result = CliRunner().invoke(cli, ["merge", "--runs-dir", str(runs), "--name", "stopped", "--base-model", str(base)])
    assert result.exit_code == 1, result.output
    assert "the train stage failed (stopped (exit status 143))" in result.output
    assert "run `ftdeploy train` first" in result.output
    stale = _good_run(runs, "stale", ["data"], train={"status": "done", "fingerprint": "fp-train",
                                                      "upstream": "fp-data-before"})
    result = CliRunner().invoke(cli, ["merge", "--runs-dir", str(runs), "--name", "stale", "--base-model", str(base)])
    assert result.exit_code == 1, result.output
    assert "the data stage has run again since train ran" in result.output
    assert merged == []
    for run in (stopped, stale):
        assert "merge" not in run.load_manifest()["stages"] and not run.merged_dir.exists()


def test_each_stage_records_the_upstream_it_consumed(tmp_path):
    from ftdeploy.runs import Run

    run = Run(tmp_path / "r")
    with run.stage("data", "fp-data"):
        (run.data_dir).mkdir(parents=True)
    with run.stage("train", "fp-train"):
        pass
    assert run.stage_record("train")["upstream"] == "fp-data"
    run.check_upstream("merge")  # train finished on the data that is there


def test_a_data_command_that_fails_before_any_artifact_leaves_no_run_directory(tmp_path, no_tokenizer):
    from ftdeploy.errors import DataError

    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(runs), "--base-model", "/nope"])
    assert result.exit_code == 1 and "--base-model /nope: no such file or directory" in result.output
    assert not runs.exists()

    def bad_rows(*args):
        raise DataError("d.jsonl:1: no assistant message to learn from")

    no_tokenizer["prepare"] = bad_rows
    runs.mkdir()
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(runs), "--name", "fresh"])
    assert result.exit_code == 1 and "no assistant message" in result.output
    assert list(runs.iterdir()) == []  # no config.yaml, manifest.json or .lock left in a new run directory


def test_a_stage_that_fails_after_writing_keeps_the_whole_error(tmp_path):
    from ftdeploy.runs import Run

    run = Run(tmp_path / "r")
    error = "d.jsonl:2: bad\nd.jsonl:4: bad too"
    with pytest.raises(RuntimeError), run.stage("data", "fp"):
        (run.path / "loss.png").write_bytes(b"half a plot")
        raise RuntimeError(error)
    assert run.stage_record("data") | {"seconds": 0} == {"status": "failed", "error": error, "seconds": 0,
                                                         "fingerprint": "fp", "upstream": None}


# ---------------------------------------------------------------- issue 24: tracebacks and hangs

def test_a_damaged_manifest_is_named_by_data_and_report(tmp_path, no_tokenizer):
    run = tmp_path / "runs" / "broken"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text('{"stages": {"data": ')
    for args in (["data", "--runs-dir", str(tmp_path / "runs"), "--name", "broken"], ["report", str(run)],
                 ["merge", "--runs-dir", str(tmp_path / "runs"), "--name", "broken"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert f"{run / 'manifest.json'}: not a readable run manifest (line 1, column 21" in result.output
    assert (run / "manifest.json").read_text() == '{"stages": {"data": '
    assert no_tokenizer["tokenizer"] == 0


def test_a_full_disk_during_data_is_one_message_and_leaves_no_half_run(tmp_path, no_tokenizer):
    import errno

    from ftdeploy.runs import atomic_path

    def full_disk(cfg, tokenizer, mapping, out_dir, seed, method):
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            (tmp / "train.jsonl").write_text('{"input_ids": [1]}\n' * 100)
            raise OSError(errno.ENOSPC, "No space left on device")  # what a write() says: no file name

    no_tokenizer["prepare"] = full_disk
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(runs), "--name", "full"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"cannot write {runs / 'full'}: No space left on device; the disk is full" in result.output
    assert not runs.exists()


def test_a_base_model_folder_without_weights_is_refused_before_loading(tmp_path, no_tokenizer):
    base = tmp_path / "half-copied"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path / "runs"), "--base-model", str(base)])
    assert result.exit_code == 1, result.output
    assert f"--base-model {base}: the directory has config.json but no model weights" in result.output
    assert "no tokenizer" in result.output
    assert no_tokenizer["tokenizer"] == 0 and time.monotonic() - started < 10


def test_a_malformed_ollama_host_is_named(tmp_path):
    result = CliRunner().invoke(cli, ["doctor", "--ollama-host", "http://[::1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "--ollama-host: 'http://[::1' is not a host URL" in result.output
    result = CliRunner().invoke(cli, ["register", "--name", "x", "--ollama-host", "http://[::1"])
    assert result.exit_code == 2 and "ollama.host: 'http://[::1' is not a host URL" in result.output


# ---------------------------------------------------------------- issue 24: messages that mislead

def test_a_base_model_from_a_config_file_is_named_as_such(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("base_model: ./no/such/model\n")
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path / "runs"), "--config", str(config)])
    assert result.exit_code == 1
    assert f"base_model ./no/such/model [from {config}, key base_model]: no such file or directory" in result.output
    assert "--base-model" not in result.output


def test_doctor_says_what_answered_and_fails_on_a_broken_server(scripted):
    server = scripted({"GET /api/version": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n"
                                           b"Connection: close\r\n\r\noops!"})
    result = CliRunner().invoke(cli, ["doctor", "--json", "--ollama-host", server.host])
    assert result.exit_code == 1
    check = {c["name"]: c for c in json.loads(result.output)["checks"]}["ollama"]
    assert not check["ok"] and check["fatal"]
    assert f"something answers at {server.host}, but not as an Ollama server" in check["detail"]
    assert "HTTP 500: oops!" in check["detail"]


def test_sigterm_says_it_stopped_and_how_to_go_on(tmp_path, no_tokenizer):
    import os
    import signal

    def killed(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    no_tokenizer["prepare"] = killed
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path / "runs")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143
    assert "Stopped by SIGTERM" in result.output and "Run the same command again to continue" in result.output
    assert "--from STAGE" in result.output


def test_data_that_is_no_file_is_refused_before_the_tokenizer_loads(tmp_path, no_tokenizer):
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path / "runs"), "--data", "/dev/zero"])
    assert result.exit_code == 1, result.output
    assert "--data /dev/zero: a character device, not a data file" in result.output
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path / "runs"), "--data", ""])
    assert result.exit_code == 2 and "data.train: empty" in result.output
    assert no_tokenizer["tokenizer"] == 0
    assert not (tmp_path / "runs").exists()


def test_inside_compose_the_closing_hint_runs_ollama_in_its_container(monkeypatch):
    from pathlib import Path

    import yaml

    from ftdeploy.cli import COMPOSE_OLLAMA_SERVICE_ENV, _ollama_run_line

    compose = yaml.safe_load((Path(__file__).parents[2] / "compose.yaml").read_text())
    env = compose["services"]["ftdeploy"]["environment"]
    monkeypatch.setenv(COMPOSE_OLLAMA_SERVICE_ENV, env[COMPOSE_OLLAMA_SERVICE_ENV])
    assert _ollama_run_line("my-model", env["OLLAMA_HOST"]) == "docker compose exec ollama ollama run my-model"
    # another server named by --ollama-host: the hint for that one
    assert _ollama_run_line("my-model", "http://10.0.0.5:11434").endswith("run my-model")
    assert "OLLAMA_HOST=http://10.0.0.5:11434" in _ollama_run_line("my-model", "http://10.0.0.5:11434")


def test_the_format_flag_offers_every_layout_the_data_stage_reads():
    import click

    from ftdeploy.cli import cli
    from ftdeploy.data.formats import LAYOUTS

    option = next(p for p in cli.commands["data"].params if p.name == "layout")
    assert isinstance(option.type, click.Choice) and list(option.type.choices) == ["auto", *LAYOUTS]


@pytest.mark.parametrize("command", ["train", "train-and-serve"])
def test_the_method_flag_sets_train_method_over_the_config(command, monkeypatch):
    import click

    from ftdeploy import cli as cli_module

    seen = []

    def context(cfg, ollama_explicit, existing=False):
        seen.append(cfg.train.method)
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(cli_module, "_context", context)
    for args, method in ((["--method", "dpo"], "dpo"), (["--set", "train.method=kto", "--method", "dpo"], "dpo"),
                         (["--method", "orpo"], "orpo"), (["--set", "train.method=orpo"], "orpo"), ([], "sft")):
        result = CliRunner().invoke(cli, [command, *args])
        assert result.exit_code == 0, result.output
        assert seen.pop() == method
    result = CliRunner().invoke(cli, [command, "--method", "ppo"])
    assert result.exit_code == 2 and "'ppo' is not one of 'sft', 'dpo', 'orpo', 'kto'" in result.output
    assert "orpo" in CliRunner().invoke(cli, [command, "--help"]).output
