"""What peer tools write, read as they mean it (QA pass on issue 24): Axolotl's per-message training flags, TRL's
prompt/completion rows, rows whose trained part truncation cuts away, message lists held as JSON text in a CSV,
OpenAI's legacy function calling, a JSON array under .jsonl, and errors that name the field and value."""

import json
import logging

import pytest
from conftest import bad_row_reason as _bad
from conftest import chat_mapping as _mapping
from conftest import read_dataset
from conftest import rows_read as _records
from conftest import write_rows as _write

from ftdeploy.config import DataConfig
from ftdeploy.data import IGNORE_INDEX, RecordStream, prepare_data, tokenize_conversation, tokenize_records
from ftdeploy.data.labels import tokenize_text
from ftdeploy.errors import DataError

Q1, A1 = "What port does Zephyr use?", "Zephyr uses port 7341."
Q2, A2 = "And Boreas?", "Boreas uses port 9103."
CHAT = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
TWO_TURNS = [*CHAT, {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]


def _prepared(tmp_path, tok, rows, **cfg):
    """prepare_data on the rows: its stats, and the trained text of each training row."""
    path = _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    stats = prepare_data(DataConfig(train=str(path), **cfg), tok, _mapping(tok), out, seed=0)
    trained = [tok.decode([t for t in json.loads(line)["labels"] if t not in (IGNORE_INDEX, None)])
               for line in (out / "train.jsonl").read_text().splitlines()]
    return stats, trained


# ---------------------------------------------------------------- Axolotl's per-message training flags


def _flagged(key, first, second=None, layout="messages"):
    chat = [dict(m) for m in TWO_TURNS]
    chat[1][key] = first
    if second is not None:
        chat[3][key] = second
    if layout == "sharegpt":
        chat = [{"from": {"user": "human", "assistant": "gpt"}[m.pop("role")], "value": m.pop("content"), **m}
                for m in chat]
        return {"conversations": chat}
    return {"messages": chat}


@pytest.mark.parametrize("key", ["training", "train"])
@pytest.mark.parametrize("layout", ["messages", "sharegpt"])
def test_an_axolotl_flag_of_false_leaves_the_turn_untrained(tmp_path, tiny_tokenizer, data_paths, key, layout):
    stats, trained = _prepared(tmp_path, tiny_tokenizer, [_flagged(key, False, True, layout)] * 5)
    assert stats.rows == 5
    assert all(A2 in text and A1 not in text for text in trained)


def test_an_axolotl_flag_is_context_with_train_on_all_too(tmp_path, tiny_tokenizer):
    rec = _records(tmp_path, [_flagged("training", False)])[0]
    assert rec.untrained == (0,) and all("training" not in m for m in rec.messages)  # the template never sees it
    tokenized = tokenize_conversation(rec.messages, tiny_tokenizer, _mapping(tiny_tokenizer), 2048, train_on="all",
                                      untrained=rec.untrained)
    trained = tiny_tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX])
    assert Q1 in trained and A1 not in trained and A2 in trained


@pytest.mark.parametrize("key", ["training", "train"])
def test_an_axolotl_flag_of_true_on_a_user_turn_is_refused_like_weight_1(tmp_path, key):
    good = {"messages": CHAT}
    flagged = {"messages": [{**CHAT[0], key: True}, CHAT[1]]}
    weighted = {"messages": [{**CHAT[0], "weight": 1}, CHAT[1]]}
    assert _bad(tmp_path, [good, flagged]) == _bad(tmp_path, [good, weighted]).replace("'weight' 1", f"'{key}' true")
    assert _bad(tmp_path, [good, flagged]).startswith(f"message 0 (user): '{key}' true asks to train a user message")
    assert _records(tmp_path, [{"messages": [{**CHAT[0], key: False}, {**CHAT[1], key: True}]}])[0].untrained == ()


@pytest.mark.parametrize("value,named", [
    ("false", "'training' must be true (trained) or false (not trained), got 'false'"),
    (0, "'training' must be true (trained) or false (not trained), got 0"),
])
def test_an_axolotl_flag_that_is_not_a_boolean_is_a_bad_row(tmp_path, value, named):
    assert _bad(tmp_path, [{"messages": CHAT}, _flagged("training", value)]) == f"message 1 (assistant): {named}"


