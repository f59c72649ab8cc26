"""The labels of an image chat: the text label rule (ftdeploy/data/labels.py) with the processor in the tokenizer's
place. The span of assistant turn i runs from the end of the chat before it (rendered with the generation prompt) to
the end of the chat through it, counted in the processor's tokens (the images' tokens expanded as the model sees
them); an image's own tokens are never a target. The processor renders each chat with the training chat template and
places the images' tokens; nothing adds a BOS the template already writes (`add_special_tokens=False`)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .labels import IGNORE_INDEX


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
