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
    PreferencePoint,
    RegisterResult,
    RewardCheck,
    RewardPoint,
    RewardScore,
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
    # Keys added later go at the end (an SFT manifest only gains keys): method, a preference run's rewards, a GRPO
    # run's.
    assert list(stored) == ["engine", "device", "steps", "train_loss", "final_loss", "seconds", "loss_history", "optim",
                            "world_size", "strategy", "per_device_batch", "gradient_accumulation", "global_batch",
                            "examples_per_s", "dataset_trained_tokens", "resumed_from", "method", "final_margin",
                            "final_accuracy", "preference_history", "reward_history", "final_reward", "tracker",
                            "tracker_run", "gradient_checkpointing", "packing", "attention", "plan"]
    assert (stored["method"], stored["final_margin"], stored["preference_history"]) == ("sft", None, [])
    assert stored["loss_history"] == [{"step": 5, "loss": 2.1, "lr": 0.0002, "elapsed_s": 1.52}]
    assert TrainMetrics.from_dict(stored) == metrics
    result = TrainResult.from_dict(metrics.to_dict())
    assert (result.engine, result.steps, result.final_loss, result.global_batch) == ("hf", 10, 1.5, 8)
    assert "loss_history" not in result.to_dict()
    # A node > 0 of a multi-node run has only its world size; the rest is TrainResult's defaults.
    assert TrainResult.from_dict(TrainMetrics(world_size=4).to_dict()) == TrainResult(world_size=4)


def _dpo_metrics() -> TrainMetrics:
    return TrainMetrics(engine="hf", device="cpu", steps=3, final_loss=0.2, seconds=4.0, method="dpo",
                        loss_history=[LossPoint(step=s, loss=0.7 - 0.2 * s) for s in (1, 2, 3)],
                        preference_history=[
                            PreferencePoint(step=1, rewards_chosen=0.0, rewards_rejected=0.0, margin=0.0, accuracy=0.0),
                            PreferencePoint(step=3, rewards_chosen=0.9, rewards_rejected=-0.6, margin=1.5, accuracy=1),
                        ], final_margin=1.5, final_accuracy=1.0)


def test_a_preference_runs_rewards_survive_the_manifest_and_reach_the_stages_result():
    metrics = _dpo_metrics()
    stored = json.loads(json.dumps(metrics.to_dict()))
    assert stored["preference_history"][1] == {"step": 3, "rewards_chosen": 0.9, "rewards_rejected": -0.6,
                                               "margin": 1.5, "accuracy": 1.0, "kl": None, "log_odds_ratio": None,
                                               "nll_loss": None}
    # A manifest written before ORPO's fields were added reads with them unset.
    older = {k: v for k, v in stored["preference_history"][1].items() if k not in ("log_odds_ratio", "nll_loss")}
    assert PreferencePoint.from_dict(older) == metrics.preference_history[1]
    back = TrainMetrics.from_dict(stored)
    assert back == metrics and isinstance(back.preference_history[0], PreferencePoint)
    result = TrainResult.from_dict(stored)
    assert (result.method, result.final_margin, result.final_accuracy) == ("dpo", 1.5, 1.0)
    keys = list(result.to_dict())  # added after the fields before them (later ones follow)
    assert keys[keys.index("method"):][:4] == ["method", "final_margin", "final_accuracy", "final_reward"]
    # A manifest written before preference training reads as SFT.
    old = {k: v for k, v in stored.items() if k not in ("method", "final_margin", "final_accuracy",
                                                        "preference_history")}
    assert TrainMetrics.from_dict(old).method == "sft" and TrainResult.from_dict(old).final_margin is None


def test_the_training_section_names_a_preference_runs_method_and_rewards_and_an_sft_runs_neither():
    def training(metrics: TrainMetrics) -> list[str]:
        manifest = {"metrics": {"train": metrics.to_dict()}}
        return dict((title, text) for title, text, _ in sections(manifest, "demo"))["Training"]

    text = training(_dpo_metrics())
    assert text[1] == ("Method `dpo`: DPO (Direct Preference Optimization); final reward margin (chosen minus "
                       "rejected) 1.500, from 0.000 at step 1; final reward accuracy 100% (pairs whose chosen answer "
                       "scored higher).")
    kto = _dpo_metrics().model_copy(update={"method": "kto", "final_accuracy": None})
    assert "Method `kto`: KTO" in training(kto)[1] and "accuracy" not in training(kto)[1]
    orpo = _dpo_metrics().model_copy(update={"method": "orpo", "preference_history": [
        p.model_copy(update={"log_odds_ratio": 0.5 * p.step, "nll_loss": 2.0 / p.step})
        for p in _dpo_metrics().preference_history]})
    text = training(orpo)[1]
    assert text.startswith("Method `orpo`: ORPO (Odds Ratio Preference Optimization: SFT on the chosen answers and an "
                           "odds-ratio preference term in one loss, no reference model;")
    assert text.endswith("final reward accuracy 100% (pairs whose chosen answer scored higher); final log odds ratio "
                         "(chosen over rejected) 1.500, SFT loss on the chosen answers 0.6667.")
    assert "log odds ratio" not in training(_dpo_metrics())[1]
    sft = TrainMetrics(engine="hf", device="cpu", steps=3, final_loss=0.2, seconds=4.0)
    assert training(sft) == ["Engine `hf` on cpu, 3 steps, final loss 0.2000, 4.0 s.", "![loss](loss.png)"]


