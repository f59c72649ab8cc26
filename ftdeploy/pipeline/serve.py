"""The stages that serve the model: the Modelfile, then registration with the Ollama server (the served quant under
the run's name, every other exported quant under its own tag, or the base plus the adapter)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import StageMissingError
from ..results import ExportResult, ModelfileResult, RegisterResult, TagResult
from .artifacts import base_name, load_spec, other_quants, served_gguf, served_quant
from .context import Context, previous


def stage_modelfile(ctx: Context) -> ModelfileResult:
    from ..chat_template import mapping_for_template, read_chat_template
    from ..stages.modelfile import build_spec, sampling_defaults, write_modelfile

    mapping = mapping_for_template(read_chat_template(ctx.run.merged_dir), f"{ctx.run.merged_dir} chat template")
    spec = build_spec(mapping, served_gguf(ctx), ctx.cfg.modelfile, ctx.cfg.data.system_prompt,
                      sampling_defaults(ctx.run.merged_dir))
    if ctx.cfg.export.deploy == "adapter":
        exported = previous(ctx, "export", ExportResult)
        spec = dataclasses.replace(spec, base_name=exported.base_name or base_name(ctx.cfg, served_quant(ctx)),
                                   adapter=str(ctx.run.adapter_dir))
    write_modelfile(spec, ctx.run.modelfile_path)
    return ModelfileResult(path=str(ctx.run.modelfile_path), chat_format=spec.chat_format, stops=spec.stops,
                           system=spec.system, parameters=spec.parameters)


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
