"""inspect_data: what the data stage would make of a dataset, without writing it: the layout, row counts, token-length
statistics and histogram (and a plot of them), and one example as the model sees it, its trained spans marked. For
dpo and kto, the rows and lengths are train.jsonl's (a row: the prompt and its longest completion; kto trains a pair
as two rows) and the example shows the prompt with its chosen and rejected answers. For grpo, the lengths are the
prompts' (the answers are sampled in training) and the example shows the first prompt with its columns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..config import DataConfig
from ..errors import DataError
from ..results import SourceMix
from ..runs import atomic_path
from ..templates import TemplateMapping
from .fast import tokenize_records
from .formats import Record, RecordStream, stream_records
from .grpo import stream_grpo, tokenize_prompts
from .labels import IGNORE_INDEX, Tokenized
from .mix import MixedStream
from .preference import METHODS, stream_preference
from .preference_ids import PreferenceIds, row_length, tokenize_preference
from .writer import mixed_stream


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
    rendered: str  # as the model sees it, trained spans between [[ ]] (dpo, kto: the prompt, then each answer)
    tools: bool
    # dpo, kto: the prompt and the answers, decoded from the ids train.jsonl holds (None: no such answer; sft: none)
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None


class ImageStats(BaseModel):
    """A vision base's data: the images the rows hold."""

    rows_with_images: int
    images: int  # every image of every row (an image used twice counts twice)
    per_row: dict[str, int]  # images in a row -> rows with that many
    sizes: dict[str, int]  # "WxH" -> images of that size, the most common first (at most 20 sizes)
    smallest: str  # "WxH" of the image with the fewest pixels
    largest: str


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
    method: str = "sft"  # what the data was read as and measured for (train.method)
    desirable: int | None = None  # kto: rows labelled good
    undesirable: int | None = None  # kto: rows labelled bad
    sources: list[SourceMix] | None = None  # a mix (data.sources): each source's rows read, kept and share
    plot: str | None = None  # where the plot was written; no key when none was
    images: ImageStats | None = None  # a vision base: the rows' images (token lengths include their tokens)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON takes it; a key whose value is None (no plot, an sft example's answers) is left out."""
        return self.model_dump(exclude_none=True)


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


@dataclass
class _Seen:
    """What a pass over the data found: the train rows' token lengths, the example, the counts."""

    lengths: list[int] = field(default_factory=list)
    example: InspectedExample | None = None
    truncated: int = 0
    tool_rows: int = 0
    tool_calls: int = 0
    desirable: int = 0
    undesirable: int = 0

    def tools(self, rec: Record, messages: list[dict[str, Any]]) -> None:
        if rec.uses_tools():
            self.tool_rows += 1
            self.tool_calls += sum(len(m.get("tool_calls", ())) for m in messages)


