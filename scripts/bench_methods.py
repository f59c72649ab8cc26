#!/usr/bin/env python3
"""Seconds per optimizer step of each training method against SFT, on the same rows and the same base.

    python scripts/bench_methods.py --out docs/benchmarks/methods.json      # the embedded demo base, on this CPU
    python scripts/bench_methods.py --methods sft,dpo --steps 3             # a quicker look

ftdeploy must be importable (installed, or PYTHONPATH=. from the repository root).
Every method trains with what `ftdeploy train` builds (ftdeploy.stages.train.fit on data ftdeploy.data.prepare_data
wrote) from the demo config plus `--set` items, on the bundled preference pairs (ftdeploy/assets/demo/prefs.jsonl):
sft on each prompt with its chosen answer, dpo and orpo on the pairs, kto on the pairs split into a good and a bad
answer each, grpo on the sft chats' prompts (grpo.num_generations answers of up to grpo.max_completion_length tokens
each, scored by the bundled rewards). The batch is `--batch` rows (kto: answers; grpo: prompts x generations) and
one accumulation step. Each method runs in a process of its own; the first step (loading, compiling, caches) is
left out of the figure: seconds per step is the mean over steps 2..N from the loss history's timestamps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("sft", "dpo", "orpo", "kto", "grpo")


def _sft_rows(pairs: Path, out: Path) -> Path:
    """The pairs' prompts with their chosen answers, as SFT chats."""
    with open(pairs, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"messages": [*row["prompt"], *row["chosen"]]}) + "\n")
    return out


def _one(method: str, steps: int, batch: int, extra: list[str], workdir: Path) -> dict[str, Any]:
    """Train `method` for `steps` steps in this process; its timing."""
    from ftdeploy.assets import asset
    from ftdeploy.base_model import resolve_base_model
    from ftdeploy.config import demo_config_path, load_config
    from ftdeploy.data import prepare_data
    from ftdeploy.stages.train import fit
    from ftdeploy.tokenizer import load_tokenizer

    pairs = asset("demo", "prefs.jsonl")
    data = _sft_rows(pairs, workdir / "sft.jsonl") if method in ("sft", "grpo") else pairs
    overrides = [f"data.train={data}", f"train.method={method}", f"train.max_steps={steps}", "train.save_steps=0",
                 f"train.batch_size={batch}", "train.gradient_accumulation=1", "train.engine=hf",
                 "grpo.num_generations=4", "grpo.max_completion_length=32", *extra]
    cfg = load_config(demo_config_path(), overrides)
    base = resolve_base_model(cfg.base_model)
    tokenizer, mapping = load_tokenizer(base)
    stats = prepare_data(cfg.data, tokenizer, mapping, workdir / "data", cfg.train.seed, method)
    started = time.monotonic()
    metrics = fit(base, workdir / "data", workdir / "adapter", cfg, tokenizer)
    times = [p.elapsed_s for p in metrics.loss_history]
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"method": method, "steps": metrics.steps, "batch": batch, "rows": stats.rows,
            "seconds_per_step": round(per_step, 2) if per_step is not None else None,
            "seconds": round(time.monotonic() - started, 1), "final_loss": metrics.final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per method (the first is not timed)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (grpo: generations per step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method (repeatable)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON, with the command")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(_one(args.one, args.steps, args.batch, args.overrides, Path(tmp))))
        return
    rows = []
    for method in args.methods.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        cmd = [sys.executable, __file__, "--one", method, "--steps", str(args.steps), "--batch", str(args.batch),
               *(f"--set={o}" for o in args.overrides)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method:5} {rows[-1]['seconds_per_step']} s/step", file=sys.stderr)
    sft = next((r["seconds_per_step"] for r in rows if r["method"] == "sft"), None)
    for row in rows:
        row["vs_sft"] = round(row["seconds_per_step"] / sft, 2) if sft and row["seconds_per_step"] else None
    result = {"command": " ".join(["python", "scripts/bench_methods.py", *sys.argv[1:]]), "runs": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
