"""Map the chat template a model was trained with to an Ollama TEMPLATE and stop tokens.

The mapping is derived from the template itself, never from the model's name: probe
conversations made of sentinel strings are rendered through the training template and
compared with each known chat format. What the template adds on its own (a default system
prompt, a fixed preamble inside the system block, a system block it always emits) is read
off those renderings and carried into the Modelfile. A template that matches no known
format is an error, not a guess; the error names the format that came closest and where
the renderings part.

Each format is declared once, in FORMATS: how its turns are written (`ChatFormat.render`, the
Python mirror of its Ollama template), what ends a turn (its stop tokens), and its Ollama
template file under modelfiles/, which renders exactly what the mirror renders. Reasoning
formats (Qwen3, DeepSeek-R1) and Qwen's tool layout (ChatML, Qwen3) are probed the same way:
earlier reasoning must be dropped, and a probe tool, call and result written, as the mirror does.

Pure: no torch, no transformers. The caller passes a `render(messages, add_generation_prompt)`
function (e.g. a tokenizer's `apply_chat_template(..., tokenize=False)`); chat_template.py reads a model's
template from its files and matches it here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .assets import asset
from .errors import TemplateError

# role, content; an assistant message may carry "thinking" and "tool_calls", a tool message "tool_name" (Ollama's
# message fields)
Message = dict[str, Any]
Tool = dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}
RenderFn = Callable[[list[Message], bool], str]  # may also take tools=[...] (jinja_renderer's and the tokenizer's do)

# Sentinels that no template would produce by itself.
_S = "\u27e6sys-7f3a\u27e7"
_U1, _A1 = "\u27e6user-one\u27e7", "\u27e6assistant-one\u27e7"
_U2, _A2 = "\u27e6user-two\u27e7", "\u27e6assistant-two\u27e7"
_R1 = "\u27e6reasoning-one\u27e7"

SystemPlacement = Literal["turn", "first_user", "last_user"]
Reasoning = Literal["qwen3", "r1"]
ToolStyle = Literal["qwen", "llama3", "mistral", "mistral-v7"]


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: how each turn is written, what ends a turn, and its Ollama template file.

    A turn is `open + content + close`, looked up by role ("*" for any role, `{role}` filled in);
    roles with no entry are not written. The last message, when it is the assistant's, is left open
    (Ollama continues it); otherwise the generation prompt follows.
    """

    name: str
    opens: dict[str, str] = field(hash=False)
    closes: dict[str, str] = field(hash=False)
    generation_prompt: str
    stops: tuple[str, ...]  # stops[0] ends an assistant turn: the model must emit it, so it is trained
    template_file: str
    bos_in_template: bool = False  # the training template starts with the tokenizer's BOS (Ollama adds it)
    # Where a leading system message goes: its own turn, or folded (with system_join) into the first user
    # turn (Gemma) or into the user turn that ends the chat (Mistral v3; dropped when the chat ends otherwise).
    system: SystemPlacement = "turn"
    system_join: str = "\n\n"
    # Reasoning models: how earlier assistant turns lose their reasoning and how a turn's thinking is written.
    reasoning: Reasoning | None = None
    # Formats whose template renders tools (the request's .Tools, an answer's .ToolCalls, tool results).
    tools: ToolStyle | None = None
    # False where the format's own template changes earlier text as turns are added (earlier answers lose their
    # reasoning, the system prompt moves to the last user turn, EOS follows the final turn only): the data stage
    # then finds each assistant turn by replacing it, not by rendering the chat turn by turn.
    turn_by_turn: bool = True

    def open(self, role: str) -> str | None:
        text = self.opens.get(role, self.opens.get("*"))
        return None if text is None else text.replace("{role}", role)

    def close(self, role: str) -> str:
        return self.closes.get(role, self.closes.get("*", ""))

    @property
    def markers(self) -> str:
        """Every literal the format writes around content (a pad token must be none of them)."""
        return "".join([*self.opens.values(), *self.closes.values(), self.generation_prompt])

    def system_block(self, system_prefix: str) -> str | None:
        """The system turn with empty content (what a template that always writes one writes)."""
        opened = self.open("system")
        if self.system != "turn" or opened is None:
            return None
        return opened + system_prefix + self.close("system")

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        system_prefix: str = "",
        implicit_system: str = "",
        think: bool | None = None,
        tools: list[Tool] | None = None,
        tool_turns: bool = False,
    ) -> str:
        """What the Ollama TEMPLATE of this format produces (mirrors modelfiles/<template_file>).

        Like Ollama, it always ends with the generation prompt unless the last message is the
        assistant's; `add_generation_prompt` is accepted for the RenderFn shape. `think` is Ollama's
        request flag: False (set and off) closes an empty think block after the generation prompt
        where the format has one (Qwen3's enable_thinking=False). `tool_turns`: the format's tool rendering
        is on (the training template writes tools as the format does); `tools` are the request's."""
        del add_generation_prompt
        layout = _TOOL_LAYOUTS[self.tools] if tool_turns and self.tools else _NO_TOOLS
        chat = _Chat(self, messages, layout, tools if layout is not _NO_TOOLS else None, system_prefix)
        out = [chat.head(implicit_system)]
        for i, m in enumerate(messages):
            if i == 0 and chat.skips_first:
                continue
            out.append(chat.turn(i))
            if i == len(messages) - 1 and m["role"] != "assistant":
                out.append(self.generation_prompt)
                if think is False and self.reasoning == "qwen3":
                    out.append("<think>\n\n</think>\n\n")
        return "".join(out)


