"""The `ftdeploy` command line: a thin layer over the stages. Results on stdout, logs on stderr."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .config import load_config
from .defaults import DEFAULT_OLLAMA_HOST
from .errors import FtdeployError
from .runs import STAGES

log = logging.getLogger("ftdeploy")
STAGE_NAMES = list(STAGES)  # the registry's order (pipeline.REGISTRY checks it), without importing the pipeline


class Stopped(SystemExit):
    """SIGTERM (`docker stop`, `timeout`, a CI cancel): unwinds like Ctrl-C, and says so."""


STOPPED_HINT = ("finished stages and training checkpoints are kept, partial artifacts were removed. Run the same "
                "command again to continue where it stopped (finished stages are skipped, training resumes from its "
                "newest checkpoint); `ftdeploy train-and-serve --from STAGE` redoes a stage and every one after it.")


class FtdeployGroup(click.Group):
    """The one place where ftdeploy errors become a clean message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FtdeployError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"Interrupted: {STOPPED_HINT}", err=True)
            ctx.exit(130)
        except Stopped as exc:
            click.echo(f"Stopped by SIGTERM: {STOPPED_HINT}", err=True)
            ctx.exit(exc.code if isinstance(exc.code, int) else 1)
        except ModuleNotFoundError as exc:
            # An optional package this command needs (torch for training, say) on a base install.
            from .optional import missing_dependency

            missing = missing_dependency(exc)
            if missing is None:
                raise
            log.debug("optional dependency missing", exc_info=True)
            click.echo(f"Error: {missing}", err=True)
            ctx.exit(missing.exit_code)
        except OSError as exc:
            if not exc.filename:
                raise
            # A fault of a path (permissions, read-only, disk full, a file where a directory should be):
            # one paragraph naming it; the traceback only with -vv.
            from .runs import filesystem_message

            log.debug("file system error", exc_info=True)
            click.echo(f"Error: {filesystem_message(exc)}", err=True)
            ctx.exit(1)


def _stop_on_sigterm() -> None:
    """`docker stop`, `timeout` and CI cancel with SIGTERM: unwind like Ctrl-C so the stage is marked failed
    and partial artifacts are removed, instead of dying with the manifest still saying "running"."""
    def handler(signum: int, frame: Any) -> None:
        raise Stopped(128 + signum)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. CliRunner in a thread)
        signal.signal(signal.SIGTERM, handler)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose > 1 else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("ftdeploy").setLevel(min(level, logging.INFO))
    if verbose < 2:
        from .quiet import quiet_libraries

        quiet_libraries()


