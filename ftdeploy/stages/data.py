"""Data stage: chat JSONL in, tokenized examples with assistant-only labels out.

Each conversation is rendered with the base model's own chat template. Loss falls on the
assistant turns only (by default), and each assistant turn's end-of-turn token is inside the
loss, so the model learns to stop. An assistant turn of weight 0 (OpenAI's "weight", LLaMA-Factory's "loss_weight":
`Record.untrained`) stays in the text as context and out of the loss, with train_on="all" too. A row that would
train on nothing is an error naming it.

`tokenize_conversation` is the definition of the labels: the assistant span of turn i runs from
the end of the conversation before it (rendered with the generation prompt) to the end of the
conversation through it, and a token is trained when it starts inside a span (a chat that a format's own template
does not render turn by turn has each turn found by replacing it instead: `assistant_spans`). The data stage
computes exactly that, faster (`tokenize_records`): the same compiled template without
apply_chat_template's per-call overhead, the tokenizer's Rust backend over many rows at once on a
thread of its own, and the labels by bisecting the token starts; the records stream from the
source to train.jsonl, so memory stays flat in the rows. The first rows are also done the
definition's way, and any difference sends the whole dataset down that exact slow path.

Rows with tools (the messages layout's "tools", "tool_calls" and "tool" turns) are rendered with `tools=` as
apply_chat_template renders them, and an assistant turn that calls tools is trained like any other assistant turn;
tool results and user turns are not. The fast path renders them the same way, and its first GUARD_ROWS rows with
tools, wherever they come in the file, are also done the definition's way: one difference sends every later row
with tools down the exact path. A chat template that renders no tool information is an error, not dropped tools.
"""

from __future__ import annotations

import array
import bisect
import itertools
import json
import logging
import random
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from ..config import DEMO_DATA, DataConfig
from ..errors import DataError
from ..formats import Columns, LoadResult, Record, RecordStream, load_records
from ..runs import atomic_path
from ..templates import ChatFormat, TemplateMapping

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BATCH_ROWS = 512  # rows rendered, then tokenized together on the backend's threads
GUARD_ROWS = 64  # first rows done both ways; one difference and the exact slow path does them all


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class DataStats:
    rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    max_length: int = 0
    layout: str = ""
    bad_rows: list[str] = field(default_factory=list)

    def add(self, tok: Tokenized) -> None:
        self.rows += 1
        self.truncated += tok.truncated
        self.total_tokens += len(tok.input_ids)
        self.trained_tokens += len(tok.labels) - tok.labels.count(IGNORE_INDEX)
        self.max_length = max(self.max_length, len(tok.input_ids))

    @property
    def mean_length(self) -> float:
        return round(self.total_tokens / self.rows, 1) if self.rows else 0.0


def demo_path(split: str) -> Path:
    return Path(str(resources.files("ftdeploy.demo").joinpath(f"{split}.jsonl")))


def resolve_data_path(spec: str, split: str = "train") -> Path:
    return demo_path(split) if spec == DEMO_DATA else Path(spec).expanduser()


def read_records(cfg: DataConfig, spec: str, split: str = "train") -> LoadResult:
    """Load `spec` with the data config's layout, columns, system prompt and bad-row policy."""
    # The spec as typed (not normalised through Path, which drops a leading ./): formats decides
    # from it whether this is a local path or a Hub id.
    source = str(demo_path(split)) if spec == DEMO_DATA else spec
    columns = Columns(**cfg.columns) if cfg.columns else Columns()
    return load_records(source, cfg.format, columns, cfg.on_bad_row, cfg.system_prompt, cfg.hub_config, cfg.split,
                       cfg.max_row_bytes)


def stream_records(cfg: DataConfig, spec: str, split: str = "train") -> RecordStream:
    """`read_records` as a stream: the same records and errors, read as they are used."""
    source = str(demo_path(split)) if spec == DEMO_DATA else spec
    columns = Columns(**cfg.columns) if cfg.columns else Columns()
    return RecordStream(source, cfg.format, columns, cfg.on_bad_row, cfg.system_prompt, cfg.hub_config, cfg.split,
                       cfg.max_row_bytes)


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
    if reason := template_drops_tools(messages, tools, full, render, getattr(tokenizer, "name_or_path", "")):
        raise DataError(f"{source}: {reason}")
    spans, skipped = weighted_spans(assistant_spans(messages, full, render, mapping.format, source), untrained)
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
    trained_ids = {t for t in labels if t != IGNORE_INDEX}
    if eot_id not in trained_ids:
        raise DataError(
            f"{source}: the end-of-turn token {mapping.end_of_turn!r} is not inside the trained span; "
            "the model would never learn to stop"
        )
    truncated = len(ids) > max_seq_length
    if truncated:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError(
            f"{source}: no trainable tokens left"
            + (f" after truncation to max_seq_length={max_seq_length}" if truncated else "")
        )
    return Tokenized(ids, labels, truncated)


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


