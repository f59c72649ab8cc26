"""The data forms users bring from OpenAI, Hugging Face and LLaMA-Factory (issue 24): content as parts, per-message
weights, preference rows, fields that used to be dropped, and rows too large to tokenize. Each is used or named."""

import json
import logging
import time

import pytest
from conftest import bad_row_reason as _bad
from conftest import chat_mapping as _mapping
from conftest import read_dataset
from conftest import rows_read as _records
from conftest import write_rows as _write

from ftdeploy.config import DataConfig
from ftdeploy.data import IGNORE_INDEX, Columns, RecordStream, prepare_data, tokenize_conversation, tokenize_records
from ftdeploy.errors import DataError

Q1, A1 = "What port does Zephyr use?", "Zephyr uses port 7341."
Q2, A2 = "And Boreas?", "Boreas uses port 9103."
CHAT = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
CHAT_SG = [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]


def _trained_text(tok, tokenized):
    return tok.decode([t for t in tokenized.labels if t != IGNORE_INDEX])


# ---------------------------------------------------------------- content as a list of parts


def _parts(*texts, key="text"):
    return [{"type": "text", key: t} for t in texts]


def test_text_parts_are_joined_in_the_messages_layout(tmp_path):
    rows = [{"messages": [{"role": "system", "content": _parts("Be brief.")},
                          {"role": "user", "content": _parts("What port does ", "Zephyr use?")},
                          {"role": "assistant", "content": _parts(A1)}]}]
    rec = _records(tmp_path, rows)[0]
    assert rec.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1}]


def test_llama_factory_value_parts_are_joined_in_the_sharegpt_layout(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": _parts(Q1, key="value")},
                               {"from": "gpt", "value": _parts("Zephyr uses ", "port 7341.", key="value")}]}]
    assert _records(tmp_path, rows)[0].messages == CHAT


def test_parts_and_strings_render_and_train_the_same(tmp_path, tiny_tokenizer):
    [as_parts, as_text] = _records(tmp_path, [
        {"messages": [{"role": "user", "content": _parts(Q1)}, {"role": "assistant", "content": _parts(A1)}]},
        {"messages": CHAT}])
    mapping = _mapping(tiny_tokenizer)
    assert (tokenize_conversation(as_parts.messages, tiny_tokenizer, mapping, 2048)
            == tokenize_conversation(as_text.messages, tiny_tokenizer, mapping, 2048))


@pytest.mark.parametrize("part,named", [
    ({"type": "image_url", "image_url": {"url": "https://x/cat.png"}}, "'image_url' part: images not supported yet"),
    ({"type": "image"}, "'image' part: images not supported yet"),
    ({"type": "input_audio", "input_audio": {"data": "..."}}, "'input_audio' part: audio not supported yet"),
    ({"type": "file", "file": {"file_id": "f"}}, "'file' part: files not supported yet"),
    ({"type": "refusal", "refusal": "no"}, "'refusal' part, not supported yet"),
    ({"text": "no type"}, "has no 'type'"),
    ("bare string", "must be a part like"),
])
def test_a_part_that_is_not_text_is_a_bad_row_naming_it(tmp_path, part, named):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": Q1}, part]},
                        {"role": "assistant", "content": A1}]}
    reason = _bad(tmp_path, [{"messages": CHAT}, row])
    assert reason.startswith("message 0 (user): content[1]") and named in reason


# ---------------------------------------------------------------- per-message weights


TWO_TURNS = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
             {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]


def _weighted(key, first, second=None):
    chat = [dict(m) for m in TWO_TURNS]
    chat[1][key] = first
    if second is not None:
        chat[3][key] = second
    return chat


def test_weight_zero_leaves_an_assistant_turn_out_of_the_loss(tmp_path, tiny_tokenizer):
    rec = _records(tmp_path, [{"messages": _weighted("weight", 0, 1)}])[0]
    assert rec.untrained == (0,) and all("weight" not in m for m in rec.messages)  # the template never sees it
    tokenized = tokenize_conversation(rec.messages, tiny_tokenizer, _mapping(tiny_tokenizer), 2048,
                                      untrained=rec.untrained)
    trained = _trained_text(tiny_tokenizer, tokenized)
    assert A2 in trained and A1 not in trained
    assert A1 in tiny_tokenizer.decode(tokenized.input_ids)  # still there, as context


