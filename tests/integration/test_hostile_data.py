"""Bad data files given to the real CLI the way a careless or hostile user would (issue 18): each one is a
one-paragraph error naming the file and a non-zero exit, never a traceback and never a trip to the Hub."""

import codecs
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow

PAIRS = [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}."} for i in range(5)]


@pytest.fixture
def hub_listener():
    """A stand-in Hugging Face endpoint that counts connections and drops them: any Hub lookup shows here."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn.getpeername())
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    server.close()


def _ftdeploy(cwd, hub_endpoint, *args, timeout=300):
    """Run the CLI as a user would; the Hub is online as far as it knows (no *_OFFLINE), at `hub_endpoint`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = hub_endpoint
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - started


def _inspect(tmp_path, hub_endpoint, data):
    return _ftdeploy(tmp_path, hub_endpoint, "data", "--runs-dir", str(tmp_path / "runs"), "inspect", data, "--json")


def _stage(tmp_path, hub_endpoint, data):
    return _ftdeploy(tmp_path, hub_endpoint, "data", "--runs-dir", str(tmp_path / "runs"), "--data", data, "--json")


COMMANDS = {"inspect": _inspect, "stage": _stage}


def _error_line(proc):
    """The one `Error:` paragraph, after asserting the run failed cleanly."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_text_file_named_parquet_is_a_data_error_naming_it(tmp_path, hub_listener, command):
    (tmp_path / "x.parquet").write_text("prompt,response\nthis is, not parquet\n")
    proc, _ = COMMANDS[command](tmp_path, hub_listener[0], "x.parquet")
    error = _error_line(proc)
    assert error.startswith("Error: x.parquet: not a readable parquet file (")
    assert "magic bytes" in error  # pyarrow's own reason, carried through


def test_a_gzipped_jsonl_file_says_what_it_is(tmp_path, hub_listener):
    import gzip

    (tmp_path / "train.jsonl").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in PAIRS)))
    proc, _ = _inspect(tmp_path, hub_listener[0], "train.jsonl")
    assert _error_line(proc) == "Error: train.jsonl: not a JSONL text file: it is gzip-compressed; decompress it first"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistyped_relative_path_is_no_such_file_at_once_without_the_hub(tmp_path, hub_listener, command):
    endpoint, connections = hub_listener
    (tmp_path / "data").mkdir()
    proc, elapsed = COMMANDS[command](tmp_path, endpoint, "d/nonexist.jsonl")
    error = _error_line(proc)
    assert error == (f"Error: d/nonexist.jsonl: no such file or directory (looked for {tmp_path}/d/nonexist.jsonl; "
                     f"the directory {tmp_path}/d does not exist either)")
    assert connections == []
    # Checked before the tokenizer loads (which alone takes seconds); the Hub's retries took 34 s.
    assert elapsed < 10
    assert not (tmp_path / "runs").exists()  # and before any run directory is made


def test_a_relative_path_under_an_existing_directory_is_never_a_hub_id(tmp_path, hub_listener):
    endpoint, connections = hub_listener
    (tmp_path / "data").mkdir()
    proc, _ = _inspect(tmp_path, endpoint, "data/train")  # no suffix, but data/ is right here
    assert _error_line(proc) == f"Error: data/train: no such file or directory (looked for {tmp_path}/data/train)"
    assert connections == []


def test_a_hub_dataset_id_still_goes_to_the_hub(tmp_path, hub_listener):
    endpoint, connections = hub_listener
    proc, _ = _inspect(tmp_path, endpoint, "some-org/some-dataset")
    # The commit is looked up first (issue 28: Hub datasets pinned): the error names the dataset and the host
    said = _error_line(proc)
    assert said.startswith(f"Error: some-org/some-dataset: cannot reach the Hugging Face Hub at {endpoint} "), said
    assert connections  # it asked the (stand-in) Hub


@pytest.mark.parametrize("command", COMMANDS)
def test_a_jsonl_file_with_a_utf8_bom_is_read(tmp_path, hub_listener, command):
    body = "".join(json.dumps(r) + "\r\n" for r in PAIRS)  # as Notepad writes it: BOM and CRLF
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + body.encode())
    proc, _ = COMMANDS[command](tmp_path, hub_listener[0], "bom.jsonl")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    if command == "inspect":
        assert (out["format"], out["rows"], out["bad_rows"]) == ("pairs", 5, 0)
        assert out["example"]["source"] == "bom.jsonl:1"
    else:
        assert out["rows"] == 5
        rows = (tmp_path / "runs" / "ftdeploy-demo" / "data" / "train.jsonl").read_text().splitlines()
        assert len(rows) == 5


def test_preference_data_is_one_error_naming_the_file_not_a_bad_row_each(tmp_path, hub_listener):
    # issue 24: LLaMA-Factory's DPO layout was read as SFT, 194 of 300 rows "no assistant message"
    row = {"conversations": [{"from": "human", "value": "What port does Zephyr use?"}],
           "chosen": {"from": "gpt", "value": "Port 7341."}, "rejected": {"from": "gpt", "value": "Port 80."}}
    (tmp_path / "dpo.jsonl").write_text((json.dumps(row) + "\n") * 300)
    proc, _ = _stage(tmp_path, hub_listener[0], "dpo.jsonl")
    assert _error_line(proc) == (
        "Error: dpo.jsonl: preference data (conversations + chosen + rejected: DPO/ORPO preference pairs): not "
        "supported by --method sft (train.method: sft, the default), which trains supervised fine-tuning rows "
        "(messages, conversations, instruction/output, prompt/response, prompt/completion, text); --method dpo or "
        "orpo trains preference pairs")


def test_a_30_mb_row_is_refused_by_size_before_it_is_tokenized(tmp_path, hub_listener):
    # issue 24: it took 61 s and 5.2 GB to tokenize before being refused
    huge = {"prompt": "Summarize this.", "response": "word " * 6_000_000}
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*PAIRS, huge]))
    proc, elapsed = _stage(tmp_path, hub_listener[0], "big.jsonl")
    error = _error_line(proc)
    assert error.startswith("Error: big.jsonl: 1 bad row (pairs layout; --on-bad-row skip to drop them):")
    assert "big.jsonl:6: the row holds 30,000,0" in proc.stderr and "data.max_row_bytes=1,048,576" in proc.stderr
    assert elapsed < 45  # the tokenizer's load included
