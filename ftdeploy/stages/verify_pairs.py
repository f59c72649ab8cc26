"""Verify for preference runs (train.method dpo or kto): does the trained model prefer the chosen answers, and does the
served model prefer what it does?

* The merged model (and the base, with verify.compare) scores each pair as DPO does: the chosen answer's summed token
  log-probabilities given the prompt minus the rejected answer's (the margin); accuracy is the share of pairs with a
  positive margin.
* Through Ollama: 0.17.4 gives log-probabilities of the tokens it generates (`logprobs`, and the `top_logprobs` most
  likely at each step, at most 20), never of a given text. So the served model is asked for one token where the
  pair's answers first differ (the prompt and their shared start sent raw, as the training template renders them),
  and its top 20 say which of the two next tokens it ranks first. The gate is how often that is the merged model's
  choice at the same point (verify.min_agreement): a served model that lost the preference ranks them otherwise.
* KTO rows carry one answer each, labelled good or bad: the margin is the mean change from the base in the
  log-probability of the good answers minus that of the bad ones (it needs the base: verify.compare).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import Record
from ..ollama import OllamaClient
from ..results import PairScore, PreferenceCheck
from .verify import GREEDY, with_system

if TYPE_CHECKING:
    from ..data import PreferenceIds
    from ..templates import TemplateMapping

TOP_LOGPROBS = 20  # the most Ollama returns per generated token


class _Scorer:
    """A checkpoint's log-probabilities of given answer ids after given prompt ids (transformers)."""

    def __init__(self, model_dir: Path | str) -> None:
        from ..fidelity import HFModel

        self.hf = HFModel(model_dir)
        self.tokenizer = self.hf.tokenizer

    def logp(self, prompt: list[int], answer: list[int], at: int | None = None) -> tuple[float, Any]:
        """The answer's summed log-probability, and the log-probabilities over the vocabulary before answer token
        `at` (None: not wanted)."""
        import torch

        ids = torch.tensor([prompt + answer], device=self.hf.device)
        with torch.no_grad():
            logits = self.hf.model(ids).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1: -1], dim=-1)
        total = float(logp.gather(1, ids[0, len(prompt):, None]).sum())
        return total, (logp[at] if at is not None else None)


def _ids(examples: list[Record], system: str | None, tokenizer: Any, mapping: TemplateMapping) -> list[PreferenceIds]:
    """Each row's prompt and answer ids as the data stage made them for training (data.tokenize_preference: the
    SFT label rule, each answer through its end-of-turn token), the Modelfile's SYSTEM added as Ollama adds it."""
    from ..data import tokenize_preference

    rows = [dataclasses.replace(e, messages=with_system(e.messages or [], system)) for e in examples]
    return [ids for _, ids in tokenize_preference(rows, tokenizer, mapping, max_seq_length=1 << 30)]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Where two answers first differ; None when one is the start of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def _served_first(reply: Any, chosen: str, rejected: str) -> bool | None:
    """Whether the served model ranked the chosen answer's next token above the rejected's, from one generated
    token's top log-probabilities (None: it ranked neither in its top 20)."""
    steps = reply.get("logprobs") or []
    if not steps:
        return None
    ranked: dict[str, float] = {}
    for entry in steps[0].get("top_logprobs") or []:
        ranked.setdefault(entry.get("token"), entry.get("logprob"))
    c, r = ranked.get(chosen), ranked.get(rejected)
    if c is None and r is None:
        return None
    return r is None or (c is not None and c > r)


