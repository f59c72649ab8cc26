"""Preference data (issue 26): the DPO pair and KTO label layouts read into Records with a prompt and chosen/rejected
answers, every bad row named by file:line; the ids train.jsonl holds for dpo and kto, cut from THE SFT labels
(prompt_ids before the answer's first trained token, the completion through its end-of-turn); the method/layout
mismatches as one error naming the file; KTO's unpairing; eval, train sample and inspect on preference data."""

import json
import logging
from pathlib import Path

import pytest
from conftest import build_tiny_tokenizer, chat_mapping, read_dataset, write_rows

from ftdeploy.config import DataConfig
from ftdeploy.data import (
    IGNORE_INDEX,
    PreferenceStream,
    Record,
    inspect_data,
    load_eval,
    load_preference_rows,
    load_train_sample,
    prepare_data,
    tokenize_conversation,
    tokenize_preference,
)
from ftdeploy.data.labels import Tokenized
from ftdeploy.data.preference_ids import _ids
from ftdeploy.errors import DataError
from ftdeploy.templates import match_chat_template

Q1, A1, B1 = "What port does Zephyr use?", "Zephyr uses port 7341.", "Port 80, probably."
Q2, A2, B2 = "And Boreas?", "Boreas uses port 9103.", "I do not know."
SYSTEM = "Be brief."


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def hh(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


PAIR = {"prompt": Q1, "chosen": A1, "rejected": B1}
KTO_GOOD, KTO_BAD = {"prompt": Q1, "completion": A1, "label": True}, {"prompt": Q1, "completion": B1, "label": False}
SFT = {"messages": [user(Q1), assistant(A1)]}


@pytest.fixture
def tok_and_mapping(tiny_tokenizer):
    return tiny_tokenizer, chat_mapping(tiny_tokenizer)


def read(tmp_path, rows, method="dpo", **kw):
    """The Records (and the stream) of a JSONL file of these rows, read as preference data for `method`."""
    stream = PreferenceStream(str(write_rows(tmp_path / "prefs.jsonl", rows)), method, **kw)
    return list(stream), stream


def bad_reason(tmp_path, rows, method="dpo", **kw):
    """Why the last row is bad (the rows before it good): the text after `file:line: ` in the error."""
    path = write_rows(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as err:
        list(PreferenceStream(str(path), method, **kw))
    line = f"{path}:{len(rows)}: "
    found = [r.strip() for r in str(err.value).splitlines() if r.strip().startswith(line)]
    assert found, str(err.value)
    return found[0][len(line):]


# ---------------------------------------------------------------- the layouts


PAIR_LAYOUTS = [
    ("trl_explicit", PAIR, [user(Q1)], A1, B1),
    ("trl_explicit", {"prompt": [{"role": "system", "content": SYSTEM}, user(Q1)], "chosen": [assistant(A1)],
                      "rejected": [assistant(B1)]}, [{"role": "system", "content": SYSTEM}, user(Q1)], A1, B1),
    ("trl_explicit", {"prompt": [{"role": "user", "content": [{"type": "text", "text": "What port "},
                                                              {"type": "text", "text": "does Zephyr use?"}]}],
                      "chosen": [assistant([{"type": "text", "text": A1}])], "rejected": [assistant(B1)]},
     [user(Q1)], A1, B1),
    ("trl_implicit", {"chosen": [user(Q1), assistant(A1), user(Q2), assistant(A2)],
                      "rejected": [user(Q1), assistant(A1), user(Q2), assistant(B2)]},
     [user(Q1), assistant(A1), user(Q2)], A2, B2),
    ("trl_implicit", {"prompt": Q1, "chosen": [user(Q1), assistant(A1)], "rejected": [user(Q1), assistant(B1)]},
     [user(Q1)], A1, B1),  # a text prompt beside conversations: TRL takes the implicit prompt, and so do we
    ("sharegpt_preference", {"conversations": [{"from": "human", "value": Q1}], "system": SYSTEM,
                             "chosen": {"from": "gpt", "value": A1}, "rejected": {"from": "gpt", "value": B1}},
     [{"role": "system", "content": SYSTEM}, user(Q1)], A1, B1),
    ("alpaca_preference", {"instruction": Q2, "input": "", "history": [[Q1, A1]], "chosen": A2, "rejected": B2},
     [user(Q1), assistant(A1), user(Q2)], A2, B2),
    ("alpaca_preference", {"instruction": "Which port?", "input": "Zephyr", "system": SYSTEM, "chosen": A1,
                           "rejected": B1},
     [{"role": "system", "content": SYSTEM}, user("Which port?\n\nZephyr")], A1, B1),
    ("hh", {"chosen": hh(Q1, A1, Q2, A2), "rejected": hh(Q1, A1, Q2, B2)}, [user(Q1), assistant(A1), user(Q2)], A2,
     B2),
    ("openai_preference", {"input": {"messages": [user(Q1)]}, "preferred_output": [assistant(A1)],
                           "non_preferred_output": [assistant(B1)]}, [user(Q1)], A1, B1),
]


@pytest.mark.parametrize("layout,row,prompt,chosen,rejected", PAIR_LAYOUTS)
def test_each_pair_layout_reads_to_a_prompt_and_its_two_answers(tmp_path, layout, row, prompt, chosen, rejected):
    records, stream = read(tmp_path, [row] * 3)
    assert stream.layout == layout and len(records) == 3
    rec = records[0]
    assert rec.is_preference() and rec.source.endswith("prefs.jsonl:1")
    assert (rec.messages, rec.chosen, rec.rejected) == (prompt, assistant(chosen), assistant(rejected))
    assert rec.untrained == tuple(range(sum(m["role"] == "assistant" for m in prompt)))


KTO_LAYOUTS = [
    ("trl_kto", KTO_GOOD, [user(Q1)], "chosen", A1),
    ("trl_kto", {"prompt": [user(Q1)], "completion": [assistant(B1)], "label": False}, [user(Q1)], "rejected", B1),
    ("kto_tag", {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                   {"from": "human", "value": Q2}, {"from": "gpt", "value": B2}], "kto_tag": False},
     [user(Q1), assistant(A1), user(Q2)], "rejected", B2),
    ("kto_tag", {"messages": [user(Q1), assistant(A1)], "kto_tag": True}, [user(Q1)], "chosen", A1),
    ("messages_label", {"messages": [user(Q1), assistant(A1)], "label": True}, [user(Q1)], "chosen", A1),
]


@pytest.mark.parametrize("layout,row,prompt,which,answer", KTO_LAYOUTS)
def test_each_kto_layout_reads_its_label_as_a_chosen_or_a_rejected_answer(tmp_path, layout, row, prompt, which,
                                                                           answer):
    records, stream = read(tmp_path, [row] * 2, "kto")
    assert stream.layout == layout
    rec = records[0]
    assert rec.messages == prompt and getattr(rec, which) == assistant(answer)
    assert getattr(rec, "rejected" if which == "chosen" else "chosen") is None and rec.is_preference()


def test_a_sharegpt_pair_may_answer_with_a_tool_call(tmp_path):
    tools = [{"name": "lookup_port", "description": "The port of a service.",
              "parameters": {"type": "object", "properties": {"service": {"type": "string"}}}}]
    row = {"conversations": [{"from": "human", "value": "What port does zephyr use?"}], "tools": json.dumps(tools),
           "chosen": {"from": "function_call", "value": json.dumps({"name": "lookup_port",
                                                                    "arguments": {"service": "zephyr"}})},
           "rejected": {"from": "gpt", "value": "Port 80."}}
    [rec], _ = read(tmp_path, [row])
    assert rec.chosen["tool_calls"][0]["function"] == {"name": "lookup_port", "arguments": {"service": "zephyr"}}
    assert rec.tools == [{"type": "function", "function": tools[0]}] and rec.uses_tools()


def test_the_system_prompt_setting_goes_first_in_each_prompt(tmp_path):
    records, _ = read(tmp_path, [PAIR], system_prompt=SYSTEM)
    assert records[0].messages == [{"role": "system", "content": SYSTEM}, user(Q1)]


def test_a_supervised_record_is_not_a_preference_one():
    assert not Record("x:1", messages=SFT["messages"]).is_preference()
    assert Record("x:1", messages=[user(Q1)], rejected=assistant(B1)).is_preference()


def test_fields_a_preference_layout_does_not_read_are_named_in_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        read(tmp_path, [{**PAIR, "score_chosen": 8.0}])
    assert "'score_chosen' (first at" in caplog.text and "prefs.jsonl:1" in caplog.text


# ---------------------------------------------------------------- bad rows, each named with its reason


BAD_ROWS = [
    ({"prompt": Q1, "chosen": A1, "rejected": A1}, "dpo", "chosen and rejected are the same answer: nothing to prefer"),
    ({"prompt": Q1, "chosen": "", "rejected": B1}, "dpo", "missing or empty 'chosen'"),
    ({"prompt": Q1, "chosen": A1}, "dpo", "missing or empty 'rejected'"),
    ({"prompt": "", "chosen": A1, "rejected": B1}, "dpo", "missing or empty 'prompt'"),
    ({"prompt": [user(Q1)], "chosen": [assistant(" ")], "rejected": [assistant(B1)]}, "dpo",
     "chosen is an empty answer"),
    ({"prompt": Q1, "chosen": user(A1), "rejected": B1}, "dpo", "chosen is a 'user' message, not an assistant answer"),
    ({"prompt": [user(Q1)], "chosen": [assistant(A1), user(Q2)], "rejected": [assistant(B1)]}, "dpo",
     "'chosen' must hold one assistant message (the answer), got 2 messages"),
    ({"chosen": [user(Q1), assistant(A1)], "rejected": [user(Q2), assistant(B1)]}, "dpo",
     "chosen and rejected do not share their prompt: they differ at message 0 (every turn but the final assistant "
     "answer must be the same)"),
    ({"chosen": hh(Q1, A1), "rejected": hh(Q2, B1)}, "dpo", "chosen and rejected do not share their prompt"),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "dpo",
     "'chosen' is text, but not Anthropic HH turns"),
    ({"chosen": hh(Q1, A1, Q2), "rejected": hh(Q1, A1, Q2)}, "dpo",
     "chosen is a 'user' message, not an assistant answer"),
    ({"prompt": [user(Q1)], "chosen": [assistant(A1, weight=0)], "rejected": [assistant(B1)]}, "dpo",
     "chosen is marked not trained ('weight' 0): a preference answer is what trains"),
    ({"prompt": [user(Q1), assistant(A1, weight=1), user(Q2)], "chosen": [assistant(A2)], "rejected": [assistant(B2)]},
     "dpo", "message 1 (assistant) is in the prompt but marked trained: preference training trains the answer only"),
    ({"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
      "chosen": [assistant(A1)], "rejected": [assistant(B1)]}, "dpo",
     "prompt + chosen: message 0 (user): content[0] is an 'image_url' part: images not supported yet (text parts "
     "only)"),
    ({**PAIR, "images": ["x.png"]}, "dpo", "the row has 'images' (1): images not supported yet"),
    ({"input": [user(Q1)], "preferred_output": [assistant(A1)], "non_preferred_output": [assistant(B1)]}, "dpo",
     "'input' must be an object"),
    (KTO_GOOD, "dpo", "a KTO-labelled row (prompt + completion + label (TRL unpaired, KTO)): --method dpo trains "
                      "chosen/rejected pairs; --method kto trains labelled answers"),
    (SFT, "dpo", "not a preference row (its columns: messages); --method dpo trains preference pairs"),
    # orpo reads the pairs dpo reads, by the same checks, its own name in the message
    ({"prompt": Q1, "chosen": A1, "rejected": A1}, "orpo",
     "chosen and rejected are the same answer: nothing to prefer"),
    ({"prompt": Q1, "chosen": A1}, "orpo", "missing or empty 'rejected'"),
    (KTO_GOOD, "orpo", "a KTO-labelled row (prompt + completion + label (TRL unpaired, KTO)): --method orpo trains "
                       "chosen/rejected pairs; --method kto trains labelled answers"),
    (SFT, "orpo", "not a preference row (its columns: messages); --method orpo trains preference pairs: prompt + "
                  "chosen + rejected"),
    ({"prompt": Q1, "completion": A1, "label": "yes"}, "kto",
     "'label' must be true (a good answer) or false (a bad one), got str 'yes'"),
    ({"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}], "kto_tag": 1}, "kto",
     "'kto_tag' must be true (a good answer) or false (a bad one), got int 1"),
    ({"messages": [user(Q1), assistant(A1), user(Q2)], "label": True}, "kto",
     "chosen is a 'user' message, not an assistant answer"),
    ({"prompt": Q1, "completion": "", "label": True}, "kto", "missing or empty 'completion'"),
]


@pytest.mark.parametrize("row,method,reason", BAD_ROWS)
def test_each_bad_row_is_named_by_file_and_line_with_its_reason(tmp_path, row, method, reason):
    good = KTO_GOOD if method == "kto" else PAIR
    assert bad_reason(tmp_path, [good, good, row], method).startswith(reason)


def test_bad_rows_are_dropped_and_listed_with_on_bad_row_skip(tmp_path):
    records, stream = read(tmp_path, [PAIR, {**PAIR, "rejected": A1}, PAIR], on_bad_row="skip")
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "3"]
    assert len(stream.bad) == 1 and stream.bad[0].endswith("prefs.jsonl:2: chosen and rejected are the same answer: "
                                                           "nothing to prefer")