def tokenize_text(text: str, tokenizer: Any, max_seq_length: int) -> Tokenized:
    """Continued pre-training: the whole text, then EOS, every token trained."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(ids) > max_seq_length
    ids = ids[:max_seq_length]
    return Tokenized(ids, list(ids), truncated)


# ---------------------------------------------------------------- many records at once


Outcome = Tokenized | BaseException  # what a record gives: its tokens, or the error tokenizing it raises


def tokenize_records(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, max_seq_length: int,
                     train_on: str = "assistant") -> Iterator[tuple[Record, Tokenized]]:
    """`tokenize_conversation` / `tokenize_text` for every record, in order, many at a time; the first record whose
    tokenization fails raises its error here, after the records before it.

    Exact by construction (the same compiled chat template with the same variables, the same Rust tokenizer with the
    same settings, the same rule for labels), and checked: the first GUARD_ROWS records are also tokenized one by one
    through apply_chat_template, and if any result differs (a template or tokenizer the fast path does not reproduce),
    every record is tokenized that way."""
    it = iter(records)

    def exact(rec: Record) -> Tokenized:
        if rec.text is not None:
            return tokenize_text(rec.text, tokenizer, max_seq_length)
        assert rec.messages is not None, "a record holds text or messages"
        return tokenize_conversation(rec.messages, tokenizer, mapping, max_seq_length, train_on, rec.source,
                                     rec.tools, rec.untrained)

    fast = _FastTokenizer.create(tokenizer, mapping, max_seq_length, train_on, exact)
    if fast is not None:
        head = list(itertools.islice(it, GUARD_ROWS))
        expected = [_outcome(exact, rec) for rec in head]
        for rec, want, got in zip(head, expected, fast.run(head), strict=True):
            if not _same(want, got):
                log.warning("%s: the fast data path differs from apply_chat_template here (%s); preparing every row "
                            "the exact slow way", rec.source, _describe(want, got))
                fast = None
                break
        for rec, outcome in zip(head, expected, strict=True):
            yield rec, _result(outcome)
    if fast is None:
        for rec in it:
            yield rec, exact(rec)
        return
    yield from fast.stream(it)


def _outcome(fn: Callable[[Record], Tokenized], rec: Record) -> Outcome:
    try:
        return fn(rec)
    except Exception as exc:  # kept to be compared, then raised in its place in the order
        return exc


def _result(outcome: Outcome) -> Tokenized:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _same(a: Outcome, b: Outcome) -> bool:
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b) and str(a) == str(b)
    return a == b


def _describe(want: Outcome, got: Outcome) -> str:
    if isinstance(want, BaseException) or isinstance(got, BaseException):
        return f"expected {want!r}, got {got!r}"
    return f"expected {len(want.input_ids)} tokens, {want.labels.count(IGNORE_INDEX)} masked; got " \
           f"{len(got.input_ids)} tokens, {got.labels.count(IGNORE_INDEX)} masked"


def _with_tools(rec: Record) -> bool:
    """Whether a conversation uses tools: tool specs, tool calls or tool results."""
    return bool(rec.tools) or any("tool_calls" in m or m["role"] == "tool" for m in rec.messages or ())


def _token_runs(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> Iterator[slice]:
    """The tokens that start inside the character spans, as runs of token indices."""
    if not spans:
        return
    starts = [start for start, _end in offsets]
    if starts == sorted(starts):
        # Token starts in order: the tokens starting inside [s, e) are one run, found by bisection.
        for s, e in spans:
            a = bisect.bisect_left(starts, s)
            yield slice(a, bisect.bisect_left(starts, e, a))
        return
    for i, start in enumerate(starts):
        if any(s <= start < e for s, e in spans):
            yield slice(i, i + 1)


@dataclass
class _Item:
    """A record rendered and ready for the tokenizer."""

    record: Record
    text: str | None = None  # what the tokenizer reads
    spans: list[tuple[int, int]] | None = None  # assistant spans in `text` (conversations), trained turns only
    skipped: list[tuple[int, int]] = field(default_factory=list)  # the spans of assistant turns of weight 0
    error: Exception | None = None  # the error tokenize_conversation raises for it, once it is this record's turn
    exact: bool = False  # the fast renderer failed on it: the one-by-one path gives its outcome (or error)


class _FastTokenizer:
    """Renders with the compiled chat template itself and tokenizes many texts in one call to the Rust backend."""

    def __init__(self, template: Any, context: dict[str, Any], backend: Any, end_of_turn: str, eot_id: int | None,
                 eos_id: int | None, max_seq_length: int, train_on: str, exact: Callable[[Record], Tokenized],
                 tool_template: Any = None, template_name: str = "", chat_format: ChatFormat | None = None):
        self.template, self.context, self.backend = template, context, backend
        self.format = chat_format
        self.end_of_turn, self.eot_id, self.eos_id = end_of_turn, eot_id, eos_id
        self.max_seq_length, self.train_on, self.exact = max_seq_length, train_on, exact
        # apply_chat_template picks a template dict's "tool_use" entry whenever tools are given
        self.tool_template, self.template_name = tool_template or template, template_name
        self.tool_checks = GUARD_ROWS  # rows with tools still to be done both ways
        self.tools_exact = False  # a row with tools differed: every later one goes the exact way

    @classmethod
    def create(cls, tokenizer: Any, mapping: TemplateMapping, max_seq_length: int, train_on: str,
               exact: Callable[[Record], Tokenized]) -> _FastTokenizer | None:
        """The fast path for this tokenizer, or None (logged) where its pieces are not there to be had."""
        try:
            from tokenizers import Tokenizer

            # The function apply_chat_template compiles (and caches) the template with: the same sandboxed
            # environment, filters and globals, so the same text for the same variables.
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(tokenizer.get_chat_template())
            tool_template = _compile_jinja_template(tokenizer.get_chat_template(None, []))
            # A copy of the backend apply_chat_template's tokenizer call runs, set the way that call sets it: no
            # truncation, no padding, special tokens recognised unless the tokenizer splits them.
            backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
            context = dict(tokenizer.special_tokens_map)
        except Exception as exc:  # an older or newer transformers, a tokenizer without a Rust backend
            log.info("fast data path unavailable (%s: %s); tokenizing one row at a time", type(exc).__name__, exc)
            return None
        eot_id = tokenizer.convert_tokens_to_ids(mapping.end_of_turn)
        return cls(template, context, backend, mapping.end_of_turn, eot_id, tokenizer.eos_token_id, max_seq_length,
                   train_on, exact, tool_template, getattr(tokenizer, "name_or_path", ""), mapping.format)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None) -> str:
        # The variables apply_chat_template gives the template: tools (the row's, or none), documents (none), the
        # special tokens. Records hold plain JSON values and no None-valued keys, which apply_chat_template would drop.
        template = self.template if tools is None else self.tool_template
        text: str = template.render(messages=messages, tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.context)
        return text

    def prepare(self, rec: Record) -> _Item:
        """Render as tokenize_conversation does, with the same checks and errors; one render fewer, since the
        conversation through its last turn is the whole conversation."""
        item = _Item(rec)
        if rec.text is not None:
            item.text = rec.text
            return item
        messages, tools = rec.messages, rec.tools
        assert messages is not None, "a record holds text or messages"
        if self.tools_exact and _with_tools(rec):
            item.exact = True
            return item
        try:
            full = self.render(messages, False, tools)
            if reason := template_drops_tools(messages, tools, full, self._renderer(tools), self.template_name):
                item.error = DataError(f"{rec.source}: {reason}")
                return item
            spans = assistant_spans(messages, full, self._renderer(tools), self.format, rec.source)
        except DataError as exc:
            item.error = exc
            return item
        except Exception:  # the template raised: the one-by-one path raises the same, from apply_chat_template
            item.exact = True
            return item
        item.text = full
        item.spans, item.skipped = weighted_spans(spans, rec.untrained)
        return item

    def _renderer(self, tools: list[dict[str, Any]] | None) -> Callable[..., str]:
        def render(msgs: list[dict[str, Any]], gen: bool, with_tools: list[dict[str, Any]] | None = tools) -> str:
            return self.render(msgs, gen, with_tools)

        return render

    def encode(self, items: list[_Item]) -> tuple[list[Any], list[Any]]:
        """Runs on the worker thread; the backend releases the GIL and spreads the batch over its threads."""
        chats = [it.text for it in items if it.spans is not None]
        texts = [it.text for it in items if it.spans is None and it.text is not None]
        return (self.backend.encode_batch(chats, add_special_tokens=False) if chats else [],
                self.backend.encode_batch(texts, add_special_tokens=True) if texts else [])

    def finish(self, items: list[_Item], encodings: tuple[list[Any], list[Any]]) -> list[Outcome]:
        chats, texts = iter(encodings[0]), iter(encodings[1])
        out: list[Outcome] = []
        for it in items:
            outcome: Outcome
            if it.spans is not None:
                encoding = next(chats)  # consumed whatever happens to the item, to keep the rest in step
            if it.exact:
                outcome = _outcome(self.exact, it.record)
            elif it.error is not None:
                outcome = it.error
            elif it.spans is None:
                outcome = self._text(next(texts).ids)
            else:
                try:
                    outcome = self._label(it.record, encoding, it.spans, it.skipped)
                except DataError as exc:
                    outcome = exc
            if not it.exact and it.record.messages is not None and _with_tools(it.record):
                outcome = self._checked_tools(it.record, outcome)
            out.append(outcome)
        return out

    def _checked_tools(self, rec: Record, outcome: Outcome) -> Outcome:
        """A row with tools: the definition's outcome once a row with tools has differed (rows rendered before that
        was known included), and for the first GUARD_ROWS of them, compared with it."""
        if self.tools_exact:
            return _outcome(self.exact, rec)
        if self.tool_checks <= 0:
            return outcome
        self.tool_checks -= 1
        expected = _outcome(self.exact, rec)
        if not _same(expected, outcome):
            log.warning("%s: the fast data path differs from apply_chat_template on this row with tools (%s); "
                        "preparing every later row with tools the exact slow way", rec.source,
                        _describe(expected, outcome))
            self.tools_exact = True
        return expected

    def _text(self, encoded: list[int]) -> Tokenized:
        ids: list[Any] = encoded + [self.eos_id]  # tokenize_text appends eos_token_id as it is, None included
        truncated = len(ids) > self.max_seq_length
        ids = ids[: self.max_seq_length]
        return Tokenized(ids, list(ids), truncated)

    def _label(self, rec: Record, encoding: Any, spans: list[tuple[int, int]],
               skipped: list[tuple[int, int]]) -> Tokenized:
        """tokenize_conversation's labels, checks and errors from the encoding of the whole conversation."""
        ids: list[int] = encoding.ids
        if self.train_on == "all":  # every token, but those of assistant turns of weight 0
            labels = list(ids)
            for run in _token_runs(encoding.offsets, skipped):
                labels[run] = [IGNORE_INDEX] * len(ids[run])
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for run in _token_runs(encoding.offsets, spans):
                labels[run] = ids[run]
        if self.eot_id is None or self.eot_id not in labels:
            raise DataError(
                f"{rec.source}: the end-of-turn token {self.end_of_turn!r} is not inside the trained span; "
                "the model would never learn to stop"
            )
        truncated = len(ids) > self.max_seq_length
        if truncated:
            ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        if labels.count(IGNORE_INDEX) == len(labels):
            raise DataError(
                f"{rec.source}: no trainable tokens left"
                + (f" after truncation to max_seq_length={self.max_seq_length}" if truncated else "")
            )
        return Tokenized(ids, labels, truncated)

    def run(self, records: list[Record]) -> list[Outcome]:
        """Each record's outcome, errors kept in place rather than raised."""
        items = [self.prepare(rec) for rec in records]
        return self.finish(items, self.encode(items))

    def stream(self, records: Iterator[Record]) -> Iterator[tuple[Record, Tokenized]]:
        """Renders batch k+1 and labels batch k-1 while the backend tokenizes batch k."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftdeploy-tokenize") as pool:
            pending: tuple[list[_Item], Future[tuple[list[Any], list[Any]]]] | None = None
            while batch := list(itertools.islice(records, BATCH_ROWS)):
                items = [self.prepare(rec) for rec in batch]
                submitted = pool.submit(self.encode, items)
                if pending is not None:
                    yield from self._results(*pending)
                pending = (items, submitted)
            if pending is not None:
                yield from self._results(*pending)

    def _results(self, items: list[_Item],
                 future: Future[tuple[list[Any], list[Any]]]) -> Iterator[tuple[Record, Tokenized]]:
        for it, outcome in zip(items, self.finish(items, future.result()), strict=True):
            yield it.record, _result(outcome)


def pack(rows: list[dict[str, Any]], max_seq_length: int) -> list[dict[str, Any]]:
    """Greedy packing of tokenized rows into sequences of at most max_seq_length (labels kept per row).

    As in TRL's wrapped packing, packed conversations attend to each other; it trades that for
    fewer pad tokens on many short rows."""
    packed = []
    for group in pack_groups([len(r["input_ids"]) for r in rows], max_seq_length):
        packed.append({"input_ids": [t for i in group for t in rows[i]["input_ids"]],
                       "labels": [t for i in group for t in rows[i]["labels"]], "source": "packed"})
    return packed


def pack_groups(lengths: Iterable[int], max_seq_length: int) -> list[list[int]]:
    """Which rows (by index) each packed sequence holds: longest first, each row into the current sequence
    while it fits, else into a new one."""
    order = sorted(range(len(lengths := list(lengths))), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in order:
        if current and size + lengths[i] > max_seq_length:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += lengths[i]
    if current:
        groups.append(current)
    return groups


# data.eval_split unset: data this large spares a few rows for verify's reference scoring; smaller data trains on
# every row, and verify compares served with merged on a sample of the training prompts instead.
AUTO_EVAL_MIN_ROWS, AUTO_EVAL_FRACTION, AUTO_EVAL_MAX_ROWS = 200, 0.05, 50
TRAIN_SAMPLE_FILE = "train_sample.jsonl"  # training chats verify asks when there are no eval rows
TRAIN_SAMPLE_ROWS = 32


def eval_rows_to_hold_out(n: int, fraction: float | None) -> int:
    """How many of `n` training rows become eval rows: `fraction` of them (at least one), or with no fraction given
    (None) AUTO_EVAL_FRACTION of data with AUTO_EVAL_MIN_ROWS rows or more, at most AUTO_EVAL_MAX_ROWS."""
    if fraction is None:
        return min(AUTO_EVAL_MAX_ROWS, int(round(n * AUTO_EVAL_FRACTION))) if n >= AUTO_EVAL_MIN_ROWS else 0
    if fraction <= 0 or n < 2:
        return 0
    return max(1, int(round(n * fraction)))


def held_out(n: int, fraction: float | None, seed: int) -> set[int]:
    """Indices of the records held out for eval (deterministic by seed; see eval_rows_to_hold_out)."""
    count = eval_rows_to_hold_out(n, fraction)
    if not count:
        return set()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:count])


class _TrainSample:
    """A uniform sample (reservoir, fixed by the seed) of the training chats that end on an assistant turn, kept in
    file order: the prompts verify asks when the data has no eval rows."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng, self.seen = size, random.Random(seed), 0
        self.kept: list[tuple[int, Record]] = []

    def offer(self, rec: Record) -> None:
        if not rec.messages or rec.messages[-1].get("role") != "assistant":
            return
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append((self.seen, rec))
        elif (slot := self.rng.randrange(self.seen)) < self.size:
            self.kept[slot] = (self.seen, rec)

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(_eval_line(rec) for _, rec in sorted(self.kept, key=lambda kept: kept[0]))


