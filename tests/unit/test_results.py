"""Stage results are typed: they go into the manifest as JSON and come back as the same objects, and the report
reads fields, not display text."""

import json

from ftdeploy.report import sections
from ftdeploy.results import (
    RESULT_TYPES,
    Answer,
    ExportResult,
    Forgetting,
    ForgettingItem,
    LossPoint,
    ModelScore,
    ParityMismatch,
    RegisterResult,
    TagResult,
    TemplateParity,
    TrainMetrics,
    TrainResult,
    VerifySummary,
)
from ftdeploy.runs import STAGES


def _summary() -> VerifySummary:
    return VerifySummary(
        hits=4, total=5, score=0.8, min_score=0.8, passed=True, stopped=5,
        answers=[Answer(prompt="q", expected="7341", answer="port 7341", ok=True, done_reason="stop")],
        template_parity=TemplateParity(checked=3, mismatches=[ParityMismatch(chat=[], raw="a", chat_answer="b")],
                                       passed=False),
        forgetting=Forgetting(prompts=1, base_correct=1, tuned_correct=1,
                              items=[ForgettingItem(prompt="p", expect="e", base="b", tuned="t")]),
        models=[ModelScore(role="merged", label="merged", hits=5, total=5, match=1.0),
                ModelScore(role="served", label="the served one", quant="q4_k_m", tag="demo", hits=4, total=5,
                           match=0.8, agreement=0.6, top1_agreement=0.93, ppl_ratio=1.02)],
        prompts=["q"])


def test_every_stage_has_a_result_type():
    assert list(RESULT_TYPES) == list(STAGES)


def test_a_result_survives_the_manifest_as_the_same_object():
    summary = _summary()
    back = VerifySummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert back == summary
    assert isinstance(back.template_parity.mismatches[0], ParityMismatch)
    assert isinstance(back.forgetting.items[0], ForgettingItem) and isinstance(back.answers[0], Answer)
    register = RegisterResult(model="m", tags={"m:q8_0": TagResult(quant="q8_0", digest="sha256:1", uploaded_bytes=3)})
    assert RegisterResult.from_dict(json.loads(json.dumps(register.to_dict()))) == register


def test_keys_a_newer_or_older_ftdeploy_wrote_are_ignored_and_missing_ones_default():
    export = ExportResult.from_dict({"gguf": {"q8_0": "/x.gguf"}, "served": "q8_0", "written_by_a_future_version": 1})
    assert export.served == "q8_0" and export.flagged == [] and export.base_gguf is None
    assert VerifySummary.from_dict(None) == VerifySummary()


def test_the_report_finds_the_served_model_by_its_role_not_its_label():
    manifest = {"metrics": {"verify": _summary().to_dict()},
                "stages": {"export": {"outputs": ExportResult(served="q4_k_m", flagged=["q2_k"],
                                                              min_fidelity=0.85).to_dict()}}}
    verdict = dict((title, text) for title, text, _ in sections(manifest, "demo"))["Verdict"]
    assert "agree with it on 60% of prompts" in verdict[0], "the served model's agreement, found without 'served as'"
    assert "**FAIL**" in verdict[0], "a template-parity mismatch fails the verdict"
    tables = {title: (text, rows) for title, text, rows in sections(manifest, "demo")}
    notes, rows = tables["Eval per model and quant"]
    assert rows[2][0] == "the served one" and rows[2][3] == "0.930"
    assert "flagged q2_k" in notes[1] and "Served: q4_k_m" in notes[1]


def test_the_manifest_json_keeps_ints_ints_and_floats_floats():
    export = ExportResult(fidelity={"q4_k_m": {"top1_agreement": 0.93, "ppl_ratio": 1.0, "tokens": 278}},
                          min_fidelity=0.85, base_bytes=123)
    text = json.dumps(export.to_dict())
    assert '"tokens": 278}' in text and '"ppl_ratio": 1.0,' in text and '"base_bytes": 123,' in text
    assert json.dumps(ExportResult.from_dict(json.loads(text)).to_dict()) == text


def test_trainings_metrics_are_the_manifests_metrics_train_and_give_the_stages_result():
    metrics = TrainMetrics(engine="hf", device="cpu", steps=10, train_loss=1.8, final_loss=1.5, seconds=3.1,
                           loss_history=[LossPoint(step=5, loss=2.1, lr=0.0002, elapsed_s=1.52)], optim="adamw_torch",
                           per_device_batch=2, gradient_accumulation=4, global_batch=8, examples_per_s=25.81,
                           dataset_trained_tokens=900)
    stored = json.loads(json.dumps(metrics.to_dict()))
    assert list(stored) == ["engine", "device", "steps", "train_loss", "final_loss", "seconds", "loss_history", "optim",
                            "world_size", "strategy", "per_device_batch", "gradient_accumulation", "global_batch",
                            "examples_per_s", "dataset_trained_tokens", "resumed_from"]
    assert stored["loss_history"] == [{"step": 5, "loss": 2.1, "lr": 0.0002, "elapsed_s": 1.52}]
    assert TrainMetrics.from_dict(stored) == metrics
    result = TrainResult.from_dict(metrics.to_dict())
    assert (result.engine, result.steps, result.final_loss, result.global_batch) == ("hf", 10, 1.5, 8)
    assert "loss_history" not in result.to_dict()
    # A node > 0 of a multi-node run has only its world size; the rest is TrainResult's defaults.
    assert TrainResult.from_dict(TrainMetrics(world_size=4).to_dict()) == TrainResult(world_size=4)
