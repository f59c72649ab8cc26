"""Unsloth patches transformers, PEFT and TRL as it is imported; imported after them it trains unpatched.

A stand-in `unsloth` package records which of them were already in sys.modules when it was imported, and
stops the run when the engine asks it for the model. Each entry point that trains runs in a fresh process
that believes it has a GPU (nothing touches one before the stand-in stops it)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, build_tiny_model_dir

pytestmark = pytest.mark.slow

FAKE_UNSLOTH = '''
"""Stand-in for unsloth: notes what was imported before it; stops at the model load."""
import json, os, sys

def _note(event, **fields):
    with open(os.environ["FAKE_UNSLOTH_RECORD"], "a") as fh:
        fh.write(json.dumps({"event": event, **fields}) + "\\n")

_note("import", already=sorted(m for m in ("transformers", "peft", "trl") if m in sys.modules))
print("FAKE UNSLOTH BANNER: Will patch your computer")  # the real one prints its banner on stdout

class FastLanguageModel:
    @staticmethod
    def from_pretrained(**kwargs):
        _note("from_pretrained")
        raise RuntimeError("fake unsloth: stop here")
'''

DRIVER = '''
import sys
import torch

torch.cuda.is_available = lambda: True  # so that the engine chosen is unsloth

from ftdeploy import pipeline

pipeline.Context.client = lambda self: None  # no Ollama server is part of this test

try:
    if sys.argv[1] == "worker":
        from ftdeploy.distributed import worker_main

        worker_main(sys.argv[2])
    else:
        from ftdeploy.cli import cli

        cli.main(sys.argv[1:], prog_name="ftdeploy", standalone_mode=False)
except RuntimeError as exc:
    if "fake unsloth" not in str(exc):
        raise
    sys.exit(0)
sys.exit("the run ended without asking unsloth for the model")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-order")
    base = build_tiny_model_dir(root / "base")
    (root / "fake" / "unsloth").mkdir(parents=True)
    (root / "fake" / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "fake"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Prepared data for the entry points that start at training (data preparation needs no engine).
    subprocess.run([sys.executable, "-m", "ftdeploy.cli", "data", "--runs-dir", str(root / "runs"), "--name", "t",
                    "--base-model", str(base)], check=True, env=env, capture_output=True, timeout=300)
    return root, base, env


def _run_until_unsloth(root, env, *args):
    record = root / f"record-{args[0]}.jsonl"
    proc = subprocess.run([sys.executable, str(root / "driver.py"), *args],
                          env={**env, "FAKE_UNSLOTH_RECORD": str(record)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout is for results (--json): Unsloth's banner goes to stderr with the other logs
    assert "FAKE UNSLOTH BANNER" not in proc.stdout and "FAKE UNSLOTH BANNER" in proc.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


def _assert_unsloth_came_first(events):
    assert events[0]["event"] == "import"
    assert events[0]["already"] == [], f"imported before unsloth: {events[0]['already']}"
    assert events[-1]["event"] == "from_pretrained"  # the unsloth engine was the one that loaded the model


def test_the_train_command_imports_unsloth_before_transformers(setup):
    root, base, env = setup
    _assert_unsloth_came_first(_run_until_unsloth(
        root, env, "train", "--runs-dir", str(root / "runs"), "--name", "t", "--base-model", str(base),
        "--engine", "unsloth"))


def test_train_and_serve_imports_unsloth_before_the_data_stage_loads_the_tokenizer(setup):
    root, base, env = setup
    events = _run_until_unsloth(root, env, "train-and-serve", "--runs-dir", str(root / "whole"), "--name", "t",
                                "--base-model", str(base), "--engine", "auto")
    _assert_unsloth_came_first(events)
    assert (root / "whole" / "t" / "data" / "train.jsonl").is_file()  # the data stage ran in between


def test_a_launched_worker_imports_unsloth_before_its_tokenizer(setup):
    root, base, env = setup
    from ftdeploy.config import load_config

    cfg = load_config(None, ["train.engine=unsloth"])
    spec = root / "launch.json"
    spec.write_text(json.dumps({"config": cfg.to_dict(), "base": str(base),
                                "data_dir": str(root / "runs" / "t" / "data"), "out_dir": str(root / "worker-adapter"),
                                "checkpoint_dir": None, "resume": False, "metrics": str(root / "metrics.json")}))
    _assert_unsloth_came_first(_run_until_unsloth(root, env, "worker", str(spec)))
