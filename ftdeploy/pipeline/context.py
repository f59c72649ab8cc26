"""What a stage adapter is given: the config, the locked run directory, and the lazily made things several stages
share (the resolved base model, the Ollama client). Imports no registry: the runner (registry.py) fills in each
stage's fingerprint before the stage runs."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import base_model
from ..config import Config, dump_config
from ..errors import StageMissingError
from ..ollama import OllamaClient, connect
from ..results import Result
from ..runs import MANIFEST_FILE, Run

R = TypeVar("R", bound=Result)


@dataclass
class Context:
    cfg: Config
    run: Run
    ollama_explicit: bool = False  # --ollama-host, ollama.host or $OLLAMA_HOST was given
    # each stage's fingerprint, filled in by the runner (registry.fingerprint) before the stage runs
    fingerprints: dict[str, str] = field(default_factory=dict)
    _client: OllamaClient | None = None
    _lock: Any = None
    _made_run: Path | None = None  # the directory this command made for the run (the run's, or a new --runs-dir)

    @classmethod
    def create(cls, cfg: Config, ollama_explicit: bool, existing: bool = False) -> Context:
        """Lock the run directory (made if needed). The config is recorded in it (config.yaml) when a stage
        starts, so a command that fails before that leaves an existing run's config as it was.

        existing: the command works on a run made earlier (merge, export, …); when there is none, say
        so before anything is written, so that a mistyped --name leaves no directory behind."""
        run = Run(cfg.run_dir, config_text=dump_config(cfg))
        if existing and not run.manifest_path.is_file():
            raise StageMissingError(
                f"no run named {cfg.name!r} in {cfg.run_dir.parent} ({run.manifest_path} does not exist); start one "
                "with `ftdeploy train-and-serve` (or `ftdeploy data`), or give the --name (and --runs-dir) of an "
                "existing run")
        top = run.path  # the topmost directory this command will make: the run's, or a new --runs-dir
        while not top.parent.exists():
            top = top.parent
        made = None if top.exists() else top
        if existing:
            run.load_manifest()  # a damaged manifest is named now, before the command does anything
        lock = run.acquire_lock()
        explicit = ollama_explicit or bool(cfg.ollama.host) or bool(os.environ.get("OLLAMA_HOST"))
        return cls(cfg, run, explicit, _lock=lock, _made_run=made)

    def close(self) -> None:
        """Release the run. A run directory this command made that holds no stage record (the command failed in
        preflight, or its stage failed before writing anything: see Run.stage) is removed: a failed no-op leaves
        nothing behind."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._made_run is not None and not (self.run.path / MANIFEST_FILE).exists():
            shutil.rmtree(self.run.path, ignore_errors=True)
            for parent in (self.run.path.parent, *self.run.path.parent.parents):  # a new --runs-dir, if left empty
                if parent != self._made_run and self._made_run not in parent.parents:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def base(self) -> Path | str:
        """The checkpoint this run trains: the earlier run's merged model (from_run), else base_model resolved."""
        if (earlier := self.from_run()) is not None:
            return earlier
        return base_model.resolve_base_model(self.cfg.base_model, self.cfg.trust_remote_code, self.cfg.base_revision,
                                             self.cfg.given_as("base_model"))

    def from_run(self) -> Path | None:
        """The merged model of the run named by from_run (None: not given); an error naming it when it has none."""
        if not self.cfg.from_run:
            return None
        return from_run_merged(self.cfg)

    def base_if_local(self) -> Path | None:
        """The base checkpoint directory when it is already on disk (never downloads or converts)."""
        if (earlier := self.from_run()) is not None:
            return earlier
        resolved = self.run.load_manifest().get("base_model", {}).get("resolved")
        if resolved and Path(resolved).is_dir():
            return Path(resolved)
        path = Path(self.cfg.base_model).expanduser()
        return path if path.is_dir() else None

    def client(self) -> OllamaClient:
        if self._client is None:
            self._client = connect(self.cfg.ollama, self.ollama_explicit)
        return self._client


def from_run_merged(cfg: Config) -> Path:
    """The merged model of the earlier run `cfg.from_run` names, which must have finished its merge stage."""
    earlier = Run(Path(cfg.runs_dir) / str(cfg.from_run))
    record = earlier.stage_record("merge") if earlier.manifest_path.is_file() else {}
    if record.get("status") != "done" or not (earlier.merged_dir / "config.json").is_file():
        raise StageMissingError(
            f"{cfg.given_as('from_run')}: run {cfg.from_run!r} in {cfg.runs_dir} has no merged model "
            f"({earlier.merged_dir}); finish it first (`ftdeploy train-and-serve --name {cfg.from_run}` or `ftdeploy "
            "merge`), or name another run")
    return earlier.merged_dir


def previous(ctx: Context, stage: str, kind: type[R]) -> R:
    """A finished stage's result, read back from the manifest."""
    return kind.from_dict(ctx.run.stage_record(stage).get("outputs", {}))