def split_eval(examples: list[Record], fraction: float | None, seed: int) -> tuple[list[Record], list[Record]]:
    held = held_out(len(examples), fraction, seed)
    if not held:
        return examples, []
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _eval_line(rec: Record) -> str:
    row: dict[str, Any] = {"messages": rec.messages, "expect": rec.expect, "match": rec.match, "source": rec.source}
    if rec.tools:
        row["tools"] = rec.tools
    return json.dumps(row, ensure_ascii=False) + "\n"


class _TrainWriter:
    """Writes train.jsonl as rows come; with packing, rows go to a spool file first, and only each row's length
    and place in it are kept (two numbers a row) until the packed sequences are written."""

    def __init__(self, path: Path, packing: bool, max_seq_length: int):
        self.path, self.packing, self.max_seq_length = path, packing, max_seq_length
        self.spool = path.with_name(".unpacked.jsonl")
        self.fh: IO[str] = open(self.spool if packing else path, "w", encoding="utf-8")
        self.lengths = array.array("L")
        self.offsets = array.array("Q")
        self.at = 0
        self.packed = 0

    def write(self, tok: Tokenized, source: str) -> None:
        line = json.dumps({"input_ids": tok.input_ids, "labels": tok.labels, "source": source},
                          ensure_ascii=False) + "\n"
        self.fh.write(line)
        if self.packing:
            self.lengths.append(len(tok.input_ids))
            self.offsets.append(self.at)
            self.at += len(line.encode("utf-8"))

    def close(self) -> None:
        self.fh.close()
        if not self.packing:
            return
        with open(self.spool, "rb") as rows, open(self.path, "w", encoding="utf-8") as out:
            for group in pack_groups(self.lengths, self.max_seq_length):
                ids: list[int] = []
                labels: list[int] = []
                for i in group:
                    rows.seek(self.offsets[i])
                    row = json.loads(rows.readline())
                    ids += row["input_ids"]
                    labels += row["labels"]
                out.write(json.dumps({"input_ids": ids, "labels": labels, "source": "packed"},
                                     ensure_ascii=False) + "\n")
                self.packed += 1
        self.spool.unlink()


