"""Data stage: chat JSONL in, tokenized examples with assistant-only labels out.

Each conversation is rendered with the base model's own chat template. Loss falls on the
assistant turns only (by default), and each assistant turn's end-of-turn token is inside the
loss, so the model learns to stop. A row that would train on nothing is an error naming it.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..config import DEMO_DATA, DataConfig
from ..errors import DataError
from ..runs import atomic_path
from ..templates import TemplateMapping

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_LISTED = 20


@dataclass
class Example:
    """One conversation and where it came from (file:line)."""

    messages: list[dict[str, str]]
    source: str
    expect: str | None = None


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
    lengths: list[int] = field(default_factory=list)


def demo_path(split: str) -> Path:
    return Path(str(resources.files("ftdeploy.demo").joinpath(f"{split}.jsonl")))


def resolve_data_path(spec: str, split: str = "train") -> Path:
    return demo_path(split) if spec == DEMO_DATA else Path(spec).expanduser()


def _validate_messages(messages: Any) -> str | None:
    """Why `messages` is not a usable conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({role}): content must be a non-empty string"
        if role == "system" and i != 0:
            return f"message {i}: a system message may only come first"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        return "the first non-system message must be from the user"
    for a, b in zip(turns, turns[1:]):
        if a == b:
            return f"two {a} messages in a row: turns must alternate user/assistant"
    if "assistant" not in turns:
        return "no assistant message to learn from"
    return None


def read_chat_jsonl(path: Path, system_prompt: str | None = None) -> list[Example]:
    """Read and validate a JSONL file of {"messages": [...]} rows; all bad rows are reported together."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples: list[Example] = []
    bad: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(f"{where}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(row, dict) or "messages" not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                bad.append(f"{where}: expected an object with a 'messages' list, got {keys}")
                continue
            reason = _validate_messages(row["messages"])
            if reason:
                bad.append(f"{where}: {reason}")
                continue
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            if system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            expect = row.get("expect")
            examples.append(Example(messages, where, expect if isinstance(expect, str) else None))
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{path}: {len(bad)} bad row{'s' * (len(bad) > 1)}:\n  {listed}{more}")
    if not examples:
        raise DataError(f"{path}: the dataset is empty")
    return examples


def tokenize_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    mapping: TemplateMapping,
    max_seq_length: int,
    train_on: str = "assistant",
    source: str = "",
) -> Tokenized:
    """Render with the tokenizer's chat template; label the assistant spans (end-of-turn included)."""

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise DataError(
                f"{source}: the chat template does not render this conversation turn by turn "
                "(an earlier turn changes when later ones are added), so the assistant span cannot be located"
            )
        spans.append((len(prefix), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        trained = train_on == "all" or any(s <= start < e for s, e in spans)
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


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_data(cfg: DataConfig, tokenizer: Any, mapping: TemplateMapping, out_dir: Path, seed: int) -> DataStats:
    """Validate, split, tokenize; write train.jsonl (ids + labels), eval.jsonl (chats) and stats.json."""
    train_path = resolve_data_path(cfg.train, "train")
    examples = read_chat_jsonl(train_path, cfg.system_prompt)
    if cfg.eval:
        eval_examples = read_chat_jsonl(Path(cfg.eval).expanduser(), cfg.system_prompt)
    elif cfg.train == DEMO_DATA and cfg.eval_split == 0:
        eval_examples = read_chat_jsonl(demo_path("eval"), cfg.system_prompt)
    else:
        examples, eval_examples = split_eval(examples, cfg.eval_split, seed)

    stats = DataStats(rows=len(examples), eval_rows=len(eval_examples))
    tokenized = []
    for ex in examples:
        tok = tokenize_conversation(ex.messages, tokenizer, mapping, cfg.max_seq_length, cfg.train_on, ex.source)
        stats.truncated += tok.truncated
        stats.total_tokens += len(tok.input_ids)
        stats.trained_tokens += sum(1 for lab in tok.labels if lab != IGNORE_INDEX)
        stats.lengths.append(len(tok.input_ids))
        tokenized.append({"input_ids": tok.input_ids, "labels": tok.labels, "source": ex.source})
    if stats.truncated:
        log.warning("%d of %d conversations were longer than max_seq_length=%d and were truncated",
                    stats.truncated, stats.rows, cfg.max_seq_length)

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_jsonl(tmp / "train.jsonl", tokenized)
        _write_jsonl(tmp / "eval.jsonl", (
            {"messages": e.messages, "expect": e.expect, "source": e.source} for e in eval_examples))
        (tmp / "stats.json").write_text(json.dumps({
            "rows": stats.rows, "eval_rows": stats.eval_rows, "truncated": stats.truncated,
            "trained_tokens": stats.trained_tokens, "total_tokens": stats.total_tokens,
            "max_length": max(stats.lengths), "mean_length": round(sum(stats.lengths) / len(stats.lengths), 1),
            "train_source": str(train_path), "chat_format": mapping.format.name,
        }, indent=2))
    return stats


def load_tokenized(data_dir: Path) -> list[dict[str, list[int]]]:
    path = data_dir / "train.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in map(json.loads, fh)]


def load_eval(data_dir: Path) -> list[Example]:
    path = data_dir / "eval.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [Example(r["messages"], r.get("source", ""), r.get("expect")) for r in map(json.loads, fh)]