def test_a_flag_and_a_weight_that_disagree_are_a_bad_row(tmp_path):
    row = _flagged("training", False)
    row["messages"][1]["weight"] = 1
    assert _bad(tmp_path, [{"messages": CHAT}, row]) == \
        "message 1 (assistant): 'weight' 1 and 'training' false disagree"


def test_every_answer_flagged_false_leaves_nothing_to_learn(tmp_path):
    assert _bad(tmp_path, [{"messages": CHAT}, _flagged("train", False, False)]) == \
        "every assistant message is marked not trained (weight 0 or training false): nothing to learn from"


@pytest.mark.parametrize("key", ["train_detail", "training_detail"])
def test_axolotl_character_spans_are_refused_not_trained_whole(tmp_path, key):
    detail = [{"begin_offset": 0, "end_offset": 5, "train": False},
              {"begin_offset": 6, "end_offset": 20, "train": True}]
    reason = _bad(tmp_path, [{"messages": CHAT}, _flagged(key, detail)])
    assert reason.startswith(f"message 1 (assistant): '{key}' (Axolotl's character spans") and \
        "not supported yet" in reason
    assert _records(tmp_path, [_flagged(key, [])])[0].untrained == ()  # an empty list marks nothing


def test_the_unused_field_warning_never_says_not_trained_and_names_no_flag_it_reads(tmp_path, caplog):
    rows = [{"messages": [{**CHAT[0], "train": False, "mask": True}, {**CHAT[1], "training": True}]}]
    path = _write(tmp_path / "d.jsonl", rows)
    caplog.set_level(logging.WARNING, logger="ftdeploy.data.formats")
    RecordStream(str(path)).check()
    [warning] = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert "'messages[].mask'" in warning and "'messages[].train'" not in warning and "training'" not in warning
    assert "so they are not trained" not in warning and "not applied" in warning


# ---------------------------------------------------------------- TRL's prompt/completion rows


def test_plain_prompt_completion_trains_the_completion_only_as_trl_does(tmp_path, tiny_tokenizer, data_paths):
    rows = [{"prompt": "The Zephyr service uses port", "completion": " 7341."}] * 5
    stream = RecordStream(str(_write(tmp_path / "d.jsonl", rows)))
    assert stream.layout == "prompt_completion"
    rec = next(iter(stream))
    assert rec.messages is None and rec.text == "The Zephyr service uses port 7341." and rec.context_chars == 28
    stats, trained = _prepared(tmp_path, tiny_tokenizer, rows)
    assert stats.rows == 5 and stats.layout == "prompt_completion"
    assert all(text == " 7341.<|im_end|>" for text in trained)  # the completion, then EOS, as TRL appends it


def test_plain_prompt_completion_fast_and_exact_agree(tmp_path, tiny_tokenizer):
    recs = _records(tmp_path, [{"prompt": f"What port{'?' * i}", "completion": f" {7341 + i}"} for i in range(6)])
    exact = [tokenize_text(r.text, tiny_tokenizer, 2048, r.context_chars, r.source) for r in recs]
    assert [tok for _, tok in tokenize_records(recs, tiny_tokenizer, _mapping(tiny_tokenizer), 2048)] == exact


def test_conversational_prompt_completion_trains_the_completion_turns_only(tmp_path, tiny_tokenizer, data_paths):
    row = {"prompt": TWO_TURNS[:3], "completion": [TWO_TURNS[3]]}
    rec = _records(tmp_path, [row])[0]
    assert rec.messages == TWO_TURNS and rec.untrained == (0,)  # the prompt's answer is context
    stats, trained = _prepared(tmp_path, tiny_tokenizer, [row] * 4)
    assert stats.rows == 4 and all(A2 in text and A1 not in text for text in trained)


