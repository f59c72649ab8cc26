"""prepare_vision_data: a vision base's data stage. Image chats (and text chats mixed in) stream from the source
(images.py reads every layout), each image is kept once in the data directory, and every training chat is measured
with the base's processor, as training will tokenize it (ftdeploy/stages/train_vision.py: the images' tokens expanded,
loss on the assistant turns):

  images/<sha256>.<ext>   every image once, by content
  train.jsonl             {"messages" (image parts in place), "images" (file names, in order), "untrained",
                          "source", "length", "trained"} a row: training renders and tokenizes them again, with the
                          pixels, so nothing here depends on a tokenizer's ids being stored
  eval.jsonl              the eval chats (data.eval, or rows held out as the text data stage holds them out), with
                          their images and `expect`
  train_sample.jsonl      a sample of the training chats: what verify asks when there are no eval rows
  stats.json              rows, tokens, the longest row, images, as the text data stage writes them

A row longer than data.max_seq_length is a bad row (cutting it could cut an image's tokens apart), and so is one that
trains nothing; both named by file:line.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..runs import atomic_path
from ..templates import TemplateMapping
from .formats import MAX_LISTED, Record, stream_records
from .writer import TRAIN_SAMPLE_FILE, TRAIN_SAMPLE_ROWS, eval_rows_to_hold_out

log = logging.getLogger(__name__)

IMAGES_DIR = "images"


@dataclass
class VisionStats:
    rows: int = 0
    eval_rows: int = 0
    images: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    max_length: int = 0
    layout: str = ""
    bad_rows: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each distinct image


def prepare_vision_data(cfg: DataConfig, processor: Any, mapping: TemplateMapping, out_dir: Path, seed: int,
                        method: str = "sft") -> VisionStats:
    """Write the data directory (see the module's doc) and return its statistics."""
    if method != "sft":
        raise ConfigError(f"train.method {method}: vision models train with sft only (yet)")
    if cfg.sources:
        raise ConfigError("data.sources: a mix of datasets is not supported for vision models yet; give one dataset")
    with atomic_path(out_dir) as tmp:
        (tmp / IMAGES_DIR).mkdir(parents=True)
        stats = VisionStats()
        stream = stream_records(cfg, cfg.train, "train", images=True)
        rows = [_stored(rec, tmp, stats) for rec in stream]
        stats.layout, stats.bad_rows = stream.layout, list(stream.bad)
        if cfg.eval:
            eval_stream = stream_records(cfg, cfg.eval, "eval", images=True)
            evals = [_stored(rec, tmp, stats) for rec in eval_stream]
        else:
            held = set(random.Random(seed).sample(range(len(rows)), eval_rows_to_hold_out(len(rows), cfg.eval_split)))
            evals = [r for i, r in enumerate(rows) if i in held]
            rows = [r for i, r in enumerate(rows) if i not in held]
        kept = _measured(rows, processor, cfg, tmp, stats)
        _write_jsonl(tmp / "train.jsonl", kept)
        _write_jsonl(tmp / "eval.jsonl", evals)
        sample = sorted(random.Random(seed).sample(range(len(kept)), min(TRAIN_SAMPLE_ROWS, len(kept))))
        _write_jsonl(tmp / TRAIN_SAMPLE_FILE, [kept[i] for i in sample])
        stats.rows, stats.eval_rows = len(kept), len(evals)
        (tmp / "stats.json").write_text(json.dumps({
            "rows": stats.rows, "eval_rows": stats.eval_rows, "truncated": 0, "trained_tokens": stats.trained_tokens,
            "total_tokens": stats.total_tokens, "max_length": stats.max_length, "max_seq_length": cfg.max_seq_length,
            "mean_length": round(stats.total_tokens / max(stats.rows, 1), 1), "train_source": cfg.train,
            "layout": stats.layout, "bad_rows": len(stats.bad_rows), "packed_sequences": None,
            "chat_format": mapping.format.name, "images": stats.images, "vision": True}, indent=2))
    return stats


def _stored(rec: Record, folder: Path, stats: VisionStats) -> dict[str, Any]:
    """A record as a row of the data directory, its images written once each under images/."""
    names = []
    for image in rec.images:
        name = f"{image.digest}{_suffix(image.data)}"
        path = folder / IMAGES_DIR / name
        if not path.exists():
            path.write_bytes(image.data)
            stats.images += 1
            stats.image_sizes.append((image.width, image.height))
        names.append(name)
    row: dict[str, Any] = {"messages": rec.messages, "images": names, "source": rec.source}
    if rec.untrained:
        row["untrained"] = list(rec.untrained)
    if rec.expect is not None:
        row.update(expect=rec.expect, match=rec.match)
    return row


def _suffix(data: bytes) -> str:
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"RIFF", ".webp"),
                          (b"BM", ".bmp")):
        if data.startswith(magic):
            return suffix
    return ".img"


