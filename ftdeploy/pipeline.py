"""Planning: the registry of stages, their fingerprints, which of them run, and the checks before any does.
`train_and_serve` runs them all. What each stage does on a run is in stage_runs.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import base_model
from .config import Config, dump_config
from .errors import ConfigError, FtdeployError, StageMissingError
from .ollama import OllamaClient, connect
from .quants import bits_per_weight
from .results import RESULT_TYPES, Result
from .runs import MANIFEST_FILE, STAGES, Run
from .stage_runs import (
    _data_files,
    _export_files,
    check_inputs,
    stage_data,
    stage_export,
    stage_merge,
    stage_modelfile,
    stage_register,
    stage_train,
    stage_verify,
)

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: Config
    run: Run
    ollama_explicit: bool = False  # --ollama-host, ollama.host or $OLLAMA_HOST was given
    _client: OllamaClient | None = None
    _lock: Any = None
    _fingerprints: dict[str, str] = field(default_factory=dict)
    _made_run: Path | None = None  # the directory this command made for the run (the run's, or a new --runs-dir)

    @classmethod
    def create(cls, cfg: Config, ollama_explicit: bool, existing: bool = False) -> Context:
        """Lock the run directory (made if needed). The config is recorded in it (config.yaml) when a stage
        starts, so a command that fails before that leaves an existing run's config as it was.

        existing: the command works on a run made earlier (merge, export, …); when there is none, say
        so before anything is written, so that a mistyped --name leaves no directory behind."""
        run = Run(cfg.run_dir, config_text=dump_config(cfg))
        if existing and not run.manifest_path.is_file():
            raise StageMissingError(
                f"no run named {cfg.name!r} in {cfg.run_dir.parent} ({run.manifest_path} does not exist); start one "
                "with `ftdeploy train-and-serve` (or `ftdeploy data`), or give the --name (and --runs-dir) of an "
                "existing run")
        top = run.path  # the topmost directory this command will make: the run's, or a new --runs-dir
        while not top.parent.exists():
            top = top.parent
        made = None if top.exists() else top
        if existing:
            run.load_manifest()  # a damaged manifest is named now, before the command does anything
        lock = run.acquire_lock()
        explicit = ollama_explicit or bool(cfg.ollama.host) or bool(os.environ.get("OLLAMA_HOST"))
        return cls(cfg, run, explicit, _lock=lock, _made_run=made)

    def close(self) -> None:
        """Release the run. A run directory this command made that holds no stage record (the command failed in
        preflight, or its stage failed before writing anything: see Run.stage) is removed: a failed no-op leaves
        nothing behind."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._made_run is not None and not (self.run.path / MANIFEST_FILE).exists():
            shutil.rmtree(self.run.path, ignore_errors=True)
            for parent in (self.run.path.parent, *self.run.path.parent.parents):  # a new --runs-dir, if left empty
                if parent != self._made_run and self._made_run not in parent.parents:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def fingerprint(self, stage: str) -> str:
        """What a stage's output depends on: the config keys it declares, its outside inputs, and the stage
        before it."""
        if stage not in self._fingerprints:
            declared = REGISTRY[stage]
            parts: dict[str, Any] = {"stage": stage, "config": declared.config_values(self.cfg)}
            if declared.inputs is not None:
                parts["inputs"] = declared.inputs(self.cfg)
            index = STAGES.index(stage)
            if index:
                parts["upstream"] = self.fingerprint(STAGES[index - 1])
            canonical = json.dumps(parts, sort_keys=True, default=str).encode()
            self._fingerprints[stage] = hashlib.sha256(canonical).hexdigest()[:16]
        return self._fingerprints[stage]

    def base(self) -> Path | str:
        return base_model.resolve_base_model(self.cfg.base_model, self.cfg.trust_remote_code, self.cfg.base_revision,
                                             self.cfg.given_as("base_model"))

    def base_if_local(self) -> Path | None:
        """The base checkpoint directory when it is already on disk (never downloads or converts)."""
        resolved = self.run.load_manifest().get("base_model", {}).get("resolved")
        if resolved and Path(resolved).is_dir():
            return Path(resolved)
        path = Path(self.cfg.base_model).expanduser()
        return path if path.is_dir() else None

    def client(self) -> OllamaClient:
        if self._client is None:
            self._client = connect(self.cfg.ollama, self.ollama_explicit)
        return self._client


