import json

import pytest
from conftest import read_dataset

from ftdeploy.config import DataConfig
from ftdeploy.data import IGNORE_INDEX, load_tokenized, prepare_data, tokenize_conversation
from ftdeploy.data.writer import pack_groups
from ftdeploy.errors import DataError
from ftdeploy.stages.train import PadCollator
from ftdeploy.stages.train_batches import FlatCollator, split_rows
from ftdeploy.templates import match_chat_template
from ftdeploy.tokenizer import ensure_pad_token


def read_chat(path, system_prompt=None):
    """A chat file in any layout, bad rows an error: how eval files are read."""
    return read_dataset(str(path), system_prompt=system_prompt).records


def _mapping(tok):
    return match_chat_template(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                               tok.bos_token)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT = [{"role": "user", "content": "What port does the Zephyr service use?"},
        {"role": "assistant", "content": "The Zephyr service uses port 7341."}]


def test_loss_falls_on_the_assistant_turn_and_its_end_of_turn_token(tiny_tokenizer):
    mapping = _mapping(tiny_tokenizer)
    tok = tokenize_conversation(CHAT, tiny_tokenizer, mapping, 2048)
    trained = [t for t in tok.labels if t != IGNORE_INDEX]
    text = tiny_tokenizer.decode(trained)
    assert text.startswith("The Zephyr service uses port 7341.")
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in trained
    prompt = tiny_tokenizer.decode([t for t, lab in zip(tok.input_ids, tok.labels, strict=True) if lab == IGNORE_INDEX])
    assert "What port does" in prompt and "7341" not in prompt


def test_multi_turn_trains_every_assistant_turn(tiny_tokenizer):
    chat = CHAT + [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    tok = tokenize_conversation(chat, tiny_tokenizer, _mapping(tiny_tokenizer), 2048)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in tok.labels if t != IGNORE_INDEX].count(eot) == 2


def test_train_on_all_labels_everything(tiny_tokenizer):
    tok = tokenize_conversation(CHAT, tiny_tokenizer, _mapping(tiny_tokenizer), 2048, train_on="all")
    assert tok.labels == tok.input_ids


def test_truncation_that_leaves_nothing_to_learn_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match=r"x.jsonl:3: no trainable tokens left after truncation to "
                                        r"data.max_seq_length=8:"):
        tokenize_conversation(CHAT, tiny_tokenizer, _mapping(tiny_tokenizer), 8, source="x.jsonl:3")


def test_bad_rows_are_named_by_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"messages": CHAT},
        "{not json",
        {"prompt": "x"},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "a"}]},
    ])
    with pytest.raises(DataError) as err:
        read_chat(path)
    msg = str(err.value)
    assert "6 bad rows" in msg
    for line, reason in [(2, "not JSON"), (3, "missing field 'messages'"), (4, "unknown role 'wizard'"),
                         (5, "two user messages in a row"), (6, "content must be a non-empty string"),
                         (7, "no assistant message")]:
        row = next(r for r in msg.splitlines() if r.strip().startswith(f"{path}:{line}: "))
        assert reason in row


def test_empty_dataset_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="the dataset is empty"):
        read_chat(_write(tmp_path / "e.jsonl", []))
    with pytest.raises(DataError, match="no such file"):
        read_chat(tmp_path / "missing.jsonl")


def test_system_prompt_is_added_where_missing(tmp_path):
    rows = read_chat(_write(tmp_path / "d.jsonl", [{"messages": CHAT}]), system_prompt="Be terse.")
    assert rows[0].messages[0] == {"role": "system", "content": "Be terse."}


