"""Every chat format against the real chat template of a model that uses it (tests/data/chat_templates/):
the format is read off the template, the Python mirror renders what the template renders, a near miss is
refused naming the closest format, and (where Go and the pinned Ollama source are at hand) Ollama's own
template package renders our Modelfile TEMPLATE exactly as the mirror does."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import local_base_with_template

from ftdeploy.errors import TemplateError
from ftdeploy.local_server import PINNED_OLLAMA_VERSION
from ftdeploy.templates import FORMATS, TemplateMapping, jinja_renderer, match_chat_template, training_messages

TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"
TOOL_TEMPLATES = Path(__file__).parents[1] / "data" / "tool_templates"  # llama3.1: its tool layout
RENDERER_SOURCE = Path(__file__).parents[1] / "ollama_render" / "main.go"
R1_BOS, R1_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"

# fixture -> (BOS, EOS of the model's tokenizer, the format it must map to). Sources: README.md beside them.
FAMILIES = {
    "qwen2.5": ("", "<|im_end|>", "chatml"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "gemma2": ("<bos>", "<eos>", "gemma"),
    "gemma3": ("<bos>", "<eos>", "gemma"),
    "mistral-v3": ("<s>", "</s>", "mistral-v3"),
    "mistral-v3-tekken": ("<s>", "</s>", "mistral-v3-tekken"),
    "mistral-v7": ("<s>", "</s>", "mistral-v7"),
    "phi3": ("<s>", "<|endoftext|>", "phi3"),
    "phi4-mini": ("<|endoftext|>", "<|endoftext|>", "phi4-mini"),
    "phi4": ("<|endoftext|>", "<|im_end|>", "phi4"),
    "qwen3": ("", "<|im_end|>", "qwen3"),
    "deepseek-r1": (R1_BOS, R1_EOS, "deepseek-r1"),
}
REASONING = {"qwen3", "deepseek-r1"}
# Templates that write tools, and the formats that serve them.
TOOLS = {"qwen3", "qwen2.5", "llama3.1", "mistral-v3", "mistral-v7"}
# What each tool layout's model writes to call lookup_port (Ollama parses it into message.tool_calls).
TOOL_REPLY = {"llama3.1": '{"name": "lookup_port", "parameters": {"service": "kafka", "proto": "udp"}}',
              "mistral-v3": '[TOOL_CALLS] [{"name": "lookup_port", "arguments": {"service": "kafka", "proto": "udp"}, '
                            '"id": "c0ffee123"}]'}
TOOL_REPLY["mistral-v7"] = TOOL_REPLY["mistral-v3"]
QWEN_REPLY = '<tool_call>\n{"name": "lookup_port", "arguments": {"service": "kafka", "proto": "udp"}}\n</tool_call>'
NO_SYSTEM_TRAINED = {"gemma2"}  # its template raises on a system message

PLAIN = [{"role": "user", "content": "Hi"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
MULTI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Port?"}]
SYSTEM_MULTI = [{"role": "system", "content": "S"}, *MULTI, {"role": "assistant", "content": "7341."},
                {"role": "user", "content": "Sure?"}]
# An earlier answer that thought first: Ollama holds the reasoning in message.thinking, the training
# template finds it as a <think> block in the content.
THOUGHT = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello!", "thinking": "A greeting; greet back."},
           {"role": "user", "content": "Port?"}]
THOUGHT_SYSTEM = [{"role": "system", "content": "S"}, *THOUGHT,
                  {"role": "assistant", "content": "7341.", "thinking": "The docs say 7341."},
                  {"role": "user", "content": "Sure?"}]
CHATS = {"plain": PLAIN, "system": SYSTEM, "multi": MULTI, "system-multi": SYSTEM_MULTI}
THINK_CHATS = {"thought": THOUGHT, "thought-system": THOUGHT_SYSTEM}


def _render(family):
    bos, eos, _ = FAMILIES[family]
    path = TEMPLATES / f"{family}.jinja"
    return jinja_renderer((path if path.is_file() else TOOL_TEMPLATES / f"{family}.jinja").read_text(), bos, eos)


def _mapping(family) -> TemplateMapping:
    bos, eos, _ = FAMILIES[family]
    return match_chat_template(_render(family), bos or None, eos_token=eos)


def _training_text(family, mapping, chat, gen=True):
    text = _render(family)(training_messages(chat), gen)
    bos = FAMILIES[family][0]
    if mapping.format.bos_in_template and bos and text.startswith(bos):
        text = text[len(bos):]  # Ollama's runner adds BOS from the GGUF
    return text


def _cases():
    for family in FAMILIES:
        chats = {**CHATS, **(THINK_CHATS if family in REASONING else {})}
        for name, chat in chats.items():
            if family in NO_SYSTEM_TRAINED and chat[0]["role"] == "system":
                continue
            yield pytest.param(family, chat, id=f"{family}-{name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_format_is_read_off_the_real_template(family):
    mapping = _mapping(family)
    assert mapping.format.name == FAMILIES[family][2]
    if family == "llama3.1":  # it always writes a system block that starts with its knowledge date
        assert mapping.system_prefix == "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        assert mapping.implicit_system == mapping.format.system_block(mapping.system_prefix)
    else:
        assert mapping.system_prefix == "" and mapping.implicit_system == ""
    assert mapping.trained_system is (family not in NO_SYSTEM_TRAINED)


def test_what_each_family_adds_on_its_own():
    assert _mapping("mistral-v7").default_system.startswith("You are Mistral Small 3")
    assert _mapping("qwen2.5").default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    for family in set(FAMILIES) - {"mistral-v7", "qwen2.5"}:
        assert _mapping(family).default_system is None, family
    assert _mapping("gemma3").end_of_turn == "<end_of_turn>"
    assert _mapping("mistral-v3").end_of_turn == "</s>"
    assert _mapping("phi3").end_of_turn == "<|end|>"
    assert _mapping("deepseek-r1").end_of_turn == R1_EOS


@pytest.mark.parametrize("family,chat", list(_cases()))
def test_the_mirror_renders_what_training_rendered(family, chat):
    mapping = _mapping(family)
    assert mapping.render(chat) == _training_text(family, mapping, chat)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_finished_chat_differs_only_by_the_end_of_turn(family):
    """Ollama leaves a trailing assistant turn open (it continues it); the template closes it."""
    mapping = _mapping(family)
    chat = [*(MULTI if family in NO_SYSTEM_TRAINED else SYSTEM_MULTI), {"role": "assistant", "content": "Yes."}]
    ours, theirs = mapping.render(chat), _training_text(family, mapping, chat, gen=False)
    eos = FAMILIES[family][1]
    close = mapping.format.close("assistant")
    assert theirs in (ours + close, ours + close + eos)


def test_earlier_reasoning_is_dropped_and_a_continued_turn_keeps_it():
    qwen3 = _mapping("qwen3")
    prompt = qwen3.render(THOUGHT_SYSTEM)
    assert "A greeting" not in prompt and "The docs say" not in prompt
    continued = qwen3.render([PLAIN[0], {"role": "assistant", "content": "Hello!", "thinking": "Greet."}])
    assert continued.endswith("<|im_start|>assistant\n<think>\nGreet.\n</think>\n\nHello!")
    assert qwen3.render(PLAIN, think=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    r1 = _mapping("deepseek-r1")
    assert "greet back" not in r1.render(THOUGHT)
    assert r1.render(PLAIN).endswith("<\uff5cAssistant\uff5c><think>\n")


# (old, new) in the real template: a change small enough that the format is still the closest one.
NEAR_MISSES = {
    "gemma2": ("'<end_of_turn>\\n'", "'<end_of_turn>\\n\\n'"),
    "gemma3": ("'<end_of_turn>\\n'", "'<end_of_turn>\\n\\n'"),
    "mistral-v3": ('" " + message["content"]|trim', '"  " + message["content"]|trim'),
    "mistral-v3-tekken": ('message["content"] + eos_token', 'message["content"] + "\\n" + eos_token'),
    "mistral-v7": ("'[INST]' + message['content']", "'[INST] ' + message['content']"),
    "phi3": ("'<|user|>\\n'", "'<|user|>\\n\\n'"),
    "phi4-mini": ("{{ '<|assistant|>' }}", "{{ '<|assistant|> ' }}"),
    "phi4": ("'<|im_start|>user<|im_sep|>'", "'<|im_start|>user<|im_sep|>\\n'"),
    "qwen3": ("'\\n</think>\\n\\n'", "'\\n</think>\\n'"),
    "deepseek-r1": ("'<\uff5cUser\uff5c>' + message['content']", "'<\uff5cUser\uff5c> ' + message['content']"),
}


@pytest.mark.parametrize("family", NEAR_MISSES)
def test_a_near_miss_names_the_closest_format_and_what_it_rendered(family):
    old, new = NEAR_MISSES[family]
    text = (TEMPLATES / f"{family}.jinja").read_text()
    assert text.count(old) >= 1
    bos, eos, fmt = FAMILIES[family]
    with pytest.raises(TemplateError) as err:
        match_chat_template(jinja_renderer(text.replace(old, new), bos, eos), bos or None, eos_token=eos)
    message = str(err.value)
    assert "matches no supported format" in message and "renders a short chat as" in message
    assert f"Closest: {fmt} (" in message


def test_every_format_has_its_ollama_template_and_its_stops():
    for fmt in FORMATS:
        text = TemplateMapping(fmt).ollama_template()
        assert "[[" not in text and ".Messages" in text, fmt.name
        assert fmt.stops and fmt.stops[0] == fmt.close("assistant").strip(), fmt.name


# ------------------------------------------------------------------ Ollama's own renderer


def _ollama_module() -> Path | None:
    go = shutil.which("go")
    if go is None:
        return None
    modcache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
    path = Path(modcache) / "github.com" / "ollama" / f"ollama@{PINNED_OLLAMA_VERSION}"
    return path if (path / "template" / "template.go").is_file() else None


@pytest.fixture(scope="module")
def ollama_render(tmp_path_factory):
    """Render through Ollama's template package, built offline from the module cache (skip without it)."""
    module = _ollama_module()
    if module is None:
        pytest.skip(f"needs Go and the Ollama {PINNED_OLLAMA_VERSION} source in the Go module cache")
    work = tmp_path_factory.mktemp("ollama_render")
    shutil.copy(RENDERER_SOURCE, work / "main.go")
    ollama_mod = (module / "go.mod").read_text().splitlines()
    go_line = next(line for line in ollama_mod if line.startswith("go "))
    requires = ollama_mod[next(i for i, line in enumerate(ollama_mod) if line.startswith("require")):]
    (work / "go.mod").write_text("\n".join(["module ftdeploy/ollamarender", "", go_line, "",
                                            f"require github.com/ollama/ollama {PINNED_OLLAMA_VERSION}",
                                            *[line for line in requires if "=>" not in line], ""]))
    shutil.copy(module / "go.sum", work / "go.sum")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOSUMDB": "off"}
    build = subprocess.run(["go", "build", "-o", "render", "."], cwd=work, env=env, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build the Ollama renderer offline: {build.stderr[-500:]}")

    def render(requests):
        out = subprocess.run([str(work / "render")], input=json.dumps(requests), capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    return render


def _ollama_messages(chat):
    return [{k: v for k, v in m.items()} for m in chat]


@pytest.mark.parametrize("family", FAMILIES)
def test_ollama_renders_our_template_as_the_mirror_does(ollama_render, family):
    mapping = _mapping(family)
    template = mapping.ollama_template()
    chats = [*CHATS.values(), *THINK_CHATS.values(), [*SYSTEM_MULTI, {"role": "assistant", "content": "Yes."}]]
    thinks = [None, True, False] if family in REASONING else [None]
    requests, expected = [], []
    for chat in chats:
        with_default = chat
        if mapping.default_system is not None and chat[0]["role"] != "system":
            with_default = [{"role": "system", "content": mapping.default_system}, *chat]  # Ollama adds SYSTEM
        for think in thinks:
            requests.append({"template": template, "messages": _ollama_messages(with_default), "think": think})
            expected.append(mapping.render(chat, think=think))
    results = ollama_render(requests)
    for request, result, want in zip(requests, results, expected, strict=True):
        assert "error" not in result, result
        assert result["prompt"] == want, (request["messages"], request["think"])


@pytest.mark.parametrize("family", FAMILIES)
def test_ollama_reads_the_think_tags_of_reasoning_formats_only(ollama_render, family):
    """thinking.InferTags on our template: what makes Ollama report the "thinking" capability and, with
    think:true, return message.thinking apart from message.content."""
    [result] = ollama_render([{"template": _mapping(family).ollama_template(), "messages": PLAIN}])
    tags = (result["think_open"], result["think_close"])
    assert tags == (("<think>", "</think>") if family in REASONING else ("", ""))


def test_the_first_formats_render_the_same_through_ollama(ollama_render):
    from tests.unit.test_templates import LLAMA32, SMOLLM2

    for template, bos in ((SMOLLM2, "<|endoftext|>"), (LLAMA32, "<|begin_of_text|>")):
        mapping = match_chat_template(jinja_renderer(template, bos, ""), bos)
        for chat in (PLAIN, SYSTEM, MULTI, SYSTEM_MULTI):
            messages = chat
            if mapping.default_system is not None and chat[0]["role"] != "system":
                messages = [{"role": "system", "content": mapping.default_system}, *chat]
            [result] = ollama_render([{"template": mapping.ollama_template(), "messages": messages}])
            assert result["prompt"] == mapping.render(chat)
            assert "tools" not in result["vars"], "their templates write no tools"


# ------------------------------------------------------------------ fail fast: the check before the data stage

ALPACA = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
          "{% if add_generation_prompt %}### assistant:\n{% endif %}")



def test_a_run_whose_chat_template_has_no_format_stops_before_the_data_stage(tmp_path):
    from click.testing import CliRunner

    from ftdeploy.cli import cli

    base = local_base_with_template(tmp_path / "base", ALPACA)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["train-and-serve", "--runs-dir", str(runs), "--base-model", str(base),
                                      "--engine", "hf", "--ollama-host", "http://127.0.0.1:9"])
    assert result.exit_code == TemplateError.exit_code, result.output
    assert "matches no supported format" in result.output and "Closest: " in result.output
    assert str(base) in result.output
    assert not list(runs.glob("*/data")), "the data stage must not have started"