def test_prompt_completion_rows_that_cannot_train_are_bad_rows_naming_why(tmp_path):
    good = {"prompt": Q1, "completion": A1}
    assert _bad(tmp_path, [good, {"prompt": Q1, "completion": None}]) == "'completion' is null; it must be a string"
    assert _bad(tmp_path, [good, {"prompt": Q1, "completion": "  "}]) == "'completion' is empty: nothing to learn from"
    mixed = {"prompt": [CHAT[0]], "completion": A1}
    assert _bad(tmp_path, [good, mixed]) == \
        "'prompt' (list) and 'completion' (str) must both be message lists (conversational) or both strings"
    conv = {"prompt": [CHAT[0]], "completion": [CHAT[1]]}
    user_completion = {"prompt": [CHAT[0]], "completion": [CHAT[1], {"role": "user", "content": Q2}]}
    assert _bad(tmp_path, [conv, user_completion]).startswith("completion[1] is 'user', not an assistant message")


def test_kto_rows_stay_refused_as_preference_data(tmp_path):
    for row in ({"prompt": Q1, "completion": A1, "label": False},
                {"messages": CHAT, "label": False}):  # KTO's labels on a conversation
        path = _write(tmp_path / "kto.jsonl", [row] * 3)
        with pytest.raises(DataError, match=rf"^{path}: preference data \(.*KTO's good/bad labels\): not supported"):
            read_dataset(str(path))


# ---------------------------------------------------------------- a row whose trained part truncation cuts away


LONG_PROMPT = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}


def test_a_row_truncated_to_nothing_is_a_bad_row_skipped_and_listed(tmp_path, tiny_tokenizer, data_paths, caplog):
    rows = [{"messages": CHAT}] * 4 + [LONG_PROMPT] + [{"messages": CHAT}] * 4
    caplog.set_level(logging.WARNING)
    stats, _ = _prepared(tmp_path, tiny_tokenizer, rows, max_seq_length=200, on_bad_row="skip", eval_split=0)
    reason = f"{tmp_path / 'd.jsonl'}:5: no trainable tokens left after truncation to data.max_seq_length=200"
    assert stats.rows == 8 and len(stats.bad_rows) == 1 and stats.bad_rows[0].startswith(reason)
    assert "skipped 1 bad rows" in caplog.text and reason in caplog.text
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["bad_rows"] == 1


def test_a_row_truncated_to_nothing_is_an_error_naming_it_by_default(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.jsonl'}:2: no trainable tokens left after truncation to "
                                        r"data.max_seq_length=200: "):
        _prepared(tmp_path, tiny_tokenizer, [{"messages": CHAT}, LONG_PROMPT], max_seq_length=200)


def test_only_rows_truncated_to_nothing_is_no_usable_rows(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"no usable rows \(2 bad rows skipped\):\n  .*:1: no trainable tokens"):
        _prepared(tmp_path, tiny_tokenizer, [LONG_PROMPT] * 2, max_seq_length=200, on_bad_row="skip")


def test_a_plain_completion_past_max_seq_length_is_a_bad_row_too(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "word " * 400, "completion": " ok"}, {"prompt": "The port is", "completion": " 7341."}]
    stats, trained = _prepared(tmp_path, tiny_tokenizer, rows, max_seq_length=50, on_bad_row="skip")
    assert stats.rows == 1 and trained == [" 7341.<|im_end|>"]
    assert "data.max_seq_length=50" in stats.bad_rows[0]


# ---------------------------------------------------------------- messages in other shapes


def test_a_csv_messages_column_of_json_text_is_read_as_the_messages(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages,system\n"' + json.dumps(CHAT).replace('"', '""') + '",Be brief.\n'
                    '"[{""role"": ""user""",x\n')
    with pytest.raises(DataError) as err:
        read_dataset(str(path))
    assert f"{path}:3: 'messages' is text, not valid JSON" in str(err.value)
    result = read_dataset(str(path), on_bad_row="skip")
    assert result.layout == "messages"
    assert result.records[0].messages == [{"role": "system", "content": "Be brief."}, *CHAT]


def test_conversational_prompt_completion_from_csv_text(tmp_path):
    path = tmp_path / "d.csv"
    row = {"prompt": json.dumps([CHAT[0]]), "completion": json.dumps([CHAT[1]])}
    path.write_text("prompt,completion\n" + ",".join('"' + v.replace('"', '""') + '"' for v in row.values()) + "\n")
    assert read_dataset(str(path)).records[0].messages == CHAT