def _grpo_metrics() -> TrainMetrics:
    return TrainMetrics(engine="hf", device="cpu", steps=3, final_loss=0.0, seconds=9.0, method="grpo",
                        loss_history=[LossPoint(step=s, loss=0.0) for s in (1, 2, 3)],
                        reward_history=[RewardPoint(step=1, reward=0.25, reward_std=0.4,
                                                    functions={"format_reward": 0.25, "exact_answer": 0.0}),
                                        RewardPoint(step=3, reward=1.25, reward_std=0.5, kl=0.01,
                                                    functions={"format_reward": 0.75, "exact_answer": 0.5})],
                        final_reward=1.25)


def test_a_grpo_runs_rewards_survive_the_manifest_and_name_the_training_section():
    metrics = _grpo_metrics()
    stored = json.loads(json.dumps(metrics.to_dict()))
    assert stored["reward_history"][1] == {"step": 3, "reward": 1.25, "reward_std": 0.5, "kl": 0.01,
                                           "functions": {"format_reward": 0.75, "exact_answer": 0.5}}
    assert TrainMetrics.from_dict(stored) == metrics and TrainResult.from_dict(stored).final_reward == 1.25
    old = {k: v for k, v in stored.items() if k not in ("reward_history", "final_reward")}  # before GRPO
    assert TrainMetrics.from_dict(old).reward_history == [] and TrainResult.from_dict(old).final_reward is None
    training = dict((title, text) for title, text, _ in sections({"metrics": {"train": stored}}, "demo"))["Training"]
    assert training[1] == ("Method `grpo`: GRPO (Group Relative Policy Optimization), answers sampled and scored by "
                           "the reward functions as it trained; final mean reward 1.250, from 0.250 at step 1 "
                           "(format_reward 0.750, exact_answer 0.500).")


def test_verifys_reward_check_is_a_section_of_the_report():
    check = RewardCheck(prompts=6, max_tokens=64, served=1.5, merged=1.5, base=0.25, functions=[
        RewardScore(name="format_reward", served=1.0, merged=1.0, base=0.25, scored=6),
        RewardScore(name="exact_answer", served=0.5, merged=0.5, base=None, scored=6)])
    stored = json.loads(json.dumps(VerifySummary(rewards=check).to_dict()))
    assert VerifySummary.from_dict(stored).rewards == check
    assert VerifySummary.from_dict({k: v for k, v in stored.items() if k != "rewards"}).rewards is None
    found = {title: (text, rows) for title, text, rows in sections({"metrics": {"verify": stored}}, "demo")}
    text, rows = found["Rewards"]
    assert text == ["The reward functions on greedy answers (at most 64 tokens) to 6 eval prompts: mean reward "
                    "served 1.500, merged 1.500, base 0.250."]
    assert rows == [["reward function", "served", "merged", "base", "served answers scored"],
                    ["format_reward", "1.000", "1.000", "0.250", "6"], ["exact_answer", "0.500", "0.500", "–", "6"]]


def test_the_training_section_says_how_the_batch_checkpointing_and_packing_were_settled():
    metrics = TrainMetrics(engine="hf", device="cpu", steps=3, final_loss=0.2, seconds=4.0, per_device_batch=2,
                           gradient_accumulation=4, gradient_checkpointing="off", packing="padding-free",
                           attention="sdpa", plan="gradient checkpointing off (auto), batch 2 x 4: about 3 MiB of "
                                               "18.0 GiB free RAM for 2 rows of up to 60 tokens")
    stored = json.loads(json.dumps(metrics.to_dict()))
    text = dict((title, text) for title, text, _ in sections({"metrics": {"train": stored}}, "demo"))["Training"]
    assert text[1].startswith("Batch 2 x 4 accumulation per process, gradient checkpointing off, padding-free batches, "
                              "sdpa attention (gradient checkpointing off (auto)")
    result = TrainResult.from_dict(stored)
    assert (result.gradient_checkpointing, result.packing, result.attention) == ("off", "padding-free", "sdpa")
