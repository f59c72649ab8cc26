"""What the stages read back from a run and from the config: the data files and their digests, the prompts verify
and the quant gate use, the exported GGUFs and which one is served, the Modelfile spec, the names models are
registered under."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import Config
from ..errors import StageMissingError
from ..results import DataResult, ExportResult
from ..runs import Run, sha256_file
from .context import Context, previous

if TYPE_CHECKING:
    from ..data import Record
    from ..stages.modelfile import ModelfileSpec

PromptSource = Literal["eval", "train"]
log = logging.getLogger(__name__)


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


def trained_lengths(ctx: Context) -> tuple[int, int]:
    """(the longest sequence training saw, in tokens; the data.max_seq_length the data was prepared with), from the
    data stage's stats.json. GRPO trains on its prompts and the answers it samples: its longest prompt plus
    grpo.max_completion_length. Data prepared before stats.json kept max_seq_length: the config's."""
    path = ctx.run.data_dir / "stats.json"
    stats = json.loads(path.read_text()) if path.is_file() else {}
    longest = int(stats.get("max_length") or 0)
    if stats.get("method") == "grpo":
        longest += ctx.cfg.grpo.max_completion_length
    return longest, int(stats.get("max_seq_length") or ctx.cfg.data.max_seq_length)


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
    if cfg.from_run:  # an earlier run's merged model, as merged: never under the name of the base it was tuned from
        source = f"{cfg.from_run}-{(from_run_merge_fingerprint(cfg) or 'unmerged')[:8]}"
    else:
        source = cfg.base_model.rstrip("/").split("/")[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", source.lower()).strip("-._") or "model"
    return f"ftdeploy-base-{slug[:60]}:{qtype}"


def from_run_merge_fingerprint(cfg: Config) -> str | None:
    """The merge fingerprint of the run `from_run` names: what its merged model is (None without a manifest)."""
    earlier = Run(Path(cfg.runs_dir) / str(cfg.from_run))
    return earlier.stage_record("merge").get("fingerprint") if earlier.manifest_path.is_file() else None


def load_spec(ctx: Context) -> ModelfileSpec:
    from ..stages.modelfile import ModelfileSpec

    path = ctx.run.path / "modelfile.json"
    if not path.is_file():
        raise StageMissingError(f"{path}: no Modelfile yet; run `ftdeploy modelfile` first")
    return ModelfileSpec.from_json(path.read_text())


def file_digest(spec: str | None, split: str, revision: str | None = None, hub_config: str | None = None) -> str | None:
    """sha256 of a data file (with the local image files its rows name: data/images.local_image_digests) or of every
    file in a directory; a Hugging Face dataset, its id at the commit its revision names now (`id@commit`,
    data/hub.py), so an upstream change is a change."""
    from ..data import resolve_data_path
    from ..data.hub import hub_revision, is_hub_dataset

    if not spec:
        return None
    path = resolve_data_path(spec, split)
    if path.is_file():
        from ..data.images import local_image_digests

        images = local_image_digests(path)  # the image files its rows name are data too
        if not images:
            return sha256_file(path)
        return hashlib.sha256("\n".join([sha256_file(path), *images]).encode()).hexdigest()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + sha256_file(f).encode())
        return h.hexdigest()
    if is_hub_dataset(spec):
        return f"{spec}@{hub_revision(spec, revision, hub_config)}"
    return spec


def _data_digest(cfg: Config, spec: str | None, split: str, revision: str | None, hub_config: str | None) -> str | None:
    """file_digest; where the Hub cannot be reached, the commit this run's data stage read (with a warning), so the
    stages after data run without the Hub. Never a guess: with none recorded, the error stands."""
    from ..data.hub import HubUnreachable

    try:
        return file_digest(spec, split, revision, hub_config)
    except HubUnreachable as exc:
        run = Run(cfg.run_dir)
        read = DataResult.from_dict(run.stage_record("data").get("outputs")).revisions \
            if run.manifest_path.is_file() else {}
        if spec not in read:
            raise
        log.warning("%s\nUsing the commit this run's data stage read, %s; whether the dataset changed upstream is "
                    "not known", exc, read[spec])
        return f"{spec}@{read[spec]}"


def data_files(cfg: Config) -> list[Any]:
    """The data files' digests (a mix's: each source's and its eval file's), and the chat template file's: editing
    it prepares the data again. A Hugging Face dataset's is its commit: an upstream change prepares it again."""
    data = cfg.data
    files: list[Any] = [_data_digest(cfg, data.train, "train", data.revision, data.hub_config) if not data.sources
                        else [[_data_digest(cfg, s.path, "train", s.revision or data.revision,
                                            s.hub_config or data.hub_config),
                               _data_digest(cfg, s.eval_path, "eval", s.revision or data.revision,
                                            s.hub_config or data.hub_config)] for s in data.sources],
                        _data_digest(cfg, data.eval, "eval", data.revision, data.hub_config) if data.eval else None]
    if cfg.from_run:  # the earlier run's model as it was merged: a rerun of it that changed it trains this one again
        files.append(from_run_merge_fingerprint(cfg))
    if cfg.data.chat_template:
        from ..tokenizer import chat_template_digest

        files.append(chat_template_digest(cfg.data.chat_template))
    return files


def reward_files(cfg: Config) -> list[str | None] | None:
    """GRPO's reward functions' source digests (rewards.reward_sources): an edited reward trains and verifies again.
    None for the other methods, so their fingerprints stay as they were."""
    if cfg.train.method != "grpo":
        return None
    from ..rewards import reward_sources

    return reward_sources(cfg.grpo.rewards)


def dataset_provenance(ctx: Context) -> str:
    """The datasets trained, for the GGUF's provenance: a file's sha256, a Hugging Face dataset's commit as the data
    stage read it; a mix's sources with their weights."""
    from ..data.hub import hub_revision, is_hub_dataset
    from ..errors import DataError

    data = ctx.cfg.data
    read = previous(ctx, "data", DataResult).revisions
    named = []
    for spec, weight, revision in [(s.path, s.weight, s.revision) for s in data.sources] or [(data.train, None, None)]:
        if spec in read:
            what = f"{spec}@{read[spec]}"
        elif is_hub_dataset(spec):  # data prepared before the commit was recorded
            try:
                what = f"{spec}@{hub_revision(spec, revision or data.revision, data.hub_config)}"
            except DataError:
                what = f"{spec} (commit not recorded)"
        else:
            what = f"{spec} sha256:{file_digest(spec, 'train')}"
        named.append(what + (f" (weight {weight:g})" if weight is not None else ""))
    return ("datasets " if len(named) > 1 else "dataset ") + ", ".join(named)


def export_files(run: Run) -> list[Path]:
    """Every file the export stage left: the GGUFs and, for an adapter deploy, the cached base GGUF."""
    exported = ExportResult.from_dict(run.stage_record("export").get("outputs", {}))
    return [Path(f) for f in (*exported.gguf.values(), *([exported.base_gguf] if exported.base_gguf else []))]
