#!/usr/bin/env python3
"""Training throughput of ftdeploy's engines: Unsloth QLoRA against transformers + PEFT + bitsandbytes NF4.

    python scripts/bench_train.py --shapes llama-3.2-1b,llama-3.2-3b --batch 8 --seq-len 1024 \
        --out docs/benchmarks/gpu-train.json            # on a CUDA GPU (the lent H100/H200)
    python scripts/bench_train.py --shapes tiny --engines hf --kinds fixed --batch 2 --seq-len 32 \
        --steps 2 --warmup 1                            # CPU smoke check of the same code path
    python scripts/bench_train.py --dry-run             # anywhere: the plan and the arithmetic

ftdeploy must be importable (installed, or PYTHONPATH=. from the repository root).
Each measurement trains with the trainer `ftdeploy train` builds (ftdeploy.stages.train.build_trainer:
the engine's model loading and LoRA, the SFTTrainer arguments, the collator, the optimizer) from an
ftdeploy config: the defaults, then `--config FILE` and `--set KEY=VALUE`, then the benchmark's own
engine, steps and batch shape. So the figures describe the product, and a change to the product's
training code shows up here.

Models are built from a config with random weights (no download is possible on the device): the
shapes of Llama-3.2-1B and -3B. For each shape and engine: `--warmup` untimed optimizer steps then
`--steps` timed ones, each engine in a process of its own (Unsloth patches transformers, PEFT and
TRL process-wide, which would change the hf baseline; and each engine's peak memory is its own).
Reported per run: non-pad tokens/s, peak GPU memory (torch.cuda.max_memory_allocated), and MFU =
tokens/s x 4N / the GPU's dense bf16 peak (4N: forward 2N + backward through activations 2N; the
frozen base needs no weight gradients). Besides fixed-length batches, a variable-length batch
(lengths spread over 64-2048 like chat data) is timed padded and packed, counting only real tokens.
On CPU, peak memory and MFU are null.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # For a smoke check of the whole path on CPU in seconds; its figures mean nothing.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
KINDS = ("fixed", "variable-padded", "variable-packed")


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
    peak_gib: float | None
    mfu: float | None
    real_tokens_per_step: int
    seconds_per_step: float
    trainable_params: int  # what the config's LoRA gave the engine
    optim: str


def _build_model_dir(shape_name: str, root: Path) -> Path:
    """Random weights in the shape, plus a stand-in tokenizer (the engines read its pad token and length;
    the benchmark's token ids are random)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = root / shape_name
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape_name], max_position_embeddings=4096, torch_dtype="bfloat16",
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(out)
    return out