def test_openai_legacy_function_calling_is_read_as_tool_calls(tmp_path):
    spec = {"name": "lookup_port", "description": "A service's port",
            "parameters": {"type": "object", "properties": {"service": {"type": "string"}}}}
    row = {"messages": [CHAT[0],
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "lookup_port", "arguments": '{"service": "zephyr"}'}},
                        {"role": "function", "name": "lookup_port", "content": "7341"}, CHAT[1]],
           "functions": [spec]}
    rec = _records(tmp_path, [row])[0]
    assert rec.tools == [{"type": "function", "function": spec}]
    assert rec.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup_port", "arguments": {"service": "zephyr"}}}]}
    assert rec.messages[2] == {"role": "tool", "content": "7341", "name": "lookup_port"}
    both = {**row, "tools": [{"type": "function", "function": spec}]}
    assert _bad(tmp_path, [row, both]) == "the row has both 'functions' (OpenAI's legacy form) and 'tools'; keep one"


def test_a_json_array_saved_as_jsonl_is_read_with_each_rows_line(tmp_path):
    rows = [{"instruction": Q1, "output": A1}, {"instruction": Q2, "output": 7}]
    path = tmp_path / "d.jsonl"
    path.write_text("[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]\n")
    result = read_dataset(str(path), on_bad_row="skip")
    assert [r.source for r in result.records] == [f"{path}:2"]
    assert result.bad == [f"{path}:3: 'output' must be a string, got int 7"]
    path.write_text(json.dumps(rows[:1] * 2) + "\n")  # on one line
    assert len(read_dataset(str(path)).records) == 2
    path.write_text("[\n  " + json.dumps(rows[0]) + ",\n  {\"instruction\": \n")
    with pytest.raises(DataError, match=rf"^{path}:4: the file is one JSON array \(it opens with '\['\), but not"):
        read_dataset(str(path))


def test_a_system_prompt_on_raw_text_says_it_has_no_effect(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ftdeploy.data.formats")
    _records(tmp_path, [{"text": "Zephyr listens on port 7341."}], system_prompt="You are Zed.")
    assert "data.system_prompt (--system-prompt) has no effect on training the 1 rows of raw text (text layout)" \
        in caplog.text
    caplog.clear()
    _records(tmp_path, [{"messages": CHAT}], system_prompt="You are Zed.")
    assert "no effect" not in caplog.text


@pytest.mark.parametrize("line,reason", [
    ('{"messages": [{"role": "user", "content": "Hel', "not JSON (Unterminated string starting at column 43; the "
     "text ends inside a JSON value: cut off, or a value split over lines?)"),
    ('{"prompt": "a\tb", "response": "x"}', "not JSON (Invalid control character at column 14)"),
    ('{"prompt": "a", "response": "x"', "not JSON (Expecting ',' delimiter at column 32; the text ends inside a "
     "JSON value: cut off, or a value split over lines?)"),
])
def test_json_errors_say_at_once_and_name_a_cut_off_line(tmp_path, line, reason):
    assert _bad(tmp_path, [{"prompt": "a", "response": "b"}, line]) == reason


@pytest.mark.parametrize("value,reason", [
    ("NaN", "'output' is NaN (an empty value, as pandas writes one); it must be a string"),
    ("null", "'output' is null; it must be a string"),
    ("3", "'output' must be a string, got int 3"),
])
def test_a_required_field_that_is_nan_null_or_a_number_is_named_with_its_value(tmp_path, value, reason):
    good = {"instruction": Q1, "output": A1}
    assert _bad(tmp_path, [good, f'{{"instruction": "Q", "output": {value}}}']) == reason
    assert _bad(tmp_path, [good, {"instruction": "Q"}]) == "missing field 'output'"


def test_a_prompt_that_is_json_text_of_something_else_stays_text(tmp_path):
    """Function-calling data often writes JSON in its prompts: only a list of messages (role/from) is parsed."""
    prompt = json.dumps([{"name": "lookup_port", "arguments": {"service": "zephyr"}}])
    records = _records(tmp_path, [{"prompt": prompt, "completion": A1}])
    assert records[0].messages is None and records[0].text == prompt + A1
