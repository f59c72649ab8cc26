"""The definition of the labels: a conversation in, token ids and labels out, loss on the assistant turns only.

Each conversation is rendered with the base model's own chat template. Loss falls on the assistant turns only (by
default), and each assistant turn's end-of-turn token is inside the loss, so the model learns to stop. An assistant turn
of weight 0 (OpenAI's "weight", LLaMA-Factory's "loss_weight": `Record.untrained`) stays in the text as context and out
of the loss, with train_on="all" too. A row that would train on nothing is an error naming it; one that trains on
nothing only because truncation cut its trained part away is a bad row of its own (`TrainsNothing`), which --on-bad-row
skip drops.

`tokenize_conversation` is the definition: the assistant span of turn i runs from the end of the conversation before
it (rendered with the generation prompt) to the end of the conversation through it, and a token is trained when it
starts inside a span (a chat that a format's own template does not render turn by turn has each turn found by
replacing it instead: `assistant_spans`). fast.py computes exactly that, faster, from the same pieces: the spans,
the tool check and `checked_labels`, which holds the errors both paths raise.

Rows with tools (the messages layout's "tools", "tool_calls" and "tool" turns) are rendered with `tools=` as
apply_chat_template renders them, and an assistant turn that calls tools is trained like any other assistant turn;
tool results and user turns are not. A chat template that renders no tool information is an error, not dropped
tools.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..templates import ChatFormat, TemplateMapping

IGNORE_INDEX = -100


class TrainsNothing(DataError):
    """A row that trains on nothing once tokenized (every trained token past max_seq_length): a bad row of its own,
    which --on-bad-row skip drops and lists, not an error of the whole dataset."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    mapping: TemplateMapping,
    max_seq_length: int,
    train_on: str = "assistant",
    source: str = "",
    tools: list[dict[str, Any]] | None = None,
    untrained: Collection[int] = (),
) -> Tokenized:
    """Render with the tokenizer's chat template (and the row's tools); label the assistant spans, tool-call turns
    included (end-of-turn included), but for the assistant turns in `untrained` (counted among assistant messages:
    those a message weight of 0 leaves out), which stay masked even with train_on="all"."""

    def render(msgs: list[dict[str, Any]], gen: bool, with_tools: list[dict[str, Any]] | None = tools) -> str:
        return tokenizer.apply_chat_template(msgs, tools=with_tools, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans, skipped = label_spans(messages, tools, untrained, full, render, mapping.format,
                                 getattr(tokenizer, "name_or_path", ""), source)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    labels = []
    for tok, (start, _end) in zip(ids, offsets, strict=True):
        if train_on == "all":
            trained = not any(s <= start < e for s, e in skipped)
        else:
            trained = any(s <= start < e for s, e in spans)
        labels.append(tok if trained else IGNORE_INDEX)
    eot_id = tokenizer.convert_tokens_to_ids(mapping.end_of_turn)
    return checked_labels(ids, labels, eot_id, mapping.end_of_turn, max_seq_length, source)


def checked_labels(ids: list[int], labels: list[int], eot_id: int | None, end_of_turn: str, max_seq_length: int,
                   source: str) -> Tokenized:
    """A labelled conversation, truncated to max_seq_length, once it passes the checks that keep a model from
    learning nothing: its end-of-turn token trained (else the model never learns to stop), and a trained token left
    after truncation."""
    if eot_id is None or eot_id not in labels:  # labels hold IGNORE_INDEX or the trained ids
        raise DataError(f"{source}: the end-of-turn token {end_of_turn!r} is not inside the trained span; "
                        "the model would never learn to stop")
    truncated = len(ids) > max_seq_length
    if truncated:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    _check_trains(labels, truncated, max_seq_length, source)
    return Tokenized(ids, labels, truncated)


def _check_trains(labels: list[Any], truncated: bool, max_seq_length: int, source: str) -> None:
    if labels.count(IGNORE_INDEX) == len(labels):
        raise TrainsNothing(f"{source}: no trainable tokens left" + (
            f" after truncation to data.max_seq_length={max_seq_length}: the trained part of the row lies past it "
            "(raise data.max_seq_length, or shorten the row)" if truncated else ""))


def label_spans(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, untrained: Collection[int],
                full: str, render: Callable[..., str], chat_format: ChatFormat | None, template_name: str,
                source: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The assistant spans of `full` (the conversation rendered, with its tools), split by weight: (trained, weight
    0). Raises the DataError naming `source` where the template drops the row's tools or does not render it turn by
    turn."""
    if reason := template_drops_tools(messages, tools, full, render, template_name):
        raise DataError(f"{source}: {reason}")
    return weighted_spans(assistant_spans(messages, full, render, chat_format, source), untrained)


def weighted_spans(spans: list[tuple[int, int]],
                   untrained: Collection[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The assistant spans split by their turn's weight: (trained, untrained)."""
    if not untrained:
        return spans, []
    return ([span for k, span in enumerate(spans) if k not in untrained],
            [span for k, span in enumerate(spans) if k in untrained])


def assistant_spans(messages: list[dict[str, Any]], full: str, render: Callable[..., str],
                    chat_format: ChatFormat | None, source: str) -> list[tuple[int, int]]:
    """The characters of `full` (the whole conversation, rendered) that are the assistant's: one [start, end) span
    for each assistant turn, its end-of-turn included.

    Turn by turn, where the template renders the conversation that way (ChatML, Llama 3, Gemma, Phi-4, every chat
    of a format on most chats): turn i runs from the end of the conversation before it, rendered with the
    generation prompt, to the end of the conversation through it (all of the template's closing after it: the
    end-of-turn, and whatever else the template writes there).

    A format whose own template changes earlier text as turns are added (`ChatFormat.turn_by_turn` False: Qwen3
    and DeepSeek-R1 drop the reasoning of earlier answers, and R1's generation prompt opens a think block its
    finished answers do not have; Phi-3 and Phi-4-mini write EOS after the final turn only; Mistral v3 moves the
    system prompt into the last user turn) is split by replacing each turn instead (`_replaced_turn_spans`), but only
    on a chat where the turn-by-turn rule fails, so every chat it labels keeps its labels. Any other template that
    does not render turn by turn is an error: it is not the format the Ollama model will be served with."""
    spans = _turn_by_turn_spans(messages, full, render)
    if spans is None and chat_format is not None and not chat_format.turn_by_turn:
        spans = _replaced_turn_spans(messages, full, render, chat_format)
    if spans is None:
        raise DataError(
            f"{source}: the chat template does not render this conversation turn by turn "
            "(an earlier turn changes when later ones are added), so the assistant span cannot be located"
        )
    return spans


def _turn_by_turn_spans(messages: list[dict[str, Any]], full: str,
                        render: Callable[..., str]) -> list[tuple[int, int]] | None:
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        # The conversation through its last turn is the whole conversation: one render fewer.
        through = full if i + 1 == len(messages) else render(messages[: i + 1], False)
        if not (through.startswith(prefix) and full.startswith(through)):
            return None
        spans.append((len(prefix), len(through)))
    return spans


def _replaced_turn_spans(messages: list[dict[str, Any]], full: str, render: Callable[..., str],
                         chat_format: ChatFormat) -> list[tuple[int, int]] | None:
    """Assistant spans found by replacing each assistant turn: the whole conversation is rendered again with turn i
    replaced by a bare answer (a character `full` does not hold: no reasoning, no tool calls), and where the two
    renderings differ (between their common prefix and common suffix) is what turn i wrote. The span then takes in,
    before it, what the template writes in the turn after the generation prompt (Qwen3's think block of the final
    answer, which the model writes itself), or else the whitespace between the prompt and the answer (Mistral's
    space after [/INST], which SentencePiece joins to the answer's first word); and after it, the turn's close
    (`ChatFormat.close("assistant")`, else its end-of-turn), or for the chat's last message all the template writes
    after it (Phi-3's EOS). So each turn is trained as the template renders it in this conversation: the final
    answer with its <think> block where the template writes one, earlier answers without the reasoning the template
    drops (DeepSeek-R1 drops it from every answer, the final one included, and so trains none). None where the
    turns overlap, an answer leaves no trace, or the template refuses the chat with a bare answer in a turn's place.

    TRL's `{% generation %}` assistant masks label the same characters where they render the same text (Phi-3's
    training template); its Qwen3 and DeepSeek-R1 training templates keep every answer's reasoning instead, a text
    these models' own templates (and Ollama's, which serves them) never write."""
    mark = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in full), None)
    if mark is None:
        return None
    close, end_of_turn = chat_format.close("assistant"), chat_format.stops[0]
    spans: list[tuple[int, int]] = []
    lo = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            replaced = render([*messages[:i], {"role": "assistant", "content": mark}, *messages[i + 1:]], False)
        except Exception:  # the template refuses the chat with a bare answer here (Mistral v3, for a tool-call turn)
            return None
        if mark not in replaced:
            return None
        start = _common_prefix(full, replaced)
        end = len(full) - _common_suffix(full, replaced, min(len(full), len(replaced)) - start)
        if start < lo:
            return None
        prompted, unprompted = render(messages[:i], True), render(messages[:i], False)
        opener = prompted[_common_prefix(prompted, unprompted):]
        at = full.rfind(opener, lo, start) if opener else -1
        if at >= 0:
            start = at + len(opener)
        else:
            while start > lo and full[start - 1].isspace():
                start -= 1
        if i + 1 == len(messages):
            end = len(full)
        elif close and full.startswith(close, end):
            end += len(close)
        elif full.startswith(end_of_turn, end):
            end += len(end_of_turn)
        spans.append((start, end))
        lo = end
    return spans


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (bisected: slices compare in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    """The length of the longest common suffix of a and b, at most `limit`."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def template_drops_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, full: str,
                         render: Callable[..., str], template_name: str) -> str | None:
    """Why this chat template cannot train on this row's tools: it renders the same text without the tool specs, or
    without the tool calls (so the model would learn from calls it never sees); None when it renders both."""
    where = f"the chat template of {template_name}" if template_name else "the tokenizer's chat template"
    fix = ("set data.chat_template=chatml-tools (ChatML with tool calls, which ftdeploy serves) to train them on "
           "this base, or use a base model whose chat template supports tools (Qwen2.5, Llama 3.1 and later), or drop "
           "the tool fields from the data")
    if tools and render(messages, False, None) == full:
        return f"the row carries tools, but {where} renders none of them (the same text with and without " \
               "`tools`); " + fix
    if any("tool_calls" in m for m in messages):
        without_calls = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        try:
            dropped = render(without_calls, False) == full
        except Exception:  # noqa: BLE001 - the template refuses the chat without its calls (Mistral's role order)
            dropped = False  # so it reads them
        if dropped:
            return f"the row has tool calls, but {where} does not render them (an assistant turn's `tool_calls` " \
                   "leave no text); " + fix
    return None


def tokenize_text(text: str, tokenizer: Any, max_seq_length: int, context_chars: int = 0,
                  source: str = "") -> Tokenized:
    """Continued pre-training: the whole text, then EOS, every token trained but those that start in the first
    `context_chars` characters (a plain prompt/completion row's prompt)."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=bool(context_chars))
    starts = [start for start, _end in enc["offset_mapping"]] if context_chars else None
    return text_tokens(enc["input_ids"], tokenizer.eos_token_id, max_seq_length, starts, context_chars, source)


def text_tokens(ids: list[int], eos_id: int | None, max_seq_length: int, starts: list[int] | None = None,
                context_chars: int = 0, source: str = "") -> Tokenized:
    """A text's token ids with EOS appended (as it is, None included), truncated, every token trained but those
    starting (`starts`: each token's first character) in the first `context_chars` characters."""
    with_eos: list[Any] = [*ids, eos_id]
    labels = list(with_eos)
    if context_chars:
        assert starts is not None, "a text with context gives its tokens' offsets"
        labels = [IGNORE_INDEX if start < context_chars else tok for tok, start in zip(ids, starts, strict=True)]
        labels.append(eos_id)
    truncated = len(with_eos) > max_seq_length
    with_eos, labels = with_eos[:max_seq_length], labels[:max_seq_length]
    if context_chars:
        _check_trains(labels, truncated, max_seq_length, source)
    return Tokenized(with_eos, labels, truncated)
