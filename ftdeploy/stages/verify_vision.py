"""Verify a vision model: the same image prompts through Ollama's /api/chat (the images as `images`, each placed where
the chat had it with Ollama's `[img]` mark) and through the merged model with its own processor, greedy on both
sides; the answers compared token for token as the text verify compares them.

Ollama puts a message's images where its text says `[img]`, else before the text (server/prompt.go); the image parts
of a chat are written as `[img]` marks in place, so an image after the text stays after it."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ollama import OllamaClient

IMG_MARK = "[img]"  # where Ollama puts a message's next image


@dataclass
class ImageAnswer:
    """One greedy answer to an image prompt: its token ids where known (the merged model) and its text."""

    text: str
    tokens: list[str]  # each generated token as text
    logprobs: list[float] | None = None  # each generated token's log-probability (the served side)
    stopped: bool = False  # ended on a stop token, not at the length limit
    ids: list[int] | None = None  # the generated ids (the merged side), the stop left out


def ollama_messages(messages: list[dict[str, Any]], images: list[bytes]) -> list[dict[str, Any]]:
    """A chat whose messages hold image parts, as Ollama's /api/chat takes it: text with `[img]` where each image
    was, and the message's images (base64) in order."""
    pending = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(dict(m))
            continue
        text, own = [], []
        for part in content:
            if part.get("type") == "image":
                text.append(IMG_MARK)
                own.append(base64.b64encode(next(pending)).decode())
            else:
                text.append(part.get("text", ""))
        message: dict[str, Any] = {**m, "content": "".join(text)}
        if own:
            message["images"] = own
        out.append(message)
    return out


def served_answer(client: OllamaClient, model: str, messages: list[dict[str, Any]], images: list[bytes],
                  max_tokens: int) -> ImageAnswer:
    """Ollama's greedy answer to an image chat, with each token's text (its log-probabilities' tokens)."""
    from .verify import GREEDY

    body = {"model": model, "messages": ollama_messages(messages, images), "stream": False, "logprobs": True,
            "options": {**GREEDY, "num_predict": max_tokens}}
    reply = client._post_json("/api/chat", body)  # the official client's chat has no logprobs in 0.6
    logprobs = reply.logprobs or []
    return ImageAnswer(reply.message.content or "", [lp.token for lp in logprobs], [lp.logprob for lp in logprobs],
                       stopped=reply.done_reason == "stop")


def prompt_tokens(client: OllamaClient, model: str, messages: list[dict[str, Any]], images: list[bytes]) -> int:
    """How many tokens the prompt Ollama builds for an image chat has (its image tokens included)."""
    body = {"model": model, "messages": ollama_messages(messages, images), "stream": False,
            "options": {"temperature": 0, "num_predict": 1}}
    return int(client._post_json("/api/chat", body).prompt_eval_count or 0)


def encode_prompt(processor: Any, messages: list[dict[str, Any]], images: list[bytes],
                  system: str | None = None) -> Any:
    """A chat up to the generation prompt, as the merged model is asked it (the Modelfile's SYSTEM first, as Ollama
    adds it)."""
    from ..data.image_labels import encode, render
    from .verify import with_system

    return encode(processor, render(processor, with_system(messages, system), True), images)


class MergedVision:
    """The merged model and its processor, loaded once, answering image chats greedily as it was trained: the
    training chat template renders the chat, the processor places the images' tokens and computes their pixels."""

    def __init__(self, model_dir: Path, stops: tuple[str, ...] = (), dtype: str = "float32"):
        """`stops`: the Modelfile's stop tokens, where generation ends as Ollama's ends."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype)).eval()
        vocab = self.processor.tokenizer.get_vocab()
        self.stops_text = stops
        self.stops = {vocab[s] for s in stops if s in vocab}

    def inputs(self, messages: list[dict[str, Any]], images: list[bytes], system: str | None = None) -> Any:
        return encode_prompt(self.processor, messages, images, system)

    def answer(self, messages: list[dict[str, Any]], images: list[bytes], max_tokens: int,
               system: str | None = None) -> ImageAnswer:
        """The greedy answer (at most `max_tokens`, ending at a stop token), as the served side gets it."""
        import torch

        inputs = self.inputs(messages, images, system)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=sorted(self.stop_ids()))
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        tok = self.processor.tokenizer
        stops = self.stop_ids()
        stopped = bool(ids) and ids[-1] in stops
        shown = [i for i in ids if i not in stops]
        return ImageAnswer(tok.decode(shown, skip_special_tokens=True), [tok.decode([i]) for i in shown],
                           stopped=stopped, ids=shown)

    def stop_ids(self) -> set[int]:
        """The ids generation stops at: the tokenizer's EOS and the generation config's."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        listed = configured if isinstance(configured, list) else [configured]
        return {i for i in [self.processor.tokenizer.eos_token_id, *listed, *self.stops] if i is not None}