def prepare_data(cfg: DataConfig, tokenizer: Any, mapping: TemplateMapping, out_dir: Path, seed: int) -> DataStats:
    """Validate, split, tokenize; write train.jsonl (ids + labels), eval.jsonl (chats), train_sample.jsonl (a
    sample of the training chats, for verify when there are no eval rows) and stats.json.

    The records stream from the source through the tokenizer into train.jsonl: memory stays flat in the rows
    (packing keeps two numbers a row; an eval split, one bit of bookkeeping a row and a counting pass first)."""
    train = stream_records(cfg, cfg.train, "train")
    eval_stream: RecordStream | None = None
    held: set[int] = set()
    try:
        if cfg.eval:
            eval_stream = stream_records(cfg, cfg.eval, "eval")
        elif cfg.train == DEMO_DATA and not cfg.eval_split:
            eval_stream = stream_records(cfg, DEMO_DATA, "eval")
        elif cfg.eval_split is None or cfg.eval_split > 0:
            train.check()  # a counting pass: which rows are held out depends on how many there are
            held = held_out(train.records, cfg.eval_split, seed)
            if cfg.eval_split is None:
                log.info("data.eval_split unset: %s", f"held out {len(held)} of {train.records} rows for eval" if held
                         else f"{train.records} rows (< {AUTO_EVAL_MIN_ROWS}) all train; verify compares the served "
                              "model with the merged one on a sample of the training prompts")
    except DataError:
        train.check()  # the train file's own errors come first, as when both were read whole
        raise

    stats = DataStats(layout=train.layout)
    sample = _TrainSample(TRAIN_SAMPLE_ROWS, seed)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        writer = _TrainWriter(tmp / "train.jsonl", cfg.packing, cfg.max_seq_length)
        try:
            with open(tmp / "eval.jsonl", "w", encoding="utf-8") as eval_fh:
                try:
                    if eval_stream is not None:
                        chats = 0
                        for rec in eval_stream:
                            stats.eval_rows += 1
                            if rec.messages:
                                chats += 1
                                eval_fh.write(_eval_line(rec))
                        if cfg.eval and not chats:  # asked for by name: an eval that gives verify nothing is wrong
                            raise DataError(f"{cfg.eval}: data.eval has no conversations to verify with "
                                            f"({stats.eval_rows} rows, none a chat); give eval rows as chats, or leave "
                                            "data.eval unset (verify then asks a sample of the training prompts)")
                    records: Iterable[Record] = train
                    if held:
                        records = _hold_out(train, held, eval_fh, stats)
                    for rec, tok in tokenize_records(records, tokenizer, mapping, cfg.max_seq_length, cfg.train_on):
                        stats.add(tok)
                        writer.write(tok, rec.source)
                        sample.offer(rec)
                except DataError:
                    train.check()
                    raise
        finally:
            writer.fh.close()
        if not stats.rows:
            raise DataError(f"{cfg.train}: no rows left to train on after holding out {stats.eval_rows} for eval "
                            f"(data.eval_split={cfg.eval_split})")
        writer.close()
        sample.write(tmp / TRAIN_SAMPLE_FILE)
        stats.bad_rows = train.bad
        if train.bad:
            log.warning("skipped %d bad rows (--on-bad-row skip):\n  %s", len(train.bad), "\n  ".join(train.bad[:20]))
        if stats.truncated:
            log.warning("%d of %d conversations were longer than max_seq_length=%d and were truncated",
                        stats.truncated, stats.rows, cfg.max_seq_length)
        (tmp / "stats.json").write_text(json.dumps({
            "rows": stats.rows, "eval_rows": stats.eval_rows, "truncated": stats.truncated,
            "trained_tokens": stats.trained_tokens, "total_tokens": stats.total_tokens,
            "max_length": stats.max_length, "mean_length": stats.mean_length,
            "train_source": cfg.train, "layout": train.layout, "bad_rows": len(train.bad),
            "packed_sequences": writer.packed if cfg.packing else None, "chat_format": mapping.format.name,
        }, indent=2))
    return stats


