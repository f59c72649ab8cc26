"""`ftdeploy ollama up|down`: the compose sidecar, started through the Docker SDK where there is no compose.

Same image, models volume and healthcheck as compose.yaml, but published on loopback only.
"""

from __future__ import annotations

from typing import Any

from .errors import OllamaError
from .optional import require

OLLAMA_IMAGE = "ollama/ollama:0.17.4"  # keep in step with compose.yaml (a test checks)
CONTAINER_NAME = "ftdeploy-ollama"
MODELS_VOLUME = "ftdeploy-ollama-models"


def sidecar_spec(port: int = 11434, gpu: bool = False) -> dict[str, Any]:
    """Keyword arguments for docker's `containers.run`: loopback-only port, named volume, healthcheck."""
    spec: dict[str, Any] = {
        "image": OLLAMA_IMAGE,
        "name": CONTAINER_NAME,
        "detach": True,
        "ports": {"11434/tcp": ("127.0.0.1", port)},
        "volumes": {MODELS_VOLUME: {"bind": "/root/.ollama", "mode": "rw"}},
        "restart_policy": {"Name": "unless-stopped"},
        "healthcheck": {"test": ["CMD", "ollama", "list"], "interval": 10_000_000_000, "timeout": 5_000_000_000,
                        "retries": 12, "start_period": 10_000_000_000},
        "labels": {"org.opencontainers.image.title": "ftdeploy ollama sidecar"},
    }
    if gpu:
        from docker.types import DeviceRequest

        spec["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return spec


def docker_client() -> Any:
    """A client for a reachable engine, or an OllamaError that says what to do instead."""
    docker = require("docker", "starting the Ollama sidecar")
    try:
        client = docker.from_env(timeout=5)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure here means no usable engine
        raise OllamaError(
            f"no Docker engine is reachable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
            "Start Docker, or without Docker run scripts/install-ollama.sh and let train-and-serve start "
            "the pinned Ollama on loopback."
        ) from None


def up(port: int = 11434, gpu: bool = False) -> str:
    client = docker_client()
    import docker

    try:
        existing = client.containers.get(CONTAINER_NAME)
        if existing.status != "running":
            existing.start()
        return f"http://127.0.0.1:{port}"
    except docker.errors.NotFound:
        pass
    client.images.pull(OLLAMA_IMAGE)
    client.containers.run(**sidecar_spec(port, gpu))
    return f"http://127.0.0.1:{port}"


def down(remove_models: bool = False) -> bool:
    client = docker_client()
    import docker

    try:
        container = client.containers.get(CONTAINER_NAME)
    except docker.errors.NotFound:
        return False
    container.stop(timeout=10)
    container.remove()
    if remove_models:
        try:
            client.volumes.get(MODELS_VOLUME).remove()
        except docker.errors.NotFound:
            pass
    return True
