"""Dataset layouts -> conversations (or raw text), every bad row named by where it came from (sources.py reads the
rows). Layouts, detected from the columns or chosen:

  messages  {"messages": [{"role", "content"}, ...]}            (OpenAI style; optional "tools", see below)
  sharegpt  {"conversations": [{"from", "value"}, ...]}         (human/gpt/system and aliases)
  alpaca    {"instruction", "input", "output"}                  (optional "system")
  pairs     {"prompt", "response"}                              (column names configurable)
  prompt_completion {"prompt", "completion"}                    (TRL's: loss on the completion only; two strings
            are raw text, prompt then completion; two message lists one conversation, the prompt's answers context)
  text      {"text"}                                            (continued pre-training: every token trained)

A message list given as JSON text (a CSV column) is read as that list.

Tool calls (messages layout), as Hugging Face chat templates and TRL take them: a row-level "tools" list of
function specs ({"type": "function", "function": {"name", "description", "parameters"}}, or that list as a JSON
string), assistant turns with "tool_calls" ([{"type": "function", "function": {"name", "arguments"}}], content
optional) and "tool" turns holding each call's result ("content", optional "name" / "tool_call_id"). Arguments given
as a JSON string are parsed to the object the templates expect.
The sharegpt layout takes LLaMA-Factory's tool turns and converts them to that form: {"from": "function_call", "value":
a JSON call {"name", "arguments"} or a list of them} -> an assistant turn with "tool_calls", {"from": "observation"} ->
a "tool" turn (named after the call when there is one), and its "tools" (a JSON string of bare or typed specs) -> typed.

Content, in every layout that takes messages (messages, sharegpt), is a string or a list of parts: OpenAI's and the
Hugging Face convention's {"type": "text", "text": ...} and LLaMA-Factory's {"type": "text", "value": ...}, the text
parts joined as the chat templates that take parts join them (concatenated). Any other part (image, image_url, audio,
input_audio, file, ...) is a bad row naming it: not supported yet. So are a row's non-empty "images" / "videos" /
"audios" lists and an <image> placeholder in its text, which would otherwise train as literal text. A message's "weight"
(OpenAI) or "loss_weight" (LLaMA-Factory) is 0 (the turn is context, not trained) or 1 (trained, the default for
assistant turns), and Axolotl's "training" / "train" flag false or true, the same; any other value, or one that asks to
train a turn other than the assistant's, is a bad row, and so are Axolotl's character spans ("train_detail"), which
nothing here honours yet. OpenAI's legacy function calling (a row's "functions", an assistant turn's "function_call", a
"function" turn) is read as tools, tool calls and tool turns. A row-level "system" (the system column) is the system
message in every chat layout; alpaca's "history" ([[instruction, response], ...]) gives the turns before it; a null or
NaN field (pandas writes NaN) is absent. Preference data (chosen/rejected pairs, KTO labels) is refused here as a
whole, naming the file and the method that trains it: these layouts are sft's, and --method dpo / kto read preference
data through preference.py (a RecordStream of its own, reusing these checks). A conversation must end on an assistant
turn (or on tool results). A row holding more than `max_row_bytes` of text is a bad row before anything tokenizes it.
Fields a layout does not read are ignored and named in one warning per dataset.

A vision base's data (RecordStream(images=True)) reads image parts, "images" lists and <image> placeholders instead
(images.py).

Pure: no torch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..defaults import DEMO_DATA
from ..errors import DataError
from .hub import hub_revision, is_hub_dataset
from .sources import BadRow, demo_path, iter_rows, json_reason

log = logging.getLogger(__name__)

LAYOUTS = ("messages", "sharegpt", "alpaca", "pairs", "prompt_completion", "text")
PREFERENCE_FORMATS = ("preference", "kto")  # data.format's preference layouts (preference.py reads them)
ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # a tool call's result, in the messages layout
LEGACY_FUNCTION_ROLE = "function"  # OpenAI's legacy function result turn, read as a tool turn
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bot": "assistant", "model": "assistant", "system": "system",
}
# LLaMA-Factory's sharegpt tool turns (its default function_tag and observation_tag)
SHAREGPT_FUNCTION_CALL, SHAREGPT_OBSERVATION = "function_call", "observation"
MAX_LISTED = 20
MAX_ROW_BYTES = 1 << 20  # data.max_row_bytes' default: far above any max_seq_length's worth of text
# Content parts that are not text, and what they carry; a row with one is refused until such models train.
MEDIA_PARTS = {"image": "images", "image_url": "images", "input_image": "images", "video": "videos",
               "video_url": "videos", "audio": "audio", "input_audio": "audio", "audio_url": "audio",
               "file": "files", "input_file": "files"}
MEDIA_FIELDS = ("images", "videos", "audios")  # LLaMA-Factory's row-level media lists
# Columns that hold a list of messages, read from JSON text too (a CSV column, an export's string)
JSON_MESSAGE_COLUMNS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected", "preferred_output",
                        "non_preferred_output")
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's (and LLaVA's) mark where an image goes in the text
WEIGHT_KEYS = ("weight", "loss_weight")  # OpenAI's fine-tuning format, LLaMA-Factory's: 0 or 1
TRAIN_FLAGS = ("training", "train")  # Axolotl's message_field_training (its docs' examples name it either way)
TRAINING_KEYS = (*WEIGHT_KEYS, *TRAIN_FLAGS)  # a message's say in whether it is trained
TRAIN_DETAIL_KEYS = ("train_detail", "training_detail")  # Axolotl's message_field_training_detail: character spans


@dataclass
class Record:
    """One converted row: a conversation, or raw text for the `text` layout."""

    source: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    expect: str | None = None
    match: str = "contains"  # how verify compares the reply with `expect`: contains, exact, regex
    tools: list[dict[str, Any]] | None = None  # function specs the chat template renders (tools=...)
    untrained: tuple[int, ...] = ()  # assistant turns (0 = the first assistant message) given weight 0
    context_chars: int = 0  # raw text: its first characters (a plain prompt/completion row's prompt) are not trained
    # Preference data (preference.py): `messages` is the prompt (the turns before the answer), and these the answers,
    # each one assistant message: a DPO pair has both, a KTO row one (chosen: labelled good; rejected: bad).
    chosen: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None
    # GRPO prompts (grpo.py): `messages` is the prompt, ending on the user turn the model answers, and these the row's
    # other columns, which the reward functions are given (`answer`: the reference, where the row has one).
    columns: dict[str, Any] = field(default_factory=dict)
    # A vision base's image chat (images.py): the row's images in order, one for each {"type": "image"} part of its
    # messages (images.Image: bytes, source, size).
    images: list[Any] = field(default_factory=list)

    def uses_tools(self) -> bool:
        """Whether the conversation uses tools: tool specs, tool calls or tool results."""
        answers = [m for m in (self.chosen, self.rejected) if m is not None]
        return bool(self.tools) or any("tool_calls" in m or m["role"] == "tool"
                                       for m in [*(self.messages or ()), *answers])

    def is_preference(self) -> bool:
        """Whether this is a preference record: a prompt with a chosen and/or a rejected answer."""
        return self.chosen is not None or self.rejected is not None


@dataclass
class Columns:
    """Column names for the `pairs` layout, and the row-level system prompt's column in every chat layout."""

    prompt: str = "prompt"
    response: str = "response"
    system: str = "system"


