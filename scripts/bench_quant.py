#!/usr/bin/env python3
"""Quantization fidelity of a finished run: every llama.cpp type against the run's F16 GGUF.

    .venv/bin/python scripts/bench_quant.py runs/ftdeploy-demo --types q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k

Quantizes the run's F16 GGUF to each type (in a temporary folder), then measures top-1 token agreement
and the perplexity ratio against F16 on the run's eval chats (the measure behind verify.min_fidelity).
Prints a JSON list and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--types", default="q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k")
    args = parser.parse_args()

    from ftdeploy.config import load_config
    from ftdeploy.fidelity import token_fidelity
    from ftdeploy.pipeline import Context
    from ftdeploy.pipeline.artifacts import eval_texts
    from ftdeploy.runs import Run
    from ftdeploy.stages.export import quantize

    cfg = load_config(args.run_dir / "config.yaml")
    ctx = Context(cfg, Run(args.run_dir))
    f16 = Path(ctx.run.stage_record("export")["outputs"]["gguf"][cfg.export.outtype])
    texts, _ = eval_texts(ctx)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            out = quantize(f16, Path(tmp) / f"{qtype}.gguf", qtype)
            rows.append({"type": qtype, "mib": round(out.stat().st_size / 2**20, 1), **token_fidelity(f16, out, texts)})
    print(json.dumps(rows, indent=2))
    print("| type | size MiB | top-1 vs F16 | perplexity ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['mib']} | {r['top1_agreement']:.3f} | {r['ppl_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