@click.group(cls=FtdeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftdeploy")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Fine-tune a model on your data and serve it in Ollama.

    \b
    ftdeploy train-and-serve                  # the embedded demo: SmolLM2-135M on made-up facts
    ftdeploy train-and-serve --config configs/llama-3.2-3b-instruct-qlora.yaml --data my.jsonl
    ollama run <name>

    Each stage is also its own command and works on runs/<name>/.
    """
    _setup_logging(verbose)
    _stop_on_sigterm()


def config_options(func: Callable[..., Any] | None = None, *, extra: dict[str, tuple[str, Any]] | None = None) -> Any:
    """The shared configuration options: a YAML file, --set overrides, and flags for the common keys.

    `extra` maps a parameter name to (dotted config key, click.option) for a command's own flags."""
    if func is None:
        return lambda f: config_options(f, extra=extra)
    extra = extra or {}
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="YAML config file (see configs/)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set train.max_steps=20 (repeatable; a value on several "
                          "lines, such as a system prompt, keeps its line breaks)."),
        click.option("--base-model", help="Hub id, local HF directory, .gguf file, or 'smollm2-135m-instruct'."),
        click.option("--data", help="Training data (JSONL of chat messages), or 'demo'."),
        click.option("--name", help="Run name and Ollama model name."),
        click.option("--quant", help="auto (the default: the smallest of export.auto_quants that passes the quant "
                                     "gate), or comma-separated llama.cpp types, e.g. q4_k_m,q8_0: the first that "
                                     "passes is served."),
        click.option("--max-steps", type=int, help="Optimizer steps."),
        click.option("--engine", type=click.Choice(["auto", "unsloth", "hf"]), help="Training engine."),
        click.option("--ollama-host", envvar="OLLAMA_HOST",
                     help=f"Ollama server URL (env OLLAMA_HOST; default {DEFAULT_OLLAMA_HOST})."),
        click.option("--runs-dir", type=click.Path(file_okay=False),
                     help="Where run directories live (default runs/)."),
        click.option("--ollama-header", "ollama_headers", multiple=True, metavar="'NAME: VALUE'",
                     help="Extra HTTP header for the Ollama host, e.g. 'Authorization: Bearer ${OLLAMA_TOKEN}' "
                          "(repeatable; ${VAR} read from the environment)."),
        click.option("--ollama-ca-cert", type=click.Path(dir_okay=False),
                     help="CA bundle (PEM) for an https Ollama host."),
        click.option("-v", "--verbose", "stage_verbose", count=True,
                     help="More logging on stderr (also accepted before the command)."),
        *[option for _, option in extra.values()],
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(config_path: str | None, overrides: tuple[str, ...], base_model: str | None, data: str | None,
                name: str | None, quant: str | None, max_steps: int | None, engine: str | None,
                ollama_host: str | None, runs_dir: str | None, stage_verbose: int, ollama_headers: tuple[str, ...],
                ollama_ca_cert: str | None, **kwargs: Any) -> Any:
        if stage_verbose:
            _setup_logging(stage_verbose)
        given = {param: (key, kwargs.pop(param)) for param, (key, _) in extra.items()}
        given |= {"ollama_ca_cert": ("ollama.ca_cert", ollama_ca_cert), "base_model": ("base_model", base_model),
                  "data": ("data.train", data), "name": ("name", name), "quant": ("export.quant", quant),
                  "max_steps": ("train.max_steps", max_steps), "engine": ("train.engine", engine),
                  "ollama_host": ("ollama.host", ollama_host), "runs_dir": ("runs_dir", runs_dir)}
        if ollama_headers:
            given["ollama_headers"] = ("ollama.headers", _parse_headers(ollama_headers))
        flags = {key: value for key, value in given.values()}
        file_label = None
        if config_path is None and base_model is None:
            # No config and no base model: the embedded default (demo.yaml) supplies the defaults.
            from .config import demo_config_path

            config_path = str(demo_config_path())
            file_label = "the embedded default config (demo.yaml)"
        cfg = load_config(config_path, overrides, flags, _flag_names(given), file_label)
        return func(cfg=cfg, ollama_explicit=ollama_host is not None, **kwargs)

    return wrapper


