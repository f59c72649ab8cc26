"""RecordStream reads a dataset as it is iterated (memory flat in the rows): every pass gives the same records, every
file type the records its JSONL twin gives, bad rows listed, and one error for a broken file, the one that names what
is wrong with the file first."""

import codecs
import csv
import gzip
import io
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from ftdeploy.data import Columns, RecordStream
from ftdeploy.errors import DataError

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

        keys = sorted({k for r in rows for k in r})  # from_pylist takes its columns from the first row alone
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def _streamed(spec, passes=2, **kw):
    try:
        stream = RecordStream(str(spec), **kw)
        seen = [[asdict(r) for r in stream] for _ in range(passes)]
    except DataError as exc:
        return "error", str(exc)
    assert all(s == seen[0] for s in seen), "every pass reads the same records"
    assert stream.records == len(seen[0])
    return stream.layout, seen[0], stream.bad


def _without_source(records):
    return [{k: v for k, v in r.items() if k != "source"} for r in records]


@pytest.mark.parametrize("layout,suffix", [
    (layout, suffix) for layout in ROWS for suffix in (".jsonl", ".json", ".csv", ".parquet")
    if not (suffix == ".csv" and layout in ("messages", "sharegpt"))  # lists of turns do not fit a CSV cell
])
def test_every_layout_from_every_file_type(tmp_path, layout, suffix):
    result = _streamed(_write(tmp_path / f"d{suffix}", ROWS[layout]))
    jsonl = _streamed(_write(tmp_path / "twin.jsonl", ROWS[layout]))
    assert result[0] == layout and result[1]
    assert _without_source(result[1]) == _without_source(jsonl[1])


def test_options_are_applied_the_same(tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"question": "Q?", "answer": "A."}, {"question": "only"}])
    layout, records, bad = _streamed(path, layout="pairs", columns=Columns(prompt="question", response="answer"),
                                     on_bad_row="skip", system_prompt="Be terse.")
    assert layout == "pairs" and bad == [f"{path}:2: missing field 'answer'"]
    assert records[0]["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Q?"},
                                      {"role": "assistant", "content": "A."}]


def test_bad_rows_are_listed_the_same(tmp_path):
    rows = [{"messages": CHAT}] + ["{not json"] * 25 + [{"messages": [{"role": "user", "content": "a"}]}]
    path = _write(tmp_path / "b.jsonl", rows)
    kind, message = _streamed(path)
    assert kind == "error" and "26 bad rows" in message and "... and 6 more" in message
    layout, records, bad = _streamed(path, on_bad_row="skip")
    assert len(records) == 1 and len(bad) == 26


EMPTY = "{path}: the dataset is empty"
NOT_UTF8 = "{path}:%s: not UTF-8 text (byte 0x%s at column %s); save the file as UTF-8 (it may be Latin-1 or " \
    "Windows-1252)"


def _same_both_ways(expected):
    return expected, expected


