"""Train a vision model on image chats: LoRA on the language model (the vision tower and projector too with
lora.finetune_vision), labels on the assistant turns only, as the text engine labels them.

The labels are ftdeploy/data/image_labels.py's (the text label rule, counted in the processor's tokens).

Engines: `hf` (transformers' AutoModelForImageTextToText + PEFT + transformers' Trainer, fp32 LoRA on CPU, QLoRA
through bitsandbytes on CUDA) and `unsloth` (FastVisionModel, with the same collator and labels; guarded: it is
imported only on CUDA hosts that have it).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.image_labels import IGNORE_INDEX, VisionExample, tokenize_example
from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

# A SentencePiece tokenizer's files, which Ollama's converter prefers to tokenizer.json (Gemma 3 is served with
# SentencePiece): the base's, carried into the merged model (the vocabulary is not changed by training).
SENTENCEPIECE_FILES = ("tokenizer.model", "added_tokens.json")


def collate(examples: list[VisionExample], pad_id: int) -> dict[str, Any]:
    """A batch: input_ids, attention_mask and labels right-padded, each image tensor concatenated as the processor
    concatenates a batch's (pixel_values and image_grid_thw along the first axis), per-token tensors
    (token_type_ids, mm_token_type_ids) padded with 0."""
    import torch

    longest = max(e.length for e in examples)
    batch: dict[str, Any] = {}
    per_token = {k for k, v in examples[0].features.items()
                 if hasattr(v, "shape") and v.dim() == 2 and v.shape[1] == examples[0].length}
    for key in per_token:
        pad = pad_id if key == "input_ids" else 0
        batch[key] = torch.stack([torch.nn.functional.pad(e.features[key][0], (0, longest - e.length), value=pad)
                                  for e in examples])
    batch["labels"] = torch.tensor([e.labels + [IGNORE_INDEX] * (longest - e.length) for e in examples])
    for key in examples[0].features:
        if key not in per_token:
            present = [e.features[key] for e in examples if key in e.features and e.features[key] is not None]
            if present:
                batch[key] = torch.cat(present)
    return batch


def lora_targets(model: Any, language_model: str, vision_tower: str, finetune_vision: bool) -> list[str]:
    """The full names of the linear layers LoRA adapts: the language model's (by the family's pattern), and the
    vision tower's and projector's with finetune_vision."""
    import re

    import torch

    patterns = [re.compile(language_model)] + ([re.compile(vision_tower)] if finetune_vision else [])
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and any(p.search(name) for p in patterns)]
    if not names:
        raise DataError("no linear layer of the model matches the language model's pattern; this is a bug in "
                        "ftdeploy's vision family table, please report it")
    return names


class VisionDataset:
    """The prepared rows, tokenized as they are drawn (the pixels are not kept between epochs)."""

    def __init__(self, rows: list[dict[str, Any]], data_dir: Any, processor: Any, train_on: str):
        self.rows, self.data_dir, self.processor, self.train_on = rows, data_dir, processor, train_on

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> VisionExample:
        from ..data.image_writer import load_images

        row = self.rows[i]
        example = tokenize_example(self.processor, row["messages"], load_images(self.data_dir, row["images"]),
                                   tuple(row.get("untrained", ())), self.train_on)
        if example.length != row.get("length", example.length):
            raise DataError(f"{row['source']}: {example.length} tokens now, {row['length']} when the data was "
                            "prepared: the processor changed; prepare the data again (`ftdeploy data`)")
        return example


def load_vision_model(base: Path | str, cfg: Config, engine: str, on_cuda: bool) -> tuple[Any, Any]:
    """The base vision model with its LoRA, and its processor."""
    from transformers import AutoProcessor

    from ..vision import family_of, read_config

    family = family_of(read_config(Path(base)), str(base))
    processor = AutoProcessor.from_pretrained(str(base), trust_remote_code=cfg.trust_remote_code)
    if engine == "unsloth":
        return _load_unsloth_vision(base, cfg), processor
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": torch.float32}
    if on_cuda:
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cfg.train.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForImageTextToText.from_pretrained(str(base), **kwargs)
    if on_cuda and cfg.train.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = lora_targets(model, family.language_model, family.vision_tower, cfg.lora.finetune_vision)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias,
                      target_modules=targets)
    return get_peft_model(model, lora), processor


def _load_unsloth_vision(base: Path | str, cfg: Config) -> Any:
    """Unsloth's FastVisionModel, LoRA on the language model (and the vision layers with lora.finetune_vision),
    as Unsloth's vision notebooks set it up. Reached only on CUDA hosts with Unsloth (select_engine)."""
    from unsloth import FastVisionModel  # noqa: I001  (imported first by import_engine_first)

    model, _ = FastVisionModel.from_pretrained(
        str(base), load_in_4bit=cfg.train.load_in_4bit, use_gradient_checkpointing="unsloth",
        trust_remote_code=cfg.trust_remote_code)
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=cfg.lora.finetune_vision, finetune_language_layers=True,
        finetune_attention_modules=True, finetune_mlp_modules=True, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout, bias=cfg.lora.bias, random_state=cfg.train.seed)
    FastVisionModel.for_training(model)
    return model


