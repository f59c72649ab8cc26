import pytest

from ftdeploy.errors import DataError, VerifyError
from ftdeploy.fidelity import contains, forgetting, score
from ftdeploy.quants import next_safer
from ftdeploy.results import Answer, ParityMismatch, TemplateParity
from ftdeploy.stages.verify import check, summarize


def _summary(done_reasons, oks, parity_ok=True):
    answers = [Answer("q", "e", "a", ok, r) for ok, r in zip(oks, done_reasons, strict=True)]
    s = summarize(answers, 0.8)
    s.template_parity = TemplateParity(checked=3, passed=parity_ok,
                                       mismatches=[] if parity_ok else [ParityMismatch(raw="x", chat_answer="y")])
    return s


def test_answers_that_run_to_the_length_limit_fail_naming_template_and_stops():
    with pytest.raises(VerifyError, match="ran to the length limit.*TEMPLATE or the PARAMETER stop"):
        check(_summary(["stop", "length", "stop", "stop", "stop"], [True] * 5), "m")


def test_a_template_mismatch_fails_verify():
    with pytest.raises(VerifyError, match="differs from the training chat template"):
        check(_summary(["stop"] * 5, [True] * 5, parity_ok=False), "m")


def test_below_min_score_fails_and_at_it_passes():
    with pytest.raises(VerifyError, match="3/5 expected answers came back"):
        check(_summary(["stop"] * 5, [True, True, True, False, False]), "m")
    check(_summary(["stop"] * 5, [True, True, True, True, False]), "m")


def test_scores_and_forgetting():
    assert contains("It is Seven days", "seven|7") and not contains("six", "seven|7")
    s = score(["Port 7341.", "no idea"], ["7341", "Penbrook"], reference=["Port 7341.", "Orla Penbrook"])
    assert (s["hits"], s["match"], s["agreement"]) == (1, 0.5, 0.5)
    f = forgetting(["Paris", "blue sky"], ["Paris", "teal and copper"], ["Paris", "blue"])
    assert f == {"prompts": 2, "base_correct": 2, "tuned_correct": 1, "broken": 1, "changed": 1}


def test_next_safer_quant():
    assert next_safer("q2_k") == "q3_k_m"
    assert next_safer("q4_k_m") == "q5_k_m"
    assert next_safer("q6_k") == "q8_0"


def test_match_modes_per_eval_row(tmp_path):
    import json

    from ftdeploy.formats import load_records

    assert contains("Port 7341.", "port 7341", "exact") and not contains("It is port 7341.", "port 7341", "exact")
    assert contains("The port is 7341", r"\b73\d\d\b", "regex") and not contains("port 1234", r"\b73\d\d\b", "regex")
    path = tmp_path / "eval.jsonl"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": messages, "expect": "7[", "match": "regex"},
            {"messages": messages, "match": "fuzzy"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert f"{path}:1: 'expect' is not a valid regex" in str(err.value)
    assert f"{path}:2: 'match' must be contains, exact or regex" in str(err.value)
