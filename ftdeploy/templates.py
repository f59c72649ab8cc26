"""Map the chat template a model was trained with to an Ollama TEMPLATE and stop tokens.

The mapping is derived from the template itself, never from the model's name: probe
conversations made of sentinel strings are rendered through the training template and
compared with each known chat format. What the template adds on its own (a default system
prompt, a fixed preamble inside the system block, a system block it always emits) is read
off those renderings and carried into the Modelfile. A template that matches no known
format is an error, not a guess.

Pure: no torch, no transformers. The caller passes a `render(messages, add_generation_prompt)`
function (e.g. a tokenizer's `apply_chat_template(..., tokenize=False)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from .errors import TemplateError

Message = dict[str, str]
RenderFn = Callable[[list[Message], bool], str]

# Sentinels that no template would produce by itself.
_S = "\u27e6sys-7f3a\u27e7"
_U1, _A1 = "\u27e6user-one\u27e7", "\u27e6assistant-one\u27e7"
_U2, _A2 = "\u27e6user-two\u27e7", "\u27e6assistant-two\u27e7"


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: how each turn is written, what ends a turn, and its Ollama template file."""

    name: str
    turn_open: str  # with {role}
    turn_close: str  # ends every turn; the model must emit it, so it is trained and is a stop
    generation_prompt: str
    stops: tuple[str, ...]
    template_file: str
    bos_in_template: bool = False  # template starts with the tokenizer's BOS (llama 3)

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool,
        system_prefix: str = "",
        implicit_system: str = "",
    ) -> str:
        """What the Ollama TEMPLATE of this format produces (mirrors modelfiles/<name>.tmpl)."""
        out = []
        if not messages or messages[0]["role"] != "system":
            out.append(implicit_system)
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            content = (system_prefix if m["role"] == "system" else "") + m["content"]
            out.append(self.turn_open.format(role=m["role"]) + content)
            if not last or m["role"] != "assistant":
                out.append(self.turn_close)
            if last and m["role"] != "assistant":
                out.append(self.generation_prompt)
        return "".join(out)


CHATML = ChatFormat(
    name="chatml",
    turn_open="<|im_start|>{role}\n",
    turn_close="<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
    stops=("<|im_end|>", "<|im_start|>"),
    template_file="chatml.tmpl",
)
LLAMA3 = ChatFormat(
    name="llama3",
    turn_open="<|start_header_id|>{role}<|end_header_id|>\n\n",
    turn_close="<|eot_id|>",
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"),
    template_file="llama3.tmpl",
    bos_in_template=True,
)
FORMATS = (CHATML, LLAMA3)


@dataclass(frozen=True)
class TemplateMapping:
    """The result: the format and what the training template adds on its own."""

    format: ChatFormat
    system_prefix: str = ""  # fixed text before the system content (e.g. Llama 3.2's knowledge-date lines)
    default_system: str | None = None  # system prompt the template inserts when the chat has none
    implicit_system: str = ""  # a system block emitted even with no system prompt (rendered literally)

    @property
    def end_of_turn(self) -> str:
        return self.format.stops[0]

    def ollama_template(self) -> str:
        text = resources.files("ftdeploy.modelfiles").joinpath(self.format.template_file).read_text()
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
        return text.replace("[[IMPLICIT_SYSTEM]]", self.implicit_system)

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The prompt Ollama builds for `messages` when the Modelfile carries this mapping."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return self.format.render(messages, add_generation_prompt, self.system_prefix, self.implicit_system)


def _strip_bos(text: str, bos: str | None) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def _split_at(rendered: str, sentinel: str) -> tuple[str, str] | None:
    if rendered.count(sentinel) != 1:
        return None
    before, _, after = rendered.partition(sentinel)
    return before, after


def _try_format(fmt: ChatFormat, render: RenderFn, bos: str | None) -> TemplateMapping | None:
    def hf(messages: list[Message], gen: bool) -> str:
        text = render(messages, gen)
        return _strip_bos(text, bos) if fmt.bos_in_template else text

    with_system = [{"role": "system", "content": _S}, {"role": "user", "content": _U1},
                   {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]
    text = hf(with_system, True)
    parts = _split_at(fmt.render(with_system, True), _S)
    if parts is None:
        return None
    before, after = parts
    if not (text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after)):
        return None
    middle = text[len(before):len(text) - len(after)]
    if not middle.endswith(_S):
        return None
    prefix = middle[: -len(_S)]
    if fmt.render(with_system, True, prefix) != text:
        return None
    # A finished conversation: checks how assistant turns end (the end-of-turn token is trained on).
    finished = [*with_system, {"role": "assistant", "content": _A2}]
    expected = fmt.render(finished, False, prefix)
    if hf(finished, False) not in (expected, expected + fmt.turn_close):
        return None

    no_system = with_system[1:]
    text = hf(no_system, True)
    if fmt.render(no_system, True, prefix) == text:
        return TemplateMapping(fmt, system_prefix=prefix)
    parts = _split_at(fmt.render([{"role": "system", "content": _S}, *no_system], True, prefix), _S)
    if parts is None:
        return None
    before, after = parts
    if not (text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after)):
        return None
    default = text[len(before):len(text) - len(after)]
    if fmt.render([{"role": "system", "content": default}, *no_system], True, prefix) != text:
        return None
    if default:
        return TemplateMapping(fmt, system_prefix=prefix, default_system=default)
    # The template writes a system block (prefix only) even when the chat has no system prompt.
    implicit = fmt.turn_open.format(role="system") + prefix + fmt.turn_close
    return TemplateMapping(fmt, system_prefix=prefix, implicit_system=implicit)


def match_chat_template(render: RenderFn, bos_token: str | None = None,
                        source: str = "chat template") -> TemplateMapping:
    """Find the known chat format that `render` produces; raise TemplateError naming the formats tried."""
    failures = []
    for fmt in FORMATS:
        try:
            mapping = _try_format(fmt, render, bos_token)
        except Exception as exc:  # a template that raises on a probe (e.g. strict role order) is not this format
            failures.append(f"{fmt.name} ({type(exc).__name__}: {exc})")
            continue
        if mapping is not None:
            return mapping
        failures.append(fmt.name)
    sample = ""
    try:
        sample = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], False)[:200]
    except Exception:
        pass
    raise TemplateError(
        f"{source}: the chat template matches no supported format (tried {', '.join(failures)}); "
        f"it renders a short chat as {sample!r}. Add a template under modelfiles/ for it, or train with a "
        "supported chat template (set one on the tokenizer of the base model)."
    )


def jinja_renderer(chat_template: str, bos_token: str = "", eos_token: str = "") -> RenderFn:
    """Render a Hugging Face chat template without transformers (for `modelfile` without torch)."""
    import datetime
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment transformers renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat template raised: {message}")

    env.globals["raise_exception"] = raise_exception
    template = env.from_string(chat_template)

    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)

    return render
