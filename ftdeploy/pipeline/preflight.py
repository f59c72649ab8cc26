"""The checks before any stage runs, so that what would fail hours in fails in seconds: the data paths and the base
model, the engine against the hardware, the chat template against the formats Ollama serves, the disk, the Ollama
server."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from .. import base_model
from ..chat_template import ChatTemplate, mapping_for_template, read_chat_template, read_gguf_chat_template
from ..config import Config
from ..defaults import DEMO_DATA
from ..errors import FtdeployError
from ..quants import bits_per_weight
from .context import Context, from_run_merged


def check_inputs(cfg: Config, base: bool = True) -> None:
    """What the data stage reads, checked before anything loads (a tokenizer takes seconds to): each data path
    exists and is a file or a folder, not /dev/zero or a FIFO, and (`base`) the base model is an embedded name, a
    GGUF, a whole model folder or a Hub id."""
    for key in ("data.train", "data.eval"):
        spec = getattr(cfg.data, key.split(".")[1])
        if spec and spec != DEMO_DATA and not (key == "data.train" and cfg.data.sources):
            check_data_path(spec, cfg.given_as(key))
    for i, source in enumerate(cfg.data.sources):  # a mix's sources and their eval files
        for spec, key in ((source.path, "path"), (source.eval_path, "eval_path")):
            if spec and spec != DEMO_DATA:
                check_data_path(spec, f"data.sources[{i}].{key} {spec}")
    if cfg.from_run:
        from_run_merged(cfg)
    elif base:
        base_model.check_base_model(cfg.base_model, cfg.given_as("base_model"))


def check_data_path(spec: str, given_as: str) -> None:
    """A data path that does not exist, or is no file or folder (/dev/zero, a FIFO), is an error naming it."""
    import stat

    from ..data import check_local_path
    from ..errors import DataError

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


def preflight(ctx: Context, stages: list[str]) -> None:
    """Check what would fail hours in before spending them: engine vs hardware, disk, the Ollama server."""
    from ..stages.train import select_engine
    from ..strategy import check_strategy

    if "train" in stages:
        from ..trackers import check_tracker

        check_tracker(ctx.cfg.train.report_to)  # train.report_to's package, named before the data stage runs
        check_strategy(ctx.cfg, select_engine(ctx.cfg.train.engine))
    if "data" in stages:
        check_chat_template(ctx)
    from .vision import check_vision_base

    check_vision_base(ctx, stages)  # an architecture ftdeploy does not serve with its vision: named now
    needed = estimate_disk_bytes(ctx, stages)
    free = free_bytes(ctx.run.path)
    if needed > free:
        raise FtdeployError(
            f"not enough disk for {', '.join(s for s in stages if s in ('merge', 'export'))} in {ctx.run.path}: "
            f"about {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free. Free space, or point "
            "--runs-dir at a larger disk."
        )
    if "data" in stages and not ctx.cfg.from_run:  # a folder holding only config.json, say: now, not after the
        # engine and tokenizer load
        base_model.check_base_model(ctx.cfg.base_model, ctx.cfg.given_as("base_model"))
    if "register" in stages or "verify" in stages:
        ctx.client()  # a wrong address fails in seconds, not after training


def check_chat_template(ctx: Context) -> None:
    """A chat template no Ollama template can serve fails here, before the data stage, read from the base's
    tokenizer files (or its GGUF's metadata) with jinja2: no torch, no download. A Hub id not downloaded yet
    is checked by the data stage, which loads its tokenizer."""
    from ..tokenizer import read_chat_template_file

    override = ctx.cfg.data.chat_template
    if override:  # data.chat_template replaces the base's: check it, with the base's BOS and EOS where known
        found = None
        with contextlib.suppress(FtdeployError):  # a base with no template of its own is what the option is for
            found = _base_chat_template(ctx)
        base = found[0] if found is not None else ChatTemplate("", "", "")
        given = base._replace(template=read_chat_template_file(override))
        mapping_for_template(given, f"{override} (data.chat_template)")
    elif (found := _base_chat_template(ctx)) is not None:
        chat, where = found
        mapping_for_template(chat, f"{where} chat template")


def _base_chat_template(ctx: Context) -> tuple[ChatTemplate, str] | None:
    """The base model's chat template and where it was read, when that is on disk; None otherwise."""
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
        return read_gguf_chat_template(base), str(base)
    return read_chat_template(base), str(base)


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