def _flag_names(given: dict[str, tuple[str, Any]]) -> dict[str, str]:
    """dotted config key -> the flag (or environment variable) that set it, for error messages."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    names = {}
    for param, (key, _) in given.items():
        option = options.get(param)
        if option is None:
            continue
        from_env = ctx.get_parameter_source(param) == click.core.ParameterSource.ENVIRONMENT
        names[key] = f"${option.envvar}" if from_env and isinstance(option.envvar, str) else max(option.opts, key=len)
    return names


def _parse_headers(items: tuple[str, ...]) -> dict[str, str]:
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r}: expected 'NAME: VALUE'", param_hint="--ollama-header")
        headers[name.strip()] = value.strip()
    return headers


_DIST_FLAGS = {
    "nproc": ("train.nproc", click.option("--nproc", type=int,
                                          help="Training processes on this host (one per GPU); >1 runs torchrun.")),
    "nnodes": ("train.nnodes", click.option("--nnodes", type=int, help="Hosts taking part in training (default 1).")),
    "node_rank": ("train.node_rank", click.option("--node-rank", type=int,
                                                  help="This host's rank among --nnodes (0 writes and serves).")),
    "master_addr": ("train.master_addr", click.option("--master-addr", help="Rank-0 host address (multi-node).")),
    "master_port": ("train.master_port", click.option("--master-port", type=int,
                                                      help="Rank-0 rendezvous port (multi-node, default 29500).")),
    "strategy": ("train.strategy", click.option("--strategy", type=click.Choice(["ddp", "fsdp", "deepspeed"]),
                                                help="Multi-process strategy (default ddp).")),
}
_METHOD_FLAGS = {
    "method": ("train.method", click.option("--method", type=click.Choice(["sft", "dpo", "orpo", "kto", "grpo"]),
                                            help="Training method: sft (default), dpo or orpo (chosen/rejected pairs; "
                                                 "orpo: SFT and preference in one loss, no reference model), kto "
                                                 "(answers labelled good or bad; settings: the preference section) "
                                                 "or grpo (prompts, scored by the reward functions of the grpo "
                                                 "section).")),
    "from_run": ("from_run", click.option("--from-run", metavar="NAME",
                                          help="Train on the merged model of an earlier run in --runs-dir instead of "
                                               "--base-model (SFT, then DPO on it).")),
}
_DEPLOY_FLAGS = {
    "deploy": ("export.deploy", click.option("--deploy", type=click.Choice(["full", "adapter"]),
                                             help="Register the merged model (full) or the base once plus this tune "
                                                  "as a LoRA adapter (adapter).")),
}
_GATE_FLAGS = {
    "min_fidelity": ("verify.min_fidelity", click.option("--min-fidelity", type=float,
                                                         help="Quant gate: least top-1 token agreement with F16 "
                                                              "(default 0.85).")),
}
_DATA_FLAGS = {
    "layout": ("data.format", click.option(
        "--format", "layout",
        type=click.Choice(["auto", "messages", "sharegpt", "alpaca", "pairs", "prompt_completion", "text"]),
        help="Dataset layout (default: detected).")),
    "on_bad_row": ("data.on_bad_row", click.option("--on-bad-row", type=click.Choice(["error", "skip"]),
                                                   help="Stop on a bad row (error) or drop and report it (skip).")),
    "eval_split": ("data.eval_split", click.option("--eval-split", type=float,
                                                   help="Fraction held out for eval, e.g. 0.05.")),
    "eval_file": ("data.eval", click.option("--eval-file", help="Eval data file (same layouts).")),
    "system_prompt": ("data.system_prompt", click.option("--system-prompt",
                                                         help="System prompt for conversations without one.")),
}


def _context(cfg: Any, ollama_explicit: bool, existing: bool = False) -> Any:
    from .pipeline import Context

    ctx = Context.create(cfg, ollama_explicit, existing)
    click.get_current_context().call_on_close(ctx.close)
    return ctx


def _emit(result: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    click.echo(json.dumps(result, indent=2, default=str) if as_json else human(result))


# Set in compose.yaml for the ftdeploy service: the compose service that runs Ollama.
COMPOSE_OLLAMA_SERVICE_ENV = "FTDEPLOY_COMPOSE_OLLAMA_SERVICE"


def _ollama_run_line(name: str, host: str) -> str:
    """The command that talks to the model, for the user to copy: inside the compose container the sidecar has no
    published port, so `OLLAMA_HOST=http://ollama:11434 ollama run` would reach nothing from the host; the command
    that works there runs the sidecar's own `ollama`."""
    import os
    from urllib.parse import urlparse

    service = os.environ.get(COMPOSE_OLLAMA_SERVICE_ENV)
    with contextlib.suppress(ValueError):
        if service and urlparse(host).hostname == service:
            return f"docker compose exec {service} ollama run {name}"
    binary = "ollama" if shutil.which("ollama") else None
    if binary is None:
        from .local_server import find_ollama_binary

        found = find_ollama_binary()
        binary = str(found) if found else "ollama"
    prefix = "" if host.rstrip("/") == DEFAULT_OLLAMA_HOST else f"OLLAMA_HOST={host} "
    return f"{prefix}{binary} run {name}"


# ---------------------------------------------------------------- the whole job


