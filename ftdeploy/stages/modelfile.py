"""Modelfile stage: FROM, TEMPLATE (derived from the training chat template), stops, SYSTEM, parameters.

Works without torch: the chat template is read from the merged model's tokenizer files (or
from a GGUF's metadata) and rendered with jinja2.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelfileConfig
from ..errors import StageMissingError, TemplateError
from ..modelfile_syntax import ModelfileSyntaxError, parameter_name, parse, quote
from ..runs import atomic_write_text
from ..templates import TemplateMapping, jinja_renderer, match_chat_template

log = logging.getLogger(__name__)

# generation_config.json key -> Ollama PARAMETER
_GENERATION_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                      "repetition_penalty": "repeat_penalty", "min_p": "min_p"}


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


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def read_chat_template(model_dir: Path) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) from a Hugging Face directory's tokenizer files."""
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise StageMissingError(f"{model_dir}: no tokenizer_config.json (is this a merged model directory?)")
    tok_cfg = json.loads(cfg_path.read_text())
    template = tok_cfg.get("chat_template")
    jinja_file = model_dir / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text()
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise TemplateError(f"{model_dir}: the tokenizer has no chat template")
    special = {}
    special_path = model_dir / "special_tokens_map.json"
    if special_path.is_file():
        special = json.loads(special_path.read_text())
    bos = _token_text(tok_cfg.get("bos_token") or special.get("bos_token"))
    eos = _token_text(tok_cfg.get("eos_token") or special.get("eos_token"))
    return template, bos, eos


def read_gguf_chat_template(gguf_path: Path) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) from a GGUF's metadata."""
    meta = gguf_metadata(gguf_path, ("tokenizer.chat_template", "tokenizer.ggml.tokens",
                                     "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"))
    template = meta.get("tokenizer.chat_template")
    if not template or not isinstance(template, str):
        raise TemplateError(
            f"{gguf_path}: the GGUF carries no tokenizer.chat_template; give --template-from a model directory")
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        idx = meta.get(key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else ""

    return template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")


# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(gguf_path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named key/value pairs of a GGUF's header, read without the tensor index (gguf's GGUFReader
    parses all of it: seconds on a busy machine, for a check that runs before every data stage)."""
    import io
    import struct

    wanted, found = set(keys), {}
    with open(gguf_path, "rb", buffering=1 << 20) as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def string() -> bytes:
            return f.read(read("Q"))

        def value(kind: int, keep: bool) -> Any:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                text = string()
                return text.decode("utf-8", "replace") if keep else None
            if kind == 9:
                item_kind, count = read("I"), read("Q")
                if not keep and item_kind in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item_kind]), io.SEEK_CUR)
                    return None
                return [value(item_kind, keep) for _ in range(count)]
            raise TemplateError(f"{gguf_path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise TemplateError(f"{gguf_path}: not a GGUF file")
        version = read("I")
        if version < 2:
            raise TemplateError(f"{gguf_path}: GGUF version {version} is too old to read")
        try:
            read("Q")  # tensors
            for _ in range(read("Q")):
                key = string().decode("utf-8", "replace")
                found_value = value(read("I"), key in wanted)
                if key in wanted:
                    found[key] = found_value
                    if len(found) == len(wanted):
                        break
        except struct.error:
            raise TemplateError(f"{gguf_path}: the GGUF header ends early (a truncated file?)") from None
    return found


def mapping_for_template(template: str, bos: str, eos: str, source: str) -> TemplateMapping:
    return match_chat_template(jinja_renderer(template, bos, eos), bos or None, source=source, eos_token=eos or None)


def sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling PARAMETERs from generation_config.json, when the model sets them."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    gen = json.loads(path.read_text())
    if gen.get("do_sample") is False:
        return {}
    return {ollama: gen[key] for key, ollama in _GENERATION_PARAMS.items() if gen.get(key) is not None}


def build_spec(mapping: TemplateMapping, gguf_path: Path, cfg: ModelfileConfig, system_prompt: str | None,
               sampling: dict[str, Any]) -> ModelfileSpec:
    system = cfg.system if cfg.system is not None else system_prompt
    if system is None:
        system = mapping.default_system
    if system and not mapping.trained_system:
        log.warning("the %s chat template takes no system prompt; Ollama will write SYSTEM %r into the first user "
                    "turn, as Gemma 3 does, a layout this model was not trained on", mapping.format.name, system[:60])
    parameters = {**sampling, **cfg.parameters}
    stops = list(dict.fromkeys(mapping.format.stops))
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
