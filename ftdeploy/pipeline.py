"""Stage ordering: each stage reads the run directory and its config section, writes its artifact,
and records itself in the manifest. `train_and_serve` runs them all."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import base_model
from .config import Config, dump_config
from .errors import StageMissingError
from .ollama import OllamaClient, ensure_server
from .runs import CONFIG_FILE, LOSS_PLOT, Run, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: Config
    run: Run
    ollama_explicit: bool = False  # --ollama-host, ollama.host or $OLLAMA_HOST was given
    _client: OllamaClient | None = None
    _lock: Any = None

    @classmethod
    def create(cls, cfg: Config, ollama_explicit: bool) -> "Context":
        run = Run(cfg.run_dir)
        lock = run.acquire_lock()
        atomic_write_text(run.path / CONFIG_FILE, dump_config(cfg))
        return cls(cfg, run, ollama_explicit or bool(cfg.ollama.host) or bool(os.environ.get("OLLAMA_HOST")), _lock=lock)

    def base(self) -> Path | str:
        return base_model.resolve_base_model(self.cfg.base_model, self.cfg.trust_remote_code)

    def client(self) -> OllamaClient:
        if self._client is None:
            self._client = ensure_server(self.cfg.ollama.host, self.ollama_explicit, self.cfg.ollama.start_local,
                                         self.cfg.ollama.timeout)
        return self._client


def stage_data(ctx: Context) -> dict[str, Any]:
    from .stages.data import prepare_data
    from .tokenizer import load_tokenizer

    with ctx.run.stage("data") as out:
        base = ctx.base()
        tokenizer, mapping = load_tokenizer(base, ctx.cfg.trust_remote_code)
        stats = prepare_data(ctx.cfg.data, tokenizer, mapping, ctx.run.data_dir, ctx.cfg.train.seed)
        out.update(rows=stats.rows, eval_rows=stats.eval_rows, truncated=stats.truncated,
                   trained_tokens=stats.trained_tokens, chat_format=mapping.format.name,
                   pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token)
        ctx.run.update(base_model={**base_model.describe(ctx.cfg.base_model), "resolved": str(base)})
    return out


def stage_train(ctx: Context) -> dict[str, Any]:
    from .stages.train import plot_loss, train
    from .tokenizer import load_tokenizer

    if not (ctx.run.data_dir / "train.jsonl").is_file():
        raise StageMissingError(f"{ctx.run.data_dir}: no prepared data; run `ftdeploy data` first")
    with ctx.run.stage("train") as out:
        base = ctx.base()
        tokenizer, _ = load_tokenizer(base, ctx.cfg.trust_remote_code)
        metrics = train(base, ctx.run.data_dir, ctx.run.adapter_dir, ctx.cfg, tokenizer)
        plot_loss(metrics["loss_history"], ctx.run.path / LOSS_PLOT)
        ctx.run.record_artifact(ctx.run.adapter_dir)
        out.update({k: v for k, v in metrics.items() if k != "loss_history"})
        ctx.run.update(metrics={"train": metrics})
    return out


def stage_merge(ctx: Context) -> dict[str, Any]:
    from .stages.merge import merge

    with ctx.run.stage("merge") as out:
        merged = merge(ctx.base(), ctx.run.adapter_dir, ctx.run.merged_dir, ctx.cfg.trust_remote_code)
        ctx.run.record_artifact(merged)
        out["merged_dir"] = str(merged)
    return out


def stage_export(ctx: Context) -> dict[str, Any]:
    from .stages.export import export

    with ctx.run.stage("export") as out:
        paths = export(ctx.run.merged_dir, ctx.run.gguf_dir, ctx.cfg.name, ctx.cfg.export.quant, ctx.cfg.export.outtype)
        for path in paths.values():
            ctx.run.record_artifact(path)
        out["gguf"] = {q: str(p) for q, p in paths.items()}
        out["served"] = ctx.cfg.export.quant[0]
    return out


def served_gguf(ctx: Context) -> Path:
    export_out = ctx.run.load_manifest().get("stages", {}).get("export", {}).get("outputs", {})
    gguf = export_out.get("gguf", {}).get(ctx.cfg.export.quant[0])
    if not gguf or not Path(gguf).is_file():
        raise StageMissingError(f"{ctx.run.gguf_dir}: no {ctx.cfg.export.quant[0]} GGUF; run `ftdeploy export` first")
    return Path(gguf)


def stage_modelfile(ctx: Context) -> dict[str, Any]:
    from .stages.modelfile import build_spec, mapping_for_template, read_chat_template, sampling_defaults, write_modelfile

    with ctx.run.stage("modelfile") as out:
        template, bos, eos = read_chat_template(ctx.run.merged_dir)
        mapping = mapping_for_template(template, bos, eos, f"{ctx.run.merged_dir} chat template")
        spec = build_spec(mapping, served_gguf(ctx), ctx.cfg.modelfile, ctx.cfg.data.system_prompt,
                          sampling_defaults(ctx.run.merged_dir))
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


def stage_register(ctx: Context) -> dict[str, Any]:
    from .stages.register import register

    with ctx.run.stage("register") as out:
        reg = register(ctx.client(), ctx.cfg.name, load_spec(ctx))
        out.update(reg.as_dict())
        ctx.run.update(versions={"ollama_server": reg.server_version})
    return out


def stage_verify(ctx: Context) -> dict[str, Any]:
    from .stages.data import load_eval
    from .stages.modelfile import mapping_for_template, read_chat_template
    from .stages.verify import PARITY_CHATS, ask_all, check, summarize, template_parity
    from .templates import jinja_renderer

    with ctx.run.stage("verify") as out:
        examples = load_eval(ctx.run.data_dir)
        if ctx.cfg.verify.limit:
            examples = examples[: ctx.cfg.verify.limit]
        answers = ask_all(ctx.client(), ctx.cfg.name, examples, ctx.cfg.verify.max_tokens, ctx.cfg.train.seed)
        summary = summarize(answers, ctx.cfg.verify.min_score)
        template, bos, eos = read_chat_template(ctx.run.merged_dir)
        mapping = mapping_for_template(template, bos, eos, f"{ctx.run.merged_dir} chat template")
        summary["template_parity"] = template_parity(ctx.client(), ctx.cfg.name, jinja_renderer(template, bos, eos),
                                                     bos if mapping.format.bos_in_template else None, PARITY_CHATS)
        out.update(summary)
        ctx.run.update(metrics={"verify": summary})
        atomic_write_text(ctx.run.path / "verify.json", json.dumps(summary, indent=2))
        check(summary, ctx.cfg.name)
    return out


STAGE_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "data": stage_data, "train": stage_train, "merge": stage_merge, "export": stage_export,
    "modelfile": stage_modelfile, "register": stage_register, "verify": stage_verify,
}


def train_and_serve(ctx: Context, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    # Reach the server before hours of training, so a wrong address fails in seconds.
    ctx.client()
    results = {}
    for name, func in STAGE_FUNCS.items():
        if on_stage:
            on_stage(name)
        results[name] = func(ctx)
    return results