@dataclass(frozen=True)
class Stage:
    """A stage, declared once. Its fingerprint (and so whether a finished run of it is reused), the CLI's
    stage list, `--from`/`--force` and the manifest all come from this declaration."""

    name: str
    run: Callable[[Context], Result]
    # config keys its output depends on: a section ("lora") or a key ("verify.min_fidelity")
    reads: tuple[str, ...] = ()
    volatile: tuple[str, ...] = ()  # keys it reads that do not change its output (logging, where to connect)
    outputs: Callable[[Run], list[Path]] | None = None  # what a reused run must still have; None: it always runs
    inputs: Callable[[Config], Any] | None = None  # outside the config: digests of the data files

    def config_values(self, cfg: Config) -> dict[str, Any]:
        values = {}
        for key in self.reads:
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = {k: v for k, v in dataclasses.asdict(value).items() if f"{key}.{k}" not in self.volatile}
            values[key] = value
        return values

    def fresh(self, ctx: Context) -> bool:
        """Finished with the same fingerprint, and its outputs are still there."""
        if self.outputs is None:
            return False
        record = ctx.run.stage_record(self.name)
        files = self.outputs(ctx.run)
        return (record.get("status") == "done" and record.get("fingerprint") == ctx.fingerprint(self.name)
                and bool(files) and all(p.exists() for p in files))


# The stages in order. register and verify are cheap and their result lives on the server: they always run,
# so a lost model is registered again.
REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("data", stage_data, reads=("data", "base_model", "base_revision", "trust_remote_code", "train.seed"),
          inputs=_data_files, outputs=lambda run: [run.data_dir / "train.jsonl"]),
    Stage("train", stage_train, reads=("lora", "train"),
          volatile=("train.logging_steps", "train.save_steps", "train.node_rank", "train.master_addr",
                    "train.master_port"),
          outputs=lambda run: [run.adapter_dir / "adapter_config.json"]),
    Stage("merge", stage_merge, outputs=lambda run: [run.merged_dir / "config.json"]),
    # The quant gate picks the served quant here, so its threshold is part of what export decides.
    Stage("export", stage_export, reads=("export", "name", "verify.min_fidelity"), outputs=_export_files),
    Stage("modelfile", stage_modelfile, reads=("modelfile", "data.system_prompt"),
          outputs=lambda run: [run.modelfile_path]),
    Stage("register", stage_register, reads=("name", "verify"), volatile=("ollama", "runs_dir")),
    Stage("verify", stage_verify, reads=("name", "verify"), volatile=("ollama", "runs_dir")),
)}
assert tuple(REGISTRY) == STAGES, "runs.STAGES (the light list the CLI reads) must follow the registry"


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


def preflight(ctx: Context, stages: list[str]) -> None:
    """Check what would fail hours in before spending them: engine vs hardware, disk, the Ollama server."""
    from .stages.train import select_engine
    from .strategy import check_strategy

    if "train" in stages:
        check_strategy(ctx.cfg, select_engine(ctx.cfg.train.engine))
    if "data" in stages:
        check_chat_template(ctx)
    needed = estimate_disk_bytes(ctx, stages)
    free = free_bytes(ctx.run.path)
    if needed > free:
        raise FtdeployError(
            f"not enough disk for {', '.join(s for s in stages if s in ('merge', 'export'))} in {ctx.run.path}: "
            f"about {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free. Free space, or point "
            "--runs-dir at a larger disk."
        )
    if "data" in stages:  # a folder holding only config.json, say: now, not after the engine and tokenizer load
        base_model.check_base_model(ctx.cfg.base_model, ctx.cfg.given_as("base_model"))
    if "register" in stages or "verify" in stages:
        ctx.client()  # a wrong address fails in seconds, not after training


