"""Tool calls in the data: the messages layout's `tools`, assistant `tool_calls` and `tool` turns, as Hugging Face chat
templates and TRL take them. Bad rows are named by file:line with the problem; loss falls on the assistant's tool-call
turns and answers, never on tool results or user turns; a chat template that renders no tool information is an error
naming the file and the template."""

import json
from pathlib import Path

import pytest
from conftest import CHATML_TEMPLATE, build_tiny_tokenizer, read_dataset

from ftdeploy.config import DataConfig
from ftdeploy.data import (
    IGNORE_INDEX,
    demo_path,
    inspect_data,
    load_eval,
    prepare_data,
    tokenize_conversation,
    tokenize_records,
)
from ftdeploy.errors import DataError
from ftdeploy.templates import match_chat_template

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "tool_templates"
DEMO = demo_path("train").parent

LOOKUP_PORT = {"type": "function", "function": {
    "name": "lookup_port", "description": "The TCP port a service listens on.",
    "parameters": {"type": "object", "properties": {"service": {"type": "string"}}, "required": ["service"]}}}
CALL = {"type": "function", "function": {"name": "lookup_port", "arguments": {"service": "zephyr"}}}
TOOL_CHAT = [{"role": "user", "content": "What port does zephyr use?"},
             {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "name": "lookup_port", "content": "7341"},
             {"role": "assistant", "content": "Zephyr uses port 7341."}]
TOOL_ROW = {"messages": TOOL_CHAT, "tools": [LOOKUP_PORT]}
PLAIN_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _tools_tokenizer(name="smollm2-with-qwen-tools"):
    tok = build_tiny_tokenizer((TEMPLATES / "qwen2.5.jinja").read_text())
    tok.name_or_path = name
    return tok


def _mapping(tok):
    return match_chat_template(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                               tok.bos_token)


def _with(messages=None, **row):
    return {"messages": TOOL_CHAT if messages is None else messages, "tools": [LOOKUP_PORT], **row}


def _turn(i, **changes):
    """TOOL_CHAT with message i changed (a key set to None is removed)."""
    msgs = [dict(m) for m in TOOL_CHAT]
    msgs[i].update(changes)
    msgs[i] = {k: v for k, v in msgs[i].items() if v is not None}
    return msgs


# ---------------------------------------------------------------- formats


def test_a_tool_row_converts_to_what_chat_templates_take(tmp_path):
    as_string = _turn(1, tool_calls=[{"type": "function", "id": "call_1",
                                      "function": {"name": "lookup_port", "arguments": '{"service": "zephyr"}'}}])
    path = _write(tmp_path / "d.jsonl", [TOOL_ROW, _with(as_string), PLAIN_ROW])
    records = read_dataset(str(path)).records
    assert records[0].tools == [LOOKUP_PORT]
    assert records[0].messages == [
        TOOL_CHAT[0], {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "7341", "name": "lookup_port"}, TOOL_CHAT[3]]
    assert records[1].messages[1]["tool_calls"] == [{**CALL, "id": "call_1"}]  # arguments parsed from JSON
    assert records[2].tools is None and records[2].messages == PLAIN_ROW["messages"]


def test_tools_as_a_json_string_and_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _write(tmp_path / "d.jsonl", [{**TOOL_ROW, "tools": json.dumps([LOOKUP_PORT])}])
    assert read_dataset(str(path)).records[0].tools == [LOOKUP_PORT]
    # parquet unifies the message structs: missing keys come back as None, as the OpenAI API writes them
    pq.write_table(pa.Table.from_pylist([TOOL_ROW, {**PLAIN_ROW, "tools": None}]), tmp_path / "d.parquet")
    records = read_dataset(str(tmp_path / "d.parquet")).records
    assert records[0].messages == read_dataset(str(path)).records[0].messages
    assert records[1].messages == PLAIN_ROW["messages"] and records[1].tools is None