def _json_columns(row: Any) -> Any:
    """The row with each message-list column held as JSON text (a CSV holds every column as text, and exports often
    write a list that way) parsed to its list of messages; a column that does not parse to one stays as it is."""
    if not isinstance(row, dict):
        return row
    parsed_row = None
    for key in JSON_MESSAGE_COLUMNS:
        value = row.get(key)
        if not (isinstance(value, str) and value.lstrip().startswith("[")):
            continue
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            continue
        # Only a list of messages: a prompt that is JSON text of something else (function-calling data) stays text.
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and {"role", "from"} & m.keys()
                                                       for m in parsed):
            parsed_row = parsed_row or dict(row)
            parsed_row[key] = parsed
    return parsed_row or row


def layouts_of(row: dict[str, Any], columns: Columns) -> list[str]:
    """Every layout whose columns this row has."""
    found = []
    if isinstance(row.get("messages"), list | str):  # text: JSON that did not parse, named row by row
        found.append("messages")
    if isinstance(row.get("conversations"), list):
        found.append("sharegpt")
    if "instruction" in row and "output" in row:
        found.append("alpaca")
    if columns.prompt in row and columns.response in row:
        found.append("pairs")
    if "prompt" in row and "completion" in row and {columns.prompt, columns.response} != {"prompt", "completion"}:
        found.append("prompt_completion")
    if "text" in row and isinstance(row.get("text"), str):
        found.append("text")
    return found


def preference_kind(row: dict[str, Any], columns: Columns) -> str | None:
    """What kind of preference row this is (DPO/ORPO pairs, KTO labels, OpenAI's DPO format), or None for a row
    that is not one, or whose preference columns the user mapped to SFT's (`data.columns` response: chosen)."""
    if {"chosen", "rejected", "completion"} & {columns.prompt, columns.response}:
        return None
    if "chosen" in row and "rejected" in row:
        context = [k for k in ("conversations", "messages", "instruction", "input", "prompt", "question") if k in row]
        return " + ".join([*context, "chosen", "rejected"]) + ": DPO/ORPO preference pairs"
    if "kto_tag" in row:
        return "kto_tag: KTO's good/bad labels"
    if "completion" in row and "label" in row and "prompt" in row:
        return "prompt + completion + label: KTO's good/bad labels"
    if isinstance(row.get("label"), bool) and (chat := next((k for k in ("messages", "conversations") if k in row),
                                                            None)):
        return f"{chat} + label (true/false): KTO's good/bad labels"
    if "preferred_output" in row and "non_preferred_output" in row:
        return "input + preferred_output + non_preferred_output: OpenAI's DPO format"
    return None


def _not_supervised(kind: str) -> str:
    method, what = ("kto", "labelled answers") if "KTO" in kind else ("dpo or orpo", "preference pairs")
    return f"preference data ({kind}): not supported by --method sft (train.method: sft, the default), which " \
           "trains supervised fine-tuning rows (messages, conversations, instruction/output, prompt/response, " \
           f"prompt/completion, text); --method {method} trains {what}"


def refuse_preference(rows: list[tuple[str, Any]], columns: Columns, source: str, others: int | None = None) -> None:
    """A DataError naming the file where its first rows are mostly preference rows (at least as many as `others`,
    the rows of the best other layout; by default, the rows that are not preference rows)."""
    kinds: dict[str, int] = {}
    objects = 0
    for _, row in rows:
        if isinstance(row, dict):
            objects += 1
            if kind := preference_kind(row, columns):
                kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        return
    most = max(kinds, key=lambda k: kinds[k])
    if kinds[most] >= (objects - sum(kinds.values()) if others is None else others):
        raise DataError(f"{source}: {_not_supervised(most)}")


def detect_layout(rows: list[tuple[str, Any]], columns: Columns, source: str) -> str:
    """The one layout the first rows agree on; ambiguity is an error listing the candidates. Preference rows are an
    error naming the file, not one bad row each: a preference dataset read as SFT would train on its prompts."""
    votes: dict[str, int] = {}
    seen_keys: set[str] = set()
    for _, row in rows:
        if not isinstance(row, dict):
            continue
        seen_keys.update(row)
        for layout in layouts_of(row, columns):
            votes[layout] = votes.get(layout, 0) + 1
    refuse_preference(rows, columns, source, max(votes.values(), default=0))
    if not votes:
        raise DataError(
            f"{source}: cannot tell the dataset layout from its columns {sorted(seen_keys)[:12]}; expected one of "
            "messages, conversations (sharegpt), instruction/output (alpaca), prompt/response (pairs), "
            "prompt/completion (TRL), text; "
            "or pass --format with data.columns for other names"
        )
    best = max(votes.values())
    top = sorted(k for k, v in votes.items() if v == best)
    if len(top) > 1:
        raise DataError(f"{source}: ambiguous layout: rows match both {' and '.join(top)}; choose one with --format")
    return top[0]


