#!/usr/bin/env python3
"""What the portable builds cost: quantize, the quant gate and the verify stage of a finished run, with the portable
(x86-64-v3) llama.cpp and Ollama against host-native builds, side by side in one run on this host.

    .venv/bin/python scripts/bench_portable.py runs/ftdeploy-demo \\
        --native-site /tmp/llama-native --native-ollama /tmp/ollama-native/ollama/v0.17.4/ollama

--native-site: a folder holding llama-cpp-python built host-native, e.g.
    CMAKE_ARGS=-DGGML_NATIVE=ON pip wheel --no-deps --no-cache-dir -w /tmp/w llama-cpp-python==0.3.36
    pip install --no-deps --target /tmp/llama-native /tmp/w/llama_cpp_python-*.whl
--native-ollama: an Ollama built host-native, e.g.
    FTDEPLOY_CACHE=/tmp/ollama-native FTDEPLOY_CPU_TARGET=native scripts/install-ollama.sh
Each measurement runs in its own process, the builds taking turns (quantize and the gate: the best of --repeat;
verify: once per build, on a fresh Ollama server from that binary). Prints JSON and a Markdown table for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_JOB = """
import json, sys, time
from pathlib import Path
import llama_cpp
from ftdeploy.config import load_config
from ftdeploy.fidelity import token_fidelity
from ftdeploy.pipeline import Context
from ftdeploy.runs import Run
from ftdeploy.pipeline.artifacts import eval_texts
from ftdeploy.stages.export import quantize
run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(run_dir / "config.yaml")
ctx = Context(cfg, Run(run_dir))
f16 = Path(ctx.run.stage_record("export")["outputs"]["gguf"][cfg.export.outtype])
texts, _ = eval_texts(ctx)
t0 = time.perf_counter(); quantize(f16, out, "q4_k_m"); t1 = time.perf_counter()
scores = token_fidelity(f16, out, texts); t2 = time.perf_counter()
print(json.dumps({"quantize_s": t1 - t0, "gate_s": t2 - t1, "top1": scores["top1_agreement"],
                  "library": llama_cpp.__file__}))
"""


def llama_times(run_dir: Path, site: Path | None, best: dict[str, float | str]) -> None:
    """One quantize + quant gate in a fresh process with the llama-cpp-python at `site` (None: the venv's); keeps
    the best time of each in `best`."""
    env = {**os.environ}
    if site:
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        # A run records its files relative to the folder it was made from (runs/NAME/...).
        proc = subprocess.run([sys.executable, "-c", LLAMA_JOB, str(run_dir.resolve()), f"{tmp}/q.gguf"], env=env,
                              capture_output=True, text=True, check=True, cwd=run_dir.resolve().parent.parent)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("quantize_s", "gate_s"):
        best[key] = min(float(best.get(key, 1e9)), row[key])
    best.update(top1=row["top1"], library=row["library"])


def verify_seconds(run_dir: Path, binary: Path) -> float:
    """`ftdeploy verify` of the run against a fresh server from `binary` (its own models folder and port)."""
    from ftdeploy.local_server import free_port
    from ftdeploy.ollama import start_local_server

    with tempfile.TemporaryDirectory() as tmp:
        server = start_local_server(port=free_port(), models_dir=Path(tmp) / "models", log_path=Path(tmp) / "log",
                                    binary=binary, detach=False)
        try:
            ftdeploy = [str(Path(sys.executable).with_name("ftdeploy")), "--name", run_dir.name,
                        "--runs-dir", str(run_dir.resolve().parent), "--ollama-host", server.host]
            where = run_dir.resolve().parent.parent
            subprocess.run([ftdeploy[0], "register", *ftdeploy[1:]], check=True, capture_output=True, cwd=where)
            t0 = time.perf_counter()
            subprocess.run([ftdeploy[0], "verify", *ftdeploy[1:]], check=True, capture_output=True, cwd=where)
            return time.perf_counter() - t0
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--native-site", type=Path, required=True)
    parser.add_argument("--native-ollama", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from ftdeploy.local_server import find_ollama_binary

    portable_ollama = find_ollama_binary()
    assert portable_ollama is not None, "no ollama binary: scripts/setup.sh"
    builds = (("portable (x86-64-v3)", None, portable_ollama), ("host-native", args.native_site, args.native_ollama))
    rows: list[dict[str, float | str]] = [{"build": name, "ollama": str(ollama)} for name, _, ollama in builds]
    # The two builds take turns, so load from anything else on the machine falls on both alike.
    for _ in range(args.repeat):
        for row, (_, site, _) in zip(rows, builds, strict=True):
            llama_times(args.run_dir, site, row)
    for row, (_, _, ollama) in zip(rows, builds, strict=True):
        row["verify_s"] = verify_seconds(args.run_dir, ollama)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "command": " ".join(sys.argv), "rows": rows}, indent=2))
    print("| build | quantize Q4_K_M s | quant gate s | verify stage s | top-1 vs F16 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['build']} | {r['quantize_s']:.2f} | {r['gate_s']:.2f} | {r['verify_s']:.1f} | {r['top1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