BAD_TOOL_ROWS = [
    (_with(_turn(1, tool_calls={"name": "lookup_port"})), "message 1 (assistant): 'tool_calls' must be a non-empty "
                                                          "list of calls, got dict"),
    (_with(_turn(1, tool_calls=[])), "'tool_calls' must be a non-empty list of calls, got list"),
    (_with(_turn(1, tool_calls=[{"type": "function", "function": {"arguments": {}}}])),
     "message 1 (assistant): 'tool_calls'[0]: the function has no name"),
    (_with(_turn(1, tool_calls=[{"function": {"name": "lookup_port", "arguments": "{service: zephyr"}}])),
     "'tool_calls'[0] (lookup_port): function.arguments is a string but not valid JSON"),
    (_with(_turn(1, tool_calls=[{"function": {"name": "lookup_port", "arguments": ["zephyr"]}}])),
     "'tool_calls'[0] (lookup_port): function.arguments must be an object (or a JSON string of one), got list"),
    (_with(_turn(1, tool_calls=[{"function": {"name": "lookup_port", "arguments": '"zephyr"'}}])),
     "function.arguments must be an object (or a JSON string of one), got str"),
    (_with(_turn(1, tool_calls=[{"function": {"name": "lookup_port"}}])),
     "function.arguments is missing (use {} for a call without arguments)"),
    (_with(_turn(1, tool_calls=[{"type": "retrieval", "function": {"name": "lookup_port", "arguments": {}}}])),
     "'tool_calls'[0]: type must be 'function', got 'retrieval'"),
    (_with(_turn(1, tool_calls=[{"function": {"name": "lookup_prot", "arguments": {}}}])),
     "'tool_calls'[0]: calls 'lookup_prot', which is not among the row's tools (lookup_port)"),
    (_with(_turn(1, content=7)), "message 1 (assistant): content must be a string (or left out beside 'tool_calls')"),
    (_with([TOOL_CHAT[0], TOOL_CHAT[2], TOOL_CHAT[3]]),
     "message 1 (tool): a tool result with no tool call before it"),
    (_with([TOOL_CHAT[0], {"role": "assistant", "content": "Let me see."}, TOOL_CHAT[2], TOOL_CHAT[3]]),
     "message 2 (tool): a tool result with no tool call before it"),
    (_with([*TOOL_CHAT[:2], {"role": "user", "content": "well?"}, TOOL_CHAT[3]]),
     "message 2: the tool calls of message 1 have no tool result after them"),
    (_with([*TOOL_CHAT[:3], TOOL_CHAT[2], TOOL_CHAT[3]]),
     "message 3 (tool): more tool results than the 1 tool call of message 1"),
    (_with(_turn(2, name="lookup_host")), "message 2 (tool): a result for 'lookup_host', which message 1 did not call"),
    (_with(_turn(2, content={"port": 7341})), "message 2 (tool): content must be a string (a JSON result as text: "
                                              "json.dumps it), got dict"),
    (_with(_turn(2, content="\ud800")), "message 2 (tool): content is not valid Unicode"),
    ({**TOOL_ROW, "tools": {"lookup_port": LOOKUP_PORT}}, "'tools' must be a list of function specs, got dict"),
    ({**TOOL_ROW, "tools": "[{"}, "'tools' is a string but not valid JSON"),
    ({**TOOL_ROW, "tools": [LOOKUP_PORT["function"]]},
     "'tools'[0]: expected {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}, got "
     "['description', 'name', 'parameters']"),
    ({**TOOL_ROW, "tools": ["lookup_port"]}, "'tools'[0]: expected {\"type\": \"function\""),
    ({**TOOL_ROW, "tools": [{"type": "function", "function": {"description": "x"}}]},
     "'tools'[0]: the function has no name"),
    ({**TOOL_ROW, "tools": [LOOKUP_PORT, LOOKUP_PORT]}, "'tools'[1]: 'lookup_port' is defined twice"),
    ({**TOOL_ROW, "tools": [{"type": "function", "function": {"name": "lookup_port", "parameters": "service"}}]},
     "'tools'[0] (lookup_port): function.parameters must be a JSON schema object, got str"),
    ({"messages": [{"role": "tool", "content": "7341"}, *TOOL_CHAT]},
     "message 0 (tool): a tool result with no tool call before it"),
    ({"messages": [TOOL_CHAT[0]], "tools": [LOOKUP_PORT]}, "no assistant message to learn from"),
]


def test_each_bad_tool_row_is_named_by_line_with_its_problem(tmp_path):
    rows = [TOOL_ROW] + [row for row, _ in BAD_TOOL_ROWS]
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=f"{len(BAD_TOOL_ROWS)} bad rows \\(messages layout"):
        read_dataset(str(path))
    bad = read_dataset(str(path), on_bad_row="skip").bad  # every one of them, not the first 20
    assert len(bad) == len(BAD_TOOL_ROWS)
    for lineno, ((_, reason), line) in enumerate(zip(BAD_TOOL_ROWS, bad, strict=True), 2):
        assert line.startswith(f"{path}:{lineno}: ") and reason in line, (lineno, reason, line)


