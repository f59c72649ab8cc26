"""The stages, declared once, and the runner. A stage's fingerprint (and so whether a finished run of it is reused),
the CLI's stage list, `--from`/`--force` and the manifest all come from its declaration here. The runner owns the
bookkeeping: it checks the stage's upstream, opens its record in the manifest, runs the adapter and records the
typed result the adapter returns; an adapter only maps a Context to its library call."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..results import RESULT_TYPES, Result
from ..runs import STAGES, Run
from .artifacts import data_files, export_files, reward_files
from .build import (
    check_data,
    check_merge,
    check_train,
    note_unlogged_training,
    stage_data,
    stage_export,
    stage_merge,
    stage_train,
)
from .context import Context
from .preflight import check_inputs, preflight
from .serve import stage_modelfile, stage_register
from .verify import stage_verify
from .vision import adapter_for


@dataclass(frozen=True)
class Stage:
    """A stage: its adapter, what its output depends on, and what a reused run of it must still have."""

    name: str
    run: Callable[[Context], Result]  # the adapter, run inside the stage's record
    # config keys its output depends on: a section ("lora") or a key ("verify.min_fidelity")
    reads: tuple[str, ...] = ()
    volatile: tuple[str, ...] = ()  # keys it reads that do not change its output (logging, where to connect)
    # keys added after runs were made: left out while at their default, so a run made before them is not redone
    added: tuple[str, ...] = ()
    outputs: Callable[[Run], list[Path]] | None = None  # what a reused run must still have; None: it always runs
    inputs: Callable[[Config], Any] | None = None  # outside the config: digests of the data files
    # Checks before the record opens, so a missing input fails with the run as it was. A result returned here is
    # the stage's, unrecorded (a worker node's share of training).
    before: Callable[[Context], Result | None] | None = None

    def config_values(self, cfg: Config) -> dict[str, Any]:
        values = {}
        for key in self.reads:
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            section = _section_dict(value)
            if section is not None:
                defaults = {k: f.get_default(call_default_factory=True) for k, f in type(value).model_fields.items()}
                value = {k: v for k, v in section.items() if f"{key}.{k}" not in self.volatile
                         and not (f"{key}.{k}" in self.added and v == defaults[k])}
            values[key] = value
        return values

    def fresh(self, ctx: Context) -> bool:
        """Finished with the same fingerprint, and its outputs are still there."""
        if self.outputs is None:
            return False
        record = ctx.run.stage_record(self.name)
        files = self.outputs(ctx.run)
        return (record.get("status") == "done" and record.get("fingerprint") == fingerprint(ctx, self.name)
                and bool(files) and all(p.exists() for p in files))


def _section_dict(value: Any) -> dict[str, Any] | None:
    """A config section's keys and values; None for a single value."""
    from pydantic import BaseModel

    return value.model_dump() if isinstance(value, BaseModel) else None


# The stages in order. register and verify are cheap and their result lives on the server: they always run,
# so a lost model is registered again.
REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("data", stage_data, reads=("data", "base_model", "base_revision", "trust_remote_code", "train.seed",
                                     "train.method", "from_run"),
          added=("data.sources", "data.oversample", "data.revision"),
          inputs=data_files, outputs=lambda run: [run.data_dir / "train.jsonl"], before=check_data),
    Stage("train", stage_train, reads=("lora", "train", "preference", "grpo"),
          volatile=("train.logging_steps", "train.save_steps", "train.node_rank", "train.master_addr",
                    "train.master_port", "train.report_to", "name"), added=("lora.finetune_vision",),
          inputs=reward_files, outputs=lambda run: [run.adapter_dir / "adapter_config.json"], before=check_train),
    Stage("merge", stage_merge, outputs=lambda run: [run.merged_dir / "config.json"], before=check_merge),
    # The quant gate picks the served quant here, so its threshold is part of what export decides.
    Stage("export", stage_export, reads=("export", "name", "verify.min_fidelity"), outputs=export_files),
    # num_ctx: the trained context, from stats.json (GRPO's answers too; the config's max_seq_length for old data)
    Stage("modelfile", stage_modelfile, reads=("modelfile", "data.system_prompt", "data.max_seq_length",
                                               "grpo.max_completion_length"),
          outputs=lambda run: [run.modelfile_path]),
    Stage("register", stage_register, reads=("name", "verify"), volatile=("ollama", "runs_dir")),
    Stage("verify", stage_verify, reads=("name", "verify", "grpo.rewards", "grpo.max_completion_length"),
          volatile=("ollama", "runs_dir"), inputs=reward_files),
)}
assert tuple(REGISTRY) == STAGES, "runs.STAGES (the light list the CLI reads) must follow the registry"


