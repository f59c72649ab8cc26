"""Load the base model's tokenizer, check its chat template, and give it a pad token distinct from EOS."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from .assets import asset
from .errors import ConfigError, ModelError, TemplateError
from .templates import TemplateMapping, match_chat_template

log = logging.getLogger(__name__)


def builtin_chat_templates() -> list[str]:
    """The names `data.chat_template` takes besides a file: ftdeploy/assets/chat_templates/<name>.jinja."""
    return sorted(f.stem for f in asset("chat_templates").glob("*.jinja"))


def read_chat_template_file(spec: str) -> str:
    """The text of `data.chat_template`: a Jinja file, or the name of one of ftdeploy's own (chatml-tools); a
    ConfigError naming the option and the file otherwise."""
    file = Path(spec).expanduser()
    if not file.exists() and spec in builtin_chat_templates():
        return asset("chat_templates", f"{spec}.jinja").read_text(encoding="utf-8")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"data.chat_template: cannot read {file}: {reason} (give a Jinja file, or one of "
                          f"ftdeploy's own: {', '.join(builtin_chat_templates())})") from None
    if not text.strip():
        raise ConfigError(f"data.chat_template: {file} is empty")
    return text


def chat_template_digest(spec: str) -> str:
    """What the data stage's fingerprint keeps of `data.chat_template`: its text's sha256 (an unreadable one stands
    for itself; the stage then fails on it)."""
    try:
        return hashlib.sha256(read_chat_template_file(spec).encode()).hexdigest()
    except ConfigError:
        return spec


def load_tokenizer(model_dir: Path | str, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> tuple[Any, TemplateMapping]:
    """The tokenizer and its chat format; `chat_template` (a file, data.chat_template) replaces the base's template,
    and is saved with the adapter and the merged model from then on."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load a tokenizer from {model_dir}: {str(exc).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{model_dir}: ftdeploy needs a fast tokenizer (offsets locate the assistant spans)")
    source = f"{model_dir} chat template"
    if chat_template:
        tokenizer.chat_template = read_chat_template_file(chat_template)
        source = f"{chat_template} (data.chat_template)"
    if not tokenizer.chat_template:
        raise TemplateError(f"{model_dir}: the tokenizer has no chat template; use an instruct/chat model or set "
                            "data.chat_template to a template file")

    def render(messages: list[dict[str, Any]], gen: bool, tools: list[dict[str, Any]] | None = None) -> str:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)

    mapping = match_chat_template(render, tokenizer.bos_token, source=source,
                                  eos_token=tokenizer.eos_token)
    ensure_pad_token(tokenizer, mapping)
    return tokenizer, mapping


def ensure_pad_token(tokenizer: Any, mapping: TemplateMapping) -> str:
    """pad == eos teaches a model never to stop (padding positions look like EOS): pick a distinct pad.

    Prefer an existing special token that is neither EOS nor an end-of-turn/stop marker; only
    if there is none, add `<|pad|>` (the caller must then resize the embeddings).
    """
    forbidden = {tokenizer.eos_token, *mapping.format.stops}
    if tokenizer.pad_token and tokenizer.pad_token not in forbidden:
        return tokenizer.pad_token
    markers = mapping.format.markers
    added = getattr(tokenizer, "added_tokens_encoder", {})
    for candidate in [tokenizer.unk_token, *tokenizer.all_special_tokens, *added]:
        if candidate and candidate not in forbidden and candidate not in markers and candidate != tokenizer.bos_token:
            tokenizer.pad_token = candidate
            log.info("pad token set to %r (distinct from EOS %r)", candidate, tokenizer.eos_token)
            return candidate
    for candidate in [tokenizer.bos_token]:
        if candidate and candidate not in forbidden:
            tokenizer.pad_token = candidate
            return candidate
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log.info("added a <|pad|> token (no usable special token distinct from EOS)")
    return "<|pad|>"
