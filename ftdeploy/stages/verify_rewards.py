"""Verify for GRPO runs (train.method grpo): do the served model's answers score as the training rewards want?

The reward functions (grpo.rewards) are called as training calls them (rewards.Reward: the prompt, the answer as one
assistant message, its token ids, and the eval row's columns by name) on greedy answers to the eval prompts: the
served model's through Ollama's /api/chat, the merged model's and the base's through transformers (the Modelfile's
SYSTEM added as Ollama adds it, `with_system`). Each function's mean, and the mean of each answer's rewards summed over
the functions (GRPO's reward), per model: the tune should raise it over the base, and the served model should keep
the merged model's.

`score_replies` scores the answers verify_chats asked (ModelScore.replies, in the order of its prompts), generated up
to grpo.max_completion_length tokens unless verify.max_tokens is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..data import Record
from ..results import RewardCheck, RewardItem, RewardScore
from ..rewards import Reward


def score_replies(examples: list[Record], replies: dict[str, list[str]], rewards: Sequence[Reward],
                  max_tokens: int = 0, tokens: Callable[[str], list[int]] | None = None) -> RewardCheck:
    """The reward functions on each model's answers (`replies`: "served", "merged", "base" -> one answer an example,
    in order; a model left out is not scored). `tokens` makes the completion_ids the functions are given (None: they
    get None)."""
    prompts = [e.messages or [] for e in examples]
    rows = [{"source": e.source, "columns": e.columns} for e in examples]
    scored: dict[str, dict[str, list[float | None]]] = {}  # role -> function -> a reward an answer
    for role, texts in replies.items():
        completions = [[{"role": "assistant", "content": text}] for text in texts]
        ids = [tokens(text) for text in texts] if tokens is not None else None
        scored[role] = {r.__name__: r.score(prompts, completions, rows, ids) for r in rewards}
    totals = {role: _mean(_summed(by_function)) for role, by_function in scored.items()}
    check = RewardCheck(prompts=len(examples), max_tokens=max_tokens, served=totals.get("served"),
                        merged=totals.get("merged"), base=totals.get("base"))
    for r in rewards:
        means = {role: _mean(by_function[r.__name__]) for role, by_function in scored.items()}
        served = scored.get("served", {}).get(r.__name__, [])
        check.functions.append(RewardScore(name=r.__name__, scored=sum(v is not None for v in served),
                                           served=means.get("served"), merged=means.get("merged"),
                                           base=means.get("base")))
    for i, prompt in enumerate(prompts):
        check.items.append(RewardItem(
            prompt=str(prompt[-1].get("content") or "") if prompt else "",
            served=replies["served"][i] if "served" in replies else "",
            merged=replies["merged"][i] if "merged" in replies else None,
            base=replies["base"][i] if "base" in replies else None,
            rewards={name: values[i] for name, values in scored.get("served", {}).items()}))
    return check


def _summed(by_function: dict[str, list[float | None]]) -> list[float | None]:
    """Each answer's reward as GRPO sums it over the functions (None where every function gave None)."""
    columns = list(by_function.values())
    out: list[float | None] = []
    for values in zip(*columns, strict=True):
        given = [v for v in values if v is not None]
        out.append(sum(given) if given else None)
    return out


def _mean(values: list[float | None]) -> float | None:
    given = [v for v in values if v is not None]
    return round(sum(given) / len(given), 4) if given else None
