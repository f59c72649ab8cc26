"""Verify stage: ask the served model the eval prompts at temperature 0 and count expected answers."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import VerifyError
from ..ollama import OllamaClient
from .data import Example


@dataclass
class Answer:
    prompt: str
    expected: str
    answer: str
    ok: bool
    done_reason: str


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def expected_answer(example: Example) -> str:
    if example.expect:
        return example.expect
    return example.messages[-1]["content"] if example.messages[-1]["role"] == "assistant" else ""


def matches(answer: str, expected: str) -> bool:
    """The expected answer (or the `expect` snippet) is contained in the reply, ignoring case and spacing."""
    return bool(expected) and _normalize(expected) in _normalize(answer)


def prompt_messages(example: Example) -> list[dict[str, str]]:
    msgs = example.messages
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs


def ask_all(client: OllamaClient, model: str, examples: list[Example], max_tokens: int, seed: int = 0) -> list[Answer]:
    answers = []
    for ex in examples:
        msgs = prompt_messages(ex)
        reply = client.chat(model, msgs, options={"temperature": 0, "num_predict": max_tokens, "seed": seed})
        text = reply.get("message", {}).get("content", "")
        expected = expected_answer(ex)
        answers.append(Answer(msgs[-1]["content"], expected, text, matches(text, expected), reply.get("done_reason", "")))
    return answers


def summarize(answers: list[Answer], min_score: float) -> dict[str, Any]:
    hits = sum(a.ok for a in answers)
    score = hits / len(answers) if answers else 0.0
    return {"hits": hits, "total": len(answers), "score": round(score, 4), "min_score": min_score,
            "passed": bool(answers) and score >= min_score,
            "stopped": sum(a.done_reason == "stop" for a in answers),
            "answers": [asdict(a) for a in answers]}


def check(summary: dict[str, Any], model: str) -> None:
    if not summary["total"]:
        raise VerifyError(f"{model}: no eval prompts to verify with; give data.eval or data.eval_split")
    if not summary["passed"]:
        raise VerifyError(
            f"{model}: {summary['hits']}/{summary['total']} expected answers came back "
            f"(score {summary['score']:.2f} < min_score {summary['min_score']:.2f})"
        )
