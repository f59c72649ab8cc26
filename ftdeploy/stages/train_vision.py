"""Train a vision model on image chats: LoRA on the language model (the vision tower and projector too with
lora.finetune_vision), labels on the assistant turns only, as the text engine labels them.

The label rule is the text one (ftdeploy/data/labels.py) with the processor in the tokenizer's place: the span of
assistant turn i runs from the end of the chat before it (rendered with the generation prompt) to the end of the chat
through it, counted in the processor's tokens (the images' tokens expanded as the model sees them). The processor
renders each chat with the training chat template and places the images' tokens; nothing adds a BOS the template
already writes (`add_special_tokens=False`).

Engines: `hf` (transformers' AutoModelForImageTextToText + PEFT + transformers' Trainer, fp32 LoRA on CPU, QLoRA
through bitsandbytes on CUDA) and `unsloth` (FastVisionModel, with the same collator and labels; guarded: it is
imported only on CUDA hosts that have it).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def pil_images(images: list[bytes]) -> list[Any]:
    """Image bytes as RGB PIL images (the processors' input)."""
    from PIL import Image

    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            out.append(im.convert("RGB"))
    return out


def render(processor: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(processor: Any, text: str, images: list[bytes]) -> Any:
    """The processor's tensors for one rendered chat and its images (batch of one)."""
    return processor(text=[text], images=pil_images(images) or None, return_tensors="pt", add_special_tokens=False)


def encode_prompt(processor: Any, messages: list[dict[str, Any]], images: list[bytes],
                  system: str | None = None) -> Any:
    """A chat up to the generation prompt, as the merged model is asked it (the Modelfile's SYSTEM first, as Ollama
    adds it)."""
    from .verify import with_system

    return encode(processor, render(processor, with_system(messages, system), True), images)


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if p.get("type") == "image")


@dataclass
class VisionExample:
    """One training chat, tokenized: the processor's tensors (batch of one) and the labels."""

    features: dict[str, Any]
    labels: list[int]

    @property
    def length(self) -> int:
        return len(self.labels)

    @property
    def trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def assistant_spans(processor: Any, messages: list[dict[str, Any]], images: list[bytes],
                    untrained: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """The token spans (start, end) of the trained assistant turns, by the label rule (see the module's doc)."""
    spans = []
    turn = -1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn += 1
        if turn in untrained:
            continue
        before, through = render(processor, messages[:i], True), render(processor, messages[:i + 1], False)
        if not through.startswith(before):
            raise DataError("the chat template does not render this chat turn by turn (the chat before assistant "
                            f"turn {turn}, with the generation prompt, is not where the chat through it begins)")
        shown = count_images(messages[:i])
        start = len(encode(processor, before, images[:shown])["input_ids"][0])
        end = len(encode(processor, through, images[:count_images(messages[:i + 1])])["input_ids"][0])
        spans.append((start, end))
    return spans


def tokenize_example(processor: Any, messages: list[dict[str, Any]], images: list[bytes],
                     untrained: tuple[int, ...] = (), train_on: str = "assistant") -> VisionExample:
    """The chat's tensors and labels: loss on the assistant turns (every token with train_on="all"), turns of weight
    0 masked either way."""
    full = encode(processor, render(processor, messages, False), images)
    ids = full["input_ids"][0].tolist()
    if train_on == "all":  # every token trains but the turns of weight 0
        labels = list(ids)
        for start, end in _untrained_spans(processor, messages, images, untrained):
            labels[start:end] = [IGNORE_INDEX] * (end - start)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in assistant_spans(processor, messages, images, untrained):
            labels[start:end] = ids[start:end]
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None:  # an image's own tokens are never a target
        labels = [IGNORE_INDEX if t == image_token else label for t, label in zip(ids, labels, strict=True)]
    return VisionExample(dict(full), labels)


def _untrained_spans(processor: Any, messages: list[dict[str, Any]], images: list[bytes],
                     untrained: tuple[int, ...]) -> list[tuple[int, int]]:
    every = assistant_spans(processor, messages, images, ())
    return [span for turn, span in enumerate(every) if turn in untrained]


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


ProgressFn = Callable[[dict[str, float]], None]
