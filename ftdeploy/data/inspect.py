"""inspect_data: what the data stage would make of a dataset, without writing it: the layout, row counts, token-length
statistics and histogram (and a plot of them), and one example as the model sees it, its trained spans marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..config import DataConfig
from ..errors import DataError
from ..runs import atomic_path
from ..templates import TemplateMapping
from .fast import tokenize_records
from .formats import stream_records
from .labels import IGNORE_INDEX, Tokenized


class TokenStats(BaseModel):
    min: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int


class Bucket(BaseModel):
    low: int
    high: int
    count: int


class InspectedExample(BaseModel):
    source: str
    rendered: str  # as the model sees it, trained spans between [[ ]]
    tools: bool


class DataInspection(BaseModel):
    """What `ftdeploy data inspect` shows (`--json`: to_dict)."""

    format: str  # the layout
    rows: int
    bad_rows: int
    bad: list[str]  # the first 50
    tool_rows: int
    tool_calls: int
    truncated: int
    max_seq_length: int
    tokens: TokenStats
    histogram: list[Bucket]
    chat_format: str
    example: InspectedExample
    plot: str | None = None  # where the plot was written; no key when none was

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude={"plot"} if self.plot is None else None)


def length_stats(lengths: list[int]) -> TokenStats:
    """Min, mean, percentiles and max of the token lengths (one at least)."""
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return TokenStats(min=ordered[0], mean=round(sum(ordered) / len(ordered), 1), p50=pct(50), p90=pct(90),
                      p99=pct(99), max=ordered[-1])


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
                 plot_path: Path | None) -> DataInspection:
    """Layout, row counts, token-length statistics and histogram, and one example with its trained span marked."""
    records = stream_records(cfg, spec, "train")
    lengths: list[int] = []
    example: InspectedExample | None = None
    truncated, tool_rows, tool_calls = 0, 0, 0
    trains_nothing: list[str] | None = [] if cfg.on_bad_row == "skip" else None  # bad rows found by tokenizing
    try:
        for rec, tok in tokenize_records(records, tokenizer, mapping, cfg.max_seq_length, cfg.train_on,
                                         trains_nothing):
            lengths.append(len(tok.input_ids))
            truncated += tok.truncated
            if rec.messages is not None and rec.uses_tools():
                tool_rows += 1
                tool_calls += sum(len(m.get("tool_calls", ())) for m in rec.messages)
            # The first row with tools is the example where there is one: its masking is the one worth seeing.
            if example is None or (tool_rows == 1 and rec.uses_tools() and not example.tools):
                example = InspectedExample(source=rec.source, rendered=mark_trained(tokenizer, tok),
                                           tools=rec.uses_tools())
    except DataError:
        records.check()  # the file's own errors (bad rows) come first
        raise
    bad = [*records.bad, *(trains_nothing or ())]
    if not lengths or example is None:
        raise DataError(f"{spec}: no usable rows ({len(bad)} bad rows skipped):\n  " + "\n  ".join(bad[:20]))
    result = DataInspection(
        format=records.layout, rows=len(lengths), bad_rows=len(bad), bad=bad[:50], tool_rows=tool_rows,
        tool_calls=tool_calls, truncated=truncated, max_seq_length=cfg.max_seq_length, tokens=length_stats(lengths),
        histogram=[Bucket(low=lo, high=hi, count=c) for lo, hi, c in histogram(lengths)],
        chat_format=mapping.format.name, example=example)
    if plot_path is not None:
        _plot(lengths, cfg.max_seq_length, f"{Path(spec).name}: {len(lengths)} examples ({records.layout})", plot_path)
        result.plot = str(plot_path)
    return result


def _plot(lengths: list[int], max_seq_length: int, title: str, path: Path) -> None:
    """The token lengths as a histogram PNG, max_seq_length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))))
    ax.axvline(max_seq_length, color="red", linestyle="--", label="max_seq_length")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