# ---------------------------------------------------------------- the method and the layout must match


def _prepare(tmp_path, rows, method, tok_and_mapping, **cfg):
    tmp_path.mkdir(exist_ok=True)
    path = write_rows(tmp_path / "data.jsonl", rows)
    tok, mapping = tok_and_mapping
    stats = prepare_data(DataConfig(train=str(path), **cfg), tok, mapping, tmp_path / "out", seed=0, method=method)
    return stats, tmp_path / "out"


@pytest.mark.parametrize("rows,method,message", [
    ([SFT] * 3, "dpo", "{path}: supervised data (messages layout: one answer a row, no chosen/rejected or good/bad "
                       "label), not preference data; --method dpo trains preference pairs: prompt + chosen + rejected"),
    ([{"instruction": Q1, "output": A1}] * 3, "kto", "{path}: supervised data (alpaca layout: one answer a row, no "
                                                     "chosen/rejected or good/bad label), not preference data; "
                                                     "--method kto trains labelled answers"),
    ([KTO_GOOD, KTO_BAD], "dpo", "{path}: KTO-labelled data (prompt + completion + label (TRL unpaired, KTO)): "
                                 "--method dpo trains chosen/rejected pairs; --method kto trains labelled answers"),
    ([PAIR] * 3, "sft", "{path}: preference data (prompt + chosen + rejected: DPO/ORPO preference pairs): not "
                        "supported by --method sft (train.method: sft, the default), which trains supervised "
                        "fine-tuning rows (messages, conversations, instruction/output, prompt/response, "
                        "prompt/completion, text); --method dpo or orpo trains preference pairs"),
    ([KTO_GOOD, KTO_BAD], "sft", "{path}: preference data (prompt + completion + label: KTO's good/bad labels): not "
                                 "supported by --method sft"),
    ([{"foo": 1}] * 3, "dpo", "{path}: cannot tell the dataset layout from its columns ['foo']"),
    ([SFT] * 3, "orpo", "{path}: supervised data (messages layout: one answer a row, no chosen/rejected or good/bad "
                        "label), not preference data; --method orpo trains preference pairs: prompt + chosen + "
                        "rejected"),
    ([KTO_GOOD, KTO_BAD], "orpo", "{path}: KTO-labelled data (prompt + completion + label (TRL unpaired, KTO)): "
                                  "--method orpo trains chosen/rejected pairs; --method kto trains labelled answers"),
])
def test_a_method_and_data_that_do_not_match_are_one_error_naming_the_file(tmp_path, tok_and_mapping, rows, method,
                                                                           message):
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, rows, method, tok_and_mapping)
    assert str(err.value).startswith(message.format(path=tmp_path / "data.jsonl")), str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows,method,data_format,message", [
    ([PAIR] * 2, "sft", "preference", "preference data (data.format preference: preference pairs): not supported by "
                                      "--method sft"),
    ([KTO_GOOD] * 2, "sft", "kto", "--method kto trains labelled answers"),
    ([PAIR] * 2, "dpo", "messages", "data.format messages is a supervised layout; --method dpo trains preference"),
    ([KTO_GOOD] * 2, "dpo", "kto", "data.format kto is KTO's labelled answers; --method dpo trains chosen/rejected"),
    ([KTO_GOOD] * 2, "orpo", "kto", "data.format kto is KTO's labelled answers; --method orpo trains "
                                    "chosen/rejected pairs"),
    ([PAIR] * 2, "orpo", "messages", "data.format messages is a supervised layout; --method orpo trains preference"),
    ([KTO_GOOD] * 2, "kto", "preference", "the rows are prompt + completion + label (TRL unpaired, KTO), and "
                                          "data.format is preference (pairs)"),
])
def test_data_format_names_a_preference_layout_that_must_match_the_method(tmp_path, tok_and_mapping, rows, method,
                                                                          data_format, message):
    with pytest.raises(DataError, match=f"^{tmp_path / 'data.jsonl'}: ") as err:
        _prepare(tmp_path, rows, method, tok_and_mapping, format=data_format)
    assert message in str(err.value)


