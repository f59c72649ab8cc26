"""Register stage: upload the GGUF as a blob, create the model, confirm it with /api/show.

HTTP only: the server may be on another host (the compose sidecar, a team server).
"""

from __future__ import annotations

import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExportError, ModelNotFoundError, OllamaError, OllamaServerError
from ..ollama import OllamaClient
from ..runs import sha256_file
from .modelfile import ModelfileSpec

if TYPE_CHECKING:
    from ollama import ProgressResponse
    from rich.progress import TaskID

log = logging.getLogger(__name__)


@dataclass
class Registration:
    model: str
    digest: str
    uploaded_bytes: int
    size: int
    host: str
    server_version: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def check_gguf_header(path: Path) -> None:
    """Refuse what is not a GGUF before anything is uploaded (magic and version)."""
    if not path.is_file():
        raise ExportError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ExportError(f"{path}: not a GGUF file (bad magic)")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise ExportError(f"{path}: unsupported GGUF version {version}")


def check_gguf(path: Path) -> int:
    """Magic, version, and every tensor's data inside the file (a truncated file is refused); the tensor count."""
    check_gguf_header(path)
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader fails in many ways on a damaged file
        raise ExportError(f"{path}: not a complete GGUF ({type(exc).__name__}: {exc}); the file may be truncated "
                          "or damaged: export it again") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ExportError(f"{path}: tensor {tensor.name} ends at byte {end} but the file has {size} bytes "
                              "(truncated): export it again")
    if not reader.tensors:
        raise ExportError(f"{path}: the GGUF holds no tensors")
    return len(reader.tensors)


def register(client: OllamaClient, name: str, spec: ModelfileSpec, show_progress: bool = True) -> Registration:
    gguf = Path(spec.gguf)
    check_gguf(gguf)
    server_version = client.require_version()
    digest, size, uploaded = _upload_file(client, gguf, show_progress)
    _create(client, name, spec, files={gguf.name: digest})
    _confirm_template(client, name, spec)
    return Registration(name, digest, uploaded, size, client.host, server_version)


def _upload_file(client: OllamaClient, path: Path, show_progress: bool) -> tuple[str, int, int]:
    """Hash `path` and upload it unless the server has it: (digest, size, bytes sent)."""
    size = path.stat().st_size
    log.info("hashing %s (%.1f MB)", path.name, size / 1e6)
    digest = "sha256:" + sha256_file(path)
    return digest, size, _upload(client, path, digest, size, show_progress)


def _create(client: OllamaClient, name: str, spec: ModelfileSpec, **kw: Any) -> None:
    client.create(name, template=spec.template, system=spec.system, parameters=spec.ollama_parameters(),
                  on_status=lambda s: log.debug("create %s: %s", name, s), **kw)


def _confirm_template(client: OllamaClient, name: str, spec: ModelfileSpec) -> None:
    shown = client.show(name)
    if spec.template.strip() and spec.template.strip() not in (shown.template or "").strip():
        raise OllamaServerError(f"{name}: Ollama at {client.host} did not keep the TEMPLATE that was sent")


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class AdapterRegistration:
    model: str
    base_model: str
    base_created: bool
    base_uploaded_bytes: int
    adapter_bytes: int
    uploaded_bytes: int
    digest: str
    host: str
    server_version: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def blob_digests(show: Any) -> set[str]:
    """The sha256 digests an existing model's Modelfile refers to (`FROM .../sha256-<hex>`); `show` is what
    `OllamaClient.show` returns, or a dict like it."""
    import re

    return {"sha256:" + m for m in re.findall(r"sha256[-:]([0-9a-f]{64})", str(show.get("modelfile") or ""))}


