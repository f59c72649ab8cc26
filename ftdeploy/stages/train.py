"""Train stage: LoRA/QLoRA on the tokenized data, adapter saved to the run directory.

Engines: `unsloth` (FastLanguageModel, NF4, chosen automatically on CUDA when installed) and
`hf` (transformers + PEFT + TRL; bitsandbytes NF4 QLoRA on CUDA, fp32 LoRA on CPU). Both feed
the same TRL SFTTrainer with the same collator, so data handling and progress are shared.

Methods (train.method): sft, the SFTTrainer above; dpo and kto, TRL's DPOTrainer and KTOTrainer on the same PEFT
model (the same LoRA, the same engine loaders, the same training arguments), on the data stage's pretokenized
preference rows as they are; orpo, TRL's ORPOTrainer (trl.experimental) the same way, on dpo's rows; grpo, TRL's
GRPOTrainer on the same PEFT model, on the data stage's prompts, with the grpo section's reward functions
(train_grpo.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..data import IGNORE_INDEX, load_grpo_rows, load_preference_rows, load_tokenized
from ..errors import ConfigError, DataError
from ..results import LossPoint, PreferencePoint, RewardPoint, TrainMetrics
from ..runs import atomic_path
from ..strategy import strategy_args, world_size
from ..trackers import NONE, make_tracker_callback, report_to_arg
from ..train_auto import OFF, OFFLOADED, PADDED, Plan, base_batch
from .train_batches import Setup, attention_name, planner, sft_batches, unmeasured_plan
from .train_grpo import check_grpo, grpo_kwargs, grpo_trainer, plot_rewards, reward_history_from, reward_point

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


# PreferencePoint field -> the key TRL's DPOTrainer, KTOTrainer and ORPOTrainer log it under (KTO logs no accuracy;
# DPO and ORPO no kl; only ORPO the last two. ORPO's log_odds_chosen is the log odds ratio; what it logs as
# log_odds_ratio is that ratio's log-sigmoid, the odds-ratio term before beta).
PREFERENCE_LOG_KEYS = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
                       "margin": "rewards/margins", "accuracy": "rewards/accuracies", "kl": "kl",
                       "log_odds_ratio": "log_odds_chosen", "nll_loss": "nll_loss"}


def preference_point(step: int, logs: dict[str, Any]) -> PreferencePoint | None:
    """The preference figures of one log entry (None: an SFT entry, which has none)."""
    found = {name: float(logs[key]) for name, key in PREFERENCE_LOG_KEYS.items() if key in logs}
    return PreferencePoint(step=step, **found) if found else None


def make_progress_callback(history: list[LossPoint], preference: list[PreferencePoint] | None = None,
                           rewards: list[RewardPoint] | None = None) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """step, loss and time left on stderr; the loss history (and a preference run's rewards, a GRPO run's mean
        reward) kept for the manifest and the plot."""

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
            point = preference_point(step, logs) if preference is not None else None
            if point is not None and preference is not None:
                preference.append(point)
            shown = "".join(f"  {label} {value:.3f}" for label, value in (
                ("margin", point.margin), ("acc", point.accuracy)) if value is not None) if point else ""
            if rewards is not None and (grpo := reward_point(step, logs)) is not None:
                rewards.append(grpo)
                shown += f"  reward {grpo.reward:.3f}" if grpo.reward is not None else ""
            print(f"  step {step:>4}/{total}  loss {logs['loss']:.4f}{shown}  lr {logs.get('learning_rate', 0):.2e}  "
                  f"elapsed {_fmt_seconds(elapsed)}  left {_fmt_seconds(left)}", file=sys.stderr, flush=True)

    return Progress()


def _load_hf(base: Path | str, cfg: Config, tokenizer: Any, on_cuda: bool,
             plan_for: Callable[[Any], Plan]) -> tuple[Any, Plan]:
    """The base model with its LoRA, and the plan (plan_for: batch and checkpointing) made once it has loaded."""
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
    plan = plan_for(model)
    if on_cuda and (cfg.train.load_in_4bit or cfg.train.load_in_8bit):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.checkpointing != OFF)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), plan


def _load_unsloth(base: Path | str, cfg: Config, tokenizer: Any, plan_for: Callable[[Any], Plan]) -> tuple[Any, Plan]:
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
    plan = plan_for(model)
    return FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, target_modules=cfg.lora.target_modules, lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias,
        use_gradient_checkpointing={OFF: False, OFFLOADED: "unsloth"}.get(plan.checkpointing, True),
        random_state=cfg.train.seed,
    ), plan


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


def finished_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint when a training ended there (its global_step at its max_steps: the trainer saves the last
    step); None otherwise. Resuming it would train past the end, as transformers takes a step before it checks, so a
    training asked for again (--force, --from, `ftdeploy train`) starts over instead."""
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is None:
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    steps, last = state.get("global_step"), state.get("max_steps")
    return ckpt if isinstance(steps, int) and isinstance(last, int) and 0 < last <= steps else None


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


