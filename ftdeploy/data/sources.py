"""Where a dataset's rows come from: .jsonl, .json, .csv, .parquet files, a directory of them, a Hugging Face dataset
id (`datasets.load_dataset(id, config, split=...)`), or the bundled demo data.

Rows are read as they are iterated (memory flat in the rows); a .json file is one document and is read whole. Every
way a source can be unreadable ends as a DataError naming it; a row that is not JSON is yielded as a `BadRow`, so
the layout can list it with the other bad rows. Text files are read as UTF-8 with an optional BOM (`utf-8-sig`). A
value that looks like a path (a data suffix, ./ ../ / ~, or a first component that is a local directory) is never
tried as a Hub id.

Pure: no torch. `datasets` is imported only for Hub ids, pyarrow only for parquet.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TextIO

from ..assets import asset
from ..defaults import DEMO_DATA
from ..errors import DataError
from ..optional import require

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Suffixes that mark a value as a file path (never a Hub id), read or not: a missing one is "no such file".
PATH_SUFFIXES = (*FILE_SUFFIXES, ".txt", ".arrow", ".tsv", ".gz", ".zip", ".xlsx")
HUB_DATASET_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class BadRow:
    """A row (or a value inside one) that cannot be used, and why: listed with the other bad rows, not raised."""

    reason: str


def demo_path(split: str) -> Path:
    return asset("demo", f"{split}.jsonl")


def resolve_data_path(spec: str, split: str = "train") -> Path:
    return demo_path(split) if spec == DEMO_DATA else Path(spec).expanduser()


def iter_rows(spec: str, hub_config: str | None = None, split: str = "train",
              revision: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for every row of a file, a directory of files, or a Hub dataset (at `revision`, the commit
    hub.hub_revision resolved), read as they are iterated (a .json file is one document and is read whole)."""
    if not spec.strip():
        raise DataError("the data path is empty; give a file, a directory or a Hugging Face dataset id (owner/name)")
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # ~user for a user this machine does not have
        path = Path(spec)
    try:
        is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
    except OSError as exc:  # a name too long, for one
        raise DataError(f"{spec}: cannot look up this path ({exc.strerror or exc})") from None
    if is_dir:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: the directory holds no {', '.join(FILE_SUFFIXES)} files")
        for f in files:
            yield from _iter_file(f)
        return
    if is_file:
        yield from _iter_file(path)
        return
    if exists:
        raise DataError(f"{spec}: not a regular file or directory (a pipe or device cannot be read as a dataset)")
    if looks_like_path(spec):
        # Decided before any Hub lookup: a mistyped local path must not turn into network retries.
        raise _no_such_path(spec, path)
    if HUB_DATASET_RE.match(spec):
        yield from _iter_hub(spec, hub_config, split, revision)
        return
    raise DataError(f"{spec}: no such file or directory, and not a Hugging Face dataset id (owner/name)")


def _no_such_path(spec: str, path: Path) -> DataError:
    absolute = Path(os.path.abspath(path))
    missing_dir = "" if absolute.parent.is_dir() else f"; the directory {absolute.parent} does not exist either"
    return DataError(f"{spec}: no such file or directory (looked for {absolute}{missing_dir})")


def check_local_path(spec: str) -> None:
    """The "no such file" error at once, for a value meant as a local path that is not there: callers run
    this before loading a tokenizer or making a run, so a typo costs no time and leaves nothing."""
    if not spec.strip() or not looks_like_path(spec):
        return
    try:
        path = Path(spec).expanduser()
        missing = not path.exists()
    except (RuntimeError, OSError):
        return  # iter_rows says what is wrong with it
    if missing:
        raise _no_such_path(spec, path)


def looks_like_path(spec: str) -> bool:
    """Whether `spec` is meant as a local path rather than a Hub id: a data-file suffix, an explicit
    ./ ../ / ~ start, or a first component that is a local directory (`data/train` when data/ exists)."""
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if PurePath(spec).suffix.lower() in PATH_SUFFIXES:
        return True
    first = spec.replace("\\", "/").split("/", 1)[0]
    try:
        return "/" in spec.replace("\\", "/") and Path(first).is_dir()
    except OSError:
        return False


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    """The one place a data file is opened: every way it can be unreadable ends as a DataError naming it."""
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    try:
        yield from reader(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """One JSON value a line; a file that is one JSON array instead (pretty-printed, or on one line), as exports and
    editors write one under .jsonl, is read as that array, each row named by the line it starts on."""
    if _starts_an_array(path):
        rows = _json_array(path)
        if rows is not None:
            yield from rows
            return
    with _open_text(path, "JSONL", newline=None) as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            text = line.rstrip("\n")  # the line's end is not part of its JSON: a cut-off line says so, not "control"
            try:
                yield f"{path}:{lineno}", json.loads(text)
            except json.JSONDecodeError as exc:
                yield f"{path}:{lineno}", BadRow(f"not JSON ({json_error(exc, text)})")
            except (ValueError, RecursionError) as exc:  # a 5,000-digit number, brackets nested past the stack
                yield f"{path}:{lineno}", BadRow(f"not usable JSON ({json_reason(exc)})")


def json_error(exc: json.JSONDecodeError, text: str) -> str:
    """json's own reason and where, said once ("Invalid control character at" already ends in "at"), and where the
    text ends inside a value, that it looks cut off."""
    where = f"{exc.msg} column {exc.colno}" if exc.msg.endswith(" at") else f"{exc.msg} at column {exc.colno}"
    if exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip()):
        where += "; the text ends inside a JSON value: cut off, or a value split over lines?"
    return where


