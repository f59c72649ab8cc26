"""prepare_data: the records stream from the source through the tokenizer (fast.py) into the data directory.

  train.jsonl         input_ids + labels a row (packed into sequences of at most max_seq_length with data.packing)
  eval.jsonl          the eval chats (data.eval, the demo's eval split, or rows held out of the training data)
  train_sample.jsonl  a sample of the training chats or raw texts: what verify asks when there are no eval rows
  stats.json          row and token counts, the layout, bad rows, packed sequences, the chat format

Memory stays flat in the rows: packing keeps two numbers a row, an eval split one bit of bookkeeping a row and a
counting pass first.
"""

from __future__ import annotations

import array
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config import DataConfig
from ..defaults import DEMO_DATA
from ..errors import DataError
from ..runs import atomic_path
from ..templates import TemplateMapping
from .fast import tokenize_records
from .formats import Record, RecordStream, stream_records
from .labels import IGNORE_INDEX, Tokenized

log = logging.getLogger(__name__)

# data.eval_split unset: data this large spares a few rows for verify's reference scoring; smaller data trains on
# every row, and verify compares served with merged on a sample of the training prompts instead.
AUTO_EVAL_MIN_ROWS, AUTO_EVAL_FRACTION, AUTO_EVAL_MAX_ROWS = 200, 0.05, 50
TRAIN_SAMPLE_FILE = "train_sample.jsonl"  # training chats verify asks when there are no eval rows
TRAIN_SAMPLE_ROWS = 32


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


