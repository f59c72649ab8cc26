"""What the stages read back from a run and from the config: the data files and their digests, the prompts verify
and the quant gate use, the exported GGUFs and which one is served, the Modelfile spec, the names models are
registered under."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..config import Config
from ..errors import StageMissingError
from ..results import ExportResult
from ..runs import Run, sha256_file
from .context import Context, previous

if TYPE_CHECKING:
    from ..data import Record
    from ..stages.modelfile import ModelfileSpec

PromptSource = Literal["eval", "train"]


def verify_examples(ctx: Context, limit: int = 0) -> tuple[list[Record], PromptSource]:
    """The chats verify asks, and where they came from: the eval rows; or, where the data has none and no eval file
    was asked for, the data stage's sample of the training chats (verify.train_prompts of them), with no `expect`:
    a training answer is no reference."""
    from ..data import load_eval, load_train_sample

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
    from ..chat_template import read_chat_template

    render = read_chat_template(ctx.run.merged_dir).renderer()
    examples, source = verify_examples(ctx, limit)
    # a preference row: its prompt with the chosen answer (or the only one: a bad answer is text the model still reads)
    chats = [[*r.messages, *(a for a in (r.chosen or r.rejected,) if a is not None)] for r in examples if r.messages]
    return [render(chat, False) for chat in chats], source


def auto_quant(cfg: Config) -> bool:
    from ..quants import AUTO

    return cfg.export.quant == [AUTO]


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


def other_quants(ctx: Context) -> dict[str, str]:
    """{tag: qtype} for every exported quant besides the served one (flagged ones included, never as default).
    An adapter deploy registers the served quant's base only; `--quant auto`, the type it chose only."""
    if ctx.cfg.export.deploy == "adapter" or auto_quant(ctx.cfg):
        return {}
    served = served_quant(ctx)
    return {quant_tag(ctx.cfg.name, q): q for q in ctx.cfg.export.quant if q != served}


def base_name(cfg: Config, qtype: str) -> str:
    """The Ollama name the base is registered under for adapter deploys: ftdeploy-base-<base>:<quant>."""
    import re

    if cfg.export.base_name:
        return cfg.export.base_name
    slug = re.sub(r"[^a-z0-9._-]+", "-", cfg.base_model.rstrip("/").split("/")[-1].lower()).strip("-._") or "model"
    return f"ftdeploy-base-{slug[:60]}:{qtype}"


def load_spec(ctx: Context) -> ModelfileSpec:
    from ..stages.modelfile import ModelfileSpec

    path = ctx.run.path / "modelfile.json"
    if not path.is_file():
        raise StageMissingError(f"{path}: no Modelfile yet; run `ftdeploy modelfile` first")
    return ModelfileSpec.from_json(path.read_text())


def file_digest(spec: str | None, split: str) -> str | None:
    """sha256 of a data file (or of every file in a directory); a Hub id stands for itself."""
    from ..data import resolve_data_path

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


def data_files(cfg: Config) -> list[str | None]:
    """The data files' digests, and the chat template file's: editing it prepares the data again."""
    files = [file_digest(cfg.data.train, "train"), file_digest(cfg.data.eval, "eval") if cfg.data.eval else None]
    if cfg.from_run:  # the earlier run's model as it was merged: a rerun of it that changed it trains this one again
        earlier = Run(Path(cfg.runs_dir) / cfg.from_run)
        files.append(earlier.stage_record("merge").get("fingerprint") if earlier.manifest_path.is_file() else None)
    if cfg.data.chat_template:
        from ..tokenizer import chat_template_digest

        files.append(chat_template_digest(cfg.data.chat_template))
    return files


def export_files(run: Run) -> list[Path]:
    """Every file the export stage left: the GGUFs and, for an adapter deploy, the cached base GGUF."""
    exported = ExportResult.from_dict(run.stage_record("export").get("outputs", {}))
    return [Path(f) for f in (*exported.gguf.values(), *([exported.base_gguf] if exported.base_gguf else []))]
