"""The stages of a vision run (a base with a vision tower: ftdeploy/vision.py): the same stages as a text run, with
vision adapters where the work differs. The runner takes them in place of the text ones (`adapter_for`) once the data
stage has found a vision base (stats.json says so, as the data stage wrote it):

  data      image chats read (data/images.py), measured with the base's processor (data/image_writer.py)
  train     the text stage's adapter; its fit hands vision data to stages/train_vision.py
  merge     the adapter merged into the base vision model, saved with its processor
  export    no GGUF: the serving copy Ollama's own converter reads (vision.serving_copy); the quant is Ollama's
  modelfile TEMPLATE and stops from the training chat template, FROM the serving copy
  register  the serving copy uploaded, converted and quantized by Ollama; /api/show must list `vision`
  verify    the eval (or sampled training) image chats through /api/chat and through the merged model's processor
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..results import (
    Answer,
    DataResult,
    ExportResult,
    MergeResult,
    ModelfileResult,
    ModelScore,
    PromptAgreement,
    RegisterResult,
    Result,
    TemplateParity,
    VerifySummary,
)
from ..runs import Run
from .context import Context, previous

log = logging.getLogger(__name__)

AUTO_QUANT = "q4_k_m"  # export.quant auto: Ollama's own choice for its library models (there is no quant gate here)


def serving_dir(run: Run) -> Path:
    return run.path / "ollama"


def is_vision_run(ctx: Context, stage: str) -> bool:
    """The data stage decides from the base model (a vision_config in its config.json); the stages after it from
    what the data stage wrote."""
    from ..data.image_writer import is_vision_data
    from ..vision import is_vision_config, read_config

    if stage == "data":
        return is_vision_config(read_config(Path(ctx.base())))
    return is_vision_data(ctx.run.data_dir)


def adapter_for(ctx: Context, stage: str, default: Callable[[Context], Result]) -> Callable[[Context], Result]:
    """The stage's vision adapter on a vision run, else `default`."""
    vision = VISION_ADAPTERS.get(stage)
    return vision if vision is not None and is_vision_run(ctx, stage) else default


def check_vision_base(ctx: Context, stages: list[str]) -> None:
    """Preflight: a vision base of an architecture ftdeploy does not carry fails here, naming those it does; so do
    settings a vision run cannot take (a quant Ollama cannot make, several processes, a method other than sft)."""
    from ..errors import ConfigError
    from ..vision import check_quants, converter_config, family_of, is_vision_config, read_config

    base = ctx.base_if_local()
    if base is None or not base.is_dir() or not is_vision_config(config := read_config(base)):
        return
    converter_config(config, family_of(config, ctx.cfg.given_as("base_model")))  # what Ollama cannot serve, now
    if "export" in stages and ctx.cfg.export.quant != ["auto"]:
        check_quants(ctx.cfg.export.quant)
    if "train" in stages and ctx.cfg.train.method != "sft":
        raise ConfigError(f"train.method {ctx.cfg.train.method}: vision models train with sft only (yet)")
    if ctx.cfg.export.deploy == "adapter":
        raise ConfigError("export.deploy adapter: Ollama takes LoRA adapters for llama and gemma2 only; a vision "
                          "model is served whole (export.deploy full)")


def stage_data_vision(ctx: Context) -> DataResult:
    from transformers import AutoProcessor

    from .. import base_model
    from ..data.image_writer import prepare_vision_data
    from ..tokenizer import load_tokenizer
    from ..vision import family_of, read_config

    base = Path(ctx.base())
    family = family_of(read_config(base), ctx.cfg.given_as("base_model"))
    tokenizer, mapping = load_tokenizer(base, ctx.cfg.trust_remote_code, ctx.cfg.data.chat_template)
    processor = AutoProcessor.from_pretrained(str(base), trust_remote_code=ctx.cfg.trust_remote_code)
    processor.chat_template = tokenizer.chat_template  # data.chat_template, where given, trains and serves
    stats = prepare_vision_data(ctx.cfg.data, processor, mapping, ctx.run.data_dir, ctx.cfg.train.seed,
                                ctx.cfg.train.method)
    log.info("vision data (%s): %d chats, %d images, %d eval chats; longest %d tokens", family.name, stats.rows,
             stats.images, stats.eval_rows, stats.max_length)
    ctx.run.update(base_model={**base_model.describe(ctx.cfg.base_model, base, ctx.cfg.base_revision),
                               "resolved": str(base), "trust_remote_code": ctx.cfg.trust_remote_code},
                   vision=family.name)
    return DataResult(rows=stats.rows, eval_rows=stats.eval_rows, truncated=0, trained_tokens=stats.trained_tokens,
                      chat_format=mapping.format.name, pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token)


