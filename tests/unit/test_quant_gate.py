"""The quant gate (issue 24, item 16): `--quant auto` serves the smallest measured type that passes
verify.min_fidelity, and a refusal never recommends a type nobody measured."""

import pytest

from ftdeploy import quants
from ftdeploy.config import load_config
from ftdeploy.errors import ConfigError, ExportError
from ftdeploy.report import sections
from ftdeploy.results import ExportResult
from ftdeploy.stages.export import gate_quants

# What docs/benchmarks.md measured on the demo base: q5_k_m below q4_k_m.
MEASURED = {"q4_k_m": 0.798, "q5_k_m": 0.662, "q6_k": 0.91, "q8_0": 0.97}


class Measure:
    """The gate's measure, recording which types it was asked for."""

    def __init__(self, scores):
        self.scores, self.asked = scores, []

    def __call__(self, qtype):
        self.asked.append(qtype)
        return {"top1_agreement": self.scores[qtype], "ppl_ratio": 1.01}


def test_auto_serves_the_smallest_type_that_passes_and_measures_no_more():
    measure = Measure(MEASURED)
    choice = gate_quants([], "f16", 0.8, measure, ["q8_0", "q6_k", "q4_k_m", "q5_k_m"])
    assert choice.served == "q6_k"
    assert measure.asked == choice.tried == ["q4_k_m", "q5_k_m", "q6_k"]  # smallest first, q8_0 never needed
    assert choice.flagged == ["q4_k_m", "q5_k_m"]
    assert "serving q6_k" in choice.note and "q4_k_m 0.798, q5_k_m 0.662, q6_k 0.910" in choice.note


def test_auto_serves_the_unquantized_file_when_no_candidate_passes():
    choice = gate_quants([], "f16", 0.99, Measure(MEASURED), ["q4_k_m", "q8_0"])
    assert choice.served == "f16" and choice.tried == ["q4_k_m", "q8_0"] and choice.flagged == ["q4_k_m", "q8_0"]
    assert "no candidate reached verify.min_fidelity 0.99" in choice.note and "unquantized f16" in choice.note


def test_a_refused_explicit_quant_names_no_type_that_was_not_measured():
    with pytest.raises(ExportError) as err:
        gate_quants(["q4_k_m"], "f16", 0.8, Measure(MEASURED))
    message = str(err.value)
    assert "q4_k_m 0.798" in message and "no type measured here passes" in message and "--quant auto" in message
    others = [q for q in quants.NAMES if q not in ("q4_k_m", "f16")]
    assert not [q for q in others if q in message], message


def test_an_explicit_list_serves_the_first_type_that_passes_and_names_its_score():
    measure = Measure(MEASURED)
    choice = gate_quants(["q4_k_m", "q8_0"], "f16", 0.8, measure)
    assert (choice.served, choice.flagged, measure.asked) == ("q8_0", ["q4_k_m"], ["q4_k_m", "q8_0"])
    assert "q4_k_m 0.798 below verify.min_fidelity 0.8" in choice.note and "serving q8_0 (top-1 0.970)" in choice.note
    assert gate_quants(["q4_k_m"], "f16", 0.7, Measure(MEASURED)).served == "q4_k_m"


def test_with_nothing_to_measure_on_auto_serves_its_largest_candidate_and_says_so():
    choice = gate_quants([], "f16", 0.8, None, ["q4_k_m", "q8_0", "q6_k"])
    assert choice.served == "q8_0" and choice.fidelity == {} and "unmeasured" in choice.note


def test_candidates_are_tried_smallest_first():
    assert quants.smallest_first(["q8_0", "q4_k_m", "f16", "q6_k", "q4_k_m"]) == ["q4_k_m", "q6_k", "q8_0", "f16"]


def test_auto_is_the_default_and_stands_alone():
    cfg = load_config()
    assert cfg.export.quant == ["auto"] and cfg.export.auto_quants == ["q4_k_m", "q5_k_m", "q6_k", "q8_0"]
    assert load_config(flags={"export.quant": "AUTO"}).export.quant == ["auto"]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["export.quant=auto,q8_0", "export.auto_quants=q4_k_m,q9"])
    assert "export.quant: `auto` chooses the type itself" in str(err.value)
    assert "export.auto_quants[1]: unknown quantization type 'q9'" in str(err.value)


def test_the_report_lists_the_types_tried_with_their_scores():
    exported = ExportResult(served="q6_k", auto=True, min_fidelity=0.8, flagged=["q4_k_m", "q5_k_m"],
                            fidelity={q: {"top1_agreement": MEASURED[q], "ppl_ratio": 1.02}
                                      for q in ("q4_k_m", "q5_k_m", "q6_k")},
                            quant_note="quant auto: serving q6_k", gate_prompts="train")
    manifest = {"stages": {"export": {"outputs": exported.to_dict()}}}
    parts = {title: (text, rows) for title, text, rows in sections(manifest, "m")}
    text, rows = parts["Quant choice"]
    assert text[0] == "quant auto: serving q6_k" and "a sample of the training conversations" in text[1]
    assert rows[1:] == [["q4_k_m", "0.798", "1.020", "below the gate"], ["q5_k_m", "0.662", "1.020", "below the gate"],
                        ["q6_k", "0.910", "1.020", "served"]]