def test_a_conversation_may_end_on_the_call_or_its_result(tmp_path):
    # the tool call is what such a row teaches; a user turn may follow a result (but not end the chat: issue 24)
    thanks = [{"role": "user", "content": "thanks"}]
    path = _write(tmp_path / "d.jsonl", [{"messages": TOOL_CHAT[:2], "tools": [LOOKUP_PORT]},
                                         {"messages": TOOL_CHAT[:3], "tools": [LOOKUP_PORT]},
                                         {"messages": [*TOOL_CHAT[:3], *thanks,
                                                       {"role": "assistant", "content": "You're welcome."}]},
                                         {"messages": TOOL_CHAT[:3] + thanks}])
    result = read_dataset(str(path), on_bad_row="skip")
    assert len(result.records) == 3
    assert result.bad == [f"{path}:4: the conversation ends on a user turn (message 3) with no assistant answer "
                          "after it"]


# ---------------------------------------------------------------- labels


def _trained_and_masked(tok, tokenized):
    trained = tok.decode([t for t in tokenized.labels if t != IGNORE_INDEX])
    masked = tok.decode([t for t, lab in zip(tokenized.input_ids, tokenized.labels, strict=True)
                         if lab == IGNORE_INDEX])
    return trained, masked


def test_loss_falls_on_the_tool_call_and_the_answer_not_on_the_result_or_the_user():
    tok = _tools_tokenizer()
    rec = load_records_from_rows([TOOL_ROW])[0]
    tokenized = tokenize_conversation(rec.messages, tok, _mapping(tok), 2048, tools=rec.tools)
    trained, masked = _trained_and_masked(tok, tokenized)
    assert trained == ('<tool_call>\n{"name": "lookup_port", "arguments": {"service": "zephyr"}}\n</tool_call>'
                       "<|im_end|>\nZephyr uses port 7341.<|im_end|>\n")
    assert "<tools>" in masked and '"description": "The TCP port a service listens on."' in masked  # the specs
    assert "What port does zephyr use?" in masked
    assert "<tool_response>\n7341\n</tool_response>" in masked


def test_two_calls_in_a_turn_and_two_rounds_are_all_trained():
    tok = _tools_tokenizer()
    second = {"type": "function", "function": {"name": "lookup_port", "arguments": {"service": "marlowe"}}}
    chat = [TOOL_CHAT[0], {"role": "assistant", "content": "Checking both.", "tool_calls": [CALL, second]},
            {"role": "tool", "content": "7341"}, {"role": "tool", "content": "9103"},
            {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "7341"},
            {"role": "assistant", "content": "7341 and 9103."}]
    rec = load_records_from_rows([{"messages": chat, "tools": [LOOKUP_PORT]}])[0]
    tokenized = tokenize_conversation(rec.messages, tok, _mapping(tok), 2048, tools=rec.tools)
    trained, masked = _trained_and_masked(tok, tokenized)
    assert trained.count("<tool_call>") == 3 and "Checking both." in trained and "7341 and 9103." in trained
    assert "9103\n</tool_response>" in masked and "<tool_response>" not in trained
    assert [t for _, t in tokenize_records([rec] * 3, tok, _mapping(tok), 2048)] == [tokenized] * 3


def load_records_from_rows(rows, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return read_dataset(str(_write(Path(folder) / "d.jsonl", rows))).records


# ---------------------------------------------------------------- a template without tools



def test_a_template_without_tools_is_an_error_naming_the_file_and_the_template(tmp_path, data_paths):
    tok = build_tiny_tokenizer(CHATML_TEMPLATE)  # SmolLM2-135M-Instruct's own template: no tools
    tok.name_or_path = "SmolLM2-135M-Instruct"
    path = _write(tmp_path / "d.jsonl", [PLAIN_ROW] * 5 + [TOOL_ROW] + [PLAIN_ROW] * 3)
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(train=str(path)), tok, _mapping(tok), tmp_path / "out", seed=0)
    assert str(err.value) == (
        f"{path}:6: the row carries tools, but the chat template of SmolLM2-135M-Instruct renders none of them (the "
        "same text with and without `tools`); set data.chat_template=chatml-tools (ChatML with tool calls, which "
        "ftdeploy serves) to train them on this base, or use a base model whose chat template supports tools "
        "(Qwen2.5, Llama 3.1 and later), or drop the tool fields from the data")
    assert not (tmp_path / "out").exists()


def test_a_template_that_drops_tool_calls_is_an_error_too(tmp_path, data_paths):
    tok = build_tiny_tokenizer(CHATML_TEMPLATE)
    path = _write(tmp_path / "d.jsonl", [PLAIN_ROW, {"messages": TOOL_CHAT}])  # calls, but no tool specs
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(train=str(path)), tok, _mapping(tok), tmp_path / "out", seed=0)
    assert str(err.value).startswith(
        f"{path}:2: the row has tool calls, but the tokenizer's chat template does not render them")
    assert "set data.chat_template=chatml-tools" in str(err.value)  # the fix that exists, named