class _Chat:
    """One rendering of a chat in a format (ChatFormat.render): where the system prompt goes, and each turn as the
    format writes it, with the format's tool layout (the base layout, writing no tools, where that is off)."""

    def __init__(self, fmt: ChatFormat, messages: list[Message], layout: _ToolLayout, tools: list[Tool] | None,
                 system_prefix: str):
        self.fmt, self.messages, self.layout = fmt, messages, layout
        self.tools = tools or []  # the request's tools; none given and an empty list are the same
        self.leading_system = bool(messages) and messages[0]["role"] == "system"
        self.system_prefix = layout.system_prefix(system_prefix) if self.tools else system_prefix
        self.folded = self.leading_system and fmt.system != "turn"  # into a user turn
        self.first_turn = 1 if self.leading_system else 0  # the first after the system's
        self.last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        # the leading system message is not a turn of its own: folded, or written with the tools (Qwen)
        self.skips_first = self.folded or (self.leading_system and bool(self.tools) and layout.system_in_head)

    def head(self, implicit_system: str) -> str:
        """What comes before the first turn: the tools' head where the request lists tools and the layout has
        one, else the implicit system block where the chat has no system prompt."""
        head = self.layout.head(self) if self.tools else None
        if head is not None:
            return head
        return "" if self.leading_system else implicit_system

    def turn(self, i: int) -> str:
        """Message `i`: open, content and close (an assistant's last message is left open)."""
        fmt, m = self.fmt, self.messages[i]
        role, last = m["role"], i == len(self.messages) - 1
        if role == "tool" and (result := self.layout.tool_result(self, i)) is not None:
            return result
        opened = fmt.open(role)
        if opened is None:
            return ""
        content = m["content"]
        if role == "system":
            content = self.system_prefix + content
        elif role == "user" and self.folded and (
                (fmt.system == "first_user" and i == 1) or (fmt.system == "last_user" and last)):
            content = self.system_prefix + self.messages[0]["content"] + fmt.system_join + content
        elif role == "assistant":
            content = self.assistant_content(m, after_last_user=i > self.last_user, last=last)
            if m.get("tool_calls"):
                opened, content = self.layout.tool_calls(m, opened, content)
        if self.tools:
            opened, content = self.layout.before_turn(self, i, opened, content)
        return opened + content + ("" if last and role == "assistant" else fmt.close(role))

    def assistant_content(self, m: Message, after_last_user: bool, last: bool) -> str:
        thinking = m.get("thinking", "")
        if self.fmt.reasoning == "qwen3" and after_last_user and (last or thinking):
            # Qwen3 writes the reasoning of turns after the last user message (tool loops, a continued turn).
            return f"<think>\n{thinking}\n</think>\n\n" + m["content"]
        if self.fmt.reasoning == "r1" and thinking:
            # R1 distills keep what followed </think> in an earlier turn: the blank line the model wrote there.
            return "\n\n" + m["content"]
        return m["content"]


class _ToolLayout:
    """How a format writes tools: the request's tools, an answer's calls, a tool's result. This base writes none (a
    format without a tool layout, or with its tool rendering off: tool messages are turns like any other); each
    ToolStyle's layout (_TOOL_LAYOUTS) overrides what it writes its own way."""

    system_in_head = False  # the head holds the leading system message (written there with the tools)

    def system_prefix(self, prefix: str) -> str:
        """The system prefix when the request lists tools."""
        return prefix

    def head(self, chat: _Chat) -> str | None:
        """What opens the prompt when the request lists tools; None: what opens it without tools."""
        return None

    def tool_result(self, chat: _Chat, i: int) -> str | None:
        """Tool message `i`; None: a turn like any other."""
        return None

    def tool_calls(self, m: Message, opened: str, content: str) -> tuple[str, str]:
        """An assistant turn's open and content, with its tool calls."""
        return opened, content

    def before_turn(self, chat: _Chat, i: int, opened: str, content: str) -> tuple[str, str]:
        """Turn `i`'s open and content when the request lists tools (where a layout lists them in a turn)."""
        return opened, content


