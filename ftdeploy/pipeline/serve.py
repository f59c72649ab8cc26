"""The stages that serve the model: the Modelfile, then registration with the Ollama server (the served quant under
the run's name, every other exported quant under its own tag, or the base plus the adapter)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..errors import StageMissingError
from ..results import ExportResult, ModelfileResult, RegisterResult, TagResult
from .artifacts import base_name, load_spec, other_quants, served_gguf, served_quant, trained_lengths
from .context import Context, previous

log = logging.getLogger(__name__)


def served_context(ctx: Context) -> tuple[int, str]:
    """num_ctx for the served model, from the context it was trained for (stages.modelfile.trained_num_ctx), and a
    sentence saying how it was found; modelfile.parameters.num_ctx, when set, wins."""
    from ..stages.modelfile import CONTEXT_MULTIPLE, OLLAMA_MIN_NUM_CTX, base_context_length, trained_num_ctx

    longest, max_seq_length = trained_lengths(ctx)
    base_max = base_context_length(served_gguf(ctx), ctx.run.merged_dir)
    num_ctx = trained_num_ctx(longest, max_seq_length, base_max)
    note = (f"num_ctx {num_ctx}: the trained context (longest trained sequence {longest} tokens, data.max_seq_length "
            f"{max_seq_length}, rounded up to a multiple of {CONTEXT_MULTIPLE}, at least Ollama's default "
            f"{OLLAMA_MIN_NUM_CTX}"
            + (f", at most the base's {base_max}" if base_max else "") + ")")
    user = ctx.cfg.modelfile.parameters.get("num_ctx")
    if user is not None:
        if base_max and user > base_max:
            log.warning("modelfile.parameters.num_ctx %d is above the base model's context length %d; Ollama will "
                        "serve %d", user, base_max, base_max)
        if user < longest:
            log.warning("modelfile.parameters.num_ctx %d is below the longest trained sequence (%d tokens): Ollama "
                        "cuts a chat that long to fit %d tokens", user, longest, user)
        return int(user), f"num_ctx {user}: modelfile.parameters.num_ctx (the trained context is {num_ctx})"
    return num_ctx, note


def stage_modelfile(ctx: Context) -> ModelfileResult:
    from ..chat_template import mapping_for_template, read_chat_template
    from ..stages.modelfile import build_spec, sampling_defaults, write_modelfile

    mapping = mapping_for_template(read_chat_template(ctx.run.merged_dir), f"{ctx.run.merged_dir} chat template")
    num_ctx, context_note = served_context(ctx)
    log.info("%s", context_note)
    spec = build_spec(mapping, served_gguf(ctx), ctx.cfg.modelfile, ctx.cfg.data.system_prompt,
                      sampling_defaults(ctx.run.merged_dir), num_ctx=num_ctx)
    if ctx.cfg.export.deploy == "adapter":
        exported = previous(ctx, "export", ExportResult)
        spec = dataclasses.replace(spec, base_name=exported.base_name or base_name(ctx.cfg, served_quant(ctx)),
                                   adapter=str(ctx.run.adapter_dir))
    write_modelfile(spec, ctx.run.modelfile_path)
    return ModelfileResult(path=str(ctx.run.modelfile_path), chat_format=spec.chat_format, stops=spec.stops,
                           system=spec.system, parameters=spec.parameters, context=context_note)


def stage_register(ctx: Context) -> RegisterResult:
    from ..stages.register import register, register_adapter

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
    ctx.run.update(versions={"ollama_server": result.server_version})
    return result