@pytest.mark.parametrize("name,body,with_error,with_skip", [
    ("empty.jsonl", b"", *_same_both_ways(EMPTY)),
    ("blank.jsonl", b"\n\n", *_same_both_ways(EMPTY)),
    ("nothing-usable.jsonl", b'{"messages": []}\n',
     "{path}: 1 bad row (messages layout; --on-bad-row skip to drop them):\n  {path}:1: 'messages' must be a "
     "non-empty list", "{path}: no usable rows (1 bad rows skipped)"),
    ("bom.jsonl", codecs.BOM_UTF8 + b'{"prompt": "q", "response": "a"}\r\n{"prompt": "q2", "response": "b"}\r',
     *_same_both_ways((2, 0))),
    ("bom.csv", codecs.BOM_UTF8 + b"prompt,response\r\nq,a\r\n\"multi\r\nline\",b\r\n", *_same_both_ways((2, 0))),
    ("latin1.jsonl", b'{"prompt": "q", "response": "a"}\n{"prompt": "caf\xe9", "response": "x"}\n',
     *_same_both_ways(NOT_UTF8 % (2, "e9", 16))),
    ("latin1-bom.jsonl", codecs.BOM_UTF8 + b'{"prompt": "caf\xe9", "response": "x"}\n',
     *_same_both_ways(NOT_UTF8 % (1, "e9", 19))),
    ("cut-short.jsonl", b'{"prompt": "q", "response": "a"}\n{"prompt": "\xe2\x82',
     *_same_both_ways(NOT_UTF8 % (2, "e2", 13))),
    ("gzip.jsonl", gzip.compress(b'{"prompt": "q", "response": "a"}\n'),
     *_same_both_ways("{path}: not a JSONL text file: it is gzip-compressed; decompress it first")),
    ("nul.jsonl", b'{"prompt": "a\x00"}\n',
     *_same_both_ways("{path}: not a JSONL text file (it holds NUL bytes, so it is binary or in a wide encoding)")),
    ("utf16.csv", codecs.BOM_UTF16_LE + "prompt,response\n".encode("utf-16-le"),
     *_same_both_ways("{path}: the file is UTF-16 text; save it as UTF-8 (in PowerShell, Out-File -Encoding utf8) "
                      "and try again")),
    ("zip.csv", b"PK\x03\x04rest",
     *_same_both_ways("{path}: not a CSV text file: it is a zip archive; extract it first")),
    ("huge-field.csv", b"prompt,response\nq,a\nq," + b"x" * 200_000 + b"\n",
     *_same_both_ways("{path}:3: not readable as CSV (field larger than field limit (131072))")),
    ("hostile.jsonl", b'{"prompt": "q", "response": "a"}\n' + b"[" * 100_000 + b'\n{"n": ' + b"9" * 5000 + b"}\n",
     "{path}: 2 bad rows (pairs layout; --on-bad-row skip to drop them):\n  {path}:2: not usable JSON (nested too "
     "deeply)\n  {path}:3: not usable JSON (Exceeds the limit", (1, 2)),
    ("not.parquet", b"not parquet at all\n", *_same_both_ways("{path}: not a readable parquet file (")),
    ("unknown-columns.jsonl", b'{"a": 1, "b": 2}\n',
     *_same_both_ways("{path}: cannot tell the dataset layout from its columns ['a', 'b']; expected one of messages, "
                      "conversations (sharegpt), instruction/output (alpaca), prompt/response (pairs), "
                      "prompt/completion (TRL), text; or "
                      "pass --format with data.columns for other names")),
    ("ambiguous.jsonl", json.dumps({"messages": CHAT, "text": "t"}).encode() + b"\n",
     *_same_both_ways("{path}: ambiguous layout: rows match both messages and text; choose one with --format")),
])
def test_broken_files_give_one_error_naming_them_or_their_rows(tmp_path, name, body, with_error, with_skip):
    """Each outcome as (records, bad rows), or the error's message (its start, where the rest is another library's
    words)."""
    path = tmp_path / name
    path.write_bytes(body)
    for on_bad_row, expected in (("error", with_error), ("skip", with_skip)):
        result = _streamed(path, on_bad_row=on_bad_row)
        if isinstance(expected, tuple):
            assert (len(result[1]), len(result[2])) == expected, on_bad_row
        else:
            assert result[0] == "error" and result[1].startswith(expected.replace("{path}", str(path))), on_bad_row


def test_a_bad_byte_far_down_still_wins_over_the_layout_error(tmp_path):
    """The encoding is checked before the columns are looked at."""
    path = tmp_path / "late.jsonl"
    path.write_bytes(b'{"a": 1}\n' * 500 + b'{"prompt": "caf\xe9"}\n')
    kind, message = _streamed(path)
    assert message == (f"{path}:501: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8 (it may be "
                       "Latin-1 or Windows-1252)")


def test_a_broken_csv_line_far_down_still_wins_over_the_layout_error(tmp_path):
    path = tmp_path / "late.csv"
    path.write_text("a,b\n" + "1,2\n" * 500 + "q," + "x" * 200_000 + "\n")
    kind, message = _streamed(path)
    assert message == f"{path}:502: not readable as CSV (field larger than field limit (131072))"


def test_a_directory_of_files(tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.jsonl", ROWS["pairs"])
    _write(tmp_path / "d" / "b.csv", ROWS["pairs"])
    _write(tmp_path / "d" / "c.parquet", ROWS["pairs"])
    assert len(_streamed(tmp_path / "d")[1]) == 6


def test_a_stream_never_reads_a_file_whole(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl", ROWS["pairs"] * 300)
    csv_path = _write(tmp_path / "d.csv", ROWS["pairs"] * 300)

    def whole(self):
        raise AssertionError("read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    monkeypatch.setattr(Path, "read_text", whole)
    assert sum(1 for _ in RecordStream(str(path))) == sum(1 for _ in RecordStream(str(csv_path))) == 600
