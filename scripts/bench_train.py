#!/usr/bin/env python3
"""Training throughput: Unsloth QLoRA against transformers + PEFT + bitsandbytes NF4, same everything.

    python scripts/bench_train.py --shapes llama-3.2-1b,llama-3.2-3b --batch 8 --seq-len 1024 \
        --out docs/benchmarks/gpu-train.json            # on a CUDA GPU (the lent H100/H200)
    python scripts/bench_train.py --dry-run             # anywhere: the plan and the arithmetic

Models are built from a config with random weights (no download is possible on the device): the
shapes of Llama-3.2-1B and -3B. For each shape and engine: QLoRA r=16 on the 7 projections, bf16,
gradient checkpointing, `--warmup` untimed steps then `--steps` timed ones. Reported per run:
non-pad tokens/s, peak GPU memory (torch.cuda.max_memory_allocated), and MFU =
tokens/s x 4N / the GPU's dense bf16 peak (4N: forward 2N + backward through activations 2N; the
frozen base needs no weight gradients). Besides fixed-length batches, a variable-length batch
(lengths spread over 64-2048 like chat data) is timed padded and packed, counting only real tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def param_count(shape: dict) -> int:
    """Parameters of a Llama-shaped decoder (embeddings counted once when tied)."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    attn = h * h + 2 * h * kv + h * h
    mlp = 3 * h * i
    norms = 2 * h
    emb = shape["vocab_size"] * h
    return n * (attn + mlp + norms) + h + emb * (1 if shape.get("tie_word_embeddings") else 2)


def peak_flops(device_name: str) -> tuple[str, float]:
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return key, value
    raise SystemExit(f"no dense bf16 peak known for {device_name!r}; add it to PEAK_BF16")


def mfu(tokens_per_s: float, n_params: int, peak: float) -> float:
    return tokens_per_s * 4 * n_params / peak


def variable_lengths(batch: int, lo: int = 64, hi: int = 2048, seed: int = 0) -> list[int]:
    """Chat-like lengths: log-uniform between lo and hi (many short, a few long)."""
    import math

    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(batch)]


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of at most `capacity` tokens."""
    bins: list[list[int]] = []
    for n in sorted(lengths, reverse=True):
        for b in bins:
            if sum(b) + n <= capacity:
                b.append(n)
                break
        else:
            bins.append([n])
    return bins


@dataclass
class Result:
    tokens_per_s: float
    peak_gib: float
    mfu: float
    real_tokens_per_step: int
    seconds_per_step: float


def _build_model_dir(shape_name: str, root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / shape_name
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape_name], max_position_embeddings=4096, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _load(engine: str, model_dir: Path, max_len: int):
    import torch

    if engine == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=max_len, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                random_state=3407)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def run_engine(engine: str, model_dir: Path, batches: list[list[int]], packed: bool, steps: int, warmup: int,
               n_params: int, peak: float, vocab: int) -> Result:
    """Time `steps` optimizer steps; one step is a forward/backward over every micro-batch in `batches`
    (padded: one row per length; packed: the lengths of a bin concatenated into one row)."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = _load(engine, model_dir, max(sum(b) if packed else max(b) for b in batches))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    real_tokens = sum(sum(b) for b in batches)

    def micro_batch(seqs: list[int]) -> tuple:
        rows = [sum(seqs)] if packed else seqs
        ids = torch.randint(0, vocab, (len(rows), max(rows)), device="cuda", generator=gen)
        mask = torch.zeros_like(ids)
        for r, n in enumerate(rows):
            mask[r, :n] = 1
        return ids, mask, ids.masked_fill(mask == 0, -100)

    def step() -> None:
        for seqs in batches:
            ids, mask, labels = micro_batch(seqs)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    tps = real_tokens / seconds
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return Result(round(tps, 1), round(peak_gib, 2), round(mfu(tps, n_params, peak), 4), real_tokens, round(seconds, 4))


def plan(args: argparse.Namespace) -> list[dict]:
    runs = []
    for shape in args.shapes:
        n = param_count(SHAPES[shape])
        runs.append({"shape": shape, "params": n, "batch": args.batch, "seq_len": args.seq_len, "kind": "fixed",
                     "batches": [[args.seq_len] * args.batch]})
        lengths = variable_lengths(args.batch, 64, 2048, seed=0)
        runs.append({"shape": shape, "params": n, "batch": args.batch, "seq_len": max(lengths), "kind": "variable-padded",
                     "batches": [lengths]})
        runs.append({"shape": shape, "params": n, "batch": args.batch, "seq_len": 2048, "kind": "variable-packed",
                     "batches": pack_lengths(lengths, 2048)})
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.2-3b", type=lambda s: s.split(","))
    parser.add_argument("--engines", default="unsloth,hf", type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/ftdeploy-bench-models"))
    parser.add_argument("--out", type=Path, help="Write the results JSON here (docs/benchmarks/gpu-train.json).")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan and parameter counts; no GPU needed.")
    args = parser.parse_args()
    for shape in args.shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")

    runs = plan(args)
    if args.dry_run:
        print(json.dumps([{k: v for k, v in r.items()} for r in runs], indent=2))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench_train.py needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    peak_name, peak = peak_flops(device)
    report = {"device": device, "peak_bf16_flops": peak, "peak_source": f"{peak_name} dense bf16 datasheet",
              "command": " ".join(sys.argv), "runs": []}
    for run in runs:
        model_dir = _build_model_dir(run["shape"], args.models_dir)
        engines = {}
        for engine in args.engines:
            result = run_engine(engine, model_dir, run["batches"], run["kind"] == "variable-packed", args.steps,
                                args.warmup, run["params"], peak, SHAPES[run["shape"]]["vocab_size"])
            engines[engine] = asdict(result)
            print(f"{run['shape']:<14} {run['kind']:<16} {engine:<8} {result.tokens_per_s:>10.0f} tok/s "
                  f"{result.peak_gib:>6.2f} GiB  MFU {result.mfu:.1%}", file=sys.stderr)
        report["runs"].append({k: v for k, v in run.items() if k != "batches"} | {"engines": engines})
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