def stage_merge_vision(ctx: Context) -> MergeResult:
    from ..stages.train_vision import merge_vision

    merged = merge_vision(ctx.base(), ctx.run.adapter_dir, ctx.run.merged_dir, ctx.cfg.trust_remote_code)
    ctx.run.record_artifact(merged)
    return MergeResult(merged_dir=str(merged))


def stage_export_vision(ctx: Context) -> ExportResult:
    from ..vision import check_quants, serving_copy

    quants = [AUTO_QUANT] if ctx.cfg.export.quant == ["auto"] else list(ctx.cfg.export.quant)
    check_quants(quants)
    if len(quants) > 1:
        log.warning("vision models are served at one quant: %s (export.quant also lists %s)", quants[0],
                    ", ".join(quants[1:]))
    files = serving_copy(ctx.run.merged_dir, serving_dir(ctx.run))
    for path in files:
        ctx.run.record_artifact(path)
    note = (f"Served: {quants[0]}, made by Ollama from the merged 16-bit safetensors (it keeps the vision tower and "
            "projector at 16 bits); no quant gate for vision models: verify compares the served model with the "
            "merged one")
    return ExportResult(gguf={quants[0]: str(serving_dir(ctx.run))}, served=quants[0], quant_note=note)


def stage_modelfile_vision(ctx: Context) -> ModelfileResult:
    from ..chat_template import mapping_for_template, read_chat_template
    from ..stages.modelfile import build_spec, sampling_defaults, trained_num_ctx, write_modelfile
    from ..vision import read_config
    from .artifacts import trained_lengths

    merged = ctx.run.merged_dir
    mapping = mapping_for_template(read_chat_template(merged), f"{merged} chat template")
    config = read_config(merged)
    base_max = (config.get("text_config") or {}).get("max_position_embeddings") or config.get(
        "max_position_embeddings")
    longest, max_seq_length = trained_lengths(ctx)
    num_ctx = int(ctx.cfg.modelfile.parameters.get("num_ctx") or trained_num_ctx(longest, max_seq_length, base_max))
    spec = build_spec(mapping, serving_dir(ctx.run), ctx.cfg.modelfile, ctx.cfg.data.system_prompt,
                      sampling_defaults(merged), num_ctx=num_ctx)
    write_modelfile(spec, ctx.run.modelfile_path)
    return ModelfileResult(path=str(ctx.run.modelfile_path), chat_format=spec.chat_format, stops=spec.stops,
                           system=spec.system, parameters=spec.parameters,
                           context=f"num_ctx {num_ctx}: the trained context (image tokens included)")


def stage_register_vision(ctx: Context) -> RegisterResult:
    from ..stages.register_vision import register_vision
    from ..vision import family_of, read_config
    from .artifacts import load_spec

    exported = previous(ctx, "export", ExportResult)
    family = family_of(read_config(ctx.run.merged_dir), str(ctx.run.merged_dir))
    files = sorted(serving_dir(ctx.run).iterdir(), key=lambda p: (p.suffix != ".safetensors", p.name))
    reg = register_vision(ctx.client(), ctx.cfg.name, load_spec(ctx), files, exported.served,
                          architecture=family.ollama_architecture)
    ctx.run.update(versions={"ollama_server": reg.server_version})
    return RegisterResult.from_dict(reg.as_dict())