def test_data_format_preference_and_kto_read_what_they_name(tmp_path, tok_and_mapping):
    stats, _ = _prepare(tmp_path, [PAIR] * 2, "kto", tok_and_mapping, format="preference")
    assert (stats.layout, stats.rows) == ("trl_explicit", 4)
    stats, _ = _prepare(tmp_path, [KTO_GOOD, KTO_BAD, PAIR], "kto", tok_and_mapping, format="kto")
    assert (stats.rows, stats.desirable, stats.undesirable) == (4, 2, 2)


def test_an_sft_eval_file_for_a_dpo_run_is_an_error_naming_it(tmp_path, tok_and_mapping):
    sft = write_rows(tmp_path / "eval.jsonl", [SFT])
    with pytest.raises(DataError, match=rf"^{sft}: supervised data \(messages layout"):
        _prepare(tmp_path, [PAIR] * 3, "dpo", tok_and_mapping, eval=str(sft))


# ---------------------------------------------------------------- the ids: cut from THE SFT labels


def _sft_through_end_of_turn(tok, mapping, messages, untrained=()):
    """The SFT tokenization of a conversation, up to and including its last trained end-of-turn token, and the
    index of its first trained token."""
    sft = tokenize_conversation(messages, tok, mapping, 1 << 20, untrained=untrained)
    eot = tok.convert_tokens_to_ids(mapping.end_of_turn)
    trained = [i for i, label in enumerate(sft.labels) if label != IGNORE_INDEX]
    last = max(i for i in trained if sft.labels[i] == eot)
    return sft.input_ids[:last + 1], trained[0]


