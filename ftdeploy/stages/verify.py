"""Verify stage: is the served model the trained model? Ask every served quant the eval prompts at temperature 0,
compare its answers with the merged 16-bit model's, token by token (the default gate), and score both against the
eval references (gated where the rows carry `expect`, or where the user sets a threshold). Data without eval rows is
verified on a sample of its training prompts: served against merged only, since reference scoring needs eval rows;
raw-text data (no chats) on raw continuations of prefixes of its training texts (`verify_raw`).

Every prompt built here for the merged model or sent raw to Ollama carries the Modelfile's SYSTEM the way Ollama's
chat endpoint adds it (`with_system`), so the two sides compare the same prompt."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import Record as Example
from ..errors import VerifyError
from ..ollama import OllamaClient
from ..results import (
    Answer,
    ExportResult,
    ModelRole,
    ModelScore,
    ParityMismatch,
    PromptAgreement,
    TemplateParity,
    VerifyFailure,
    VerifySummary,
)

if TYPE_CHECKING:
    from ..config import VerifyConfig
    from ..fidelity import Generation

# The generation limit: the longest eval reference in tokens, times this, plus MARGIN_TOKENS. Room for an answer
# a little longer than its reference, and still a few seconds on a CPU when every answer runs on.
LIMIT_FACTOR = 1.5
# Greedy decoding as transformers does it, on the served side: temperature 0, and Ollama's default repeat penalty
# (1.1 over the last 64 tokens, the prompt's included) turned off. With it on, a served model that is the trained model
# still skips a word the prompt used ("Ben has 10 books..." became "The answer is..."): what is verified is the
# weights and the TEMPLATE, not Ollama's sampler defaults (the Modelfile keeps those as the user set them).
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
MARGIN_TOKENS = 8
NO_REFERENCE_LIMIT = 96  # eval rows without an assistant answer: a fixed limit, with no reference to size it from

# How a reply's tool calls read as text (TemplateMapping.tool_calls_text): an assistant turn that calls tools is
# compared, scored and shown as the format writes the calls, whether Ollama parsed them or a model generated them.
CallsText = Callable[[list[dict[str, Any]], str], str]


def expected_answer(example: Example) -> str:
    if example.expect:
        return example.expect
    return reference_answer(example)


def reference_answer(example: Example, calls_text: CallsText | None = None) -> str:
    """The eval row's own answer (its last assistant turn), or "" when it has none; a turn that calls tools reads
    as the format writes the calls."""
    msgs = example.messages or []
    if not msgs or msgs[-1]["role"] != "assistant":
        return ""
    return reply_text(msgs[-1], calls_text)


def reply_text(message: dict[str, Any], calls_text: CallsText | None = None) -> str:
    """An assistant message as text: its content, and its tool calls as the format writes them."""
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if not calls:
        return content
    if calls_text is None:
        import json

        return (content + "\n" if content else "") + json.dumps([c.get("function", c) for c in calls])
    return calls_text(calls, content)


def matches(answer: str, expected: str, mode: str = "contains") -> bool:
    """The reply gives the expected answer (see fidelity.contains for the modes)."""
    from ..fidelity import contains

    return contains(answer, expected, mode)


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The chat as Ollama's /api/chat builds it for a Modelfile with SYSTEM `system`: the SYSTEM goes first, unless
    the chat opens with a system message of its own (which then replaces it)."""
    if system and (not messages or messages[0].get("role") != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def prompt_messages(example: Example) -> list[dict[str, str]]:
    msgs = example.messages or []
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs


def generation_limit(reference_tokens: list[int], override: int = 0) -> int:
    """verify.max_tokens when set, else from the references' lengths in tokens (with a margin)."""
    if override:
        return override
    longest = max(reference_tokens, default=0)
    return math.ceil(longest * LIMIT_FACTOR) + MARGIN_TOKENS if longest else NO_REFERENCE_LIMIT


def ask_all(client: OllamaClient, model: str, examples: list[Example], max_tokens: int, seed: int = 0,
            calls_text: CallsText | None = None, references: bool = True) -> list[Answer]:
    """Each eval prompt through /api/chat, with the row's tools declared; a reply Ollama parsed into
    message.tool_calls is read back as the format writes the calls (`calls_text`). `references` False (training
    prompts): the replies are not scored against the rows' answers."""
    answers = []
    for ex in examples:
        msgs = prompt_messages(ex)
        reply = client.chat(model, msgs, options={**GREEDY, "num_predict": max_tokens, "seed": seed},
                            tools=ex.tools)
        text = reply_text(reply.get("message", {}), calls_text)
        expected = expected_answer(ex) if references else ""
        answers.append(Answer(prompt=msgs[-1]["content"], expected=expected, answer=text,
                              ok=bool(expected) and matches(text, expected, ex.match),
                              done_reason=reply.get("done_reason", ""), gated=references and bool(ex.expect)))
    return answers


def summarize(answers: list[Answer], min_score: float) -> VerifySummary:
    """The served model's answers against the references. `passed` here is the expected-answer gate alone (rows with
    `expect`); the verify stage sets the verdict of every check."""
    hits = sum(a.ok for a in answers)
    score = hits / len(answers) if answers else 0.0
    gated = [a for a in answers if a.gated]
    expect_hits = sum(a.ok for a in gated)
    return VerifySummary(hits=hits, total=len(answers), score=round(score, 4), min_score=min_score,
                         passed=bool(answers) and (not gated or expect_hits / len(gated) >= min_score),
                         stopped=sum(a.done_reason == "stop" for a in answers), answers=list(answers),
                         expect_rows=len(gated), expect_hits=expect_hits)


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def followed_to_the_stop(p: PromptAgreement) -> bool:
    """The merged model stopped, and this answer repeated every token of its answer up to that stop: the one place
    where whether the served model stops says something about its stop tokens. An answer that went its own way
    earlier (a quant's near-tie) ends where its own text ends."""
    return p.merged_stopped and p.prefix >= p.length - 1


def missed_stops(m: ModelScore) -> int:
    """Prompts where this model repeated the merged model's answer to its stop, and then ran on instead."""
    return sum(followed_to_the_stop(p) and not p.served_stopped for p in m.prompts)


def failures(summary: VerifySummary, model: str) -> list[VerifyFailure]:
    """Every check the summary fails, first the ones that explain the others (no prompts, the template)."""
    if not summary.total:
        message = "no eval prompts to verify with; give data.eval or data.eval_split"
        if summary.raw:
            message = ("no prompts to verify with: the data is raw text (no chats) with no eval rows, and the data "
                       "stage's sample of it holds no text with a usable prefix to continue (data prepared before "
                       "verify sampled raw text holds none: run `ftdeploy data` again)")
        elif summary.prompt_source == "train":
            message = ("no prompts to verify with: the data has no eval rows and no training chat ending on an "
                       "assistant turn was sampled (data prepared by an older ftdeploy: run `ftdeploy data` again)")
        return [VerifyFailure(check="no_prompts", model=model, message=message)]
    found = []
    parity = summary.template_parity
    if parity and not parity.passed:
        first = parity.mismatches[0]
        found.append(VerifyFailure(
            check="template_parity", model=model,
            message=f"the prompt Ollama builds from the Modelfile TEMPLATE differs from the training chat template "
                    f"({len(parity.mismatches)}/{parity.checked} probe chats answer differently). Suspect the TEMPLATE "
                    "or the stop tokens.",
            example=f"raw {_short(first.raw, 60)} vs chat {_short(first.chat_answer, 60)}"))
    merged = summary.model("merged")
    for m in summary.models:
        if m.role not in ("served", "tag") or not m.gated or not m.tag:
            continue
        followed = sum(followed_to_the_stop(p) for p in m.prompts)
        missed = missed_stops(m)
        if missed and 2 * missed > followed:
            i = next(i for i, p in enumerate(m.prompts) if followed_to_the_stop(p) and not p.served_stopped)
            found.append(VerifyFailure(
                check="stops", model=m.tag, quant=m.quant,
                message=f"{missed}/{followed} answers ran to the length limit ({summary.max_tokens} tokens) "
                        "where the merged model stopped, after repeating its answer up to that stop; suspect the "
                        "TEMPLATE or the PARAMETER stop tokens (the end-of-turn token is not ending answers)",
                example=_example(summary, m, merged, i)))
        if m.token_agreement is not None and m.token_agreement < summary.min_agreement:
            i = min(range(len(m.prompts)), key=lambda k: m.prompts[k].ratio)
            found.append(VerifyFailure(
                check="agreement", model=m.tag, quant=m.quant,
                message=f"it picked the merged 16-bit model's token at {m.token_agreement:.0%} of greedy steps, "
                        f"counted up to each answer's first difference (verify.min_agreement "
                        f"{summary.min_agreement:.0%}): this is not the model as trained; suspect the quant (try a "
                        "larger one), the conversion or the TEMPLATE",
                example=_example(summary, m, merged, i)))
    pref = summary.preference
    if pref is not None and pref.agreement is not None and pref.agreement < summary.min_agreement:
        found.append(VerifyFailure(
            check="preference", model=model, quant=(summary.model("served") or ModelScore()).quant,
            message=f"at the first token where chosen and rejected answers differ, the served model ranked them as "
                    f"the merged 16-bit model does on {pref.agreement:.0%} of {pref.pairs} pairs (verify.min_agreement "
                    f"{summary.min_agreement:.0%}): the preference did not survive the export; suspect the quant (try "
                    "a larger one), the conversion or the TEMPLATE"))
    served = summary.model("served")
    if summary.expect_rows and summary.expect_hits / summary.expect_rows < summary.min_score:  # None: not measured
        miss = next(a for a in summary.answers if a.gated and not a.ok)
        found.append(VerifyFailure(
            check="expected_answers", model=model, quant=served.quant if served else None,
            message=f"{summary.expect_hits}/{summary.expect_rows} expected answers came back "
                    f"(score {summary.expect_hits / summary.expect_rows:.2f} < min_score {summary.min_score:.2f})",
            example=f"{_short(miss.prompt, 50)} expected {_short(miss.expected, 30)}, got {_short(miss.answer, 60)}"))
    if summary.min_chrf is not None and served and served.chrf is not None and served.chrf < summary.min_chrf:
        found.append(VerifyFailure(
            check="chrf", model=model, quant=served.quant,
            message=f"chrF {served.chrf:.1f} against the eval references < verify.min_chrf {summary.min_chrf:.1f}",
            example=f"{_short(summary.answers[0].prompt, 50)} -> {_short(summary.answers[0].answer, 60)}"))
    return found


def served_agreement(tokens: Callable[[str], list[int]], replies: list[Answer],
                     merged: list[Generation]) -> dict[str, Any]:
    """ModelScore fields: how far each served reply follows the merged model's greedy answer, in the merged
    model's tokens (fidelity.agreement_scores)."""
    from ..fidelity import agreement_scores, prompt_agreement

    return agreement_scores([prompt_agreement(tokens(a.answer.strip()), a.done_reason == "stop", tokens(g.text),
                                              g.stopped) for a, g in zip(replies, merged, strict=True)])


# Raw-text data with no eval rows: verify continues a prefix of each sampled training text (a plain prompt/completion
# row's prompt; of a text row its first half of tokens, at most RAW_PREFIX_TOKENS), served against merged.
RAW_PREFIX_TOKENS = 64
TOOL_PARITY_TOKENS = 64  # parity's answer limit on a chat with tools: an unfinished call is held back by Ollama
RAW_LIMIT_TOKENS = 64  # the continuation limit, unless verify.max_tokens sets one: long texts would run long on a CPU


def raw_prefixes(examples: list[Example], tokens: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str]) -> tuple[list[str], list[int]]:
    """The prefixes verify continues, and the length in tokens of the text after each (for the generation limit).
    A text too short to split, or a prompt of whitespace, gives none."""
    prefixes, rest = [], []
    for ex in examples:
        text = ex.text or ""
        if ex.context_chars:  # a plain prompt/completion row: its prompt, as trained
            prefix, after = text[: ex.context_chars], len(tokens(text[ex.context_chars:]))
        else:
            ids = tokens(text)
            cut = min(len(ids) // 2, RAW_PREFIX_TOKENS)
            prefix, after = decode(ids[:cut]) if cut else "", len(ids) - cut
        if prefix.strip():
            prefixes.append(prefix)
            rest.append(after)
    return prefixes, rest


def ask_raw(client: OllamaClient, model: str, prefixes: list[str], max_tokens: int, seed: int = 0) -> list[Answer]:
    """Each prefix through /api/generate with raw=True (no TEMPLATE, no SYSTEM) at temperature 0; not scored."""
    answers = []
    for prefix in prefixes:
        reply = client.generate(model, prefix, raw=True,
                                options={**GREEDY, "num_predict": max_tokens, "seed": seed})
        answers.append(Answer(prompt=prefix, answer=reply.get("response") or "",
                              done_reason=reply.get("done_reason") or ""))
    return answers


def verify_raw(client: OllamaClient, name: str, tags: dict[str, str], served: str, merged_dir: Path,
               examples: list[Example], cfg: VerifyConfig, seed: int, exported: ExportResult) -> VerifySummary:
    """Raw-text data with no eval rows: each served quant's greedy continuations of prefixes of the sampled training
    texts against the merged 16-bit model's, gated by verify.min_agreement as the chat prompts are. Template parity
    does not apply (raw prompts bypass the TEMPLATE) and is not checked; nor is forgetting (chat prompts)."""
    from ..fidelity import HFModel, score

    summary = VerifySummary(min_score=cfg.min_score, min_agreement=cfg.min_agreement, prompt_source="train", raw=True)
    merged = HFModel(merged_dir) if examples else None
    prefixes, rest = raw_prefixes(examples, merged.tokens, merged.tokenizer.decode) if merged else ([], [])
    if merged is None or not prefixes:
        return summary
    limit = cfg.max_tokens or min(generation_limit(rest), RAW_LIMIT_TOKENS)
    merged_gen = merged.continue_texts(prefixes, [limit] * len(prefixes))
    merged.model = None  # the tokenizer stays: the agreement is counted in its tokens
    merged_replies, nothing = [g.text for g in merged_gen], [""] * len(prefixes)
    answers = ask_raw(client, name, prefixes, limit, seed)
    summary = summarize(answers, cfg.min_score)
    summary.raw, summary.prompt_source, summary.prompts, summary.max_tokens = True, "train", prefixes, limit
    summary.min_agreement, summary.min_chrf = cfg.min_agreement, cfg.min_chrf
    summary.models.append(ModelScore(role="merged", label="merged", replies=merged_replies,
                                     stopped=sum(g.stopped for g in merged_gen), **score(merged_replies, nothing)))
    for tag, qtype in [(name, served), *tags.items()]:
        replies = answers if tag == name else ask_raw(client, tag, prefixes, limit, seed)
        role: ModelRole = "served" if tag == name else "tag"
        texts, fidelity = [a.answer for a in replies], exported.fidelity.get(qtype, {})
        m = ModelScore(role=role, label=f"{qtype} (served as {name})" if role == "served" else f"{qtype} ({tag})",
                       quant=qtype, tag=tag, replies=texts, stopped=sum(a.done_reason == "stop" for a in replies),
                       gated=role == "served" or qtype not in exported.flagged,
                       **score(texts, nothing, merged_replies),
                       top1_agreement=fidelity.get("top1_agreement"), ppl_ratio=fidelity.get("ppl_ratio"),
                       **served_agreement(merged.tokens, replies, merged_gen))
        if m.gated:
            m.passed = m.token_agreement is not None and m.token_agreement >= cfg.min_agreement
        summary.models.append(m)
    summary.failures = failures(summary, name)
    return summary


def _example(summary: VerifySummary, m: ModelScore, merged: ModelScore | None, i: int) -> str:
    prompt = summary.prompts[i] if i < len(summary.prompts) else ""
    mine = m.replies[i] if i < len(m.replies) else ""
    theirs = merged.replies[i] if merged and i < len(merged.replies) else ""
    p = m.prompts[i]
    return (f"{_short(prompt, 50)}: merged {_short(theirs, 60)}{' (stopped)' if p.merged_stopped else ''}, "
            f"served {_short(mine, 60)}{' (stopped)' if p.served_stopped else ' (ran on)'}")


def check(summary: VerifySummary, model: str) -> None:
    """Raise VerifyError naming each failed check, its model and quant, with one example apiece."""
    found = summary.failures or failures(summary, model)
    if not found:
        return
    lines = [f"{model}: verify failed ({', '.join(dict.fromkeys(f.check for f in found))})"]
    for f in found:
        who = f"{f.model}" + (f" ({f.quant})" if f.quant else "")
        lines.append(f"  {f.check}: {who}: {f.message}" + (f"\n    e.g. {f.example}" if f.example else ""))
    if summary.unverified:
        moved = ", ".join(f"{a} -> {b}" for a, b in summary.unverified.items())
        lines.append(f"  moved to a name that says so: {moved} (register again, or `ftdeploy train-and-serve`, "
                     "to serve it under its own name)")
    raise VerifyError("\n".join(lines))


def unverified_name(name: str) -> str:
    """Where a model that failed verification goes: `demo` -> `demo-unverified`, `demo:q8_0` ->
    `demo-unverified:q8_0`."""
    base, _, tag = name.partition(":")
    return f"{base}-unverified:{tag}" if tag else f"{base}-unverified"


PARITY_CHATS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is a river?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact about the sea."}],
]