def test_rows_without_tools_still_prepare_on_a_template_without_tools(tmp_path):
    tok = build_tiny_tokenizer(CHATML_TEMPLATE)
    path = _write(tmp_path / "d.jsonl", [PLAIN_ROW] * 3)
    assert prepare_data(DataConfig(train=str(path)), tok, _mapping(tok), tmp_path / "out", seed=0).rows == 3


# ---------------------------------------------------------------- the bundled tool data


def test_the_bundled_tool_data_prepares_with_a_tool_template_and_inspect_counts_it(tmp_path):
    tok = _tools_tokenizer()
    mapping = _mapping(tok)
    cfg = DataConfig(train=str(DEMO / "tools.jsonl"), eval=str(DEMO / "tools_eval.jsonl"))
    stats = prepare_data(cfg, tok, mapping, tmp_path / "out", seed=0)
    assert 30 <= stats.rows <= 60 and stats.eval_rows >= 5
    evals = load_eval(tmp_path / "out")
    assert all(e.tools for e in evals) and any(e.messages[-1].get("tool_calls") for e in evals)
    records = read_dataset(str(DEMO / "tools.jsonl")).records
    with_calls = [r for r in records if any("tool_calls" in m for m in r.messages)]
    assert len(with_calls) >= 30 and len(records) - len(with_calls) >= 3
    services = {json.dumps(m["tool_calls"][0]["function"]["arguments"]) for r in with_calls for m in r.messages
                if "tool_calls" in m}
    assert len(services) >= 5
    result = inspect_data(DataConfig(), str(DEMO / "tools.jsonl"), tok, mapping, None)
    assert result.rows == stats.rows and result.tool_rows == stats.rows  # every row offers the tool
    assert result.tool_calls >= len(with_calls)
    assert "[[<tool_call>" in result.example.rendered
    assert "plot" not in result.to_dict()  # --json names a plot only when one was written


def test_the_bundled_tool_data_with_the_demo_bases_own_template_says_what_is_missing(tmp_path):
    tok = build_tiny_tokenizer(CHATML_TEMPLATE)
    with pytest.raises(DataError, match=r"tools.jsonl:1: the row carries tools, but the tokenizer's chat template "
                                        r"renders none of them"):
        prepare_data(DataConfig(train=str(DEMO / "tools.jsonl")), tok, _mapping(tok), tmp_path / "out", seed=0)


def test_llama_3_1_tool_rows_train_the_call_object_and_the_answer():
    """Llama 3.1's layout: the tools at the head of the first user turn, a call as {"name", "parameters"}, the result
    in an ipython turn. The loss falls on the call and the answer, as with Qwen's layout."""
    tok = build_tiny_tokenizer((TEMPLATES / "llama3.1.jinja").read_text(), eos="<|eot_id|>", specials=(
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    mapping = _mapping(tok)
    assert mapping.format.name == "llama3"
    rec = load_records_from_rows([TOOL_ROW])[0]
    tokenized = tokenize_conversation(rec.messages, tok, mapping, 2048, tools=rec.tools)
    trained, masked = _trained_and_masked(tok, tokenized)
    assert trained == ('{"name": "lookup_port", "parameters": {"service": "zephyr"}}<|eot_id|>'
                       "Zephyr uses port 7341.<|eot_id|>")
    assert "Environment: ipython" in masked and '    "type": "function",\n    "function": {' in masked
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"7341"<|eot_id|>' in masked


def test_mistral_v3_tool_rows_train_the_calls_with_their_ids_and_the_answer():
    """Mistral v0.3: the tools before the last user turn, calls as [TOOL_CALLS] with each call's 9-character id, results
    as [TOOL_RESULTS]. Its template enforces the user/assistant order, so a chat without its calls does not render:
    that says the calls are read, not dropped."""
    tok = build_tiny_tokenizer((TEMPLATES.parent / "chat_templates" / "mistral-v3.jinja").read_text(), eos="</s>",
                               specials=("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                         "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"))
    mapping = _mapping(tok)
    assert mapping.format.name == "mistral-v3"
    chat = _turn(1, tool_calls=[{**CALL, "id": "c0ffee001"}])
    chat[2] = {**chat[2], "tool_call_id": "c0ffee001"}
    rec = load_records_from_rows([{"messages": chat, "tools": [LOOKUP_PORT]}])[0]
    tokenized = tokenize_conversation(rec.messages, tok, mapping, 2048, tools=rec.tools)
    trained, masked = _trained_and_masked(tok, tokenized)
    assert trained == ('[TOOL_CALLS] [{"name": "lookup_port", "arguments": {"service": "zephyr"}, "id": "c0ffee001"}]'
                       "</s> Zephyr uses port 7341.</s>")
    assert masked.startswith("<s>[AVAILABLE_TOOLS] [") and '"call_id": "c0ffee001"}[/TOOL_RESULTS]' in masked