def test_pad_token_is_never_eos(tiny_tokenizer):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    pad = ensure_pad_token(tiny_tokenizer, _mapping(tiny_tokenizer))
    assert pad != tiny_tokenizer.eos_token and pad not in ("<|im_start|>", "<|im_end|>")
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_collator_pads_and_refuses_an_all_masked_batch():
    collate = PadCollator(pad_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(DataError, match="every label masked"):
        collate([{"input_ids": [5, 6], "labels": [-100, -100]}])


def test_prepare_data_writes_everything_or_nothing(tmp_path, tiny_tokenizer):
    mapping = _mapping(tiny_tokenizer)
    good = _write(tmp_path / "good.jsonl", [{"messages": CHAT}] * 4)
    out = tmp_path / "run" / "data"
    stats = prepare_data(DataConfig(train=str(good), eval_split=0.25), tiny_tokenizer, mapping, out, seed=1)
    assert (stats.rows, stats.eval_rows) == (3, 1)
    assert len(load_tokenized(out)) == 3
    bad = _write(tmp_path / "bad.jsonl", [{"messages": CHAT}, "{oops"])
    out2 = tmp_path / "run2" / "data"
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prepare_data(DataConfig(train=str(bad)), tiny_tokenizer, mapping, out2, seed=1)
    assert not out2.exists() and not any(p.name.startswith(".data") for p in out2.parent.glob("*"))


def test_packing_fills_sequences_up_to_max_length_and_keeps_every_label(tmp_path, tiny_tokenizer):
    mapping = _mapping(tiny_tokenizer)
    rows = [{"messages": [CHAT[0], {"role": "assistant", "content": "port " * n}]} for n in (5, 30, 12, 3, 20, 8)]
    path = _write(tmp_path / "d.jsonl", rows)
    prepare_data(DataConfig(train=str(path), eval_split=0), tiny_tokenizer, mapping, tmp_path / "rows", seed=0)
    unpacked = [json.loads(line) for line in (tmp_path / "rows" / "train.jsonl").read_text().splitlines()]
    limit = 2 * max(len(r["input_ids"]) for r in unpacked)
    cfg = DataConfig(train=str(path), eval_split=0, packing=True, max_seq_length=limit)
    prepare_data(cfg, tiny_tokenizer, mapping, tmp_path / "packed", seed=0)
    packed = [json.loads(line) for line in (tmp_path / "packed" / "train.jsonl").read_text().splitlines()]
    assert all(len(p["input_ids"]) <= limit and p["source"] == "packed" for p in packed)
    for key in ("input_ids", "labels"):
        assert sorted(t for p in packed for t in p[key]) == sorted(t for r in unpacked for t in r[key])
    assert len(packed) < len(unpacked)
    assert json.loads((tmp_path / "packed" / "stats.json").read_text())["packed_sequences"] == len(packed)
    # Each packed sequence says where its rows end, and split there it is the rows themselves, whole.
    assert all(sum(p["seq_lengths"]) == len(p["input_ids"]) for p in packed)
    rows = [row for p in load_tokenized(tmp_path / "packed") for row in split_rows(p)]
    assert sorted(map(str, rows)) == sorted(str({"input_ids": r["input_ids"], "labels": r["labels"]}) for r in unpacked)


def test_packing_is_best_fit_decreasing():
    # Longest first, each row into the sequence it leaves the least room in: 4 fills 6's, and 3 goes back into 7's
    # (next-fit would start a third sequence for it), as TRL's bfd packs them.
    assert pack_groups([7, 6, 4, 3], 10) == [[0, 3], [1, 2]]
    lengths = [9, 1, 5, 5, 3, 8, 2, 2, 7, 1]
    groups = pack_groups(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 5 == -(-sum(lengths) // 10)  # 43 tokens in the fewest sequences of 10
    assert pack_groups([], 10) == [] and pack_groups([10, 10], 10) == [[0], [1]]


def test_packed_rows_from_an_older_ftdeploy_are_refused_with_the_fix(tmp_path):
    """An earlier ftdeploy packed rows without their boundaries, and they attended to each other: such data is
    prepared again, never trained as it is."""
    (tmp_path / "train.jsonl").write_text(json.dumps({"input_ids": [1, 2, 3], "labels": [1, 2, 3],
                                                      "source": "packed"}) + "\n")
    (tmp_path / "stats.json").write_text(json.dumps({"packed_sequences": 1}))
    with pytest.raises(DataError, match="prepare the data again: `ftdeploy data`"):
        load_tokenized(tmp_path)


def test_the_flattening_collator_keeps_rows_apart_and_refuses_an_all_masked_batch():
    collate = FlatCollator()
    packed = {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]}
    batch = collate([packed, {"input_ids": [4, 3], "labels": [-100, 3]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]  # each row from 0
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 3]]  # no row's first token is predicted
    assert "attention_mask" not in batch
    with pytest.raises(DataError, match="every label masked"):
        collate([{"input_ids": [5, 6], "labels": [-100, -100]}])


def test_packed_data_trained_with_packing_false_is_padded_row_by_row():
    """Data the data stage packed (data.packing true), trained by `ftdeploy train --set data.packing=false`: each
    packed sequence goes back to its rows before padding, never padded as one sequence whose rows attend to each
    other (and whose rows' first tokens are predicted from the row before), while the manifest says "padded"."""
    from ftdeploy.stages.train_batches import sft_batches

    packed = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},
              {"input_ids": [4, 3], "labels": [-100, 3], "seq_lengths": [2]}]
    batches = sft_batches(object(), packed, False, "the padding collator")
    assert (batches.packing, batches.collator) == ("padded", "the padding collator")
    assert batches.rows == [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                            {"input_ids": [4, 3], "labels": [-100, 3]}]
