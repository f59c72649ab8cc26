"""One typed configuration: YAML file, then `--set key=value` overrides, then CLI flags.

The keys are pydantic models in config_models.py: each key's type, default, range (Field ge/gt/le/lt) and help
(Field description, shown by `ftdeploy config --keys`) in one declaration. This module reads and layers the values,
checks what spans several keys, and reports every problem together in a single ConfigError.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import quants
from .defaults import DEMO_BASE_MODEL
from .errors import ConfigError
from .train_auto import base_batch

if TYPE_CHECKING:  # for the type checker; at run time __getattr__ below loads them on first use
    from .config_models import (  # noqa: F401 - the rest of ftdeploy imports them from here
        Config,
        DataConfig,
        ExportConfig,
        GrpoConfig,
        LoraConfig,
        ModelfileConfig,
        OllamaConfig,
        PreferenceConfig,
        TrainConfig,
        VerifyConfig,
        describe_keys,
    )

log = logging.getLogger(__name__)


QUANT_TYPES = quants.NAMES
# Ollama model names: [namespace/]name[:tag], lower-case letters, digits, '_', '-', '.'.
MODEL_NAME_RE = re.compile(
    r"^[a-z0-9][a-z0-9._-]{0,79}(/[a-z0-9][a-z0-9._-]{0,79})?"  # [namespace/]name
    r"(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?$"  # [:tag]
)


_MODELS = {"Config", "DataConfig", "LoraConfig", "TrainConfig", "PreferenceConfig", "GrpoConfig", "ExportConfig",
           "ModelfileConfig", "OllamaConfig", "VerifyConfig", "describe_keys"}


def __getattr__(name: str) -> Any:
    """The models (and describe_keys) load from config_models on first use: importing pydantic would make every
    command, `ftdeploy --help` included, about a fifth of a second slower."""
    if name in _MODELS:
        from . import config_models

        return getattr(config_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- checks across keys


def _semantic_checks(cfg: Config, wrong_type: set[str], errors: list[str]) -> None:
    """What one key's type and range cannot say. A key whose value had the wrong type holds its default here
    (`wrong_type` names it, already reported); a value out of range is kept."""
    if problem := run_name_problem(cfg.name):
        errors.append(f"name: {problem}")
    if cfg.data.train == "":
        errors.append("data.train: empty; give a JSONL (or JSON, CSV, Parquet) file or folder, a Hugging Face dataset "
                      "id, or 'demo'")
    _quant_checks(cfg, errors)
    for key in cfg.data.columns:
        if key not in ("prompt", "response", "system"):
            errors.append(f"data.columns.{key}: unknown column role (prompt, response, system)")
    _sources_checks(cfg, errors)
    _distributed_checks(cfg, wrong_type, errors)
    for name, header in cfg.ollama.headers.items():
        if not isinstance(header, str) or not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", str(name)):
            errors.append(f"ollama.headers.{name}: a header needs a token name and a string value")
    if cfg.export.base_name is not None and (problem := model_name_problem(cfg.export.base_name)):
        errors.append(f"export.base_name: {problem}")
    _modelfile_checks(cfg, errors)
    if cfg.ollama.host is not None and (problem := host_problem(cfg.ollama.host)):
        errors.append(f"ollama.host: {problem}")


def _sources_checks(cfg: Config, errors: list[str]) -> None:
    """data.sources (a mix) replaces data.train, and weighs every source or none."""
    from .defaults import DEMO_DATA

    sources = cfg.data.sources
    if not sources:
        if cfg.data.oversample:
            errors.append("data.oversample: only a mix with weights repeats rows; set data.sources with weights")
        return
    if cfg.data.train != DEMO_DATA:
        errors.append(f"data.sources and data.train ({cfg.data.train}) are both set: give data.train for one dataset "
                      "or data.sources for a mix, not both")
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted and len(weighted) < len(sources):
        unweighted = ", ".join(f"data.sources[{i}] ({s.path})" for i, s in enumerate(sources) if s.weight is None)
        errors.append(f"{unweighted}: no weight, while other sources have one; weigh every source or none")
    if cfg.data.oversample and not weighted:
        errors.append("data.oversample: repeats rows to meet the sources' weights, and no source has a weight")
    for i, source in enumerate(sources):
        if source.path == "":
            errors.append(f"data.sources[{i}].path: empty")
        for key in source.columns or {}:
            if key not in ("prompt", "response", "system"):
                errors.append(f"data.sources[{i}].columns.{key}: unknown column role (prompt, response, system)")


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
        allowed = (*QUANT_TYPES, quants.AUTO) if key == "quant" else QUANT_TYPES
        for i, q in enumerate(value):
            if q.lower() not in allowed:
                errors.append(f"export.{key}[{i}]: unknown quantization type {q!r}; known: {', '.join(allowed)}")
        if not value:
            errors.append(f"export.{key}: give at least one quantization type")
        setattr(cfg.export, key, [q.lower() for q in value])
    if quants.AUTO in cfg.export.quant and len(cfg.export.quant) > 1:
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
    """What goes into the Modelfile must read back unchanged (see modelfile_syntax), and each parameter be one of
    Ollama's with a value of its type (kept as that type: "4096" becomes 4096): checked before any work."""
    from .modelfile_syntax import ModelfileSyntaxError, parameter_name, parameter_value, quote

    texts = {"modelfile.system": cfg.modelfile.system, "data.system_prompt": cfg.data.system_prompt}
    for key, value in list(cfg.modelfile.parameters.items()):
        try:
            value = cfg.modelfile.parameters[key] = parameter_value(parameter_name(str(key)), value)
        except ModelfileSyntaxError as exc:
            errors.append(f"modelfile.parameters.{key}: {exc}")
            continue
        texts[f"modelfile.parameters.{key}"] = str(value) if not isinstance(value, list) else None
        if isinstance(value, list):
            texts |= {f"modelfile.parameters.{key}[{i}]": str(v) for i, v in enumerate(value)}
    for key, value in texts.items():
        if value is not None:
            try:
                quote(value)
            except ModelfileSyntaxError as exc:
                errors.append(f"{key}: the Modelfile cannot carry this value: {exc}")