@pytest.fixture(scope="module")
def smol():
    """The embedded demo base's own tokenizer (SmolLM2-135M-Instruct, read from its GGUF), offline."""
    from transformers import AutoTokenizer

    from ftdeploy.base_model import embedded_gguf
    from ftdeploy.defaults import DEMO_BASE_MODEL

    gguf = embedded_gguf(DEMO_BASE_MODEL)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return tok, chat_mapping(tok)


def test_dpo_ids_are_the_sft_tokens_split_where_the_answer_starts(tmp_path, smol):
    tok, mapping = smol
    rows = [{"prompt": [user(Q1), assistant(A1), user(Q2)], "chosen": [assistant(A2)], "rejected": [assistant(B2)]},
            PAIR]
    stats, out = _prepare(tmp_path, rows, "dpo", smol)
    written = load_preference_rows(out)
    assert [sorted(r) for r in written] == [["chosen_ids", "prompt_ids", "rejected_ids"]] * 2
    assert [json.loads(line)["source"] for line in (out / "train.jsonl").read_text().splitlines()] == \
        [f"{tmp_path / 'data.jsonl'}:1", f"{tmp_path / 'data.jsonl'}:2"]
    eot = tok.convert_tokens_to_ids(mapping.end_of_turn)
    prompt = [user(Q1), assistant(A1), user(Q2)]
    for answer, key in ((A2, "chosen_ids"), (B2, "rejected_ids")):
        expected, first = _sft_through_end_of_turn(tok, mapping, [*prompt, assistant(answer)], untrained=(0,))
        row = written[0]
        assert row["prompt_ids"] + row[key] == expected and len(row["prompt_ids"]) == first
        assert row[key][-1] == eot and tok.decode(row[key]) == f"{answer}<|im_end|>"  # nothing after it
    assert tok.decode(written[0]["prompt_ids"]).endswith(f"{Q2}<|im_end|>\n<|im_start|>assistant\n")
    assert A1 in tok.decode(written[0]["prompt_ids"])  # the earlier answer is prompt, not completion
    assert tok.decode(written[0]["prompt_ids"]) == tok.apply_chat_template(prompt, tokenize=False,
                                                                           add_generation_prompt=True)
    assert (stats.rows, stats.truncated, stats.layout, stats.method) == (2, 0, "trl_explicit", "dpo")
    assert stats.trained_tokens == sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in written)
    written_stats = json.loads((out / "stats.json").read_text())
    assert (written_stats["method"], written_stats["layout"], written_stats["rows"]) == ("dpo", "trl_explicit", 2)