class _QwenTools(_ToolLayout):
    """Qwen2.5's layout (ChatML, Qwen3): tools in the system turn, calls as <tool_call> blocks after the content,
    results as <tool_response> blocks, consecutive ones in one user turn."""

    system_in_head = True

    def head(self, chat: _Chat) -> str:
        system = chat.system_prefix + chat.messages[0]["content"] if chat.leading_system else None
        return _qwen_tools_block(chat.fmt, chat.tools, system)

    def tool_result(self, chat: _Chat, i: int) -> str:
        fmt, messages = chat.fmt, chat.messages  # consecutive results: one user turn
        opened = "\n" if i > 0 and messages[i - 1]["role"] == "tool" else fmt.open("user") or ""
        closed = "" if i + 1 < len(messages) and messages[i + 1]["role"] == "tool" else fmt.close("user")
        return opened + f"<tool_response>\n{messages[i]['content']}\n</tool_response>" + closed

    def tool_calls(self, m: Message, opened: str, content: str) -> tuple[str, str]:
        calls = [_qwen_tool_call(call) for call in m["tool_calls"]]
        return opened, content + ("\n" if m["content"] else "") + "\n".join(calls)


class _Llama3Tools(_ToolLayout):
    """Llama 3.1's layout: tools mean the ipython environment (a system turn says so) and are listed at the head of
    the turn after the system's; calls as JSON in place of the content; results in ipython turns."""

    def system_prefix(self, prefix: str) -> str:
        return "Environment: ipython\n" + prefix

    def head(self, chat: _Chat) -> str | None:
        return None if chat.leading_system else chat.fmt.system_block(chat.system_prefix) or ""

    def tool_result(self, chat: _Chat, i: int) -> str:
        return (chat.fmt.open("ipython") or "") + _go_json(chat.messages[i]["content"]) + chat.fmt.close("ipython")

    def tool_calls(self, m: Message, opened: str, content: str) -> tuple[str, str]:
        return opened, "".join(_llama3_tool_call(call) for call in m["tool_calls"])  # the content is dropped

    def before_turn(self, chat: _Chat, i: int, opened: str, content: str) -> tuple[str, str]:
        if i != chat.first_turn:
            return opened, content
        return opened, _LLAMA3_TOOLS_INTRO + "".join(_llama3_tool_json(t) + "\n\n" for t in chat.tools) + content


class _MistralCalls(_ToolLayout):
    """Mistral's calls ([TOOL_CALLS] in place of the turn) and results ([TOOL_RESULTS]), v3's and v7's alike."""

    def tool_result(self, chat: _Chat, i: int) -> str:
        m = chat.messages[i]
        return ('[TOOL_RESULTS] {"content": ' + m["content"] + ', "call_id": "' + str(m.get("tool_call_id", ""))
                + '"}[/TOOL_RESULTS]')

    def tool_calls(self, m: Message, opened: str, content: str) -> tuple[str, str]:
        return "", _mistral_tool_calls(m["tool_calls"])  # no space before the calls


class _MistralTools(_MistralCalls):
    """Mistral v3: [AVAILABLE_TOOLS] before the last user turn."""

    def before_turn(self, chat: _Chat, i: int, opened: str, content: str) -> tuple[str, str]:
        return (_mistral_tools_block(chat.tools) + opened if i == chat.last_user else opened), content


class _MistralV7Tools(_MistralCalls):
    """Mistral Small 3: a parallel-call prompt opens the system turn (one of its own where the chat has none); the
    tools themselves are not listed."""

    def system_prefix(self, prefix: str) -> str:
        # Nothing between them: the template's separator is two backslash-newlines, which Jinja drops.
        return _MISTRAL_V7_TOOLS_PROMPT + prefix

    def head(self, chat: _Chat) -> str | None:
        return None if chat.leading_system else chat.fmt.system_block(_MISTRAL_V7_TOOLS_PROMPT)  # the prompt alone


_NO_TOOLS = _ToolLayout()
_TOOL_LAYOUTS: dict[ToolStyle, _ToolLayout] = {
    "qwen": _QwenTools(), "llama3": _Llama3Tools(), "mistral": _MistralTools(), "mistral-v7": _MistralV7Tools()}


def _go_json(value: Any) -> str:
    """What Ollama's `json` template function writes: Go's json.Marshal (compact, map keys sorted, <>& escaped)."""
    return _html_escape(json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True))


def _py_list(values: list[Any]) -> str:
    return "[" + ", ".join(_go_json(v) for v in values) + "]"


