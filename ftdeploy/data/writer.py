"""prepare_data: the records stream from the source through the tokenizer (fast.py) into the data directory.

  train.jsonl         sft: input_ids + labels a row (data.packing true: rows packed best-fit into sequences of at
                      most max_seq_length, with their lengths, seq_lengths, which training keeps apart); dpo and
                      orpo: prompt_ids + chosen_ids + rejected_ids a row; kto: prompt_ids +
                      completion_ids + label (true: a good answer) a row, a pair giving two (preference_ids.py);
                      grpo: {"prompt": [messages], "columns": {...}, "source"} a row, the prompt as chat messages
                      (GRPOTrainer renders and tokenizes it), the columns what the reward functions get (grpo.py)
  eval.jsonl          the eval chats (data.eval, the demo's eval split, or rows held out of the training data); for
                      dpo and kto, the prompts with their chosen and/or rejected answers; for grpo, the prompts
                      (ending on the user turn) with their "columns"
  train_sample.jsonl  a sample of the training chats or raw texts (or preference or GRPO prompts): what verify asks
                      when there are no eval rows
  stats.json          row and token counts (the longest row, and the max_seq_length rows were cut at: the served
                      num_ctx is made of the two), the method, the layout, bad rows, packed sequences, the chat
                      format (for dpo and kto: a row's tokens are its prompt and longest completion, the trained ones
                      its completions; kto counts its desirable and undesirable rows; grpo: a row's tokens are its
                      prompt's, none trained: the answers are sampled in training); a mix's sources (mix.py:
                      rows read, bad, eval, kept and share of each) and the Hub commits read

Memory stays flat in the rows: packing keeps two numbers a row, an eval split one bit of bookkeeping a row and a
counting pass first.
"""

from __future__ import annotations

import array
import bisect
import json
import logging
import random
from collections import deque
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
from .grpo import stream_grpo, tokenize_prompts
from .grpo import train_row as grpo_train_row
from .labels import IGNORE_INDEX, Tokenized
from .mix import MixedStream, counted, hub_revisions
from .preference import METHODS, stream_preference
from .preference_ids import row_length, tokenize_preference

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
    method: str = "sft"
    desirable: int = 0  # kto: rows labelled good
    undesirable: int = 0  # kto: rows labelled bad
    sources: list[dict[str, Any]] = field(default_factory=list)  # a mix (data.sources): mix.SourceCount of each
    revisions: dict[str, str] = field(default_factory=dict)  # {Hub dataset id: the commit read}

    def add(self, tok: Tokenized) -> None:
        self.rows += 1
        self.truncated += tok.truncated
        self.total_tokens += len(tok.input_ids)
        self.trained_tokens += len(tok.labels) - tok.labels.count(IGNORE_INDEX)
        self.max_length = max(self.max_length, len(tok.input_ids))

    def add_preference(self, row: dict[str, Any]) -> None:
        """A dpo or kto train.jsonl row: its tokens the prompt and its longest completion, the completions trained."""
        length = row_length(row)
        self.rows += 1
        self.total_tokens += length
        self.trained_tokens += sum(len(row[k]) for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in row)
        self.max_length = max(self.max_length, length)
        if "label" in row:
            self.desirable += row["label"]
            self.undesirable += not row["label"]

    @property
    def mean_length(self) -> float:
        return round(self.total_tokens / self.rows, 1) if self.rows else 0.0


