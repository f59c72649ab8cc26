'''Modelfile syntax as Ollama reads it: quote a value so it reads back unchanged, or refuse it.

Ollama's parser (parser/parser.go in ollama/ollama) has no escape sequences. A value is bare,
`"…"` or `"""…"""`, and it ends at the first line break where what was read so far is a
complete quoted string. So a system prompt containing `"""` at the end of a line would end
the SYSTEM value there, and whatever follows would be read as new directives (FROM, ADAPTER,
PARAMETER …). Characters that are not printable (other than tab and line breaks) are dropped
by the parser without a word.

`parse` below is a reading of that parser, written here so that every Modelfile ftdeploy writes
is read back before it is written: a value that would not come back as it went in is an error
naming the field, never a silently different Modelfile.
'''

from __future__ import annotations

import math
import re
from typing import Any

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")
_SPACE = " \t"
_NEWLINE = "\r\n"


class ModelfileSyntaxError(ValueError):
    """Text that Ollama's parser would refuse, or a value it cannot carry unchanged."""


def _kept(ch: str) -> bool:
    """Whether Ollama's parser keeps this character inside a value (strconv.IsPrint, plus tab and line breaks)."""
    return ch.isprintable() or ch in "\t\r\n"


def _unquote(text: str) -> str | None:
    """The value of a complete token, or None while a quoted one is still open."""
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