def trainer_kwargs(cfg: Config, engine: str, on_cuda: bool, bf16: bool, output_dir: str, save: bool,
                   plan: Plan | None = None) -> dict[str, Any]:
    """Everything SFTConfig is given, as plain values (tested without building a Trainer). `plan`: the batch and
    checkpointing planned for the loaded model (train_batches.planner); None: those of the config as it is."""
    plan = plan or unmeasured_plan(cfg, engine, on_cuda)
    batch, accumulation = plan.batch, plan.accumulation
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
        report_to=report_to_arg(cfg.train.report_to),
        run_name=cfg.name,  # the tracker's run (wandb, mlflow) is named after the ftdeploy run
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
    kwargs[name] = plan.checkpointing != OFF and engine == "hf"  # Unsloth's is set on its model (_load_unsloth)
    kwargs[f"{name}_kwargs"] = {"use_reentrant": False}
    kwargs.update(strategy_args(cfg, on_cuda))
    return kwargs


def _has_training_arg(name: str) -> bool:
    import dataclasses

    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


def build_trainer(base: Path | str, rows: list[dict[str, Any]], cfg: Config, tokenizer: Any, engine: str,
                  output_dir: str, save_checkpoints: bool, callbacks: Sequence[Any] = ()) -> tuple[Any, dict[str, Any]]:
    """The model, its LoRA and the trainer of train.method (SFT, DPO, ORPO or KTO: TRL's) as `ftdeploy train`
    builds them; return (trainer, its config's kwargs). The trainer's `ftdeploy_setup` (train_batches.Setup) says
    how the batch, checkpointing and packing were settled, for the manifest.

    scripts/bench_train.py times this same trainer, so its figures describe the product.
    The process's entry point has imported the engine (import_engine_first)."""
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    on_cuda = torch.cuda.is_available()
    plan_for = planner(cfg, engine, on_cuda, rows)
    model, plan = (_load_unsloth(base, cfg, tokenizer, plan_for) if engine == "unsloth"
                   else _load_hf(base, cfg, tokenizer, on_cuda, plan_for))
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    kwargs = trainer_kwargs(cfg, engine, on_cuda, bf16, output_dir, save_checkpoints, plan)
    packing = PADDED
    if cfg.train.method == "sft":
        from trl import SFTConfig, SFTTrainer

        batches = sft_batches(model, rows, cfg.data.packing, PadCollator(tokenizer.pad_token_id), engine)
        packing = batches.packing
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**kwargs), train_dataset=Dataset.from_list(batches.rows),
            processing_class=tokenizer, data_collator=batches.collator, callbacks=list(callbacks),
        )
    elif cfg.train.method == "grpo":
        kwargs = grpo_kwargs(cfg, kwargs)
        trainer = grpo_trainer(model, rows, cfg, tokenizer, kwargs, callbacks)
    else:
        kwargs = preference_kwargs(cfg, kwargs)
        trainer = _preference_trainer(cfg.train.method, model, rows, tokenizer, kwargs, callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; progress goes to stderr
    trainer.ftdeploy_setup = Setup(plan, packing, attention_name(model))
    return trainer, kwargs


# trainer_kwargs' SFTConfig arguments that DPOConfig, ORPOConfig and KTOConfig do not have.
_SFT_ONLY_ARGS = ("dataset_kwargs", "packing")


def preference_kwargs(cfg: Config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """DPOConfig's, ORPOConfig's or KTOConfig's kwargs: the training arguments SFT is given (trainer_kwargs: steps,
    batch, lr, schedule, optimizer, precision, checkpoints, max_length = data.max_seq_length, ...) with the
    preference section's settings for the method."""
    out = {k: v for k, v in kwargs.items() if k not in _SFT_ONLY_ARGS}
    pref = cfg.preference
    if cfg.train.method == "dpo":
        out.update(beta=pref.beta, loss_type=[pref.loss_type], label_smoothing=pref.label_smoothing)
    elif cfg.train.method == "orpo":
        out.update(beta=pref.beta)  # ORPO's lambda: the odds-ratio term's weight beside the SFT loss
    else:
        out.update(beta=pref.beta, desirable_weight=pref.desirable_weight, undesirable_weight=pref.undesirable_weight)
    return out


def _keep_pretokenized(self: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    """The preference trainers' _prepare_dataset, replaced: TRL's would extract the prompt from text, append EOS
    and tokenize again, where the data stage has tokenized the rows with the chat template (each completion ends
    with the end-of-turn token, which is not EOS in every template) and truncated them to data.max_seq_length."""
    return dataset


def _preference_trainer(method: str, model: Any, rows: list[dict[str, Any]], tokenizer: Any, kwargs: dict[str, Any],
                        callbacks: Sequence[Any]) -> Any:
    """TRL's DPOTrainer or KTOTrainer on the pretokenized rows, whose columns are what TRL's collators read
    (DataCollatorForPreference: prompt_ids, chosen_ids, rejected_ids; DataCollatorForUnpairedPreference:
    prompt_ids, completion_ids, label and KTO's KL_completion_ids).

    trl is imported here, after the engine: under Unsloth, trl.DPOTrainer and trl.KTOTrainer are the classes Unsloth
    patched as it was imported, and the subclass made here keeps their patches. orpo: _orpo_trainer."""
    if method == "orpo":
        return _orpo_trainer(model, rows, tokenizer, kwargs, callbacks)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    parent, config_class = (DPOTrainer, DPOConfig) if method == "dpo" else (KTOTrainer, KTOConfig)
    trainer_class = type(f"Pretokenized{parent.__name__}", (parent,), {"_prepare_dataset": _keep_pretokenized})
    if method == "kto":
        rows = with_kl_completions(rows, kwargs["per_device_train_batch_size"])
    # No reference model is passed: the model is a PEFT model, and TRL computes the reference log-probabilities with
    # the adapter disabled, i.e. with the base model, without a second copy of it in memory.
    return trainer_class(model=model, ref_model=None, args=config_class(**kwargs),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=list(callbacks))


def with_kl_completions(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """KTO's KL estimate scores each prompt with another row's completion: as TRL's KTOTrainer._prepare_dataset does,
    the completions are rotated by one within each run of `batch` rows (the per-device batch: KTOTrainer samples in
    order, so these runs are its batches)."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        shifted = [chunk[-1]["completion_ids"]] + [r["completion_ids"] for r in chunk[:-1]]
        out += [{**r, "KL_completion_ids": kl} for r, kl in zip(chunk, shifted, strict=True)]
    return out


def orpo_features(row: dict[str, Any]) -> dict[str, list[int]]:
    """A pair row (prompt_ids, chosen_ids, rejected_ids) as the columns TRL's ORPOTrainer.tokenize_row makes and its
    collator reads: each answer's sequence is the prompt then the answer, labelled -100 on the prompt. Nothing is
    added: TRL's tokenize_row would put BOS before the prompt and EOS after each answer, where the ids already hold
    what the chat template writes (its BOS, if it writes one; each answer ending with the end-of-turn token)."""
    prompt = row["prompt_ids"]
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for name in ("chosen", "rejected"):
        answer = row[f"{name}_ids"]
        out[f"{name}_input_ids"] = prompt + answer
        out[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return out


def _keep_row(_feature: dict[str, Any], *_args: Any, **_kwargs: Any) -> dict[str, Any]:
    """ORPOTrainer.tokenize_row, replaced: the row is orpo_features' already (an empty update keeps it as it is)."""
    return {}


def _answer_nll_forward(self: Any, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
    """ORPOTrainer.concatenated_forward (a decoder-only model), with the SFT term on the chosen answers' tokens:
    TRL's takes it over every attended token, the prompt's too (huggingface/trl#2527 restored that, the ORPO code's
    default), which would train the model to write the user's turns; ftdeploy's SFT and DPO train the answers only,
    as the paper's L_SFT, -log P(chosen | prompt), does. The odds ratio is TRL's: the mean log-probability per answer
    token of each answer."""
    import torch.nn.functional as F  # noqa: N812

    inputs = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                      device=self.accelerator.device)
    chosen = batch["chosen_labels"].shape[0]
    extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
    outputs = model(inputs["concatenated_input_ids"], attention_mask=inputs["concatenated_attention_mask"],
                    use_cache=False, **extra)
    logits, labels = outputs.logits, inputs["concatenated_labels"].to(outputs.logits.device)
    # A token mean over the batch's chosen answers, as TRL's nn.CrossEntropyLoss() over its tokens.
    nll = F.cross_entropy(logits[:chosen, :-1].flatten(0, 1), labels[:chosen, 1:].flatten(),
                          ignore_index=IGNORE_INDEX)
    logps = self.get_batch_logps(logits, labels, average_log_prob=True, is_encoder_decoder=False)
    out = (logps[:chosen], logps[chosen:], logits[:chosen, :-1], logits[chosen:, :-1], nll)
    return (*out, outputs.aux_loss) if self.aux_loss_enabled else out


def _orpo_trainer(model: Any, rows: list[dict[str, Any]], tokenizer: Any, kwargs: dict[str, Any],
                  callbacks: Sequence[Any]) -> Any:
    """TRL's ORPOTrainer (TRL 1.x keeps it in trl.experimental.orpo) training what DPO would on the same rows: the
    pairs as orpo_features writes them, kept by tokenize_row (which TRL maps over the dataset in __init__), and the
    SFT term on the answers (_answer_nll_forward). No reference model: ORPO has none.

    Imported here, after the engine: Unsloth rebinds trl.experimental.orpo's ORPOTrainer to its patched class as it is
    imported, and the subclass keeps the patches (_answer_nll_forward replaces its fused forward, which takes the SFT
    term over the prompt too)."""
    from datasets import Dataset

    with _quiet_orpo_setup():
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class = type("PretokenizedORPOTrainer", (ORPOTrainer,), {
            "tokenize_row": staticmethod(_keep_row), "concatenated_forward": _answer_nll_forward})
        return trainer_class(model=model, args=ORPOConfig(**kwargs), processing_class=tokenizer,
                             train_dataset=Dataset.from_list([orpo_features(r) for r in rows]),
                             callbacks=list(callbacks))


@contextlib.contextmanager
def _quiet_orpo_setup() -> Iterator[None]:
    """trl.experimental warns as it is first imported that its APIs may change, and ORPOTrainer maps the dataset three
    times in __init__, a progress bar each: nothing a user can act on (ftdeploy.quiet's rule); -vv shows them."""
    if logging.getLogger("ftdeploy").isEnabledFor(logging.DEBUG):
        yield
        return
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
            yield
    finally:
        if not bars_were_off:
            enable_progress_bars()


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


# The columns of a prepared row that each preference method trains on (the data stage's train.jsonl for it).
PREFERENCE_COLUMNS = {"dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
                      "orpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
                      "kto": ("prompt_ids", "completion_ids", "label")}


def check_method(cfg: Config) -> None:
    """Settings the training method cannot train with, refused before any model loads."""
    method = cfg.train.method
    if method == "sft":
        return
    # ORPO's log-probabilities come from the model's logits (_answer_nll_forward): an adapter on lm_head trains there.
    if "lm_head" in cfg.lora.target_modules and method != "orpo":
        raise ConfigError(f"train.method {method}: lora.target_modules cannot include lm_head (TRL computes the "
                          "preference log-probabilities from lm_head's weight directly: its adapter would not train)")
    if method == "kto":
        from ..config import split_global_batch

        world = world_size(cfg)
        batch, _ = split_global_batch(base_batch(cfg.train.batch_size), cfg.train.gradient_accumulation, world,
                                      cfg.train.keep_global_batch)
        if batch < 2:
            where = f" ({batch} per process over {world} processes)" if world > 1 else ""
            raise ConfigError(
                f"train.method kto needs 2 or more rows in each device's batch: its KL estimate scores each prompt "
                f"with another row's answer from the same batch (TRL's KTOTrainer). train.batch_size is "
                f"{cfg.train.batch_size}{where}; set train.batch_size to 2 or more (and lower "
                "train.gradient_accumulation to keep the global batch)")
    if method == "grpo":
        check_grpo(cfg)


def load_rows(data_dir: Path, cfg: Config) -> list[dict[str, Any]]:
    """The prepared training rows of train.method: SFT's input_ids/labels, or the preference method's columns
    (rows whose prompt fills data.max_seq_length, leaving no answer to score, are left out with a warning)."""
    method = cfg.train.method
    if method == "sft":
        return load_tokenized(data_dir)
    if method == "grpo":  # prompts: the data stage refused those that leave no room for an answer
        return load_grpo_rows(data_dir)
    columns = PREFERENCE_COLUMNS[method]
    rows = load_preference_rows(data_dir)
    if not rows or any(c not in rows[0] for c in columns):
        found = ", ".join(sorted(rows[0])) if rows else "no rows"
        raise DataError(f"{data_dir / 'train.jsonl'}: train.method {method} trains on rows of {', '.join(columns)}; "
                        f"this data has {found}: prepare it again with train.method {method} (`ftdeploy data`)")
    limit = cfg.data.max_seq_length
    kept = [{c: r[c] for c in columns} for r in rows
            if len(r["prompt_ids"]) < limit and all(r[c] for c in _answer_columns(method))]
    if len(kept) < len(rows):
        log.warning("%d of %d preference rows have no answer tokens left within data.max_seq_length %d; "
                    "training on the other %d", len(rows) - len(kept), len(rows), limit, len(kept))
    if not kept:
        raise DataError(f"{data_dir / 'train.jsonl'}: no preference row has answer tokens within data.max_seq_length "
                        f"{limit}; raise it")
    return kept


def trained_tokens(rows: list[dict[str, Any]], method: str) -> int:
    """The tokens training computes a loss on: SFT's unmasked labels; the answers' tokens of a preference row; none
    for grpo, whose answers are sampled as it trains."""
    if method == "sft":
        return sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    if method == "grpo":
        return 0
    return sum(len(r[c]) for r in rows for c in _answer_columns(method))


def _answer_columns(method: str) -> tuple[str, ...]:
    return tuple(c for c in PREFERENCE_COLUMNS[method] if c.endswith("_ids") and c != "prompt_ids")


def fit(base: Path | str, data_dir: Path, out_dir: Path, cfg: Config, tokenizer: Any,
        checkpoint_dir: Path | None = None, resume: bool = True) -> TrainMetrics:
    """The training loop of one process (the only one, or one of a launched group); every process joins the
    save, rank 0 writes `out_dir`. The process's entry point has imported the engine (import_engine_first)."""
    engine = select_engine(cfg.train.engine)
    check_method(cfg)
    import torch
    from transformers import set_seed

    set_seed(cfg.train.seed)
    on_cuda = torch.cuda.is_available()
    method = cfg.train.method
    rows = load_rows(data_dir, cfg)
    world = world_size(cfg)
    packed = sum(len(r.get("seq_lengths") or ()) for r in rows)  # data.packing true: rows in fewer sequences
    log.info("training (%s) with engine=%s on %s x %d: %s, %d steps", method, engine, "cuda" if on_cuda else "cpu",
             world, f"{len(rows)} packed sequences of {packed} rows" if packed else f"{len(rows)} examples",
             cfg.train.max_steps)

    history: list[LossPoint] = []
    preference: list[PreferencePoint] = []
    grpo: list[RewardPoint] = []  # GRPO logs a kl too, which is not a preference point
    progress = make_progress_callback(history, None if method == "grpo" else preference,
                                      grpo if method == "grpo" else None)
    tracker = make_tracker_callback(cfg.train.report_to) if cfg.train.report_to != NONE else None
    trainer, kwargs = build_trainer(base, rows, cfg, tokenizer, engine,
                                    str(checkpoint_dir or out_dir.parent / f".{out_dir.name}-trainer"),
                                    checkpoint_dir is not None, [progress, *([tracker] if tracker else [])])
    resume_from = latest_checkpoint(checkpoint_dir) if checkpoint_dir and resume else None
    if resume_from is not None:
        log.info("resuming training from %s", resume_from)
        logged, rewards = _history_from(resume_from)
        history.extend(logged)
        grpo.extend(reward_history_from(resume_from) if method == "grpo" else ())
        preference.extend(rewards if method != "grpo" else ())
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.monotonic() - started
    save_adapter(trainer, out_dir)
    if trainer.is_world_process_zero():
        (out_dir / "ftdeploy-train.json").write_text(json.dumps({
            "base_model": str(base), "engine": engine, "world_size": world,
            **({"method": method} if method != "sft" else {})}, indent=2))
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
        dataset_trained_tokens=trained_tokens(rows, method), resumed_from=str(resume_from) if resume_from else None,
        method=method, final_margin=_last(p.margin for p in preference),
        final_accuracy=_last(p.accuracy for p in preference), preference_history=preference,
        reward_history=grpo, final_reward=_last(p.reward for p in grpo),
        tracker=cfg.train.report_to if tracker else None, tracker_run=tracker.link if tracker else None,
        **_setup_metrics(trainer.ftdeploy_setup),
    )


def _setup_metrics(setup: Setup) -> dict[str, Any]:
    """How the batch, checkpointing and packing were settled (train_batches.Setup), as the manifest keeps them."""
    return {"gradient_checkpointing": setup.plan.checkpointing, "packing": setup.packing,
            "attention": setup.attention, "plan": setup.plan.note}


def _last(values: Iterable[float | None]) -> float | None:
    """The last value that is not None."""
    found = [v for v in values if v is not None]
    return found[-1] if found else None


def _history_from(ckpt: Path) -> tuple[list[LossPoint], list[PreferencePoint]]:
    """The loss history (and a preference run's rewards) logged before a checkpoint, so a resumed run reports the
    whole curve."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    logged = [e for e in state.get("log_history", []) if "loss" in e]
    losses = [LossPoint(step=e["step"], loss=float(e["loss"]), lr=float(e.get("learning_rate", 0.0)), elapsed_s=0.0)
              for e in logged]
    rewards = [preference_point(e["step"], e) for e in logged]
    return losses, [p for p in rewards if p is not None]


def plot_loss(history: list[LossPoint], path: Path, preference: Sequence[PreferencePoint] = (),
              rewards: Sequence[RewardPoint] = ()) -> Path | None:
    """loss.png: the training loss per logged step; for a preference run, the reward margin (and the reward accuracy
    of DPO and ORPO) per step in a second panel beside it; for a GRPO run, the mean reward of the sampled answers
    (and each reward function's) there."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if preference:
        fig, (ax, rewards_ax) = plt.subplots(1, 2, figsize=(11, 3.5), dpi=110)
        _plot_rewards(rewards_ax, preference)
    elif rewards:
        fig, (ax, rewards_ax) = plt.subplots(1, 2, figsize=(11, 3.5), dpi=110)
        plot_rewards(rewards_ax, rewards)
    else:
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


def _plot_rewards(ax: Any, points: Sequence[PreferencePoint]) -> None:
    """The reward margin per step, with the chosen and rejected rewards it is the difference of (ORPO's, which has no
    reference, with its log odds ratio), and DPO's and ORPO's reward accuracy on a second axis."""
    handles: list[Any] = []
    orpo = any(p.log_odds_ratio is not None for p in points)  # only ORPO logs it
    for name, values, style in (("reward margin", [p.margin for p in points], "-o"),
                                ("chosen reward", [p.rewards_chosen for p in points], ":"),
                                ("rejected reward", [p.rewards_rejected for p in points], ":"),
                                ("log odds ratio", [p.log_odds_ratio for p in points], "-.")):
        xy = [(p.step, v) for p, v in zip(points, values, strict=True) if v is not None]
        if xy:
            handles += ax.plot([s for s, _ in xy], [v for _, v in xy], style, markersize=2.5, label=name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (beta x mean log-prob per token)" if orpo else "reward (beta x log-ratio to the base)")
    ax.set_title("ORPO rewards (no reference model)" if orpo else "rewards")
    ax.grid(alpha=0.3)
    accuracy = [(p.step, p.accuracy) for p in points if p.accuracy is not None]
    if accuracy:
        acc_ax = ax.twinx()
        handles += acc_ax.plot([s for s, _ in accuracy], [a for _, a in accuracy], ".--", color="tab:red",
                               linewidth=0.8, label="reward accuracy")
        acc_ax.set_ylim(-0.02, 1.02)
        acc_ax.set_ylabel("reward accuracy")
    ax.legend(handles=handles, loc="best", fontsize="small")
