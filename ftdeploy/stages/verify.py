"""Verify stage: ask the served model the eval prompts at temperature 0 and count expected answers."""

from __future__ import annotations

from typing import Any

from ..errors import VerifyError
from ..formats import Record as Example
from ..ollama import OllamaClient
from ..results import Answer, ParityMismatch, TemplateParity, VerifySummary


def expected_answer(example: Example) -> str:
    if example.expect:
        return example.expect
    return example.messages[-1]["content"] if example.messages[-1]["role"] == "assistant" else ""


def matches(answer: str, expected: str, mode: str = "contains") -> bool:
    """The reply gives the expected answer (see fidelity.contains for the modes)."""
    from ..fidelity import contains

    return contains(answer, expected, mode)


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
        answers.append(Answer(msgs[-1]["content"], expected, text, matches(text, expected, ex.match),
                              reply.get("done_reason", "")))
    return answers


def summarize(answers: list[Answer], min_score: float) -> VerifySummary:
    hits = sum(a.ok for a in answers)
    score = hits / len(answers) if answers else 0.0
    return VerifySummary(hits=hits, total=len(answers), score=round(score, 4), min_score=min_score,
                         passed=bool(answers) and score >= min_score,
                         stopped=sum(a.done_reason == "stop" for a in answers), answers=list(answers))


def check(summary: VerifySummary, model: str) -> None:
    parity = summary.template_parity
    if parity and not parity.passed:
        first = parity.mismatches[0]
        raise VerifyError(
            f"{model}: the prompt Ollama builds from the Modelfile TEMPLATE differs from the training chat template "
            f"({len(parity.mismatches)}/{parity.checked} probe chats answer differently; e.g. raw "
            f"{first.raw[:60]!r} vs chat {first.chat_answer[:60]!r}). Suspect the TEMPLATE or the stop tokens."
        )
    unstopped = summary.total - summary.stopped
    if unstopped:
        raise VerifyError(
            f"{model}: {unstopped}/{summary.total} answers ran to the length limit instead of stopping; "
            "suspect the TEMPLATE or the PARAMETER stop tokens (the end-of-turn token is not ending answers)"
        )
    if not summary.total:
        raise VerifyError(f"{model}: no eval prompts to verify with; give data.eval or data.eval_split")
    if not summary.passed:
        raise VerifyError(
            f"{model}: {summary.hits}/{summary.total} expected answers came back "
            f"(score {summary.score:.2f} < min_score {summary.min_score:.2f})"
        )


PARITY_CHATS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "What is a river?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact about the sea."}],
]


def template_parity(client: OllamaClient, model: str, render: Any, strip_bos: str | None,
                    chats: list[list[dict[str, str]]], max_tokens: int = 24) -> TemplateParity:
    """Does Ollama build the prompt the training template builds? The same greedy answer from
    /api/chat and from /api/generate with the training-rendered prompt sent raw says it does.

    Each request unloads the model after it (keep_alive 0): with a warm KV cache the second request
    evaluates only the uncached suffix, and that different batching can flip a near-tie in greedy decoding."""
    mismatches = []
    options = {"temperature": 0, "num_predict": max_tokens, "seed": 0}
    client.generate(model, "", keep_alive=0)  # unload: start from a cold cache
    for chat in chats:
        prompt = render(chat, True)
        if strip_bos and prompt.startswith(strip_bos):
            prompt = prompt[len(strip_bos):]  # a template that writes BOS: the runner adds it itself
        raw = client.generate(model, prompt, raw=True, options=options, keep_alive=0).get("response", "")
        via_chat = client.chat(model, chat, options=options, keep_alive=0).get("message", {}).get("content", "")
        if raw.strip() != via_chat.strip():
            mismatches.append(ParityMismatch(chat=chat, raw=raw, chat_answer=via_chat))
    return TemplateParity(checked=len(chats), mismatches=mismatches, passed=not mismatches)