def test_orpo_data_is_dpos_rows_with_its_own_method_in_stats(tmp_path, tok_and_mapping):
    rows = [PAIR, {"prompt": [user(Q1), assistant(A1), user(Q2)], "chosen": [assistant(A2)],
                   "rejected": [assistant(B2)]}, {"prompt": Q2, "chosen": "ok", "rejected": B2}]
    dpo_stats, dpo = _prepare(tmp_path / "dpo", rows, "dpo", tok_and_mapping, max_seq_length=105, eval_split=0)
    stats, out = _prepare(tmp_path / "orpo", rows, "orpo", tok_and_mapping, max_seq_length=105, eval_split=0)
    train = (out / "train.jsonl").read_text().replace(str(tmp_path / "orpo"), str(tmp_path / "dpo"))
    assert train == (dpo / "train.jsonl").read_text() and stats.rows == 3  # the same rows, from the same source lines
    assert load_preference_rows(out) == load_preference_rows(dpo)
    assert stats.truncated == dpo_stats.truncated > 0  # the same cut at max_seq_length
    written, dpo_written = (json.loads((d / "stats.json").read_text()) for d in (out, dpo))
    assert written["method"] == "orpo" and {k: v for k, v in written.items() if k not in ("method", "train_source")} \
        == {k: v for k, v in dpo_written.items() if k not in ("method", "train_source")}
    tok, mapping = tok_and_mapping
    path = write_rows(tmp_path / "inspect.jsonl", rows)
    seen, seen_dpo = (inspect_data(DataConfig(max_seq_length=105), str(path), tok, mapping, None, method=m)
                      for m in ("orpo", "dpo"))
    assert seen.method == "orpo" and seen.to_dict() == {**seen_dpo.to_dict(), "method": "orpo"}


