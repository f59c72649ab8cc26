"""Several datasets mixed into one training set (data.sources), as LLaMA-Factory's interleave probabilities and
Axolotl's dataset weights do, drawn with the seed and reported source by source.

What the mix is (README, "Mixing datasets"):

* a source's rows: its usable records, read and checked as one dataset's are (its layout detected on its own, its
  bad rows named by its own file and line, an error or dropped as data.on_bad_row says);
* eval rows: data.eval when it is set (then nothing is held out), plus each source's eval_path; a source without
  one holds out rows as one dataset would (data.eval_split; unset, 5% of a source of 200 rows or more, at most 50),
  and the demo its own eval split. Held-out rows never train, so none is repeated into training;
* max_rows: at most that many of a source's other rows enter the pool (a sample fixed by the seed);
* weight, on every source or on none: each source's share of the mixed rows. The mix is as large as the scarcest
  source allows, so no row repeats and the others give a sample; with data.oversample, as large as the most
  plentiful source needs, the others' rows repeated as evenly as the count allows (each row k or k+1 times).
  Without weights, the mix is every pooled row of every source;
* the sources are interleaved at random (each source's rows in file order, a repeated row once per pass), fixed by
  the seed;
* the sources must be the kind of data the method trains: one file of chats and one of preference pairs is an
  error naming both.

Memory stays a few bytes a row (each row's count in the mix); each source is read again for each pass.
"""

from __future__ import annotations

import itertools
import math
import random
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..config import DataConfig
from ..defaults import DEMO_DATA
from ..errors import DataError
from .formats import Columns, Record, RecordStream, preference_kind
from .sources import iter_rows

# (data config, spec, split) -> the stream the method reads it with (writer.py's _stream)
OpenStream = Callable[[DataConfig, str, str], RecordStream]
# (rows, source index) -> the indices held out for eval
HoldOut = Callable[[int, int], set[int]]
_OWN_KEYS = ("format", "columns", "split", "hub_config", "revision")


@dataclass
class SourceCount:
    """What the mix did with one source: the data stage's stats and `ftdeploy data inspect` show these."""

    path: str
    layout: str = ""
    revision: str | None = None  # the commit read, for a Hub dataset
    rows: int = 0  # usable rows read
    bad_rows: int = 0
    eval_rows: int = 0  # its rows taken for eval: held out, or its eval_path's
    kept: int = 0  # the rows it gave the mix, repeats counted
    share: float = 0.0  # kept / the rows of the mix
    weight: float | None = None
    max_rows: int | None = None


@dataclass
class _Source:
    path: str
    cfg: DataConfig  # the data section with the source's own settings
    weight: float | None
    max_rows: int | None
    eval_path: str | None  # where its eval rows are read from (the demo's eval split for the demo), or None


def mix_sources(cfg: DataConfig) -> list[_Source]:
    """data.sources, each with the data section's settings where it sets none of its own."""
    out = []
    for source in cfg.sources:
        own = {key: value for key in _OWN_KEYS if (value := getattr(source, key)) is not None}
        eval_path = source.eval_path
        if eval_path is None and source.path == DEMO_DATA and not cfg.eval_split and not cfg.eval:
            eval_path = DEMO_DATA  # as for data.train demo: the demo's own eval split
        out.append(_Source(source.path, cfg.model_copy(update={**own, "sources": []}), source.weight, source.max_rows,
                           eval_path))
    return out


def plan_mix(pools: list[int], weights: list[float] | None, oversample: bool = False) -> list[int]:
    """How many rows each source gives the mix, from the rows each can give (`pools`) and their weights (None:
    all of them). Without `oversample`, no source gives more than its pool; the counts follow the weights as
    closely as whole rows can (largest remainders)."""
    if weights is None:
        return list(pools)
    if any(p <= 0 for p in pools):
        return [0] * len(pools)
    shares = [w / sum(weights) for w in weights]
    ratios = [pool / share for pool, share in zip(pools, shares, strict=True)]
    size = max(ratios) if oversample else min(ratios)
    exact = [size * share for share in shares]
    counts = [math.floor(e + 1e-9) for e in exact]
    if not oversample:
        counts = [min(c, pool) for c, pool in zip(counts, pools, strict=True)]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i]):
        if sum(counts) >= round(size):
            break
        if oversample or counts[i] < pools[i]:
            counts[i] += 1
    return counts