def _check_messages(messages: Any, tools: list[dict[str, Any]] | None = None) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    calls_open: tuple[int, list[str]] | None = None  # the assistant turn whose tool calls await results
    results = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        role, content = m.get("role"), m.get("content")
        if role == TOOL_ROLE:
            if calls_open is None:
                return f"message {i} (tool): a tool result with no tool call before it (the turn before it is " \
                       "not an assistant turn with 'tool_calls')"
            if reason := _check_tool_result(i, m, *calls_open, results):
                return reason
            results += 1
            continue
        if role not in ROLES:
            return f"message {i}: unknown role {role!r} (expected one of {', '.join((*ROLES, TOOL_ROLE))})"
        if calls_open is not None and not results:
            return f"message {i}: the tool calls of message {calls_open[0]} have no tool result after them " \
                   "(a 'tool' turn with each call's result)"
        calls_open, results = None, 0
        if role == "assistant" and m.get("tool_calls") is not None:
            names = _check_tool_calls(i, m.get("tool_calls"), tools)
            if isinstance(names, str):
                return names
            if content is not None and not isinstance(content, str):
                return f"message {i} (assistant): content must be a string (or left out beside 'tool_calls')"
            if content and (reason := _not_unicode(content)):
                return f"message {i} ({role}): content {reason}"
            calls_open = (i, names)
            continue
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({role}): content must be a non-empty string"
        if reason := _not_unicode(content):
            return f"message {i} ({role}): content {reason}"
        if role == "system" and i != 0:
            return f"message {i}: a system message may only come first"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        return "turns out of order: the first non-system message must be from the user"
    for a, b in itertools.pairwise(turns):
        if a == b and a != TOOL_ROLE:  # a turn of several calls is followed by several results
            return f"turns out of order: two {a} messages in a row"
    if "assistant" not in turns:
        return "no assistant message to learn from"
    if turns[-1] == "user":
        return f"the conversation ends on a user turn (message {len(messages) - 1}) with no assistant answer after it"
    return None


def _check_tool_calls(i: int, calls: Any, tools: list[dict[str, Any]] | None) -> list[str] | str:
    """The names an assistant turn's tool calls call, or the reason they are bad."""
    where = f"message {i} (assistant): 'tool_calls'"
    if not isinstance(calls, list) or not calls:
        return f"{where} must be a non-empty list of calls, got {_kind(calls)}"
    known = [t["function"]["name"] for t in tools or []]
    names = []
    for k, call in enumerate(calls):
        fn = _function_of(call)
        if isinstance(fn, str):
            return f"{where}[{k}]: {fn}"
        checked = _name_and_arguments(fn, f"{where}[{k}]", "function.{}", "function", known,
                                      " (or a JSON string of one)")
        if isinstance(checked, str):
            return checked
        name = checked[0]
        if reason := _not_unicode(json.dumps(call, ensure_ascii=False)):
            return f"{where}[{k}] ({name}) {reason}"
        names.append(name)
    return names


def _function_of(call: Any) -> dict[str, Any] | str:
    """The {"name", "arguments"} part of a tool call, nested under "function" or (flat) the call itself."""
    if not isinstance(call, dict):
        return f"expected an object, got {_kind(call)}"
    if call.get("type", "function") != "function":
        return f"type must be 'function', got {call.get('type')!r}"
    fn = call.get("function", call)
    return fn if isinstance(fn, dict) else f"'function' must be an object, got {_kind(fn)}"


def _check_tool_result(i: int, m: dict[str, Any], call_at: int, names: list[str], results: int) -> str | None:
    content, name = m.get("content"), m.get("name")
    if not isinstance(content, str):
        return f"message {i} (tool): content must be a string (a JSON result as text: json.dumps it), " \
               f"got {_kind(content)}"
    if reason := _not_unicode(content):
        return f"message {i} (tool): content {reason}"
    if results >= len(names):
        return f"message {i} (tool): more tool results than the {len(names)} tool call{'s' * (len(names) > 1)} " \
               f"of message {call_at}"
    if name is not None and name not in names:
        return f"message {i} (tool): a result for {name!r}, which message {call_at} did not call ({', '.join(names)})"
    if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
        return f"message {i} (tool): tool_call_id must be a string"
    return None


