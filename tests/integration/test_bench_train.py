"""scripts/bench_train.py times the trainer `ftdeploy train` builds; on CPU it runs end to end on a tiny shape."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_benchmark_trains_through_the_product_with_the_given_config_on_cpu(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--shapes", "tiny", "--engines", "hf",
         "--kinds", "fixed", "--batch", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
         "--set", "lora.r=4", "--models-dir", str(tmp_path / "models"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["device"] == "cpu" and report["peak_bf16_flops"] is None
    assert report["config"] == {"file": None, "set": ["lora.r=4"]}
    [run] = report["runs"]
    assert (run["shape"], run["kind"], run["batch"], run["seq_len"]) == ("tiny", "fixed", 2, 16)
    hf = run["engines"]["hf"]
    assert hf["real_tokens_per_step"] == 32 and hf["tokens_per_s"] > 0 and hf["seconds_per_step"] > 0
    assert hf["peak_gib"] is None and hf["mfu"] is None  # no GPU: no memory counter, no bf16 peak
    # LoRA r=4 on the 7 projections of 2 layers (hidden 64, kv 32, mlp 128): 4 x 1024 per layer. The --set
    # reached the engine, so the benchmark trained the product's model, not one of its own.
    assert hf["trainable_params"] == 2 * 4 * 1024
    assert hf["optim"] == "adamw_torch"  # the product's choice on CPU
    assert "tiny" in proc.stderr and "tok/s" in proc.stderr
