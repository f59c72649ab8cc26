"""LLaMA-Factory's sharegpt tool data: `function_call` turns (a JSON call, or a JSON list of calls for parallel calls),
`observation` turns and a row-level `tools` JSON string convert to exactly the records the messages layout gives for
the same chat; bad tool turns are rows named by file:line with the reason."""

import dataclasses
import json

import pytest
from conftest import read_dataset

from ftdeploy.errors import DataError

SPEC = {"name": "lookup_port", "description": "The TCP port a service listens on.",
        "parameters": {"type": "object", "properties": {"service": {"type": "string"}}, "required": ["service"]}}
TYPED = {"type": "function", "function": SPEC}
OTHER = {"name": "lookup_owner", "description": "Who runs a service.",
         "parameters": {"type": "object", "properties": {"service": {"type": "string"}}}}


def _call(service, name="lookup_port"):
    return {"name": name, "arguments": {"service": service}}


def _typed_call(service, name="lookup_port"):
    return {"type": "function", "function": _call(service, name)}


SHAREGPT_ROW = {
    "conversations": [
        {"from": "human", "value": "What port does zephyr use?"},
        {"from": "function_call", "value": json.dumps(_call("zephyr"))},
        {"from": "observation", "value": "7341"},
        {"from": "gpt", "value": "Zephyr uses port 7341."},
    ],
    "tools": json.dumps([SPEC]),
}
MESSAGES_ROW = {
    "messages": [
        {"role": "user", "content": "What port does zephyr use?"},
        {"role": "assistant", "tool_calls": [_typed_call("zephyr")]},
        {"role": "tool", "name": "lookup_port", "content": "7341"},
        {"role": "assistant", "content": "Zephyr uses port 7341."},
    ],
    "tools": [TYPED],
}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _records(path, rows):
    return [dataclasses.replace(r, source="") for r in read_dataset(str(_write(path, rows))).records]


def _same_as_messages(tmp_path, sharegpt_rows, messages_rows):
    got = read_dataset(str(_write(tmp_path / "sharegpt.jsonl", sharegpt_rows)))
    assert got.layout == "sharegpt"
    want = read_dataset(str(_write(tmp_path / "messages.jsonl", messages_rows)))
    assert want.layout == "messages"
    assert [dataclasses.replace(r, source="") for r in got.records] == \
           [dataclasses.replace(r, source="") for r in want.records]
    return got.records


def test_a_tool_row_converts_to_the_records_of_the_same_messages_row(tmp_path):
    plain_sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    plain_messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    records = _same_as_messages(tmp_path, [SHAREGPT_ROW, plain_sharegpt], [MESSAGES_ROW, plain_messages])
    assert records[0].tools == [TYPED]
    assert records[0].messages[1] == {"role": "assistant", "content": "", "tool_calls": [_typed_call("zephyr")]}
    assert records[0].messages[2] == {"role": "tool", "content": "7341", "name": "lookup_port"}
    assert records[1].tools is None and records[1].messages == plain_messages["messages"]


def test_a_multi_step_chat_with_a_system_turn_and_empty_tools_string(tmp_path):
    sharegpt = {"conversations": [
        {"from": "system", "value": "Use the tools."},
        {"from": "human", "value": "Port and owner of zephyr?"},
        {"from": "function_call", "value": json.dumps(_call("zephyr"))},
        {"from": "observation", "value": "7341"},
        {"from": "function_call", "value": json.dumps(_call("zephyr", "lookup_owner"))},
        {"from": "observation", "value": "platform team"},
        {"from": "gpt", "value": "Port 7341, run by the platform team."},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "You're welcome."},
    ], "tools": json.dumps([SPEC, OTHER])}
    messages = {"messages": [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Port and owner of zephyr?"},
        {"role": "assistant", "tool_calls": [_typed_call("zephyr")]},
        {"role": "tool", "name": "lookup_port", "content": "7341"},
        {"role": "assistant", "tool_calls": [_typed_call("zephyr", "lookup_owner")]},
        {"role": "tool", "name": "lookup_owner", "content": "platform team"},
        {"role": "assistant", "content": "Port 7341, run by the platform team."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ], "tools": [TYPED, {"type": "function", "function": OTHER}]}
    # LLaMA-Factory writes "" in the tools column of a row without tools
    no_tools = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "tools": ""}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    records = _same_as_messages(tmp_path, [sharegpt, no_tools], [messages, plain])
    assert records[1].tools is None