def stage_verify_vision(ctx: Context) -> VerifySummary:
    """The served model against the merged one on image chats (eval rows, else a sample of the training chats):
    greedy answers compared token for token in the merged model's tokens, gated by verify.min_agreement; `expect`
    gated by verify.min_score; the prompt Ollama builds from the first chat (image included) as long as the
    training processor's."""
    from ..data.image_writer import load_images, load_vision_rows
    from ..fidelity import agreement_scores, score
    from ..stages.verify_vision import MergedVision, served_answer
    from .artifacts import load_spec
    from .verify import _require_registered, _verdict

    cfg, name, client = ctx.cfg, ctx.cfg.name, ctx.client()
    rows = load_vision_rows(ctx.run.data_dir, "eval.jsonl")
    source: Literal["eval", "train"] = "eval" if rows or cfg.data.eval else "train"
    limit_rows = cfg.verify.limit or None
    if source == "train":  # no eval rows: a sample of the training chats, their answers no reference
        rows = [{k: v for k, v in r.items() if k != "expect"} for r in load_vision_rows(
            ctx.run.data_dir, "train_sample.jsonl")]
        limit_rows = cfg.verify.limit or cfg.verify.train_prompts
    rows = [r for r in rows if r["messages"] and r["messages"][-1]["role"] == "assistant"][:limit_rows]
    from ..vision import family_of, read_config

    spec = load_spec(ctx)
    _require_registered(client, name)
    family = family_of(read_config(ctx.run.merged_dir), str(ctx.run.merged_dir))
    for note in filter(None, (family.served_differs, family.caveat)):
        log.info("verify: %s", note)  # what Ollama computes differently for this family, measured
    merged = MergedVision(ctx.run.merged_dir, tuple(spec.stops))
    tok = merged.processor.tokenizer
    references = [_text(r["messages"][-1]) for r in rows]
    limit = cfg.verify.max_tokens or max([len(tok(ref)["input_ids"]) for ref in references] + [16]) * 3 // 2 + 8
    answers, agreements, served_replies, merged_replies, asked = [], [], [], [], []
    parity = TemplateParity()
    for row, reference in zip(rows, references, strict=True):
        prompt, images = row["messages"][:-1], load_images(ctx.run.data_dir, row["images"])
        shown = images[:_images_in(prompt)]
        asked.append((prompt, shown))
        served = served_answer(client, name, prompt, shown, limit)
        want = merged.answer(prompt, shown, limit, spec.system)
        agreements.append(_agreement(want, served, tok))
        served_replies.append(served.text)
        merged_replies.append(want.text)
        expect = row.get("expect")
        ok = _matches(served.text, expect, row.get("match", "contains")) if expect else served.text.strip() != ""
        answers.append(Answer(prompt=_text(prompt[-1]), expected=expect or reference, answer=served.text, ok=ok,
                              gated=expect is not None, done_reason="stop" if served.stopped else "length"))
        if not parity.checked:
            parity = _parity(client, name, merged, prompt, shown, spec.system)
    expected = [a.expected if source == "eval" else "" for a in answers]
    modes = [row.get("match", "contains") for row in rows]
    served_score = ModelScore(role="served", label=f"served ({ctx.cfg.name})", quant=previous(
        ctx, "export", ExportResult).served, tag=name, replies=served_replies, gated=True,
        **score(served_replies, expected, merged_replies, modes), **agreement_scores(agreements))
    served_score.passed = served_score.token_agreement is None or served_score.token_agreement >= \
        cfg.verify.min_agreement
    gated = [a for a in answers if a.gated]
    summary = VerifySummary(
        hits=sum(a.ok for a in answers), total=len(answers), score=round(sum(a.ok for a in answers) / max(
            len(answers), 1), 4), min_score=cfg.verify.min_score, answers=answers, template_parity=parity,
        models=[served_score, ModelScore(role="merged", label="merged", replies=merged_replies,
                                         **score(merged_replies, expected, None, modes))],
        prompts=[a.prompt for a in answers], references=references, expect_rows=len(gated),
        expect_hits=sum(a.ok for a in gated), max_tokens=limit, min_agreement=cfg.verify.min_agreement,
        prompt_source=source, system=spec.system)
    if cfg.verify.compare:
        _compare_base(ctx, merged, asked, limit, spec.system, (expected, modes, merged_replies), summary)
    return _verdict(ctx, summary, {})