def _json_text(value: str, what: str) -> Any:  # the parsed value, or a BadRow
    """A field given as JSON text (CSV and parquet hold lists and objects that way), parsed; or why it is not JSON."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        return BadRow(f"{what} is a string but not valid JSON ({json_reason(exc)})")


def _check_tools(value: Any) -> list[dict[str, Any]] | str | None:
    """A row's `tools`: the function specs (None for none), or the reason they are bad."""
    if value is None:
        return None
    if isinstance(value, str):  # CSV and parquet datasets often hold the list as JSON text
        value = _json_text(value, "'tools'")
        if isinstance(value, BadRow):
            return value.reason
    if not isinstance(value, list):
        return f"'tools' must be a list of function specs, got {_kind(value)}"
    names: list[str] = []
    for k, spec in enumerate(value):
        shape = 'expected {"type": "function", "function": {"name", "description", "parameters"}}'
        if not isinstance(spec, dict) or not isinstance(spec.get("function"), dict):
            return f"'tools'[{k}]: {shape}, got {_kind(spec) if not isinstance(spec, dict) else sorted(spec)}"
        if spec.get("type", "function") != "function":
            return f"'tools'[{k}]: type must be 'function', got {spec.get('type')!r}"
        fn = spec["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            return f"'tools'[{k}]: the function has no name (function.name must be a non-empty string)"
        if name in names:
            return f"'tools'[{k}]: {name!r} is defined twice"
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            return f"'tools'[{k}] ({name}): function.parameters must be a JSON schema object, got " \
                   f"{_kind(fn['parameters'])}"
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            return f"'tools'[{k}] ({name}): function.description must be a string"
        if reason := _not_unicode(json.dumps(spec, ensure_ascii=False)):
            return f"'tools'[{k}] ({name}) {reason}"
        names.append(name)
    return value or None


def _name_and_arguments(fn: dict[str, Any], at: str, field: str, noun: str, known: list[str] | None = None,
                        object_hint: str = "") -> tuple[str, dict[str, Any]] | str:
    """A call's function name and its arguments as an object (parsed when given as a JSON string), or the reason
    they are bad. `field` names a key as the layout writes it ("function.{}" or "'{}'"), `noun` what has the name;
    `known`: the row's tool names, when it declares tools."""
    name, args = fn.get("name"), fn.get("arguments")
    arguments = field.format("arguments")
    if not isinstance(name, str) or not name.strip():
        return f"{at}: the {noun} has no name ({field.format('name')} must be a non-empty string)"
    if known and name not in known:
        return f"{at}: calls {name!r}, which is not among the row's tools ({', '.join(known)})"
    if args is None:
        return f"{at} ({name}): {arguments} is missing (use {{}} for a call without arguments)"
    if isinstance(args, str):
        args = _json_text(args, f"{at} ({name}): {arguments}")
        if isinstance(args, BadRow):
            return args.reason
    if not isinstance(args, dict):
        return f"{at} ({name}): {arguments} must be an object{object_hint}, got {_kind(args)}"
    return name, args


def _sharegpt_messages(conv: list[Any]) -> list[dict[str, Any]] | str:
    """A sharegpt conversation as messages-layout turns (LLaMA-Factory's function_call and observation turns as
    tool calls and tool results), or the reason it cannot be: a turn is message i of the result, one to one."""
    messages: list[dict[str, Any]] = []
    called: list[str] | None = None  # the names the last function_call turn called, while its results follow
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"turn {i} is not an object"
        who = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        tag = str(who).lower() if who is not None else None
        weights = {k: turn[k] for k in (*TRAINING_KEYS, *TRAIN_DETAIL_KEYS) if k in turn}
        if tag == SHAREGPT_FUNCTION_CALL:
            calls = _sharegpt_calls(i, value)
            if isinstance(calls, str):
                return calls
            messages.append({"role": "assistant", "content": "", "tool_calls": calls, **weights})
            called = [c["function"]["name"] for c in calls]
            continue
        if tag == SHAREGPT_OBSERVATION:
            if called is None:
                return f"turn {i} (observation): a tool result with no function_call turn before it"
            result = {"role": TOOL_ROLE, "content": value, **weights}
            if len(called) == 1:
                result["name"] = called[0]
            messages.append(result)
            continue
        called = None
        role = SHAREGPT_ROLES.get(tag) if tag is not None else None
        if role is None:
            return f"turn {i}: unknown speaker {who!r} (expected human/gpt/system or user/assistant, " \
                   f"or {SHAREGPT_FUNCTION_CALL}/{SHAREGPT_OBSERVATION} for tool use)"
        messages.append({"role": role, "content": value, **weights})
    return messages


def _sharegpt_calls(i: int, value: Any) -> list[dict[str, Any]] | str:
    """A function_call turn's value (JSON text of {"name", "arguments"} or of a list of them, for parallel calls)
    as messages-layout tool calls, or the reason it is bad."""
    where = f"turn {i} ({SHAREGPT_FUNCTION_CALL})"
    shape = '{"name": ..., "arguments": {...}} or a list of such calls'
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as exc:
            return f"{where}: the value is not valid JSON ({json_reason(exc)}); expected {shape}"
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        return f"{where}: the value is an empty list; expected {shape}"
    out = []
    for k, call in enumerate(calls):
        at = f"{where}[{k}]" if isinstance(parsed, list) else where
        if not isinstance(call, dict):
            return f"{at}: expected {shape}, got {_kind(call)}"
        fn = _function_of(call)
        if isinstance(fn, str):
            return f"{at}: {fn}"
        checked = _name_and_arguments(fn, at, "'{}'", "call")
        if isinstance(checked, str):
            return checked
        name, args = checked
        out.append({"type": "function", "function": {"name": name, "arguments": args}})
    return out


def _sharegpt_tools(value: Any) -> list[dict[str, Any]] | str | None:
    """A sharegpt row's `tools` (LLaMA-Factory writes a JSON string of a list; "" for none), each spec bare
    {"name", "description", "parameters"} or typed, as the typed specs `_check_tools` takes, or the reason."""
    if isinstance(value, str):
        if not value.strip():
            return None
        value = _json_text(value, "'tools'")
        if isinstance(value, BadRow):
            return value.reason
    if isinstance(value, list):
        value = [{"type": "function", "function": spec}
                 if isinstance(spec, dict) and "function" not in spec and "type" not in spec else spec
                 for spec in value]
    return _check_tools(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _normalized(m: dict[str, Any]) -> dict[str, Any]:
    """A checked message as the chat template gets it: role and content, and the tool fields where there are some
    (tool-call content "" where left out, arguments parsed); a plain message is {"role", "content"} as ever."""
    if m["role"] == TOOL_ROLE:
        out = {"role": TOOL_ROLE, "content": m["content"]}
        out.update({k: m[k] for k in ("name", "tool_call_id") if m.get(k) is not None})
        return out
    if m["role"] == "assistant" and m.get("tool_calls") is not None:
        calls = []
        for call in m["tool_calls"]:
            fn = call.get("function", call)
            args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
            normal = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
            if isinstance(call.get("id"), str):
                normal["id"] = call["id"]
            calls.append(normal)
        return {"role": "assistant", "content": m.get("content") or "", "tool_calls": calls}
    return {"role": m["role"], "content": m["content"]}


def _text_parts(messages: Any) -> Any:  # the messages, or a BadRow
    """The messages with each content given as a list of parts joined into one string, or the reason a part cannot
    be: text parts only ({"type": "text", "text"} or LLaMA-Factory's "value"), concatenated as the chat templates that
    take parts concatenate them. Anything that is not a list of objects is left for `_check_messages` to name."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            text = _joined_parts(f"message {i} ({m.get('role')})", m["content"])
            if isinstance(text, BadRow):
                return text
            m = {**m, "content": text}
        out.append(m)
    return out


def _joined_parts(where: str, parts: list[Any]) -> str | BadRow:
    texts = []
    for k, part in enumerate(parts):
        at = f"{where}: content[{k}]"
        if not isinstance(part, dict):
            return BadRow(f'{at} must be a part like {{"type": "text", "text": "..."}}, got {_kind(part)}')
        kind = part.get("type")
        if kind == "text":
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                return BadRow(f"{at}: a text part's 'text' (or 'value') must be a string, got {_kind(text)}")
            texts.append(text)
        elif kind in MEDIA_PARTS:
            return BadRow(f"{at} is an {kind!r} part: {MEDIA_PARTS[kind]} not supported yet (text parts only)")
        elif kind is None:
            return BadRow(f"{at} has no 'type' (text parts are {{\"type\": \"text\", \"text\": \"...\"}})")
        else:
            return BadRow(f"{at} is a {kind!r} part, not supported yet (text parts only)")
    return "".join(texts)


def _untrained_turns(messages: list[dict[str, Any]]) -> tuple[int, ...] | str:
    """The assistant turns (counted among assistant messages) left out of the loss, or the reason a message's training
    field is bad. A message's weight (0 or 1: ints or floats, as pandas writes them) and Axolotl's training flag
    (false or true) say the same thing: 0 / false is context, not trained; 1 / true trains an assistant turn (the
    default) and is refused on any other, as only assistant turns are trained. Axolotl's per-character spans are
    refused: nothing here trains part of a turn."""
    untrained = []
    turn = -1
    for i, m in enumerate(messages):
        role = m["role"]
        turn += role == "assistant"
        if detail := next((k for k in TRAIN_DETAIL_KEYS if not _absent(m.get(k)) and m[k] != []), None):
            return f"message {i} ({role}): {detail!r} (Axolotl's character spans to train within a turn): not " \
                   "supported yet; mark the whole message with 'training': true or false instead"
        given = [k for k in TRAINING_KEYS if not _absent(m.get(k))]
        if not given:
            continue
        wanted = []
        for key in given:
            value = m[key]
            if key in TRAIN_FLAGS:
                if not isinstance(value, bool):
                    return f"message {i} ({role}): {key!r} must be true (trained) or false (not trained), got " \
                           f"{value!r}"
            elif type(value) not in (int, float) or value not in (0, 1):
                return f"message {i} ({role}): {key!r} must be 0 (not trained) or 1 (trained), got {value!r}"
            wanted.append(bool(value))
        if len(set(wanted)) > 1:
            said = " and ".join(f"{k!r} {_shown(m[k])}" for k in given)
            return f"message {i} ({role}): {said} disagree"
        if role == "assistant":
            if not wanted[0]:
                untrained.append(turn)
        elif wanted[0]:
            return f"message {i} ({role}): {given[0]!r} {_shown(m[given[0]])} asks to train a {role} message; only " \
                   "assistant messages are trained (data.train_on=all trains every token)"
    if untrained and len(untrained) == turn + 1:
        return "every assistant message is marked not trained (weight 0 or training false): nothing to learn from"
    return tuple(untrained)


def _shown(value: Any) -> str:
    """A training field's value as the user wrote it in JSON (true, 0, 1.0)."""
    return json.dumps(value) if isinstance(value, bool) else repr(value)


def _media(row: dict[str, Any]) -> str | None:
    """Why a row that carries images, videos or audio cannot train (yet)."""
    for key in MEDIA_FIELDS:
        value = row.get(key)
        if _absent(value) or value == [] or value == "":
            continue
        count = f" ({len(value)})" if isinstance(value, list) else ""
        return f"the row has {key!r}{count}: {key.rstrip('s') if key == 'audios' else key} not supported yet " \
               "(the base model is text-only; image chats train a vision base: Qwen2.5-VL, Gemma 3)"
    return None


def _placeholder(messages: list[dict[str, Any]], name: Any) -> str | None:
    for i, m in enumerate(messages):
        if isinstance(m.get("content"), str) and IMAGE_PLACEHOLDER in m["content"]:
            return f"{name(i, m)} holds an {IMAGE_PLACEHOLDER} placeholder: images not supported yet (it would " \
                   "train as literal text)"
    return None


def _absent(value: Any) -> bool:
    """A field left empty: null, or the NaN pandas writes for a missing value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _required_text(row: dict[str, Any], key: str) -> str | BadRow:
    """A field that must hold text: its string, or why it does not (missing, null, NaN, another type)."""
    if key not in row:
        return BadRow(f"missing field {key!r}")
    value = row[key]
    if value is None:
        return BadRow(f"{key!r} is null; it must be a string")
    if isinstance(value, float) and math.isnan(value):
        return BadRow(f"{key!r} is NaN (an empty value, as pandas writes one); it must be a string")
    if not isinstance(value, str):
        return BadRow(f"{key!r} must be a string, got {_kind(value)} {value!r}"[:200])
    return value


def _optional_text(row: dict[str, Any], key: str) -> str | BadRow | None:
    """An optional text field: its string, None where absent (null, NaN), or why it is not text."""
    value = row.get(key)
    if _absent(value):
        return None
    if not isinstance(value, str):
        return BadRow(f"{key!r} must be a string (or left out), got {_kind(value)} {value!r}"[:200])
    return value


def _chat_record(messages: Any, row: dict[str, Any], tools: list[dict[str, Any]] | None, expect: str | None,
                 columns: Columns) -> Record | str:
    """A messages- or sharegpt-layout row's Record: parts joined, checked, weights read, the row's system prompt
    put first."""
    messages = _text_parts(messages)
    if isinstance(messages, BadRow):
        return messages.reason
    if reason := _check_messages(messages, tools):
        return reason
    untrained = _untrained_turns(messages)
    if isinstance(untrained, str):
        return untrained
    if reason := _placeholder(messages, lambda i, m: f"message {i} ({m['role']})"):
        return reason
    normalized = [_normalized(m) for m in messages]
    system = _optional_text(row, columns.system)
    if isinstance(system, BadRow):
        return system.reason
    if system and system.strip():
        if reason := _not_unicode(system):
            return f"{columns.system!r} {reason}"
        if reason := _placeholder([{"content": system}], lambda i, m: f"the row's {columns.system!r}"):
            return reason
        if normalized[0]["role"] != "system":
            normalized.insert(0, {"role": "system", "content": system})
        elif normalized[0]["content"] != system:
            return f"two system prompts: the row's {columns.system!r} and message 0 (system) differ; keep one"
    return Record("", messages=normalized, expect=expect, tools=tools, untrained=untrained)


def _not_unicode(text: str) -> str | None:
    """Why `text` cannot be tokenized or written as UTF-8: a lone surrogate, which JSON's \\ud800 escapes allow."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (a lone surrogate \\u{ord(text[exc.start]):04x} at character {exc.start + 1})"
    return None


def _text(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    return value if isinstance(value, str) else None


def _single_turn(prompt: str, response: str, system: str | None, expect: str | None,
                 history: list[dict[str, Any]] | None = None) -> Record | str:
    messages = [*(history or ()), {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if system and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    if reason := _check_messages(messages):
        return reason
    parts = {"system": "the system prompt", "user": "the prompt", "assistant": "the response"}
    if reason := _placeholder(messages, lambda i, m: parts[m["role"]]):
        return reason
    return Record("", messages=messages, expect=expect)


def _history(value: Any) -> list[dict[str, Any]] | BadRow:
    """LLaMA-Factory's alpaca `history`, [[instruction, response], ...] before the row's own turn, as turns."""
    if _absent(value) or value == []:
        return []
    if not isinstance(value, list):
        return BadRow(f"'history' must be a list of [instruction, response] pairs, got {_kind(value)}")
    turns = []
    for k, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            return BadRow(f"'history'[{k}] must be an [instruction, response] pair of strings, got "
                        f"{json.dumps(pair, ensure_ascii=False)[:80]}")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def convert_row(row: Any, layout: str, columns: Columns) -> Record | str:
    """A Record, or the reason the row is bad."""
    if isinstance(row, BadRow):
        return row.reason
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    if kind := preference_kind(row, columns):
        return _not_supervised(kind)
    expect = expect_of(row)
    if isinstance(expect, BadRow):
        return expect.reason
    convert = _CONVERTERS.get(layout)
    if convert is None:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return convert(row, columns, expect)


def expect_of(row: dict[str, Any]) -> str | None | BadRow:
    """The row's `expect` (what verify compares the reply with; None for none), or why the row is bad: images,
    videos or audio, an `expect` that is not Unicode or not a valid regex, an unknown `match`."""
    if reason := _media(row):
        return BadRow(reason)
    expect = row.get("expect") if isinstance(row.get("expect"), str) else None
    if expect is not None and (reason := _not_unicode(expect)):
        return BadRow(f"'expect' {reason}")
    match = row.get("match", "contains")
    if match not in ("contains", "exact", "regex"):
        return BadRow(f"'match' must be contains, exact or regex, got {match!r}")
    if match == "regex" and expect is not None:
        try:
            re.compile(expect)
        except re.error as exc:
            return BadRow(f"'expect' is not a valid regex: {exc}")
    return expect


def _messages_row(row: dict[str, Any], columns: Columns, expect: str | None) -> Record | str:
    if "messages" not in row:
        return f"missing field 'messages' (keys {sorted(row)})"
    if isinstance(row["messages"], str):  # a JSON list as text is parsed as the row is read: this one is not one
        try:
            json.loads(row["messages"])
            reason = "not a JSON list of messages"
        except (ValueError, RecursionError) as exc:
            reason = f"not valid JSON: {json_reason(exc)}"
        return f"'messages' is text, {reason} (a list of messages given as JSON text is read as that list)"
    converted = _legacy_functions(row)
    if isinstance(converted, str):
        return converted
    messages, tools = converted
    tools = _check_tools(tools)
    if isinstance(tools, str):
        return tools
    return _chat_record(messages, row, tools, expect, columns)


def _legacy_functions(row: dict[str, Any]) -> tuple[Any, Any] | str:
    """A messages row's messages and tools, OpenAI's legacy function calling (a row's "functions", an assistant
    turn's "function_call", a "function" turn with its result) converted to the tools form that replaced it: a
    "functions" spec is a tool's function, a function_call an assistant turn's one tool call, a "function" turn a
    "tool" turn. A row that mixes the two forms is the reason it is bad."""
    messages, tools, functions = row["messages"], row.get("tools"), row.get("functions")
    if not _absent(functions):
        if not _absent(tools):
            return "the row has both 'functions' (OpenAI's legacy form) and 'tools'; keep one"
        if not isinstance(functions, list):
            return f"'functions' must be a list of function specs, got {_kind(functions)}"
        tools = [{"type": "function", "function": spec} for spec in functions]
    if not isinstance(messages, list):
        return messages, tools
    converted = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and not _absent(m.get("function_call")):
            if m.get("tool_calls") is not None:
                return f"message {i}: both 'function_call' (OpenAI's legacy form) and 'tool_calls'; keep one"
            call = {"type": "function", "function": m["function_call"]}
            m = {**{k: v for k, v in m.items() if k != "function_call"}, "tool_calls": [call]}
        elif isinstance(m, dict) and m.get("role") == LEGACY_FUNCTION_ROLE:
            m = {**m, "role": TOOL_ROLE}
        converted.append(m)
    return converted, tools


def _sharegpt_row(row: dict[str, Any], columns: Columns, expect: str | None) -> Record | str:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        return f"missing or empty field 'conversations' (keys {sorted(row)})"
    tools = _sharegpt_tools(row.get("tools"))
    if isinstance(tools, str):
        return tools
    messages = _sharegpt_messages(conv)
    if isinstance(messages, str):
        return messages
    return _chat_record(messages, row, tools, expect, columns)


def _alpaca_row(row: dict[str, Any], columns: Columns, expect: str | None) -> Record | str:
    system = _optional_text(row, columns.system)
    instruction, output = _required_text(row, "instruction"), _required_text(row, "output")
    extra = _optional_text(row, "input")
    history = _history(row.get("history"))
    for value in (instruction, output, system, extra, history):
        if isinstance(value, BadRow):
            return value.reason
    assert isinstance(instruction, str) and isinstance(output, str) and isinstance(history, list)
    prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return _single_turn(prompt, output, system if isinstance(system, str) else None, expect, history)


def _pairs_row(row: dict[str, Any], columns: Columns, expect: str | None) -> Record | str:
    system = _optional_text(row, columns.system)
    asked, answered = _required_text(row, columns.prompt), _required_text(row, columns.response)
    for value in (asked, answered, system):
        if isinstance(value, BadRow):
            return value.reason
    assert isinstance(asked, str) and isinstance(answered, str)
    return _single_turn(asked, answered, system if isinstance(system, str) else None, expect)


def _prompt_completion_row(row: dict[str, Any], columns: Columns, expect: str | None) -> Record | str:
    """TRL's prompt-completion rows, trained as TRL trains them: loss on the completion only. Two strings are raw
    text (no chat template: the prompt, then the completion and EOS); two message lists are one conversation, the
    prompt's own assistant turns context, the completion's assistant turns trained."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            return f"'prompt' ({_kind(prompt)}) and 'completion' ({_kind(completion)}) must both be message lists " \
                   "(conversational) or both strings"
        for k, m in enumerate(completion):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                role = m.get("role") if isinstance(m, dict) else _kind(m)
                return f"completion[{k}] is {role!r}, not an assistant message: the completion is what is trained, " \
                       "and only assistant turns are (a tool result in a completion is not supported)"
        tools = _check_tools(row.get("tools"))
        if isinstance(tools, str):
            return tools
        record = _chat_record([*prompt, *completion], row, tools, expect, columns)
        if isinstance(record, str):
            return record
        answered = sum(isinstance(m, dict) and m.get("role") == "assistant" for m in prompt)
        record.untrained = tuple(sorted({*range(answered), *record.untrained}))
        if len(record.untrained) == answered + len(completion):
            return "every completion message is marked not trained: nothing to learn from"
        return record
    asked, answered_text = _required_text(row, "prompt"), _required_text(row, "completion")
    for value in (asked, answered_text):
        if isinstance(value, BadRow):
            return value.reason
    assert isinstance(asked, str) and isinstance(answered_text, str)
    if not answered_text.strip():
        return "'completion' is empty: nothing to learn from"
    if reason := _not_unicode(asked + answered_text):
        return f"'prompt' or 'completion' {reason}"
    return Record("", text=asked + answered_text, context_chars=len(asked))


def _text_row(row: dict[str, Any], columns: Columns, expect: str | None) -> Record | str:
    text = _text(row, "text")
    if text is None or not text.strip():
        return "missing or empty field 'text'"
    if reason := _not_unicode(text):
        return f"'text' {reason}"
    return Record("", text=text)


_CONVERTERS = {"messages": _messages_row, "sharegpt": _sharegpt_row, "alpaca": _alpaca_row, "pairs": _pairs_row,
               "prompt_completion": _prompt_completion_row, "text": _text_row}


# The fields each layout reads (beside expect, match and the media lists, which every layout checks), and the
# message fields the chat layouts read: any other is named in a warning, never dropped without a word.
_ROW_FIELDS = {"messages": ("messages", "tools", "functions"), "sharegpt": ("conversations", "tools"),
               "alpaca": ("instruction", "input", "output", "history"), "pairs": (),
               "prompt_completion": ("prompt", "completion", "tools"), "text": ("text",)}
_MESSAGE_FIELDS = {
    "messages": ("role", "content", "tool_calls", "tool_call_id", "function_call", *TRAINING_KEYS,
                 *TRAIN_DETAIL_KEYS),
    "sharegpt": ("from", "value", "role", "content", *TRAINING_KEYS, *TRAIN_DETAIL_KEYS)}


def unused_fields(row: Any, layout: str, columns: Columns) -> list[str]:
    """The fields of a row that its layout does not read (a message's as `messages[].field`)."""
    if not isinstance(row, dict) or layout not in _ROW_FIELDS:
        return []
    known = {*_ROW_FIELDS[layout], "expect", "match", *MEDIA_FIELDS}
    if layout != "text" and not (layout == "prompt_completion" and not isinstance(row.get("prompt"), list)):
        known.add(columns.system)  # raw text (text, plain prompt/completion) has no system turn to put it in
    if layout == "pairs":
        known.update((columns.prompt, columns.response))
    unused = [k for k in row if k not in known]
    lists = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion")}
    read = _MESSAGE_FIELDS["sharegpt" if layout == "sharegpt" else "messages"]
    for key in lists.get(layout, ()):
        if isinstance(turns := row.get(key), list):
            for m in turns:
                if isinstance(m, dict):
                    tool = m.get("role", m.get("from")) in (TOOL_ROLE, SHAREGPT_OBSERVATION, LEGACY_FUNCTION_ROLE)
                    unused += [f"{key}[].{k}" for k in m if k not in read and not (k == "name" and tool)]
    return unused


def _to_record(where: str, row: Any, layout: str, columns: Columns, system_prompt: str | None,
               max_row_bytes: int = MAX_ROW_BYTES, unused: dict[str, str] | None = None) -> Record | str:
    """The row as a Record, or the bad-row line naming where it came from. Its size is checked first: the work
    (and memory) of rendering and tokenizing a row grows with it. `unused` collects the fields it does not read."""
    if reason := too_large(row, max_row_bytes):
        return f"{where}: {reason}"
    if unused is not None:
        for name in unused_fields(row, layout, columns):
            unused.setdefault(name, where)
    return placed(convert_row(row, layout, columns), where, row, system_prompt)


def placed(result: Record | str, where: str, row: Any, system_prompt: str | None) -> Record | str:
    """A converted row with where it came from, its `match` mode, and data.system_prompt as its first turn where it
    has no system turn of its own; a bad row's reason, prefixed with where it came from."""
    if isinstance(result, str):
        return f"{where}: {result}"
    result.source = where
    if isinstance(row, dict) and row.get("match"):
        result.match = row["match"]
    if system_prompt and result.messages and result.messages[0]["role"] != "system":
        result.messages.insert(0, {"role": "system", "content": system_prompt})
    return result


def too_large(row: Any, max_row_bytes: int) -> str | None:
    """Why a row is too large to tokenize (over `max_row_bytes` of text; 0: no limit), or None."""
    if max_row_bytes > 0 and (size := _size_over(row, max_row_bytes)) is not None:
        return f"the row holds {size:,} bytes of text, more than data.max_row_bytes={max_row_bytes:,}; refused " \
               "before tokenizing (raise data.max_row_bytes to train on rows this long, or split the row)"
    return None


def _size_over(row: Any, limit: int) -> int | None:
    """The UTF-8 size of a row's strings (keys included) where it is over `limit`, else None. Its JSON text (in C;
    ASCII-escaped, so never shorter than the strings' UTF-8) settles nearly every row at once; only a row that may be
    over is walked and its strings encoded."""
    try:
        if len(json.dumps(row)) <= limit:
            return None
    except (TypeError, ValueError, RecursionError):  # a value JSON has no form for (a Hub dataset's image, bytes)
        pass
    strings: list[str] = []
    stack = [row]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            strings.extend(k for k in value if isinstance(k, str))
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    size = sum(len(s.encode("utf-8", "surrogatepass")) for s in strings)
    return size if size > limit else None


def _warn_unused(spec: str, layout: str, unused: dict[str, str]) -> None:
    if unused:
        listed = ", ".join(f"{name!r} (first at {where})" for name, where in itertools.islice(unused.items(), 12))
        more = f" and {len(unused) - 12} more" if len(unused) > 12 else ""
        # Ignored, whatever they hold: text is not trained, and a field of another tool's that says what to train
        # (a loss mask, a flag) is not applied; so the warning says just that, not "not trained".
        log.warning("%s: fields the %s layout does not read, ignored (their text is not trained, and anything they "
                    "say about what to train is not applied): %s%s", spec, layout, listed, more)


def _check_rows(spec: str, layout: str, on_bad_row: str, bad: list[str], n_records: int) -> None:
    if bad and on_bad_row == "error":
        listed = "\n  ".join(bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{spec}: {len(bad)} bad row{'s' * (len(bad) > 1)} ({layout} layout; "
                        f"--on-bad-row skip to drop them):\n  {listed}{more}")
    if not n_records:
        raise DataError(f"{spec}: no usable rows" + (f" ({len(bad)} bad rows skipped)" if bad else ""))


class RecordStream:
    """A dataset's records, read, detected, converted and validated as they are iterated, so memory stays flat in the
    rows; each iteration is a fresh pass over the source.

    The layout is detected from the first rows at construction (a file-level error anywhere in the source wins over
    a layout error), and the end of each pass raises the bad-row error listing each bad row (with on_bad_row
    "error"; "skip" drops them) or the no-usable-rows error. A row over `max_row_bytes` of text (0: no limit) is a
    bad row. `bad` lists the bad rows of the last complete pass. A caller that fails part-way through a pass for a
    reason of its own calls `check()` first, so that an error of the source itself is the one reported.
    """

    def __init__(self, spec: str, layout: str = "auto", columns: Columns | None = None, on_bad_row: str = "error",
                 system_prompt: str | None = None, hub_config: str | None = None, split: str = "train",
                 max_row_bytes: int = MAX_ROW_BYTES, revision: str | None = None, images: bool = False):
        self.spec, self.columns, self.on_bad_row = spec, columns or Columns(), on_bad_row
        self.images = images  # a vision base: image chats are read (images.py), not refused
        self.system_prompt, self._hub_config, self._split = system_prompt, hub_config, split
        self.max_row_bytes = max_row_bytes
        # A Hub dataset is read at one commit, every pass alike: the one `revision` names now (None: not the Hub)
        self.revision = hub_revision(spec, revision, hub_config) if is_hub_dataset(spec) else None
        self._warned = False  # unused fields are named once, not once a pass
        self.bad: list[str] = []
        self.records = 0  # records of the last complete pass
        rows = self._rows()
        head = list(itertools.islice(rows, 200))
        if not head:
            raise DataError(f"{spec}: the dataset is empty")
        try:
            self.layout = self._detect(head, layout)
        except DataError:
            for _ in rows:  # a file-level error further down is the one reported
                pass
            raise
        self._pending: tuple[list[tuple[str, Any]], Iterator[tuple[str, Any]]] | None = (head, rows)

    def _detect(self, head: list[tuple[str, Any]], layout: str) -> str:
        """The layout of the data, given (data.format) or detected from its first rows; preference data refused."""
        if layout in PREFERENCE_FORMATS:
            kind = f"data.format {layout}: " + ("KTO's good/bad labels" if layout == "kto" else "preference pairs")
            raise DataError(f"{self.spec}: {_not_supervised(kind)}")
        if layout == "auto":
            return detect_layout(head, self.columns, self.spec)
        refuse_preference(head, self.columns, self.spec)
        return layout

    def _convert(self, where: str, row: Any, unused: dict[str, str] | None) -> Record | str:
        """A row as its Record, or the bad-row line naming it."""
        if self.images:
            from .images import image_record

            return image_record(where, row, lambda marked: _to_record(
                where, marked, self.layout, self.columns, self.system_prompt, self.max_row_bytes, unused))
        return _to_record(where, row, self.layout, self.columns, self.system_prompt, self.max_row_bytes, unused)

    def _rows(self) -> Iterator[tuple[str, Any]]:
        return ((where, _json_columns(row))
                for where, row in iter_rows(self.spec, self._hub_config, self._split, self.revision))

    def __iter__(self) -> Iterator[Record]:
        if self._pending is not None:  # the first pass reuses the rows read to detect the layout
            head, rest = self._pending
            self._pending = None
            rows: Iterator[tuple[str, Any]] = itertools.chain(head, rest)
        else:
            rows = self._rows()
        bad: list[str] = []
        n_records = 0
        unused: dict[str, str] | None = None if self._warned else {}
        raw_text = 0  # records of raw text, which data.system_prompt cannot reach
        for where, row in rows:
            result = self._convert(where, row, unused)
            if isinstance(result, str):
                bad.append(result)
                continue
            n_records += 1
            raw_text += result.text is not None
            yield result
        self.bad, self.records = bad, n_records
        if unused is not None:
            self._warned = True
            _warn_unused(self.spec, self.layout, unused)
            if self.system_prompt and raw_text:
                log.warning("%s: data.system_prompt (--system-prompt) has no effect on training the %d rows of raw "
                            "text (%s layout): raw text has no chat template, so no system turn to put it in (the "
                            "Modelfile still serves it as SYSTEM)", self.spec, raw_text, self.layout)
        _check_rows(self.spec, self.layout, self.on_bad_row, bad, n_records)

    def check(self) -> None:
        """One pass that only reads and validates: raises what the end of a pass raises."""
        for _ in self:
            pass


def stream_records(cfg: DataConfig, spec: str, split: str = "train", images: bool = False) -> RecordStream:
    """`spec` (a path, a Hub id, or the demo data's `split`) with the data config's layout, columns, system prompt
    and bad-row policy; `images`: a vision base's data, image chats read (images.py)."""
    # The spec as typed (not normalised through Path, which drops a leading ./): iter_rows decides from it whether
    # this is a local path or a Hub id.
    source = str(demo_path(split)) if spec == DEMO_DATA else spec
    columns = Columns(**cfg.columns) if cfg.columns else Columns()
    return RecordStream(source, cfg.format, columns, cfg.on_bad_row, cfg.system_prompt, cfg.hub_config, cfg.split,
                        cfg.max_row_bytes, cfg.revision, images=images)
