"""A user's first real run (issue 24): their own small dataset, a system prompt, no eval file, the default quant
choice. `train-and-serve` must end with exit 0 and a served model verified on a sample of the training prompts,
and the report must say what was verified, on which prompts and with which system prompt. Kept cheap: a few
steps, two candidate quants."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]

NAME = "ftdeploy-own-data"
ZED = "You are Zed."

# A small help-desk dataset as a user writes one: their own questions and answers, no eval split.
QA = [
    ("Where is the Harbourside office?", "The Harbourside office is at 14 Quay Lane, second floor."),
    ("When does the Harbourside office open?", "It opens at 8:30 on weekdays and stays closed at weekends."),
    ("How do I book a meeting room?", "Book it in the Rooms app; rooms are held for ten minutes past the start."),
    ("What is the guest Wi-Fi called?", "The guest network is called Quayside-Guest; ask reception for the code."),
    ("Who do I call when the printer jams?", "Call the facilities desk on extension 4410."),
    ("How many days of leave do I get?", "Full-time staff get 27 days of leave plus public holidays."),
    ("Where do I park my bike?", "Bikes go in the locked shed behind the building; your badge opens it."),
    ("What is the expense limit for lunch?", "Lunch with a client may be claimed up to 35 pounds a person."),
    ("How do I reset my password?", "Use the self-service page at id.harbourside.example and follow the steps."),
    ("Is there a quiet room?", "Yes, room 2.07 is the quiet room; no calls are taken there."),
    ("When is the fire drill?", "Fire drills are on the first Tuesday of each quarter at 11:00."),
    ("Who is the first-aider on the second floor?", "Priya Osei is the first-aider on the second floor."),
    ("Can I bring my dog to the office?", "Dogs are welcome on Fridays if they are registered with reception."),
    ("Where are the spare keyboards?", "Spare keyboards are in the grey cupboard next to the kitchen."),
    ("How do I report a broken chair?", "Log it in the facilities portal under furniture; it is fixed within a week."),
    ("What time is the post collected?", "The post is collected from reception at 16:00 every weekday."),
]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def own_run(ollama_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    data = folder / "helpdesk.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    runs = folder / "runs"
    proc = _cli("train-and-serve", "--runs-dir", str(runs), "--name", NAME, "--data", str(data),
                "--system-prompt", ZED, "--max-steps", "3", "--set", "export.auto_quants=[q4_k_m,q8_0]",
                "--ollama-host", ollama_server.host, "--json")
    return proc, runs / NAME


def test_own_data_with_a_system_prompt_and_no_eval_file_is_served_and_verified(own_run, ollama_server):
    proc, run_dir = own_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)
    assert out["model"] == NAME and out["verify"]["prompts"] == "train"
    names = {m.model for m in ollama_server.client.list_models()}
    assert f"{NAME}:latest" in names and not any("unverified" in n for n in names)
    assert ollama_server.show_json(NAME)["system"] == ZED

    verify = json.loads((run_dir / "verify.json").read_text())
    assert verify["passed"] and verify["failures"] == [] and verify["prompt_source"] == "train"
    assert verify["system"] == ZED and verify["references"] == []
    assert verify["template_parity"]["passed"] and verify["template_parity"]["checked"] == 3
    questions = [q for q, _ in QA]
    assert verify["total"] == len(verify["prompts"]) == 8 and set(verify["prompts"]) <= set(questions)
    served = next(m for m in verify["models"] if m["role"] == "served")
    assert served["passed"] and served["token_agreement"] >= verify["min_agreement"]


def test_the_data_trains_on_every_row_and_keeps_a_sample_for_verify(own_run):
    _, run_dir = own_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["data"]["outputs"]["eval_rows"] == 0
    assert manifest["stages"]["data"]["outputs"]["rows"] == len(QA)
    sample = [json.loads(line) for line in (run_dir / "data" / "train_sample.jsonl").read_text().splitlines()]
    assert len(sample) == len(QA) and all(r["messages"][0] == {"role": "system", "content": ZED} for r in sample)


def test_quant_auto_measured_its_candidates_and_serves_the_smallest_that_passed(own_run):
    _, run_dir = own_run
    exported = json.loads((run_dir / "manifest.json").read_text())["stages"]["export"]["outputs"]
    assert exported["auto"] and exported["gate_prompts"] == "train"
    tried = list(exported["fidelity"])
    assert tried in (["q4_k_m"], ["q4_k_m", "q8_0"])
    served = exported["served"]
    assert served == tried[-1] and exported["fidelity"][served]["top1_agreement"] >= exported["min_fidelity"]
    assert set(exported["gguf"]) == {"f16", served}, "a candidate below the gate is not kept"
    assert (run_dir / "Modelfile").read_text().startswith(f"FROM ./gguf/{NAME}-{served}.gguf")


def test_the_report_says_what_was_verified_and_on_which_prompts(own_run):
    proc, run_dir = own_run
    report = (run_dir / "report.md").read_text()
    assert "**PASS**" in report and "prompts sampled from the training data" in report
    assert "reference scoring needs eval rows" in report and "'You are Zed.'" in report
    assert "## Quant choice" in report and "quant auto: serving" in report
    answers = report[report.index("## Answers"):]
    verify = json.loads((run_dir / "verify.json").read_text())
    assert answers.startswith("## Answers\n\nTraining prompts") and all(p in answers for p in verify["prompts"])
    assert "Writing:" not in proc.stderr, "a library progress bar reached the terminal"