@cli.command("train-and-serve")
@config_options(extra=_DATA_FLAGS | _GATE_FLAGS | _METHOD_FLAGS | _DIST_FLAGS | _DEPLOY_FLAGS)
@click.option("--from", "from_stage", type=click.Choice(STAGE_NAMES), help="Rerun this stage and every one after it.")
@click.option("--force", multiple=True, type=click.Choice(STAGE_NAMES),
              help="Rerun this stage even if unchanged (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_and_serve_cmd(cfg: Any, ollama_explicit: bool, from_stage: str | None, force: tuple[str, ...],
                        as_json: bool) -> None:
    """Run every stage: data, train, merge, export, modelfile, register, verify.

    Rerunning the same command continues where it stopped: finished stages whose inputs are
    unchanged are skipped, and training resumes from its newest checkpoint.
    """
    from .pipeline import train_and_serve

    ctx = _context(cfg, ollama_explicit)
    results = train_and_serve(ctx, on_stage=lambda s: click.echo(f"==> {s}", err=True), from_stage=from_stage,
                              force=force)
    from .results import ExportResult, TrainResult, VerifySummary

    trained = results.get("train")
    if isinstance(trained, TrainResult) and trained.worker_node:
        _emit({"node_rank": cfg.train.node_rank, "world_size": trained.world_size, "done": "train"}, as_json,
              lambda s: f"node {s['node_rank']}: training share done (world size {s['world_size']}); "
                        "node 0 writes the adapter and serves the model")
        return
    host = ctx.client().host
    verify, exported = results["verify"], results["export"]
    assert isinstance(verify, VerifySummary) and isinstance(exported, ExportResult)
    from .report import build_report

    report_md, _ = build_report(ctx.run.path)
    summary = {
        "model": cfg.name, "run_dir": str(ctx.run.path), "ollama_host": host,
        "gguf": exported.gguf[exported.served], "quant": exported.served,
        # Training prompts are compared with the merged model only: no expected answers, so no hits or score.
        "verify": {"hits": verify.hits if verify.prompt_source != "train" else None, "total": verify.total,
                   "score": verify.score if verify.prompt_source != "train" else None, "prompts": verify.prompt_source,
                   "raw": verify.raw,
                   "token_agreement": served.token_agreement if (served := verify.model("served")) else None},
        "ollama_run": _ollama_run_line(cfg.name, host), "report": str(report_md),
    }

    def verified(v: dict[str, Any]) -> str:
        if v["prompts"] == "train":  # no eval rows: served against merged only
            agreement = f"{v['token_agreement']:.0%}" if v["token_agreement"] is not None else "–"
            if v["raw"]:  # raw-text data: prefixes continued through /api/generate raw
                return (f"verified raw continuations on {v['total']} training texts: served = merged on {agreement} "
                        "of greedy steps (no chats, no eval rows; template parity does not apply)")
            return f"served = merged on {agreement} of greedy steps, {v['total']} training prompts (no eval rows)"
        return f"{v['hits']}/{v['total']} expected answers"

    _emit(summary, as_json, lambda s: (
        f"model:   {s['model']}\nserved:  {s['gguf']}\nverify:  {verified(s['verify'])}"
        f"\nreport:  {s['report']}\nrun dir: {s['run_dir']}\n\nTalk to it:\n  {s['ollama_run']}"))


# ---------------------------------------------------------------- single stages


def _stage_command(stage: str, doc: str, extra: dict[str, Any] | None = None) -> None:
    @cli.command(stage, help=doc)
    @config_options(extra=extra)
    @click.option("--json", "as_json", is_flag=True, help="Print the stage's outputs as JSON.")
    def command(cfg: Any, ollama_explicit: bool, as_json: bool) -> None:
        from .pipeline import run_stage

        out = run_stage(_context(cfg, ollama_explicit, existing=True), stage).to_dict()
        _emit(out, as_json, lambda o: "\n".join(f"{k}: {v}" for k, v in o.items() if k != "answers"))


_stage_command("train", "Train a LoRA/QLoRA adapter on the prepared data (engine auto|unsloth|hf; --method "
               "sft|dpo|orpo|kto|grpo; --nproc N for torchrun).", _METHOD_FLAGS | _DIST_FLAGS)
_stage_command("merge", "Merge the adapter into a 16-bit copy of the base model.")
_stage_command("export", "Convert the merged model to GGUF and quantize it (default --quant auto: the smallest type "
               "that passes the quant gate); the quant gate picks the served one.", _GATE_FLAGS | _DEPLOY_FLAGS)
_stage_command("modelfile", "Write the Ollama Modelfile: TEMPLATE from the training chat template, stops, SYSTEM, "
               "num_ctx from the context trained for, and modelfile.parameters.", _DEPLOY_FLAGS)
_stage_command("verify", "Ask the served model the eval prompts (without eval rows, a sample of the training prompts) "
               "at temperature 0 and compare with the merged model; exit 3 when a check fails.", _DEPLOY_FLAGS)