def row_counts(n: int, held: set[int], pool_size: int, take: int, rng: random.Random) -> array[int]:
    """How many times each of a source's `n` rows enters the mix: `take` rows drawn from a pool of `pool_size` of the
    rows not `held`, the pool repeated (each row k or k+1 times) where `take` is larger."""
    counts = array("I", bytes(4 * n))
    free = array("L", (j for j in range(n) if j not in held))
    pool = free if pool_size >= len(free) else sorted(free[k] for k in rng.sample(range(len(free)), pool_size))
    if not pool or not take:
        return counts
    if take <= len(pool):
        for k in range(len(pool)) if take == len(pool) else rng.sample(range(len(pool)), take):
            counts[pool[k]] = 1
        return counts
    times, extra = divmod(take, len(pool))
    for j in pool:
        counts[j] = times
    for k in rng.sample(range(len(pool)), extra):
        counts[pool[k]] += 1
    return counts


def source_kind(source: _Source) -> str | None:
    """What kind of data a source is, from its first rows (None: it cannot be read)."""
    if source.path == DEMO_DATA:
        return "supervised rows (one answer a row)"
    columns = Columns(**source.cfg.columns) if source.cfg.columns else Columns()
    kinds: dict[str, int] = {}
    try:
        rows = itertools.islice(iter_rows(source.path, source.cfg.hub_config, source.cfg.split, source.cfg.revision),
                                200)
        for _, row in rows:
            kind = preference_kind(row, columns) if isinstance(row, dict) else None
            label = "supervised rows (one answer a row)" if kind is None else \
                "KTO-labelled answers" if "KTO" in kind else "preference pairs (chosen/rejected)"
            kinds[label] = kinds.get(label, 0) + 1
    except DataError:
        return None
    return max(kinds, key=lambda k: kinds[k]) if kinds else None