def test_loss_weight_in_sharegpt_turns_and_the_fast_path_agree(tmp_path, tiny_tokenizer, caplog):
    conv = [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1, "loss_weight": 0.0},
            {"from": "human", "value": Q2}, {"from": "gpt", "value": A2, "loss_weight": 1.0}]
    path = _write(tmp_path / "d.jsonl", [{"conversations": conv}] * 80)  # past the fast path's guard rows
    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    stats = prepare_data(DataConfig(train=str(path)), tiny_tokenizer, _mapping(tiny_tokenizer), out, seed=0)
    assert stats.rows == 80 and "fast data path differs" not in caplog.text
    for line in (out / "train.jsonl").read_text().splitlines():
        trained = tiny_tokenizer.decode([t for t in json.loads(line)["labels"] if t != IGNORE_INDEX])
        assert A2 in trained and A1 not in trained


def test_loss_weight_on_llama_factory_tool_turns_is_read_too(tmp_path):
    call = json.dumps({"name": "lookup_port", "arguments": {"service": "zephyr"}})
    conv = [{"from": "human", "value": Q1}, {"from": "function_call", "value": call, "loss_weight": 0.0},
            {"from": "observation", "value": "7341", "loss_weight": 0.0}, {"from": "gpt", "value": A1}]
    tools = json.dumps([{"name": "lookup_port", "parameters": {"type": "object", "properties": {}}}])
    assert _records(tmp_path, [{"conversations": conv, "tools": tools}])[0].untrained == (0,)
    conv[2] = {**conv[2], "loss_weight": 1.0}
    assert _bad(tmp_path, [{"conversations": CHAT_SG}, {"conversations": conv, "tools": tools}]).startswith(
        "message 2 (tool): 'loss_weight' 1.0 asks to train a tool message")


def test_weight_zero_is_masked_with_train_on_all_too(tmp_path, tiny_tokenizer):
    rec = _records(tmp_path, [{"messages": _weighted("weight", 0)}])[0]
    mapping = _mapping(tiny_tokenizer)
    exact = tokenize_conversation(rec.messages, tiny_tokenizer, mapping, 2048, train_on="all",
                                  untrained=rec.untrained)
    trained = _trained_text(tiny_tokenizer, exact)
    assert Q1 in trained and A2 in trained and A1 not in trained
    [(_, fast)] = list(tokenize_records([rec], tiny_tokenizer, mapping, 2048, train_on="all"))
    assert fast == exact


@pytest.mark.parametrize("key,value,named", [
    ("weight", 0.5, "'weight' must be 0 (not trained) or 1 (trained), got 0.5"),
    ("weight", "1", "'weight' must be 0 (not trained) or 1 (trained), got '1'"),
    ("weight", True, "'weight' must be 0 (not trained) or 1 (trained), got True"),
    ("loss_weight", 2, "'loss_weight' must be 0 (not trained) or 1 (trained), got 2"),
])
def test_a_weight_other_than_0_or_1_is_a_bad_row_naming_it(tmp_path, key, value, named):
    reason = _bad(tmp_path, [{"messages": CHAT}, {"messages": _weighted(key, value)}])
    assert reason == f"message 1 (assistant): {named}"


def test_weights_that_leave_nothing_or_ask_for_a_user_turn_are_bad_rows(tmp_path):
    assert _bad(tmp_path, [{"messages": CHAT}, {"messages": _weighted("weight", 0, 0)}]) == \
        "every assistant message is marked not trained (weight 0 or training false): nothing to learn from"
    chat = [{**TWO_TURNS[0], "weight": 1}, TWO_TURNS[1]]
    assert _bad(tmp_path, [{"messages": CHAT}, {"messages": chat}]).startswith(
        "message 0 (user): 'weight' 1 asks to train a user message; only assistant messages are trained")
    chat = [{**TWO_TURNS[0], "loss_weight": 0.0}, {**TWO_TURNS[1], "loss_weight": 1.0}]  # LLaMA-Factory writes both
    assert _records(tmp_path, [{"messages": chat}])[0].untrained == ()


# ---------------------------------------------------------------- preference data


