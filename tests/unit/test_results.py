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
    ModelScore,
    ParityMismatch,
    RegisterResult,
    TagResult,
    TemplateParity,
    VerifySummary,
)
from ftdeploy.runs import STAGES


def _summary() -> VerifySummary:
    return VerifySummary(
        hits=4, total=5, score=0.8, min_score=0.8, passed=True, stopped=5,
        answers=[Answer("q", "7341", "port 7341", True, "stop")],
        template_parity=TemplateParity(checked=3, mismatches=[ParityMismatch(chat=[], raw="a", chat_answer="b")],
                                       passed=False),
        forgetting=Forgetting(prompts=1, base_correct=1, tuned_correct=1, items=[ForgettingItem("p", "e", "b", "t")]),
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
