"""Register a vision model: upload the serving copy of the merged model (safetensors, config, tokenizer files; see
ftdeploy/vision.py for why) as blobs, have Ollama convert it with `POST /api/create` `files` and quantize it as asked,
with the TEMPLATE, stops, SYSTEM and parameters of the Modelfile, then confirm that /api/show lists `vision`.

HTTP only, as for a GGUF: the server may be on another host."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..errors import ExportError, OllamaServerError
from ..ollama import OllamaClient
from .modelfile import ModelfileSpec
from .register import Registration, _confirm_template, _upload_file

log = logging.getLogger(__name__)


def register_vision(client: OllamaClient, name: str, spec: ModelfileSpec, files: list[Path], quant: str | None,
                    show_progress: bool = True, architecture: str | None = None) -> Registration:
    """Upload `files` (vision.serving_copy's) and create `name` from them, quantized to `quant` (None or f16: as
    converted); `architecture`: the one Ollama's converter must have made of them (vision.VisionFamily's). The
    Registration's digest stands for the set of files (the sha256 of their names and digests)."""
    if not any(f.suffix == ".safetensors" for f in files):
        raise ExportError(f"{spec.gguf}: no safetensors weights to register")
    server_version = client.require_version()
    digests: dict[str, str] = {}
    size = uploaded = 0
    for path in files:
        digest, file_size, sent = _upload_file(client, path, show_progress)
        digests[path.name] = digest
        size, uploaded = size + file_size, uploaded + sent
    quantize = None if not quant or quant.lower() == "f16" else quant.upper()
    log.info("Ollama converts %s (%d files, %.1f MB)%s", name, len(files), size / 1e6,
             f" and quantizes it to {quantize}" if quantize else "")
    client.create(name, files=digests, template=spec.template, system=spec.system,
                  parameters=spec.ollama_parameters(), quantize=quantize,
                  on_status=lambda s: log.debug("create %s: %s", name, s))
    _confirm_template(client, name, spec)
    shown = client.show(name)
    capabilities = list(shown.capabilities or [])
    family = shown.details.family if shown.details else None
    if architecture and family != architecture:
        raise OllamaServerError(f"{name}: Ollama at {client.host} made a {family} model of the files, not "
                                f"{architecture}")
    if "vision" not in capabilities:
        raise OllamaServerError(f"{name}: Ollama at {client.host} created the model without the vision capability "
                                f"(it lists {', '.join(capabilities) or 'none'}): the vision tower did not survive "
                                "the conversion")
    combined = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()
    return Registration(name, "sha256:" + combined, uploaded, size, client.host, server_version)