PREFERENCE = [
    ({"conversations": [{"from": "human", "value": Q1}], "chosen": {"from": "gpt", "value": A1},
      "rejected": {"from": "gpt", "value": "Port 80."}}, "conversations + chosen + rejected"),
    ({"prompt": Q1, "chosen": A1, "rejected": "Port 80."}, "prompt + chosen + rejected"),
    ({"prompt": [{"role": "user", "content": Q1}], "chosen": [{"role": "assistant", "content": A1}],
      "rejected": [{"role": "assistant", "content": "Port 80."}]}, "prompt + chosen + rejected"),
    ({"prompt": Q1, "completion": A1, "label": True}, "prompt + completion + label: KTO"),
    ({"input": {"messages": [{"role": "user", "content": Q1}]}, "preferred_output": [{"role": "assistant",
      "content": A1}], "non_preferred_output": [{"role": "assistant", "content": "Port 80."}]}, "OpenAI's DPO"),
]


@pytest.mark.parametrize("row,kind", PREFERENCE)
def test_preference_data_is_one_error_naming_the_file(tmp_path, row, kind):
    path = _write(tmp_path / "prefs.jsonl", [row] * 194)
    for read in (lambda: read_dataset(str(path)), lambda: RecordStream(str(path))):
        with pytest.raises(DataError) as err:
            read()
        message = str(err.value)
        assert message.startswith(f"{path}: preference data (") and kind in message
        assert "not supported by --method sft" in message and "bad row" not in message
        assert ("--method kto trains labelled answers" if "KTO" in kind
                else "--method dpo or orpo trains preference pairs") in message


def test_preference_data_is_refused_with_an_explicit_format_too(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [PREFERENCE[0][0]] * 5)
    with pytest.raises(DataError, match=rf"^{path}: preference data \(conversations \+ chosen \+ rejected"):
        read_dataset(str(path), "sharegpt", on_bad_row="skip")


def test_the_chosen_answers_can_be_trained_as_pairs_when_the_columns_say_so(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [PREFERENCE[1][0]] * 3)
    result = read_dataset(str(path), "pairs", Columns(response="chosen"))
    assert result.records[0].messages[-1] == {"role": "assistant", "content": A1}


def test_a_conversation_that_ends_on_a_user_turn_is_a_bad_row(tmp_path):
    row = {"messages": [*CHAT, {"role": "user", "content": Q2}]}
    assert _bad(tmp_path, [{"messages": CHAT}, row]) == \
        "the conversation ends on a user turn (message 2) with no assistant answer after it"
    sharegpt = {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                  {"from": "human", "value": Q2}]}
    assert "ends on a user turn" in _bad(tmp_path, [{"conversations": CHAT_SG}, sharegpt])


# ---------------------------------------------------------------- fields that used to be dropped


def test_a_rows_images_and_image_placeholders_are_bad_rows(tmp_path):
    row = {"messages": [{"role": "user", "content": f"<image>{Q1}"}, CHAT[1]], "images": ["cat.png"]}
    assert _bad(tmp_path, [{"messages": CHAT}, row]) == (
        "the row has 'images' (1): images not supported yet (the base model is text-only; image chats train a "
        "vision base: Qwen2.5-VL, Gemma 3)")
    del row["images"]
    assert _bad(tmp_path, [{"messages": CHAT}, row]) == \
        "message 0 (user) holds an <image> placeholder: images not supported yet (it would train as literal text)"
    alpaca = {"instruction": f"<image>{Q1}", "output": A1}
    assert _bad(tmp_path, [{"instruction": Q1, "output": A1}, alpaca]).startswith(
        "the prompt holds an <image> placeholder: images not supported yet")
    assert _records(tmp_path, [{"messages": CHAT, "images": []}])[0].messages == CHAT  # an empty list is no image


