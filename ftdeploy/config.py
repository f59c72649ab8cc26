"""One typed configuration: YAML file, then `--set key=value` overrides, then CLI flags.

Validated once; every problem is reported together in a single ConfigError.
Each field carries its own help text (shown by `ftdeploy config --help-keys`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import quants
from .errors import ConfigError

log = logging.getLogger(__name__)

_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

DEMO_BASE_MODEL = "smollm2-135m-instruct"
DEMO_DATA = "demo"
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"

QUANT_TYPES = quants.NAMES
# Ollama model names: [namespace/]name[:tag], lower-case letters, digits, '_', '-', '.'.
MODEL_NAME_RE = re.compile(
    r"^[a-z0-9][a-z0-9._-]{0,79}(/[a-z0-9][a-z0-9._-]{0,79})?"  # [namespace/]name
    r"(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?$"  # [:tag]
)


def _help(text: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, **kw: Any) -> Any:
    """A config field: its help text and, for a number, its range (ge/gt/le/lt: >=, >, <=, <), checked with every
    other problem when the config is read."""
    metadata: dict[str, Any] = {"help": text}
    if (ge, gt, le, lt) != (None, None, None, None):
        metadata["range"] = Range(ge, gt, le, lt)
    return field(metadata=metadata, **kw)


@dataclass(frozen=True)
class Range:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        # NaN fails every comparison, so it is never in range; an infinity only where no bound stops it
        return (math.isfinite(value) and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        low = f"[{num(self.ge)}" if self.ge is not None else f"({num(self.gt)}" if self.gt is not None else None
        high = f"{num(self.le)}]" if self.le is not None else f"{num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        return f"{'<=' if self.le is not None else '<'} {high[:-1] if high else ''}"


@dataclass
class DataConfig:
    train: str = _help(
        "Training data: a JSONL file of chat messages, or 'demo' for the bundled demo facts.",
        default=DEMO_DATA,
    )
    eval: str | None = _help(
        "Eval data (same format, each assistant turn is the expected answer); default: the bundled demo eval set with "
        "'demo', else a split of train.",
        default=None,
    )
    eval_split: float | None = _help(
        "Fraction of train held out for eval when no eval file is given (deterministic by seed); 0: hold out "
        "nothing. Unset (the default): data of 200 rows or more holds out 5% of its rows, at most 50, for verify's "
        "reference scoring; smaller data trains on every row, and verify compares the served model with the merged "
        "one on a sample of the training prompts (no reference scoring: that needs eval rows).",
        default=None, ge=0, lt=1,
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "pairs", "prompt_completion", "text"] = _help(
        "Dataset layout (auto: detected from the columns).",
        default="auto",
    )
    columns: dict[str, str] = _help(
        "Column names for other layouts: prompt, response, system (e.g. {prompt: question, response: answer}).",
        default_factory=dict,
    )
    on_bad_row: Literal["error", "skip"] = _help(
        "A bad row stops the run (error) or is dropped and reported (skip).",
        default="error",
    )
    hub_config: str | None = _help("Config name of a Hugging Face dataset id (e.g. v0).", default=None)
    split: str = _help("Split of a Hugging Face dataset id.", default="train")
    packing: bool = _help("Pack short sequences together up to max_seq_length.", default=False)
    system_prompt: str | None = _help("System prompt prepended to every conversation that has none.", default=None)
    chat_template: str | None = _help(
        "A chat template to train and serve with instead of the base model's own (as Axolotl's chat_template and "
        "Unsloth's get_chat_template do): a Jinja file, or `chatml-tools` (ChatML with Qwen2.5's tool-call "
        "layout). For a base without a template, or to train tool calls on one whose template has none. It must "
        "be a format ftdeploy serves (README, chat formats).",
        default=None,
    )
    max_seq_length: int = _help("Longer sequences are truncated (and counted).", default=2048, ge=1, le=1 << 20)
    train_on: Literal["assistant", "all"] = _help(
        "Which tokens carry loss: assistant turns only, or every token.",
        default="assistant",
    )
    max_row_bytes: int = _help(
        "Largest row accepted, in bytes of text (UTF-8, all its fields): a longer row is a bad row, refused before "
        "it is tokenized (a 30 MB row would cost a minute and gigabytes to tokenize). The default, 1 MiB, is about "
        "250k tokens, far beyond max_seq_length; raise it for longer rows. 0: no limit.",
        default=1 << 20, ge=0,
    )


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", default=16, ge=1, le=4096)
    alpha: int = _help("LoRA alpha (scale = alpha / r).", default=16, ge=1)
    dropout: float = _help("LoRA dropout (the share of inputs zeroed).", default=0.0, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = _help("Which biases train.", default="none")
    target_modules: list[str] = _help(
        "Projections that get adapters.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


@dataclass
class TrainConfig:
    engine: Literal["auto", "unsloth", "hf"] = _help(
        "auto: unsloth when CUDA and unsloth are present, else hf (transformers + PEFT + TRL).",
        default="auto",
    )
    max_steps: int = _help("Optimizer steps (overrides epochs when > 0).", default=60, ge=0)
    epochs: float = _help("Epochs, used when max_steps is 0.", default=1.0, gt=0)
    learning_rate: float = _help("Peak learning rate.", default=2e-4, gt=0, lt=1)
    batch_size: int = _help("Per-device batch size.", default=2, ge=1)
    gradient_accumulation: int = _help("Gradient accumulation steps.", default=4, ge=1)
    warmup_steps: int = _help("Linear warm-up steps.", default=5, ge=0)
    weight_decay: float = _help("Weight decay.", default=0.01, ge=0, le=1)
    lr_scheduler: str = _help("Learning-rate schedule (transformers name).", default="linear")
    optim: str = _help("Optimizer; auto: adamw_8bit on CUDA, adamw_torch on CPU.", default="auto")
    seed: int = _help("Random seed.", default=3407, ge=0, le=2**32 - 1)
    load_in_4bit: bool = _help("QLoRA: load the base in 4-bit NF4 (CUDA only; ignored on CPU).", default=True)
    load_in_8bit: bool = _help(
        "Load the base in 8-bit (bitsandbytes LLM.int8, CUDA only) instead of 4-bit; set load_in_4bit false with it.",
        default=False,
    )
    gradient_checkpointing: bool = _help("Trade compute for memory.", default=True)
    logging_steps: int = _help("Log loss every N steps.", default=1, ge=1)
    save_steps: int = _help(
        "Checkpoint every N steps (0: never); a rerun after a crash resumes from the newest.",
        default=50, ge=0,
    )
    nproc: int = _help(
        "Training processes on this host (one per GPU); above 1, training runs under torch's distributed launcher "
        "(torchrun).",
        default=1,
    )
    nnodes: int = _help(
        "Hosts taking part in training; each runs the same command with its own --node-rank.",
        default=1,
    )
    node_rank: int = _help(
        "This host's rank among nnodes (0 writes the adapter and goes on to merge, export and register).",
        default=0,
    )
    master_addr: str = _help(
        "Address of the rank-0 host, reachable from every node (multi-node only).",
        default="127.0.0.1",
    )
    master_port: int = _help(
        "Rendezvous port on the rank-0 host (multi-node only; one host picks a free port).",
        default=29500,
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = _help(
        "Multi-process strategy: ddp (a full copy per GPU), fsdp (sharded, hf engine), deepspeed (ZeRO-3, hf engine).",
        default="ddp",
    )
    deepspeed_config: str | None = _help(
        "DeepSpeed JSON for strategy=deepspeed (default: the bundled ZeRO-3 config).",
        default=None,
    )
    keep_global_batch: bool = _help(
        "With several processes keep batch_size x gradient_accumulation as the global batch (accumulation is divided "
        "by the world size), so a config trains the same on 1 or N GPUs; false: each process takes the whole batch "
        "(global batch grows with N, as in Axolotl).",
        default=True,
    )


@dataclass
class ExportConfig:
    quant: list[str] = _help(
        "llama.cpp quantization types; the first that passes the quant gate (verify.min_fidelity) is served, the "
        "others are registered under their own tags. `auto`: measure the export.auto_quants types, smallest first, "
        "and serve the first that passes (the unquantized outtype when none does).",
        default_factory=lambda: ["auto"],
    )
    auto_quants: list[str] = _help(
        "The types `quant: auto` measures with the quant gate, tried smallest first.",
        default_factory=lambda: ["q4_k_m", "q5_k_m", "q6_k", "q8_0"],
    )
    outtype: Literal["f16", "bf16", "f32"] = _help(
        "Type of the unquantized GGUF the quants are made from.",
        default="f16",
    )
    deploy: Literal["full", "adapter"] = _help(
        "full: register the merged model; adapter: register the base once and each tune as a LoRA adapter on it "
        "(Ollama ADAPTER), uploading megabytes per tune.",
        default="full",
    )
    base_name: str | None = _help(
        "Ollama name of the base model for deploy=adapter (default: ftdeploy-base-<base>:<quant>).",
        default=None,
    )


@dataclass
class ModelfileConfig:
    system: str | None = _help(
        "SYSTEM in the Modelfile (default: data.system_prompt, else the chat template's own default).",
        default=None,
    )
    parameters: dict[str, Any] = _help(
        "Extra PARAMETER lines (e.g. num_ctx: 4096); override the generation-config defaults.",
        default_factory=dict,
    )


# Seconds; OllamaClient's defaults too. No Ollama call waits without a bound.
OLLAMA_CONNECT_TIMEOUT, OLLAMA_TIMEOUT, OLLAMA_LONG_TIMEOUT = 5.0, 60.0, 600.0


@dataclass
class OllamaConfig:
    host: str | None = _help(f"Ollama server URL; default $OLLAMA_HOST, else {DEFAULT_OLLAMA_HOST}.", default=None)
    start_local: bool = _help(
        "When no server answers at the default address, start the pinned local build on loopback.",
        default=True,
    )
    connect_timeout: float = _help(
        "Seconds to wait for the connection to the Ollama server (TCP connect, and the TLS handshake with https); a "
        "host not connected in this time cannot be reached.",
        default=OLLAMA_CONNECT_TIMEOUT, gt=0, lt=1e6,
    )
    timeout: float = _help(
        "Seconds an ordinary Ollama call (version, blob check, show, list, copy, delete) waits for the server's answer "
        "once connected; a server that accepted the connection and says nothing for this long has stopped answering, "
        "and the call fails.",
        default=OLLAMA_TIMEOUT, gt=0, lt=1e6,
    )
    long_timeout: float = _help(
        "Seconds the slow Ollama calls (blob upload, create, push, generate and chat, which may load the model first) "
        "wait for the server's next bytes. It bounds each silence, not the whole call: a progress stream runs on while "
        "lines keep coming, and an upload fails when the server stops taking it for this long.",
        default=OLLAMA_LONG_TIMEOUT, gt=0, lt=1e6,
    )
    headers: dict[str, str] = _help(
        "Extra HTTP headers for every request, e.g. {Authorization: 'Bearer ${OLLAMA_TOKEN}'} for a reverse proxy; "
        "${VAR} is read from the environment when sent and never written to the run directory.",
        default_factory=dict,
    )
    ca_cert: str | None = _help(
        "CA bundle (PEM) that signs an https Ollama host's certificate (default: the system's).",
        default=None,
    )
    insecure_tls: bool = _help("Do not verify the https host's certificate (testing only).", default=False)


@dataclass
class VerifyConfig:
    min_agreement: float = _help(
        "The default gate, per served quant: least share of greedy steps at which it picks the merged 16-bit model's "
        "token (the stop counted as one), counted along each eval answer up to its first difference.",
        default=0.7, ge=0, le=1,
    )
    min_score: float = _help(
        "Least share of the eval rows carrying `expect` whose expected answer must come back (rows without `expect` "
        "are scored against their reference, not gated).",
        default=0.8, ge=0, le=1,
    )
    min_chrf: float | None = _help(
        "Least chrF (0-100) of the served answers against the eval references; not gated unless set.",
        default=None, ge=0, le=100,
    )
    max_tokens: int = _help(
        "Generation limit per eval answer; 0: 1.5 x the longest eval reference in tokens, plus 8.",
        default=0, ge=0,
    )
    limit: int = _help("At most this many eval prompts (0: all).", default=0, ge=0)
    train_prompts: int = _help(
        "With no eval rows: how many training prompts (a sample, fixed by train.seed) the served model is compared "
        "with the merged model on; the data stage keeps a sample of 32 for it.",
        default=8, ge=1, le=32,
    )
    min_fidelity: float = _help(
        "Quant gate: least top-1 token agreement of a quant with its F16 on the eval chats; below it a quant is "
        "flagged and never served by default.",
        default=0.85, ge=0, le=1,
    )
    compare: bool = _help(
        "Also answer the eval and general-knowledge prompts with the base model (transformers): the report's base "
        "column and the forgetting check.",
        default=True,
    )


@dataclass
class Config:
    name: str = _help("Run name; also the Ollama model name.", default="ftdeploy-demo")
    base_model: str = _help(
        "Hub id, local HF directory, .gguf file, or 'smollm2-135m-instruct' (embedded).",
        default=DEMO_BASE_MODEL,
    )
    runs_dir: str = _help("Where run directories live.", default="runs")
    base_revision: str | None = _help(
        "Hub revision (branch, tag or commit) of base_model; the commit used is recorded.",
        default=None,
    )
    trust_remote_code: bool = _help(
        "Allow model code from the hub (off unless asked for; the commit is recorded).",
        default=False,
    )
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    modelfile: ModelfileConfig = field(default_factory=ModelfileConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # Where each given key's value came from (a flag, a file and key, a --set item), for messages; not a config key,
    # never written.
    origins: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def given_as(self, key: str) -> str:
        """A (dotted) key and its value as the user gave it, for a message: `--base-model X` when a flag set it,
        `base_model X [from my.yaml, key base_model]` when a file or --set did, `base_model X` for a default."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        origin = self.origins.get(key)
        if origin is None:
            return f"{key} {value}"
        if origin.startswith("--") and not origin.startswith("--set "):
            return f"{origin} {value}"
        return f"{key} {value} [from {origin}]"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "origins"}


