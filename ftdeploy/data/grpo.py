"""GRPO data (train.method grpo): rows -> prompt Records, every bad row named by where it came from. A Record's
`messages` is the prompt, ending on the user turn the model answers; its `columns` are the row's other columns, which
the reward functions are given by name (ftdeploy/rewards.py). The forms, detected from the first rows' columns
(data.format names a supervised layout to read; prompt_completion reads the prompt form):

  prompt    TRL's prompt-only rows {"prompt", <columns>...}: the prompt a string (one user turn) or a list of
            messages ending on a user turn. A "completion" (a string, or a list of one assistant message), where
            given, is kept as the `answer` column: TRL never hands a reward its row's "completion".
  messages, sharegpt, alpaca, pairs
            the supervised chat layouts: the prompt is the conversation before its last assistant turn, whose text is
            kept as the `answer` column (a row's own `answer` column wins); a messages or sharegpt conversation may
            also end on a user turn, a prompt with no answer.

Columns: every field of a row that its layout does not read as the prompt (or answer), as it is, except verify's
`expect` and `match`, the system column (the prompt's system turn, as in every chat layout) and the media lists.
Strings are chat turns here, never raw text (the `text` layout is refused): GRPO tunes the chat model Ollama serves
through its chat template, and TRL renders a conversational prompt with the tokenizer's chat template and the
generation prompt (GRPOTrainer._tokenize_prompts), which is exactly the render SFT's labels start the answer after
(labels.py; tests/unit/test_data_grpo.py compares the ids).

Bad rows, each named with its reason: no prompt (missing, empty, not a string or a list of messages); a prompt that
ends on an assistant turn; the checks every chat layout makes (roles, turn order, text content, the system column);
tools and tool calls (TRL renders a GRPO prompt without a row's tools); a column named as TRL names an argument of
its own (rewards.RESERVED_COLUMNS) or one JSON cannot hold; preference rows; and, once tokenized
(`tokenize_prompts`), a prompt of data.max_seq_length tokens or more, which leaves no room for an answer
(labels.TrainsNothing: --on-bad-row skip drops it).

train.jsonl (writer.py): one {"prompt": [messages], "columns": {...}, "source": "file:line"} a row; `load_grpo_rows`
reads it back as the rows GRPOTrainer takes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..defaults import DEMO_DATA
from ..errors import DataError
from ..rewards import RESERVED_COLUMNS, ROW_COLUMN
from .formats import (
    _ROW_FIELDS,
    MEDIA_FIELDS,
    PREFERENCE_FORMATS,
    SHAREGPT_ROLES,
    Columns,
    Record,
    RecordStream,
    _absent,
    _chat_record,
    _kind,
    convert_row,
    expect_of,
    layouts_of,
    placed,
    preference_kind,
    too_large,
)
from .labels import TrainsNothing
from .preference import _answer, _prompt_turns
from .sources import BadRow, demo_path

CHAT_LAYOUTS = ("messages", "sharegpt", "alpaca", "pairs")
NEEDS = "prompts: TRL's prompt-only rows ({\"prompt\": text or messages, <columns>...}), or chats (messages, " \
        "conversations, instruction/output, prompt/response), whose last assistant turn becomes the `answer` column"
DEMO_FILES = {"train": "arithmetic.jsonl", "eval": "arithmetic_eval.jsonl"}  # --method grpo's demo data
_PLACEHOLDER = {"role": "assistant", "content": "-"}  # closes a prompt for the chat checks, then taken off again


def grpo_layout(row: Any, columns: Columns) -> str | None:
    """The GRPO form of a row from its columns (see the module), or None."""
    if not isinstance(row, dict):
        return None
    found = layouts_of(row, columns)
    if "prompt" in row and "pairs" not in found:
        return "prompt"
    return next((layout for layout in CHAT_LAYOUTS if layout in found), None)


def convert_grpo_row(row: Any, layout: str, columns: Columns) -> Record | str:
    """A row's prompt Record, or the reason it is bad."""
    if isinstance(row, BadRow):
        return row.reason
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    if kind := preference_kind(row, columns):
        return f"a preference row ({kind}): --method grpo trains {NEEDS}"
    expect = expect_of(row)
    if isinstance(expect, BadRow):
        return expect.reason
    if not _absent(row.get("tools")) and row.get("tools") != []:
        return "'tools': --method grpo does not train tool use yet (TRL renders a GRPO prompt without a row's tools)"
    converted = _prompt_form(row, columns, expect) if layout == "prompt" else _chat_form(row, layout, columns, expect)
    if isinstance(converted, str):
        return converted
    rec, answer = converted
    if rec.uses_tools():
        return "tool calls or tool results: --method grpo does not train tool use yet"
    found = reward_columns(row, layout, columns, answer)
    if isinstance(found, str):
        return found
    rec.columns = found
    return rec


