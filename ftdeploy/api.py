"""The Python API: what the `ftdeploy` commands do, for a notebook or a script.

    from ftdeploy import train_and_serve
    served = train_and_serve()                                        # the embedded demo, as `ftdeploy train-and-serve`
    served = train_and_serve("my.yaml", {"train.max_steps": 20})      # a config file and overrides
    served.verify.passed, served.model, served.ollama_host

Every function takes a config (a Config, a YAML path, or None: the embedded demo config unless the overrides name a
base_model, as on the command line) and overrides: the CLI's `--set` items ("train.max_steps=20", values read as
YAML) or a mapping of dotted keys to values ({"train.max_steps": 20}). It returns the typed results of ftdeploy.results
and raises the typed errors of ftdeploy.errors (ConfigError, DataError, VerifyError, ...) where the CLI would print
a message and exit.

Nothing is printed to stdout. With `progress=True` (the default), each stage and the closing summary are shown
through rich on stderr (in Jupyter rich renders them as HTML output) and ftdeploy's log messages through the
`ftdeploy` logger (a rich handler is added for the call unless logging is configured already).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .runs import STAGES

if TYPE_CHECKING:
    from rich.console import Console

    from .config_models import Config
    from .pipeline import Context
    from .results import (
        DataResult,
        ExportResult,
        MergeResult,
        ModelfileResult,
        RegisterResult,
        Result,
        TrainResult,
        VerifySummary,
    )

Overrides = Mapping[str, Any] | Iterable[str]
log = logging.getLogger("ftdeploy")


def load_config(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = ()) -> Config:
    """The config the commands would run with: `config` (a Config, a YAML path, or None for the embedded demo config
    unless the overrides give base_model) with `overrides` on top; checked once, every problem in one ConfigError,
    each naming where its value came from (the file and key, the `--set` item, or `overrides['key']`)."""
    from .config import demo_config_path
    from .config import load_config as layered
    from .config_models import Config

    items, values = _split_overrides(overrides)
    names = {key: f"overrides[{key!r}]" for key in values}
    if isinstance(config, Config):
        return layered(None, items, values, names, base=config) if items or values else config
    label = None
    given = {item.partition("=")[0].strip() for item in items} | set(values)
    path = Path(config) if config is not None else None
    if path is None and "base_model" not in given:  # as the CLI: no config and no base model, the demo's
        path, label = demo_config_path(), "the embedded default config (demo.yaml)"
    return layered(path, items, values, names, label)


def _split_overrides(overrides: Overrides) -> tuple[list[str], dict[str, Any]]:
    """("key=value" items, {dotted key: value}) from either form; one string is one item."""
    if isinstance(overrides, str):
        return [overrides], {}
    if isinstance(overrides, Mapping):
        return [], {str(key): value for key, value in overrides.items()}
    return [str(item) for item in overrides], {}


@dataclass(frozen=True)
class Served:
    """What train_and_serve made: the model's name on the Ollama server and the server's address, the run directory
    and its report, and each stage's typed result (a stage skipped as unchanged: the result it recorded)."""

    model: str
    run_dir: Path
    results: dict[str, Result]
    skipped: tuple[str, ...] = ()
    ollama_host: str | None = None  # None on a worker node of a multi-node run, which stops after training
    report: Path | None = None

    def _get(self, stage: str) -> Result:
        if stage not in self.results:
            from .errors import StageMissingError

            raise StageMissingError(f"{self.run_dir}: the {stage} stage did not run here (a worker node stops after "
                                    "training)")
        return self.results[stage]

    @property
    def data(self) -> DataResult:
        return cast("DataResult", self._get("data"))

    @property
    def train(self) -> TrainResult:
        return cast("TrainResult", self._get("train"))

    @property
    def merge(self) -> MergeResult:
        return cast("MergeResult", self._get("merge"))

    @property
    def export(self) -> ExportResult:
        return cast("ExportResult", self._get("export"))

    @property
    def modelfile(self) -> ModelfileResult:
        return cast("ModelfileResult", self._get("modelfile"))

    @property
    def register(self) -> RegisterResult:
        return cast("RegisterResult", self._get("register"))

    @property
    def verify(self) -> VerifySummary:
        return cast("VerifySummary", self._get("verify"))


