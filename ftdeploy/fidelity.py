"""Is the served model the trained model? Measures that mean something:

* answer match: the expected answer (or `expect` snippet) is in the reply at temperature 0;
* agreement with the merged model: the reply equals the merged 16-bit model's greedy reply
  (normalised for case and spacing), i.e. quantization and serving changed nothing a user sees;
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
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict

log = logging.getLogger(__name__)


class GeneralPrompt(TypedDict):
    """One row of the bundled general-knowledge set (demo/general.jsonl)."""

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
    path = Path(str(resources.files("ftdeploy.demo").joinpath("general.jsonl")))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def token_fidelity(reference: Path, candidate: Path, texts: list[str], max_tokens: int = 512) -> dict[str, float]:
    """Top-1 agreement and perplexity ratio of `candidate` against `reference` on `texts` (llama.cpp)."""
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

    ref_logits, tokens = run(reference)
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


def hf_answers(model_dir: Path | str, chats: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    """Greedy replies of a Hugging Face checkpoint (the merged 16-bit model, or the base)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    replies = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(device) for k, v in ids.items()}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    del model
    return replies


def score(replies: list[str], expected: list[str], reference: list[str] | None = None,
          modes: list[str] | None = None) -> dict[str, Any]:
    modes = modes or ["contains"] * len(expected)
    hits = [contains(r, e, m) for r, e, m in zip(replies, expected, modes, strict=True)]
    result: dict[str, Any] = {"match": round(sum(hits) / len(hits), 4) if hits else 0.0, "hits": sum(hits),
                              "total": len(hits)}
    if reference is not None:
        same = [normalize(a) == normalize(b) for a, b in zip(replies, reference, strict=True)]
        result["agreement"] = round(sum(same) / len(same), 4) if same else 0.0
    return result


def forgetting(base_replies: list[str], tuned_replies: list[str], expected: list[str]) -> dict[str, Any]:
    base_ok = [contains(r, e) for r, e in zip(base_replies, expected, strict=True)]
    tuned_ok = [contains(r, e) for r, e in zip(tuned_replies, expected, strict=True)]
    return {
        "prompts": len(expected), "base_correct": sum(base_ok), "tuned_correct": sum(tuned_ok),
        "broken": sum(b and not t for b, t in zip(base_ok, tuned_ok, strict=True)),
        "changed": sum(normalize(a) != normalize(b) for a, b in zip(base_replies, tuned_replies, strict=True)),
    }