def step_rows(batches: list[list[int]], packed: bool, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """One optimizer step's training rows, every token trained: padded, one row per length; packed, the rows of a
    bin end to end in one row with their lengths (`seq_lengths`, as the data stage writes data.packing true), which
    training keeps apart."""
    rng = random.Random(seed)
    rows: list[dict[str, list[int]]] = []
    for micro_batch in batches:
        ids = [[rng.randrange(4, vocab) for _ in range(n)] for n in micro_batch]
        if packed:
            joined = [t for row in ids for t in row]
            rows.append({"input_ids": joined, "labels": list(joined), "seq_lengths": list(micro_batch)})
        else:
            rows += [{"input_ids": row, "labels": list(row)} for row in ids]
    return rows


def bench_overrides(run: dict[str, Any], engine: str, steps: int, warmup: int) -> list[str]:
    """The settings a measurement fixes; everything else is the ftdeploy config as given."""
    packed = run["kind"] == "variable-packed"
    # One optimizer step covers every row of `batches`: padded, one micro-batch of all rows; packed,
    # one packed row per micro-batch, accumulated.
    batch, accumulation = (1, len(run["batches"])) if packed else (sum(len(b) for b in run["batches"]), 1)
    max_len = max(sum(b) if packed else max(b) for b in run["batches"])
    # variable-padded measures padding (data.packing false); the product's default, auto, would batch those rows
    # padding-free
    packing = {"variable-packed": ["data.packing=true"], "variable-padded": ["data.packing=false"]}.get(run["kind"], [])
    return [*packing, f"train.engine={engine}", f"train.max_steps={warmup + steps}", f"train.batch_size={batch}",
            f"train.gradient_accumulation={accumulation}", f"data.max_seq_length={max_len}", "train.save_steps=0",
            "train.nproc=1", "train.nnodes=1"]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine on one run, in this process: build the product's trainer, train, time the steps after warm-up."""
    from ftdeploy.config import load_config
    from ftdeploy.stages.train import build_trainer, import_engine_first

    cfg = load_config(spec["config"], spec["sets"])
    engine = import_engine_first(cfg)  # Unsloth before anything below imports transformers
    import torch
    from transformers import AutoTokenizer, TrainerCallback, set_seed

    on_cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    warmup = spec["warmup"]

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step == warmup:
                sync()
                self.started = time.perf_counter()
            elif state.global_step == state.max_steps:
                sync()
                self.ended = time.perf_counter()

    set_seed(cfg.train.seed)
    model_dir = spec["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = step_rows(spec["batches"], spec["kind"] == "variable-packed", spec["vocab"])
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as trainer_dir:
        trainer, kwargs = build_trainer(model_dir, rows, cfg, tokenizer, engine, trainer_dir, False, [timer])
        trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps = cfg.train.max_steps - warmup
    seconds = (timer.ended - timer.started) / steps
    real_tokens = sum(sum(b) for b in spec["batches"])
    tps = real_tokens / seconds
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None
    return asdict(Result(round(tps, 1), peak_gib,
                         round(mfu(tps, spec["params"], spec["peak"]), 4) if spec["peak"] else None,
                         real_tokens, round(seconds, 4), trainable, kwargs["optim"]))


def run_engine(engine: str, run: dict[str, Any], model_dir: Path, args: argparse.Namespace,
               peak: float | None) -> dict[str, Any]:
    """`measure` in a fresh Python process (see the module docstring for why)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({
            "config": str(args.config) if args.config else None,
            "sets": [*args.set, *bench_overrides(run, engine, args.steps, args.warmup)],
            "model_dir": str(model_dir), "batches": run["batches"], "kind": run["kind"], "warmup": args.warmup,
            "vocab": SHAPES[run["shape"]]["vocab_size"], "params": run["params"], "peak": peak,
            "result": str(result_path)}))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(spec_path)])
        if proc.returncode != 0:
            raise SystemExit(f"{run['shape']} {run['kind']} {engine}: the measurement failed (exit {proc.returncode})")
        return json.loads(result_path.read_text())


def plan(args: argparse.Namespace) -> list[dict]:
    runs = []
    for shape in args.shapes:
        n = param_count(SHAPES[shape])
        lengths = variable_lengths(args.batch, 64, 2048, seed=0)
        candidates = {
            "fixed": {"seq_len": args.seq_len, "batches": [[args.seq_len] * args.batch]},
            "variable-padded": {"seq_len": max(lengths), "batches": [lengths]},
            "variable-packed": {"seq_len": 2048, "batches": pack_lengths(lengths, 2048)},
        }
        for kind in args.kinds:
            runs.append({"shape": shape, "params": n, "batch": args.batch, "seq_len": candidates[kind]["seq_len"],
                         "kind": kind, "batches": candidates[kind]["batches"]})
    return runs


def _names(known: tuple[str, ...] | dict) -> Any:
    def parse(text: str) -> list[str]:
        names = [s for s in text.split(",") if s]
        unknown = [s for s in names if s not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
        return names

    return parse


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(spec["result"]).write_text(json.dumps(measure(spec)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.2-3b", type=_names(SHAPES))
    parser.add_argument("--engines", default="unsloth,hf", type=_names(("unsloth", "hf")))
    parser.add_argument("--kinds", default=",".join(KINDS), type=_names(KINDS),
                        help="Batches to time: fixed (batch x seq-len), variable-padded, variable-packed.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--config", type=Path, help="An ftdeploy config file (YAML) to train with.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="An ftdeploy config override, e.g. --set lora.r=32 (repeatable).")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/ftdeploy-bench-models"))
    parser.add_argument("--out", type=Path, help="Write the results JSON here (docs/benchmarks/gpu-train.json).")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan and parameter counts; no GPU needed.")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must each be at least 1 (timing starts after the last warm-up step)")

    runs = plan(args)
    if args.dry_run:
        print(json.dumps([{k: v for k, v in r.items()} for r in runs], indent=2))
        return 0

    import torch

    from ftdeploy import __version__
    from ftdeploy.config import load_config

    on_cuda = torch.cuda.is_available()
    if not on_cuda and "unsloth" in args.engines:
        parser.error("the unsloth engine needs a CUDA GPU; on CPU use --engines hf "
                     "(and --shapes tiny for a smoke check)")
    load_config(args.config, args.set)  # a bad config fails here, before any model is built
    if on_cuda:
        device = torch.cuda.get_device_name(0)
        peak_name, peak = peak_flops(device)
        peak_source = f"{peak_name} dense bf16 datasheet"
    else:
        device, peak, peak_source = "cpu", None, None
    report = {"device": device, "peak_bf16_flops": peak, "peak_source": peak_source,
              "command": " ".join(sys.argv), "ftdeploy": __version__,
              "config": {"file": str(args.config) if args.config else None, "set": args.set}, "runs": []}
    for run in runs:
        model_dir = _build_model_dir(run["shape"], args.models_dir)
        engines = {}
        for engine in args.engines:
            result = run_engine(engine, run, model_dir, args, peak)
            engines[engine] = result
            memory = f"{result['peak_gib']:>6.2f} GiB" if result["peak_gib"] is not None else "     - GiB"
            share = f"MFU {result['mfu']:.1%}" if result["mfu"] is not None else "MFU -"
            print(f"{run['shape']:<14} {run['kind']:<16} {engine:<8} {result['tokens_per_s']:>10.0f} tok/s "
                  f"{memory}  {share}", file=sys.stderr)
        report["runs"].append({k: v for k, v in run.items() if k != "batches"} | {"engines": engines})
        if args.out:  # after every run: a lease that ends mid-plan still keeps what was measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
