import pytest

from ftdeploy.errors import TemplateError
from ftdeploy.templates import CHATML, LLAMA3, jinja_renderer, match_chat_template

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3.2's shape: BOS, a system block always written, with a fixed preamble before the system text.
LLAMA32 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
LLAMA3_PLAIN = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Port?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


def _mapping(template, bos="<|begin_of_text|>"):
    return match_chat_template(jinja_renderer(template, bos, ""), bos)


def test_smollm2_is_chatml_with_its_default_system_prompt():
    m = _mapping(SMOLLM2, bos="<|endoftext|>")
    assert m.format is CHATML
    assert m.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert m.system_prefix == "" and m.implicit_system == ""
    assert m.end_of_turn == "<|im_end|>"


def test_plain_chatml_has_no_default_system():
    m = _mapping(PLAIN_CHATML)
    assert m.format is CHATML and m.default_system is None


def test_llama32_keeps_its_preamble_and_always_written_system_block():
    m = _mapping(LLAMA32)
    assert m.format is LLAMA3
    assert m.system_prefix == "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    assert m.default_system is None
    assert m.implicit_system.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")


def test_llama3_plain():
    m = _mapping(LLAMA3_PLAIN)
    assert m.format is LLAMA3 and m.system_prefix == "" and m.default_system is None
    assert "<|eot_id|>" in m.format.stops


@pytest.mark.parametrize("template,bos", [(SMOLLM2, "<|endoftext|>"), (PLAIN_CHATML, ""),
                                          (LLAMA32, "<|begin_of_text|>"), (LLAMA3_PLAIN, "<|begin_of_text|>")])
@pytest.mark.parametrize("chat", CHATS)
def test_the_ollama_side_renders_exactly_what_training_rendered(template, bos, chat):
    render = jinja_renderer(template, bos, "")
    mapping = match_chat_template(render, bos or None)
    expected = render(chat, True)
    if mapping.format.bos_in_template and bos and expected.startswith(bos):
        expected = expected[len(bos):]  # Ollama's runner adds BOS from the GGUF
    assert mapping.render(chat, True) == expected


def test_unknown_template_is_an_error_not_a_guess():
    alpaca = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
              "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    with pytest.raises(TemplateError, match="matches no supported format"):
        _mapping(alpaca)


def test_ollama_template_has_markers_filled():
    m = _mapping(LLAMA32)
    text = m.ollama_template()
    assert "[[" not in text
    assert "Cutting Knowledge Date: December 2023" in text
    assert _mapping(SMOLLM2, "<|endoftext|>").ollama_template().count("<|im_start|>") >= 2
