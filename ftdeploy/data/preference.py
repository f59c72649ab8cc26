"""Preference data (train.method dpo, orpo or kto): rows -> Records holding a prompt (`messages`: the turns before the
answer) and a chosen and/or a rejected answer (each one assistant message), every bad row named by where it came from.
The forms, detected row by row from the columns (data.format `preference` keeps to the pairs, `kto` to labelled
answers and pairs; auto takes either, as the method allows):

  pairs (--method dpo or orpo, the same rows for both; --method kto trains each as one good and one bad answer, as
  TRL's unpair_preference_dataset):
    trl_explicit         {"prompt", "chosen", "rejected"}: strings (a user turn; an assistant answer) or message lists
                         (the prompt's turns, a system turn among them; a list holding the one assistant answer)
    trl_implicit         {"chosen", "rejected"}: two whole conversations sharing every turn but the final assistant
                         answer, which are the prompt. As TRL reads it, a text "prompt" beside two lists is ignored.
    sharegpt_preference  LLaMA-Factory's {"conversations" (or "messages"), "chosen", "rejected"}: sharegpt turns (its
                         tool turns, "tools" and "system" as the sharegpt layout reads them), each answer one
                         {"from": "gpt", "value"} (or a function_call turn)
    alpaca_preference    LLaMA-Factory's {"instruction", "input", "chosen", "rejected"} (+ "system", "history")
    hh                   Anthropic HH: "chosen" and "rejected" as text of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns
    openai_preference    OpenAI's DPO format {"input": {"messages", "tools"}, "preferred_output",
                         "non_preferred_output"}, each output a list of one assistant message
  labelled answers (--method kto; a good answer is a Record's `chosen`, a bad one its `rejected`):
    trl_kto              TRL's unpaired {"prompt", "completion", "label": true/false}, strings or message lists
    kto_tag              LLaMA-Factory's {"conversations" (or "messages"), "kto_tag": true/false}: the last turn is
                         the answer
    messages_label       {"messages" (or "conversations"), "label": true/false}, the same

Strings are chat turns here, never raw text (SFT's prompt/completion strings are): preference training tunes the chat
model Ollama serves through its chat template. Content given as text parts, the row's system column, tools, tool calls
and message weights are read as the supervised layouts read them (formats.py). Bad rows, each named with its reason,
never dropped without a word: a missing or empty answer; an answer that is not an assistant message (a user or tool
turn); a chosen equal to its rejected; conversations of an implicit prompt that do not share it; a label that is not
true or false; an answer marked not trained (weight 0) and a prompt turn marked trained (only the answer trains);
and, refused as in SFT, images, video, audio and files (a non-text content part, a row's media lists, an <image>
placeholder: text-only models train here). OpenAI's legacy function calling ("functions", "function_call") is not
read in preference rows: its fields are named as unread.

Pure: no torch.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ..config import DataConfig
from ..defaults import DEMO_DATA
from ..errors import DataError
from .formats import (
    MAX_ROW_BYTES,
    MEDIA_FIELDS,
    PREFERENCE_FORMATS,
    TRAIN_FLAGS,
    TRAINING_KEYS,
    Columns,
    Record,
    RecordStream,
    _absent,
    _chat_record,
    _check_tools,
    _history,
    _kind,
    _optional_text,
    _required_text,
    _sharegpt_messages,
    _sharegpt_tools,
    detect_layout,
    expect_of,
    placed,
    too_large,
)
from .preference_ids import PAIR_METHODS
from .sources import BadRow, demo_path

DEMO_FILES = {"train": "prefs.jsonl", "eval": "prefs_eval.jsonl"}  # --method dpo, orpo or kto's demo data
METHODS = ("sft", "dpo", "orpo", "kto", "grpo")  # train.method: what prepare_data and inspect_data prepare the data for
PAIR_FORMS = {
    "trl_explicit": "prompt + chosen + rejected (TRL, explicit prompt)",
    "trl_implicit": "chosen + rejected conversations (TRL, implicit prompt)",
    "sharegpt_preference": "conversations + chosen + rejected (LLaMA-Factory sharegpt)",
    "alpaca_preference": "instruction + chosen + rejected (LLaMA-Factory alpaca)",
    "hh": "chosen + rejected Human:/Assistant: text (Anthropic HH)",
    "openai_preference": "input + preferred_output + non_preferred_output (OpenAI DPO)",
}
KTO_FORMS = {
    "trl_kto": "prompt + completion + label (TRL unpaired, KTO)",
    "kto_tag": "conversations/messages + kto_tag (LLaMA-Factory KTO)",
    "messages_label": "messages/conversations + label (KTO)",
}
FORMS = {**PAIR_FORMS, **KTO_FORMS}
ANSWERS = ("chosen", "rejected")
_PAIRS_NEEDED = ("preference pairs: prompt + chosen + rejected (TRL), chosen + rejected conversations (TRL, "
                 "implicit prompt), conversations or instruction + chosen + rejected (LLaMA-Factory), chosen + "
                 "rejected Human:/Assistant: text (Anthropic HH), or input + preferred_output + non_preferred_output "
                 "(OpenAI)")
NEEDS = {
    **dict.fromkeys(PAIR_METHODS, _PAIRS_NEEDED),
    "kto": "labelled answers: prompt + completion + label (TRL), conversations or messages + kto_tag "
           "(LLaMA-Factory) or + label (true/false); or preference pairs, each trained as a good and a bad answer",
}
# The fields each form reads (beside expect, match, the media lists and the system column): any other is named in a
# warning, as in the supervised layouts.
_FORM_FIELDS = {
    "trl_explicit": ("prompt", "chosen", "rejected", "tools"), "trl_implicit": ("chosen", "rejected", "tools"),
    "sharegpt_preference": ("conversations", "messages", "chosen", "rejected", "tools"),
    "alpaca_preference": ("instruction", "input", "chosen", "rejected", "history"), "hh": ("chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
    "trl_kto": ("prompt", "completion", "label", "tools"), "kto_tag": ("conversations", "messages", "kto_tag", "tools"),
    "messages_label": ("messages", "conversations", "label", "tools"),
}
_IMPLICIT = ("trl_implicit", "hh")  # forms whose answers are whole conversations, the prompt their shared turns
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")

Convs = tuple[dict[str, list[Any]], list[dict[str, Any]] | None]  # each answer's whole conversation, the tools


def preference_form(row: Any) -> str | None:
    """The preference form of a row, from its columns (see the module's list); None for a row that is not one."""
    if not isinstance(row, dict):
        return None
    # A pair with one answer missing is still a pair (its converter names the missing one).
    if "preferred_output" in row or "non_preferred_output" in row:
        return "openai_preference"
    if "chosen" in row or "rejected" in row:
        answer = row.get("chosen", row.get("rejected"))
        if "conversations" in row:
            return "sharegpt_preference"
        if "instruction" in row:
            return "alpaca_preference"
        if "prompt" in row:  # TRL's rule: a text prompt beside conversations is not the prompt (the implicit one is)
            return "trl_explicit" if isinstance(row["prompt"], list) == isinstance(answer, list) else "trl_implicit"
        if "messages" in row:
            return "sharegpt_preference"
        return "hh" if isinstance(answer, str) else "trl_implicit"
    if "kto_tag" in row:
        return "kto_tag"
    if "label" in row:
        if "prompt" in row and "completion" in row:
            return "trl_kto"
        if "messages" in row or "conversations" in row:
            return "messages_label"
    return None


def _prompt_turns(row: dict[str, Any], key: str) -> list[Any] | BadRow:
    """A prompt column: a string (one user turn) or a list of messages."""
    value = row.get(key)
    if _absent(value) or value == "" or value == []:
        return BadRow(f"missing or empty {key!r}")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    return BadRow(f"{key!r} must be a string or a list of messages, got {_kind(value)}")


def _answer(row: dict[str, Any], key: str, role: str = "assistant") -> dict[str, Any] | BadRow:
    """An answer column: a string, a message, or a list holding one message (whose role `_finish` checks)."""
    value = row.get(key)
    if _absent(value) or value == "" or value == [] or value == {}:
        return BadRow(f"missing or empty {key!r}")
    if isinstance(value, str):
        return {"role": role, "content": value} if role == "assistant" else {"from": "gpt", "value": value}
    if isinstance(value, list):
        if len(value) != 1:
            return BadRow(f"{key!r} must hold one assistant message (the answer), got {len(value)} messages")
        value = value[0]
    if not isinstance(value, dict):
        return BadRow(f"{key!r} must be a string, a message or a list of one message, got {_kind(value)}")
    return value


def _label(row: dict[str, Any], key: str) -> str | BadRow:
    """Which answer a KTO label makes of the row's: chosen (true: good) or rejected (false: bad)."""
    value = row.get(key)
    if not isinstance(value, bool):
        return BadRow(f"{key!r} must be true (a good answer) or false (a bad one), got {_kind(value)} {value!r}"[:200])
    return "chosen" if value else "rejected"


def _tools(row: dict[str, Any]) -> list[dict[str, Any]] | BadRow | None:
    tools = _check_tools(row.get("tools"))
    return BadRow(tools) if isinstance(tools, str) else tools


def _trl_explicit(row: dict[str, Any], columns: Columns) -> Convs | str:
    prompt, tools = _prompt_turns(row, "prompt"), _tools(row)
    answers = {name: _answer(row, name) for name in ANSWERS}
    for value in (prompt, tools, *answers.values()):
        if isinstance(value, BadRow):
            return value.reason
    assert isinstance(prompt, list) and not isinstance(tools, BadRow)
    return {name: [*prompt, m] for name, m in answers.items()}, tools


def _trl_implicit(row: dict[str, Any], columns: Columns) -> Convs | str:
    tools = _tools(row)
    if isinstance(tools, BadRow):
        return tools.reason
    convs: dict[str, list[Any]] = {}
    for name in ANSWERS:
        conv = row.get(name)
        if _absent(conv) or conv == [] or conv == "":
            return f"missing or empty {name!r}"
        if not isinstance(conv, list):
            return f"{name!r} must be a list of messages (the whole conversation: the prompt, then the answer), " \
                   f"got {_kind(conv)}"
        if len(conv) < 2:
            ignored = "; a text 'prompt' beside message lists is not read, as TRL does not read it" \
                if isinstance(row.get("prompt"), str) else ""
            return f"{name!r} holds no prompt, only {len(conv)} message: with no 'prompt' column chosen and " \
                   f"rejected are whole conversations, the prompt the turns they share{ignored}"
        convs[name] = conv
    return convs, tools


def _sharegpt_preference(row: dict[str, Any], columns: Columns) -> Convs | str:
    key = "conversations" if "conversations" in row else "messages"
    conv = row.get(key)
    if not isinstance(conv, list) or not conv:
        return f"missing or empty {key!r}"
    tools = _sharegpt_tools(row.get("tools"))
    if isinstance(tools, str):
        return tools
    convs: dict[str, list[Any]] = {}
    for name in ANSWERS:
        answer = _answer(row, name, role="gpt")
        if isinstance(answer, BadRow):
            return answer.reason
        messages = _sharegpt_messages([*conv, answer])
        if isinstance(messages, str):
            return messages
        convs[name] = messages
    return convs, tools


def _alpaca_preference(row: dict[str, Any], columns: Columns) -> Convs | str:
    instruction, extra, history = _required_text(row, "instruction"), _optional_text(row, "input"), \
        _history(row.get("history"))
    answers = {name: _answer(row, name) for name in ANSWERS}
    for value in (instruction, extra, history, *answers.values()):
        if isinstance(value, BadRow):
            return value.reason
    assert isinstance(instruction, str) and isinstance(history, list)
    prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return {name: [*history, {"role": "user", "content": prompt}, m] for name, m in answers.items()}, None


def _hh_turns(text: str, name: str) -> list[dict[str, Any]] | BadRow:
    """Anthropic HH text as turns: each "\\n\\nHuman:" a user turn, each "\\n\\nAssistant:" an assistant one."""
    marks = list(HH_TURN.finditer(text))
    if not marks or text[:marks[0].start()].strip():
        return BadRow(f"{name!r} is text, but not Anthropic HH turns (\\n\\nHuman: ...\\n\\nAssistant: ...); text "
                      "answers need a 'prompt' column (or give chosen and rejected as message lists)")
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [{"role": "user" if m.group(1) == "Human" else "assistant", "content": text[m.end():end].strip()}
            for m, end in zip(marks, ends, strict=True)]


def _hh(row: dict[str, Any], columns: Columns) -> Convs | str:
    convs: dict[str, list[Any]] = {}
    for name in ANSWERS:
        text = _required_text(row, name)
        turns = _hh_turns(text, name) if isinstance(text, str) else text
        if isinstance(turns, BadRow):
            return turns.reason
        convs[name] = turns
    return convs, None


def _openai_preference(row: dict[str, Any], columns: Columns) -> Convs | str:
    given = row.get("input")
    if not isinstance(given, dict):
        return f"'input' must be an object {{\"messages\": [...], \"tools\": [...]}}, got {_kind(given)}"
    prompt, tools = _prompt_turns(given, "messages"), _tools(given)
    answers = {name: _answer(row, key) for name, key in zip(ANSWERS, ("preferred_output", "non_preferred_output"),
                                                            strict=True)}
    for value in (prompt, tools, *answers.values()):
        if isinstance(value, BadRow):
            return value.reason.replace("'messages'", "'input.messages'")
    assert isinstance(prompt, list) and not isinstance(tools, BadRow)
    return {name: [*prompt, m] for name, m in answers.items()}, tools


def _trl_kto(row: dict[str, Any], columns: Columns) -> Convs | str:
    label, prompt, tools, answer = _label(row, "label"), _prompt_turns(row, "prompt"), _tools(row), \
        _answer(row, "completion")
    for value in (label, prompt, tools, answer):
        if isinstance(value, BadRow):
            return value.reason
    assert isinstance(label, str) and isinstance(prompt, list) and not isinstance(tools, BadRow)
    return {label: [*prompt, answer]}, tools


def _labelled_chat(row: dict[str, Any], key: str) -> Convs | str:
    """A conversation whose last turn is the answer, labelled good or bad by `key`: sharegpt turns under
    "conversations", messages-layout ones under "messages"."""
    label = _label(row, key)
    if isinstance(label, BadRow):
        return label.reason
    column = "conversations" if "conversations" in row else "messages"
    conv = row.get(column)
    if not isinstance(conv, list) or not conv:
        return f"missing or empty {column!r}"
    if column == "messages":
        tools = _tools(row)
        if isinstance(tools, BadRow):
            return tools.reason
        return {label: conv}, tools
    sharegpt_tools = _sharegpt_tools(row.get("tools"))
    messages = _sharegpt_messages(conv)
    for value in (sharegpt_tools, messages):
        if isinstance(value, str):
            return value
    assert isinstance(messages, list) and not isinstance(sharegpt_tools, str)
    return {label: messages}, sharegpt_tools


def _kto_tag(row: dict[str, Any], columns: Columns) -> Convs | str:
    return _labelled_chat(row, "kto_tag")


def _messages_label(row: dict[str, Any], columns: Columns) -> Convs | str:
    return _labelled_chat(row, "label")


_CONVERTERS = {"trl_explicit": _trl_explicit, "trl_implicit": _trl_implicit,
               "sharegpt_preference": _sharegpt_preference, "alpaca_preference": _alpaca_preference, "hh": _hh,
               "openai_preference": _openai_preference, "trl_kto": _trl_kto, "kto_tag": _kto_tag,
               "messages_label": _messages_label}


def _blank(content: Any) -> bool:
    return _absent(content) or content == [] or (isinstance(content, str) and not content.strip())


def _answer_reason(name: str, conv: list[Any]) -> str | None:
    """Why the last message of an answer's conversation is not an answer that can train, or None."""
    last = conv[-1]
    if not isinstance(last, dict):
        return f"{name}: the answer is not a message, got {_kind(last)}"
    role = last.get("role")
    if role != "assistant":
        return f"{name} is a {role!r} message, not an assistant answer"
    if last.get("tool_calls") is None and _blank(last.get("content")):
        return f"{name} is an empty answer"
    for key in TRAINING_KEYS:
        value = last.get(key)
        if value is False or (key not in TRAIN_FLAGS and type(value) in (int, float) and value == 0):
            return f"{name} is marked not trained ({key!r} {value!r}): a preference answer is what trains"
    for i, m in enumerate(conv[:-1]):
        if isinstance(m, dict) and m.get("role") == "assistant" and any(
                m.get(k) is True or (k not in TRAIN_FLAGS and type(m.get(k)) in (int, float) and m.get(k) == 1)
                for k in TRAINING_KEYS):
            return f"message {i} (assistant) is in the prompt but marked trained: preference training trains " \
                   "the answer only"
    return None


def _finish(convs: dict[str, list[Any]], tools: list[dict[str, Any]] | None, row: dict[str, Any],
            expect: str | None, columns: Columns, form: str) -> Record | str:
    """The Record of a row's answers, each given as its whole conversation: every conversation checked as the
    supervised layouts check one, the answers split off the prompt they must share."""
    prompts: dict[str, list[dict[str, Any]]] = {}
    answers: dict[str, dict[str, Any]] = {}
    for name, conv in convs.items():
        where = name if form in _IMPLICIT else f"prompt + {name}"
        if reason := _answer_reason(name, conv):
            return reason
        rec = _chat_record(conv, row, tools, expect, columns)
        if isinstance(rec, str):
            return f"{where}: {rec}"
        assert rec.messages is not None
        prompts[name], answers[name] = rec.messages[:-1], rec.messages[-1]
    if len(prompts) == 2 and prompts["chosen"] != prompts["rejected"]:
        at = next((i for i, (a, b) in enumerate(zip(*prompts.values(), strict=False)) if a != b),
                  min(map(len, prompts.values())))
        return f"chosen and rejected do not share their prompt: they differ at message {at} (every turn but the " \
               "final assistant answer must be the same)"
    if len(answers) == 2 and answers["chosen"] == answers["rejected"]:
        return "chosen and rejected are the same answer: nothing to prefer"
    prompt = next(iter(prompts.values()))
    answered = sum(m["role"] == "assistant" for m in prompt)
    return Record("", messages=prompt, expect=expect, tools=tools, untrained=tuple(range(answered)),
                  chosen=answers.get("chosen"), rejected=answers.get("rejected"))


def convert_preference_row(row: Any, columns: Columns, allowed: tuple[str, ...], method: str) -> Record | str:
    """A preference row's Record, or the reason it is bad; `allowed`: the forms this method and data.format take."""
    if isinstance(row, BadRow):
        return row.reason
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    form = preference_form(row)
    if form is None:
        return f"not a preference row (its columns: {', '.join(sorted(row)[:12])}); --method {method} trains " \
               f"{NEEDS[method]}"
    if form not in allowed:
        if method in PAIR_METHODS:
            return f"a KTO-labelled row ({FORMS[form]}): --method {method} trains chosen/rejected pairs; --method " \
                   "kto trains labelled answers"
        return f"a KTO-labelled row ({FORMS[form]}), and data.format is preference (pairs)"
    expect = expect_of(row)
    if isinstance(expect, BadRow):
        return expect.reason
    converted = _CONVERTERS[form](row, columns)
    if isinstance(converted, str):
        return converted
    return _finish(*converted, row, expect, columns, form)


def unused_preference_fields(row: Any, columns: Columns) -> list[str]:
    """The fields of a preference row that its form does not read."""
    form = preference_form(row)
    if form is None:
        return []
    known = {*_FORM_FIELDS[form], "expect", "match", columns.system, *MEDIA_FIELDS}
    return [k for k in row if k not in known]


def _forms_allowed(method: str, layout: str) -> tuple[str, ...]:
    if method in PAIR_METHODS or layout == "preference":
        return tuple(PAIR_FORMS)
    return tuple(FORMS)


class PreferenceStream(RecordStream):
    """A RecordStream of preference Records for --method dpo, orpo or kto: the layout detected from the first rows
    (or data.format preference / kto), each row converted by its own form. Supervised data is an error naming the
    file and its layout; so is KTO-labelled data for dpo and orpo (PAIR_METHODS)."""

    def __init__(self, spec: str, method: str, layout: str = "auto", columns: Columns | None = None,
                 on_bad_row: str = "error", system_prompt: str | None = None, hub_config: str | None = None,
                 split: str = "train", max_row_bytes: int = MAX_ROW_BYTES, revision: str | None = None):
        if method not in NEEDS:
            raise ValueError(f"method must be one of {', '.join(NEEDS)}, got {method!r}")
        self.method = method
        self.allowed = _forms_allowed(method, layout)
        super().__init__(spec, layout, columns, on_bad_row, system_prompt, hub_config, split, max_row_bytes, revision)

    def _detect(self, head: list[tuple[str, Any]], layout: str) -> str:
        """The most common form of the first rows; data that is not preference data (or, for dpo and orpo,
        labelled answers) is an error naming the file."""
        if layout not in ("auto", *PREFERENCE_FORMATS):
            raise DataError(f"{self.spec}: data.format {layout} is a supervised layout; --method {self.method} trains "
                            f"{NEEDS[self.method]} (data.format auto, preference{' or kto' * (self.method == 'kto')})")
        pairs = self.method in PAIR_METHODS
        if pairs and layout == "kto":
            raise DataError(f"{self.spec}: data.format kto is KTO's labelled answers; --method {self.method} trains "
                            "chosen/rejected pairs; --method kto trains labelled answers")
        forms = Counter(form for _, row in head if (form := preference_form(row)) is not None)
        if pairs and forms and (top := forms.most_common(1)[0][0]) in KTO_FORMS:
            raise DataError(f"{self.spec}: KTO-labelled data ({FORMS[top]}): --method {self.method} trains "
                            "chosen/rejected pairs; --method kto trains labelled answers")
        usable = Counter({form: n for form, n in forms.items() if form in self.allowed})
        if not usable:
            raise DataError(f"{self.spec}: {self._found(head, forms)}; --method {self.method} trains "
                            f"{NEEDS[self.method]}")
        return usable.most_common(1)[0][0]

    def _found(self, head: list[tuple[str, Any]], forms: Counter[str]) -> str:
        """What the first rows are, where they are not what this method trains."""
        if forms:  # labelled answers under data.format preference
            return f"the rows are {', '.join(FORMS[form] for form in forms)}, and data.format is preference (pairs)"
        try:
            return f"supervised data ({detect_layout(head, self.columns, self.spec)} layout: one answer a row, no " \
                   "chosen/rejected or good/bad label), not preference data"
        except DataError as exc:  # no layout at all (or preference data sft refuses, which this is not)
            return str(exc).removeprefix(f"{self.spec}: ")

    def _convert(self, where: str, row: Any, unused: dict[str, str] | None) -> Record | str:
        if reason := too_large(row, self.max_row_bytes):
            return f"{where}: {reason}"
        if unused is not None:
            for name in unused_preference_fields(row, self.columns):
                unused.setdefault(name, where)
        result = convert_preference_row(row, self.columns, self.allowed, self.method)
        return placed(result, where, row, self.system_prompt)


def stream_preference(cfg: DataConfig, spec: str, method: str, split: str = "train") -> PreferenceStream:
    """`spec` read as preference data for `method` (dpo, orpo or kto), with the data config's layout, columns, system
    prompt and bad-row policy; `demo` is the bundled pairs whose chosen answers open with "Ahoy!" (KTO trains each
    pair as a good and a bad answer)."""
    source = str(demo_path(split).with_name(DEMO_FILES[split])) if spec == DEMO_DATA else spec
    columns = Columns(**cfg.columns) if cfg.columns else Columns()
    return PreferenceStream(source, method, cfg.format, columns, cfg.on_bad_row, cfg.system_prompt, cfg.hub_config,
                            cfg.split, cfg.max_row_bytes, cfg.revision)
