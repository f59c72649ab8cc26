"""Data stage: chat JSONL in, tokenized examples with assistant-only labels out.

Each conversation is rendered with the base model's own chat template. Loss falls on the
assistant turns only (by default), and each assistant turn's end-of-turn token is inside the
loss, so the model learns to stop. A row that would train on nothing is an error naming it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import DEMO_DATA, DataConfig
from ..errors import DataError
from ..formats import Columns, LoadResult, Record, load_records
from ..runs import atomic_path
from ..templates import TemplateMapping

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


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
    layout: str = ""
    bad_rows: list[str] = field(default_factory=list)


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
    return load_records(source, cfg.format, columns, cfg.on_bad_row, cfg.system_prompt, cfg.hub_config, cfg.split)


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
    for tok, (start, _end) in zip(ids, offsets, strict=True):
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


def tokenize_text(text: str, tokenizer: Any, max_seq_length: int) -> Tokenized:
    """Continued pre-training: the whole text, then EOS, every token trained."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(ids) > max_seq_length
    ids = ids[:max_seq_length]
    return Tokenized(ids, list(ids), truncated)


def pack(rows: list[dict[str, Any]], max_seq_length: int) -> list[dict[str, Any]]:
    """Greedy packing of tokenized rows into sequences of at most max_seq_length (labels kept per row).

    As in TRL's wrapped packing, packed conversations attend to each other; it trades that for
    fewer pad tokens on many short rows."""
    packed: list[dict[str, Any]] = []
    current: dict[str, Any] = {"input_ids": [], "labels": [], "source": "packed"}
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        if current["input_ids"] and len(current["input_ids"]) + len(row["input_ids"]) > max_seq_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "source": "packed"}
        current["input_ids"] = current["input_ids"] + row["input_ids"]
        current["labels"] = current["labels"] + row["labels"]
    if current["input_ids"]:
        packed.append(current)
    return packed


def split_eval(examples: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
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
    loaded = read_records(cfg, cfg.train, "train")
    examples = loaded.records
    if cfg.eval:
        eval_examples = read_records(cfg, cfg.eval, "eval").records
    elif cfg.train == DEMO_DATA and cfg.eval_split == 0:
        eval_examples = read_records(cfg, DEMO_DATA, "eval").records
    else:
        examples, eval_examples = split_eval(examples, cfg.eval_split, seed)
    if loaded.bad:
        log.warning("skipped %d bad rows (--on-bad-row skip):\n  %s", len(loaded.bad), "\n  ".join(loaded.bad[:20]))

    stats = DataStats(rows=len(examples), eval_rows=len(eval_examples), layout=loaded.layout, bad_rows=loaded.bad)
    tokenized = []
    for ex in examples:
        if ex.text is not None:
            tok = tokenize_text(ex.text, tokenizer, cfg.max_seq_length)
        else:
            assert ex.messages is not None, "a record holds text or messages"
            tok = tokenize_conversation(ex.messages, tokenizer, mapping, cfg.max_seq_length, cfg.train_on, ex.source)
        stats.truncated += tok.truncated
        stats.total_tokens += len(tok.input_ids)
        stats.trained_tokens += sum(1 for lab in tok.labels if lab != IGNORE_INDEX)
        stats.lengths.append(len(tok.input_ids))
        tokenized.append({"input_ids": tok.input_ids, "labels": tok.labels, "source": ex.source})
    if cfg.packing:
        tokenized = pack(tokenized, cfg.max_seq_length)
    if stats.truncated:
        log.warning("%d of %d conversations were longer than max_seq_length=%d and were truncated",
                    stats.truncated, stats.rows, cfg.max_seq_length)

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_jsonl(tmp / "train.jsonl", tokenized)
        _write_jsonl(tmp / "eval.jsonl", (
            {"messages": e.messages, "expect": e.expect, "match": e.match, "source": e.source}
            for e in eval_examples if e.messages))
        (tmp / "stats.json").write_text(json.dumps({
            "rows": stats.rows, "eval_rows": stats.eval_rows, "truncated": stats.truncated,
            "trained_tokens": stats.trained_tokens, "total_tokens": stats.total_tokens,
            "max_length": max(stats.lengths), "mean_length": round(sum(stats.lengths) / len(stats.lengths), 1),
            "train_source": cfg.train, "layout": loaded.layout, "bad_rows": len(loaded.bad),
            "packed_sequences": len(tokenized) if cfg.packing else None, "chat_format": mapping.format.name,
        }, indent=2))
    return stats


def load_tokenized(data_dir: Path) -> list[dict[str, list[int]]]:
    path = data_dir / "train.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in map(json.loads, fh)]


def load_eval(data_dir: Path) -> list[Record]:
    path = data_dir / "eval.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [Record(r.get("source", ""), messages=r["messages"], expect=r.get("expect"),
                       match=r.get("match", "contains"))
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
    loaded = read_records(cfg, spec, "train")
    lengths, example, truncated = [], None, 0
    for rec in loaded.records:
        if rec.text is not None:
            tok = tokenize_text(rec.text, tokenizer, cfg.max_seq_length)
        else:
            assert rec.messages is not None, "a record holds text or messages"
            tok = tokenize_conversation(rec.messages, tokenizer, mapping, cfg.max_seq_length, cfg.train_on, rec.source)
        lengths.append(len(tok.input_ids))
        truncated += tok.truncated
        if example is None:
            example = {"source": rec.source, "rendered": mark_trained(tokenizer, tok)}
    result = {
        "format": loaded.layout, "rows": len(loaded.records), "bad_rows": len(loaded.bad), "bad": loaded.bad[:50],
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
        ax.set_title(f"{Path(spec).name}: {len(lengths)} examples ({loaded.layout})")
        ax.legend()
        fig.tight_layout()
        with atomic_path(plot_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        result["plot"] = str(plot_path)
    return result