@cli.group("data", cls=FtdeployGroup, invoke_without_command=True)
@config_options(extra=_DATA_FLAGS | _METHOD_FLAGS)
@click.option("--json", "as_json", is_flag=True, help="Print the stage's outputs as JSON.")
@click.pass_context
def data_group(click_ctx: click.Context, cfg: Any, ollama_explicit: bool, as_json: bool) -> None:
    """Validate and tokenize the dataset with the base model's chat template (loss on assistant turns).

    `ftdeploy data [OPTIONS] inspect [DATA]` shows what the model will see, without training.
    """
    click_ctx.obj = cfg
    if click_ctx.invoked_subcommand is not None:
        return
    from .pipeline import run_stage

    out = run_stage(_context(cfg, ollama_explicit), "data").to_dict()

    def human(o: dict[str, Any]) -> str:
        lines = [f"{k}: {v}" for k, v in o.items() if k not in ("sources", "revisions")]
        lines += [f"dataset: {name} at commit {commit}" for name, commit in o.get("revisions", {}).items()]
        return "\n".join([*lines, *_mix_lines(o.get("sources") or [])])

    _emit(out, as_json, human)


def _mix_lines(sources: list[Any]) -> list[str]:
    """A mix's sources (data.sources), one line each: rows read, bad, eval, kept in the mix and share."""
    from .results import SourceMix

    rows = [SourceMix.from_dict(s) if isinstance(s, dict) else s for s in sources]
    if not rows:
        return []
    width = max(len("source"), *(len(r.path) for r in rows))
    lines = [f"mix:      {'source':<{width}}  {'layout':<12} {'read':>7} {'bad':>5} {'eval':>5} {'kept':>7} "
             f"{'share':>6}  weight"]
    for r in rows:
        lines.append(f"          {r.path:<{width}}  {r.layout:<12} {r.rows:>7} {r.bad_rows:>5} {r.eval_rows:>5} "
                     f"{r.kept:>7} {r.share:>6.1%}  {'-' if r.weight is None else f'{r.weight:g}'}"
                     + (f"  (max_rows {r.max_rows})" if r.max_rows else "")
                     + (f"  commit {r.revision[:12]}" if r.revision else ""))
    return lines


