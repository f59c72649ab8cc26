"""`data.chat_template`: train and serve with a chat template other than the base's own, a Jinja file or one of
ftdeploy's (chatml-tools, for tool calls on a ChatML base whose template has none, like the demo's SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import local_base_with_template

from ftdeploy.errors import ConfigError, TemplateError
from ftdeploy.templates import jinja_renderer, match_chat_template
from ftdeploy.tokenizer import builtin_chat_templates, chat_template_digest, read_chat_template_file

DATA = Path(__file__).parents[1] / "data"
QWEN25 = (DATA / "tool_templates" / "qwen2.5.jinja").read_text()
ALPACA = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
TOOL = {"type": "function", "function": {"name": "lookup_port", "description": "The port a service listens on.",
                                         "parameters": {"type": "object",
                                                        "properties": {"service": {"type": "string"}},
                                                        "required": ["service"]}}}
CALL = {"type": "function", "function": {"name": "lookup_port", "arguments": {"service": "zephyr"}}}
TOOL_CHATS = [
    [{"role": "system", "content": "You look ports up."}, {"role": "user", "content": "Port of zephyr?"}],
    [{"role": "system", "content": "You look ports up."}, {"role": "user", "content": "Port of zephyr?"},
     {"role": "assistant", "content": "", "tool_calls": [CALL]},
     {"role": "tool", "name": "lookup_port", "content": "7341"},
     {"role": "assistant", "content": "Zephyr uses port 7341."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Two?"},
     {"role": "assistant", "content": "Both.", "tool_calls": [CALL, CALL]},
     {"role": "tool", "name": "lookup_port", "content": "7341"}, {"role": "tool", "name": "lookup_port",
                                                                   "content": "7342"}],
]


def builtin() -> str:
    return read_chat_template_file("chatml-tools")


def test_chatml_tools_is_one_of_ftdeploys_own_and_is_served_as_chatml_with_tools():
    assert "chatml-tools" in builtin_chat_templates()
    mapping = match_chat_template(jinja_renderer(builtin(), "", "<|im_end|>"))
    assert mapping.format.name == "chatml" and mapping.tools
    assert mapping.default_system is None and mapping.implicit_system == ""  # no system prompt of its own


@pytest.mark.parametrize("chat", TOOL_CHATS, ids=["ask", "call-and-answer", "two-calls"])
@pytest.mark.parametrize("gen", [True, False])
def test_chatml_tools_lays_tool_chats_out_as_qwen25_does(chat, gen):
    """Given a system prompt (Qwen2.5 inserts its own default otherwise), the two templates render alike."""
    ours, qwen = jinja_renderer(builtin(), "", "<|im_end|>"), jinja_renderer(QWEN25, "", "<|im_end|>")
    assert ours(chat, gen, tools=[TOOL]) == qwen(chat, gen, tools=[TOOL])
    assert ours(chat[:2], gen) == qwen(chat[:2], gen)  # and without tools


def test_a_file_is_read_and_a_missing_one_names_the_option_and_the_builtins(tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(QWEN25)
    assert read_chat_template_file(str(file)) == QWEN25
    with pytest.raises(ConfigError, match=r"data.chat_template: cannot read .*nope.jinja: No such file.*chatml-tools"):
        read_chat_template_file(str(tmp_path / "nope.jinja"))
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(ConfigError, match="data.chat_template: .*empty.jinja is empty"):
        read_chat_template_file(str(tmp_path / "empty.jinja"))


def test_the_digest_follows_the_text_so_an_edited_file_prepares_the_data_again(tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(QWEN25)
    before = chat_template_digest(str(file))
    file.write_text(QWEN25 + " ")
    assert chat_template_digest(str(file)) != before
    assert chat_template_digest("chatml-tools") != chat_template_digest(str(file))


def test_load_tokenizer_trains_with_the_given_template(tmp_path, tiny_tokenizer):
    from ftdeploy.tokenizer import load_tokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "base")
    tokenizer, mapping = load_tokenizer(tmp_path / "base", chat_template="chatml-tools")
    assert tokenizer.chat_template == builtin() and mapping.tools
    rendered = tokenizer.apply_chat_template(TOOL_CHATS[1], tools=[TOOL], tokenize=False)
    assert '<tool_call>\n{"name": "lookup_port", "arguments": {"service": "zephyr"}}\n</tool_call>' in rendered
    _, own = load_tokenizer(tmp_path / "base")
    assert not own.tools  # the base's own ChatML template has no tools



def _check(tmp_path: Path, base: Path, override: str | None) -> None:
    from ftdeploy.config import config_from_dict
    from ftdeploy.pipeline.context import Context
    from ftdeploy.pipeline.preflight import check_chat_template

    cfg = config_from_dict({"base_model": str(base), "runs_dir": str(tmp_path / "runs"),
                            "data": {"chat_template": override}})
    ctx = Context.create(cfg, ollama_explicit=False)
    try:
        check_chat_template(ctx)
    finally:
        ctx.close()


def test_preflight_checks_the_given_template_in_place_of_the_bases(tmp_path):
    base = local_base_with_template(tmp_path / "base", ALPACA)
    with pytest.raises(TemplateError, match="matches no supported format"):
        _check(tmp_path, base, None)
    _check(tmp_path, base, "chatml-tools")  # the base's own is not used: no error
    bad = tmp_path / "alpaca.jinja"
    bad.write_text(ALPACA)
    with pytest.raises(TemplateError, match=r"alpaca.jinja \(data.chat_template\).*matches no supported format"):
        _check(tmp_path, local_base_with_template(tmp_path / "base2", QWEN25), str(bad))


def test_a_run_with_a_missing_template_file_stops_before_the_data_stage(tmp_path):
    from click.testing import CliRunner

    from ftdeploy.cli import cli

    base = local_base_with_template(tmp_path / "base", QWEN25)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["train-and-serve", "--runs-dir", str(runs), "--base-model", str(base),
                                      "--engine", "hf", "--ollama-host", "http://127.0.0.1:9",
                                      "--set", f"data.chat_template={tmp_path / 'missing.jinja'}"])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "data.chat_template: cannot read" in result.output and "missing.jinja" in result.output
    assert not list(runs.glob("*/data")), "the data stage must not have started"
