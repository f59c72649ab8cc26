"""Modelfile stage: FROM, TEMPLATE (derived from the training chat template), stops, SYSTEM, parameters.

Works without torch: the TEMPLATE and stops come from the format of the training chat template, read from the
merged model's tokenizer files (or from a GGUF's metadata) and rendered with jinja2 (ftdeploy/chat_template.py).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelfileConfig
from ..errors import TemplateError
from ..modelfile_syntax import ModelfileSyntaxError, parameter_name, parameter_value, parse, quote
from ..runs import atomic_write_text
from ..templates import TemplateMapping

log = logging.getLogger(__name__)

# generation_config.json key -> Ollama PARAMETER
_GENERATION_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                      "repetition_penalty": "repeat_penalty", "min_p": "min_p"}
# num_ctx is rounded up to this: llama.cpp, which Ollama 0.17.4 runs, pads the context it allocates to a multiple of
# 256 (llama-context.cpp: GGML_PAD(n_ctx, 256)), so any num_ctx costs the KV memory of the next multiple of 256 and
# rounding up to it gives the tokens that memory holds; a power of two would cost up to twice the memory.
CONTEXT_MULTIPLE = 256
# Ollama 0.17.4's smallest default num_ctx (a CPU, or a GPU under 24 GiB; 32768 and 262144 on larger GPUs): a model
# trained on shorter rows is still served at least this much, so it never gets less context than a plain `ollama
# create` of its base would: the base's longer context survives a LoRA tune on short rows.
OLLAMA_MIN_NUM_CTX = 4096


@dataclass
class ModelfileSpec:
    """Everything `ollama create` needs besides the weights."""

    gguf: str
    template: str
    stops: list[str]
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    chat_format: str = ""
    base_name: str | None = None  # deploy=adapter: FROM this registered base
    adapter: str | None = None  # deploy=adapter: the PEFT adapter directory (ADAPTER)

    def ollama_parameters(self) -> dict[str, Any]:
        return {**self.parameters, "stop": list(self.stops)}

    def commands(self, from_path: str | None = None) -> list[tuple[str, str]]:
        """The Modelfile as (command, argument) pairs, as Ollama's parser reads them back."""
        if self.adapter:
            out = [("model", str(self.base_name)), ("adapter", from_path or self.adapter)]
        else:
            out = [("model", from_path or self.gguf)]
        out.append(("template", self.template))
        if self.system is not None:
            out.append(("system", self.system))
        out += [("stop", s) for s in self.stops]
        for key, value in self.parameters.items():
            out += [(key, _param_value(v)) for v in (value if isinstance(value, list) else [value])]
        return out

    def render(self, from_path: str | None = None) -> str:
        """The Modelfile text. Every value is quoted so that Ollama reads it back unchanged (the text
        is parsed back to prove it); a value no quoting can carry is a TemplateError naming it."""
        lines: list[str] = []
        for command, arg in self.commands(from_path):
            try:
                if command in ("model", "adapter"):
                    lines.append(f"{'FROM' if command == 'model' else 'ADAPTER'} {quote(arg, 'bare')}")
                elif command in ("template", "system"):
                    lines += ["", f"{command.upper()} {quote(arg, 'block')}"]
                else:
                    style = "bare" if _PLAIN_VALUE.fullmatch(arg) else "inline"
                    lines.append(f"PARAMETER {parameter_name(command)} {quote(arg, style)}")
            except ModelfileSyntaxError as exc:
                named = command in ("model", "adapter", "template", "system")
                what = command.upper() if named else f"PARAMETER {command}"
                raise TemplateError(
                    f"the Modelfile cannot carry this {what} value: {exc}. Value: {arg[:200]!r}") from None
        text = "\n".join(lines) + "\n"
        if parse(text) != self.commands(from_path):  # a guard on quote(): never write what reads back otherwise
            raise TemplateError(
                "the Modelfile would not read back as written; this is a bug in ftdeploy, please report it")
        return text

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelfileSpec:
        return cls(**json.loads(text))


_PLAIN_VALUE = re.compile(r"-?[0-9][0-9.eE+-]*|true|false")  # numbers and booleans go unquoted


def _param_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling PARAMETERs from generation_config.json, when the model sets them."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    gen = json.loads(path.read_text())
    if gen.get("do_sample") is False:
        return {}
    return {ollama: gen[key] for key, ollama in _GENERATION_PARAMS.items() if gen.get(key) is not None}


def trained_num_ctx(longest: int, max_seq_length: int, base_max: int | None) -> int:
    """The context a model was trained for, as num_ctx: the longest trained sequence, at least the max_seq_length it
    was prepared with, rounded up to a multiple of CONTEXT_MULTIPLE, at least OLLAMA_MIN_NUM_CTX, and never above the
    base's maximum (where known: Ollama itself cuts num_ctx to it)."""
    wanted = max(longest, max_seq_length, OLLAMA_MIN_NUM_CTX)
    rounded = -(-wanted // CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE
    return min(rounded, base_max) if base_max else rounded


def base_context_length(gguf_path: Path, model_dir: Path | None = None) -> int | None:
    """The longest context the model takes: the GGUF's `<architecture>.context_length` (what Ollama reads), else the
    model directory's config.json `max_position_embeddings` (or its text_config's); None where neither says."""
    from ..chat_template import gguf_metadata

    try:
        arch = gguf_metadata(gguf_path, ("general.architecture",)).get("general.architecture")
        value = gguf_metadata(gguf_path, (f"{arch}.context_length",)).get(f"{arch}.context_length") if arch else None
    except (OSError, TemplateError):
        value = None
    if not value and model_dir is not None and (config_path := model_dir / "config.json").is_file():
        config = json.loads(config_path.read_text())
        value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def build_spec(mapping: TemplateMapping, gguf_path: Path, cfg: ModelfileConfig, system_prompt: str | None,
               sampling: dict[str, Any], num_ctx: int | None = None) -> ModelfileSpec:
    """The Modelfile of a model served with `mapping`'s TEMPLATE and stops: the generation config's `sampling`,
    then `num_ctx` (the trained context), then the user's modelfile.parameters, each later one winning (a `stop` of
    the user's adds to the template's stops)."""
    system = cfg.system if cfg.system is not None else system_prompt
    if system is None:
        system = mapping.default_system
    if system and not mapping.trained_system:
        log.warning("the %s chat template takes no system prompt; Ollama will write SYSTEM %r into the first user "
                    "turn, as Gemma 3 does, a layout this model was not trained on", mapping.format.name, system[:60])
    user = {str(k): parameter_value(str(k), v) for k, v in cfg.parameters.items()}  # checked with the config
    parameters = {**sampling, **({"num_ctx": num_ctx} if num_ctx else {}), **user}
    stops = list(dict.fromkeys([*mapping.format.stops, *parameters.pop("stop", [])]))
    return ModelfileSpec(gguf=str(gguf_path), template=mapping.ollama_template(), stops=stops, system=system,
                         parameters=parameters, chat_format=mapping.format.name)


def write_modelfile(spec: ModelfileSpec, path: Path) -> Path:
    """Write the Modelfile (FROM relative to its directory) and modelfile.json beside it."""
    target = Path(spec.adapter or spec.gguf)
    try:
        from_path = "./" + str(target.resolve().relative_to(path.parent.resolve()))
    except ValueError:
        from_path = str(target)
    atomic_write_text(path.parent / "modelfile.json", spec.to_json())
    atomic_write_text(path, spec.render(from_path))
    return path