def _distributed_checks(cfg: Config, wrong_type: set[str], errors: list[str]) -> None:
    t = cfg.train
    if wrong_type & {"train.nproc", "train.nnodes", "train.node_rank", "train.master_port"}:
        return  # already reported
    if t.nproc < 1 or t.nnodes < 1:
        errors.append(f"train.nproc and train.nnodes: must be >= 1, got {t.nproc} and {t.nnodes}")
        return
    if not 0 <= t.node_rank < t.nnodes:
        errors.append(f"train.node_rank: must be in [0, {t.nnodes}) for nnodes={t.nnodes}, got {t.node_rank}")
    if not 0 < t.master_port < 65536:
        errors.append(f"train.master_port: not a TCP port: {t.master_port}")
    world = t.nproc * t.nnodes
    if t.keep_global_batch and not wrong_type & {"train.keep_global_batch", "train.batch_size",
                                                 "train.gradient_accumulation"}:
        try:
            split_global_batch(base_batch(t.batch_size), t.gradient_accumulation, world, keep=True)
        except ConfigError:
            errors.append(
                f"train.gradient_accumulation ({t.gradient_accumulation}) and train.batch_size ({t.batch_size}): "
                f"neither divides by the world size {world} (nproc x nnodes), so the global batch of "
                f"{base_batch(t.batch_size) * t.gradient_accumulation} cannot be kept; change one of them, or set "
                "train.keep_global_batch=false")
    if t.load_in_8bit and t.load_in_4bit and not wrong_type & {"train.load_in_8bit", "train.load_in_4bit"}:
        errors.append("train.load_in_8bit and train.load_in_4bit: pick one (set train.load_in_4bit=false for 8-bit)")
    if world == 1 and t.strategy != "ddp":  # a strategy of the wrong type holds its default, ddp
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
    from .assets import asset

    return asset("demo", "demo.yaml")


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
    base: Config | None = None,
) -> Config:
    """Build the config: YAML file < --set overrides < flags (dotted keys). Raises ConfigError listing all problems,
    each with where its value came from: the file and key, the --set item, or the flag (`flag_names` maps a
    dotted key to the flag that set it; `file_label` names a file the user did not give, e.g. the embedded default).
    `base`: a config built already, in place of the file (the Python API's overrides on a Config)."""
    raw: dict[str, Any] = base.to_dict() if base is not None else {}
    origins: dict[str, str] = dict(base.origins) if base is not None else {}
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
    from .config_models import build

    cfg, errors, wrong_type = build(raw)
    _semantic_checks(cfg, wrong_type, errors)
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