def test_alpaca_history_gives_the_earlier_turns(tmp_path):
    row = {"instruction": Q2, "input": "", "output": A2, "history": [[Q1, A1]], "system": "Be brief."}
    assert _records(tmp_path, [row])[0].messages == [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    bad = {"instruction": Q2, "output": A2, "history": [[Q1]]}
    assert _bad(tmp_path, [row, bad]) == "'history'[0] must be an [instruction, response] pair of strings, got " \
        f'["{Q1}"]'


def test_a_sharegpt_rows_system_is_the_system_message(tmp_path):
    row = {"conversations": CHAT_SG, "system": "Be brief."}
    assert _records(tmp_path, [row])[0].messages == [{"role": "system", "content": "Be brief."}, *CHAT]
    # the row's system prompt wins over data.system_prompt, as a system turn in the conversation does
    assert _records(tmp_path, [row], system_prompt="Other.")[0].messages[0]["content"] == "Be brief."
    both = {"conversations": [{"from": "system", "value": "Be long."}, *CHAT_SG], "system": "Be brief."}
    assert _bad(tmp_path, [row, both]) == \
        "two system prompts: the row's 'system' and message 0 (system) differ; keep one"
    assert _records(tmp_path, [{"messages": CHAT, "system": "Be brief."}])[0].messages[0]["role"] == "system"


def test_a_null_or_nan_input_is_absent_and_a_number_is_a_bad_row(tmp_path):
    rows = ['{"instruction": "Q?", "input": NaN, "output": "A."}', {"instruction": "Q?", "input": None, "output": "A."}]
    assert [r.messages[0]["content"] for r in _records(tmp_path, rows)] == ["Q?", "Q?"]
    assert _bad(tmp_path, [rows[1], {"instruction": "Q?", "input": 42, "output": "A."}]) == \
        "'input' must be a string (or left out), got int 42"
    assert _bad(tmp_path, [{"prompt": "Q?", "response": "A."}, {"prompt": "Q?", "response": "A.", "system": 7}]) == \
        "'system' must be a string (or left out), got int 7"


def test_fields_no_layout_reads_are_named_in_one_warning_per_dataset(tmp_path, caplog):
    rows = [{"messages": [{**CHAT[0], "name": "ann"}, {**CHAT[1], "reasoning_content": "think"}], "id": i,
             "expect": "7341"} for i in range(3)]
    path = _write(tmp_path / "d.jsonl", rows)
    caplog.set_level(logging.WARNING, logger="ftdeploy.data.formats")
    stream = RecordStream(str(path))
    stream.check()
    stream.check()  # a second pass names nothing again
    warnings = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert warnings == [f"{path}: fields the messages layout does not read, ignored (their text is not trained, and "
                        f"anything they say about what to train is not applied): 'id' (first at "
                        f"{path}:1), 'messages[].name' (first at {path}:1), 'messages[].reasoning_content' "
                        f"(first at {path}:1)"]
    caplog.clear()
    _records(tmp_path, [{"messages": CHAT, "tools": None, "expect": "x", "match": "contains"}])
    assert "does not read" not in caplog.text


# ---------------------------------------------------------------- a row too large to tokenize


def test_a_row_over_max_row_bytes_is_a_bad_row_naming_the_size_and_the_setting(tmp_path):
    big = {"messages": [CHAT[0], {"role": "assistant", "content": "é" * 600}]}
    reason = _bad(tmp_path, [{"messages": CHAT}, big], max_row_bytes=1000)
    size = 1200 + sum(len(s.encode()) for s in ("messages", "role", "content", "role", "content", "user", "assistant",
                                                   Q1))
    assert reason == (f"the row holds {size:,} bytes of text, more than data.max_row_bytes=1,000; refused before "
                      "tokenizing (raise data.max_row_bytes to train on rows this long, or split the row)")
    assert len(_records(tmp_path, [big], max_row_bytes=0)) == 1  # 0: no limit


def test_a_30_mb_row_is_refused_at_once_by_the_data_stage(tmp_path, tiny_tokenizer):
    huge = {"messages": [CHAT[0], {"role": "assistant", "content": "port 7341 " * 3_000_000}]}
    path = _write(tmp_path / "d.jsonl", [{"messages": CHAT}, huge])
    started = time.monotonic()
    with pytest.raises(DataError, match=rf"{path}:2: the row holds 30,000,0\d\d bytes of text, more than "
                                        r"data.max_row_bytes=1,048,576"):
        prepare_data(DataConfig(train=str(path)), tiny_tokenizer, _mapping(tiny_tokenizer), tmp_path / "out", seed=0)
    assert time.monotonic() - started < 15
    assert not (tmp_path / "out").exists()