class MixedStream:
    """The records of the mix, as a RecordStream gives one dataset's: iterated (a fresh pass each time), `layout`
    (the sources' layouts joined by +), `bad` (every source's bad rows), `records`; and `eval_records`, `counts`
    (SourceCount for each source) and `revisions` (the Hub commits read). Built with a counting pass over each
    source, which raises its bad-row errors."""

    def __init__(self, cfg: DataConfig, seed: int, method: str, open_stream: OpenStream, hold_out: HoldOut | None):
        self.sources = mix_sources(cfg)
        self.method, self.seed, self._open = method, seed, open_stream
        self.streams = self._open_all()
        self.layout = "+".join(dict.fromkeys(s.layout for s in self.streams))
        for stream in self.streams:
            stream.check()  # the counting pass: every source's own bad-row errors, before anything is drawn
        self.bad = [line for stream in self.streams for line in stream.bad]
        self.counts = [SourceCount(src.path, s.layout, s.revision, s.records, len(s.bad), weight=src.weight,
                                   max_rows=src.max_rows) for src, s in zip(self.sources, self.streams, strict=True)]
        self.held = [hold_out(s.records, i) if hold_out is not None and src.eval_path is None else set()
                     for i, (src, s) in enumerate(zip(self.sources, self.streams, strict=True))]
        pools = [min(s.records - len(held), src.max_rows or s.records)
                 for src, s, held in zip(self.sources, self.streams, self.held, strict=True)]
        for src, pool, held in zip(self.sources, pools, self.held, strict=True):
            if pool <= 0:
                raise DataError(f"{src.path}: no rows left for the mix after holding out {len(held)} for eval "
                                "(data.eval_split, or give the source an eval_path)")
        weights = [float(src.weight) for src in self.sources if src.weight is not None] or None
        takes = plan_mix(pools, weights, cfg.oversample)
        self.rows = [row_counts(s.records, held, pool, take, random.Random(f"{seed}/mix/{i}"))
                     for i, (s, held, pool, take) in enumerate(zip(self.streams, self.held, pools, takes, strict=True))]
        self.records = sum(takes)
        for count, held, take in zip(self.counts, self.held, takes, strict=True):
            count.eval_rows, count.kept = len(held), take
            count.share = round(take / self.records, 4) if self.records else 0.0
        self._eval_streams: list[RecordStream] = []

    def _open_all(self) -> list[RecordStream]:
        streams = []
        for i, source in enumerate(self.sources):
            try:
                streams.append(self._open(source.cfg, source.path, "train"))
            except DataError as exc:
                _refuse_mixed_kinds(self.sources, i, self.method, exc)
                raise
        return streams

    def __iter__(self) -> Iterator[Record]:
        """The sources interleaved at random, each giving its rows in file order, fixed by the seed."""
        rng = random.Random(f"{self.seed}/interleave")
        passes = [self._drawn(i) for i in range(len(self.sources))]
        left = [c.kept for c in self.counts]
        total = sum(left)
        while total:
            at, i = rng.randrange(total), 0
            while at >= left[i]:
                at -= left[i]
                i += 1
            rec = next(passes[i], None)
            if rec is None:
                raise DataError(f"{self.sources[i].path}: gave fewer rows than when it was counted; did it change "
                                "while the data stage read it?")
            left[i] -= 1
            total -= 1
            yield rec

    def _drawn(self, i: int) -> Iterator[Record]:
        """Source i's rows in the mix: one pass for each time a row is repeated."""
        counts = self.rows[i]
        for times in range(1, max(counts, default=0) + 1):
            for j, rec in enumerate(self.streams[i]):
                if counts[j] >= times:
                    yield rec

    def check(self) -> None:
        """The counting pass has run at construction: nothing is left to check."""

    def eval_records(self, shared: RecordStream | None = None) -> Iterator[Record]:
        """The eval rows: `shared` (data.eval), then each source's eval_path (or the demo's eval split), or the rows
        it held out. An eval_path with no chat in it is an error, as data.eval's is."""
        if shared is not None:
            self._eval_streams.append(shared)
            yield from shared
        for i, (source, count) in enumerate(zip(self.sources, self.counts, strict=True)):
            if source.eval_path is not None:
                stream = self._open(source.cfg, source.eval_path, "eval")
                self._eval_streams.append(stream)
                count.eval_rows = 0
                chats = 0
                for rec in stream:
                    count.eval_rows += 1
                    chats += bool(rec.messages)
                    yield rec
                if not chats and source.eval_path != DEMO_DATA:
                    raise DataError(f"{source.eval_path}: data.sources[{i}].eval_path has no conversations to verify "
                                    f"with ({count.eval_rows} rows, none a chat)")
            elif self.held[i]:
                yield from (rec for j, rec in enumerate(self.streams[i]) if j in self.held[i])

    @property
    def revisions(self) -> dict[str, str]:
        """{Hub dataset id: the commit read} for every Hub dataset of the mix and its eval rows."""
        return {s.spec: s.revision for s in (*self.streams, *self._eval_streams) if s.revision}

    def report(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.counts]


def _refuse_mixed_kinds(sources: list[_Source], failed: int, method: str, exc: DataError) -> None:
    """Where a source failed to open as the method's data and another source is data of another kind (chats beside
    preference pairs), the error names both: the mix is what is wrong, not one file."""
    kind = source_kind(sources[failed])
    if kind is None:
        return
    for other in sources:
        if other is sources[failed]:
            continue
        other_kind = source_kind(other)
        if other_kind is not None and other_kind != kind:
            raise DataError(f"data.sources: {other.path} holds {other_kind} and {sources[failed].path} holds {kind}; "
                            f"one mix trains one method (--method {method}), so its sources must be data of one kind "
                            f"({str(exc).splitlines()[0]})") from None


def counted(stream: RecordStream | MixedStream) -> list[dict[str, Any]]:
    """The mix's per-source counts (an empty list for one dataset)."""
    return stream.report() if isinstance(stream, MixedStream) else []


def hub_revisions(streams: Iterable[Any]) -> dict[str, str]:
    """{Hub dataset id: commit read} of these streams (a mix's, one dataset's, or None)."""
    out: dict[str, str] = {}
    for stream in streams:
        if isinstance(stream, MixedStream):
            out.update(stream.revisions)
        elif isinstance(stream, RecordStream) and stream.revision:
            out[stream.spec] = stream.revision
    return out
