"""The chat template a model carries, read from its files without torch or transformers: a Hugging Face directory's
tokenizer files, or a GGUF's metadata. What is read is a `ChatTemplate` (the Jinja text, BOS and EOS), and
`mapping_for_template` finds the chat format it renders (templates.py: the formats, and the matching itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from .errors import StageMissingError, TemplateError
from .templates import RenderFn, TemplateMapping, jinja_renderer, match_chat_template


class ChatTemplate(NamedTuple):
    """A model's chat template and the BOS and EOS tokens it is rendered with ("" where the model has none)."""

    template: str
    bos: str
    eos: str

    def renderer(self) -> RenderFn:
        """The template rendered with jinja2 (templates.jinja_renderer), with this BOS and EOS."""
        return jinja_renderer(self.template, self.bos, self.eos)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def read_chat_template(model_dir: Path) -> ChatTemplate:
    """The chat template, BOS and EOS of a Hugging Face directory, from its tokenizer files."""
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
    return ChatTemplate(template, bos, eos)


def read_gguf_chat_template(gguf_path: Path) -> ChatTemplate:
    """The chat template, BOS and EOS of a GGUF, from its metadata."""
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

    return ChatTemplate(template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))


def mapping_for_template(chat: ChatTemplate, where: str) -> TemplateMapping:
    """The format `chat` renders (`where` names it in the TemplateError when it renders none)."""
    return match_chat_template(chat.renderer(), chat.bos or None, source=where, eos_token=chat.eos or None)


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