def _prompt_form(row: dict[str, Any], columns: Columns, expect: str | None) -> tuple[Record, str | None] | str:
    prompt = _prompt_turns(row, "prompt")
    if isinstance(prompt, BadRow):
        return prompt.reason
    last = prompt[-1]
    if isinstance(last, dict) and last.get("role", last.get("from")) in ("assistant", "gpt"):
        return f"the prompt ends on an assistant turn (message {len(prompt) - 1}): a GRPO prompt ends on the user " \
               "turn the model answers (give a reference answer as a column, e.g. 'answer')"
    answer = None
    if not _absent(row.get("completion")):
        message = _answer(row, "completion")
        if isinstance(message, BadRow):
            return message.reason
        if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
            return f"'completion' must be a string or one assistant message, got {_kind(message.get('role'))} " \
                   f"{message.get('role')!r}"
        if "answer" in row:
            return "the row has both 'completion' and 'answer', and the completion is kept as the answer; keep one"
        answer = message["content"]
    rec = _chat_record([*prompt, _PLACEHOLDER], row, None, expect, columns)
    if isinstance(rec, str):
        return f"'prompt': {rec}"
    assert rec.messages is not None
    return Record("", messages=rec.messages[:-1], expect=expect), answer


def _chat_form(row: dict[str, Any], layout: str, columns: Columns,
               expect: str | None) -> tuple[Record, str | None] | str:
    """A supervised layout's conversation, split before its last assistant turn; a messages or sharegpt conversation
    that ends on a user turn is all prompt."""
    key, closing = {"messages": ("messages", _PLACEHOLDER),
                    "sharegpt": ("conversations", {"from": "gpt", "value": "-"})}.get(layout, (None, None))
    open_ended = False
    if key is not None and isinstance(turns := row.get(key), list) and turns and isinstance(turns[-1], dict):
        role = turns[-1].get("role", turns[-1].get("from"))
        open_ended = (SHAREGPT_ROLES.get(str(role)) if layout == "sharegpt" else role) == "user"
        if open_ended:
            row = {**row, key: [*turns, closing]}
    rec = convert_row(row, layout, columns)
    if isinstance(rec, str):
        return rec
    assert rec.messages is not None
    answer = None if open_ended else str(rec.messages[-1].get("content") or "")
    return Record("", messages=rec.messages[:-1], expect=expect), answer


def reward_columns(row: dict[str, Any], layout: str, columns: Columns, answer: str | None) -> dict[str, Any] | str:
    """The columns a row gives the reward functions (see the module), or the reason one cannot be given."""
    read = {"prompt", "completion", "tools"} if layout == "prompt" else {*_ROW_FIELDS[layout]}
    if layout == "pairs":
        read.update((columns.prompt, columns.response))
    skip = {*read, "expect", "match", columns.system, *MEDIA_FIELDS}
    found = {k: v for k, v in row.items() if k not in skip and not _absent(v)}
    if answer is not None and "answer" not in found:
        found["answer"] = answer
    for name, value in found.items():
        if name in RESERVED_COLUMNS:
            return f"column {name!r}: TRL passes the reward functions a {name!r} of its own (or reads one from a " \
                   "row itself); rename the column"
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return f"column {name!r} holds {_kind(value)} {str(value)[:60]!r}, which the prepared data (JSON) " \
                   "cannot hold; give it as text or numbers"
    return found