def check_chat_template(ctx: Context) -> None:
    """A chat template no Ollama template can serve fails here, before the data stage, read from the base's
    tokenizer files (or its GGUF's metadata) with jinja2: no torch, no download. A Hub id not downloaded yet
    is checked by the data stage, which loads its tokenizer."""
    from .stages.modelfile import mapping_for_template
    from .tokenizer import read_chat_template_file

    override = ctx.cfg.data.chat_template
    if override:  # data.chat_template replaces the base's: check it, with the base's BOS and EOS where known
        found = None
        with contextlib.suppress(FtdeployError):  # a base with no template of its own is what the option is for
            found = _base_chat_template(ctx)
        bos, eos = (found[1], found[2]) if found is not None else ("", "")
        where = f"{override} (data.chat_template)"
        mapping_for_template(read_chat_template_file(override), bos, eos, where)
    elif (found := _base_chat_template(ctx)) is not None:
        template, bos, eos, where = found
        mapping_for_template(template, bos, eos, f"{where} chat template")


def _base_chat_template(ctx: Context) -> tuple[str, str, str, str] | None:
    """(template, bos, eos, where it was read) for the base model, when that is on disk; None otherwise."""
    from .stages.modelfile import read_chat_template, read_gguf_chat_template

    spec = ctx.cfg.base_model
    base = ctx.base_if_local()
    if base is None and spec in base_model.EMBEDDED:
        with contextlib.suppress(FtdeployError):
            base = base_model.embedded_gguf(spec)
    if base is None and base_model.HUB_ID_RE.match(spec) and not Path(spec).expanduser().exists():
        base = _hub_snapshot(spec, ctx.cfg.base_revision)
    if base is None:
        path = Path(spec).expanduser()
        base = path if path.is_file() else None
    if base is None:
        return None
    if base.is_dir() and not (base / "tokenizer_config.json").is_file():
        ggufs = sorted(base.glob("*.gguf"))  # a directory of GGUFs: resolve_base_model takes the first
        if not ggufs:
            return None
        base = ggufs[0]
    if base.is_file():
        if not base_model.is_gguf(base):
            return None  # resolve_base_model says what is wrong with it
        return (*read_gguf_chat_template(base), str(base))
    return (*read_chat_template(base), str(base))


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of a Hub model, when its tokenizer files are already downloaded (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(repo_id, "tokenizer_config.json", revision=revision)
    return Path(cached).parent if isinstance(cached, str) else None


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def estimate_disk_bytes(ctx: Context, stages: list[str]) -> int:
    """merged (16-bit) + F16 GGUF + one file per quant, from the base model's parameter count."""
    if not {"merge", "export"} & set(stages):
        return 0
    params = _param_estimate(ctx)
    total = 0.0
    if "merge" in stages:
        total += params * 2
    if "export" in stages:
        total += params * bits_per_weight(ctx.cfg.export.outtype, 16) / 8
        total += sum(params * bits_per_weight(q) / 8 for q in ctx.cfg.export.quant if q != ctx.cfg.export.outtype)
    return int(total * 1.1)


def _param_estimate(ctx: Context) -> float:
    """Parameters of the base, from its safetensors sizes (local) or 0 when unknown (Hub id not downloaded yet)."""
    base = ctx.base_if_local()
    if base is None:
        return 0.0
    files = list(Path(base).glob("*.safetensors"))
    if not files:
        return 0.0
    config = json.loads((Path(base) / "config.json").read_text()) if (Path(base) / "config.json").is_file() else {}
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(config.get("torch_dtype") or config.get("dtype")), 2)
    return sum(f.stat().st_size for f in files) / width


def run_stage(ctx: Context, name: str) -> Result:
    """Run one stage on the run: never on what an unfinished or outdated stage before it left (Run.check_upstream)."""
    ctx.run.check_upstream(name)
    return REGISTRY[name].run(ctx)


def train_and_serve(ctx: Context, on_stage: Callable[[str], None] | None = None, from_stage: str | None = None,
                    force: tuple[str, ...] = ()) -> dict[str, Result]:
    plan = plan_stages(ctx, from_stage, force)
    if ctx.cfg.train.node_rank > 0:  # a worker host trains its share and stops: it never needs Ollama
        plan = [(name, run) for name, run in plan if STAGES.index(name) <= STAGES.index("train")]
    if ("data", True) in plan:  # a mistyped data path: before any import or tokenizer, in no time
        check_inputs(ctx.cfg, base=False)
    if ("train", True) in plan:
        from .stages.train import import_engine_first

        import_engine_first(ctx.cfg)  # Unsloth before the data stage's tokenizer brings in transformers
    preflight(ctx, [name for name, run in plan if run])
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