def _measured(rows: list[dict[str, Any]], processor: Any, cfg: DataConfig, folder: Path,
              stats: VisionStats) -> list[dict[str, Any]]:
    """Each training row with its length and trained tokens as training will see them; a row over max_seq_length
    or training nothing is a bad row (an error naming every bad row, or dropped with on_bad_row skip)."""
    from .image_labels import tokenize_example

    kept, bad = [], []
    for row in rows:
        try:
            example = tokenize_example(processor, row["messages"], load_images(folder, row["images"]),
                                       tuple(row.get("untrained", ())), cfg.train_on)
        except DataError as exc:
            bad.append(f"{row['source']}: {exc}")
            continue
        if example.length > cfg.max_seq_length:
            bad.append(f"{row['source']}: {example.length} tokens with its images' tokens, more than "
                       f"data.max_seq_length {cfg.max_seq_length} (a row with images is never cut: raise "
                       "data.max_seq_length or make the images smaller)")
        elif not example.trained:
            bad.append(f"{row['source']}: nothing to train (no assistant answer)")
        else:
            kept.append({**row, "length": example.length, "trained": example.trained})
            stats.trained_tokens += example.trained
            stats.total_tokens += example.length
            stats.max_length = max(stats.max_length, example.length)
    stats.bad_rows += bad
    if bad and cfg.on_bad_row == "error":
        listed = "\n  ".join(bad[:MAX_LISTED])
        raise DataError(f"{cfg.train}: {len(bad)} bad row{'s' * (len(bad) > 1)} (--on-bad-row skip to drop "
                        f"them):\n  {listed}")
    if not kept:
        raise DataError(f"{cfg.train}: no usable rows ({len(bad)} bad rows)")
    return kept


def load_images(data_dir: Path, names: list[str]) -> list[bytes]:
    return [(data_dir / IMAGES_DIR / name).read_bytes() for name in names]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def load_vision_rows(data_dir: Path, name: str = "train.jsonl") -> list[dict[str, Any]]:
    path = data_dir / name
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def is_vision_data(data_dir: Path) -> bool:
    """Data a vision base's data stage prepared (stats.json says so)."""
    path = data_dir / "stats.json"
    try:
        return bool(json.loads(path.read_text()).get("vision"))
    except (OSError, ValueError):
        return False


def inspect_vision_data(cfg: DataConfig, spec: str | None, processor: Any, mapping: TemplateMapping,
                        plot_path: Path | None) -> Any:
    """`ftdeploy data inspect` for a vision base: the layout, rows, images per row and their sizes, token lengths
    as training sees them (the images' tokens included), and one image chat with its trained spans marked."""
    from collections import Counter

    from .inspect import Bucket, DataInspection, ImageStats, InspectedExample, _plot, histogram, length_stats

    spec = spec or cfg.train
    stream = stream_records(cfg, spec, "train", images=True)
    lengths: list[int] = []
    bad: list[str] = []
    per_row: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    example = None
    for rec in stream:
        data = [im.data for im in rec.images]
        try:
            tok = tokenize_example_for(processor, rec, data, cfg.train_on)
        except DataError as exc:
            bad.append(f"{rec.source}: {exc}")
            continue
        if tok.length > cfg.max_seq_length:
            bad.append(f"{rec.source}: {tok.length} tokens with its images' tokens, more than data.max_seq_length "
                       f"{cfg.max_seq_length}")
            continue
        lengths.append(tok.length)
        per_row[str(len(rec.images))] += 1
        sizes.update(f"{im.width}x{im.height}" for im in rec.images)
        if example is None or (rec.images and not example[1]):
            example = (rec.source, bool(rec.images), _marked(processor, tok))
    bad = [*stream.bad, *bad]
    if not lengths or example is None:
        raise DataError(f"{spec}: no usable rows ({len(bad)} bad rows):\n  " + "\n  ".join(bad[:20]))
    by_pixels = sorted(sizes, key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1]))
    images = ImageStats(rows_with_images=sum(n for k, n in per_row.items() if k != "0"),
                        images=sum(int(k) * n for k, n in per_row.items()), per_row=dict(sorted(per_row.items())),
                        sizes=dict(sizes.most_common(20)), smallest=by_pixels[0] if by_pixels else "",
                        largest=by_pixels[-1] if by_pixels else "")
    result = DataInspection(
        format=stream.layout, rows=len(lengths), bad_rows=len(bad), bad=bad[:50], tool_rows=0, tool_calls=0,
        truncated=0, max_seq_length=cfg.max_seq_length, tokens=length_stats(lengths),
        histogram=[Bucket(low=lo, high=hi, count=c) for lo, hi, c in histogram(lengths)],
        chat_format=mapping.format.name, example=InspectedExample(source=example[0], rendered=example[2], tools=False),
        images=images)
    if plot_path is not None:
        _plot(lengths, cfg.max_seq_length, f"{Path(spec).name}: {len(lengths)} examples ({stream.layout})", plot_path)
        result.plot = str(plot_path)
    return result


def tokenize_example_for(processor: Any, rec: Record, images: list[bytes], train_on: str) -> Any:
    from .image_labels import tokenize_example

    return tokenize_example(processor, rec.messages or [], images, tuple(rec.untrained), train_on)


def _marked(processor: Any, example: Any) -> str:
    """The example as the model sees it, trained spans in [[ ]], each image's run of tokens shown once with its
    count."""
    from .labels import IGNORE_INDEX

    tok, ids = processor.tokenizer, example.features["input_ids"][0].tolist()
    image_token = getattr(processor, "image_token_id", None)
    out, trained, run = [], False, 0
    for i, (token, label) in enumerate(zip(ids, example.labels, strict=True)):
        if token == image_token:
            run += 1
            if i + 1 < len(ids) and ids[i + 1] == image_token:
                continue
            out.append(f"{tok.decode([token])}x{run}")
            run = 0
            continue
        if (label != IGNORE_INDEX) != trained:
            out.append("[[" if not trained else "]]")
            trained = not trained
        out.append(tok.decode([token]))
    return "".join(out) + ("]]" if trained else "")