def train_and_serve(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
                    from_stage: str | None = None, force: Iterable[str] = (), progress: bool = True) -> Served:
    """Every stage, as `ftdeploy train-and-serve`: data, train, merge, export, modelfile, register, verify. A rerun of
    the same config skips the finished stages whose inputs are unchanged and resumes training from its newest
    checkpoint; `from_stage` reruns that stage and every one after it, `force` the stages named. Raises VerifyError
    when the served model fails verification (the model stays registered, as `<name>-unverified`)."""
    from .pipeline import train_and_serve as run_all

    cfg = load_config(config, overrides)
    skipped: list[str] = []
    with _shown(progress) as show, _context(cfg) as ctx:
        results = run_all(ctx, on_stage=_noting_skipped(skipped, show.stage if show else None), from_stage=from_stage,
                          force=tuple(force))
        served = _served(ctx, results, tuple(skipped))
    if show:
        show.summary(served)
    return served


def _noting_skipped(skipped: list[str], then: Callable[[str], None] | None) -> Callable[[str], None]:
    """The runner's on_stage: a stage it skips as unchanged is announced as "NAME (unchanged, skipped)"."""
    def on_stage(label: str) -> None:
        if label.endswith("(unchanged, skipped)"):
            skipped.append(label.split(" ", 1)[0])
        if then is not None:
            then(label)

    return on_stage


def _served(ctx: Context, results: dict[str, Result], skipped: tuple[str, ...]) -> Served:
    from .report import build_report

    if "verify" not in results:  # a worker node: it trained its share, node 0 serves
        return Served(ctx.cfg.name, ctx.run.path, results, skipped)
    report, _ = build_report(ctx.run.path)
    return Served(ctx.cfg.name, ctx.run.path, results, skipped, ctx.client().host, report)


def run_stage(stage: str, config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
              progress: bool = True) -> Result:
    """One stage on the run the config names, as `ftdeploy STAGE`: data starts a run, every other stage works on the
    run an earlier stage made (StageMissingError when there is none, or the stage before it has not finished)."""
    from .errors import ConfigError
    from .pipeline import run_stage as run_one

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    cfg = load_config(config, overrides)
    with _shown(progress) as show, _context(cfg, existing=stage != "data") as ctx:
        if show:
            show.stage(stage)
        result = run_one(ctx, stage)
    return result


def data(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
         progress: bool = True) -> DataResult:
    """Validate and tokenize the dataset with the base model's chat template (`ftdeploy data`); starts the run."""
    return cast("DataResult", run_stage("data", config, overrides, progress=progress))


def train(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
          progress: bool = True) -> TrainResult:
    """Train the adapter on the prepared data (`ftdeploy train`)."""
    return cast("TrainResult", run_stage("train", config, overrides, progress=progress))


def merge(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
          progress: bool = True) -> MergeResult:
    """Merge the adapter into a 16-bit copy of the base model (`ftdeploy merge`)."""
    return cast("MergeResult", run_stage("merge", config, overrides, progress=progress))


def export(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
           progress: bool = True) -> ExportResult:
    """Convert the merged model to GGUF and quantize it; the quant gate picks the served type (`ftdeploy export`)."""
    return cast("ExportResult", run_stage("export", config, overrides, progress=progress))


def modelfile(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
              progress: bool = True) -> ModelfileResult:
    """Write the Ollama Modelfile (`ftdeploy modelfile`)."""
    return cast("ModelfileResult", run_stage("modelfile", config, overrides, progress=progress))


def register(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
             progress: bool = True) -> RegisterResult:
    """Upload the GGUF to the Ollama server and create the model (`ftdeploy register`)."""
    return cast("RegisterResult", run_stage("register", config, overrides, progress=progress))


def verify(config: Config | str | os.PathLike[str] | None = None, overrides: Overrides = (), *,
           progress: bool = True) -> VerifySummary:
    """Ask the served model and the merged model the eval prompts and compare (`ftdeploy verify`); raises
    VerifyError when a check fails."""
    return cast("VerifySummary", run_stage("verify", config, overrides, progress=progress))