class GrpoStream(RecordStream):
    """A RecordStream of prompt Records for --method grpo: the form detected from the first rows (or named by
    data.format), each row converted by it."""

    def _detect(self, head: list[tuple[str, Any]], layout: str) -> str:
        if layout in PREFERENCE_FORMATS or layout == "text":
            what = "raw text, no prompt to answer" if layout == "text" else f"preference data ({layout})"
            raise DataError(f"{self.spec}: data.format {layout} is {what}; --method grpo trains {NEEDS}")
        if layout != "auto":
            return "prompt" if layout == "prompt_completion" else layout
        objects = [row for _, row in head if isinstance(row, dict)]
        kinds = Counter(kind for row in objects if (kind := preference_kind(row, self.columns)))
        forms = Counter(form for row in objects if (form := grpo_layout(row, self.columns)))
        if kinds and sum(kinds.values()) >= len(objects) - sum(kinds.values()):
            raise DataError(f"{self.spec}: preference data ({kinds.most_common(1)[0][0]}); --method grpo trains "
                            f"{NEEDS} (--method dpo, orpo or kto trains preference data)")
        if not forms:
            keys = sorted({k for row in objects for k in row})[:12]
            text = " (raw text: no prompt to answer)" if keys == ["text"] else ""
            raise DataError(f"{self.spec}: no prompts in its columns {keys}{text}; --method grpo trains {NEEDS}")
        top = forms.most_common()
        if len(top) > 1 and top[0][1] == top[1][1]:
            raise DataError(f"{self.spec}: ambiguous layout: rows match both {top[0][0]} and {top[1][0]}; choose one "
                            "with --format")
        return top[0][0]

    def _convert(self, where: str, row: Any, unused: dict[str, str] | None) -> Record | str:
        if reason := too_large(row, self.max_row_bytes):
            return f"{where}: {reason}"
        return placed(convert_grpo_row(row, self.layout, self.columns), where, row, self.system_prompt)


def stream_grpo(cfg: DataConfig, spec: str, split: str = "train") -> GrpoStream:
    """`spec` read as GRPO prompts, with the data config's layout, columns, system prompt and bad-row policy; `demo`
    is the bundled arithmetic word problems (the grpo section's default rewards score them)."""
    source = str(demo_path(split).with_name(DEMO_FILES[split])) if spec == DEMO_DATA else spec
    columns = Columns(**cfg.columns) if cfg.columns else Columns()
    return GrpoStream(source, cfg.format, columns, cfg.on_bad_row, cfg.system_prompt, cfg.hub_config, cfg.split,
                      cfg.max_row_bytes, cfg.revision)


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """A prompt's token ids as GRPOTrainer renders them (_tokenize_prompts): the tokenizer's chat template with the
    generation prompt, the text tokenized without adding special tokens (apply_chat_template's tokenize=True)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def tokenize_prompts(records: Iterable[Record], tokenizer: Any, max_seq_length: int,
                     bad: list[str] | None = None) -> Iterator[tuple[Record, int]]:
    """Each prompt Record with its length in tokens. Given a `bad` list (--on-bad-row skip), a prompt that leaves no
    room for an answer within max_seq_length goes to it; otherwise that raises TrainsNothing."""
    for rec in records:
        assert rec.messages is not None
        n = len(prompt_ids(tokenizer, rec.messages))
        if n >= max_seq_length:
            reason = f"{rec.source}: the prompt is {n} tokens, which leaves no room for an answer within " \
                     f"data.max_seq_length={max_seq_length} (raise data.max_seq_length, or shorten the prompt)"
            if bad is None:
                raise TrainsNothing(reason)
            bad.append(reason)
            continue
        yield rec, n


def train_row(rec: Record) -> dict[str, Any]:
    """A prompt Record's train.jsonl row."""
    return {"prompt": rec.messages, "columns": rec.columns, "source": rec.source}


def load_grpo_rows(data_dir: Path) -> list[dict[str, Any]]:
    """grpo's train.jsonl as the rows GRPOTrainer takes: {"prompt": [messages], ROW_COLUMN: the row's source and
    columns as JSON text}, which the reward wrapper (rewards.Reward) unpacks into keyword arguments (one text column
    keeps the dataset's Arrow table from typing each user column across rows)."""
    with open(data_dir / "train.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if rows and "prompt" not in rows[0]:
        raise DataError(f"{data_dir / 'train.jsonl'}: not GRPO prompts (its columns: {', '.join(sorted(rows[0]))}); "
                        "prepare the data again with train.method grpo (`ftdeploy data`)")
    return [{"prompt": r["prompt"], ROW_COLUMN: json.dumps({"source": r.get("source", ""),
                                                             "columns": r.get("columns") or {}}, ensure_ascii=False)}
            for r in rows]
