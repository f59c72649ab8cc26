"""GRPO data (train.method grpo, data/grpo.py): TRL's prompt-only rows and the supervised chat layouts read into prompt
Records (the prompt ending on the user turn, the other columns kept for the rewards, a chat's last answer as
`answer`), every bad row named by file:line; train.jsonl, eval.jsonl, the train sample and stats.json as prepare_data
writes them; the prompt ids checked against TRL's render and SFT's labels; inspect on GRPO data."""

import json

import pytest
from conftest import chat_mapping, write_rows

from ftdeploy.config import DataConfig
from ftdeploy.data import (
    IGNORE_INDEX,
    GrpoStream,
    inspect_data,
    load_eval,
    load_grpo_rows,
    load_train_sample,
    prepare_data,
    stream_grpo,
    tokenize_conversation,
)
from ftdeploy.data.grpo import prompt_ids
from ftdeploy.errors import DataError
from ftdeploy.rewards import ROW_COLUMN

Q1, Q2 = "What is 3 + 4?", "And 5 - 2?"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def read(tmp_path, rows, **kw):
    stream = GrpoStream(str(write_rows(tmp_path / "prompts.jsonl", rows)), **kw)
    return list(stream), stream


@pytest.fixture
def tok_and_mapping(tiny_tokenizer):
    return tiny_tokenizer, chat_mapping(tiny_tokenizer)


def test_trl_prompt_only_rows_keep_every_other_column(tmp_path):
    recs, stream = read(tmp_path, [
        {"prompt": Q1, "answer": 7, "level": "easy", "tags": ["add"], "expect": "7"},
        {"prompt": [{"role": "system", "content": "Be brief."}, user(Q2)], "answer": 3, "level": None},
        {"prompt": [user(Q1), assistant("7"), user(Q2)], "completion": "3"},
        {"prompt": Q1, "completion": [assistant("7")], "system": "Show your work."},
    ])
    assert stream.layout == "prompt" and len(recs) == 4 and not stream.bad
    assert recs[0].messages == [user(Q1)] and recs[0].columns == {"answer": 7, "level": "easy", "tags": ["add"]}
    assert recs[0].expect == "7" and recs[0].source.endswith("prompts.jsonl:1")
    assert recs[1].messages[0]["role"] == "system" and recs[1].columns == {"answer": 3}  # a null column is absent
    assert recs[2].messages == [user(Q1), assistant("7"), user(Q2)] and recs[2].columns == {"answer": "3"}
    # the system column is the system turn, as in every chat layout; the completion is the answer
    assert recs[3].messages == [{"role": "system", "content": "Show your work."}, user(Q1)]
    assert recs[3].columns == {"answer": "7"}


