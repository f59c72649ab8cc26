"""The pinned `ollama serve` as a process: where its binary is, a free loopback port, stopping it, and the
state file that remembers the one ftdeploy left running (`ftdeploy ollama status|stop`).

No HTTP here: starting a server and waiting until it answers is `ollama.start_local_server`, since that
needs the client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import state_dir

PINNED_OLLAMA_VERSION = "v0.17.4"
_STATE_FILE = "ollama-serve.json"


def find_ollama_binary() -> Path | None:
    """$FTDEPLOY_OLLAMA_BIN, the pinned build from scripts/install-ollama.sh, then `ollama` on PATH."""
    env = os.environ.get("FTDEPLOY_OLLAMA_BIN")
    if env:
        return Path(env)
    pinned = state_dir() / "ollama" / PINNED_OLLAMA_VERSION / "ollama"
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return pinned
    on_path = shutil.which("ollama")
    return Path(on_path) if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    """An `ollama serve` started by ftdeploy, listening on loopback only."""

    host: str
    pid: int
    models_dir: Path
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            # reap if it is our child
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def save_local_server(server: LocalServer) -> None:
    from .runs import atomic_write_text

    atomic_write_text(state_dir() / _STATE_FILE, json.dumps({
        "host": server.host, "pid": server.pid, "models_dir": str(server.models_dir), "log": str(server.log_path),
    }))


def load_local_server() -> LocalServer | None:
    """The server a previous command started and left running, or None (a stale state file is removed)."""
    path = state_dir() / _STATE_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    server = LocalServer(info["host"], info["pid"], Path(info["models_dir"]), Path(info["log"]))
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    return server


def forget_local_server() -> None:
    (state_dir() / _STATE_FILE).unlink(missing_ok=True)