def _starts_an_array(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    return head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def _json_array(path: Path) -> Iterator[tuple[str, Any]] | None:
    """A .jsonl file's rows where the whole file is one JSON array, named by the line each starts on; None where it is
    not (JSON Lines whose first row is a list). A file that opens with a line of just "[" is an array or nothing."""
    text = _read_text(path, "JSONL")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().split("\n", 1)[0].strip() != "[":
            return None
        raise DataError(f"{path}:{exc.lineno}: the file is one JSON array (it opens with '['), but not valid JSON "
                        f"({json_error(exc, text)})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not usable JSON ({json_reason(exc)})") from None
    if not isinstance(data, list):
        return None
    return _array_items(path, text)


_BLANK = re.compile(r"[ \t\n\r]*")


def _array_items(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """The items of a JSON array `text` (already known valid), each with the line it starts on."""
    decoder = json.JSONDecoder()
    at = _past_blank(text, _past_blank(text, 0) + 1)  # past the "["
    line, counted = 1, 0
    while text[at] != "]":
        value, end = decoder.raw_decode(text, at)
        line += text.count("\n", counted, at)
        counted = at
        yield f"{path}:{line}", value
        at = _past_blank(text, end)
        if text[at] == ",":
            at = _past_blank(text, at + 1)


def _past_blank(text: str, at: int) -> int:
    match = _BLANK.match(text, at)
    assert match is not None, "a run of blanks, empty included, matches anywhere"
    return match.end()


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """One JSON document: a list of rows (or {"data": [...]}). JSON Lines under .json, which Hugging Face datasets
    and LLaMA-Factory read as rows, are read as rows too."""
    text = _read_text(path, "JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _first_line_is_an_object(text):
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{exc.lineno}: not JSON ({json_error(exc, text)})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not usable JSON ({json_reason(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _first_line_is_an_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.lstrip().split("\n", 1)[0]), dict)
    except (ValueError, RecursionError):
        return False


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path, "CSV", newline="") as text:
        reader = csv.DictReader(text)
        try:
            for row in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
        except csv.Error as exc:
            # DictReader's own line_num stops at the last good row; its reader's counts the failing line too.
            raise DataError(f"{path}:{reader.reader.line_num}: not readable as CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    pa = require("pyarrow", f"{path}: reading parquet")
    pq = require("pyarrow.parquet", f"{path}: reading parquet")
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                i += 1
                yield f"{path}:row {i}", row
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise _not_parquet(path, exc) from None


def _not_parquet(path: Path, exc: BaseException) -> DataError:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", first_line)
    return DataError(f"{path}: not a readable parquet file ({reason or type(exc).__name__})")


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
# Binary formats that turn up under a text suffix, named so the error can say what the file is.
_MAGIC = ((b"\x1f\x8b", "gzip-compressed; decompress it first"), (b"PK\x03\x04", "a zip archive; extract it first"),
          (b"PAR1", "a parquet file; name it .parquet"), (b"ARROW1", "an Arrow file; convert it to .parquet or .jsonl"))
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _read_text(path: Path, kind: str) -> str:
    """The whole file (a .json document) as UTF-8 text, a leading BOM dropped (Windows editors write one: the
    `utf-8-sig` reading); a binary, UTF-16 or non-UTF-8 file is an error saying which, with the line of the first bad
    byte."""
    raw = path.read_bytes()
    _check_head(path, kind, raw[:_HEAD_BYTES])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise _not_utf8(path, line, column, raw[start]) from None


_HEAD_BYTES = 65536


def _check_head(path: Path, kind: str, head: bytes) -> None:
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path}: not a {kind} text file: it is {what}")
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            raise DataError(f"{path}: the file is {encoding} text; save it as UTF-8 (in PowerShell, "
                            "Out-File -Encoding utf8) and try again")
    if b"\x00" in head:
        raise DataError(f"{path}: not a {kind} text file (it holds NUL bytes, so it is binary or in a wide encoding)")


def _not_utf8(path: Path, line: int, column: int, byte: int) -> DataError:
    return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file "
                     "as UTF-8 (it may be Latin-1 or Windows-1252)")


def _open_text(path: Path, kind: str, newline: str | None) -> TextIO:
    """The file as a UTF-8 text stream (a leading BOM dropped), after the checks `_read_text` makes, with the same
    errors: the whole file is checked first, one line at a time, so a bad byte far down is reported before any row
    is read. UTF-8 never puts a newline byte inside a character, so decoding line by line finds the first bad
    byte."""
    with open(path, "rb") as fh:
        _check_head(path, kind, fh.read(_HEAD_BYTES))
        fh.seek(0)
        for lineno, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, lineno, exc.start + 1, line[exc.start]) from None
    return open(path, encoding="utf-8-sig", newline=newline)


def json_reason(exc: BaseException) -> str:
    """What is wrong with a JSON text, in a few words (json.loads' own, up to its position)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]


def _iter_hub(dataset_id: str, config: str | None, split: str, revision: str | None) -> Iterator[tuple[str, Any]]:
    load_dataset = require("datasets", f"{dataset_id}: loading a Hub dataset").load_dataset
    try:
        ds = load_dataset(dataset_id, config, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing config: all end here
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        at = f", commit {revision}" if revision else ""
        raise DataError(f"{dataset_id} (config {config}, split {split}{at}): cannot load: {first_line}") from None
    for i, row in enumerate(ds):
        yield f"{dataset_id}:{split}:{i}", row