# Tool-call and tool-result chats, asked where the Modelfile serves tools: the request declares a tool, and the
# second chat carries an assistant turn that called it and the tool's answer.
PARITY_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_tide", "description": "The next high tide at a harbour.",
    "parameters": {"type": "object", "properties": {"harbour": {"type": "string", "description": "Harbour name"}},
                   "required": ["harbour"]}}}
PARITY_TOOL_CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "When is high tide at Porthleven?"}], "tools": [PARITY_TOOL]},
    {"messages": [{"role": "user", "content": "When is high tide at Porthleven?"},
                  {"role": "assistant", "content": "",  # a nine-character id, as Mistral's templates require
                   "tool_calls": [{"id": "tide00001",
                                   "function": {"name": "get_tide", "arguments": {"harbour": "Porthleven"}}}]},
                  {"role": "tool", "content": "{\"harbour\": \"Porthleven\", \"high_tide\": \"14:32\"}",
                   "tool_name": "get_tide", "tool_call_id": "tide00001"}],
     "tools": [PARITY_TOOL]},
]


def _answer(reply: Any, text_key: str, calls_text: CallsText | None = None) -> str:
    """A reply's text. A reasoning model's thinking, which Ollama splits off on both endpoints, goes first in its
    tags: a few greedy tokens may all be thinking, and two empty answers would agree about nothing. Tool calls that
    Ollama parsed out of the answer are written back as the format writes them."""
    thinking = reply.get("thinking") or ""
    text = reply_text({"content": reply.get(text_key), "tool_calls": reply.get("tool_calls")}, calls_text)
    return f"<think>{thinking}</think>{text}" if thinking else text


