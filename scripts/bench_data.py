#!/usr/bin/env python3
"""Benchmark the data stage: N rows of chat data -> tokenized, assistant-masked training rows, beside TRL's own
preparation of the same rows with the same tokenizer.

    nice -n 5 .venv/bin/python scripts/bench_data.py --rows 100000
    nice -n 5 .venv/bin/python scripts/bench_data.py --rows 1000000 --no-trl   # memory flat in the rows

Makes its own data (messages layout, 1-3 turns, varied lengths; written row by row, so the data itself takes no
memory), runs the real data stage (`prepare_data`) with the embedded demo tokenizer (SmolLM2's ChatML template),
then, in the same process and on the same file, TRL's SFTTrainer dataset preparation: `load_dataset("json")` plus
`SFTTrainer._prepare_dataset` as SFTTrainer's constructor runs it, timed around that call, with assistant-only loss
(`assistant_only_loss=True`) and `dataset_num_proc` processes. SmolLM2's template has no `{% generation %}`
markers, which TRL's assistant masks need, and TRL has no training template for it, so TRL gets SmolLM2's template
with the markers added around each assistant turn's content and end-of-turn (it renders the same text; checked
here). Prints one table and the figures as JSON: seconds, rows/s, tokens, peak RSS of the data stage (taken
before TRL runs) and the ratio; and how many rows TRL labels exactly as the data stage does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORDS = "the a service port river flag mayor spire codename blue teal copper north seven quiet".split()

# SmolLM2-135M-Instruct's chat template with TRL's {% generation %} markers around what the data stage trains on in
# an assistant turn (the content and its end-of-turn); everything else is SmolLM2's template as shipped.
SMOLLM2_WITH_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def iter_rows(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 30))) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 80))) + "."})
        yield {"messages": messages}


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    return list(iter_rows(n, seed))


def write_rows(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in iter_rows(n):
            fh.write(json.dumps(row) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(data: Path, tokenizer: Any, num_proc: int, workdir: Path) -> dict[str, Any]:
    """TRL's preparation of the same file: load_dataset, then SFTTrainer._prepare_dataset as the constructor runs it."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    original = tok.chat_template
    tok.chat_template = SMOLLM2_WITH_GENERATION
    probe = next(iter_rows(1, seed=1))["messages"]
    assert tok.apply_chat_template(probe, tokenize=False) == tok.apply_chat_template(
        probe, tokenize=False, chat_template=original), "the marked template must render as SmolLM2's"

    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(workdir / "hf"))
    loaded = time.perf_counter() - started

    timing: dict[str, float] = {}
    prepare = SFTTrainer._prepare_dataset

    def timed_prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return prepare(self, *args, **kwargs)
        finally:
            timing["prepare"] = timing.get("prepare", 0.0) + time.perf_counter() - began

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(workdir / "trl"), assistant_only_loss=True, max_length=2048,
                     dataset_num_proc=num_proc, report_to=[], bf16=False, use_cpu=True)
    SFTTrainer._prepare_dataset = timed_prepare  # type: ignore[method-assign]
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    finally:
        SFTTrainer._prepare_dataset = prepare  # type: ignore[method-assign]
    prepared = trainer.train_dataset
    return {"load_s": loaded, "prepare_s": timing["prepare"], "seconds": loaded + timing["prepare"],
            "rows": len(prepared), "dataset": prepared}


def agreement(ours: Path, theirs: Any) -> tuple[int, int]:
    """Rows whose ids and labels TRL and the data stage agree on (both keep every row, in order)."""
    same = total = 0
    with open(ours, encoding="utf-8") as fh:
        for line, row in zip(fh, theirs.select_columns(["input_ids", "labels"]), strict=False):
            mine = json.loads(line)
            total += 1
            same += mine["input_ids"] == row["input_ids"] and mine["labels"] == row["labels"]
    return same, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="time the data stage alone")
    parser.add_argument("--trl-num-proc", type=int, default=os.cpu_count() or 1,
                        help="TRL's dataset_num_proc (default: one process per core)")
    args = parser.parse_args()

    from ftdeploy.base_model import resolve_base_model
    from ftdeploy.config import DataConfig
    from ftdeploy.data import prepare_data
    from ftdeploy.tokenizer import load_tokenizer

    tokenizer, mapping = load_tokenizer(resolve_base_model("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        write_rows(data, args.rows)
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        cpu_started = time.process_time()
        stats = prepare_data(DataConfig(train=str(data)), tokenizer, mapping, Path(tmp) / "out", seed=0)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        peak = peak_rss_mib()
        load = os.getloadavg()
        result: dict[str, Any] = {
            "rows": stats.rows, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "rows_per_s": round(stats.rows / seconds, 1), "tokens": stats.total_tokens,
            "trained_tokens": stats.trained_tokens, "peak_rss_mib": round(peak, 1),
            "rss_before_mib": round(rss_before, 1), "load_average": [round(x, 2) for x in load],
        }
        table = [("ftdeploy data stage", seconds, stats.rows)]
        if args.trl:
            trl = run_trl(data, tokenizer, args.trl_num_proc, Path(tmp))
            same, total = agreement(Path(tmp) / "out" / "train.jsonl", trl.pop("dataset"))
            result["trl"] = {"seconds": round(trl["seconds"], 1), "load_s": round(trl["load_s"], 1),
                             "prepare_s": round(trl["prepare_s"], 1), "rows": trl["rows"],
                             "num_proc": args.trl_num_proc, "rows_labelled_as_ours": f"{same} of {total}"}
            result["trl_over_ours"] = round(trl["seconds"] / seconds, 2)
            table.append((f"TRL {__import__('trl').__version__} SFTTrainer (assistant_only_loss, "
                          f"num_proc={args.trl_num_proc})", trl["seconds"], trl["rows"]))
    width = max(len(name) for name, _, _ in table)
    print(f"{'':{width}}  {'seconds':>8}  {'rows/s':>8}")
    for name, secs, rows in table:
        print(f"{name:{width}}  {secs:8.1f}  {rows / secs:8.0f}")
    if args.trl:
        print(f"TRL / ftdeploy: {result['trl_over_ours']}x")
    print(f"load average during the run: {result['load_average']}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
