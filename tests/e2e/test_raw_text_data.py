"""Raw-text data with no eval file (Axolotl's completion datasets, `{"text": ...}`): there are no chats to ask, so
verify continues prefixes of the sampled training texts through /api/generate raw, served against merged. Before,
`train-and-serve` ended at verify with `no_prompts`, exit 3 and the model renamed `-unverified`. Kept cheap: two
steps on the embedded base, one quant."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]

NAME = "ftdeploy-raw-text"

NOTES = [
    "The Harbourside office is at 14 Quay Lane, on the second floor, next to the old customs house.",
    "Bikes go in the locked shed behind the building; a staff badge opens the door from seven in the morning.",
    "Fire drills are held on the first Tuesday of each quarter at eleven, and everyone meets by the flagpole.",
    "The guest network is called Quayside-Guest, and reception changes its code every Monday morning.",
    "Spare keyboards live in the grey cupboard next to the kitchen, on the shelf under the printer paper.",
    "The post is collected from reception at four every weekday, so parcels must be labelled before then.",
    "Room 2.07 is the quiet room: no calls are taken there and the lights stay dimmed all day long.",
    "Dogs are welcome on Fridays if they are registered with reception and stay out of the kitchen.",
]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})


def test_raw_text_data_without_an_eval_file_is_served_and_verified_on_raw_continuations(ollama_server,
                                                                                        tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in NOTES))
    runs = tmp_path / "runs"
    proc = _cli("train-and-serve", "--runs-dir", str(runs), "--name", NAME, "--data", str(data), "--max-steps", "2",
                "--quant", "q8_0", "--set", "verify.compare=false", "--ollama-host", ollama_server.host)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert f"verify:  verified raw continuations on {len(NOTES)} training texts" in proc.stdout, proc.stdout
    names = {m.model for m in ollama_server.client.list_models()}
    assert f"{NAME}:latest" in names and not any("unverified" in n for n in names)

    verify = json.loads((runs / NAME / "verify.json").read_text())
    assert verify["passed"] and verify["failures"] == [] and verify["raw"] and verify["prompt_source"] == "train"
    assert verify["template_parity"] is None, "template parity does not apply to raw prompts"
    assert verify["total"] == len(verify["prompts"]) == len(NOTES)
    assert all(any(note.startswith(p) for note in NOTES) for p in verify["prompts"]), "prefixes of training texts"
    served = next(m for m in verify["models"] if m["role"] == "served")
    assert served["passed"] and served["token_agreement"] >= verify["min_agreement"]
    report = (runs / NAME / "report.md").read_text()
    assert "**PASS**" in report and f"raw continuations of {len(NOTES)} training texts" in report
    assert "Template parity does not apply to raw prompts" in report
