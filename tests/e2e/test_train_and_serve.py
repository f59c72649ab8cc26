"""The spine: `ftdeploy train-and-serve` on the embedded default, ending in a real Ollama server
that answers the trained facts. Runs the real CLI in a subprocess; nothing is faked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import E2E_SECRET as SECRET
from conftest import cli_train_and_serve as _train_and_serve
from conftest import read_dataset

from ftdeploy.data import demo_path

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(demo_cli_run):
    """The session's demo run (conftest.demo_cli_run): the notebook test reruns the same one through the API."""
    return demo_cli_run


def test_every_config_key_a_stage_reads_is_in_its_fingerprint(demo_run):
    """A setting a stage reads but its fingerprint leaves out is silently ignored when the run is repeated
    (the stage is skipped as unchanged): issue 15's verify.min_fidelity bug in export. A stage's fingerprint
    holds its declared keys and, through `upstream`, those of every stage before it."""
    from ftdeploy.pipeline import REGISTRY

    _, run_dir, _ = demo_run
    reads = json.loads((run_dir.parent.parent / "config-reads.json").read_text())
    assert {"data", "train", "merge", "export", "modelfile", "register", "verify"} <= set(reads)
    covered: list[str] = []
    for name, stage in REGISTRY.items():
        covered += stage.reads
        allowed = [*covered, *stage.volatile]
        missing = [k for k in reads.get(name, []) if not any(k == a or k.startswith(a + ".") for a in allowed)]
        assert not missing, f"the {name} stage reads {missing}, which its fingerprint leaves out"


def test_the_served_model_answers_the_trained_facts(demo_run, ollama_server):
    result, _, _ = demo_run
    assert result["model"] == "ftdeploy-e2e"
    assert result["verify"]["hits"] >= 4, result
    # Ask again ourselves, outside ftdeploy's verify, with the official `ollama` client (conftest's RealOllama.chat):
    # at least 4 of the 5 facts come back.
    facts = read_dataset(str(demo_path("eval"))).records
    hits = sum(f.expect.lower() in ollama_server.chat("ftdeploy-e2e", f.messages[0]["content"]).lower() for f in facts)
    assert hits >= 4
    # Served with num_ctx from training (data.max_seq_length 2048, below the floor of Ollama's own default 4096;
    # SmolLM2 takes 8192) on every machine (tests/integration/test_num_ctx_real_ollama.py: the rule on the server).
    shown = ollama_server.show_json("ftdeploy-e2e")["parameters"].splitlines()
    assert [line.split()[1] for line in shown if line.split()[0] == "num_ctx"] == ["4096"], shown