def fit_vision(base: Path | str, data_dir: Path, out_dir: Path, cfg: Config, checkpoint_dir: Path | None = None,
               resume: bool = True) -> Any:
    """Train the LoRA of a vision model on the prepared image chats (one process); save it with the processor into
    `out_dir`; return TrainMetrics as the text engine's fit does."""
    import time

    import torch
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from ..data.image_writer import load_vision_rows
    from ..results import LossPoint, TrainMetrics
    from ..strategy import world_size
    from .train import latest_checkpoint, make_progress_callback, save_adapter, select_engine, trainer_kwargs

    if world_size(cfg) > 1:
        raise ConfigError("train.nproc / train.nnodes: vision models train in one process (yet)")
    engine = select_engine(cfg.train.engine)
    set_seed(cfg.train.seed)
    on_cuda = torch.cuda.is_available()
    rows = load_vision_rows(data_dir)
    model, processor = load_vision_model(base, cfg, engine, on_cuda)
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    kwargs = trainer_kwargs(cfg, engine, on_cuda, bf16, str(checkpoint_dir or out_dir.parent / ".vision-trainer"),
                            checkpoint_dir is not None)
    for sft_only in ("max_length", "dataset_kwargs", "packing"):
        kwargs.pop(sft_only, None)
    log.info("training (vision sft) with engine=%s on %s: %d image chats, %d steps", engine,
             "cuda" if on_cuda else "cpu", len(rows), cfg.train.max_steps)
    history: list[LossPoint] = []
    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs),
                      train_dataset=VisionDataset(rows, data_dir, processor, cfg.data.train_on),
                      data_collator=lambda batch: collate(batch, pad_id), callbacks=[make_progress_callback(history)])
    trainer.remove_callback(PrinterCallback)
    resume_from = latest_checkpoint(checkpoint_dir) if checkpoint_dir and resume else None
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.monotonic() - started
    save_adapter(trainer, out_dir)
    processor.save_pretrained(str(out_dir))
    (out_dir / "ftdeploy-train.json").write_text(json.dumps(
        {"base_model": str(base), "engine": engine, "world_size": 1, "vision": True}, indent=2))
    batch = kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"]
    return TrainMetrics(
        engine=engine, device="cuda" if on_cuda else "cpu", steps=result.global_step,
        train_loss=round(float(result.training_loss), 4), final_loss=history[-1].loss if history else None,
        seconds=round(seconds, 1), loss_history=history, optim=kwargs["optim"],
        per_device_batch=kwargs["per_device_train_batch_size"],
        gradient_accumulation=kwargs["gradient_accumulation_steps"], global_batch=batch,
        examples_per_s=round(result.global_step * batch / max(seconds, 1e-9), 2),
        dataset_trained_tokens=sum(int(r.get("trained", 0)) for r in rows),
        resumed_from=str(resume_from) if resume_from else None, packing="padded")


def merge_vision(base: Path | str, adapter_dir: Path, merged_dir: Path, trust_remote_code: bool = False) -> Path:
    """The adapter merged into a 16-bit copy of the base vision model (reloaded unquantized), saved with the
    processor, tokenizer and chat template the adapter was trained with."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..runs import atomic_path
    from .merge import save_merged

    on_cuda = torch.cuda.is_available()
    model = AutoModelForImageTextToText.from_pretrained(
        str(base), dtype=torch.bfloat16 if on_cuda else torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().to(torch.bfloat16)
    processor = AutoProcessor.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)
    with atomic_path(merged_dir) as tmp:
        save_merged(merged, processor, base, tmp)
        for name in SENTENCEPIECE_FILES:  # transformers 5 saves tokenizer.json only; Ollama reads these first
            if (Path(base) / name).is_file() and not (tmp / name).exists():
                shutil.copy2(Path(base) / name, tmp / name)
    return merged_dir