def chat_parts(chat: list[dict[str, Any]] | dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A parity chat's messages and tools: a plain list of messages, or {"messages": [...], "tools": [...]}."""
    if isinstance(chat, dict):
        return chat["messages"], chat.get("tools")
    return chat, None


def template_parity(client: OllamaClient, model: str, render: Any, strip_bos: str | None,
                    chats: list[Any], max_tokens: int = 24, calls_text: CallsText | None = None,
                    system: str | None = None) -> TemplateParity:
    """Does Ollama build the prompt the training template builds? The same greedy answer from
    /api/chat and from /api/generate with the training-rendered prompt sent raw says it does. The raw prompt is
    the chat as the served model receives it: with the Modelfile's SYSTEM (`system`) where the chat has none.

    A warm KV cache changes what a request evaluates (only the uncached suffix, in a different batch), and that can
    flip a near-tie in greedy decoding; so both sides must meet the same cache states. The model is unloaded, the raw
    prompts go in order, it is unloaded again, the chats go in the same order: when the prompts are the same, the two
    sequences of requests are token for token the same, cache reuse included, and so must their answers be. Two
    loads, not one per request."""
    from ..templates import training_messages

    def options(tools: Any) -> dict[str, Any]:  # a tool call is longer than a few words: room for it to close
        return {**GREEDY, "num_predict": max(max_tokens, TOOL_PARITY_TOKENS) if tools else max_tokens, "seed": 0}

    prompts, probed = [], []
    for chat in chats:
        messages, tools = chat_parts(chat)
        messages = with_system(messages, system)
        try:
            prompt = render(training_messages(messages), True, tools=tools) if tools else render(messages, True)
        except Exception:  # noqa: BLE001 - the training template refuses this chat (Gemma 2: a system role)
            continue
        if strip_bos and prompt.startswith(strip_bos):
            prompt = prompt[len(strip_bos):]  # a template that writes BOS: the runner adds it itself
        prompts.append(prompt)
        probed.append(chat)
    chats = probed
    client.generate(model, "", keep_alive=0)  # unload: start from a cold cache
    raws = [_answer(client.generate(model, p, raw=True, options=options(chat_parts(c)[1])), "response")
            for p, c in zip(prompts, chats, strict=True)]
    client.generate(model, "", keep_alive=0)
    via_chat = []
    for chat in chats:
        messages, tools = chat_parts(chat)
        reply = client.chat(model, messages, options=options(tools), tools=tools)
        via_chat.append(_answer(reply.get("message", {}), "content", calls_text))
    mismatches = [ParityMismatch(chat=chat_parts(chat)[0], raw=raw, chat_answer=answer)
                  for chat, raw, answer in zip(chats, raws, via_chat, strict=True)
                  if _parity_text(raw, chat) != _parity_text(answer, chat)]
    return TemplateParity(checked=len(chats), mismatches=mismatches, passed=not mismatches)


def _parity_text(answer: str, chat: Any) -> str:
    """An answer as parity compares it. With tools declared, without whitespace: Ollama parses a tool call and the chat
    side is written back from the parsed JSON (`{"a":"b"}` where the model wrote `{"a": "b"}`), so spacing inside a
    call is Ollama's, not the model's; what the model chose (names, arguments, their order) still counts."""
    return re.sub(r"\s+", "", answer) if chat_parts(chat)[1] else answer.strip()


GENERAL_TOKENS = 32  # the general-knowledge answers (forgetting): a short fact each, in its first sentence


class Laps:
    """Seconds spent per part of verify, for the manifest: `lap(what)` charges the time since the last lap."""

    def __init__(self) -> None:
        import time

        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter
        self._last = self._clock()

    def __call__(self, what: str) -> None:
        now = self._clock()
        self.seconds[what] = round(self.seconds.get(what, 0.0) + now - self._last, 2)
        self._last = now


class _Local:
    """The merged model's (and, with verify.compare, the base's) answers to the prompts and the general prompts."""

    def __init__(self, merged_dir: Path, base: Path | str | None, chats: list[list[dict[str, Any]]],
                 references: list[str], tools: list[Any], max_tokens: int, lap: Laps) -> None:
        from ..fidelity import HFModel, general_prompts

        general = general_prompts()
        self.general_chats, self.general_expected = [g["messages"] for g in general], [g["expect"] for g in general]
        # The merged model once: the generation limit from its tokenizer, then the eval and general prompts in one
        # batch. The base the same way, after the merged model is freed (two models at once would double memory).
        merged = HFModel(merged_dir)
        self.limit = generation_limit([len(merged.tokens(r)) for r in references if r], max_tokens)
        limits = [self.limit] * len(chats) + [GENERAL_TOKENS] * len(self.general_chats)
        all_tools = tools + [None] * len(self.general_chats)
        lap("load merged")
        merged_all = merged.generate(chats + self.general_chats, limits, all_tools)
        self.merged_gen: list[Generation] = merged_all[: len(chats)]
        self.tuned_general = [g.text for g in merged_all[len(chats):]]
        self.merged_replies = [g.text for g in self.merged_gen]
        merged.model = None  # the tokenizer stays: the agreement is counted in its tokens
        self.tokens = merged.tokens
        lap("merged answers")
        self.base_replies: list[str] | None = None
        self.base_general: list[str] | None = None
        if base is not None:
            base_model = HFModel(base)
            lap("load base")
            base_all = [g.text for g in base_model.generate(chats + self.general_chats, limits, all_tools)]
            self.base_replies, self.base_general = base_all[: len(chats)], base_all[len(chats):]
            del base_model
            lap("base answers")


def verify_chats(client: OllamaClient, name: str, tags: dict[str, str], served: str, exported: ExportResult,
                 merged_dir: Path, base: Path | str | None, examples: list[Example], on_eval: bool,
                 system: str | None, cfg: VerifyConfig, seed: int, lap: Laps) -> VerifySummary:
    """Chat data: each served quant's greedy answers to the prompts against the merged 16-bit model's (the default
    gate), template parity, the references (eval rows only: `on_eval`), and forgetting against the `base` (None:
    verify.compare is off). The merged model and the parity check get each prompt with the Modelfile's SYSTEM, as
    Ollama adds it."""
    from ..chat_template import mapping_for_template, read_chat_template

    # The Modelfile's format: how a reply's tool calls read as text, on every side of the comparison.
    chat_template = read_chat_template(merged_dir)
    mapping = mapping_for_template(chat_template, f"{merged_dir} chat template")
    calls_text = mapping.tool_calls_text if mapping.tools else None
    chats = [with_system(prompt_messages(e), system) for e in examples]  # as the served model receives them
    references = [reference_answer(e, calls_text) for e in examples]  # training answers: only for the limit
    lap("setup")
    local = _Local(merged_dir, base, chats, references, [e.tools for e in examples], cfg.max_tokens, lap)

    parity_chats = [*PARITY_CHATS, *(PARITY_TOOL_CHATS if mapping.tools else [])]
    parity = template_parity(client, name, chat_template.renderer(),
                             chat_template.bos if mapping.format.bos_in_template else None, parity_chats,
                             calls_text=calls_text, system=system)
    lap("template parity")
    limit = local.limit
    answers = ask_all(client, name, examples, limit, seed, calls_text, references=on_eval)
    lap("served answers")
    tag_answers = {tag: ask_all(client, tag, examples, limit, seed, calls_text, references=on_eval) for tag in tags}
    lap("other quants")

    summary = summarize(answers, cfg.min_score)
    summary.template_parity, summary.max_tokens = parity, limit
    summary.min_agreement, summary.min_chrf = cfg.min_agreement, cfg.min_chrf
    summary.prompts, summary.references = [c[-1]["content"] for c in chats], references if on_eval else []
    summary.prompt_source, summary.system = "eval" if on_eval else "train", system
    _score_models(summary, local, examples, on_eval, references,
                  [(name, served, answers), *((t, q, tag_answers[t]) for t, q in tags.items())], name, exported)
    lap("scoring")
    summary.seconds = lap.seconds
    for m in summary.models:
        if m.gated:
            m.passed = m.token_agreement is not None and m.token_agreement >= summary.min_agreement
    summary.failures = failures(summary, name)
    return summary


def _score_models(summary: VerifySummary, local: _Local, examples: list[Example], on_eval: bool,
                  references: list[str], served: list[tuple[str, str, list[Answer]]], name: str,
                  exported: ExportResult) -> None:
    """The base's, the merged model's and each served quant's scores, and forgetting, into `summary`."""
    from ..fidelity import forgetting, score
    from ..results import Forgetting, ForgettingItem

    expected = [expected_answer(e) if on_eval else "" for e in examples]
    modes = [e.match if on_eval else "contains" for e in examples]
    scored = references if on_eval else None
    merged_replies = local.merged_replies
    if local.base_replies is not None:
        summary.models.append(ModelScore(role="base", label="base", replies=local.base_replies,
                                         **score(local.base_replies, expected, merged_replies, modes, scored)))
    summary.models.append(ModelScore(role="merged", label="merged", replies=merged_replies,
                                     stopped=sum(g.stopped for g in local.merged_gen),
                                     **score(merged_replies, expected, None, modes, scored)))
    for tag, qtype, replies in served:
        texts = [a.answer for a in replies]
        role: ModelRole = "served" if tag == name else "tag"
        label = f"{qtype} (served as {name})" if role == "served" else f"{qtype} ({tag})"
        fidelity: dict[str, Any] = exported.fidelity.get(qtype, {})
        summary.models.append(ModelScore(
            role=role, label=label, quant=qtype, tag=tag, replies=texts,
            stopped=sum(a.done_reason == "stop" for a in replies),
            gated=role == "served" or qtype not in exported.flagged,
            **score(texts, expected, merged_replies, modes, scored),
            **{k: fidelity[k] for k in ("top1_agreement", "ppl_ratio") if k in fidelity},
            **served_agreement(local.tokens, replies, local.merged_gen)))
    if local.base_general is not None:
        items = [ForgettingItem(prompt=c[-1]["content"], expect=e, base=b, tuned=t)
                 for c, e, b, t in zip(local.general_chats, local.general_expected, local.base_general,
                                       local.tuned_general, strict=True)]
        summary.forgetting = Forgetting(**forgetting(local.base_general, local.tuned_general, local.general_expected),
                                        items=items)