def test_the_check_reads_a_local_base_and_skips_a_hub_id_not_downloaded(tmp_path):
    from ftdeploy.config import config_from_dict
    from ftdeploy.pipeline.context import Context
    from ftdeploy.pipeline.preflight import _base_chat_template, check_chat_template

    base = local_base_with_template(tmp_path / "base", (TEMPLATES / "gemma3.jinja").read_text())
    for spec, expected in ((str(base), str(base)), ("ftdeploy-tests/never-downloaded-7f3a", None)):
        cfg = config_from_dict({"base_model": spec, "runs_dir": str(tmp_path / "runs")})
        ctx = Context.create(cfg, ollama_explicit=False)
        try:
            found = _base_chat_template(ctx)
            assert (found and found[-1]) == expected  # where it was read, last
            check_chat_template(ctx)  # gemma: supported; the Hub id: nothing to read, no error
        finally:
            ctx.close()


def test_a_gguf_base_is_checked_from_its_header_alone(tmp_path):
    """The header's key/values are read without gguf's full reader (which indexes every tensor first)."""
    gguf = pytest.importorskip("gguf")
    from ftdeploy.chat_template import ChatTemplate, mapping_for_template, read_gguf_chat_template

    path = tmp_path / "base.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.context_length", 64)
    writer.add_array("llama.some_ints", [1, 2, 3])
    writer.add_token_list(["<unk>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(4)
    writer.add_chat_template((TEMPLATES / "gemma3.jinja").read_text())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    chat = read_gguf_chat_template(path)
    assert chat == ChatTemplate((TEMPLATES / "gemma3.jinja").read_text(), "<bos>", "<eos>")
    assert mapping_for_template(chat, "gguf").format.name == "gemma"


def test_a_template_marking_the_assistant_turns_for_training_is_read_as_transformers_reads_it():
    marked = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
              "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    assert match_chat_template(jinja_renderer(marked)).format.name == "chatml"


# ------------------------------------------------------------------ verify's template parity on these formats


class _ThinkingClient:
    """Ollama with a reasoning model: both endpoints split the thinking off the answer."""

    def __init__(self, chat_thinking="Colors."):
        self.chat_thinking = chat_thinking

    def generate(self, model, prompt, raw=False, options=None, keep_alive=None):
        return {"response": "" if prompt == "" else "Red.", "thinking": "" if prompt == "" else "Colors."}

    def chat(self, model, messages, options=None, keep_alive=None, tools=None):
        return {"message": {"content": "Red.", "thinking": self.chat_thinking}}


def test_parity_compares_the_thinking_too_and_skips_chats_the_training_template_refuses():
    from ftdeploy.stages.verify import PARITY_CHATS, template_parity

    gemma2 = _render("gemma2")
    result = template_parity(_ThinkingClient(), "m", gemma2, "<bos>", PARITY_CHATS)
    assert result.passed and result.checked == 2, "the system chat is not one Gemma 2 was trained on"
    result = template_parity(_ThinkingClient(chat_thinking="Shapes."), "m", _render("qwen3"), None, PARITY_CHATS)
    assert not result.passed and result.mismatches[0].raw == "<think>Colors.</think>Red."


def test_a_system_prompt_for_a_template_that_takes_none_is_warned_about(caplog, tmp_path):
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.stages.modelfile import build_spec

    spec = build_spec(_mapping("gemma2"), tmp_path / "m.gguf", ModelfileConfig(), "Be brief.", {})
    assert spec.system == "Be brief." and spec.chat_format == "gemma"
    assert "takes no system prompt" in caplog.text
    caplog.clear()
    build_spec(_mapping("gemma3"), tmp_path / "m.gguf", ModelfileConfig(), "Be brief.", {})
    assert "takes no system prompt" not in caplog.text


def _random_chats(family, seed, count=25):
    """Alternating chats of 1-4 exchanges ending with the user, some with a system prompt, some (reasoning
    formats) with thinking on earlier answers, the words drawn from text that templates treat specially."""
    import random

    rng = random.Random(seed)
    words = ["port", "7341", "Zephyr", "<b>", "'quoted'", '"double"', "{json: 1}", "a\nb", "é", "[INST]?", "x"]
    chats = []
    for _ in range(count):
        chat = []
        if family not in NO_SYSTEM_TRAINED and rng.random() < 0.5:
            chat.append({"role": "system", "content": " ".join(rng.choices(words, k=3))})
        for turn in range(rng.randint(1, 4)):
            if turn:
                answer = {"role": "assistant", "content": " ".join(rng.choices(words, k=4))}
                if family in REASONING and rng.random() < 0.5:
                    answer["thinking"] = " ".join(rng.choices(words, k=5))
                chat.append(answer)
            chat.append({"role": "user", "content": " ".join(rng.choices(words, k=4))})
        chats.append(chat)
    return chats


@pytest.mark.parametrize("family", FAMILIES)
def test_random_chats_render_as_training_rendered_them(family):
    """Training template and mirror agree on many chats, not only the probes."""
    mapping = _mapping(family)
    for chat in _random_chats(family, seed=len(family)):
        assert mapping.render(chat) == _training_text(family, mapping, chat), chat


@pytest.mark.parametrize("family", FAMILIES)
def test_random_chats_render_through_ollama_as_the_mirror_does(family, ollama_render):
    mapping = _mapping(family)
    chats = _random_chats(family, seed=len(family))
    requests = [{"template": mapping.ollama_template(),
                 "messages": [{"role": "system", "content": mapping.default_system}, *chat]
                 if mapping.default_system is not None and chat[0]["role"] != "system" else chat} for chat in chats]
    for chat, result in zip(chats, ollama_render(requests), strict=True):
        assert result.get("prompt") == mapping.render(chat), chat


# ------------------------------------------------------------------ tools (Qwen3)

# Exact where the spec is written in the usual key order with its properties (and a call's arguments) in name order:
# Ollama hands the template maps, which it ranges over by key.
LOOKUP_PORT = {"type": "function", "function": {
    "name": "lookup_port", "description": "The port a service listens on.",
    "parameters": {"type": "object", "properties": {"proto": {"type": "string", "enum": ["tcp", "udp"]},
                                                    "service": {"type": "string", "description": "Its name."}},
                   "required": ["service"]}}}
# Ollama's message fields: an answer's tool_calls, a tool result's tool_name.
TOOL_CHAT = [{"role": "user", "content": "What port does zephyr use?"},
             {"role": "assistant", "content": "",
              "tool_calls": [{"id": "c0ffee001",
                              "function": {"name": "lookup_port", "arguments": {"service": "zephyr"}}}]},
             {"role": "tool", "content": "7341", "tool_name": "lookup_port", "tool_call_id": "c0ffee001"},
             {"role": "assistant", "content": "Zephyr uses port 7341."},
             {"role": "user", "content": "And kafka, over udp?"}]
TOOL_LOOP = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Ports of a and b?"},
             {"role": "assistant", "content": "Looking both up.", "thinking": "Two lookups.",
              "tool_calls": [{"id": "c0ffee002", "function": {"name": "lookup_port",
                                                              "arguments": {"proto": "tcp", "service": "a"}}},
                             {"id": "c0ffee003", "function": {"name": "lookup_port", "arguments": {"service": "b"}}}]},
             {"role": "tool", "content": "1", "tool_name": "lookup_port", "tool_call_id": "c0ffee002"},
             {"role": "tool", "content": "2", "tool_name": "lookup_port", "tool_call_id": "c0ffee003"}]


def _tool_requests(mapping, chats):
    return [{"template": mapping.ollama_template(), "messages": chat, "tools": [LOOKUP_PORT]} for chat in chats]


@pytest.mark.parametrize("family", sorted(TOOLS))
def test_tools_render_as_training_rendered_them(family):
    mapping = _mapping(family)
    assert mapping.tools
    render = _render(family)
    loop = TOOL_LOOP if family in REASONING else [{k: v for k, v in m.items() if k != "thinking"} for m in TOOL_LOOP]
    if family == "llama3.1":  # "This model only supports single tool-calls at once!"
        loop = [{**m, "tool_calls": m["tool_calls"][:1]} if m.get("tool_calls") else m for m in loop[:-1]]
    bos = FAMILIES[family][0] if mapping.format.bos_in_template else ""  # Ollama's runner adds BOS from the GGUF

    def training(chat, tools):
        return render(training_messages(chat), True, tools=tools).removeprefix(bos)

    for chat in (TOOL_CHAT, loop, [{"role": "system", "content": "S"}, *TOOL_CHAT]):
        assert mapping.render(chat, tools=[LOOKUP_PORT]) == training(chat, [LOOKUP_PORT]), chat
    calls = {"llama3.1": '{"name": "lookup_port", "parameters": {"service": "zephyr"}}',
             "mistral-v3": '[TOOL_CALLS] [{"name": "lookup_port", "arguments": {"service": "zephyr"}, '
                           '"id": "c0ffee001"}]'}
    calls["mistral-v7"] = calls["mistral-v3"]
    call = calls.get(family, '<tool_call>\n{"name": "lookup_port", "arguments": {"service": "zephyr"}}\n</tool_call>')
    assert call in mapping.render(TOOL_CHAT, tools=[LOOKUP_PORT])
    unsorted = {"type": "function", "function": {**LOOKUP_PORT["function"], "parameters": {
        "type": "object", "properties": dict(reversed(LOOKUP_PORT["function"]["parameters"]["properties"].items()))}}}
    if family != "mistral-v7":  # which lists no tool specs, so their key order cannot matter
        assert mapping.render(TOOL_CHAT, tools=[unsorted]) != training(TOOL_CHAT, [unsorted])


def test_formats_without_tools_ignore_them():
    for family in set(FAMILIES) - TOOLS:
        mapping = _mapping(family)
        assert not mapping.tools and mapping.render(MULTI, tools=[LOOKUP_PORT]) == mapping.render(MULTI), family


@pytest.mark.parametrize("family", sorted(TOOLS))
def test_tools_render_through_ollama_and_a_reply_parses_into_tool_calls(family, ollama_render):
    mapping = _mapping(family)
    chats = [TOOL_CHAT, [{"role": "system", "content": "S"}, *TOOL_CHAT], MULTI]
    requests = _tool_requests(mapping, chats)
    if mapping.default_system is not None:  # Ollama adds the Modelfile's SYSTEM
        for request in requests:
            if request["messages"][0]["role"] != "system":
                request["messages"] = [{"role": "system", "content": mapping.default_system}, *request["messages"]]
    for chat, result in zip(chats, ollama_render(requests), strict=True):
        assert result.get("prompt") == mapping.render(chat, tools=[LOOKUP_PORT]), chat
        assert "tools" in result["vars"], "Ollama gives the model the tools capability"
    [parsed] = ollama_render([{**requests[0], "reply": TOOL_REPLY.get(family, QWEN_REPLY)}])
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["lookup_port"]
    assert parsed["tool_calls"][0]["function"]["arguments"] == {"service": "kafka", "proto": "udp"}


def test_formats_without_tools_give_ollama_no_tools_capability(ollama_render):
    families = sorted(set(FAMILIES) - TOOLS)
    results = ollama_render([_tool_requests(_mapping(family), [MULTI])[0] for family in families])
    for family, result in zip(families, results, strict=True):
        assert "tools" not in result["vars"], family


def test_a_template_that_writes_tools_its_own_way_keeps_the_format_without_tools(ollama_render):
    text = (TEMPLATES / "qwen3.jinja").read_text().replace("You may call one or more functions", "You may call tools")
    mapping = match_chat_template(jinja_renderer(text, "", "<|im_end|>"), None)
    assert mapping.format.name == "qwen3" and not mapping.tools
    [result] = ollama_render(_tool_requests(mapping, [TOOL_CHAT]))
    assert "tools" not in result["vars"], "no tools capability: Ollama refuses tool requests instead of guessing"