# ---------------------------------------------------------------- building and checking


def _check_value(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Return `value` coerced to `tp`, or append a message to `errors`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # "a,b" from a flag or --set
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_check_value(v, args[0], f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads `2e-4`, with no dot, as a string; every trainer's docs write it that way.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]  # Config.origins is no key
    known = {f.name for f in fields}
    for key in raw:
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            errors.append(f"{prefix}{key}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in raw:
            continue
        tp = hints[f.name]
        value = raw[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{prefix}{f.name}: expected a mapping of {tp.__name__} keys, got {value!r}")
                continue
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.", errors)
        else:
            kwargs[f.name] = _check_value(value, tp, f"{prefix}{f.name}", errors)
            bounds = f.metadata.get("range")
            checked = kwargs[f.name]
            if bounds and isinstance(checked, (int, float)) and not isinstance(checked, bool):
                if not bounds.contains(checked):
                    errors.append(f"{prefix}{f.name}: must be {bounds}, got {checked}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable with errors already recorded
        errors.append(f"{prefix.rstrip('.') or 'config'}: {exc}")
        return cls()


def _semantic_checks(cfg: Config, errors: list[str]) -> None:
    if isinstance(cfg.name, str) and (problem := run_name_problem(cfg.name)):
        errors.append(f"name: {problem}")
    if cfg.data.train == "":
        errors.append("data.train: empty; give a JSONL (or JSON, CSV, Parquet) file or folder, a Hugging Face dataset "
                      "id, or 'demo'")
    _quant_checks(cfg, errors)
    if isinstance(cfg.data.columns, dict):
        for key in cfg.data.columns:
            if key not in ("prompt", "response", "system"):
                errors.append(f"data.columns.{key}: unknown column role (prompt, response, system)")
    _distributed_checks(cfg, errors)
    if isinstance(cfg.ollama.headers, dict):
        for name, header in cfg.ollama.headers.items():
            if not isinstance(header, str) or not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", str(name)):
                errors.append(f"ollama.headers.{name}: a header needs a token name and a string value")
    if isinstance(cfg.export.base_name, str) and (problem := model_name_problem(cfg.export.base_name)):
        errors.append(f"export.base_name: {problem}")
    _modelfile_checks(cfg, errors)
    host = cfg.ollama.host
    if host is not None and isinstance(host, str) and (problem := host_problem(host)):
        errors.append(f"ollama.host: {problem}")


def host_problem(host: str) -> str | None:
    """Why `host` is not an Ollama server address (OLLAMA_HOST style: a URL, host:port or a bare host), or None."""
    from urllib.parse import urlparse

    host_re = r"^(https?://)?[\w.\-\[\]:]+(:\d+)?(/[\w.\-/~%]*)?$"
    try:
        parsed = urlparse(host if "://" in host else f"http://{host}")
        parsed.port  # noqa: B018 - reading it checks it: a port that is no number, or out of range, raises
        valid = bool(re.match(host_re, host)) and bool(parsed.hostname)
    except ValueError:  # an unclosed [IPv6 bracket, a port out of range
        valid = False
    return None if valid else f"{host!r} is not a host URL like http://127.0.0.1:11434 or http://[::1]:11434"


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run: it is one folder under runs_dir and the Ollama model name, so an Ollama name
    without a namespace (a '/' would put this run inside another run's folder)."""
    if "/" in name:
        flat = name.replace("/", "-")
        return (f"{name!r}: a run name is one folder under runs_dir, with no namespace/ (this one would be made inside "
                f"the folder of run {name.split('/')[0]!r}); use {flat!r}, and publish it under a namespace with "
                f"`ftdeploy push --name {flat} --to {name}`")
    return model_name_problem(name)


def _quant_checks(cfg: Config, errors: list[str]) -> None:
    for key in ("quant", "auto_quants"):
        value = getattr(cfg.export, key)
        if not isinstance(value, list):
            continue
        allowed = (*QUANT_TYPES, quants.AUTO) if key == "quant" else QUANT_TYPES
        for i, q in enumerate(value):
            if isinstance(q, str) and q.lower() not in allowed:
                errors.append(f"export.{key}[{i}]: unknown quantization type {q!r}; known: {', '.join(allowed)}")
        if not value:
            errors.append(f"export.{key}: give at least one quantization type")
        setattr(cfg.export, key, [q.lower() for q in value if isinstance(q, str)])
    if isinstance(cfg.export.quant, list) and quants.AUTO in cfg.export.quant and len(cfg.export.quant) > 1:
        errors.append(f"export.quant: `auto` chooses the type itself and takes no others (got "
                      f"{','.join(cfg.export.quant)}); list the candidates in export.auto_quants")


def model_name_problem(name: str) -> str | None:
    """Why `name` is not an Ollama model name (too long, or which characters), or None when it is one."""
    shown = name if len(name) <= 60 else f"{name[:40]}…({len(name)} characters)"
    body, _, tag = name.partition(":")
    parts = body.split("/")
    if len(parts) > 2:
        return f"{shown!r} is not a valid Ollama model name: at most one namespace/ before the name"
    for part, limit, what in [*((p, 80, "a namespace or name part") for p in parts), (tag, 128, "the :tag")]:
        if len(part) > limit:
            return (f"{shown!r} is too long for an Ollama model name: {what} may have at most {limit} characters, "
                    f"this one has {len(part)}")
    if not MODEL_NAME_RE.match(name):
        return (f"{shown!r} is not a valid Ollama model name (lower-case letters, digits, '.', '_', '-', starting with "
                "a letter or digit; optional namespace/ and :tag)")
    return None


def _modelfile_checks(cfg: Config, errors: list[str]) -> None:
    """What goes into the Modelfile must read back unchanged (see modelfile_syntax): checked before any work."""
    from .modelfile_syntax import ModelfileSyntaxError, parameter_name, quote

    texts = {"modelfile.system": cfg.modelfile.system, "data.system_prompt": cfg.data.system_prompt}
    params = cfg.modelfile.parameters if isinstance(cfg.modelfile.parameters, dict) else {}
    for key, value in params.items():
        try:
            parameter_name(str(key))
        except ModelfileSyntaxError as exc:
            errors.append(f"modelfile.parameters.{key}: {exc}")
            continue
        texts[f"modelfile.parameters.{key}"] = str(value) if not isinstance(value, list) else None
        if isinstance(value, list):
            texts |= {f"modelfile.parameters.{key}[{i}]": str(v) for i, v in enumerate(value)}
    for key, value in texts.items():
        if isinstance(value, str):
            try:
                quote(value)
            except ModelfileSyntaxError as exc:
                errors.append(f"{key}: the Modelfile cannot carry this value: {exc}")


def _distributed_checks(cfg: Config, errors: list[str]) -> None:
    t = cfg.train
    ints = {"train.nproc": t.nproc, "train.nnodes": t.nnodes, "train.node_rank": t.node_rank,
            "train.master_port": t.master_port}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        return  # already reported as type errors
    if t.nproc < 1 or t.nnodes < 1:
        errors.append(f"train.nproc and train.nnodes: must be >= 1, got {t.nproc} and {t.nnodes}")
        return
    if not 0 <= t.node_rank < t.nnodes:
        errors.append(f"train.node_rank: must be in [0, {t.nnodes}) for nnodes={t.nnodes}, got {t.node_rank}")
    if not 0 < t.master_port < 65536:
        errors.append(f"train.master_port: not a TCP port: {t.master_port}")
    world = t.nproc * t.nnodes
    if t.keep_global_batch is True and isinstance(t.batch_size, int) and isinstance(t.gradient_accumulation, int):
        try:
            split_global_batch(t.batch_size, t.gradient_accumulation, world, keep=True)
        except ConfigError:
            errors.append(
                f"train.gradient_accumulation ({t.gradient_accumulation}) and train.batch_size ({t.batch_size}): "
                f"neither divides by the world size {world} (nproc x nnodes), so the global batch of "
                f"{t.batch_size * t.gradient_accumulation} cannot be kept; change one of them, or set "
                "train.keep_global_batch=false")
    if t.load_in_8bit is True and t.load_in_4bit is True:
        errors.append("train.load_in_8bit and train.load_in_4bit: pick one (set train.load_in_4bit=false for 8-bit)")
    if world == 1 and t.strategy != "ddp":
        errors.append(f"train.strategy: {t.strategy} needs several processes (--nproc)")


def split_global_batch(batch_size: int, accumulation: int, world: int, keep: bool) -> tuple[int, int]:
    """Per-process (batch_size, gradient_accumulation) for `world` processes.

    keep: the global batch stays batch_size x accumulation (accumulation divided first, so the micro-batch,
    and with it padding and memory, stays as configured)."""
    if world <= 1 or not keep:
        return batch_size, accumulation
    if accumulation % world == 0:
        return batch_size, accumulation // world
    if batch_size % world == 0:
        return batch_size // world, accumulation
    raise ConfigError(
        f"batch_size {batch_size} x gradient_accumulation {accumulation} cannot be split over {world} processes")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A Config from `Config.to_dict()` output (how a distributed worker receives it); checked like a file."""
    return _validated(raw, "")


def demo_config_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("ftdeploy.demo").joinpath("demo.yaml")))


def parse_set(item: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (["train", "max_steps"], 20); values are YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=20")
    key, _, text = item.partition("=")
    try:
        value = _load_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and "\n" in text.strip() and "\n" not in value:
        # YAML folds the lines of a scalar into one; a value written on several lines (a system prompt) means them.
        if text.lstrip()[:1] in ("'", '"'):
            log.warning("--set %s: YAML folds the line breaks inside a quoted value into spaces; leave the value "
                        "unquoted to keep them, or use \\n inside double quotes", key.strip())
        else:
            value = text
    return [k for k in key.strip().split(".") if k], value


def _assign(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys += _leaf_keys(value, dotted + ".") if isinstance(value, dict) and value else [dotted]
    return keys


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
    flag_names: dict[str, str] | None = None,
    file_label: str | None = None,
) -> Config:
    """Build the config: YAML file < --set overrides < flags (dotted keys). Raises ConfigError listing all problems,
    each with where its value came from: the file and key, the --set item, or the flag (`flag_names` maps a
    dotted key to the flag that set it; `file_label` names a file the user did not give, e.g. the embedded default)."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = _load_yaml(_read_config_file(p))
        except _TooComplex as exc:
            raise ConfigError(f"{p}: refused: {exc}; a config is a small mapping of keys") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if loaded is None or loaded == {}:
            log.warning("%s is empty: every key takes its default, which is the embedded demo (base model %s, the "
                        "demo data)", file_label or p, DEMO_BASE_MODEL)
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
        raw = loaded
        origins |= {key: f"{file_label or p}, key {key}" for key in _leaf_keys(raw)}
    for item in overrides:
        keys, value = parse_set(item)
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key")
        _assign(raw, keys, value)
        origins[".".join(keys)] = f"--set {item}"
    for dotted, value in (flags or {}).items():
        if value is not None:
            _assign(raw, dotted.split("."), value)
            origins[dotted] = (flag_names or {}).get(dotted, dotted)
    cfg = _validated(raw, "", origins)
    cfg.origins = origins
    return cfg


MAX_CONFIG_BYTES = 1 << 20
# After aliases are expanded, and how deep: a config has a few hundred nodes, a few levels deep. Past these bounds
# a YAML file is an alias bomb ("billion laughs": minutes and gigabytes) or nested past Python's recursion limit.
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 64


class _TooComplex(yaml.YAMLError):
    """A YAML document past MAX_YAML_NODES (aliases expanded) or MAX_YAML_DEPTH."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document bigger or deeper than a config can be before it is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooComplex(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes as the loaded data would hold them, each alias as a copy of its anchor (in linear time, each
    anchor counted once); raise _TooComplex past MAX_YAML_NODES or on an alias inside its own anchor."""
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise _TooComplex(f"it holds more than {MAX_YAML_NODES} values once its aliases (*name) are expanded")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _TooComplex("an alias (*name) refers to the anchor it is inside of")
        open_nodes.add(key)
        stack.append((node, True))
        stack += [(child, False) for child in children(node) if id(child) not in sizes]


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader with bounds


def _read_config_file(path: Path) -> str:
    """The text of a config file; what is not a readable UTF-8 regular file of a config's size is named."""
    import stat

    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    kind = next((what for test, what in kinds.items() if test(info.st_mode)), None)
    if kind is not None or not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"--config {path}: {kind or 'not a regular file'}, not a YAML file; give a config file "
                          "(see configs/)")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: {info.st_size} bytes; a config is a small YAML file (at most "
                          f"{MAX_CONFIG_BYTES >> 20} MiB)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None


_ERROR_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*")


def _with_origin(error: str, origins: dict[str, str]) -> str:
    """`error` ("key: problem") followed by where the key's value came from, when it was given anywhere."""
    head = error.split(": ", 1)[0]
    found = []
    for key in _ERROR_KEY.findall(head):
        # the key itself, or the mapping or list that holds it (modelfile.parameters.x from a whole mapping)
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            origin = origins.get(".".join(parts[:n]))
            if origin is None:
                origin = None
                if n == len(parts):
                    origin = next((o for k, o in origins.items() if k.startswith(key + ".")), None)
            if origin:
                found.append(origin)
                break
    found = list(dict.fromkeys(found))
    return f"{error}  [from {'; '.join(found)}]" if found else error


def _validated(raw: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> Config:
    """Build and check a Config from raw keys; every problem in one ConfigError."""
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    _semantic_checks(cfg, errors)
    if errors and origins:
        errors = [_with_origin(e, origins) for e in errors]
    if errors:
        count = f"{len(errors)} problem{'s' * (len(errors) > 1)}"
        raise ConfigError(f"invalid configuration{source} ({count}):\n  " + "\n  ".join(errors))
    return cfg


ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def redacted(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be written to disk: header values other than ${VAR} references are secrets."""
    headers = cfg_dict.get("ollama", {}).get("headers") or {}
    def shown(v: Any) -> bool:  # only $VAR references and a scheme word: nothing secret
        return isinstance(v, str) and ENV_REF_RE.sub("", v).strip() in ("", "Bearer", "Basic", "Token")

    safe = {k: v if shown(v) else "<redacted>" for k, v in headers.items()}
    return {**cfg_dict, "ollama": {**cfg_dict.get("ollama", {}), "headers": safe}}


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False)


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, for `--help-keys` and the docs."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        bounds = f.metadata.get("range")
        text = f.metadata.get("help", "") + (f" Must be {bounds}." if bounds else "")
        rows.append((prefix + f.name, repr(default), text))
    return rows