def check_pairs(client: OllamaClient, name: str, examples: list[Record], merged_dir: Path,
                base: Path | str | None, system: str | None, mapping: TemplateMapping, strip_bos: str | None,
                seed: int, method: str = "dpo") -> PreferenceCheck:
    """DPO pairs: margins and accuracy of the merged model (and the base), and the served model's choice at each
    pair's first differing token against the merged model's."""
    merged = _Scorer(merged_dir)
    tok = merged.tokenizer
    items, asks = [], []
    for e, ids in zip(examples, _ids(examples, system, tok, mapping), strict=True):
        prompt, chosen, rejected = ids.prompt_ids, ids.chosen_ids, ids.rejected_ids
        assert chosen is not None and rejected is not None
        k = _first_difference(chosen, rejected)
        chosen_lp, row = merged.logp(prompt, chosen, k)
        rejected_lp, _ = merged.logp(prompt, rejected)
        first = None if k is None else bool(row[chosen[k]] > row[rejected[k]])
        items.append(PairScore(prompt=str((e.messages or [{}])[-1].get("content") or ""),
                               merged_margin=round(chosen_lp - rejected_lp, 4), merged_first=first))
        asks.append((prompt, chosen, rejected, k))
    del merged
    if base is not None:
        scorer = _Scorer(base)
        for item, (prompt, chosen, rejected, _) in zip(items, asks, strict=True):
            item.base_margin = round(scorer.logp(prompt, chosen)[0] - scorer.logp(prompt, rejected)[0], 4)
        del scorer
    options = {**GREEDY, "num_predict": 1, "seed": seed}
    for item, (prompt, chosen, rejected, k) in zip(items, asks, strict=True):
        if k is None:
            continue
        raw = tok.decode(prompt + chosen[:k], skip_special_tokens=False)
        if strip_bos and raw.startswith(strip_bos):
            raw = raw[len(strip_bos):]  # the runner adds BOS itself
        reply = client.generate(name, raw, raw=True, options=options, top_logprobs=TOP_LOGPROBS)
        item.served_first = _served_first(reply, tok.decode([chosen[k]]), tok.decode([rejected[k]]))
    return _pair_summary(items, method)


def _pair_summary(items: list[PairScore], method: str) -> PreferenceCheck:
    def share(values: list[bool]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    base = [i.base_margin for i in items if i.base_margin is not None]
    decided = [i for i in items if i.merged_first is not None]
    return PreferenceCheck(
        method=method, pairs=len(items), items=items,
        merged_accuracy=share([i.merged_margin > 0 for i in items]),
        merged_margin=mean([i.merged_margin for i in items]),
        base_accuracy=share([m > 0 for m in base]), base_margin=mean(base),
        served_accuracy=share([i.served_first is True for i in decided]),
        agreement=share([i.served_first == i.merged_first for i in decided]))


def check_labelled(examples: list[Record], merged_dir: Path, base: Path | str | None, system: str | None,
                   mapping: TemplateMapping) -> PreferenceCheck:
    """KTO rows: the mean change from the base in log-probability per answer token, good answers minus bad ones
    (None without the base, or without both kinds); a held-out pair counts as one good and one bad answer."""
    check = PreferenceCheck(method="kto", pairs=len(examples))
    if base is None or not examples:
        return check
    merged = _Scorer(merged_dir)
    rows = []  # (prompt, answer, good?): a labelled row's one answer; a pair's two (held-out pairs, as KTO trains them)
    for ids in _ids(examples, system, merged.tokenizer, mapping):
        rows += [(ids.prompt_ids, answer, good) for answer, good in ((ids.chosen_ids, True), (ids.rejected_ids, False))
                 if answer is not None]

    def per_token(scorer: _Scorer) -> list[float]:
        return [scorer.logp(prompt, answer)[0] / max(len(answer), 1) for prompt, answer, _ in rows]

    tuned = per_token(merged)
    del merged
    before = per_token(_Scorer(base))
    good = [t - b for (_, _, ok), t, b in zip(rows, tuned, before, strict=True) if ok]
    bad = [t - b for (_, _, ok), t, b in zip(rows, tuned, before, strict=True) if not ok]
    if good and bad:
        check.merged_margin = round(sum(good) / len(good) - sum(bad) / len(bad), 4)
    return check