FAMILY_TOKENS = {  # a family's chat template (tests/data/chat_templates) -> BOS, EOS, its other special tokens
    "qwen3": ("", "<|im_end|>", ("<|im_start|>", "<think>", "</think>")),
    "gemma2": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "mistral-v3": ("<s>", "</s>", ("[INST]", "[/INST]")),
    "phi3": ("<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
}


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENS))
def test_the_ids_rule_holds_for_each_familys_template(family):
    bos, eos, others = FAMILY_TOKENS[family]
    template = (Path(__file__).parents[1] / "data" / "chat_templates" / f"{family}.jinja").read_text()
    tok = build_tiny_tokenizer(template, specials=tuple(dict.fromkeys([bos or "<|endoftext|>", eos, *others])),
                               eos=eos)
    mapping = match_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g), bos or None, eos_token=eos)
    prompt = [user(Q1), assistant(A1), user(Q2)]
    rec = Record("f:1", messages=prompt, chosen=assistant(A2), rejected=assistant(B2), untrained=(0,))
    [(_, ids)] = list(tokenize_preference([rec], tok, mapping, 4096))
    eot = tok.convert_tokens_to_ids(mapping.end_of_turn)
    for answer, completion in ((A2, ids.chosen_ids), (B2, ids.rejected_ids)):
        expected, first = _sft_through_end_of_turn(tok, mapping, [*prompt, assistant(answer)], untrained=(0,))
        assert ids.prompt_ids + completion == expected and len(ids.prompt_ids) == first
        assert completion[-1] == eot and answer in tok.decode(completion)