def test_parallel_calls_become_one_assistant_turn_and_results_carry_no_name(tmp_path):
    sharegpt = {"conversations": [
        {"from": "human", "value": "Ports of zephyr and tarragon?"},
        {"from": "function_call", "value": json.dumps([_call("zephyr"), _call("tarragon")])},
        {"from": "observation", "value": "7341"},
        {"from": "observation", "value": "6417"},
        {"from": "gpt", "value": "7341 and 6417."},
    ], "tools": json.dumps([SPEC])}
    messages = {"messages": [
        {"role": "user", "content": "Ports of zephyr and tarragon?"},
        {"role": "assistant", "tool_calls": [_typed_call("zephyr"), _typed_call("tarragon")]},
        {"role": "tool", "content": "7341"},
        {"role": "tool", "content": "6417"},
        {"role": "assistant", "content": "7341 and 6417."},
    ], "tools": [TYPED]}
    # LLaMA-Factory's own alternation: one observation turn holding the results of both calls
    one_result = {"conversations": [*sharegpt["conversations"][:2],
                                    {"from": "observation", "value": "7341\n6417"},
                                    sharegpt["conversations"][-1]], "tools": sharegpt["tools"]}
    one_result_messages = {"messages": [*messages["messages"][:2], {"role": "tool", "content": "7341\n6417"},
                                        messages["messages"][-1]], "tools": [TYPED]}
    records = _same_as_messages(tmp_path, [sharegpt, one_result], [messages, one_result_messages])
    assert [c["function"]["arguments"] for c in records[0].messages[1]["tool_calls"]] == \
           [{"service": "zephyr"}, {"service": "tarragon"}]
    assert "name" not in records[0].messages[2] and "name" not in records[1].messages[2]


@pytest.mark.parametrize("tools", [
    pytest.param(json.dumps([SPEC]), id="bare-string"),
    pytest.param(json.dumps([TYPED]), id="typed-string"),
    pytest.param([SPEC], id="bare-list"),
    pytest.param([TYPED], id="typed-list"),
])
def test_tools_bare_or_typed_become_typed_specs(tmp_path, tools):
    records = _records(tmp_path / "t.jsonl", [{**SHAREGPT_ROW, "tools": tools}])
    assert records[0].tools == [TYPED]


def test_a_call_given_typed_or_with_arguments_as_a_json_string(tmp_path):
    typed = {"type": "function", "function": {"name": "lookup_port", "arguments": '{"service": "zephyr"}'}}
    row = {**SHAREGPT_ROW, "conversations": [SHAREGPT_ROW["conversations"][0],
                                             {"from": "function_call", "value": json.dumps(typed)},
                                             *SHAREGPT_ROW["conversations"][2:]]}
    assert _records(tmp_path / "t.jsonl", [row]) == _records(tmp_path / "m.jsonl", [MESSAGES_ROW])


def _with_turn(i, turn, **row):
    conv = [dict(t) for t in SHAREGPT_ROW["conversations"]]
    conv[i] = turn
    return {**SHAREGPT_ROW, "conversations": conv, **row}


BAD = [
    (_with_turn(1, {"from": "function_call", "value": '{"name": "lookup_port", "arguments": '}),
     "turn 1 (function_call): the value is not valid JSON"),
    (_with_turn(1, {"from": "function_call", "value": json.dumps({"arguments": {"service": "zephyr"}})}),
     "turn 1 (function_call): the call has no name"),
    (_with_turn(1, {"from": "function_call", "value": json.dumps([_call("zephyr"), {"name": "", "arguments": {}}])}),
     "turn 1 (function_call)[1]: the call has no name"),
    (_with_turn(1, {"from": "function_call", "value": "[]"}), "turn 1 (function_call): the value is an empty list"),
    (_with_turn(1, {"from": "function_call", "value": json.dumps({"name": "lookup_port"})}),
     "turn 1 (function_call) (lookup_port): 'arguments' is missing"),
    (_with_turn(1, {"from": "gpt", "value": "Let me look."}),
     "turn 2 (observation): a tool result with no function_call turn before it"),
    ({**SHAREGPT_ROW, "conversations": [{"from": "observation", "value": "7341"}, *SHAREGPT_ROW["conversations"]]},
     "turn 0 (observation): a tool result with no function_call turn before it"),
    ({**SHAREGPT_ROW, "tools": '[{"name": "lookup_port",'}, "'tools' is a string but not valid JSON"),
    ({**SHAREGPT_ROW, "tools": json.dumps([{"description": "no name"}])}, "'tools'[0]: the function has no name"),
    (_with_turn(1, {"from": "function_call", "value": json.dumps(_call("zephyr", "lookup_owner"))}),
     "calls 'lookup_owner', which is not among the row's tools"),
]


def test_every_bad_tool_row_is_named_by_file_line_with_its_reason(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [SHAREGPT_ROW, *(row for row, _ in BAD)])
    with pytest.raises(DataError) as err:
        read_dataset(str(path))
    msg = str(err.value)
    assert f"{len(BAD)} bad rows (sharegpt layout" in msg
    lines = msg.splitlines()
    for lineno, (_, reason) in enumerate(BAD, start=2):
        line = next(x for x in lines if x.strip().startswith(f"{path}:{lineno}: "))
        assert reason in line, line
