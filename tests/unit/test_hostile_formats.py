"""Unreadable data files and mistyped paths, each a one-paragraph DataError naming the file (and the line)."""

import codecs
import gzip
import json
import os

import pytest
from conftest import read_dataset

from ftdeploy.data import sources
from ftdeploy.data.sources import looks_like_path
from ftdeploy.errors import DataError

PAIR = {"prompt": "What port does Zephyr use?", "response": "Port 7341."}
JSONL = (json.dumps(PAIR) + "\n") * 2


def _error(spec) -> str:
    with pytest.raises(DataError) as info:
        read_dataset(str(spec))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name,body", [
    ("bom.jsonl", JSONL),
    ("bom.json", json.dumps([PAIR, PAIR])),
    ("bom.csv", "prompt,response\r\nWhat port does Zephyr use?,Port 7341.\r\nQ2?,A2.\r\n"),
])
def test_a_utf8_bom_is_dropped_in_every_text_format(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(codecs.BOM_UTF8 + body.encode())
    result = read_dataset(str(path))
    assert (result.layout, len(result.records), result.bad) == ("pairs", 2, [])


def test_plain_utf8_is_read_as_it_was(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "Grüße \ufeff inside", "response": "ok"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert read_dataset(str(path)).records[0].messages[0]["content"] == "Grüße \ufeff inside"


def test_a_corrupt_parquet_file_names_the_file_and_pyarrow_reason(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("not parquet at all\n")
    assert _error(path) == (f"{path}: not a readable parquet file (Parquet magic bytes not found in footer. "
                            "Either the file is corrupted or this is not a parquet file.)")
    path.write_bytes(b"")
    assert _error(path).startswith(f"{path}: not a readable parquet file (")


@pytest.mark.parametrize("name,data,expected", [
    ("g.jsonl", gzip.compress(JSONL.encode()), "not a JSONL text file: it is gzip-compressed; decompress it first"),
    ("z.csv", b"PK\x03\x04rest", "not a CSV text file: it is a zip archive; extract it first"),
    ("p.json", b"PAR1....PAR1", "not a JSON text file: it is a parquet file; name it .parquet"),
    ("n.jsonl", b'{"prompt": "a\x00"}\n',
     "not a JSONL text file (it holds NUL bytes, so it is binary or in a wide encoding)"),
    ("w.csv", codecs.BOM_UTF16_LE + "prompt,response\n".encode("utf-16-le"),
     "the file is UTF-16 text; save it as UTF-8 (in PowerShell, Out-File -Encoding utf8) and try again"),
])
def test_binary_and_wide_files_under_a_text_suffix_say_what_they_are(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_bytes(data)
    assert _error(path) == f"{path}: {expected}"


def test_latin1_text_names_the_line_and_column_of_the_first_bad_byte(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_bytes(JSONL.encode() + '{"prompt": "café", "response": "x"}\n'.encode("latin-1"))
    assert _error(path) == (f"{path}:3: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8 "
                            "(it may be Latin-1 or Windows-1252)")


def test_json_lines_in_a_json_file_are_read_as_rows_named_by_line(tmp_path):
    """Hugging Face datasets and LLaMA-Factory read JSON Lines saved as .json; so does ftdeploy."""
    path = tmp_path / "rows.json"
    path.write_text(JSONL + "{broken\n")
    result = read_dataset(str(path), on_bad_row="skip")
    assert len(result.records) == JSONL.count("\n")
    assert result.records[0].source == f"{path}:1" and result.bad[0].startswith(f"{path}:3: not JSON (")
    two_documents = tmp_path / "two.json"  # not one value a line: still not JSON
    two_documents.write_text('{\n  "prompt": "a", "response": "b"\n}\n{\n  "prompt": "c", "response": "d"\n}\n')
    assert _error(two_documents) == f"{two_documents}:4: not JSON (Extra data at column 1)"


def test_hostile_json_values_are_bad_rows_not_crashes(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + "[" * 100_000 + "\n" + '{"n": ' + "9" * 5000 + "}\n")
    result = read_dataset(str(path), on_bad_row="skip")
    assert len(result.records) == 1
    assert result.bad[0] == f"{path}:2: not usable JSON (nested too deeply)"
    assert result.bad[1].startswith(f"{path}:3: not usable JSON (Exceeds the limit (4300 digits)")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert _error(deep) == f"{deep}: not usable JSON (nested too deeply)"


def test_a_csv_field_past_the_csv_limit_names_the_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("prompt,response\nq,a\nq," + "x" * 200_000 + "\n")
    assert _error(path) == f"{path}:3: not readable as CSV (field larger than field limit (131072))"


def test_unreadable_and_special_paths(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert _error(fifo) == f"{fifo}: not a regular file or directory (a pipe or device cannot be read as a dataset)"
    assert _error("").startswith("the data path is empty")
    assert _error("  ").startswith("the data path is empty")
    long_name = tmp_path / ("a" * 300 + ".jsonl")
    assert _error(long_name).startswith(f"{long_name}: cannot look up this path (")
    assert _error("~no-such-user-ftdeploy/x.jsonl").startswith(
        "~no-such-user-ftdeploy/x.jsonl: no such file or directory")


def test_a_file_that_cannot_be_read(tmp_path, monkeypatch):
    path = tmp_path / "locked.jsonl"
    path.write_text(JSONL)

    def denied(file, *args, **kw):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(sources, "open", denied, raising=False)  # chmod 0 stops no one when tests run as root
    assert _error(path) == f"{path}: cannot read the file (Permission denied)"


def test_a_missing_path_never_reaches_the_hub(tmp_path, monkeypatch):
    def no_hub(*args):
        raise AssertionError("went to the Hub")

    monkeypatch.setattr(sources, "_iter_hub", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in ("d/nonexist.jsonl", "./org/name", "../org/name", "data/train", "org/name.parquet", "org/name.txt"):
        assert "no such file or directory (looked for " in _error(spec), spec
    assert _error("d/nonexist.jsonl") == (f"d/nonexist.jsonl: no such file or directory (looked for "
                                          f"{tmp_path}/d/nonexist.jsonl; "
                                          f"the directory {tmp_path}/d does not exist either)")


@pytest.mark.parametrize("spec,is_path", [
    ("org/name", False), ("HuggingFaceH4/ultrachat_200k", False), ("org/name.v2", False),
    ("d/x.jsonl", True), ("x.JSONL", True), ("a/b.arrow", True), ("./org/name", True), ("../x", True),
    ("/abs/name", True), ("~/data", True), (".", True),
])
def test_looks_like_path(spec, is_path):
    assert looks_like_path(spec) is is_path


def test_a_directory_takes_data_files_whatever_the_case_of_their_suffix(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "A.JSONL").write_text(JSONL)
    assert len(read_dataset(str(tmp_path / "d")).records) == 2


def test_a_lone_surrogate_escape_is_a_bad_row_not_a_tokenizer_crash(tmp_path):
    pairs = tmp_path / "s.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n" + '{"prompt": "hi \\ud800 there", "response": "A."}\n'
                     + '{"prompt": "q", "response": "a", "expect": "\\ud83d"}\n')
    result = read_dataset(str(pairs), on_bad_row="skip")
    assert len(result.records) == 1
    assert result.bad == [
        f"{pairs}:2: message 0 (user): content is not valid Unicode (a lone surrogate \\ud800 at character 4)",
        f"{pairs}:3: 'expect' is not valid Unicode (a lone surrogate \\ud83d at character 1)"]
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "fine"}\n{"text": "x \\udfff"}\n')
    assert read_dataset(str(text), on_bad_row="skip").bad == [
        f"{text}:2: 'text' is not valid Unicode (a lone surrogate \\udfff at character 3)"]