def register_adapter(client: OllamaClient, name: str, base_name: str, spec: ModelfileSpec, base_gguf: Path,
                     adapter_dir: Path, show_progress: bool = True) -> AdapterRegistration:
    """Register the base GGUF once as `base_name`, then `name` as the LoRA adapter on top of it (Ollama ADAPTER).

    A second tune of the same base uploads only its adapter. Ollama converts the PEFT safetensors adapter itself
    (llama, mistral and gemma2 families in the pinned release); a refusal leaves no model behind."""
    from ..ollama import parse_version

    check_gguf(base_gguf)
    server_version = client.require_version()
    if parse_version(server_version) >= (0, 34, 1):
        raise OllamaError(f"Ollama {server_version} at {client.host} no longer creates adapter models (removed in "
                          "0.34.1); use --deploy full, or a server of the pinned release")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise ExportError(f"{adapter_dir}: no {', '.join(missing)}; run `ftdeploy train` first")
    base_digest, _, base_uploaded = _upload_file(client, base_gguf, show_progress)
    try:
        existing = blob_digests(client.show(base_name))
    except ModelNotFoundError:  # only that: a refused token or a TLS failure is not "the base is missing"
        existing = set()
    base_created = base_digest not in existing
    if base_created:
        log.info("registering the base model %s (once for every tune of it)", base_name)
        _create(client, base_name, spec, files={base_gguf.name: base_digest})
    else:
        log.info("base model %s is already registered with this GGUF", base_name)
    adapters, adapter_bytes, uploaded = {}, 0, 0
    for fname in ADAPTER_FILES:
        digest, size, sent = _upload_file(client, adapter_dir / fname, show_progress)
        uploaded += sent
        adapter_bytes += size
        adapters[fname] = digest
    try:
        _create(client, name, spec, from_model=base_name, adapters=adapters)
    except OllamaServerError as exc:  # the server refused the adapter (not: unreachable, auth, TLS)
        raise OllamaServerError(f"{exc}\nThe adapter could not be attached to {base_name}; --deploy full registers "
                                "the merged model instead") from None
    _confirm_template(client, name, spec)
    return AdapterRegistration(name, base_name, base_created, base_uploaded, adapter_bytes, uploaded,
                               adapters["adapter_model.safetensors"], client.host, server_version)


def _upload(client: OllamaClient, gguf: Path, digest: str, size: int, show_progress: bool) -> int:
    if client.has_blob(digest):
        log.info("%s is already on %s: nothing to upload", gguf.name, client.host)
        return 0
    if not show_progress:
        return client.push_blob(gguf, digest)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("uploading", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task("upload", total=size)
        return client.push_blob(gguf, digest, progress=lambda n: progress.advance(task, n))


def push(client: OllamaClient, model: str, destination: str, insecure: bool = False,
         show_progress: bool = True) -> dict[str, object]:
    """Copy `model` to `destination` on the server when the names differ, then push it; progress in bytes."""
    try:
        client.show(model)
    except ModelNotFoundError:  # only that: a refused token or a TLS failure says so itself
        raise ModelNotFoundError(f"{model} is not registered at {client.host}; run `ftdeploy register` first") from None
    if destination != model:
        client.copy(model, destination)
    layers: dict[str, int] = {}
    if not show_progress:
        statuses = client.push(destination, insecure, on_event=lambda e: _note_layer(layers, e))
    else:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=Console(file=sys.stderr), transient=True) as progress:
            tasks: dict[str, TaskID] = {}

            def on_event(event: ProgressResponse) -> None:
                _note_layer(layers, event)
                if event.digest and event.total:
                    if event.digest not in tasks:
                        tasks[event.digest] = progress.add_task(f"pushing {event.digest[7:19]}", total=event.total)
                    progress.update(tasks[event.digest], completed=event.completed or 0)

            statuses = client.push(destination, insecure, on_event=on_event)
    return {"model": model, "destination": destination, "host": client.host, "layers": len(layers),
            "bytes": sum(layers.values()), "statuses": statuses}


def _note_layer(layers: dict[str, int], event: ProgressResponse) -> None:
    if event.digest and event.total:
        layers[event.digest] = event.total
