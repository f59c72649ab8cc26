"""Train stage: LoRA/QLoRA on the tokenized data, adapter saved to the run directory.

Engines: `unsloth` (FastLanguageModel, NF4, chosen automatically on CUDA when installed) and
`hf` (transformers + PEFT + TRL; bitsandbytes NF4 QLoRA on CUDA, fp32 LoRA on CPU). Both feed
the same TRL SFTTrainer with the same collator, so data handling and progress are shared.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..data import IGNORE_INDEX, load_tokenized
from ..errors import ConfigError, DataError
from ..results import LossPoint, TrainMetrics
from ..runs import atomic_path
from ..strategy import strategy_args, world_size

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def select_engine(requested: str, has_cuda: bool | None = None, has_unsloth: bool | None = None) -> str:
    """auto -> unsloth on CUDA with unsloth installed, else hf. Asking for unsloth without them is an error."""
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    has_unsloth = (importlib.util.find_spec("unsloth") is not None) if has_unsloth is None else has_unsloth
    if requested == "auto":
        return "unsloth" if has_cuda and has_unsloth else "hf"
    if requested == "unsloth":
        if not has_cuda:
            raise ConfigError(
                "--engine unsloth needs a CUDA GPU and none is visible; use --engine hf (or auto) on this machine")
        if not has_unsloth:
            raise ConfigError(
                "--engine unsloth: unsloth is not installed; pip install 'ftdeploy[gpu]' (or use --engine hf)")
    return requested


def import_engine_first(cfg: Config) -> str:
    """Select the engine and, when it is Unsloth, import it now; return the engine.

    The engine-first rule: a process that will train imports Unsloth before anything imports transformers, PEFT
    or TRL. Unsloth patches them as it is imported, and code imported before it keeps the unpatched paths (it
    warns, and trains at about the hf engine's speed). Resolving the base model and loading the tokenizer import
    transformers, so each entry point of a training process calls this before either:
      the pipeline, when train is among the stages it runs: train_and_serve before its first stage (the data
        stage loads the tokenizer), and the train stage's checks (`ftdeploy train` starts there);
      distributed.worker_main, in each process torchrun starts;
      scripts/bench_train.py.
    fit and build_trainer come after the tokenizer and only read the engine (select_engine).
    tests/integration/test_engine_import_order.py runs each of the three commands and checks the order."""
    engine = select_engine(cfg.train.engine)
    if engine == "unsloth":
        _quiet_unsloth_import()
    return engine


def _quiet_unsloth_import() -> None:
    """Import Unsloth with its banner on stderr (stdout carries results, --json among them) and without
    the import-time notices of its dependencies that tell a user nothing (torch's pytree enum deprecation,
    bitsandbytes' optional `kernels` package); -vv shows them again."""
    import contextlib
    import logging
    import sys

    if not logging.getLogger("ftdeploy").isEnabledFor(logging.DEBUG):
        for name in ("torch.utils._pytree", "bitsandbytes"):
            logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        import unsloth  # noqa: F401  # pyflakes: ignore


class PadCollator:
    """Pad input_ids with the pad token and labels with -100; refuse a batch that trains on nothing."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = int(math.ceil(longest / self.multiple) * self.multiple)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        if not bool((labels != IGNORE_INDEX).any()):
            raise DataError(
                "a training batch has every label masked (nothing to learn); check train_on and the chat template")
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def make_progress_callback(history: list[LossPoint]) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """step, loss and time left on stderr; the loss history kept for the manifest and the plot."""

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.start = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            step, total = state.global_step, state.max_steps
            elapsed = time.monotonic() - self.start
            left = elapsed / max(step, 1) * (total - step)
            history.append(LossPoint(step=step, loss=float(logs["loss"]), lr=float(logs.get("learning_rate", 0.0)),
                                     elapsed_s=round(elapsed, 2)))
            print(f"  step {step:>4}/{total}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  "
                  f"elapsed {_fmt_seconds(elapsed)}  left {_fmt_seconds(left)}", file=sys.stderr, flush=True)

    return Progress()


def _load_hf(base: Path | str, cfg: Config, tokenizer: Any, on_cuda: bool) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if on_cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["dtype"] = dtype
        if cfg.train.strategy == "ddp":  # FSDP and DeepSpeed place (and shard) the weights themselves
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        if cfg.train.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                # FSDP shards the 4-bit weights only when they are stored in the compute dtype.
                **({"bnb_4bit_quant_storage": dtype} if cfg.train.strategy != "ddp" else {}),
            )
        elif cfg.train.load_in_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    else:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if on_cuda and (cfg.train.load_in_4bit or cfg.train.load_in_8bit):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _load_unsloth(base: Path | str, cfg: Config, tokenizer: Any) -> Any:
    from unsloth import FastLanguageModel  # noqa: I001  (unsloth must be imported before transformers/peft)

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(base), max_seq_length=cfg.data.max_seq_length, dtype=None,
        load_in_4bit=cfg.train.load_in_4bit, load_in_8bit=cfg.train.load_in_8bit,
        trust_remote_code=cfg.trust_remote_code,
        # Under DDP each process holds its own copy on its own GPU.
        device_map={"": int(os.environ.get("LOCAL_RANK", "0"))},
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, target_modules=cfg.lora.target_modules, lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias,
        use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False,
        random_state=cfg.train.seed,
    )


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and readable; a damaged one is skipped with a warning."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted((p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in candidates:
        reason = _checkpoint_problem(ckpt)
        if reason is None:
            return ckpt
        log.warning("checkpoint %s is unusable (%s); trying an older one", ckpt, reason)
    return None


def _checkpoint_problem(ckpt: Path) -> str | None:
    state = ckpt / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json: {type(exc).__name__}"
    weights = ckpt / "adapter_model.safetensors"
    if not weights.is_file():
        return "no adapter_model.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means damaged
        return f"adapter weights: {type(exc).__name__}"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (ckpt / name).is_file():
            return f"no {name}"
    return None


def trainer_kwargs(cfg: Config, engine: str, on_cuda: bool, bf16: bool, output_dir: str, save: bool) -> dict[str, Any]:
    """Everything SFTConfig is given, as plain values (tested without building a Trainer)."""
    from ..config import split_global_batch

    world = world_size(cfg)
    batch, accumulation = split_global_batch(cfg.train.batch_size, cfg.train.gradient_accumulation, world,
                                             cfg.train.keep_global_batch)
    optim = cfg.train.optim if cfg.train.optim != "auto" else ("adamw_8bit" if on_cuda else "adamw_torch")
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=cfg.train.max_steps if cfg.train.max_steps > 0 else -1,
        num_train_epochs=cfg.train.epochs,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.train.learning_rate,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        lr_scheduler_type=cfg.train.lr_scheduler,
        optim=optim,
        seed=cfg.train.seed,
        logging_steps=cfg.train.logging_steps,
        save_strategy="steps" if save and cfg.train.save_steps > 0 else "no",
        save_steps=cfg.train.save_steps if cfg.train.save_steps > 0 else 500,
        save_total_limit=2,
        report_to=[],
        bf16=bf16,
        fp16=on_cuda and not bf16,
        max_length=cfg.data.max_seq_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        packing=False,
        disable_tqdm=True,
        use_cpu=not on_cuda,
    )
    # Non-reentrant checkpointing: the same gradients, and it works under DDP with frozen base weights.
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name warns);
    # the Unsloth set pins 5.17, which has only the old one.
    name = "activation_checkpointing" if _has_training_arg("activation_checkpointing") else "gradient_checkpointing"
    kwargs[name] = cfg.train.gradient_checkpointing and engine == "hf"
    kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    kwargs.update(strategy_args(cfg, on_cuda))
    return kwargs


def _has_training_arg(name: str) -> bool:
    import dataclasses

    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


def build_trainer(base: Path | str, rows: list[dict[str, list[int]]], cfg: Config, tokenizer: Any, engine: str,
                  output_dir: str, save_checkpoints: bool, callbacks: Sequence[Any] = ()) -> tuple[Any, dict[str, Any]]:
    """The model, its LoRA and the SFTTrainer as `ftdeploy train` builds them; return (trainer, SFTConfig kwargs).

    scripts/bench_train.py times this same trainer, so its figures describe the product.
    The process's entry point has imported the engine (import_engine_first)."""
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    on_cuda = torch.cuda.is_available()
    model = _load_unsloth(base, cfg, tokenizer) if engine == "unsloth" else _load_hf(base, cfg, tokenizer, on_cuda)
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    kwargs = trainer_kwargs(cfg, engine, on_cuda, bf16, output_dir, save_checkpoints)
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**kwargs), train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        data_collator=PadCollator(tokenizer.pad_token_id), callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; progress goes to stderr
    return trainer, kwargs


def save_adapter(trainer: Any, out_dir: Path) -> None:
    """Write the adapter (and tokenizer) to `out_dir`; every process of a launched group must call this.

    Under ZeRO-3 and FSDP each process holds only a shard of every weight, so rank 0 calling
    model.save_pretrained writes empty or partial tensors (huggingface/peft#2892, huggingface/trl#4416).
    trainer.save_model gathers the full adapter collectively, which is why no rank may skip it, and
    writes it from the main process only."""
    trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        # A pickle of the training arguments: the checkpoints keep it for resuming; the adapter is shipped.
        (out_dir / "training_args.bin").unlink(missing_ok=True)


def fit(base: Path | str, data_dir: Path, out_dir: Path, cfg: Config, tokenizer: Any,
        checkpoint_dir: Path | None = None, resume: bool = True) -> TrainMetrics:
    """The training loop of one process (the only one, or one of a launched group); every process joins the
    save, rank 0 writes `out_dir`. The process's entry point has imported the engine (import_engine_first)."""
    engine = select_engine(cfg.train.engine)
    import torch
    from transformers import set_seed

    set_seed(cfg.train.seed)
    on_cuda = torch.cuda.is_available()
    rows = load_tokenized(data_dir)
    world = world_size(cfg)
    log.info("training with engine=%s on %s x %d: %d examples, %d steps", engine, "cuda" if on_cuda else "cpu",
             world, len(rows), cfg.train.max_steps)

    history: list[LossPoint] = []
    trainer, kwargs = build_trainer(base, rows, cfg, tokenizer, engine,
                                    str(checkpoint_dir or out_dir.parent / f".{out_dir.name}-trainer"),
                                    checkpoint_dir is not None, [make_progress_callback(history)])
    resume_from = latest_checkpoint(checkpoint_dir) if checkpoint_dir and resume else None
    if resume_from is not None:
        log.info("resuming training from %s", resume_from)
        history.extend(_history_from(resume_from))
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.monotonic() - started
    save_adapter(trainer, out_dir)
    if trainer.is_world_process_zero():
        (out_dir / "ftdeploy-train.json").write_text(json.dumps({"base_model": str(base), "engine": engine,
                                                                  "world_size": world}, indent=2))
    trained_tokens = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    steps = result.global_step
    global_batch = kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] * world
    return TrainMetrics(
        engine=engine, device="cuda" if on_cuda else "cpu", steps=steps,
        train_loss=round(float(result.training_loss), 4),
        final_loss=history[-1].loss if history else None,
        seconds=round(seconds, 1), loss_history=history, optim=kwargs["optim"],
        world_size=world, strategy=cfg.train.strategy if world > 1 else None,
        per_device_batch=kwargs["per_device_train_batch_size"],
        gradient_accumulation=kwargs["gradient_accumulation_steps"],
        global_batch=global_batch, examples_per_s=round(steps * global_batch / max(seconds, 1e-9), 2),
        dataset_trained_tokens=trained_tokens, resumed_from=str(resume_from) if resume_from else None,
    )


def _history_from(ckpt: Path) -> list[LossPoint]:
    """The loss history logged before a checkpoint, so a resumed run reports the whole curve."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return [LossPoint(step=e["step"], loss=float(e["loss"]), lr=float(e.get("learning_rate", 0.0)), elapsed_s=0.0)
            for e in state.get("log_history", []) if "loss" in e]


def plot_loss(history: list[LossPoint], path: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([h.step for h in history], [h.loss for h in history], marker="o", markersize=2.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