def parse(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs in order, as Ollama would read them; PARAMETER lines give (name, value)."""
    text = text.removeprefix("\ufeff")
    commands: list[tuple[str, str]] = []
    state, buf, name, line = "nil", "", "", 1
    for ch in text:
        if ch in _NEWLINE:
            line += 1
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch not in _SPACE + _NEWLINE:
                state, buf = "name", ch
        elif state == "comment":
            if ch in _NEWLINE:
                state = "nil"
        elif state == "name":
            if ch.isascii() and ch.isalpha():
                buf += ch
            elif ch in _SPACE:
                word = buf.lower()
                if word not in COMMANDS:
                    raise ModelfileSyntaxError(f"line {line}: {buf!r} is not a Modelfile command")
                state = "parameter" if word == "parameter" else "value"
                name, buf = ("model" if word == "from" else word), ""
            else:
                raise ModelfileSyntaxError(f"line {line}: {buf + ch!r} is not a Modelfile command")
        elif state == "parameter":
            if ch.isascii() and (ch.isalnum() or ch == "_"):
                buf += ch
            elif ch in _SPACE:
                state, name, buf = "value", buf, ""
            else:
                raise ModelfileSyntaxError(f"line {line}: a PARAMETER name may hold only letters, digits and _")
        else:  # value: ends at a line break once what was read is complete
            if ch in _SPACE + _NEWLINE:
                value = _unquote(buf.strip(_SPACE + _NEWLINE))
                if value is None or ch in _SPACE:
                    buf += ch
                    continue
                commands.append((name, value))
                state, buf = "nil", ""
            elif _kept(ch):
                buf += ch
    if state == "value":
        value = _unquote(buf.strip(_SPACE + _NEWLINE))
        if value is None:
            raise ModelfileSyntaxError(f"line {line}: a quoted value is never closed")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ModelfileSyntaxError(f"line {line}: the Modelfile ends inside a command")
    return commands


def _unkept(value: str) -> str | None:
    for i, ch in enumerate(value):
        if not _kept(ch):
            return f"character U+{ord(ch):04X} at position {i} (not printable; Ollama's parser drops it)"
    return None


def quote(value: str, style: str = "block") -> str:
    '''`value` written so that Ollama reads it back unchanged.

    style: "block" tries """…""" first (TEMPLATE, SYSTEM), "inline" tries "…" first (PARAMETER),
    "bare" tries it unquoted first (FROM, ADAPTER paths, numbers). Raises ModelfileSyntaxError when
    no form carries it: a character Ollama drops, or """ at the end of a line (which ends any
    quoted value there).'''
    reason = _unkept(value)
    if reason:
        raise ModelfileSyntaxError(reason)
    block, inline = f'"""{value}"""', f'"{value}"'
    forms = {"block": [block, inline], "inline": [inline, block], "bare": [value, inline, block]}[style]
    for form in forms:
        try:
            if form and parse(f"SYSTEM {form}\n") == [("system", value)]:
                return form
        except ModelfileSyntaxError:
            continue
    raise ModelfileSyntaxError('it has """ at the end of a line, which ends a quoted Modelfile value there')


def parameter_name(name: str) -> str:
    if not PARAMETER_NAME.fullmatch(name):
        raise ModelfileSyntaxError(f"{name!r} is not a PARAMETER name (letters, digits and _ only)")
    return name


# ---------------------------------------------------------------- PARAMETER names and value types

# Ollama 0.17.4's parameters (api/types.go: Options and the Runner it embeds, by their json tags) and each one's Go
# type, which FormatParams (a Modelfile's PARAMETER lines) and Options.FromMap (an API request's options) hold a
# value to. /api/create stores `parameters` as given, so a misspelt name or a "4096" for an int is only found when a
# chat loads the model (a warning in the server log, or "option must be of type integer"): checked here instead.
OLLAMA_PARAMETERS: dict[str, type] = {
    # Runner: fixed when the model is loaded
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
    # Options: per request
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": list,
}
# Names Ollama 0.17.4's Modelfile parser drops with "warning: parameter X is deprecated" (parser/parser.go).
OLLAMA_REMOVED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                             "mirostat", "mirostat_tau", "mirostat_eta")
OLLAMA_MIN_CONTEXT = 4  # the least num_ctx Ollama 0.17.4 runs with (server/sched.go raises a smaller one to it)
_GO_BOOL = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}  # strconv.ParseBool
_FLOAT32_MAX = 3.4028234663852886e38
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", list: "a string or a list of strings"}


def parameter_value(name: str, value: Any) -> Any:
    """`value` as the Go type Ollama holds the parameter `name` to (an int for num_ctx, a float for temperature, a
    list of strings for stop), taking the text a Modelfile would give ("4096", "0.7", "true"); a ModelfileSyntaxError
    naming the valid names (and the closest one) for a name Ollama does not know, or the type for a value of another.
    """
    import difflib

    kind = OLLAMA_PARAMETERS.get(name)
    if kind is None:
        if name in OLLAMA_REMOVED_PARAMETERS:
            raise ModelfileSyntaxError(f"{name!r} is no longer an Ollama parameter (0.17.4 ignores it); valid: "
                                       f"{', '.join(sorted(OLLAMA_PARAMETERS))}")
        close = difflib.get_close_matches(name.lower(), OLLAMA_PARAMETERS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ModelfileSyntaxError(f"{name!r} is not an Ollama parameter{hint}; valid: "
                                   f"{', '.join(sorted(OLLAMA_PARAMETERS))}")
    converted = _converted(kind, value)
    if converted is None:
        raise ModelfileSyntaxError(f"{name} takes {_TYPE_WORDS[kind]}, got {type(value).__name__} {value!r}")
    if name == "num_ctx" and converted < OLLAMA_MIN_CONTEXT:  # server/sched.go raises it, and cuts every prompt
        raise ModelfileSyntaxError(f"num_ctx is the context in tokens, got {converted}: Ollama 0.17.4 serves "
                                   f"{OLLAMA_MIN_CONTEXT} tokens for anything below {OLLAMA_MIN_CONTEXT}, which "
                                   "cuts every prompt to fit")
    return converted


def _converted(kind: type, value: Any) -> Any:
    """`value` as `kind`, or None where Ollama would refuse it."""
    text = value.strip() if isinstance(value, str) else None
    if kind is list:
        items = value if isinstance(value, list) else [value]
        return list(items) if all(isinstance(v, str) for v in items) else None
    if kind is bool:
        return value if isinstance(value, bool) else _GO_BOOL.get(text.lower()) if text is not None else None
    if isinstance(value, bool):  # YAML's true is no number
        return None
    if kind is float:
        number = float(value) if isinstance(value, int | float) else _number(text, float)
        return number if number is None or abs(number) <= _FLOAT32_MAX else None  # Go's float32
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    number = value if isinstance(value, int) else _number(text, int)
    return number if number is None or -(1 << 63) <= number < 1 << 63 else None  # Go's int


_GO_INT = re.compile(r"[+-]?[0-9]+")  # strconv.ParseInt(s, 10, 64): no underscores, no spaces
_GO_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # finite decimals only


def _number(text: str | None, kind: type) -> Any:
    if text is None or not (_GO_INT if kind is int else _GO_FLOAT).fullmatch(text):
        return None
    number = kind(text)
    return number if kind is int or math.isfinite(number) else None
