"""One process against N under torchrun (gloo on the CPU), on the demo: wall time and loss agreement.

    python scripts/bench_scaleout.py                 # 1 vs 2 processes, 30 steps (the demo config)
    python scripts/bench_scaleout.py --nproc 2 --steps 10 --out docs/benchmarks/scaleout.json

Both runs see the same global batch (ftdeploy keeps batch_size x gradient_accumulation across world sizes), so
their per-step losses should agree up to float summation order. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ftdeploy(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="Also write the result here.")
    args = parser.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="ftdeploy-bench-scaleout-"))
    try:
        result: dict[str, object] = {"steps": args.steps, "cpus": os.cpu_count()}
        histories = {}
        for nproc in (1, args.nproc):
            name = f"bench-np{nproc}"
            ftdeploy("data", "--runs-dir", str(runs), "--name", name)
            started = time.monotonic()
            ftdeploy("train", "--runs-dir", str(runs), "--name", name, "--nproc", str(nproc),
                     "--max-steps", str(args.steps))
            train = json.loads((runs / name / "manifest.json").read_text())["metrics"]["train"]
            result[f"nproc_{nproc}"] = {"wall_s": round(time.monotonic() - started, 1), "train_s": train["seconds"],
                                        "global_batch": train["global_batch"], "final_loss": train["final_loss"]}
            histories[nproc] = [h["loss"] for h in train["loss_history"]]
        gaps = [abs(a - b) for a, b in zip(histories[1], histories[args.nproc], strict=False)]
        result["max_loss_gap"] = max(gaps)
        result["mean_loss_gap"] = sum(gaps) / len(gaps)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    finally:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