def _tool_json(tool: Tool) -> str:
    """A tool as modelfiles/qwen3.tmpl writes it: as Python's json.dumps writes a spec in the usual key order
    (type, function: name, description, parameters: type, properties by name, required)."""
    function = tool.get("function", {})
    parameters = function.get("parameters") or {}
    text = '{"type": ' + _go_json(tool.get("type", "")) + ', "function": {"name": ' + _go_json(function.get("name", ""))
    if function.get("description"):
        text += ', "description": ' + _go_json(function["description"])
    return text + ', "parameters": ' + _parameters_json(parameters) + "}}"


def _parameters_json(parameters: dict[str, Any]) -> str:
    """A tool's parameters as json.dumps writes them in the usual key order (type, properties by name, required)."""
    properties = []
    for name, prop in sorted((parameters.get("properties") or {}).items()):
        item = _go_json(name) + ': {"type": ' + _go_json(prop.get("type", ""))
        if prop.get("description"):
            item += ', "description": ' + _go_json(prop["description"])
        if prop.get("enum"):
            item += ', "enum": ' + _py_list(prop["enum"])
        properties.append(item + "}")
    text = '{"type": ' + _go_json(parameters.get("type", "")) + ', "properties": {' + ", ".join(properties) + "}"
    if parameters.get("required"):
        text += ', "required": ' + _py_list(parameters["required"])
    return text + "}"


def _mistral_tools_block(tools: list[Tool]) -> str:
    """Mistral v3's [AVAILABLE_TOOLS]: each function's name and description written raw, its parameters as JSON."""
    listed = []
    for tool in tools:
        function = tool.get("function", {})
        text = '{"type": "function", "function": {"name": "' + function.get("name", "") + '"'
        if function.get("description"):
            text += ', "description": "' + function["description"] + '"'
        listed.append(text + ', "parameters": ' + _parameters_json(function.get("parameters") or {}) + "}}")
    return "[AVAILABLE_TOOLS] [" + ", ".join(listed) + "][/AVAILABLE_TOOLS]"


def _mistral_tool_calls(calls: list[dict[str, Any]]) -> str:
    """Mistral's [TOOL_CALLS]: each call's function as JSON, with the call's id (nine characters in its data)."""
    written = []
    for call in calls:
        function = call.get("function", call)
        written.append('{"name": "' + function["name"] + '", "arguments": '
                       + _arguments_json(function.get("arguments")) + ', "id": "' + str(call.get("id", "")) + '"}')
    return "[TOOL_CALLS] [" + ", ".join(written) + "]"


def _qwen_tool_call(call: dict[str, Any]) -> str:
    function = call.get("function", call)
    return f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {_arguments_json(function.get("arguments"))}}}' \
        "\n</tool_call>"


def _arguments_json(arguments: dict[str, Any] | None) -> str:
    """Call arguments as modelfiles/*.tmpl's "arguments" writes them: keys in name order, json.dumps's separators."""
    return "{" + ", ".join(f"{_go_json(k)}: {_go_json(v)}" for k, v in sorted((arguments or {}).items())) + "}"


_MISTRAL_V7_TOOLS_PROMPT = (
    "You are a helpful assistant that can call tools. If you call one or more tools, format them in a single JSON "
    "array or objects, where each object is a tool call, not as separate objects outside of an array or multiple "
    "arrays. Use the format [{\"name\": tool call name, \"arguments\": tool call arguments}, additional tool calls] if "
    "you call more than one tool. If you call tools, do not attempt to interpret them or otherwise provide a response "
    "until you receive a tool call result that you can interpret for the user.")

_LLAMA3_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.Do not use variables.\n\n")


def _llama3_tool_call(call: dict[str, Any]) -> str:
    function = call.get("function", call)
    return '{"name": "' + function["name"] + '", "parameters": ' + _arguments_json(function.get("arguments")) + "}"


def _llama3_tool_json(tool: Tool) -> str:
    """A tool as Llama 3.1's template writes it (tojson(indent=4)) and modelfiles/llama3.tmpl's "tool4" does: the
    usual key order (type, function: name, description, parameters: type, properties by name, required)."""
    function = tool.get("function", {})
    parameters = function.get("parameters") or {}
    properties = {}
    for name, prop in sorted((parameters.get("properties") or {}).items()):
        item: dict[str, Any] = {"type": prop.get("type", "")}
        if prop.get("description"):
            item["description"] = prop["description"]
        if prop.get("enum"):
            item["enum"] = prop["enum"]
        properties[name] = item
    spec: dict[str, Any] = {"name": function.get("name", "")}
    if function.get("description"):
        spec["description"] = function["description"]
    spec["parameters"] = {"type": parameters.get("type", ""), "properties": properties}
    if parameters.get("required"):
        spec["parameters"]["required"] = parameters["required"]
    text = json.dumps({"type": tool.get("type", ""), "function": spec}, indent=4, ensure_ascii=False)
    return _html_escape(text)


