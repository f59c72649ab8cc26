#!/usr/bin/env python3
"""How long the verify stage takes on a finished run, and where the seconds go.

    .venv/bin/ftdeploy train-and-serve --runs-dir /tmp/v14/runs            # once: a finished demo run
    nice -n 5 .venv/bin/python scripts/bench_verify.py --runs-dir /tmp/v14/runs --repeat 3

Runs `ftdeploy verify` (the real CLI, a fresh process each time, so imports and model loads count) `--repeat`
times against the run's Ollama server, and prints each run's wall time, the stage's own breakdown (verify.json's
`seconds`: model loads, the merged and base answers, template parity, the served answers) and the load average
before it (the machine may be shared), then a Markdown table for docs/benchmarks.md. Exits 1 if a verify fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--name", default="ftdeploy-demo")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ollama-host", default=None, help="default: the run's own (a local server ftdeploy starts)")
    args = parser.parse_args()

    run_dir = args.runs_dir / args.name
    if not (run_dir / "manifest.json").is_file():
        print(f"{run_dir}: no finished run; make one with `ftdeploy train-and-serve --runs-dir {args.runs_dir}`",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "ftdeploy.cli", "verify", "--runs-dir", str(args.runs_dir), "--name", args.name,
           "--json", *(["--ollama-host", args.ollama_host] if args.ollama_host else [])]
    runs = []
    for i in range(args.repeat):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        verify = json.loads((run_dir / "verify.json").read_text())
        runs.append({"run": i + 1, "wall_s": round(wall, 2), "load_before": round(load, 2),
                     "max_tokens": verify.get("max_tokens"), "seconds": verify.get("seconds", {})})
        print(f"run {i + 1}: {wall:.1f} s (load average before: {load:.2f})", file=sys.stderr)

    walls = [r["wall_s"] for r in runs]
    steps = list(dict.fromkeys(k for r in runs for k in r["seconds"]))
    print(json.dumps({"command": " ".join(cmd[1:]), "runs": runs, "median_wall_s": statistics.median(walls)},
                     indent=2))
    print("| run | wall s | load before | " + " | ".join(steps) + " |")
    print("|---|---|---|" + "---|" * len(steps))
    for r in runs:
        print(f"| {r['run']} | {r['wall_s']:.1f} | {r['load_before']:.2f} | "
              + " | ".join(f"{r['seconds'].get(s, 0):.1f}" for s in steps) + " |")
    print(f"\nmedian wall: {statistics.median(walls):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
