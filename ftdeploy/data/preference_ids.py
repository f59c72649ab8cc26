"""Preference Records -> token ids, by THE definition of the labels (labels.py), so that what dpo, orpo and kto train
is what SFT would train on the same conversation, and what the served TEMPLATE renders.

Each answer is tokenized as the conversation prompt + [answer] (fast.py's tokenize_records: the chat template, the
assistant spans, every earlier assistant turn untrained). The prompt ids are the ids before the answer's first
trained token; the completion ids run from there through the last trained end-of-turn token (the answer and its
end-of-turn, nothing the template writes after it, such as ChatML's newline). A pair's prompt ids must be the same
before both answers (a DataError names the row where a template makes them differ).

max_seq_length bounds the prompt plus the longest completion: over it, the completions are cut at their end (the row
counts as truncated); a prompt that leaves no room for one completion token trains nothing, a bad row of its own
(labels.TrainsNothing: --on-bad-row skip drops it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..templates import TemplateMapping
from .fast import tokenize_records
from .formats import Record
from .labels import IGNORE_INDEX, Tokenized, TrainsNothing

NO_LIMIT = 1 << 62  # the conversations are tokenized whole; the completions are cut here instead
ANSWER_KEYS = {"chosen": "chosen_ids", "rejected": "rejected_ids"}
PAIR_METHODS = ("dpo", "orpo")  # the train.method values that train chosen/rejected pairs: dpo's rows for each


@dataclass
class PreferenceIds:
    """A preference Record's ids: the shared prompt, and each answer's completion (None where the row has none)."""

    source: str
    prompt_ids: list[int]
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None
    truncated: bool = False

    def rows(self, method: str) -> list[dict[str, Any]]:
        """The train.jsonl rows: dpo and orpo {"prompt_ids", "chosen_ids", "rejected_ids", "source"}; kto one
        {"prompt_ids", "completion_ids", "label", "source"} an answer (chosen: label true), so a pair gives two."""
        if method in PAIR_METHODS:
            if self.chosen_ids is None or self.rejected_ids is None:
                raise DataError(f"{self.source}: --method {method} needs a chosen and a rejected answer")
            return [{"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids,
                     "source": self.source}]
        return [{"prompt_ids": self.prompt_ids, "completion_ids": ids, "label": label, "source": self.source}
                for label, ids in ((True, self.chosen_ids), (False, self.rejected_ids)) if ids is not None]


def row_length(row: dict[str, Any]) -> int:
    """A train.jsonl row's tokens as max_seq_length counts them: the prompt and its longest completion."""
    return len(row["prompt_ids"]) + max(len(row[k]) for k in ("chosen_ids", "rejected_ids", "completion_ids")
                                        if k in row)


def split_answer(tok: Tokenized, eot_id: int, source: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of prompt + [answer] tokenized: the ids before the first trained token, and from
    there through the last trained end-of-turn token."""
    trained = [i for i, label in enumerate(tok.labels) if label != IGNORE_INDEX]
    ends = [i for i in trained if tok.labels[i] == eot_id]
    if not trained or not ends:  # tokenize_conversation already raises for either; kept as the rule's own check
        raise DataError(f"{source}: the answer has no trained end-of-turn token")
    return tok.input_ids[:trained[0]], tok.input_ids[trained[0]:ends[-1] + 1]


def _conversations(records: Iterable[Record], pending: deque[tuple[Record, list[str]]]) -> Iterator[Record]:
    """Each preference Record's answers as conversations (prompt + [answer]) to tokenize; which Record and answers
    they were go to `pending`, in order."""
    for rec in records:
        if not rec.is_preference() or rec.messages is None:
            raise DataError(f"{rec.source}: not a preference record (no chosen or rejected answer)")
        names = [name for name in ANSWER_KEYS if getattr(rec, name) is not None]
        pending.append((rec, names))
        for name in names:
            yield Record(rec.source, messages=[*rec.messages, getattr(rec, name)], tools=rec.tools,
                         untrained=rec.untrained)


def tokenize_preference(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, max_seq_length: int,
                        bad: list[str] | None = None) -> Iterator[tuple[Record, PreferenceIds]]:
    """Each preference Record with its ids, in order (see the module). Given a `bad` list (--on-bad-row skip), a
    record whose prompt leaves no room for an answer goes to it; otherwise that raises TrainsNothing."""
    eot_id = tokenizer.convert_tokens_to_ids(mapping.end_of_turn)
    pending: deque[tuple[Record, list[str]]] = deque()
    tokenized = iter(tokenize_records(_conversations(records, pending), tokenizer, mapping, NO_LIMIT, "assistant"))
    for _, first in tokenized:
        rec, names = pending.popleft()
        toks = [first, *(next(tokenized)[1] for _ in names[1:])]
        try:
            yield rec, _ids(rec, dict(zip(names, toks, strict=True)), eot_id, max_seq_length)
        except TrainsNothing as exc:
            if bad is None:
                raise
            bad.append(str(exc))


def _ids(rec: Record, toks: dict[str, Tokenized], eot_id: int, max_seq_length: int) -> PreferenceIds:
    split = {name: split_answer(tok, eot_id, rec.source) for name, tok in toks.items()}
    prompts = [prompt for prompt, _ in split.values()]
    prompt = prompts[0]
    if any(p != prompt for p in prompts[1:]):
        at = next((i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b), min(map(len, prompts)))
        raise DataError(f"{rec.source}: the prompt tokenizes differently before the chosen and the rejected answer "
                        f"(from token {at}: the chat template or the tokenizer joins the prompt's end to the answer); "
                        "a preference pair needs one prompt")
    room = max_seq_length - len(prompt)
    if room <= 0:
        raise TrainsNothing(f"{rec.source}: the prompt alone is {len(prompt)} tokens, which leaves no room for an "
                            f"answer within data.max_seq_length={max_seq_length} (raise data.max_seq_length, or "
                            "shorten the prompt)")
    out = PreferenceIds(rec.source, prompt)
    for name, (_, completion) in split.items():
        out.truncated |= len(completion) > room
        setattr(out, ANSWER_KEYS[name], completion[:room])
    return out