def pack_groups(lengths: Iterable[int], max_seq_length: int) -> list[list[int]]:
    """Which rows (by index) each packed sequence holds: longest first, each row into the current sequence
    while it fits, else into a new one. As in TRL's wrapped packing, packed conversations attend to each other; it
    trades that for fewer pad tokens on many short rows."""
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
    """A uniform sample (reservoir, fixed by the seed) of the training chats that end on an assistant turn, or of
    the raw texts (the `text` layout, plain-string prompt/completion rows), kept in file order: the prompts verify
    asks when the data has no eval rows (of a raw text, a prefix it continues)."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng, self.seen = size, random.Random(seed), 0
        self.kept: list[tuple[int, Record]] = []

    def offer(self, rec: Record) -> None:
        raw = bool(rec.text) and not rec.messages
        if not raw and (not rec.messages or rec.messages[-1].get("role") != "assistant"):
            return
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append((self.seen, rec))
        elif (slot := self.rng.randrange(self.seen)) < self.size:
            self.kept[slot] = (self.seen, rec)

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(_eval_line(rec) for _, rec in sorted(self.kept, key=lambda kept: kept[0]))


def _eval_line(rec: Record) -> str:
    if rec.text is not None and not rec.messages:  # raw text (training sample only): where its prompt ends
        return json.dumps({"text": rec.text, "context_chars": rec.context_chars, "source": rec.source},
                          ensure_ascii=False) + "\n"
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
    eval_stream, held = _eval_source(cfg, train, seed)
    stats = DataStats(layout=train.layout)
    sample = _TrainSample(TRAIN_SAMPLE_ROWS, seed)
    # Rows that train on nothing once tokenized (all past max_seq_length): bad rows too, skipped with the others
    trains_nothing: list[str] | None = [] if cfg.on_bad_row == "skip" else None
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        writer = _TrainWriter(tmp / "train.jsonl", cfg.packing, cfg.max_seq_length)
        try:
            with open(tmp / "eval.jsonl", "w", encoding="utf-8") as eval_fh:
                try:
                    if eval_stream is not None:
                        _write_eval(cfg, eval_stream, eval_fh, stats)
                    records: Iterable[Record] = train
                    if held:
                        records = _hold_out(train, held, eval_fh, stats)
                    for rec, tok in tokenize_records(records, tokenizer, mapping, cfg.max_seq_length, cfg.train_on,
                                                     trains_nothing):
                        stats.add(tok)
                        writer.write(tok, rec.source)
                        sample.offer(rec)
                except DataError:
                    train.check()
                    raise
        finally:
            writer.fh.close()
        stats.bad_rows = [*train.bad, *(trains_nothing or ())]
        if not stats.rows:
            _no_rows_left(cfg, stats)
        writer.close()
        sample.write(tmp / TRAIN_SAMPLE_FILE)
        if stats.bad_rows:
            log.warning("skipped %d bad rows (--on-bad-row skip):\n  %s", len(stats.bad_rows),
                        "\n  ".join(stats.bad_rows[:20]))
        if stats.truncated:
            log.warning("%d of %d conversations were longer than max_seq_length=%d and were truncated",
                        stats.truncated, stats.rows, cfg.max_seq_length)
        _write_stats(tmp / "stats.json", cfg, stats, writer, mapping)
    return stats


def _no_rows_left(cfg: DataConfig, stats: DataStats) -> None:
    if stats.bad_rows and not stats.eval_rows:
        raise DataError(f"{cfg.train}: no usable rows ({len(stats.bad_rows)} bad rows skipped):\n  "
                        + "\n  ".join(stats.bad_rows[:20]))
    raise DataError(f"{cfg.train}: no rows left to train on after holding out {stats.eval_rows} for eval "
                    f"(data.eval_split={cfg.eval_split})")


def _eval_source(cfg: DataConfig, train: RecordStream, seed: int) -> tuple[RecordStream | None, set[int]]:
    """Where the eval rows come from: a stream of their own (data.eval, or the demo's eval split), or the indices of
    the training rows held out for eval (data.eval_split; unset, only where the data can spare them)."""
    try:
        if cfg.eval:
            return stream_records(cfg, cfg.eval, "eval"), set()
        if cfg.train == DEMO_DATA and not cfg.eval_split:
            return stream_records(cfg, DEMO_DATA, "eval"), set()
        if cfg.eval_split is None or cfg.eval_split > 0:
            train.check()  # a counting pass: which rows are held out depends on how many there are
            held = held_out(train.records, cfg.eval_split, seed)
            if cfg.eval_split is None:
                log.info("data.eval_split unset: %s", f"held out {len(held)} of {train.records} rows for eval" if held
                         else f"{train.records} rows (< {AUTO_EVAL_MIN_ROWS}) all train; verify compares the served "
                              "model with the merged one on a sample of the training prompts")
            return None, held
    except DataError:
        train.check()  # the train file's own errors come first
        raise
    return None, set()


def _write_eval(cfg: DataConfig, eval_stream: RecordStream, eval_fh: IO[str], stats: DataStats) -> None:
    """The eval source's chats to eval.jsonl; one asked for by name that holds none is an error."""
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


def _write_stats(path: Path, cfg: DataConfig, stats: DataStats, writer: _TrainWriter,
                 mapping: TemplateMapping) -> None:
    path.write_text(json.dumps({
        "rows": stats.rows, "eval_rows": stats.eval_rows, "truncated": stats.truncated,
        "trained_tokens": stats.trained_tokens, "total_tokens": stats.total_tokens,
        "max_length": stats.max_length, "mean_length": stats.mean_length,
        "train_source": cfg.train, "layout": stats.layout, "bad_rows": len(stats.bad_rows),
        "packed_sequences": writer.packed if cfg.packing else None, "chat_format": mapping.format.name,
    }, indent=2))


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
    """The sample of training chats (or raw texts) the data stage kept for verify (empty for data prepared before
    it did)."""
    return load_eval(data_dir, TRAIN_SAMPLE_FILE)


def load_eval(data_dir: Path, name: str = "eval.jsonl") -> list[Record]:
    path = data_dir / name
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [Record(r.get("source", ""), messages=r.get("messages"), text=r.get("text"),
                       context_chars=r.get("context_chars", 0), expect=r.get("expect"),
                       match=r.get("match", "contains"), tools=r.get("tools"))
                for r in map(json.loads, fh)]