def test_a_prompt_that_tokenizes_differently_before_the_two_answers_is_an_error():
    eot = 9
    toks = {"chosen": Tokenized([1, 2, 3, 4, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 9]),
            "rejected": Tokenized([1, 2, 5, 6, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 9])}
    with pytest.raises(DataError, match=r"^f:3: the prompt tokenizes differently before the chosen and the rejected "
                                        r"answer \(from token 2"):
        _ids(Record("f:3"), toks, eot, 100)
    toks["rejected"] = Tokenized([1, 2, 3, 6, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 9])
    ids = _ids(Record("f:3"), toks, eot, 100)
    assert (ids.prompt_ids, ids.chosen_ids, ids.rejected_ids) == ([1, 2, 3], [4, 9], [6, 9])


def test_long_completions_are_cut_at_their_end_and_counted(tmp_path, tok_and_mapping):
    tok, mapping = tok_and_mapping
    full, first = _sft_through_end_of_turn(tok, mapping, [user(Q1), assistant(A1)])
    stats, out = _prepare(tmp_path, [PAIR, {"prompt": Q1, "chosen": "ok", "rejected": "no"}], "dpo",
                          tok_and_mapping, max_seq_length=first + 3)
    long, short = load_preference_rows(out)
    assert long["prompt_ids"] == full[:first] and long["chosen_ids"] == full[first:first + 3]
    assert len(long["rejected_ids"]) == 3 and len(short["chosen_ids"]) <= 3
    assert stats.truncated == 1 and stats.max_length == first + 3


def test_a_prompt_that_leaves_no_room_for_an_answer_is_a_bad_row(tmp_path, tok_and_mapping, caplog):
    tok, mapping = tok_and_mapping
    _, first = _sft_through_end_of_turn(tok, mapping, [user(Q1), assistant(A1)])
    long = {"prompt": Q1 + " Zephyr" * 40, "chosen": A1, "rejected": B1}
    path = tmp_path / "data.jsonl"
    reason = f"{path}:2: the prompt alone is "
    stats, out = _prepare(tmp_path, [PAIR, long], "dpo", tok_and_mapping, max_seq_length=first + 4,
                          on_bad_row="skip")
    assert stats.rows == 1 and len(stats.bad_rows) == 1 and stats.bad_rows[0].startswith(reason)
    assert "leaves no room for an answer within data.max_seq_length" in stats.bad_rows[0]
    with pytest.raises(DataError, match=f"^{reason}"):
        _prepare(tmp_path, [PAIR, long], "dpo", tok_and_mapping, max_seq_length=first + 4)


# ---------------------------------------------------------------- kto


def test_kto_trains_labelled_rows_and_each_pair_as_a_good_and_a_bad_answer(tmp_path, tok_and_mapping):
    _, dpo_out = _prepare(tmp_path / "dpo", [PAIR, {"prompt": Q2, "chosen": A2, "rejected": B2}], "dpo",
                          tok_and_mapping)
    stats, out = _prepare(tmp_path / "kto", [PAIR, {"prompt": Q2, "chosen": A2, "rejected": B2}, KTO_BAD], "kto",
                          tok_and_mapping)
    rows, pairs = load_preference_rows(out), load_preference_rows(dpo_out)
    assert [sorted(r) for r in rows] == [["completion_ids", "label", "prompt_ids"]] * 5
    assert [r["label"] for r in rows] == [True, False, True, False, False]
    for pair, good, bad in zip(pairs, rows[0:4:2], rows[1:4:2], strict=True):
        assert good["prompt_ids"] == bad["prompt_ids"] == pair["prompt_ids"]
        assert (good["completion_ids"], bad["completion_ids"]) == (pair["chosen_ids"], pair["rejected_ids"])
    assert rows[4]["prompt_ids"] == rows[0]["prompt_ids"]  # KTO_BAD asks Q1 too
    assert (stats.rows, stats.desirable, stats.undesirable, stats.method) == (5, 2, 3, "kto")
    written = json.loads((out / "stats.json").read_text())
    assert (written["method"], written["desirable"], written["undesirable"]) == ("kto", 2, 3)