def pack_groups(lengths: Iterable[int], max_seq_length: int) -> list[list[int]]:
    """Which rows (by index) each packed sequence holds, by best-fit decreasing (TRL's `bfd`): longest first, each
    row into the sequence it leaves the least room in (of those with that room, the one that came to it first), else
    into a new one. The rows stay apart in training: each packed row records its rows' lengths (`seq_lengths`), and
    training gives each row its own positions and attention (stages/train_batches.py)."""
    order = sorted(range(len(lengths := list(lengths))), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    rooms: list[int] = []  # the room left in some sequence, each value once, ascending
    with_room: dict[int, deque[int]] = {}  # room -> the sequences with that much room, in the order they came to it
    for i in order:
        at = bisect.bisect_left(rooms, lengths[i])
        if at < len(rooms):
            room = rooms[at]
            group = with_room[room].popleft()
            if not with_room[room]:
                del with_room[room], rooms[at]
        else:
            room, group = max_seq_length, len(groups)
            groups.append([])
        groups[group].append(i)
        if (left := room - lengths[i]) > 0:
            if left not in with_room:
                bisect.insort(rooms, left)
                with_room[left] = deque()
            with_room[left].append(group)
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
        ends_answered = bool(rec.messages and rec.messages[-1].get("role") == "assistant")
        prompt = bool(rec.messages and rec.messages[-1].get("role") == "user")  # a GRPO prompt (grpo.py)
        if not (raw or ends_answered or prompt or rec.is_preference()):
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
    for name in ("chosen", "rejected"):  # preference records: messages is the prompt
        if getattr(rec, name) is not None:
            row[name] = getattr(rec, name)
    if rec.columns:  # GRPO prompts: the row's columns, for verify's reward check
        row["columns"] = rec.columns
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
                out.write(json.dumps({"input_ids": ids, "labels": labels,
                                      "seq_lengths": [self.lengths[i] for i in group], "source": "packed"},
                                     ensure_ascii=False) + "\n")
                self.packed += 1
        self.spool.unlink()


def prepare_data(cfg: DataConfig, tokenizer: Any, mapping: TemplateMapping, out_dir: Path, seed: int,
                 method: str = "sft") -> DataStats:
    """Validate, split, tokenize; write train.jsonl (sft: ids + labels; dpo and kto: prompt and completion ids),
    eval.jsonl (chats), train_sample.jsonl (a sample of the training chats, for verify when there are no eval rows)
    and stats.json. `method` (train.method) is sft, dpo, orpo or kto: what the data is prepared for, and read as
    (orpo trains the pairs dpo does: the same rows, checks and errors; stats.json names the method).

    The records stream from the source through the tokenizer into train.jsonl: memory stays flat in the rows
    (packing keeps two numbers a row; an eval split, one bit of bookkeeping a row and a counting pass first)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    train = mixed_stream(cfg, seed, method) if cfg.sources else _stream(cfg, cfg.train, "train", method)
    eval_stream, held = _eval_source(cfg, train, seed, method)
    stats = DataStats(layout=train.layout, method=method)
    sample = _TrainSample(TRAIN_SAMPLE_ROWS, seed)
    # Rows that train on nothing once tokenized (all past max_seq_length): bad rows too, skipped with the others
    trains_nothing: list[str] | None = [] if cfg.on_bad_row == "skip" else None
    packing = _packing(cfg, method)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        writer = _TrainWriter(tmp / "train.jsonl", packing, cfg.max_seq_length)
        try:
            with open(tmp / "eval.jsonl", "w", encoding="utf-8") as eval_fh:
                try:
                    if eval_stream is not None:
                        _write_eval(cfg, eval_stream, eval_fh, stats)
                    records: Iterable[Record] = train
                    if held:
                        records = _hold_out(train, held, eval_fh, stats)
                    for rec in _write_train(records, tokenizer, mapping, cfg, stats, writer, trains_nothing):
                        sample.offer(rec)
                except DataError:
                    train.check()
                    raise
        finally:
            writer.fh.close()
        stats.bad_rows = [*train.bad, *(trains_nothing or ())]
        stats.sources, stats.revisions = counted(train), hub_revisions((train, eval_stream))
        if not stats.rows:
            _no_rows_left(cfg, stats)
        writer.close()
        sample.write(tmp / TRAIN_SAMPLE_FILE)
        _warn(cfg, stats)
        _write_stats(tmp / "stats.json", cfg, stats, writer if packing else None, mapping)
    return stats


def _stream(cfg: DataConfig, spec: str, split: str, method: str) -> RecordStream:
    """The records of `spec`, read as the method reads them: supervised rows for sft, prompts for grpo, preference
    rows else."""
    if method == "grpo":
        return stream_grpo(cfg, spec, split)
    return stream_records(cfg, spec, split) if method == "sft" else stream_preference(cfg, spec, method, split)


def mixed_stream(cfg: DataConfig, seed: int, method: str) -> MixedStream:
    """data.sources' mix (mix.py), each source read as the method reads data, its eval rows held out as one dataset's
    would be unless data.eval is set."""
    def hold_out(n: int, index: int) -> set[int]:
        return held_out(n, cfg.eval_split, seed + index)

    def open_stream(own: DataConfig, spec: str, split: str) -> RecordStream:
        return _stream(own, spec, split, method)

    return MixedStream(cfg, seed, method, open_stream, None if cfg.eval else hold_out)


def _packing(cfg: DataConfig, method: str) -> bool:
    """Whether train.jsonl holds packed sequences: data.packing true (auto batches the rows without padding in
    training, from the rows as they are)."""
    if cfg.packing is True and method != "sft":
        log.warning("data.packing has no effect with --method %s: each %s is trained on its own", method,
                    "prompt" if method == "grpo" else "preference row")
    if cfg.train_on == "all" and method != "sft":
        log.warning("data.train_on=all has no effect with --method %s: the answers are what trains", method)
    return cfg.packing is True and method == "sft"


def _write_train(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, cfg: DataConfig,
                 stats: DataStats, writer: _TrainWriter, bad: list[str] | None) -> Iterator[Record]:
    """Tokenizes the records the method's way and writes their rows to train.jsonl; yields each record written."""
    if stats.method == "sft":
        for rec, tok in tokenize_records(records, tokenizer, mapping, cfg.max_seq_length, cfg.train_on, bad):
            stats.add(tok)
            writer.write(tok, rec.source)
            yield rec
        return
    if stats.method == "grpo":  # the prompts, measured as GRPOTrainer renders them; their answers are sampled
        for rec, n in tokenize_prompts(records, tokenizer, cfg.max_seq_length, bad):
            stats.rows += 1
            stats.total_tokens += n
            stats.max_length = max(stats.max_length, n)
            writer.fh.write(json.dumps(grpo_train_row(rec), ensure_ascii=False) + "\n")
            yield rec
        return
    for rec, ids in tokenize_preference(records, tokenizer, mapping, cfg.max_seq_length, bad):
        for row in ids.rows(stats.method):  # kto: a pair is two rows
            stats.add_preference(row)
            writer.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats.truncated += ids.truncated
        yield rec


def _warn(cfg: DataConfig, stats: DataStats) -> None:
    if stats.bad_rows:
        log.warning("skipped %d bad rows (--on-bad-row skip):\n  %s", len(stats.bad_rows),
                    "\n  ".join(stats.bad_rows[:20]))
    if stats.truncated:
        what = "conversations were" if stats.method == "sft" else "preference rows had completions that were"
        log.warning("%d of %d %s longer than max_seq_length=%d and were truncated", stats.truncated, stats.rows, what,
                    cfg.max_seq_length)


def _no_rows_left(cfg: DataConfig, stats: DataStats) -> None:
    name = "data.sources" if cfg.sources else cfg.train
    if stats.bad_rows and not stats.eval_rows:
        raise DataError(f"{name}: no usable rows ({len(stats.bad_rows)} bad rows skipped):\n  "
                        + "\n  ".join(stats.bad_rows[:20]))
    raise DataError(f"{name}: no rows left to train on after holding out {stats.eval_rows} for eval "
                    f"(data.eval_split={cfg.eval_split})")


def _eval_source(cfg: DataConfig, train: RecordStream | MixedStream, seed: int,
                 method: str = "sft") -> tuple[Iterable[Record] | None, set[int]]:
    """Where the eval rows come from: a stream of their own (data.eval, or the demo's eval split), or the indices of
    the training rows held out for eval (data.eval_split; unset, only where the data can spare them); for a mix,
    data.eval and each source's own (mix.MixedStream.eval_records)."""
    if isinstance(train, MixedStream):
        return train.eval_records(_stream(cfg, cfg.eval, "eval", method) if cfg.eval else None), set()
    try:
        if cfg.eval:
            return _stream(cfg, cfg.eval, "eval", method), set()
        if cfg.train == DEMO_DATA and not cfg.eval_split:
            return _stream(cfg, DEMO_DATA, "eval", method), set()
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


def _write_eval(cfg: DataConfig, eval_stream: Iterable[Record], eval_fh: IO[str], stats: DataStats) -> None:
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


def _write_stats(path: Path, cfg: DataConfig, stats: DataStats, writer: _TrainWriter | None,
                 mapping: TemplateMapping) -> None:
    out: dict[str, Any] = {
        "rows": stats.rows, "eval_rows": stats.eval_rows, "truncated": stats.truncated,
        "trained_tokens": stats.trained_tokens, "total_tokens": stats.total_tokens,
        "max_length": stats.max_length, "max_seq_length": cfg.max_seq_length, "mean_length": stats.mean_length,
        "train_source": "data.sources" if cfg.sources else cfg.train, "layout": stats.layout,
        "bad_rows": len(stats.bad_rows),
        "packed_sequences": writer.packed if writer is not None else None, "chat_format": mapping.format.name,
    }
    # sft's stats.json stays as it was (a reader takes a missing "method" for sft, as in data prepared before dpo)
    if stats.method != "sft":
        out["method"] = stats.method
    if stats.method == "kto":
        out.update(desirable=stats.desirable, undesirable=stats.undesirable)
    if stats.sources:
        out["sources"] = stats.sources
    if stats.revisions:
        out["revisions"] = stats.revisions
    path.write_text(json.dumps(out, indent=2))


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
    """sft's train.jsonl rows: input_ids and labels, and a packed sequence's seq_lengths (its rows' lengths)."""
    path = data_dir / "train.jsonl"
    with open(path, encoding="utf-8") as fh:
        rows = [{k: r[k] for k in ("input_ids", "labels", "seq_lengths") if k in r} for r in map(json.loads, fh)]
    if rows and "seq_lengths" not in rows[0] and _packed_by_an_older_version(data_dir):
        raise DataError(f"{path}: its packed rows do not say where each row ends (packed by an older ftdeploy, whose "
                        "packing let rows attend to each other); prepare the data again: `ftdeploy data`, or "
                        "`ftdeploy train-and-serve --force data`")
    return rows


def _packed_by_an_older_version(data_dir: Path) -> bool:
    stats = data_dir / "stats.json"
    return stats.is_file() and json.loads(stats.read_text()).get("packed_sequences") is not None


def load_preference_rows(data_dir: Path) -> list[dict[str, Any]]:
    """dpo's or kto's train.jsonl rows, without their source: dpo {"prompt_ids", "chosen_ids", "rejected_ids"}, kto
    {"prompt_ids", "completion_ids", "label"}."""
    with open(data_dir / "train.jsonl", encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k != "source"} for r in map(json.loads, fh)]


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
                       match=r.get("match", "contains"), tools=r.get("tools"), chosen=r.get("chosen"),
                       rejected=r.get("rejected"), columns=r.get("columns") or {})
                for r in map(json.loads, fh)]
