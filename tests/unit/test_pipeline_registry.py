"""The stage registry: one declaration per stage, from which fingerprints and the plan follow."""

from ftdeploy.config import load_config
from ftdeploy.pipeline import REGISTRY, Context, fingerprint, plan_stages
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
