"""The labels of labels.py, computed fast for many records (`tokenize_records`), and checked against it.

The same compiled chat template without apply_chat_template's per-call overhead (templates.compile_chat_template:
the environment transformers renders chat templates in), the tokenizer's Rust backend over many rows at once on a
thread of its own, and the labels by bisecting the token starts; records stream through, so memory stays flat in the
rows. The first GUARD_ROWS rows are also done the definition's way, and any difference sends the whole dataset down
that exact slow path. Rows with tools are rendered with `tools=` the same way, and the first GUARD_ROWS rows with
tools, wherever they come in the file, are also done the definition's way: one difference sends every later row with
tools down the exact path.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from ..templates import ChatFormat, TemplateMapping, compile_chat_template
from .formats import Record
from .labels import (
    IGNORE_INDEX,
    Tokenized,
    TrainsNothing,
    checked_labels,
    label_spans,
    text_tokens,
    tokenize_conversation,
    tokenize_text,
)

log = logging.getLogger(__name__)

BATCH_ROWS = 512  # rows rendered, then tokenized together on the backend's threads
GUARD_ROWS = 64  # first rows done both ways; one difference and the exact slow path does them all


Outcome = Tokenized | BaseException  # what a record gives: its tokens, or the error tokenizing it raises


def tokenize_records(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, max_seq_length: int,
                     train_on: str = "assistant", bad: list[str] | None = None) -> Iterator[tuple[Record, Tokenized]]:
    """`tokenize_conversation` / `tokenize_text` for every record, in order, many at a time; the first record whose
    tokenization fails raises its error here, after the records before it. Given a `bad` list (--on-bad-row skip),
    a record that trains on nothing once tokenized (TrainsNothing) is a bad row: its error goes to the list, and the
    records after it go on.

    Exact by construction (the same compiled chat template with the same variables, the same Rust tokenizer with the
    same settings, the same rule for labels), and checked: the first GUARD_ROWS records are also tokenized one by one
    through apply_chat_template, and if any result differs (a template or tokenizer the fast path does not reproduce),
    every record is tokenized that way."""
    for rec, outcome in _outcomes(records, tokenizer, mapping, max_seq_length, train_on):
        if isinstance(outcome, TrainsNothing) and bad is not None:
            bad.append(str(outcome))
            continue
        yield rec, _result(outcome)


def _outcomes(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, max_seq_length: int,
              train_on: str) -> Iterator[tuple[Record, Outcome]]:
    """Each record with its outcome, in order: its tokens, or the error tokenizing it raises."""
    it = iter(records)

    def exact(rec: Record) -> Tokenized:
        if rec.text is not None:
            return tokenize_text(rec.text, tokenizer, max_seq_length, rec.context_chars, rec.source)
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
        yield from zip(head, expected, strict=True)
    if fast is None:
        for rec in it:
            yield rec, _outcome(exact, rec)
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

            # The sandboxed environment, filters and globals apply_chat_template compiles the template with, so the
            # same text for the same variables (and the guard rows check it).
            template = compile_chat_template(tokenizer.get_chat_template())
            tool_template = compile_chat_template(tokenizer.get_chat_template(None, []))
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
        if self.tools_exact and rec.uses_tools():
            item.exact = True
            return item
        try:
            full = self.render(messages, False, tools)
            item.spans, item.skipped = label_spans(messages, tools, rec.untrained, full, self._renderer(tools),
                                                   self.format, self.template_name, rec.source)
        except DataError as exc:
            item.error = exc
            return item
        except Exception:  # the template raised: the one-by-one path raises the same, from apply_chat_template
            item.exact = True
            return item
        item.text = full
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
            else:
                try:
                    outcome = self._text(it.record, next(texts)) if it.spans is None else \
                        self._label(it.record, encoding, it.spans, it.skipped)
                except DataError as exc:
                    outcome = exc
            if not it.exact and it.record.messages is not None and it.record.uses_tools():
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

    def _text(self, rec: Record, encoding: Any) -> Tokenized:
        """tokenize_text's tokens and labels from the text's encoding."""
        starts = [start for start, _end in encoding.offsets] if rec.context_chars else None
        return text_tokens(encoding.ids, self.eos_id, self.max_seq_length, starts, rec.context_chars, rec.source)

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
        return checked_labels(ids, labels, self.eot_id, self.end_of_turn, self.max_seq_length, rec.source)

    def run(self, records: list[Record]) -> list[Outcome]:
        """Each record's outcome, errors kept in place rather than raised."""
        items = [self.prepare(rec) for rec in records]
        return self.finish(items, self.encode(items))

    def stream(self, records: Iterator[Record]) -> Iterator[tuple[Record, Outcome]]:
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
                 future: Future[tuple[list[Any], list[Any]]]) -> Iterator[tuple[Record, Outcome]]:
        for it, outcome in zip(items, self.finish(items, future.result()), strict=True):
            yield it.record, outcome
