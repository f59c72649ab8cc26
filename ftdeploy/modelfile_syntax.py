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

import re

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
