"""The stage registry: one declaration per stage, from which fingerprints and the plan follow."""

import subprocess
import sys

from ftdeploy.config import load_config
from ftdeploy.pipeline import REGISTRY, Context, plan_stages
from ftdeploy.runs import STAGES, Run


def _context(tmp_path, *overrides):
    cfg = load_config(None, ["base_model=smollm2-135m-instruct", "data.train=demo", *overrides])
    return Context(cfg, Run(tmp_path / cfg.name))


def test_a_stricter_quant_gate_reruns_export(tmp_path):
    """Issue 15's bug: export picks the served quant with verify.min_fidelity, but its fingerprint ignored it,
    so a rerun with a stricter gate skipped export and kept serving the old quant."""
    loose, strict = _context(tmp_path, "verify.min_fidelity=0.5"), _context(tmp_path, "verify.min_fidelity=0.95")
    assert loose.fingerprint("merge") == strict.fingerprint("merge")
    assert loose.fingerprint("export") != strict.fingerprint("export")


def test_a_finished_stage_with_the_same_fingerprint_and_outputs_is_skipped(tmp_path):
    ctx = _context(tmp_path)
    ctx.run.data_dir.mkdir(parents=True)
    (ctx.run.data_dir / "train.jsonl").write_text("{}\n")
    ctx.run.update(stages={"data": {"status": "done", "fingerprint": ctx.fingerprint("data")}})
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


def test_the_registry_prints_each_stage_with_its_keys():
    code = ("from ftdeploy.pipeline import REGISTRY\n"
            "for s in REGISTRY.values(): print(s.name, *s.reads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "export export name verify.min_fidelity" in out.splitlines()