def test_chats_are_split_before_their_last_answer(tmp_path):
    recs, stream = read(tmp_path, [
        {"messages": [user(Q1), assistant("Answer: 7")], "difficulty": 1},
        {"messages": [user(Q1), assistant("7"), user(Q2), assistant("3")]},
        {"messages": [user(Q2)]},  # ends on the user turn: all prompt, no answer
        {"messages": [user(Q1), assistant("7")], "answer": 7},  # the row's own answer wins
    ])
    assert stream.layout == "messages" and not stream.bad
    assert [r.messages for r in recs] == [[user(Q1)], [user(Q1), assistant("7"), user(Q2)], [user(Q2)], [user(Q1)]]
    assert [r.columns for r in recs] == [{"difficulty": 1, "answer": "Answer: 7"}, {"answer": "3"}, {}, {"answer": 7}]
    recs, stream = read(tmp_path, [{"conversations": [{"from": "human", "value": Q1}]},
                                   {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": "7"}]}])
    assert stream.layout == "sharegpt" and [r.columns for r in recs] == [{}, {"answer": "7"}]
    recs, stream = read(tmp_path, [{"instruction": "Add.", "input": "3 and 4", "output": "7", "id": 12}])
    assert stream.layout == "alpaca" and recs[0].messages == [user("Add.\n\n3 and 4")]
    assert recs[0].columns == {"id": 12, "answer": "7"}
    recs, stream = read(tmp_path, [{"question": Q1, "solution": "7"}], columns=_columns(prompt="question",
                                                                                          response="solution"))
    assert stream.layout == "pairs" and recs[0].messages == [user(Q1)] and recs[0].columns == {"answer": "7"}


def _columns(**kw):
    from ftdeploy.data import Columns

    return Columns(**kw)


@pytest.mark.parametrize(("row", "reason"), [
    ({"prompt": "", "answer": 1}, "missing or empty 'prompt'"),
    ({"prompt": 7}, "'prompt' must be a string or a list of messages, got int"),
    ({"prompt": [user(Q1), assistant("7")]}, "the prompt ends on an assistant turn (message 1)"),
    ({"prompt": [{"role": "system", "content": "x"}]}, "'prompt': turns out of order"),
    ({"prompt": [user("")]}, "'prompt': message 0 (user): content must be a non-empty string"),
    ({"prompt": Q1, "completion": "7", "answer": 7}, "both 'completion' and 'answer'"),
    ({"prompt": Q1, "completion": [user("7")]}, "'completion' must be a string or one assistant message"),
    ({"prompt": Q1, "completions": [1]}, "column 'completions': TRL passes the reward functions a 'completions'"),
    ({"prompt": Q1, "trainer_state": 1}, "column 'trainer_state'"),
    ({"prompt": Q1, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "'tools': --method grpo does not train tool use yet"),
    ({"prompt": Q1, "images": ["a.png"]}, "images"),
    ({"prompt": Q1, "chosen": "7", "rejected": "8"}, "a preference row"),
])
def test_bad_prompt_rows_are_named_with_their_reason(tmp_path, row, reason):
    good = {"prompt": Q2, "answer": 3}
    recs, stream = read(tmp_path, [good, row, good], on_bad_row="skip")
    assert len(recs) == 2 and len(stream.bad) == 1, stream.bad
    assert stream.bad[0].startswith(f"{tmp_path / 'prompts.jsonl'}:2: ") and reason in stream.bad[0], stream.bad[0]
    with pytest.raises(DataError, match="1 bad row"):
        read(tmp_path, [good, row, good])


@pytest.mark.parametrize(("rows", "fmt", "message"), [
    ([{"prompt": Q1, "chosen": "7", "rejected": "8"}] * 3, "auto", "preference data (prompt + chosen + rejected"),
    ([{"text": "raw text"}] * 3, "auto", "(raw text: no prompt to answer)"),
    ([{"prompt": Q1}] * 3, "text", "data.format text is raw text"),
    ([{"prompt": Q1}] * 3, "preference", "data.format preference is preference data"),
])
def test_data_that_holds_no_prompts_is_one_error_naming_the_file(tmp_path, rows, fmt, message):
    with pytest.raises(DataError) as err:
        read(tmp_path, rows, layout=fmt)
    assert str(err.value).startswith(str(tmp_path / "prompts.jsonl")) and message in str(err.value), str(err.value)
    assert "--method grpo trains prompts" in str(err.value)


def test_the_prompt_ids_are_trl_s_render_and_where_sft_starts_the_answer(tok_and_mapping):
    """GRPOTrainer tokenizes a conversational prompt as apply_chat_template(prompt, add_generation_prompt=True,
    tokenize=True): the ids SFT's labels (THE definition) leave untrained before the first answer token."""
    tok, mapping = tok_and_mapping
    for prompt in ([user(Q1)], [{"role": "system", "content": "Be brief."}, user(Q1), assistant("7"), user(Q2)]):
        tokenized = tokenize_conversation([*prompt, assistant("Answer: 7")], tok, mapping, 4096,
                                          untrained=range(sum(m["role"] == "assistant" for m in prompt)))
        first = next(i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX)
        ids = prompt_ids(tok, prompt)
        assert ids == tokenized.input_ids[:first]
        trl = tok.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert trl["input_ids"][0] == ids  # the batched call GRPOTrainer makes


def test_prepare_data_writes_prompts_columns_eval_and_stats(tmp_path, tok_and_mapping):
    tok, mapping = tok_and_mapping
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1, "unit": "apples"} for i in range(10)]
    rows.append({"prompt": "What is " + "very " * 300 + "big?", "answer": 0})  # no room for an answer
    cfg = DataConfig(train=str(write_rows(tmp_path / "src.jsonl", rows)), eval_split=0.2, on_bad_row="skip",
                     max_seq_length=256)
    stats = prepare_data(cfg, tok, mapping, tmp_path / "data", seed=0, method="grpo")
    assert (stats.rows, stats.eval_rows, stats.trained_tokens, len(stats.bad_rows)) == (8, 2, 0, 1)
    assert "the prompt is" in stats.bad_rows[0] and "data.max_seq_length=256" in stats.bad_rows[0]
    lines = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and set(lines[0]) == {"prompt", "columns", "source"}
    assert lines[0]["prompt"] == [user(lines[0]["prompt"][0]["content"])]
    assert lines[0]["columns"]["unit"] == "apples" and lines[0]["source"].startswith(str(tmp_path / "src.jsonl"))
    assert stats.total_tokens == sum(len(prompt_ids(tok, r["prompt"])) for r in lines)
    saved = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert saved["method"] == "grpo" and saved["layout"] == "prompt" and saved["bad_rows"] == 1
    # TRL's rows: the prompt, and the row's source and columns as one JSON column for the reward wrapper
    trl_rows = load_grpo_rows(tmp_path / "data")
    assert set(trl_rows[0]) == {"prompt", ROW_COLUMN}
    assert json.loads(trl_rows[0][ROW_COLUMN]) == {"source": lines[0]["source"], "columns": lines[0]["columns"]}
    # verify's prompts: the eval rows and the train sample keep their columns
    evals, sample = load_eval(tmp_path / "data"), load_train_sample(tmp_path / "data")
    assert len(evals) == 2 and all(e.messages[-1]["role"] == "user" and e.columns["unit"] == "apples" for e in evals)
    assert len(sample) == 8 and sample[0].columns == lines[0]["columns"]
    sft = write_rows(tmp_path / "sft.jsonl", [{"messages": [user(Q1), assistant("7")]}] * 3)
    prepare_data(DataConfig(train=str(sft)), tok, mapping, tmp_path / "sft", seed=0)  # prepared for sft
    with pytest.raises(DataError, match="not GRPO prompts"):
        load_grpo_rows(tmp_path / "sft")


def test_a_too_long_prompt_stops_the_data_stage_by_default(tmp_path, tok_and_mapping):
    tok, mapping = tok_and_mapping
    cfg = DataConfig(train=str(write_rows(tmp_path / "src.jsonl", [{"prompt": Q1}, {"prompt": "word " * 200}])),
                     eval_split=0.0, max_seq_length=128)
    with pytest.raises(DataError, match=r"src.jsonl:2: the prompt is \d+ tokens, which leaves no room"):
        prepare_data(cfg, tok, mapping, tmp_path / "data", seed=0, method="grpo")


def test_the_demo_data_for_grpo_is_the_arithmetic_prompts(tok_and_mapping):
    stream = stream_grpo(DataConfig(), "demo")
    recs = list(stream)
    assert stream.layout == "prompt" and len(recs) == 40 and stream.spec.endswith("arithmetic.jsonl")
    assert all(set(r.columns) == {"answer"} for r in recs)
    assert len(list(stream_grpo(DataConfig(), "demo", "eval"))) == 6


def test_inspect_shows_the_prompt_lengths_and_an_example(tmp_path, tok_and_mapping):
    tok, mapping = tok_and_mapping
    path = write_rows(tmp_path / "src.jsonl", [{"prompt": Q1, "answer": 7}, {"prompt": Q2, "answer": 3}])
    found = inspect_data(DataConfig(), str(path), tok, mapping, None, "grpo")
    assert found.method == "grpo" and found.rows == 2 and found.format == "prompt"
    assert found.tokens.max == max(len(prompt_ids(tok, [user(q)])) for q in (Q1, Q2))
    assert found.example.prompt.endswith("<|im_start|>assistant\n") and '"answer": 7' in found.example.rendered
