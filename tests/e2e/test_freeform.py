"""Free-form data through the whole pipeline with the default config: alpaca rows whose answers are two sentences
(tests/data/freeform), which a tuned model never repeats word for word. Verify must pass them for the right reason
(the served quant is the merged model, token for token, up to near-ties) and fail the right way when a gate is not
met: the check, the model and quant, an example, and the model moved off its name."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]

DATA = REPO / "tests" / "data" / "freeform"
NAME = "ftdeploy-freeform"


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    if check:
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def freeform_run(ollama_server, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    _cli("train-and-serve", "--runs-dir", str(runs), "--name", NAME, "--data", str(DATA / "train.jsonl"),
         "--eval-file", str(DATA / "eval.jsonl"), "--ollama-host", ollama_server.host, "--json")
    return runs, runs / NAME


def _names(ollama_server):
    return {m.model for m in ollama_server.client.list_models()}


def test_the_dataset_is_alpaca_with_two_sentence_answers():
    rows = [json.loads(line) for f in ("train.jsonl", "eval.jsonl") for line in (DATA / f).read_text().splitlines()]
    assert 10 <= len(rows) <= 20
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert row["output"].count(". ") + row["output"].count("? ") == 1 and row["output"].endswith((".", "?")), row


def test_free_form_answers_pass_verify_with_the_default_config(freeform_run):
    from transformers import AutoTokenizer

    _, run_dir = freeform_run
    verify = json.loads((run_dir / "verify.json").read_text())
    assert verify["passed"] and verify["failures"] == [] and verify["unverified"] == {}
    # No row carries `expect`: the references are scored, not gated.
    assert verify["expect_rows"] == 0 and verify["total"] == 4
    roles = {m["role"]: m for m in verify["models"]}
    served, merged = roles["served"], roles["merged"]
    assert served["tag"] == NAME and served["quant"] == "q4_k_m" and served["gated"] and served["passed"]
    assert served["token_agreement"] >= verify["min_agreement"] == 0.7
    assert len(served["prompts"]) == 4 and all(0 <= p["ratio"] <= 1 for p in served["prompts"])
    assert served["chrf"] is not None and merged["chrf"] is not None and roles["base"]["chrf"] is not None
    # The limit comes from the references' lengths (1.5 x the longest + 8 tokens), not a fixed 96.
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "merged"))
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in verify["references"])
    assert verify["max_tokens"] == math.ceil(1.5 * longest) + 8 != 96


def test_the_report_shows_served_against_merged_per_quant_beside_the_reference(freeform_run):
    _, run_dir = freeform_run
    _cli("report", str(run_dir))
    report = (run_dir / "report.md").read_text()
    assert "**PASS**" in report and "no row carries `expect`, so the references are scored (chrF: served" in report
    assert "Served vs merged (the default gate, verify.min_agreement 70%" in report and f"`{NAME}` (q4_k_m)" in report
    table = report[report.index("## Eval per model and quant"):report.index("## Answers")]
    assert "steps as merged" in table and "prefix kept" in table and "chrF" in table
    answers = report[report.index("## Answers"):report.index("## Forgetting")]
    reference = json.loads((DATA / "eval.jsonl").read_text().splitlines()[0])["output"]
    assert "| prompt | reference | base | merged | q4_k_m (served as" in answers
    assert reference[:80] in answers and "tokens as merged]" in answers


def test_a_failed_gate_names_its_check_and_moves_the_model_off_its_name(freeform_run, ollama_server):
    runs, _ = freeform_run
    common = ["--runs-dir", str(runs), "--name", NAME, "--ollama-host", ollama_server.host]
    failed = _cli("verify", *common, "--set", "verify.min_chrf=99", check=False)
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert f"{NAME}: verify failed (chrf)" in failed.stderr
    assert f"chrf: {NAME} (q4_k_m): chrF " in failed.stderr and "< verify.min_chrf 99.0" in failed.stderr
    assert "e.g. 'Explain why leaves change colour in autumn.' -> " in failed.stderr
    names = _names(ollama_server)
    assert f"{NAME}-unverified:latest" in names and f"{NAME}:latest" not in names

    # Verify again finds nothing under the name, and says what happened.
    missing = _cli("verify", *common, check=False)
    assert missing.returncode == 1 and f"{NAME}-unverified; run `ftdeploy register`" in missing.stderr

    # Registered again, it passes, and the stale -unverified copy goes.
    _cli("register", *common)
    _cli("verify", *common)
    names = _names(ollama_server)
    assert f"{NAME}:latest" in names and f"{NAME}-unverified:latest" not in names