def inspect_data(cfg: DataConfig, spec: str | None, tokenizer: Any, mapping: TemplateMapping,
                 plot_path: Path | None, method: str = "sft", seed: int = 3407) -> DataInspection:
    """Layout, row counts, token-length statistics and histogram, and one example with its trained span marked;
    `method` (sft, dpo, orpo, kto): what the data is read as, as prepare_data reads it. `spec` None: the config's
    data, data.train or the mix of data.sources drawn as the data stage draws it (`seed`: train.seed), its eval
    rows held out."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    trains_nothing: list[str] | None = [] if cfg.on_bad_row == "skip" else None  # bad rows found by tokenizing
    records: RecordStream | MixedStream
    if spec is None and cfg.sources:
        spec, records = "data.sources", mixed_stream(cfg, seed, method)
    else:
        spec = spec or cfg.train
        records = stream_records(cfg, spec, "train") if method == "sft" else \
            stream_grpo(cfg, spec) if method == "grpo" else stream_preference(cfg, spec, method)
    try:
        if method == "sft":
            seen = _seen_sft(records, tokenizer, mapping, cfg, trains_nothing)
        elif method == "grpo":
            seen = _seen_grpo(records, tokenizer, cfg, trains_nothing)
        else:
            seen = _seen_preference(records, tokenizer, mapping, cfg, trains_nothing, method)
    except DataError:
        records.check()  # the file's own errors (bad rows) come first
        raise
    bad = [*records.bad, *(trains_nothing or ())]
    if not seen.lengths or seen.example is None:
        raise DataError(f"{spec}: no usable rows ({len(bad)} bad rows skipped):\n  " + "\n  ".join(bad[:20]))
    lengths, kto = seen.lengths, method == "kto"
    result = DataInspection(
        format=records.layout, rows=len(lengths), bad_rows=len(bad), bad=bad[:50], tool_rows=seen.tool_rows,
        tool_calls=seen.tool_calls, truncated=seen.truncated, max_seq_length=cfg.max_seq_length,
        tokens=length_stats(lengths), histogram=[Bucket(low=lo, high=hi, count=c) for lo, hi, c in histogram(lengths)],
        chat_format=mapping.format.name, example=seen.example, method=method,
        desirable=seen.desirable if kto else None, undesirable=seen.undesirable if kto else None,
        sources=[SourceMix.from_dict(s) for s in records.report()] if isinstance(records, MixedStream) else None)
    if plot_path is not None:
        _plot(lengths, cfg.max_seq_length, f"{Path(spec).name}: {len(lengths)} examples ({records.layout})", plot_path)
        result.plot = str(plot_path)
    return result


def _seen_sft(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, cfg: DataConfig,
              trains_nothing: list[str] | None) -> _Seen:
    seen = _Seen()
    for rec, tok in tokenize_records(records, tokenizer, mapping, cfg.max_seq_length, cfg.train_on, trains_nothing):
        seen.lengths.append(len(tok.input_ids))
        seen.truncated += tok.truncated
        if rec.messages is not None:
            seen.tools(rec, rec.messages)
        # The first row with tools is the example where there is one: its masking is the one worth seeing.
        if seen.example is None or (seen.tool_rows == 1 and rec.uses_tools() and not seen.example.tools):
            seen.example = InspectedExample(source=rec.source, rendered=mark_trained(tokenizer, tok),
                                            tools=rec.uses_tools())
    return seen


def _seen_preference(records: Iterable[Record], tokenizer: Any, mapping: TemplateMapping, cfg: DataConfig,
                     trains_nothing: list[str] | None, method: str) -> _Seen:
    seen = _Seen()
    for rec, ids in tokenize_preference(records, tokenizer, mapping, cfg.max_seq_length, trains_nothing):
        for row in ids.rows(method):  # kto: a pair is two rows
            seen.lengths.append(row_length(row))
            if "label" in row:
                seen.desirable += row["label"]
                seen.undesirable += not row["label"]
        seen.truncated += ids.truncated
        answers = [m for m in (rec.chosen, rec.rejected) if m is not None]
        seen.tools(rec, [*(rec.messages or ()), *answers])
        if seen.example is None or (seen.tool_rows == 1 and rec.uses_tools() and not seen.example.tools):
            seen.example = preference_example(tokenizer, rec, ids)
    return seen


def _seen_grpo(records: Iterable[Record], tokenizer: Any, cfg: DataConfig, trains_nothing: list[str] | None) -> _Seen:
    """GRPO prompts: their lengths as GRPOTrainer renders them; the example, the first prompt so rendered (the answer
    that follows it is sampled in training) and the columns its reward functions get."""
    seen = _Seen()
    for rec, n in tokenize_prompts(records, tokenizer, cfg.max_seq_length, trains_nothing):
        seen.lengths.append(n)
        if seen.example is None:
            assert rec.messages is not None
            prompt = tokenizer.apply_chat_template(rec.messages, add_generation_prompt=True, tokenize=False)
            columns = json.dumps(rec.columns, ensure_ascii=False)
            seen.example = InspectedExample(source=rec.source, tools=False, prompt=prompt,
                                            rendered=f"{prompt}[[the sampled answer]]\n--- columns: {columns}")
    return seen


def preference_example(tokenizer: Any, rec: Record, ids: PreferenceIds) -> InspectedExample:
    """A preference row as the model sees it: the prompt, then each answer (the ids it trains) between [[ ]]."""
    prompt = tokenizer.decode(ids.prompt_ids)
    chosen = None if ids.chosen_ids is None else tokenizer.decode(ids.chosen_ids)
    rejected = None if ids.rejected_ids is None else tokenizer.decode(ids.rejected_ids)
    parts = [prompt]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if text is not None:
            parts.append(f"\n--- {name}, after the prompt:\n[[{text}]]")
    return InspectedExample(source=rec.source, rendered="".join(parts), tools=rec.uses_tools(), prompt=prompt,
                            chosen=chosen, rejected=rejected)


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