def _html_escape(text: str) -> str:
    """Go's json.Marshal escapes these in strings (they cannot appear outside strings in JSON)."""
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                          ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _qwen_tools_block(fmt: ChatFormat, tools: list[Tool], system: str | None) -> str:
    listed = "".join("\n" + _tool_json(tool) for tool in tools)
    return ((fmt.open("system") or "") + (system + "\n\n" if system is not None else "")
            + "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + listed
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>" + fmt.close("system"))


CHATML = ChatFormat(
    name="chatml",
    opens={"*": "<|im_start|>{role}\n"},
    closes={"*": "<|im_end|>\n"},
    generation_prompt="<|im_start|>assistant\n",
    stops=("<|im_end|>", "<|im_start|>"),
    template_file="chatml.tmpl",
    tools="qwen",  # Qwen2.5's tool layout, where the template has it
)
LLAMA3 = ChatFormat(
    name="llama3",
    opens={"*": "<|start_header_id|>{role}<|end_header_id|>\n\n"},
    closes={"*": "<|eot_id|>"},
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"),
    template_file="llama3.tmpl",
    bos_in_template=True,
    tools="llama3",  # Llama 3.1's tool layout, where the template has it
)
GEMMA = ChatFormat(
    name="gemma",
    opens={"*": "<start_of_turn>{role}\n", "assistant": "<start_of_turn>model\n"},
    closes={"*": "<end_of_turn>\n"},
    generation_prompt="<start_of_turn>model\n",
    stops=("<end_of_turn>", "<start_of_turn>"),
    template_file="gemma.tmpl",
    bos_in_template=True,
    system="first_user",
)
MISTRAL_V3 = ChatFormat(
    name="mistral-v3",
    opens={"user": "[INST] ", "assistant": " "},
    closes={"user": "[/INST]", "assistant": "</s>"},
    generation_prompt="",
    stops=("</s>", "[INST]"),
    template_file="mistral-v3.tmpl",
    bos_in_template=True,
    system="last_user",
    turn_by_turn=False,
    tools="mistral",  # Mistral v3's layout, where the template has it
)
MISTRAL_V3_TEKKEN = ChatFormat(
    name="mistral-v3-tekken",
    opens={"user": "[INST]", "assistant": ""},
    closes={"user": "[/INST]", "assistant": "</s>"},
    generation_prompt="",
    stops=("</s>", "[INST]"),
    template_file="mistral-v3-tekken.tmpl",
    bos_in_template=True,
    system="last_user",
    turn_by_turn=False,
)
MISTRAL_V7 = ChatFormat(
    name="mistral-v7",
    opens={"system": "[SYSTEM_PROMPT]", "user": "[INST]", "assistant": ""},
    closes={"system": "[/SYSTEM_PROMPT]", "user": "[/INST]", "assistant": "</s>"},
    generation_prompt="",
    stops=("</s>", "[INST]"),
    template_file="mistral-v7.tmpl",
    bos_in_template=True,
    tools="mistral-v7",  # Mistral Small 3's layout: a parallel-call prompt opens the system turn, no tool list
)
PHI3 = ChatFormat(
    name="phi3",
    opens={"*": "<|{role}|>\n"},
    closes={"*": "<|end|>\n"},
    generation_prompt="<|assistant|>\n",
    stops=("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"),
    template_file="phi3.tmpl",
    bos_in_template=True,  # Phi-3 mini's first templates began with BOS; later ones do not
    turn_by_turn=False,
)
PHI4_MINI = ChatFormat(
    name="phi4-mini",
    opens={"*": "<|{role}|>"},
    closes={"*": "<|end|>"},
    generation_prompt="<|assistant|>",
    stops=("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"),
    template_file="phi4-mini.tmpl",
    turn_by_turn=False,
)
PHI4 = ChatFormat(
    name="phi4",
    opens={"*": "<|im_start|>{role}<|im_sep|>"},
    closes={"*": "<|im_end|>"},
    generation_prompt="<|im_start|>assistant<|im_sep|>",
    stops=("<|im_end|>", "<|im_start|>", "<|im_sep|>"),
    template_file="phi4.tmpl",
)
QWEN3 = ChatFormat(
    name="qwen3",
    opens={"*": "<|im_start|>{role}\n"},
    closes={"*": "<|im_end|>\n"},
    generation_prompt="<|im_start|>assistant\n",
    stops=("<|im_end|>", "<|im_start|>"),
    template_file="qwen3.tmpl",
    reasoning="qwen3",
    tools="qwen",
    turn_by_turn=False,
)
DEEPSEEK_R1 = ChatFormat(
    name="deepseek-r1",
    opens={"system": "", "user": "<\uff5cUser\uff5c>", "assistant": "<\uff5cAssistant\uff5c>"},
    closes={"assistant": "<\uff5cend\u2581of\u2581sentence\uff5c>"},
    generation_prompt="<\uff5cAssistant\uff5c><think>\n",
    stops=("<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"),
    template_file="deepseek-r1.tmpl",
    bos_in_template=True,
    reasoning="r1",
    turn_by_turn=False,
)
# ChatML after the tokenizer's BOS (LFM2, LFM2-VL: `{{bos_token}}` opens the template): Ollama's tokenizer writes the
# BOS (add_bos_token), the ChatML template the rest. Last, so a ChatML template without BOS stays `chatml`.
CHATML_BOS = dataclasses.replace(CHATML, name="chatml-bos", bos_in_template=True, tools=None)
FORMATS = (CHATML, LLAMA3, GEMMA, MISTRAL_V3, MISTRAL_V3_TEKKEN, MISTRAL_V7, PHI3, PHI4_MINI, PHI4, QWEN3,
           DEEPSEEK_R1, CHATML_BOS)


@dataclass(frozen=True)
class TemplateMapping:
    """The result: the format and what the training template adds on its own."""

    format: ChatFormat
    system_prefix: str = ""  # fixed text before the system content (e.g. Llama 3.2's knowledge-date lines)
    default_system: str | None = None  # system prompt the template inserts when the chat has none
    implicit_system: str = ""  # a system block emitted even with no system prompt (rendered literally)
    trained_system: bool = True  # False: the training template refuses a system message (Gemma 2)
    tools: bool = False  # the format renders tools and the training template renders them as it does

    @property
    def end_of_turn(self) -> str:
        return self.format.stops[0]

    def ollama_template(self) -> str:
        text = asset("modelfiles", self.format.template_file).read_text()
        for literal in (self.system_prefix, self.implicit_system):
            if "{{" in literal or "}}" in literal:
                raise TemplateError(
                    f"chat template text {literal!r} contains '{{{{' or '}}}}', which Ollama templates cannot hold")
        lines = [line for line in text.splitlines(keepends=True) if not line.startswith("{{- /*")]  # maintainer notes
        if not self.implicit_system:
            lines = [line for line in lines if "[[IMPLICIT_SYSTEM]]" not in line]
        text = "".join(lines).rstrip("\n")  # a trailing newline would be rendered after the generation prompt
        if not self.system_prefix:
            text = text.replace('{{ if eq .Role "system" }}[[SYSTEM_PREFIX]]{{ end }}', "")
        text = text.replace("[[SYSTEM_PREFIX]]", self.system_prefix)
        if not self.tools:  # no .Tools left: Ollama reports no tools capability and refuses tool requests
            text = text.replace("{{- $tools := .Tools }}", "{{- $tools := false }}")
            text = text.replace("{{- $toolTurns := true }}", "{{- $toolTurns := false }}")
        text = text.replace("[[TOOLS_PROMPT]]", _MISTRAL_V7_TOOLS_PROMPT)
        return text.replace("[[IMPLICIT_SYSTEM]]", self.implicit_system)

    def render(self, messages: list[Message], add_generation_prompt: bool = True, think: bool | None = None,
               tools: list[Tool] | None = None) -> str:
        """The prompt Ollama builds for `messages` when the Modelfile carries this mapping."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return self.format.render(messages, add_generation_prompt, self.system_prefix, self.implicit_system, think,
                                  tools, tool_turns=self.tools)

    def tool_calls_text(self, calls: list[dict[str, Any]], content: str = "") -> str:
        """An assistant reply holding tool calls as this format writes it after the generation prompt, up to the end
        of the turn: what the model generated before Ollama parsed it into message.tool_calls. A served reply written
        back this way compares, token for token, with a raw or a Hugging Face one. Formats without a tool layout
        get the calls as JSON."""
        if not self.tools:
            return (content + "\n" if content else "") + json.dumps([c.get("function", c) for c in calls])
        ask: list[Message] = [{"role": "user", "content": "?"}]
        head = self.render(ask, True, tools=[_PROBE_TOOL])
        whole = self.render([*ask, {"role": "assistant", "content": content, "tool_calls": calls}], False,
                            tools=[_PROBE_TOOL])
        body = whole[len(head):] if whole.startswith(head) else whole
        return body.split(self.end_of_turn, 1)[0]


def training_messages(messages: list[Message]) -> list[Message]:
    """The same chat as a Hugging Face template takes it: thinking goes back into the content as a
    <think> block (how reasoning models' training data and chat templates carry it), tool calls are typed."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("thinking"):
            m["content"] = f"<think>\n{m['thinking']}\n</think>\n\n{m['content']}"
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", **call} for call in m["tool_calls"]]
        m.pop("thinking", None)
        out.append(m)
    return out


def _strip_bos(text: str, bos: str | None) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def _split_at(rendered: str, sentinel: str) -> tuple[str, str] | None:
    if rendered.count(sentinel) != 1:
        return None
    before, _, after = rendered.partition(sentinel)
    return before, after


_WITH_SYSTEM = [{"role": "system", "content": _S}, {"role": "user", "content": _U1},
                {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]
_NO_SYSTEM = _WITH_SYSTEM[1:]


def _between(text: str, before: str, after: str) -> str | None:
    """What `text` holds between a known start and end, or None when it does not have them."""
    if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
        return text[len(before):len(text) - len(after)]
    return None


_PROBE_TOOL: Tool = {"type": "function", "function": {
    "name": "probe_lookup", "description": "\u27e6tool-description\u27e7",
    "parameters": {"type": "object", "properties": {"key": {"type": "string", "description": "\u27e6key\u27e7"}},
                   "required": ["key"]}}}
_TOOL_CHAT: list[Message] = [
    {"role": "user", "content": _U1},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "probe0001", "function": {
        "name": "probe_lookup", "arguments": {"key": "\u27e6arg\u27e7"}}}]},
    {"role": "tool", "content": "\u27e6result\u27e7", "tool_name": "probe_lookup", "tool_call_id": "probe0001"},
    {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]


def _tools_match(mapping: TemplateMapping, render: RenderFn, bos: str | None) -> bool:
    """The training template writes the probe tools, a call and its result as the format's template does."""
    with_tools = dataclasses.replace(mapping, tools=True)
    for chat in (_TOOL_CHAT, [{"role": "system", "content": _S}, *_TOOL_CHAT]):
        try:
            text = render(training_messages(chat), True, tools=[_PROBE_TOOL])  # type: ignore[call-arg]
        except Exception:  # a renderer that takes no tools, or a template that refuses them
            return False
        if mapping.format.bos_in_template:
            text = _strip_bos(text, bos)
        if text != with_tools.render(chat, tools=[_PROBE_TOOL]):
            return False
    return True


def _try_format(fmt: ChatFormat, render: RenderFn, bos: str | None, eos: str | None) -> TemplateMapping | None:
    mapping = _match_format(fmt, render, bos, eos)
    if mapping is not None and fmt.tools and _tools_match(mapping, render, bos):
        mapping = dataclasses.replace(mapping, tools=True)
    return mapping


def _match_format(fmt: ChatFormat, render: RenderFn, bos: str | None, eos: str | None) -> TemplateMapping | None:
    def hf(messages: list[Message], gen: bool) -> str:
        text = render(training_messages(messages), gen)
        return _strip_bos(text, bos) if fmt.bos_in_template else text

    def mirror(messages: list[Message], prefix: str = "", implicit: str = "") -> str:
        return fmt.render(messages, True, prefix, implicit)

    try:
        with_system: str | None = hf(_WITH_SYSTEM, True)
    except Exception:
        with_system = None  # the template refuses a system message (Gemma 2): read the format off the rest
    prefix = ""
    if with_system is not None:
        parts = _split_at(mirror(_WITH_SYSTEM), _S)
        if parts is None:
            return None
        middle = _between(with_system, *parts)
        if middle is None or not middle.endswith(_S):
            return None
        prefix = middle[: -len(_S)]
        if mirror(_WITH_SYSTEM, prefix) != with_system:
            return None

    # A finished conversation: checks how assistant turns end (the end-of-turn token is trained on). The
    # template may add EOS after the last turn (Phi-3).
    base = _WITH_SYSTEM if with_system is not None else _NO_SYSTEM
    finished = [*base, {"role": "assistant", "content": _A2}]
    expected = mirror(finished, prefix)
    close = fmt.close("assistant")
    endings = {expected, expected + close, *((expected + close + eos, expected + eos) if eos else ())}
    if hf(finished, False) not in endings:
        return None
    if fmt.reasoning and not _reasoning_matches(fmt, hf, prefix):
        return None

    text = hf(_NO_SYSTEM, True)
    if mirror(_NO_SYSTEM, prefix) == text:
        return TemplateMapping(fmt, system_prefix=prefix, trained_system=with_system is not None)
    if with_system is None:
        return None
    parts = _split_at(mirror([{"role": "system", "content": _S}, *_NO_SYSTEM], prefix), _S)
    default = None if parts is None else _between(text, *parts)
    if default is None or mirror([{"role": "system", "content": default}, *_NO_SYSTEM], prefix) != text:
        return None
    if default:
        return TemplateMapping(fmt, system_prefix=prefix, default_system=default)
    # The template writes a system block (prefix only) even when the chat has no system prompt.
    implicit = fmt.system_block(prefix)
    if implicit is None or mirror(_NO_SYSTEM, prefix, implicit) != text:
        return None
    return TemplateMapping(fmt, system_prefix=prefix, implicit_system=implicit)


def _reasoning_matches(fmt: ChatFormat, hf: Callable[[list[Message], bool], str], prefix: str) -> bool:
    """Reasoning in an earlier turn is dropped as the mirror drops it, and (Qwen3) written back in a turn
    after the last user message (a continued turn, ended by the template or left open by Ollama)."""
    thought = {"role": "assistant", "content": _A1, "thinking": _R1}
    earlier = [{"role": "user", "content": _U1}, thought, {"role": "user", "content": _U2}]
    if hf(earlier, True) != fmt.render(earlier, True, prefix):
        return False
    continued = earlier[:2]
    expected = fmt.render(continued, False, prefix)
    return hf(continued, False) in (expected, expected + fmt.close("assistant"))


def _closest(render: RenderFn, bos: str | None) -> str:
    """Which format renders the probe chats most like the template does, and where the two first part."""
    thought = {"role": "assistant", "content": _A1, "thinking": _R1}
    probes = [(_WITH_SYSTEM, True), (_NO_SYSTEM, True), ([*_NO_SYSTEM, {"role": "assistant", "content": _A2}], False),
              ([{"role": "user", "content": _U1}, thought], False)]
    best: tuple[float, str] | None = None
    for fmt in FORMATS:
        ratios, first_difference = [], ""
        for chat, gen in probes:
            try:
                text = render(training_messages(chat), gen)
            except Exception:
                continue
            text = _strip_bos(text, bos) if fmt.bos_in_template else text
            ours = fmt.render(chat, gen) + ("" if gen else fmt.close("assistant"))
            ratios.append(difflib.SequenceMatcher(None, text, ours, autojunk=False).ratio())
            common = 0
            while common < min(len(text), len(ours)) and text[common] == ours[common]:
                common += 1
            if not first_difference and text != ours:
                theirs_next, ours_next = text[common:common + 40], ours[common:common + 40]
                first_difference = (f"the same for the first {common} characters, then the template writes "
                                    f"{theirs_next!r} where {fmt.name} writes {ours_next!r}")
        if ratios:
            score = sum(ratios) / len(ratios)
            if best is None or score > best[0]:
                best = (score, f"{fmt.name} ({score:.1%} alike; {first_difference or 'no difference on these probes'})")
    return best[1] if best else "none (the template raised on every probe)"


def match_chat_template(render: RenderFn, bos_token: str | None = None, source: str = "chat template",
                        eos_token: str | None = None) -> TemplateMapping:
    """Find the known chat format that `render` produces; raise TemplateError naming the closest one."""
    failures = []
    for fmt in FORMATS:
        try:
            mapping = _try_format(fmt, render, bos_token, eos_token)
        except Exception as exc:  # a template that raises on a probe (e.g. strict role order) is not this format
            failures.append(f"{fmt.name} ({type(exc).__name__}: {exc})")
            continue
        if mapping is not None:
            return mapping
        failures.append(fmt.name)
    sample = ""
    try:
        sample = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], False)[:200]
    except Exception as exc:
        sample = f"(it raised {type(exc).__name__}: {exc})"
    raise TemplateError(
        f"{source}: the chat template matches no supported format; it renders a short chat as {sample!r}. "
        f"Closest: {_closest(render, bos_token)}. Tried: {', '.join(failures)}. Add a format for it "
        "(ftdeploy/templates.py and a template under modelfiles/), or train with a supported chat template "
        "(set one on the tokenizer of the base model)."
    )


