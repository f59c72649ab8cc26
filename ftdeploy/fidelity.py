"""Is the served model the trained model? Measures that mean something:

* agreement with the merged model (the default gate): for each served quant, how far its greedy answer follows the
  merged 16-bit model's greedy answer to the same rendered prompt, in tokens (the common prefix, the stop counted
  as a token), so a bad conversion, a broken quant or a wrong model shows whatever the dataset looks like;
* answer match: the expected answer (or `expect` snippet) is in the reply at temperature 0;
* chrF (sacrebleu) of the replies against the eval references: a soft score for free-form answers;
* token fidelity of each GGUF against its F16, through llama.cpp on the eval conversations:
  top-1 agreement (the fraction of positions where both pick the same next token) and the
  perplexity ratio (quant / F16; 1.00 is lossless);
* forgetting: bundled general-knowledge prompts answered by the base and the tuned model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from .assets import asset
from .results import PromptAgreement

log = logging.getLogger(__name__)


class GeneralPrompt(TypedDict):
    """One row of the bundled general-knowledge set (assets/demo/general.jsonl)."""

    messages: list[dict[str, str]]
    expect: str


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def contains(reply: str, expected: str, mode: str = "contains") -> bool:
    """Does the reply give the expected answer? Modes, chosen per eval row with "match":
    contains (default; case and spacing ignored; `a|b` accepts either), exact (the whole reply), regex."""
    if mode == "regex":
        return re.search(expected, reply, flags=re.IGNORECASE) is not None
    if mode == "exact":
        return normalize(reply).rstrip(".") == normalize(expected).rstrip(".")
    return any(alt.strip() and normalize(alt) in normalize(reply) for alt in expected.split("|"))


def general_prompts() -> list[GeneralPrompt]:
    text = asset("demo", "general.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def token_fidelity(reference: Path, candidate: Path, texts: list[str], max_tokens: int = 512,
                   cache: dict[Any, Any] | None = None) -> dict[str, float]:
    """Top-1 agreement and perplexity ratio of `candidate` against `reference` on `texts` (llama.cpp). `cache`: the
    reference's logits are kept there, so measuring several candidates evaluates the reference once."""
    import numpy as np
    from llama_cpp import Llama

    def run(path: Path) -> tuple[list[np.ndarray], list[list[int]]]:
        llm = Llama(str(path), logits_all=True, n_ctx=max_tokens + 8, verbose=False, seed=0)
        all_logits, all_tokens = [], []
        for text in texts:
            tokens = llm.tokenize(text.encode(), add_bos=True, special=True)[:max_tokens]
            llm.reset()
            llm.eval(tokens)
            all_logits.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
            all_tokens.append(tokens)
        del llm
        return all_logits, all_tokens

    key = (str(reference), tuple(texts), max_tokens)
    if cache is not None and key in cache:
        ref_logits, tokens = cache[key]
    else:
        ref_logits, tokens = run(reference)
        if cache is not None:
            cache[key] = ref_logits, tokens
    cand_logits, _ = run(candidate)
    agree = total = 0
    nll_ref = nll_cand = 0.0
    for r, c, toks in zip(ref_logits, cand_logits, tokens, strict=True):
        agree += int((r[:-1].argmax(-1) == c[:-1].argmax(-1)).sum())
        total += len(toks) - 1
        nxt = np.array(toks[1:])
        for logits, acc in ((r, "ref"), (c, "cand")):
            z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            nll = float(-logp[np.arange(len(nxt)), nxt].sum())
            if acc == "ref":
                nll_ref += nll
            else:
                nll_cand += nll
    ppl_ref, ppl_cand = math.exp(nll_ref / max(total, 1)), math.exp(nll_cand / max(total, 1))
    return {"top1_agreement": round(agree / max(total, 1), 4), "ppl_ref": round(ppl_ref, 4),
            "ppl": round(ppl_cand, 4), "ppl_ratio": round(ppl_cand / ppl_ref, 4), "tokens": total}


@dataclass
class Generation:
    """A greedy answer: its text and whether it ended on a stop token within its limit."""

    text: str
    stopped: bool


