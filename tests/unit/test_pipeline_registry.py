"""The stage registry: one declaration per stage, from which fingerprints and the plan follow."""

import hashlib
from pathlib import Path

import ftdeploy.rewards as rewards_module
from ftdeploy.config import load_config
from ftdeploy.pipeline import REGISTRY, Context, fingerprint, plan_stages
from ftdeploy.pipeline.artifacts import reward_files
from ftdeploy.rewards import reward_sources
from ftdeploy.runs import STAGES, Run


def _context(tmp_path, *overrides):
    cfg = load_config(None, ["base_model=smollm2-135m-instruct", "data.train=demo", *overrides])
    return Context(cfg, Run(tmp_path / cfg.name))


def test_a_stricter_quant_gate_reruns_export(tmp_path):
    """Issue 15's bug: export picks the served quant with verify.min_fidelity, but its fingerprint ignored it,
    so a rerun with a stricter gate skipped export and kept serving the old quant."""
    loose, strict = _context(tmp_path, "verify.min_fidelity=0.5"), _context(tmp_path, "verify.min_fidelity=0.95")
    assert fingerprint(loose, "merge") == fingerprint(strict, "merge")
    assert fingerprint(loose, "export") != fingerprint(strict, "export")


def test_a_finished_stage_with_the_same_fingerprint_and_outputs_is_skipped(tmp_path):
    ctx = _context(tmp_path)
    ctx.run.data_dir.mkdir(parents=True)
    (ctx.run.data_dir / "train.jsonl").write_text("{}\n")
    ctx.run.update(stages={"data": {"status": "done", "fingerprint": fingerprint(ctx, "data")}})
    plan = dict(plan_stages(ctx))
    assert plan["data"] is False and plan["train"] is True and plan["register"] is True
    assert dict(plan_stages(ctx, force=("data",)))["data"] is True
    assert dict(plan_stages(_context(tmp_path, "data.max_seq_length=64")))["data"] is True  # a read key changed
    (ctx.run.data_dir / "train.jsonl").unlink()
    assert dict(plan_stages(ctx))["data"] is True  # its output is gone


def test_the_registry_is_the_stage_list_and_each_declared_key_exists():
    assert tuple(REGISTRY) == STAGES
    cfg = load_config(None, ["base_model=smollm2-135m-instruct"])
    for stage in REGISTRY.values():
        values = stage.config_values(cfg)  # an unknown key would raise AttributeError
        assert set(values) == set(stage.reads)
    assert "logging_steps" not in REGISTRY["train"].config_values(cfg)["train"]  # volatile keys stay out


def test_a_declared_key_moves_its_stage_and_those_after_it_and_a_volatile_key_moves_none(tmp_path):
    base = _context(tmp_path)
    for stage, override in {"data": "data.max_seq_length=64", "train": "train.learning_rate=0.001",
                            "export": "verify.min_fidelity=0.5", "modelfile": "modelfile.system=Be brief."}.items():
        changed = _context(tmp_path, override)
        at = STAGES.index(stage)
        assert [fingerprint(changed, s) == fingerprint(base, s) for s in STAGES] == \
            [i < at for i in range(len(STAGES))], override
    quiet = _context(tmp_path, "train.logging_steps=7")
    assert all(fingerprint(quiet, s) == fingerprint(base, s) for s in STAGES)


def test_an_edited_reward_file_trains_and_verifies_again_and_sft_fingerprints_ignore_rewards(tmp_path):
    """GRPO's reward functions are code outside the config: their source is part of train's and verify's
    fingerprints (a file path and a module alike); for the other methods nothing is added."""
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    grpo = ("train.method=grpo", f"grpo.rewards=[{rewards}:short,ftdeploy.rewards:format_reward]")
    before = _context(tmp_path, *grpo)
    train, verify = fingerprint(before, "train"), fingerprint(before, "verify")
    rewards.write_text("def short(completions, **kw):\n    return [0.0 for _ in completions]\n")
    after = _context(tmp_path, *grpo)
    assert fingerprint(after, "data") == fingerprint(before, "data")
    assert fingerprint(after, "train") != train and fingerprint(after, "verify") != verify
    digest = hashlib.sha256(Path(rewards_module.__file__).read_bytes()).hexdigest()
    assert reward_sources(["ftdeploy.rewards:format_reward", "no_such_module_x:f"]) == [digest, None]
    assert reward_files(_context(tmp_path, f"grpo.rewards=[{rewards}:short]").cfg) is None  # sft: none read


def test_an_adapter_deploy_from_an_earlier_run_never_takes_the_base_models_name(tmp_path):
    """--from-run trains on an earlier run's merged model: an adapter deploy registers that model as its base, under
    a name of its own that changes when the earlier run is merged again (never as ftdeploy-base-<base>, which would
    replace the real base for every other tune of it)."""
    from ftdeploy.pipeline.artifacts import base_name

    plain = _context(tmp_path).cfg
    assert base_name(plain, "q4_k_m") == "ftdeploy-base-smollm2-135m-instruct:q4_k_m"
    sft = Run(tmp_path / "my-sft")
    sft.update(stages={"merge": {"status": "done", "fingerprint": "0123456789abcdef"}})
    chained = _context(tmp_path, f"runs_dir={tmp_path}", "from_run=my-sft").cfg
    assert base_name(chained, "q4_k_m") == "ftdeploy-base-my-sft-01234567:q4_k_m"
    sft.update(stages={"merge": {"status": "done", "fingerprint": "fedcba9876543210"}})
    assert base_name(chained, "q4_k_m") == "ftdeploy-base-my-sft-fedcba98:q4_k_m"