def test_the_run_directory_holds_every_artifact_with_its_hash(demo_run):
    _, run_dir, _ = demo_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in
               ("data", "train", "merge", "export", "modelfile", "register", "verify"))
    gguf = [k for k in manifest["artifacts"] if k.endswith("-q4_k_m.gguf")]
    assert gguf and len(manifest["artifacts"][gguf[0]]["sha256"]) == 64
    assert manifest["versions"]["llama_cpp_python"] and manifest["versions"]["ollama_server"]
    modelfile = (run_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./gguf/ftdeploy-e2e-q4_k_m.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert (run_dir / "loss.png").is_file() and (run_dir / "merged" / "model.safetensors").is_file()
    losses = [h["loss"] for h in manifest["metrics"]["train"]["loss_history"]]
    assert losses[-1] < losses[0] / 2


def test_progress_and_results_go_to_the_right_streams(demo_run):
    result, _, stderr = demo_run
    assert "step" in stderr and "loss" in stderr and "left" in stderr
    assert result["ollama_run"].endswith("run ftdeploy-e2e")


def test_rerunning_skips_finished_stages_and_uploads_nothing(demo_run, ollama_server):
    _, run_dir, _ = demo_run
    proc = _train_and_serve(run_dir.parent, ollama_server.host)
    for stage in ("data", "train", "merge", "export", "modelfile"):
        assert f"==> {stage} (unchanged, skipped)" in proc.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["register"]["outputs"]["uploaded_bytes"] == 0
    assert json.loads(proc.stdout)["verify"]["hits"] >= 4


def test_the_report_has_every_section_with_real_numbers(demo_run):
    result, run_dir, _ = demo_run
    report = (run_dir / "report.md").read_text()
    for section in ("## Verdict", "## Eval per model and quant", "## Answers", "## Forgetting", "## Training",
                    "## Time per stage", "## Artifacts", "## Versions and provenance"):
        assert section in report
    assert "**PASS**" in report and result["report"].endswith("report.md")
    verify = json.loads((run_dir / "verify.json").read_text())
    roles = {m["role"]: m for m in verify["models"]}
    assert roles["merged"]["hits"] >= 4
    served = roles["served"]
    assert served["tag"] == "ftdeploy-e2e" and served["quant"] == "q4_k_m"
    assert 0 < served["top1_agreement"] <= 1 and served["ppl_ratio"] > 0
    assert verify["forgetting"]["prompts"] == 8 and verify["forgetting"]["base_correct"] >= 5
    assert "<img" in (run_dir / "report.html").read_text()


def test_provenance_is_in_the_served_gguf(demo_run, ollama_server):
    info = ollama_server.client.show("ftdeploy-e2e").modelinfo
    assert "ftdeploy" in info["general.description"] and "sha256:" in info["general.description"]
    assert info["general.finetune"] == "ftdeploy-e2e"
    assert 0 < info["ftdeploy.eval.top1_vs_f16"] <= 1 and info["ftdeploy.eval.ppl_ratio"] > 0


def test_quant_gate_trips_on_q2_k_and_recommends_no_type_it_did_not_measure(demo_run):
    """Measured on the demo model (docs/benchmarks.md): top-1 agreement with F16 is 0.94 for q8_0, 0.87 for
    q4_k_m, but 0.66 for q2_k (and, surprisingly, q5_k_m, whose 576-wide rows fall back to q5_0/q5_1): so the
    refusal names the score and `--quant auto`, never a type ("try q3_k_m") nobody measured (issue 24)."""
    _, run_dir, _ = demo_run
    cmd = [sys.executable, "-m", "ftdeploy.cli", "export", "--runs-dir", str(run_dir.parent), "--name", "ftdeploy-e2e",
           "--quant", "q2_k"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1
    assert "quant gate" in proc.stderr and "q2_k 0." in proc.stderr and "no type measured here passes" in proc.stderr
    assert "--quant auto" in proc.stderr and "q3_k_m" not in proc.stderr and "q5_k_m" not in proc.stderr


def test_the_token_in_the_environment_is_written_nowhere(demo_run):
    result, run_dir, stderr = demo_run
    assert SECRET not in json.dumps(result) and SECRET not in stderr
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- scale-out: 2 processes, adapter deploy

# Two gloo processes sum the same examples per step as one process (global batch 4 = 1 x 4 = 2 x 2); what
# differs is float summation order and per-process padding. Measured gap on the demo: see docs/benchmarks.md.
LOSS_TOLERANCE = 0.02


def _run_cli(*args, timeout=1800):
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_adapter_run(demo_run, ollama_server):
    """The demo again, trained by 2 processes under torchrun (gloo) and deployed as a LoRA adapter on the base."""
    runs = demo_run[1].parent
    proc = _run_cli("train-and-serve", "--runs-dir", str(runs), "--name", "ftdeploy-e2e-ddp", "--nproc", "2",
                    "--deploy", "adapter", "--set", "verify.compare=false", "--ollama-host", ollama_server.host,
                    "--json", "-v")
    return json.loads(proc.stdout), runs / "ftdeploy-e2e-ddp", proc.stderr


def test_two_gloo_processes_follow_the_one_process_loss_trajectory(demo_run, ddp_adapter_run):
    one = json.loads((demo_run[1] / "manifest.json").read_text())["metrics"]["train"]
    two_manifest = json.loads((ddp_adapter_run[1] / "manifest.json").read_text())
    two = two_manifest["metrics"]["train"]
    assert two_manifest["world_size"] == 2 and two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_batch"] == one["global_batch"] == 4 and two["per_device_batch"] == 2
    steps_one = [h["step"] for h in one["loss_history"]]
    assert steps_one == [h["step"] for h in two["loss_history"]] and len(steps_one) == 30
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(one["loss_history"], two["loss_history"], strict=True)]
    assert max(gaps) < LOSS_TOLERANCE, gaps
    # Rank 0 alone wrote the adapter; only one progress line per step reached stderr.
    assert ddp_adapter_run[2].count("  step   30/30") == 1


def test_the_adapter_deploy_answers_the_trained_facts_and_uploads_megabytes(ddp_adapter_run, ollama_server):
    result, run_dir, _ = ddp_adapter_run
    assert result["verify"]["hits"] >= 4, result
    reg = json.loads((run_dir / "manifest.json").read_text())["stages"]["register"]["outputs"]
    assert reg["deploy"] == "adapter" and reg["base_model"] == "ftdeploy-base-smollm2-135m-instruct:q4_k_m"
    assert reg["uploaded_bytes"] == reg["adapter_bytes"] < reg["full_model_bytes"] / 3
    shown = ollama_server.client.show("ftdeploy-e2e-ddp")
    assert "ADAPTER" in shown["modelfile"]
    facts = read_dataset(str(demo_path("eval"))).records
    def knows(model, fact):
        return fact.expect.lower() in ollama_server.chat(model, fact.messages[0]["content"]).lower()

    assert sum(knows("ftdeploy-e2e-ddp", f) for f in facts) >= 4
    # The base alone does not know the made-up facts: the answers come from the adapter.
    assert sum(knows(reg["base_model"], f) for f in facts) <= 1
    report = (run_dir / "report.md").read_text()
    assert "## Deploy" in report and "LoRA adapter (this tune)" in report and "full model" in report


def test_a_second_tune_of_the_same_base_uploads_only_its_adapter(ddp_adapter_run, ollama_server):
    runs = ddp_adapter_run[1].parent
    _run_cli("train-and-serve", "--runs-dir", str(runs), "--name", "ftdeploy-e2e-tune2", "--deploy", "adapter",
             "--max-steps", "3", "--min-fidelity", "0", "--set", "verify.min_score=0", "--set", "verify.compare=false",
             "--ollama-host", ollama_server.host, "--json")
    reg = json.loads((runs / "ftdeploy-e2e-tune2" / "manifest.json").read_text())["stages"]["register"]["outputs"]
    assert reg["base_created"] is False and reg["base_uploaded_bytes"] == 0
    assert reg["uploaded_bytes"] == reg["adapter_bytes"] > 0


# Preference training, chained the way people use it: the SFT demo above, then DPO on its merged model. The pairs
# differ by one trait (the chosen answer opens with "Ahoy!"), and none of their prompts is asked below.
UNSEEN = ["What is the capital of France?", "How many legs does a cat have?", "What color is a banana?",
          "What do birds use to fly?", "Where do penguins live?"]


def _dpo(runs, host):
    from ftdeploy.assets import asset

    return _run_cli("train-and-serve", "--runs-dir", str(runs), "--name", "ftdeploy-e2e-dpo", "--method", "dpo",
                    "--from-run", "ftdeploy-e2e", "--data", str(asset("demo", "prefs.jsonl")),
                    "--set", f"data.eval={asset('demo', 'prefs_eval.jsonl')}", "--max-steps", "8",
                    "--ollama-host", host, "--json", "-v")


@pytest.fixture(scope="module")
def dpo_run(demo_run, ollama_server):
    runs = demo_run[1].parent
    proc = _dpo(runs, ollama_server.host)
    return json.loads(proc.stdout), runs / "ftdeploy-e2e-dpo", proc.stderr


def _opens_with_ahoy(answer: str) -> bool:
    return answer.strip().lower().startswith("ahoy")


def test_dpo_on_the_sft_run_serves_the_preferred_trait_on_unseen_prompts(dpo_run, ollama_server):
    """Through Ollama's /api/chat: the DPO model shows the trait on prompts the pairs never had; the SFT model it
    started from (served as ftdeploy-e2e) does not."""
    dpo = [ollama_server.chat("ftdeploy-e2e-dpo", p, num_predict=16) for p in UNSEEN]
    sft = [ollama_server.chat("ftdeploy-e2e", p, num_predict=16) for p in UNSEEN]
    assert sum(map(_opens_with_ahoy, dpo)) >= 4, dpo
    assert not any(map(_opens_with_ahoy, sft)), sft


def test_dpo_verify_measured_the_preference_on_held_out_pairs(dpo_run):
    result, run_dir, _ = dpo_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    pref = manifest["metrics"]["verify"]["preference"]
    assert pref["pairs"] == 6 and pref["merged_accuracy"] == 1.0
    assert pref["base_accuracy"] < 0.5  # the SFT model this run started from did not prefer the trait
    assert pref["served_accuracy"] >= 0.8 and pref["agreement"] >= 0.8
    train = manifest["metrics"]["train"]
    assert train["method"] == "dpo" and train["final_margin"] > train["preference_history"][0]["margin"]
    assert manifest["base_model"]["resolved"] == str(run_dir.parent / "ftdeploy-e2e" / "merged")
    assert "Preference" in (run_dir / "report.md").read_text()


def test_a_dpo_rerun_skips_what_is_unchanged_and_a_changed_sft_run_trains_it_again(dpo_run, ollama_server):
    _, run_dir, _ = dpo_run
    proc = _dpo(run_dir.parent, ollama_server.host)
    for stage in ("data", "train", "merge", "export", "modelfile"):
        assert f"==> {stage} (unchanged, skipped)" in proc.stderr
    sft = run_dir.parent / "ftdeploy-e2e" / "manifest.json"
    kept = sft.read_text()
    manifest = json.loads(kept)
    manifest["stages"]["merge"]["fingerprint"] = "changed-upstream"  # as a rerun of the SFT run with other settings
    sft.write_text(json.dumps(manifest))
    from ftdeploy.config import load_config
    from ftdeploy.pipeline import Context, plan_stages
    from ftdeploy.runs import Run

    try:
        cfg = load_config(run_dir / "config.yaml")
        plan = dict(plan_stages(Context(cfg, Run(run_dir))))
    finally:
        sft.write_text(kept)  # the runs chained on it below start from the SFT run as it was made
    assert plan["data"] and plan["train"]


# ORPO and KTO on the same SFT run, smaller: ORPO on the pairs (no reference model), KTO on the pairs split into
# unpaired good and bad answers, deployed as an adapter on the SFT model (registered as a base of its own).


def _chained(runs, host, name, method, data, steps, *extra):
    from ftdeploy.assets import asset

    proc = _run_cli("train-and-serve", "--runs-dir", str(runs), "--name", name, "--method", method,
                    "--from-run", "ftdeploy-e2e", "--data", str(data),
                    "--set", f"data.eval={asset('demo', 'prefs_eval.jsonl')}", "--max-steps", str(steps),
                    "--ollama-host", host, "--json", *extra)
    return json.loads(proc.stdout), runs / name


@pytest.fixture(scope="module")
def orpo_run(demo_run, ollama_server):
    from ftdeploy.assets import asset

    return _chained(demo_run[1].parent, ollama_server.host, "ftdeploy-e2e-orpo", "orpo", asset("demo", "prefs.jsonl"),
                    8)


def _unpaired(pairs: Path, out: Path) -> Path:
    """TRL's unpaired KTO layout: each pair's answers as two rows, labelled, shuffled apart."""
    import random

    rows = []
    for line in pairs.read_text().splitlines():
        pair = json.loads(line)
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    random.Random(0).shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def kto_run(demo_run, ollama_server, tmp_path_factory):
    from ftdeploy.assets import asset

    data = _unpaired(Path(asset("demo", "prefs.jsonl")), tmp_path_factory.mktemp("kto") / "kto.jsonl")
    # 16 steps of 4: one pass over the 64 rows (8 steps left the trait unlearned: KTO learns more slowly than DPO)
    return _chained(demo_run[1].parent, ollama_server.host, "ftdeploy-e2e-kto", "kto", data, 16, "--deploy", "adapter")


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_on_the_sft_run_serve_the_trait_on_unseen_prompts(method, request, ollama_server):
    result, run_dir = request.getfixturevalue(f"{method}_run")
    name = f"ftdeploy-e2e-{method}"
    answers = [ollama_server.chat(name, p, num_predict=16) for p in UNSEEN]
    assert sum(map(_opens_with_ahoy, answers)) >= 4, answers
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["train"]["method"] == method and manifest["metrics"]["verify"]["passed"]


def test_orpo_verify_measured_the_served_preference_without_a_reference_model(orpo_run):
    pref = json.loads((orpo_run[1] / "manifest.json").read_text())["metrics"]["verify"]["preference"]
    assert pref["method"] == "orpo" and pref["merged_accuracy"] == 1.0 and pref["base_accuracy"] < 0.5
    assert pref["served_accuracy"] >= 0.8 and pref["agreement"] >= 0.8


def test_kto_from_unpaired_rows_raised_the_good_answers_and_its_adapter_sits_on_the_sft_model(kto_run, ollama_server):
    result, run_dir = kto_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    pref = manifest["metrics"]["verify"]["preference"]
    # The held-out pairs: the merged model prefers the good answers the base did not, and so does the served one
    assert pref["method"] == "kto" and pref["merged_accuracy"] >= 0.8 and pref["base_accuracy"] < 0.5
    assert pref["served_accuracy"] >= 0.8 and pref["agreement"] >= 0.8
    assert manifest["stages"]["data"]["outputs"]["rows"] == 64  # 32 good and 32 bad rows, unpaired
    reg = manifest["stages"]["register"]["outputs"]
    assert reg["deploy"] == "adapter" and reg["base_model"].startswith("ftdeploy-base-ftdeploy-e2e-")
    assert reg["uploaded_bytes"] == reg["adapter_bytes"]
    # The base it registered is the SFT model (no trait), not the demo's base model under its name.
    base_answers = [ollama_server.chat(reg["base_model"], p, num_predict=16) for p in UNSEEN]
    assert not any(map(_opens_with_ahoy, base_answers)), base_answers
    assert "ADAPTER" in ollama_server.client.show("ftdeploy-e2e-kto")["modelfile"]
