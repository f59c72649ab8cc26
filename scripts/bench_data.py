#!/usr/bin/env python3
"""Benchmark the data stage: N rows of chat data -> tokenized, assistant-masked training rows.

    .venv/bin/python scripts/bench_data.py --rows 100000

Makes its own data (messages layout, 1-3 turns, varied lengths), runs the real data stage with the
embedded demo tokenizer (SmolLM2's chat template), and prints rows/s and peak memory as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the a service port river flag mayor spire codename blue teal copper north seven quiet".split()
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(4, 30))) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(4, 80))) + "."})
        rows.append({"messages": messages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    from ftdeploy.base_model import resolve_base_model
    from ftdeploy.config import DataConfig
    from ftdeploy.stages.data import prepare_data
    from ftdeploy.tokenizer import load_tokenizer

    tokenizer, mapping = load_tokenizer(resolve_base_model("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        stats = prepare_data(DataConfig(train=str(data)), tokenizer, mapping, Path(tmp) / "out", seed=0)
        seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "rows": stats.rows, "seconds": round(seconds, 1), "rows_per_s": round(stats.rows / seconds, 1),
        "tokens": stats.total_tokens, "trained_tokens": stats.trained_tokens,
        "peak_rss_mib": round(peak_mib, 1), "rss_before_mib": round(rss_before / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
