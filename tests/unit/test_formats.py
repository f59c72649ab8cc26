"""Every layout from every source kind, every kind of bad row, and no silent guessing."""

import csv
import json

import pytest
from conftest import read_dataset

from ftdeploy.data import Columns
from ftdeploy.errors import DataError

CHAT = [{"role": "user", "content": "What port does Zephyr use?"}, {"role": "assistant", "content": "Port 7341."}]
ROWS = {
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "What port does Zephyr use?"},
                                   {"from": "gpt", "value": "Port 7341."}]},
    "alpaca": {"instruction": "What port does Zephyr use?", "input": "", "output": "Port 7341."},
    "pairs": {"prompt": "What port does Zephyr use?", "response": "Port 7341."},
    "prompt_completion": {"prompt": "Zephyr listens on port", "completion": " 7341."},
    "text": {"text": "Zephyr listens on port 7341."},
}


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        keys = sorted({k for r in rows for k in r})
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            # a CSV holds a message list as JSON text, as pandas' to_csv of json.dumps'd columns writes it
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


SOURCE_CASES = [(layout, suffix) for layout in ROWS for suffix in (".jsonl", ".json", ".csv", ".parquet", "dir")]


@pytest.mark.parametrize("layout,suffix", SOURCE_CASES)
def test_each_layout_from_each_source_is_detected_and_converted(tmp_path, layout, suffix):
    row = ROWS[layout]
    if suffix == "dir":
        (tmp_path / "d").mkdir()
        _write(tmp_path / "d" / "a.jsonl", [row])
        _write(tmp_path / "d" / "b.jsonl", [row])
        spec, expected_rows = tmp_path / "d", 2
    else:
        spec, expected_rows = _write(tmp_path / f"data{suffix}", [row, row]), 2
    result = read_dataset(str(spec))
    assert result.layout == layout
    assert len(result.records) == expected_rows
    rec = result.records[0]
    if layout in ("text", "prompt_completion"):  # raw text; a plain prompt/completion's prompt is context
        assert rec.text == "Zephyr listens on port 7341." and rec.messages is None
        assert rec.context_chars == (22 if layout == "prompt_completion" else 0)
    else:
        assert rec.messages[-1] == {"role": "assistant", "content": "Port 7341."}
        assert rec.messages[-2]["role"] == "user" and rec.messages[-2]["content"].startswith("What port")
    assert str(spec) in rec.source


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "bonjour", "output": "hello"}])
    assert read_dataset(str(path)).records[0].messages[0]["content"] == "Translate.\n\nbonjour"


def test_pairs_with_a_column_mapping(tmp_path):
    path = _write(tmp_path / "q.csv", [{"question": "Q?", "answer": "A.", "sys": "Be brief."}])
    result = read_dataset(str(path), "pairs", Columns(prompt="question", response="answer", system="sys"))
    assert [m["role"] for m in result.records[0].messages] == ["system", "user", "assistant"]


def test_sharegpt_aliases_and_system(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "u"},
                             {"from": "chatgpt", "value": "a"}]}
    rec = read_dataset(str(_write(tmp_path / "s.jsonl", [row]))).records[0]
    assert [m["role"] for m in rec.messages] == ["system", "user", "assistant"]


def test_ambiguous_rows_are_an_error_that_lists_both(tmp_path):
    path = _write(tmp_path / "amb.jsonl", [{"messages": CHAT, "text": "also text"}])
    with pytest.raises(DataError, match="ambiguous layout: rows match both messages and text"):
        read_dataset(str(path))
    assert read_dataset(str(path), "text").layout == "text"  # --format settles it


def test_unknown_columns_are_an_error_naming_them(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell the dataset layout from its columns \['a', 'b'\]"):
        read_dataset(str(_write(tmp_path / "x.jsonl", [{"a": 1, "b": 2}])))


BAD_SHAREGPT = [
    ({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}, "unknown speaker 'alien'"),
    ({"conversations": [{"from": "gpt", "value": "y"}, {"from": "human", "value": "x"}]}, "turns out of order"),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "y"}]},
     "content must be a non-empty string"),
    ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "y"}]},
     "content must be a non-empty string"),
    ({"conversations": []}, "missing or empty field 'conversations'"),
]


def test_every_bad_row_is_named_by_line_with_its_reason(tmp_path):
    good = ROWS["sharegpt"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + "".join(json.dumps(r) + "\n" for r, _ in BAD_SHAREGPT) + "{broken\n")
    with pytest.raises(DataError) as err:
        read_dataset(str(path))
    msg = str(err.value)
    assert f"{len(BAD_SHAREGPT) + 1} bad rows" in msg
    for i, (_, reason) in enumerate(BAD_SHAREGPT, start=2):
        line = next(r for r in msg.splitlines() if r.strip().startswith(f"{path}:{i}: "))
        assert reason in line
    assert f"{path}:{len(BAD_SHAREGPT) + 2}: not JSON" in msg


def test_skip_drops_bad_rows_and_reports_them(tmp_path):
    path = _write(tmp_path / "m.jsonl", [ROWS["pairs"], {"prompt": "only a prompt"}, ROWS["pairs"]])
    result = read_dataset(str(path), on_bad_row="skip")
    assert len(result.records) == 2
    assert result.bad == [f"{path}:2: missing field 'response'"]


def test_bad_csv_and_parquet_rows_are_named_too(tmp_path):
    path = _write(tmp_path / "p.csv", [ROWS["pairs"], {"prompt": "p", "response": ""}])
    with pytest.raises(DataError, match=rf"{path}:3: .*content must be a non-empty string"):
        read_dataset(str(path))
    pq = _write(tmp_path / "p.parquet", [ROWS["alpaca"], {"instruction": "i", "input": "", "output": None}])
    with pytest.raises(DataError, match=rf"{pq}:row 2: 'output' is null; it must be a string"):
        read_dataset(str(pq))


def test_empty_and_missing_sources(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        read_dataset(str(_write(tmp_path / "e.jsonl", [])))
    with pytest.raises(DataError, match=rf"nope.jsonl: no such file or directory \(looked for {tmp_path}/nope.jsonl\)"):
        read_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such file or directory, and not a Hugging Face dataset id"):
        read_dataset("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the directory holds no"):
        read_dataset(str(tmp_path / "empty"))


def test_a_hub_dataset_id_goes_to_the_hub(monkeypatch, tmp_path):
    """These machines cannot reach a hub, so offline, with nothing cached, it fails with a message naming the id
    (its commit is resolved first: data/hub.py; test_data_mix.py has the load itself)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"ServiceNow-AI/R1-Distill-SFT: HF_HUB_OFFLINE is set and no copy of this "
                                        r"dataset is cached"):
        read_dataset("ServiceNow-AI/R1-Distill-SFT", hub_config="v0", split="train")