def _compare_base(ctx: Context, merged: Any, asked: list[tuple[list[dict[str, Any]], list[bytes]]], limit: int,
                  system: str | None, scoring: tuple[list[str], list[str], list[str]], summary: VerifySummary) -> None:
    """verify.compare, as for text models: the base's answers to the same image chats (`asked`: each prompt with
    its images), scored as the merged model's are (`scoring`: the expected answers, their match modes, the merged
    model's replies), and forgetting on the general prompts (text only: a vision fine-tune must still answer what
    its base answered). One model in memory at a time: the merged model is freed before the base loads."""
    from ..fidelity import forgetting, general_prompts, score
    from ..results import Forgetting, ForgettingItem
    from ..stages.verify import GENERAL_TOKENS
    from ..stages.verify_vision import MergedVision

    general = general_prompts()
    chats, expects = [g["messages"] for g in general], [g["expect"] for g in general]
    tuned = [merged.answer(chat, [], GENERAL_TOKENS).text for chat in chats]
    stops, merged.model = tuple(merged.stops_text), None
    base = MergedVision(Path(ctx.base()), stops)
    replies = [base.answer(prompt, images, limit, system).text for prompt, images in asked]
    base_general = [base.answer(chat, [], GENERAL_TOKENS).text for chat in chats]
    del base
    expected, modes, merged_replies = scoring
    summary.models.append(ModelScore(role="base", label="base", replies=replies,
                                     **score(replies, expected, merged_replies, modes)))
    summary.forgetting = Forgetting(**forgetting(base_general, tuned, expects), items=[
        ForgettingItem(prompt=c[-1]["content"], expect=e, base=b, tuned=t)
        for c, e, b, t in zip(chats, expects, base_general, tuned, strict=True)])


def _images_in(messages: list[dict[str, Any]]) -> int:
    from ..data.image_labels import count_images

    return count_images(messages)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join("[img]" if p.get("type") == "image" else p.get("text", "") for p in content)
    return str(content or "")


def _matches(answer: str, expected: str, mode: str) -> bool:
    from ..stages.verify import matches

    return matches(answer, expected, mode)


def _agreement(merged: Any, served: Any, tok: Any) -> PromptAgreement:
    """How far the served answer follows the merged one (fidelity.prompt_agreement). Ollama names each token it
    generated (its log-probabilities' tokens), so the two are compared as the tokens each model chose; only a server
    that names none has its answer tokenized again, which can split a text differently from how it was generated (a
    random model's answer of rare tokens, measured: 20% of steps agreed that way, every step token by token)."""
    from ..fidelity import prompt_agreement

    if served.tokens or not served.text:
        return prompt_agreement(served.tokens, served.stopped, merged.tokens, merged.stopped)
    again = [int(i) for i in tok(served.text, add_special_tokens=False)["input_ids"]]
    return prompt_agreement(again, served.stopped, list(merged.ids), merged.stopped)


def _parity(client: Any, name: str, merged: Any, prompt: list[dict[str, Any]], images: list[bytes],
            system: str | None) -> TemplateParity:
    """The prompt Ollama built for an image chat has as many tokens as the training processor's (Ollama reports
    prompt_eval_count; its own image tokens included)."""
    from ..stages.verify_vision import prompt_tokens

    served = prompt_tokens(client, name, prompt, images)
    trained = len(merged.inputs(prompt, images, system)["input_ids"][0])
    return TemplateParity(checked=1, passed=served == trained, mismatches=[] if served == trained else [
        _mismatch(prompt, served, trained)])


def _mismatch(prompt: list[dict[str, Any]], served: int, trained: int) -> Any:
    from ..results import ParityMismatch

    return ParityMismatch(chat=prompt, raw=f"{trained} prompt tokens in training",
                          chat_answer=f"{served} prompt tokens in Ollama")


VISION_ADAPTERS: dict[str, Callable[[Context], Any]] = {
    "data": stage_data_vision, "merge": stage_merge_vision, "export": stage_export_vision,
    "modelfile": stage_modelfile_vision, "register": stage_register_vision, "verify": stage_verify_vision,
}