def fingerprint(ctx: Context, stage: str) -> str:
    """What a stage's output depends on: the config keys it declares, its outside inputs, and the stage before it.
    Kept in ctx.fingerprints, where the stage's adapter finds it."""
    if stage not in ctx.fingerprints:
        declared = REGISTRY[stage]
        parts: dict[str, Any] = {"stage": stage, "config": declared.config_values(ctx.cfg)}
        if declared.inputs is not None and (inputs := declared.inputs(ctx.cfg)) is not None:
            parts["inputs"] = inputs  # None: nothing outside the config (a fingerprint made before it stays)
        index = STAGES.index(stage)
        if index:
            parts["upstream"] = fingerprint(ctx, STAGES[index - 1])
        canonical = json.dumps(parts, sort_keys=True, default=str).encode()
        ctx.fingerprints[stage] = hashlib.sha256(canonical).hexdigest()[:16]
    return ctx.fingerprints[stage]


def plan_stages(ctx: Context, from_stage: str | None = None, force: tuple[str, ...] = ()) -> list[tuple[str, bool]]:
    """(stage, run?) in order: a finished stage whose fingerprint is unchanged and whose output exists is skipped;
    `from_stage` reruns it and everything after; `force` reruns the named stages."""
    for name in (from_stage, *force):
        if name is not None and name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    start = STAGES.index(from_stage) if from_stage else len(STAGES)
    plan = []
    for i, name in enumerate(STAGES):
        plan.append((name, i >= start or name in force or not REGISTRY[name].fresh(ctx)))
    return plan


def run_stage(ctx: Context, name: str) -> Result:
    """Run one stage on the run: never on what an unfinished or outdated stage before it left (Run.check_upstream);
    its checks first, then the adapter inside the stage's record, which keeps the typed result as its outputs."""
    ctx.run.check_upstream(name)
    stage = REGISTRY[name]
    if stage.before is not None and (early := stage.before(ctx)) is not None:
        return early
    with ctx.run.stage(name, fingerprint(ctx, name)) as out:
        result = adapter_for(ctx, name, stage.run)(ctx)  # a vision run's own adapter where it has one
        out.update(result.to_dict())
    return result


def train_and_serve(ctx: Context, on_stage: Callable[[str], None] | None = None, from_stage: str | None = None,
                    force: tuple[str, ...] = ()) -> dict[str, Result]:
    plan = plan_stages(ctx, from_stage, force)
    if ctx.cfg.train.node_rank > 0:  # a worker host trains its share and stops: it never needs Ollama
        plan = [(name, run) for name, run in plan if STAGES.index(name) <= STAGES.index("train")]
    if ("data", True) in plan:  # a mistyped data path: before any import or tokenizer, in no time
        check_inputs(ctx.cfg, base=False)
    if ("train", True) in plan:
        from ..stages.train import import_engine_first

        import_engine_first(ctx.cfg)  # Unsloth before the data stage's tokenizer brings in transformers
    preflight(ctx, [name for name, run in plan if run])
    if ("train", False) in plan:
        note_unlogged_training(ctx)
    results: dict[str, Result] = {}
    for name, run in plan:
        if not run:
            if on_stage:
                on_stage(f"{name} (unchanged, skipped)")
            results[name] = RESULT_TYPES[name].from_dict(ctx.run.stage_record(name).get("outputs", {}))
            continue
        if on_stage:
            on_stage(name)
        results[name] = run_stage(ctx, name)
    return results
