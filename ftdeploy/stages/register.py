"""Register stage: upload the GGUF as a blob, create the model, confirm it with /api/show.

HTTP only: the server may be on another host (the compose sidecar, a team server).
"""

from __future__ import annotations

import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError, OllamaError
from ..ollama import OllamaClient
from ..runs import sha256_file
from .modelfile import ModelfileSpec

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
    """Magic, version, and every tensor's data inside the file (a truncated file is refused). Returns the tensor count."""
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
    size = gguf.stat().st_size
    log.info("hashing %s (%.1f MB)", gguf.name, size / 1e6)
    digest = "sha256:" + sha256_file(gguf)
    uploaded = _upload(client, gguf, digest, size, show_progress)
    client.create(name, files={gguf.name: digest}, template=spec.template, system=spec.system,
                  parameters=spec.ollama_parameters(), on_status=lambda s: log.debug("create %s: %s", name, s))
    shown = client.show(name)
    if spec.template.strip() and spec.template.strip() not in (shown.get("template") or "").strip():
        raise OllamaError(f"{name}: Ollama at {client.host} did not keep the TEMPLATE that was sent")
    return Registration(name, digest, uploaded, size, client.host, server_version)


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
