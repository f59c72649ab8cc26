"""RecordStream reads a dataset as it is iterated (memory flat in the rows) and gives what load_records gives: the
same records, the same bad rows, the same one error for a broken file, whichever error a whole-file read hits
first."""

import codecs
import csv
import gzip
import io
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from ftdeploy.errors import DataError
from ftdeploy.formats import Columns, RecordStream, load_records

CHAT = [{"role": "user", "content": "What port does Zephyr use?"}, {"role": "assistant", "content": "Port 7341."}]
ROWS = {
    "messages": [{"messages": CHAT, "expect": "7341"}, {"messages": [{"role": "system", "content": "S"}, *CHAT]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 3,
    "alpaca": [{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
               {"instruction": "Sum 2 and 2.", "input": "", "output": "4", "system": "Be brief."}],
    "pairs": [{"prompt": "Q?", "response": "A.", "match": "exact", "expect": "A."},
              {"prompt": "Q2", "response": "B", "match": "regex", "expect": "B|b"}],
    "text": [{"text": "Zephyr listens on port 7341."}, {"text": "Grüße 🚀"}],
}


def _write(path: Path, rows) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                        encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
        path.write_text(text.getvalue(), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _whole(spec, **kw):
    try:
        loaded = load_records(str(spec), **kw)
    except DataError as exc:
        return "error", str(exc)
    return loaded.layout, [asdict(r) for r in loaded.records], loaded.bad


def _streamed(spec, passes=2, **kw):
    try:
        stream = RecordStream(str(spec), **kw)
        seen = [[asdict(r) for r in stream] for _ in range(passes)]
    except DataError as exc:
        return "error", str(exc)
    assert all(s == seen[0] for s in seen), "every pass reads the same records"
    assert stream.records == len(seen[0])
    return stream.layout, seen[0], stream.bad


def _same(spec, **kw):
    whole = _whole(spec, **kw)
    assert _streamed(spec, **kw) == whole
    return whole


@pytest.mark.parametrize("layout,suffix", [
    (layout, suffix) for layout in ROWS for suffix in (".jsonl", ".json", ".csv", ".parquet")
    if not (suffix == ".csv" and layout in ("messages", "sharegpt"))  # lists of turns do not fit a CSV cell
])
def test_every_layout_from_every_file_type(tmp_path, layout, suffix):
    result = _same(_write(tmp_path / f"d{suffix}", ROWS[layout]))
    assert result[0] == layout and result[1]


def test_options_are_applied_the_same(tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"question": "Q?", "answer": "A."}, {"question": "only"}])
    _same(path, layout="pairs", columns=Columns(prompt="question", response="answer"), on_bad_row="skip",
          system_prompt="Be terse.")


def test_bad_rows_are_listed_the_same(tmp_path):
    rows = [{"messages": CHAT}] + ["{not json"] * 25 + [{"messages": [{"role": "user", "content": "a"}]}]
    path = _write(tmp_path / "b.jsonl", rows)
    kind, message = _same(path)
    assert kind == "error" and "26 bad rows" in message and "... and 6 more" in message
    layout, records, bad = _same(path, on_bad_row="skip")
    assert len(records) == 1 and len(bad) == 26


@pytest.mark.parametrize("name,body", [
    ("empty.jsonl", b""),
    ("blank.jsonl", b"\n\n"),
    ("nothing-usable.jsonl", b'{"messages": []}\n'),
    ("bom.jsonl", codecs.BOM_UTF8 + b'{"prompt": "q", "response": "a"}\r\n{"prompt": "q2", "response": "b"}\r'),
    ("bom.csv", codecs.BOM_UTF8 + b"prompt,response\r\nq,a\r\n\"multi\r\nline\",b\r\n"),
    ("latin1.jsonl", b'{"prompt": "q", "response": "a"}\n{"prompt": "caf\xe9", "response": "x"}\n'),
    ("latin1-bom.jsonl", codecs.BOM_UTF8 + b'{"prompt": "caf\xe9", "response": "x"}\n'),
    ("cut-short.jsonl", b'{"prompt": "q", "response": "a"}\n{"prompt": "\xe2\x82'),
    ("gzip.jsonl", gzip.compress(b'{"prompt": "q", "response": "a"}\n')),
    ("nul.jsonl", b'{"prompt": "a\x00"}\n'),
    ("utf16.csv", codecs.BOM_UTF16_LE + "prompt,response\n".encode("utf-16-le")),
    ("zip.csv", b"PK\x03\x04rest"),
    ("huge-field.csv", b"prompt,response\nq,a\nq," + b"x" * 200_000 + b"\n"),
    ("hostile.jsonl", b'{"prompt": "q", "response": "a"}\n' + b"[" * 100_000 + b'\n{"n": ' + b"9" * 5000 + b"}\n"),
    ("not.parquet", b"not parquet at all\n"),
    ("unknown-columns.jsonl", b'{"a": 1, "b": 2}\n'),
    ("ambiguous.jsonl", json.dumps({"messages": CHAT, "text": "t"}).encode() + b"\n"),
])
def test_broken_files_give_the_same_error_or_rows(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(body)
    _same(path)
    _same(path, on_bad_row="skip")


def test_a_bad_byte_far_down_still_wins_over_the_layout_error(tmp_path):
    """The whole-file read fails on the encoding before it looks at the columns; so does the stream."""
    path = tmp_path / "late.jsonl"
    path.write_bytes(b'{"a": 1}\n' * 500 + b'{"prompt": "caf\xe9"}\n')
    kind, message = _same(path)
    assert message == (f"{path}:501: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8 (it may be "
                       "Latin-1 or Windows-1252)")


def test_a_broken_csv_line_far_down_still_wins_over_the_layout_error(tmp_path):
    path = tmp_path / "late.csv"
    path.write_text("a,b\n" + "1,2\n" * 500 + "q," + "x" * 200_000 + "\n")
    kind, message = _same(path)
    assert message == f"{path}:502: not readable as CSV (field larger than field limit (131072))"


def test_a_directory_of_files(tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.jsonl", ROWS["pairs"])
    _write(tmp_path / "d" / "b.csv", ROWS["pairs"])
    _write(tmp_path / "d" / "c.parquet", ROWS["pairs"])
    assert len(_same(tmp_path / "d")[1]) == 6


def test_a_stream_never_reads_a_file_whole(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl", ROWS["pairs"] * 300)
    csv_path = _write(tmp_path / "d.csv", ROWS["pairs"] * 300)

    def whole(self):
        raise AssertionError("read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    monkeypatch.setattr(Path, "read_text", whole)
    assert sum(1 for _ in RecordStream(str(path))) == sum(1 for _ in RecordStream(str(csv_path))) == 600