@contextlib.contextmanager
def _context(cfg: Config, existing: bool = False) -> Iterator[Context]:
    """The run, locked for the call and released however it ends (a run directory the call made and left empty is
    removed, as after a failed command). A missing optional package (torch on a base install) is raised as the
    MissingDependencyError that names the extra to install, as the CLI reports it."""
    from .optional import missing_dependency
    from .pipeline import Context

    ctx = Context.create(cfg, ollama_explicit=False, existing=existing)
    try:
        yield ctx
    except ModuleNotFoundError as exc:
        missing = missing_dependency(exc)
        if missing is None:
            raise
        raise missing from exc
    finally:
        ctx.close()


# ---------------------------------------------------------------- progress


@dataclass
class _Progress:
    """Each stage as it starts and how long the one before took, and the summary: rich on stderr (HTML in Jupyter)."""

    console: Console
    current: str | None = None
    started: float = 0.0
    lines: list[str] = field(default_factory=list)

    def stage(self, label: str) -> None:
        self.done()
        name = label.split(" ", 1)[0]
        number = f"[{STAGES.index(name) + 1}/{len(STAGES)}]" if name in STAGES else ""
        if label != name:  # "(unchanged, skipped)"
            self.console.print(f"[dim]{number} {name}: unchanged, skipped[/dim]")
            return
        self.console.rule(f"[bold]{number} {name}", align="left")
        self.current, self.started = name, time.monotonic()

    def done(self) -> None:
        if self.current is not None:
            self.console.print(f"[green]{self.current} done[/green] in {time.monotonic() - self.started:.1f} s")
            self.current = None

    def failed(self) -> None:
        """The stage that was running when the call raised: shown as failed, never as done."""
        if self.current is not None:
            self.console.print(f"[red]{self.current} failed[/red] after {time.monotonic() - self.started:.1f} s")
            self.current = None

    def summary(self, served: Served) -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None, padding=(0, 1))
        verify = served.results.get("verify")
        rows = [("model", served.model), ("ollama host", served.ollama_host or "–"),
                ("verify", _verified(verify) if verify is not None else "–"),
                ("report", str(served.report or "–")), ("run dir", str(served.run_dir))]
        for key, value in rows:
            table.add_row(f"[bold]{key}", value)
        self.console.print(table)


def _verified(verify: Any) -> str:
    if verify.prompt_source == "train":
        served = verify.model("served")
        agreement = f"{served.token_agreement:.0%}" if served and served.token_agreement is not None else "–"
        return f"served = merged on {agreement} of greedy steps, {verify.total} training prompts (no eval rows)"
    return f"{'passed' if verify.passed else 'failed'}: {verify.hits}/{verify.total} expected answers"


@contextlib.contextmanager
def _shown(progress: bool) -> Iterator[_Progress | None]:
    """With progress: a rich console on stderr for the stages, ftdeploy's INFO messages through a rich handler on the
    `ftdeploy` logger (unless a handler is there already: the user's logging wins), and the libraries' notices a
    user cannot act on kept quiet (ftdeploy.quiet, as the CLI does); all as it was after the call."""
    if not progress:
        yield None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with _rich_logging(console), _quiet():
        shown = _Progress(console)
        try:
            yield shown
        except BaseException:
            shown.failed()
            raise
        shown.done()


@contextlib.contextmanager
def _rich_logging(console: Console) -> Iterator[None]:
    if log.hasHandlers():
        yield
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    from .quiet import LIBRARIES, quiet_libraries

    levels = {name: logging.getLogger(name).level for name in LIBRARIES}
    with warnings.catch_warnings():
        quiet_libraries()
        # In Jupyter without ipywidgets, rich's live displays (the upload's bytes) and tqdm's bars ask for it: the
        # stage lines say what happens without them.
        warnings.filterwarnings("ignore", message='install "ipywidgets"')
        warnings.filterwarnings("ignore", message="IProgress not found")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