class HFModel:
    """A Hugging Face checkpoint (the merged 16-bit model, or the base), loaded once and asked in batches."""

    def __init__(self, model_dir: Path | str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {int(i) for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, chats: list[list[dict[str, Any]]], limits: list[int],
                 tools: list[list[dict[str, Any]] | None] | None = None) -> list[Generation]:
        """Greedy answers to every chat in one left-padded batch, each cut at its own token limit (greedy decoding
        is causal, so an answer cut at its limit is the answer generated with that limit). `tools`: each chat's
        declared tools, rendered by the chat template as in training."""
        from .templates import training_messages

        if not chats:
            return []
        tok = self.tokenizer
        tools = tools or [None] * len(chats)
        texts = [tok.apply_chat_template(training_messages(chat), tools=t, add_generation_prompt=True, tokenize=False)
                 if t else tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                 for chat, t in zip(chats, tools, strict=True)]
        return self._greedy(texts, limits, special_tokens=False)  # the chat template writes BOS itself

    def continue_texts(self, prefixes: list[str], limits: list[int]) -> list[Generation]:
        """Greedy continuations of raw text, no chat template: each prefix tokenized as training tokenized raw text
        (the tokenizer's BOS first), as Ollama's /api/generate with raw=True receives it."""
        return self._greedy(prefixes, limits, special_tokens=True) if prefixes else []

    def _greedy(self, texts: list[str], limits: list[int], special_tokens: bool) -> list[Generation]:
        """Greedy answers to the texts in one left-padded batch, each cut at its own limit."""
        import torch

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.stop_ids)
        side, pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if pad is None:
            tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        try:
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special_tokens).to(self.device)
        finally:
            tok.padding_side, tok.pad_token = side, pad
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max(limits), do_sample=False, pad_token_id=pad_id,
                                      eos_token_id=sorted(self.stop_ids))
        answers = []
        for row, limit in zip(out[:, batch["input_ids"].shape[1]:].tolist(), limits, strict=True):
            row = row[:limit]
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            ids = row if stop is None else row[:stop]
            answers.append(Generation(tok.decode(ids, skip_special_tokens=True).strip(), stop is not None))
        return answers


STOP = -1  # the stop, as one more token of an answer that ended on one


def prompt_agreement(served: list[int], served_stopped: bool, merged: list[int],
                     merged_stopped: bool) -> PromptAgreement:
    """How far the served answer follows the merged one: the common prefix of the two token sequences (each with
    the stop appended when it stopped) over the merged sequence's length."""
    a = [*served, STOP] if served_stopped else served
    b = [*merged, STOP] if merged_stopped else merged
    prefix = 0
    for x, y in zip(a, b, strict=False):  # the shorter one ends the common prefix
        if x != y:
            break
        prefix += 1
    return PromptAgreement(prefix=prefix, length=len(b), ratio=round(prefix / len(b), 4) if b else float(not a),
                           merged_stopped=merged_stopped, served_stopped=served_stopped)


def agreement_scores(items: list[PromptAgreement]) -> dict[str, Any]:
    """ModelScore fields from the prompts' agreements with the merged model.

    token_agreement (the gate): the share of greedy steps at which the served model picked the merged model's token,
    counted along each answer up to its first difference (after it, the two answers go on from different text and
    say nothing more). It does not depend on how long the answers are, so one threshold holds for a fact and for a
    paragraph. prefix_share: the mean share of the merged answer the served one repeats from its start (long answers
    lower it even for a near-lossless quant). stop_agreement: prompts where both stopped, or both ran on."""
    if not items:
        return {"token_agreement": None, "prefix_share": None, "stop_agreement": None, "prompts": []}
    kept = sum(i.prefix for i in items)
    diverged = sum(i.prefix < i.length for i in items)
    return {"token_agreement": round(kept / (kept + diverged), 4) if kept + diverged else 1.0,
            "prefix_share": round(sum(i.ratio for i in items) / len(items), 4),
            "stop_agreement": round(sum(i.merged_stopped == i.served_stopped for i in items) / len(items), 4),
            "prompts": items}


def chrf(replies: list[str], references: list[str]) -> float | None:
    """Corpus chrF (0-100) of the replies against the references that are not empty (sacrebleu's CHRF, its
    defaults: character 6-grams, beta 2)."""
    from .optional import require

    pairs = [(r, ref) for r, ref in zip(replies, references, strict=True) if ref.strip()]
    if not pairs:
        return None
    metrics = require("sacrebleu.metrics", "verify's chrF score")
    return round(metrics.CHRF().corpus_score([r for r, _ in pairs], [[ref for _, ref in pairs]]).score, 2)


def score(replies: list[str], expected: list[str], merged: list[str] | None = None,
          modes: list[str] | None = None, references: list[str] | None = None) -> dict[str, Any]:
    """ModelScore fields: expected answers found, replies equal to the merged model's, chrF against the references."""
    modes = modes or ["contains"] * len(expected)
    hits = [contains(r, e, m) for r, e, m in zip(replies, expected, modes, strict=True)]
    result: dict[str, Any] = {"match": round(sum(hits) / len(hits), 4) if hits else 0.0, "hits": sum(hits),
                              "total": len(hits)}
    if merged is not None:
        same = [normalize(a) == normalize(b) for a, b in zip(replies, merged, strict=True)]
        result["agreement"] = round(sum(same) / len(same), 4) if same else 0.0
    if references is not None:
        result["chrf"] = chrf(replies, references)
    return result


def forgetting(base_replies: list[str], tuned_replies: list[str], expected: list[str]) -> dict[str, Any]:
    base_ok = [contains(r, e) for r, e in zip(base_replies, expected, strict=True)]
    tuned_ok = [contains(r, e) for r, e in zip(tuned_replies, expected, strict=True)]
    return {
        "prompts": len(expected), "base_correct": sum(base_ok), "tuned_correct": sum(tuned_ok),
        "broken": sum(b and not t for b, t in zip(base_ok, tuned_ok, strict=True)),
        "changed": sum(normalize(a) != normalize(b) for a, b in zip(base_replies, tuned_replies, strict=True)),
    }