def jinja_renderer(chat_template: str, bos_token: str = "", eos_token: str = "") -> RenderFn:
    """Render a Hugging Face chat template without transformers (for `modelfile` without torch)."""
    template = compile_chat_template(chat_template)

    def render(messages: list[Message], add_generation_prompt: bool, tools: list[Tool] | None = None) -> str:
        # tools=None is passed as transformers passes it: a template may test `tools is defined`
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               bos_token=bos_token, eos_token=eos_token)

    return render


@functools.lru_cache(maxsize=64)
def compile_chat_template(chat_template: str) -> Any:
    """A chat template compiled in the one environment every rendering of a chat template here uses (`jinja_renderer`
    and the data stage's fast path): the one transformers' apply_chat_template renders in, so the same text for the
    same variables."""
    return _chat_template_environment().from_string(chat_template)


@functools.cache
def _chat_template_environment() -> Any:
    """transformers' chat-template environment (transformers.utils.chat_template_utils): sandboxed, trim_blocks and
    lstrip_blocks, loop controls, `{% generation %}` blocks rendered as they are, its tojson (no HTML escaping),
    strftime_now, raise_exception, and its `dict` and `namespace` that refuse underscore attributes."""
    import datetime

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.parser import Parser
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}…{% endgeneration %} (transformers marks the assistant's tokens with it): the body, as is,
        in a block of its own as transformers renders it."""

        tags = {"generation"}

        def parse(self, parser: Parser) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature trick: `namespace(self=...)`
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat template raised: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["raise_exception"] = raise_exception
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env