@data_group.command("inspect")
@click.argument("data_path", metavar="[DATA]", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print format, rows, bad_rows and token-length statistics as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Where to write the token-length plot (default: the run directory if the run exists, else the "
                   "temp directory).")
@click.pass_obj
def data_inspect(cfg: Any, data_path: str | None, as_json: bool, plot_path: str | None) -> None:
    """Show the detected layout, row counts, token lengths (histogram) and one example as the model sees it.

    Without DATA: the config's data, data.train or the mix of data.sources (each source's rows read, kept and share).
    """
    import tempfile

    from .base_model import resolve_base_model
    from .data import inspect_data
    from .pipeline.preflight import check_data_path
    from .tokenizer import load_tokenizer

    if data_path is not None:
        check_data_path(data_path, data_path)  # a typo, or /dev/zero, is reported before the tokenizer loads
    else:
        from .pipeline.preflight import check_inputs

        check_inputs(cfg, base=False)
    # Inspecting writes no run: the plot goes beside an existing run, never into a new directory.
    if plot_path:
        plot = Path(plot_path)
        plot.parent.mkdir(parents=True, exist_ok=True)
    elif cfg.run_dir.is_dir():
        plot = cfg.run_dir / "data_lengths.png"
    else:
        plot = Path(tempfile.gettempdir()) / f"ftdeploy-{cfg.name.replace('/', '_').replace(':', '_')}-data_lengths.png"
    base = resolve_base_model(cfg.base_model, cfg.trust_remote_code, cfg.base_revision, cfg.given_as("base_model"))
    tokenizer, mapping = load_tokenizer(base, cfg.trust_remote_code, cfg.data.chat_template)
    from .vision import is_vision_model

    if is_vision_model(Path(base)):  # image chats, measured with the base's processor
        from transformers import AutoProcessor

        from .data.image_writer import inspect_vision_data

        processor = AutoProcessor.from_pretrained(str(base), trust_remote_code=cfg.trust_remote_code)
        processor.chat_template = tokenizer.chat_template
        result = inspect_vision_data(cfg.data, data_path, processor, mapping, plot)
    else:
        result = inspect_data(cfg.data, data_path, tokenizer, mapping, plot, cfg.train.method, cfg.train.seed)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    t = result.tokens
    lines = [f"layout:   {result.format}  (chat format {result.chat_format})",
             f"rows:     {result.rows}  bad rows: {result.bad_rows}  truncated: {result.truncated} "
             f"(max_seq_length {result.max_seq_length})"
             + (f"  with tools: {result.tool_rows} ({result.tool_calls} tool calls)" if result.tool_rows else ""),
             *_mix_lines(result.sources or []), *_image_lines(result.images),
             f"tokens:   min {t.min}  mean {t.mean}  p50 {t.p50}  p90 {t.p90}  p99 {t.p99}  max {t.max}",
             "histogram:"]
    peak = max(h.count for h in result.histogram) or 1
    for h in result.histogram:
        bar = "#" * max(1 if h.count else 0, round(40 * h.count / peak))
        lines.append(f"  {h.low:>6}-{h.high:<6} {bar:<40} {h.count}")
    lines += [f"plot:     {result.plot}", f"example ({result.example.source}), trained spans in [[ ]]:",
              result.example.rendered]
    click.echo("\n".join(lines))


def _image_lines(images: Any) -> list[str]:
    """`data inspect`'s lines on a vision base's images."""
    if images is None:
        return []
    per_row = "  ".join(f"{n} image{'s' * (n != '1')}: {rows} rows" for n, rows in images.per_row.items())
    sizes = "  ".join(f"{size} ({count})" for size, count in images.sizes.items())
    return [f"images:   {images.images} in {images.rows_with_images} rows  ({per_row})",
            f"sizes:    smallest {images.smallest}  largest {images.largest}  {sizes}"]


@cli.command("register")
@config_options(extra=_DEPLOY_FLAGS)
@click.option("--gguf", "gguf_path", type=click.Path(dir_okay=False),
              help="Register this GGUF instead of the run's (needs --name).")
@click.option("--json", "as_json", is_flag=True, help="Print model, digest and uploaded_bytes as JSON.")
def register_cmd(cfg: Any, ollama_explicit: bool, gguf_path: str | None, as_json: bool) -> None:
    """Upload the GGUF to Ollama over HTTP and create the model (template, system, parameters)."""
    from .pipeline import run_stage

    if gguf_path is None:
        out = run_stage(_context(cfg, ollama_explicit, existing=True), "register").to_dict()
    else:
        from .chat_template import mapping_for_template, read_gguf_chat_template
        from .ollama import connect
        from .stages.modelfile import build_spec
        from .stages.register import check_gguf, check_gguf_header, register

        path = Path(gguf_path)
        check_gguf_header(path)
        client = connect(cfg.ollama, ollama_explicit)
        check_gguf(path)
        mapping = mapping_for_template(read_gguf_chat_template(path), f"{path} chat template")
        spec = build_spec(mapping, path, cfg.modelfile, cfg.data.system_prompt, {})
        out = register(client, cfg.name, spec).as_dict()
    _emit(out, as_json, lambda o: f"registered {o['model']} ({o['digest'][:19]}…, uploaded {o['uploaded_bytes']} "
                                  f"bytes) at {o['host']}")


@cli.command("push")
@config_options
@click.option("--to", "destination", metavar="HOST/NAMESPACE/NAME[:TAG]",
              help="Registry name to publish as (default: the model's own name, which must then hold a namespace).")
@click.option("--insecure", is_flag=True, help="The registry speaks plain HTTP (a local or in-house registry).")
@click.option("--json", "as_json", is_flag=True, help="Print model, destination and statuses as JSON.")
def push_cmd(cfg: Any, ollama_explicit: bool, destination: str | None, insecure: bool, as_json: bool) -> None:
    """Publish the registered model to a registry through the Ollama server's push API.

    The server does the upload with its own key; `ollama pull DESTINATION` fetches it elsewhere.
    """
    from .config import MODEL_NAME_RE
    from .errors import ConfigError
    from .ollama import connect
    from .stages.register import push

    destination = destination or cfg.name
    if "/" not in destination:
        raise ConfigError(f"--to {destination!r}: a registry name needs a namespace, e.g. myteam/{destination} or "
                          f"registry.example.com/myteam/{destination}")
    host_part, _, rest = destination.partition("/")
    if ("." in host_part or ":" in host_part) and not MODEL_NAME_RE.match(rest):
        raise ConfigError(f"--to {destination!r}: {rest!r} is not a valid namespace/name[:tag]")
    client = connect(cfg.ollama, ollama_explicit)
    result = push(client, cfg.name, destination, insecure)
    _emit(result, as_json, lambda r: f"pushed {r['model']} as {r['destination']} ({r['bytes']} bytes in "
                                     f"{r['layers']} layers)\n\nFetch it elsewhere:\n  ollama pull "
                                     f"{'--insecure ' if insecure else ''}{r['destination']}")


# ---------------------------------------------------------------- environment


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report_cmd(run_dir: str) -> None:
    """Rebuild RUN_DIR/report.md and report.html from the run's manifest."""
    from .report import build_report

    md, page = build_report(Path(run_dir))
    click.echo(f"{md}\n{page}")


@cli.command("doctor")
@click.option("--ollama-host", envvar="OLLAMA_HOST", help="Ollama server URL to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_cmd(ollama_host: str | None, as_json: bool) -> None:
    """Report Python, torch, CUDA, unsloth, the llama.cpp converter and quantizer, and the Ollama server."""
    from .doctor import run_checks

    report = run_checks(ollama_host)
    _emit(report, as_json,
          lambda r: "\n".join(f"{'ok ' if c['ok'] else '-- '} {c['name']:<12} {c['detail']}" for c in r["checks"]))
    if any(c.get("fatal") for c in report["checks"]):  # something answered wrongly: not a missing extra
        click.get_current_context().exit(1)


@cli.group("ollama", cls=FtdeployGroup)
def ollama_group() -> None:
    """Local Ollama: the pinned build ftdeploy starts (status, stop) or the sidecar container (up, down)."""


@ollama_group.command("up")
@click.option("--port", default=11434, show_default=True, help="Loopback port to publish.")
@click.option("--gpu", is_flag=True, help="Give the container the GPUs (NVIDIA Container Toolkit).")
def ollama_up(port: int, gpu: bool) -> None:
    """Start the Ollama sidecar container (the compose one) through the Docker engine."""
    from .sidecar import up

    host = up(port, gpu)
    click.echo(f"Ollama sidecar running at {host} (export OLLAMA_HOST={host})")


@ollama_group.command("down")
@click.option("--remove-models", is_flag=True, help="Also delete the models volume.")
def ollama_down(remove_models: bool) -> None:
    """Stop and remove the Ollama sidecar container."""
    from .sidecar import down

    click.echo("stopped the Ollama sidecar" if down(remove_models) else "no Ollama sidecar container was running")


@ollama_group.command("status")
def ollama_status() -> None:
    """Show the local server ftdeploy started, if any."""
    from .local_server import load_local_server

    server = load_local_server()
    if server is None:
        click.echo("no local Ollama server started by ftdeploy is running")
        return
    click.echo(f"running: pid {server.pid} at {server.host}, models in {server.models_dir}, log {server.log_path}")


@ollama_group.command("stop")
def ollama_stop() -> None:
    """Stop the local server ftdeploy started."""
    from .local_server import forget_local_server, load_local_server

    server = load_local_server()
    if server is None:
        click.echo("no local Ollama server started by ftdeploy is running")
        return
    server.stop()
    forget_local_server()
    click.echo(f"stopped Ollama (pid {server.pid}) at {server.host}")


@cli.command("config")
@config_options
@click.option("--keys", is_flag=True, help="List every config key with its default and help.")
def config_cmd(cfg: Any, ollama_explicit: bool, keys: bool) -> None:
    """Print the resolved configuration (YAML), or every key with --keys."""
    from .config import describe_keys, dump_config

    if keys:
        for key, default, text in describe_keys():
            click.echo(f"{key:<28} {default:<24} {text}")
        return
    click.echo(dump_config(cfg), nl=False)


def main() -> None:
    cli(prog_name="ftdeploy")


if __name__ == "__main__":
    main()
