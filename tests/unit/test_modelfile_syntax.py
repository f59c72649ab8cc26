"""The Modelfile writer against hostile values: what is written reads back exactly, or is refused by name."""

import random
import re

import pytest

from ftdeploy.errors import TemplateError
from ftdeploy.modelfile_syntax import ModelfileSyntaxError, parse, quote
from ftdeploy.stages.modelfile import ModelfileSpec

# Pieces a hostile or careless value is made of: quotes, triple quotes, line breaks, comments, directives.
PIECES = ['"', '"""', "'", "\\", "\n", "\r\n", "\r", "\t", " ", "#", "FROM /etc/passwd", "ADAPTER /tmp/evil",
          "PARAMETER stop x", "SYSTEM", "TEMPLATE", "{{ .Prompt }}", "<|im_end|>", "é", "日本", "😀", "x", "ok"]
UNPRINTABLE = ["\u200b", "\x00", "\x1b[31m", "\u00a0"]  # dropped by Ollama's parser: rarer, or nothing passes


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(UNPRINTABLE if rng.random() < 0.01 else PIECES) for _ in range(rng.randint(0, 10)))


def _cannot_be_carried(value: str) -> bool:
    """Ollama's parser drops unprintable characters, and \"\"\" at a line's end closes any quoted value."""
    unprintable = any(not (c.isprintable() or c in "\t\r\n") for c in value)
    return unprintable or re.search(r'"""[ \t]*[\r\n]', value) is not None


def _spec(system, template, stops, parameters):
    return ModelfileSpec(gguf="/models/x.gguf", template=template, stops=stops, system=system, parameters=parameters)


@pytest.mark.parametrize("seed", range(8))
def test_random_values_read_back_exactly_or_are_refused_for_a_real_reason(seed):
    rng = random.Random(seed)
    written = refused = 0
    for _ in range(250):
        system, template = _random_text(rng), _random_text(rng) or "{{ .Prompt }}"
        stops = [_random_text(rng) or "<|im_end|>" for _ in range(rng.randint(0, 2))]
        key = rng.choice(["temperature", "num_ctx", "top_k", "min_p", "stop", "bad key", "x\ny"]
                         if rng.random() < 0.1 else
                         ["temperature", "num_ctx", "top_k", "min_p", "stop"])
        parameters = {key: rng.choice([0.7, 4096, True, _random_text(rng) or "v"])}
        spec = _spec(system, template, stops, parameters)
        values = [system, template, *stops, *(str(v) for v in parameters.values())]
        bad_key = not re.fullmatch(r"[A-Za-z0-9_]+", key)
        try:
            text = spec.render()
        except TemplateError as exc:
            refused += 1
            assert bad_key or any(_cannot_be_carried(v) for v in values), (exc, values)
            assert "cannot carry" in str(exc)
            continue
        written += 1
        assert not bad_key and not any(_cannot_be_carried(v) for v in values)
        assert parse(text) == spec.commands(), text
    assert written > 50 and refused > 20  # both branches were exercised


def test_the_reported_injection_stays_inside_system():
    """The issue's reproduction: a system prompt that closes SYSTEM and adds FROM, PARAMETER and ADAPTER lines."""
    hostile = 'ok"""\nFROM /etc/passwd\nPARAMETER stop x\nADAPTER /tmp/evil'
    with pytest.raises(TemplateError, match='SYSTEM value.*"""'):
        _spec(hostile, "{{ .Prompt }}", [], {}).render()
    # Without the line break after the quotes the same text can be carried, and stays one SYSTEM value.
    carried = 'ok""" FROM /etc/passwd\nPARAMETER stop x\nADAPTER /tmp/evil'
    text = _spec(carried, "{{ .Prompt }}", ["<|im_end|>"], {}).render()
    assert [c for c, _ in parse(text)] == ["model", "template", "system", "stop"]
    assert dict(parse(text))["system"] == carried


def test_a_parameter_name_with_a_line_break_is_refused():
    with pytest.raises(TemplateError, match="PARAMETER"):
        _spec(None, "{{ .Prompt }}", [], {"num_ctx\nADAPTER /tmp/evil": 1}).render()


def test_quotes_and_backslashes_in_a_stop_are_not_escaped():
    """Ollama's parser has no escapes: a backslash written before a quote would become part of the stop."""
    text = _spec(None, "{{ .Prompt }}", ['say "hi"', "a\\b"], {}).render()
    assert [a for c, a in parse(text) if c == "stop"] == ['say "hi"', "a\\b"]
    assert "\\\"" not in text


def test_parse_follows_ollamas_rules():
    assert parse('FROM ./m.gguf\n# a comment\nparameter num_ctx 4096\nSYSTEM """a\n"b"\n"""\n') == [
        ("model", "./m.gguf"), ("num_ctx", "4096"), ("system", 'a\n"b"\n')]
    with pytest.raises(ModelfileSyntaxError, match="not a Modelfile command"):
        parse("FROM x\nINCLUDE y\n")
    with pytest.raises(ModelfileSyntaxError, match="never closed"):
        parse('FROM x\nSYSTEM """open\n')
    assert quote("a b") == '"""a b"""' and quote("a b", "inline") == '"a b"' and quote("4096", "bare") == "4096"