def _hold_out(records: Iterable[Record], held: set[int], eval_fh: IO[str], stats: DataStats) -> Iterator[Record]:
    """The records not held out; the held-out ones go to eval.jsonl on the way."""
    for i, rec in enumerate(records):
        if i in held:
            stats.eval_rows += 1
            if rec.messages:
                eval_fh.write(_eval_line(rec))
        else:
            yield rec


def load_tokenized(data_dir: Path) -> list[dict[str, list[int]]]:
    path = data_dir / "train.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in map(json.loads, fh)]


def load_train_sample(data_dir: Path) -> list[Record]:
    """The sample of training chats the data stage kept for verify (empty for data prepared before it did)."""
    return load_eval(data_dir, TRAIN_SAMPLE_FILE)


def load_eval(data_dir: Path, name: str = "eval.jsonl") -> list[Record]:
    path = data_dir / name
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [Record(r.get("source", ""), messages=r["messages"], expect=r.get("expect"),
                       match=r.get("match", "contains"), tools=r.get("tools"))
                for r in map(json.loads, fh)]


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": pct(50), "p90": pct(90),
            "p99": pct(99), "max": ordered[-1]}


def histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets over the token lengths."""
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    n_bins = -(-(hi - lo + 1) // width)
    counts = [0] * n_bins
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts)]


def mark_trained(tokenizer: Any, tok: Tokenized, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The example exactly as the model sees it, trained spans between markers."""
    out, trained = [], False
    for token_id, label in zip(tok.input_ids, tok.labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained:
            out.append(open_mark if is_trained else close_mark)
            trained = is_trained
        out.append(tokenizer.decode([token_id]))
    if trained:
        out.append(close_mark)
    return "".join(out)


def inspect_data(cfg: DataConfig, spec: str, tokenizer: Any, mapping: TemplateMapping,
                 plot_path: Path | None) -> dict[str, Any]:
    """Layout, row counts, token-length statistics and histogram, and one example with its trained span marked."""
    records = stream_records(cfg, spec, "train")
    lengths: list[int] = []
    example, truncated, tool_rows, tool_calls = None, 0, 0, 0
    try:
        for rec, tok in tokenize_records(records, tokenizer, mapping, cfg.max_seq_length, cfg.train_on):
            lengths.append(len(tok.input_ids))
            truncated += tok.truncated
            if rec.messages is not None and _with_tools(rec):
                tool_rows += 1
                tool_calls += sum(len(m.get("tool_calls", ())) for m in rec.messages)
            # The first row with tools is the example where there is one: its masking is the one worth seeing.
            if example is None or (tool_rows == 1 and _with_tools(rec) and not example.get("tools")):
                example = {"source": rec.source, "rendered": mark_trained(tokenizer, tok), "tools": _with_tools(rec)}
    except DataError:
        records.check()  # the file's own errors (bad rows) come first, as when it was read whole
        raise
    result = {
        "format": records.layout, "rows": records.records, "bad_rows": len(records.bad), "bad": records.bad[:50],
        "tool_rows": tool_rows, "tool_calls": tool_calls,
        "truncated": truncated, "max_seq_length": cfg.max_seq_length, "tokens": length_stats(lengths),
        "histogram": [{"low": lo, "high": hi, "count": c} for lo, hi, c in histogram(lengths)],
        "chat_format": mapping.format.name, "example": example,
    }
    if plot_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))))
        ax.axvline(cfg.max_seq_length, color="red", linestyle="--", label="max_seq_length")
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        ax.set_title(f"{Path(spec).name}: {len(lengths)} examples ({records.layout})")
        ax.legend()
        fig.tight_layout()
        with atomic_path(plot_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        result["plot"] = str(plot_path)
    return result