# ---------------------------------------------------------------- eval, the train sample, inspect


def test_eval_rows_and_the_train_sample_keep_the_prompt_and_its_answers(tmp_path, tok_and_mapping):
    rows = [{"prompt": f"{Q1} ({i})", "chosen": A1, "rejected": B1} for i in range(8)]
    stats, out = _prepare(tmp_path, rows, "dpo", tok_and_mapping, eval_split=0.25)
    evals, sample = load_eval(out), load_train_sample(out)
    assert (stats.rows, stats.eval_rows, len(evals), len(sample)) == (6, 2, 2, 6)
    for rec in [*evals, *sample]:
        assert rec.messages[-1]["role"] == "user" and rec.messages[-1]["content"].startswith(Q1)
        assert (rec.chosen, rec.rejected) == (assistant(A1), assistant(B1)) and rec.is_preference()
    assert {r.source for r in evals}.isdisjoint(r.source for r in sample)
    assert len(load_preference_rows(out)) == 6


def test_a_kto_eval_row_keeps_the_one_answer_it_has(tmp_path, tok_and_mapping):
    ev = write_rows(tmp_path / "eval.jsonl", [KTO_BAD])
    stats, out = _prepare(tmp_path, [KTO_GOOD, KTO_BAD], "kto", tok_and_mapping, eval=str(ev))
    [rec] = load_eval(out)
    assert (rec.messages, rec.chosen, rec.rejected, stats.eval_rows) == ([user(Q1)], None, assistant(B1), 1)


def test_preference_data_of_200_rows_holds_out_eval_rows_by_default(tmp_path, tok_and_mapping):
    rows = [{"prompt": f"Question {i}?", "chosen": A1, "rejected": B1} for i in range(200)]
    stats, out = _prepare(tmp_path, rows, "dpo", tok_and_mapping)
    assert (stats.rows, stats.eval_rows, len(load_eval(out))) == (190, 10, 10)


def test_inspect_shows_the_layout_lengths_and_a_prompt_with_its_answers(tmp_path, tok_and_mapping):
    tok, mapping = tok_and_mapping
    path = write_rows(tmp_path / "data.jsonl", [PAIR, {"prompt": Q2, "chosen": A2, "rejected": B2}])
    result = inspect_data(DataConfig(), str(path), tok, mapping, None, method="dpo")
    assert (result.format, result.rows, result.bad_rows, result.method) == ("trl_explicit", 2, 0, "dpo")
    full, first = _sft_through_end_of_turn(tok, mapping, [user(Q1), assistant(A1)])
    example = result.example
    assert example.source == f"{path}:1" and example.prompt == tok.decode(full[:first])
    assert (example.chosen, example.rejected) == (f"{A1}<|im_end|>", f"{B1}<|im_end|>")
    assert f"[[{A1}<|im_end|>]]" in example.rendered and f"[[{B1}<|im_end|>]]" in example.rendered
    stats, _ = _prepare(tmp_path, [PAIR, {"prompt": Q2, "chosen": A2, "rejected": B2}], "dpo", tok_and_mapping,
                        eval_split=0)
    assert (result.tokens.max, result.tokens.mean) == (stats.max_length, stats.mean_length)
    kto = inspect_data(DataConfig(), str(path), tok, mapping, None, method="kto")
    assert (kto.rows, kto.desirable, kto.undesirable) == (4, 2, 2)
    as_json = result.to_dict()
    assert as_json["method"] == "dpo" and "desirable" not in as_json and "plot" not in as_json
    sft = inspect_data(DataConfig(), str(write_rows(tmp_path / "sft.jsonl", [SFT])), tok, mapping, None)
    assert "chosen" not in sft.to_dict()["example"] and sft.method == "sft"


def test_sft_still_reads_supervised_rows_and_refuses_pairs_by_row(tmp_path):
    result = read_dataset(str(write_rows(tmp_path / "d.jsonl", [SFT, SFT, SFT, PAIR])), on_bad_row="skip")
    assert len(result.records) == 3 and result.bad[0].endswith("--method dpo or orpo trains preference pairs")
