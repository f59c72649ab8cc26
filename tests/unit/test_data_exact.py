"""The data stage's fast path (`tokenize_records`, and `prepare_data` streaming through it) gives the labels that
`tokenize_conversation` / `tokenize_text` define, bit for bit: every layout, both bundled chat formats (ChatML as in
SmolLM2, Llama 3 as in Llama 3.2, whose template trims contents and writes BOS), with the same errors, in the same
order, naming the same file:line. Then every chat format ftdeploy recognises, with the real chat template of a model
of each family (tests/data/chat_templates) and its special tokens: the fast path gives the definition's labels, the
chats their templates do not render turn by turn train exactly the answers and their end-of-turn, and the rule that
labels those agrees with the turn-by-turn rule wherever both apply."""

import json
import logging
import random
from pathlib import Path

import pytest
from conftest import CHATML_TEMPLATE, build_tiny_tokenizer, read_dataset

from ftdeploy.config import DataConfig
from ftdeploy.data import (
    IGNORE_INDEX,
    Tokenized,
    fast,
    labels,
    load_eval,
    prepare_data,
    stream_records,
    tokenize_conversation,
    tokenize_records,
    tokenize_text,
)
from ftdeploy.data.writer import held_out, pack_groups
from ftdeploy.errors import DataError
from ftdeploy.templates import match_chat_template

LLAMA32_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
FORMATS = {
    "chatml": dict(chat_template=CHATML_TEMPLATE),
    "llama3": dict(chat_template=LLAMA32_TEMPLATE, eos="<|eot_id|>",
                   specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
LAYOUTS = ("messages", "sharegpt", "alpaca", "pairs", "text")
MAX_LEN = 256  # some rows are longer: truncation is part of what is compared
WORDS = ("The Zephyr service uses port 7341 . What does hello world system user assistant café 東京 🚀 "
         "  spaced  \n newline \t tab <|im_end|> <|eot_id|> <|im_start|> 0.5 1234567").split(" ")


@pytest.fixture(params=sorted(FORMATS))
def chat(request):
    tok = build_tiny_tokenizer(**FORMATS[request.param])
    mapping = match_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g), tok.bos_token)
    assert mapping.format.name == request.param
    return tok, mapping


@pytest.fixture
def every_row_fast(monkeypatch):
    """No guard rows and small batches: every row takes the fast path, across many batch boundaries."""
    monkeypatch.setattr(fast, "GUARD_ROWS", 0)
    monkeypatch.setattr(fast, "BATCH_ROWS", 7)


def _text(rng, lo=1, hi=12):
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    text = " ".join(words)
    return text if text.strip() else "hello"


def _conversation(rng):
    turns = []
    if rng.random() < 0.3:
        turns.append({"role": "system", "content": _text(rng)})
    for _ in range(rng.randint(1, 3)):
        turns.append({"role": "user", "content": _text(rng)})
        turns.append({"role": "assistant", "content": _text(rng, 1, 60 if rng.random() < 0.2 else 12)})
    if rng.random() < 0.15:
        _text(rng)  # drawn as ever, so the rows after this one stay the same
        answers = [t for t in turns if t["role"] == "assistant"]
        if len(answers) > 1:  # an answer as context only (OpenAI's weight 0): both paths leave it untrained
            answers[-1]["weight"] = 0
    return turns


def _row(layout, rng):
    turns = _conversation(rng)
    first = next(t for t in turns if t["role"] == "user")["content"]
    answer = next(t for t in turns if t["role"] == "assistant")["content"]
    if layout == "messages":
        return {"messages": turns}
    if layout == "sharegpt":
        speaker = {"system": "system", "user": rng.choice(["human", "user"]), "assistant": rng.choice(["gpt", "model"])}
        return {"conversations": [{"from": speaker[t["role"]], "value": t["content"],
                                   **({"loss_weight": float(t["weight"])} if "weight" in t else {})} for t in turns]}
    if layout == "alpaca":
        row = {"instruction": first, "input": _text(rng) if rng.random() < 0.5 else "", "output": answer}
        return {**row, "system": _text(rng)} if rng.random() < 0.3 else row
    if layout == "pairs":
        return {"prompt": first, "response": answer}
    return {"text": " ".join(t["content"] for t in turns)}


def _dataset(tmp_path, layout, n=150, seed=0):
    rng = random.Random(f"{layout}-{seed}")
    path = tmp_path / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(_row(layout, rng), ensure_ascii=False) + "\n" for _ in range(n)),
                    encoding="utf-8")
    return path


def _reference(rec, tok, mapping, max_len=MAX_LEN, train_on="assistant"):
    """The definition, one record at a time through apply_chat_template."""
    if rec.text is not None:
        return tokenize_text(rec.text, tok, max_len)
    return tokenize_conversation(rec.messages, tok, mapping, max_len, train_on, rec.source, untrained=rec.untrained)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_labels_are_tokenize_conversations_bit_for_bit(tmp_path, chat, layout, every_row_fast):
    tok, mapping = chat
    records = read_dataset(str(_dataset(tmp_path, layout))).records
    expected = [_reference(rec, tok, mapping) for rec in records]
    got = [t for _, t in tokenize_records(records, tok, mapping, MAX_LEN)]
    assert got == expected
    assert any(t.truncated for t in expected) and any(not t.truncated for t in expected)
    if layout != "text":
        assert all(IGNORE_INDEX in t.labels and set(t.labels) != {IGNORE_INDEX} for t in expected)


def test_train_on_all_is_the_same_too(tmp_path, chat, every_row_fast):
    tok, mapping = chat
    records = read_dataset(str(_dataset(tmp_path, "messages"))).records
    expected = [_reference(rec, tok, mapping, train_on="all") for rec in records]
    assert [t for _, t in tokenize_records(records, tok, mapping, MAX_LEN, "all")] == expected


def _split(records, fraction, seed):
    """(train, eval): the records held_out picks go to eval, in file order."""
    held = held_out(len(records), fraction, seed)
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _packed(rows, max_seq_length):
    """Whole rows joined into the sequences pack_groups assigns them to, labels kept per row, and the rows'
    lengths."""
    return [{"input_ids": [t for i in group for t in rows[i]["input_ids"]],
             "labels": [t for i in group for t in rows[i]["labels"]],
             "seq_lengths": [len(rows[i]["input_ids"]) for i in group], "source": "packed"}
            for group in pack_groups([len(r["input_ids"]) for r in rows], max_seq_length)]


def _expected_files(path, tok, mapping, cfg, seed=0):
    """train.jsonl and eval.jsonl built from whole lists, one row at a time through the definition."""
    train, held = _split(read_dataset(str(path)).records, cfg.eval_split, seed)
    rows = [{"input_ids": t.input_ids, "labels": t.labels, "source": r.source}
            for r in train for t in [_reference(r, tok, mapping, cfg.max_seq_length)]]
    if cfg.packing:
        rows = _packed(rows, cfg.max_seq_length)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    evals = "".join(json.dumps({"messages": e.messages, "expect": e.expect, "match": e.match, "source": e.source},
                               ensure_ascii=False) + "\n" for e in held if e.messages)
    return lines, evals, rows


@pytest.mark.parametrize("layout,packing,eval_split", [
    ("messages", False, 0.0), ("sharegpt", True, 0.0), ("alpaca", False, 0.2), ("pairs", True, 0.1),
    ("text", False, 0.0),
])
def test_prepare_data_writes_the_files_it_wrote_before(tmp_path, chat, layout, packing, eval_split, every_row_fast):
    tok, mapping = chat
    path = _dataset(tmp_path, layout, n=120)
    cfg = DataConfig(train=str(path), packing=packing, eval_split=eval_split, max_seq_length=MAX_LEN)
    out = tmp_path / "run" / "data"
    stats = prepare_data(cfg, tok, mapping, out, seed=3)
    train_lines, eval_lines, rows = _expected_files(path, tok, mapping, cfg, seed=3)
    assert (out / "train.jsonl").read_text(encoding="utf-8") == train_lines
    assert (out / "eval.jsonl").read_text(encoding="utf-8") == eval_lines
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "stats.json", "train.jsonl", "train_sample.jsonl"]
    written = json.loads((out / "stats.json").read_text())
    unpacked = [_reference(r, tok, mapping) for r in _split(read_dataset(str(path)).records, eval_split, 3)[0]]
    lengths = [len(t.input_ids) for t in unpacked]
    assert written == {
        "rows": len(unpacked), "eval_rows": 120 - len(unpacked), "truncated": sum(t.truncated for t in unpacked),
        "trained_tokens": sum(lab != IGNORE_INDEX for t in unpacked for lab in t.labels),
        "total_tokens": sum(lengths), "max_length": max(lengths), "max_seq_length": MAX_LEN,
        "mean_length": round(sum(lengths) / len(lengths), 1),
        "train_source": str(path), "layout": layout, "bad_rows": 0,
        "packed_sequences": len(rows) if packing else None, "chat_format": mapping.format.name,
    }
    assert (stats.rows, stats.truncated) == (written["rows"], written["truncated"])


# ---------------------------------------------------------------- errors: the same ones, in the same order

GOOD = {"messages": [{"role": "user", "content": "What port?"}, {"role": "assistant", "content": "Port 7341."}]}


def _file(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _error(fn):
    with pytest.raises(DataError) as info:
        fn()
    return str(info.value)



def _same_error_as_reference(tmp_path, tok, mapping, rows, max_len=2048):
    path = _file(tmp_path, rows)
    records = read_dataset(str(path)).records
    bad_index = next(i for i, r in enumerate(records) if _outcome_error(r, tok, mapping, max_len))
    expected = _outcome_error(records[bad_index], tok, mapping, max_len)
    got = _error(lambda: prepare_data(DataConfig(train=str(path), max_seq_length=max_len), tok, mapping,
                                      tmp_path / "out", seed=0))
    assert got == expected
    assert not (tmp_path / "out").exists()
    return got


def _outcome_error(rec, tok, mapping, max_len):
    try:
        _reference(rec, tok, mapping, max_len)
    except DataError as exc:
        return str(exc)
    return None


def test_nothing_trainable_after_truncation_names_the_line(tmp_path, chat, data_paths):
    tok, mapping = chat
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    message = _same_error_as_reference(tmp_path, tok, mapping, [GOOD] * 9 + [long_prompt] + [GOOD] * 5, max_len=200)
    assert message == f"{tmp_path / 'd.jsonl'}:10: no trainable tokens left after truncation to " \
        "data.max_seq_length=200: the trained part of the row lies past it (raise data.max_seq_length, or shorten " \
        "the row)"


def test_a_template_that_does_not_render_turn_by_turn_names_the_line(tmp_path, data_paths):
    # The turn count is written up front, so an earlier render is not a prefix of a later one.
    template = "{{ messages|length }}" + CHATML_TEMPLATE
    tok = build_tiny_tokenizer(template)
    mapping = match_chat_template(
        lambda m, g: build_tiny_tokenizer().apply_chat_template(m, tokenize=False, add_generation_prompt=g))
    message = _same_error_as_reference(tmp_path, tok, mapping, [GOOD] * 4)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:1: the chat template does not render this conversation turn")


def test_an_untrained_end_of_turn_names_the_line(tmp_path, data_paths):
    # Assistant turns end with a newline instead of <|im_end|>: the model would never learn to stop.
    template = CHATML_TEMPLATE.replace(
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}",
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\\n' + message['content'] + '\\n'}}"
        "{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}")
    assert template != CHATML_TEMPLATE
    tok = build_tiny_tokenizer(template)
    mapping = match_chat_template(
        lambda m, g: build_tiny_tokenizer().apply_chat_template(m, tokenize=False, add_generation_prompt=g))
    message = _same_error_as_reference(tmp_path, tok, mapping, [GOOD] * 3)
    assert message == (f"{tmp_path / 'd.jsonl'}:1: the end-of-turn token '<|im_end|>' is not inside the trained span; "
                       "the model would never learn to stop")


def test_the_first_failing_row_is_the_one_reported(tmp_path, chat, data_paths):
    tok, mapping = chat
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    rows = [GOOD] * 5 + [long_prompt] * 3 + [GOOD] * 4
    message = _same_error_as_reference(tmp_path, tok, mapping, rows, max_len=200)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:6: ")


def test_bad_rows_anywhere_are_reported_before_a_tokenization_error(tmp_path, chat, data_paths):
    tok, mapping = chat
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    path = _file(tmp_path, [GOOD, long_prompt] + [GOOD] * 300 + ["{not json"])
    message = _error(lambda: prepare_data(DataConfig(train=str(path), max_seq_length=200), tok, mapping,
                                          tmp_path / "out", seed=0))
    assert message.startswith(f"{path}: 1 bad row (messages layout")
    assert f"{path}:303: not JSON" in message


def test_skipped_bad_rows_are_counted_and_the_rest_prepared(tmp_path, chat, data_paths):
    tok, mapping = chat
    path = _file(tmp_path, [GOOD, "{not json", GOOD, {"messages": []}])
    stats = prepare_data(DataConfig(train=str(path), on_bad_row="skip"), tok, mapping, tmp_path / "out", seed=0)
    assert (stats.rows, len(stats.bad_rows)) == (2, 2)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["bad_rows"] == 2


# ---------------------------------------------------------------- the guard


def test_a_fast_path_that_differs_sends_every_row_the_exact_way(tmp_path, chat, monkeypatch, caplog):
    tok, mapping = chat
    render = fast._FastTokenizer.render
    monkeypatch.setattr(fast._FastTokenizer, "render", lambda self, m, g, tools=None: render(self, m, g, tools) + " ")
    records = read_dataset(str(_dataset(tmp_path, "messages", n=100))).records
    with caplog.at_level(logging.WARNING, logger="ftdeploy.data.fast"):
        got = [t for _, t in tokenize_records(records, tok, mapping, MAX_LEN)]
    assert got == [_reference(rec, tok, mapping) for rec in records]
    assert "differs from apply_chat_template" in caplog.text


def test_the_guard_passes_on_the_bundled_formats(tmp_path, chat, caplog):
    tok, mapping = chat
    fast_path = fast._FastTokenizer.create(tok, mapping, MAX_LEN, "assistant",
                                           lambda rec: _reference(rec, tok, mapping))
    assert fast_path is not None
    records = read_dataset(str(_dataset(tmp_path, "messages", n=100))).records
    with caplog.at_level(logging.WARNING, logger="ftdeploy.data.fast"):
        assert len(list(tokenize_records(records, tok, mapping, MAX_LEN))) == 100
    assert "differs" not in caplog.text


def test_an_eval_file_and_the_demo_data_are_written_as_before(tmp_path, chat, every_row_fast):
    tok, mapping = chat
    train = _dataset(tmp_path, "messages", n=40)
    evals = _file(tmp_path, [GOOD, {"messages": GOOD["messages"], "expect": "7341", "match": "exact"}])
    for cfg in (DataConfig(train=str(train), eval=str(evals), max_seq_length=MAX_LEN), DataConfig()):
        out = tmp_path / "out"
        prepare_data(cfg, tok, mapping, out, seed=0)
        train_records = list(stream_records(cfg, cfg.train, "train"))
        eval_records = list(stream_records(cfg, cfg.eval or cfg.train, "eval"))
        expected = "".join(json.dumps({"input_ids": t.input_ids, "labels": t.labels, "source": r.source},
                                      ensure_ascii=False) + "\n"
                           for r in train_records for t in [_reference(r, tok, mapping, cfg.max_seq_length)])
        assert (out / "train.jsonl").read_text(encoding="utf-8") == expected
        assert [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()] == [
            {"messages": e.messages, "expect": e.expect, "match": e.match, "source": e.source} for e in eval_records]
        assert json.loads((out / "stats.json").read_text())["eval_rows"] == len(eval_records)


def test_the_train_files_errors_come_before_the_eval_files(tmp_path, chat):
    tok, mapping = chat
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps(GOOD) + "\n{oops\n")
    evals = tmp_path / "e.jsonl"
    evals.write_text(json.dumps(GOOD) + "\n{oops\n")
    message = _error(lambda: prepare_data(DataConfig(train=str(train), eval=str(evals)), tok, mapping,
                                          tmp_path / "out", seed=0))
    assert message.startswith(f"{train}: 1 bad row")
    train.write_text(json.dumps(GOOD) + "\n")
    message = _error(lambda: prepare_data(DataConfig(train=str(train), eval=str(evals)), tok, mapping,
                                          tmp_path / "out", seed=0))
    assert message.startswith(f"{evals}: 1 bad row")
    assert not (tmp_path / "out").exists()


def test_a_split_that_leaves_nothing_to_train_on_says_so(tmp_path, chat):
    tok, mapping = chat
    path = _file(tmp_path, [GOOD, GOOD])
    message = _error(lambda: prepare_data(DataConfig(train=str(path), eval_split=0.75), tok, mapping,
                                          tmp_path / "out", seed=0))
    assert message == f"{path}: no rows left to train on after holding out 2 for eval (data.eval_split=0.75)"


# ---------------------------------------------------------------- rows with tools

TOOL_TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "tool_templates"
TOOL_FORMATS = {
    # Qwen2.5's own template: tools in the system turn, several calls a turn, results merged into one user turn
    "qwen2.5": dict(chat_template=(TOOL_TEMPLATES / "qwen2.5.jinja").read_text()),
    # Llama 3.1's own: BOS, trimmed contents, tools in the first user turn, one call a turn, results as ipython
    "llama3.1": dict(chat_template=(TOOL_TEMPLATES / "llama3.1.jinja").read_text(), eos="<|eot_id|>",
                     specials=FORMATS["llama3"]["specials"]),
    # a template dict: apply_chat_template renders rows with tools through its "tool_use" entry, others "default"
    "chatml+tool_use": dict(chat_template={"default": CHATML_TEMPLATE,
                                           "tool_use": (TOOL_TEMPLATES / "qwen2.5.jinja").read_text()}),
}
TOOL_MAX_LEN = 1400  # the tool specs are long in the tiny vocabulary; some rows are longer still
SERVICES = ("zephyr", "quillstream", "marlowe", "café-東京", "<|im_end|>", " spaced ")


def _spec(name):
    return {"type": "function", "function": {
        "name": name, "description": "The Zephyr port.",
        "parameters": {"type": "object", "properties": {"service": {"type": "string"}}}}}


def _tool_row(rng, one_call_a_turn):
    """A plain row, a row offered tools it does not call, or one to three rounds of calls and results."""
    kind = rng.random()
    if kind < 0.2:
        return {"messages": _conversation(rng)}
    names = rng.sample(["lookup_port", "lookup_host", "ping"], rng.randint(1, 3))
    tools = [_spec(n) for n in names]
    turns = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.3 else []
    turns.append({"role": "user", "content": _text(rng)})
    if kind < 0.3:
        return {"messages": turns + [{"role": "assistant", "content": _text(rng)}], "tools": tools}
    for _ in range(rng.randint(1, 3)):
        calls = []
        for _ in range(1 if one_call_a_turn else rng.randint(1, 3)):
            args = {"service": rng.choice(SERVICES)} | ({"n": rng.randint(0, 99)} if rng.random() < 0.5 else {})
            call = {"type": "function", "function": {"name": rng.choice(names),
                                                     "arguments": json.dumps(args) if rng.random() < 0.3 else args}}
            calls.append(call)
        turn = {"role": "assistant", "tool_calls": calls}
        if rng.random() < 0.3:
            turn["content"] = _text(rng)
        turns.append(turn)
        for call in calls:
            result = {"role": "tool", "content": _text(rng, 1, 80 if rng.random() < 0.1 else 6)}
            if rng.random() < 0.5:
                result["name"] = call["function"]["name"]
            turns.append(result)
        if rng.random() < 0.2:
            break  # ends on a result: the calls are what it teaches
        turns.append({"role": "assistant", "content": _text(rng)})
        if rng.random() < 0.5:
            break
        turns.append({"role": "user", "content": _text(rng)})
    if turns[-1]["role"] == "user":  # a conversation ends on an answer (or on tool results)
        turns.append({"role": "assistant", "content": "Done."})
    return {"messages": turns, "tools": tools}


def _tool_dataset(tmp_path, fmt, n=150, seed=0):
    rng = random.Random(f"tools-{fmt}-{seed}")
    path = tmp_path / "tools.jsonl"
    rows = [_tool_row(rng, fmt == "llama3.1") for _ in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(params=sorted(TOOL_FORMATS))
def tool_chat(request):
    tok = build_tiny_tokenizer(**TOOL_FORMATS[request.param])
    mapping = match_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g), tok.bos_token)
    return request.param, tok, mapping


def _tool_reference(rec, tok, mapping, max_len=TOOL_MAX_LEN, train_on="assistant"):
    return tokenize_conversation(rec.messages, tok, mapping, max_len, train_on, rec.source, rec.tools, rec.untrained)


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_fast_labels_on_tool_rows_are_tokenize_conversations_bit_for_bit(tmp_path, tool_chat, train_on,
                                                                        every_row_fast, monkeypatch):
    fmt, tok, mapping = tool_chat
    records = read_dataset(str(_tool_dataset(tmp_path, fmt))).records
    expected = [_tool_reference(rec, tok, mapping, train_on=train_on) for rec in records]
    slow = []
    monkeypatch.setattr(fast, "tokenize_conversation", lambda *a, **k: slow.append(a) or tokenize_conversation(*a, **k))
    assert [t for _, t in tokenize_records(records, tok, mapping, TOOL_MAX_LEN, train_on)] == expected
    assert not slow  # every row, tools or not, took the fast path
    assert any(t.truncated for t in expected) and any(not t.truncated for t in expected)
    assert sum(bool(r.tools) for r in records) > 100
    if train_on == "assistant":
        # the tool calls are trained, the tool results are not
        calls = results = 0
        for rec, tokenized in zip(records, expected, strict=True):
            if tokenized.truncated or not any("tool_calls" in m for m in rec.messages):
                continue
            trained = tok.decode([t for t in tokenized.labels if t != IGNORE_INDEX])
            calls += all(f'"{c["function"]["name"]}"' in trained
                         for m in rec.messages for c in m.get("tool_calls", ()))
            results += any(m["role"] == "tool" and len(m["content"]) > 20 and m["content"].strip() in trained
                           for m in rec.messages)
        assert calls > 50 and results == 0


def test_prepare_data_on_tool_rows_writes_the_definitions_labels(tmp_path, tool_chat, every_row_fast):
    fmt, tok, mapping = tool_chat
    path = _tool_dataset(tmp_path, fmt, n=80)
    cfg = DataConfig(train=str(path), eval_split=0.1, max_seq_length=TOOL_MAX_LEN)
    prepare_data(cfg, tok, mapping, tmp_path / "out", seed=1)
    train, held = _split(read_dataset(str(path)).records, 0.1, 1)
    expected = "".join(json.dumps({"input_ids": t.input_ids, "labels": t.labels, "source": r.source},
                                  ensure_ascii=False) + "\n"
                       for r in train for t in [_tool_reference(r, tok, mapping)])
    assert (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8") == expected
    evals = load_eval(tmp_path / "out")
    assert [(e.messages, e.tools) for e in evals] == [(r.messages, r.tools) for r in held]


def test_a_fast_path_that_differs_on_tool_rows_sends_them_the_exact_way(tmp_path, monkeypatch, caplog):
    # Tool rows come after the guarded head: the guard on rows with tools catches the difference wherever they are.
    tok = build_tiny_tokenizer(**TOOL_FORMATS["qwen2.5"])
    mapping = match_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g), tok.bos_token)
    monkeypatch.setattr(fast, "GUARD_ROWS", 4)
    monkeypatch.setattr(fast, "BATCH_ROWS", 5)
    render = fast._FastTokenizer.render
    monkeypatch.setattr(fast._FastTokenizer, "render",
                        lambda self, m, g, tools=None: render(self, m, g, tools) + (" " if tools else ""))
    plain = read_dataset(str(_dataset(tmp_path, "messages", n=30))).records
    tools = [r for r in read_dataset(str(_tool_dataset(tmp_path, "qwen2.5", n=60))).records if r.tools]
    records = plain + tools
    with caplog.at_level(logging.WARNING, logger="ftdeploy.data.fast"):
        got = [t for _, t in tokenize_records(records, tok, mapping, TOOL_MAX_LEN)]
    assert got == [_tool_reference(rec, tok, mapping) for rec in records]
    assert caplog.text.count("differs from apply_chat_template on this row with tools") == 1
    assert tools[0].source in caplog.text


def test_the_tool_guard_passes_on_the_tool_templates(tmp_path, tool_chat, caplog):
    fmt, tok, mapping = tool_chat
    records = read_dataset(str(_tool_dataset(tmp_path, fmt, n=100))).records
    with caplog.at_level(logging.WARNING, logger="ftdeploy.data.fast"):
        assert len(list(tokenize_records(records, tok, mapping, TOOL_MAX_LEN))) == 100
    assert "differs" not in caplog.text


# ---------------------------------------------------------------- every chat format ftdeploy recognises

CHAT_TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"
R1_BOS, R1_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
R1_TOOLS = tuple(f"<\uff5c{name}\uff5c>" for name in (
    "tool\u2581calls\u2581begin", "tool\u2581calls\u2581end", "tool\u2581call\u2581begin", "tool\u2581call\u2581end",
    "tool\u2581sep", "tool\u2581outputs\u2581begin", "tool\u2581outputs\u2581end", "tool\u2581output\u2581begin",
    "tool\u2581output\u2581end"))
MISTRAL_TOOLS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
PHI_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# fixture -> (BOS, EOS, the family's other special tokens): each tokenizes as one token, as in the real tokenizer.
FAMILY_TOKENS = {
    "qwen2.5": ("", "<|im_end|>", ("<|im_start|>",)),
    "gemma2": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "gemma3": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "mistral-v3": ("<s>", "</s>", ("[INST]", "[/INST]", *MISTRAL_TOOLS)),
    "mistral-v3-tekken": ("<s>", "</s>", ("[INST]", "[/INST]")),
    "mistral-v7": ("<s>", "</s>", ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", *MISTRAL_TOOLS)),
    "phi3": ("<s>", "<|endoftext|>", PHI_ROLES),
    "phi4-mini": ("<|endoftext|>", "<|endoftext|>", (*PHI_ROLES, "<|tool|>", "<|/tool|>")),
    "phi4": ("<|endoftext|>", "<|im_end|>", ("<|im_start|>", "<|im_sep|>")),
    "qwen3": ("", "<|im_end|>", ("<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                                 "<tool_response>", "</tool_response>")),
    "deepseek-r1": (R1_BOS, R1_EOS, ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<think>", "</think>",
                                     *R1_TOOLS)),
}
REASONING = {"qwen3", "deepseek-r1"}
NO_SYSTEM = {"gemma2"}  # its template raises on a system message
FAMILY_MAX_LEN = 1024  # Mistral v7 writes a long default system prompt


def family_tokenizer(family):
    """A tiny BPE tokenizer with the family's real chat template and special tokens, and the format read off it."""
    bos, eos, others = FAMILY_TOKENS[family]
    specials = tuple(dict.fromkeys([bos or "<|endoftext|>", eos, *others]))
    tok = build_tiny_tokenizer((CHAT_TEMPLATES / f"{family}.jinja").read_text(), specials=specials, eos=eos)
    mapping = match_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g), bos or None, eos_token=eos)
    return tok, mapping


@pytest.fixture(params=sorted(FAMILY_TOKENS))
def family(request):
    return request.param


def test_each_familys_special_tokens_are_one_token(family):
    tok, _ = family_tokenizer(family)
    bos, eos, others = FAMILY_TOKENS[family]
    for special in filter(None, (bos, eos, *others)):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special


def _family_conversation(rng, family):
    turns = _conversation(rng)
    if family in NO_SYSTEM:
        turns = [t for t in turns if t["role"] != "system"]
    if family in REASONING:  # answers that thought first, as a <think> block in the content
        turns = [{**t, "content": f"<think>\n{_text(rng)}\n</think>\n\n{t['content']}"}
                 if t["role"] == "assistant" and rng.random() < 0.5 else t for t in turns]
    return turns


def test_every_format_fast_labels_are_tokenize_conversations_bit_for_bit(tmp_path, family, every_row_fast):
    tok, mapping = family_tokenizer(family)
    assert fast._FastTokenizer.create(tok, mapping, FAMILY_MAX_LEN, "assistant", lambda rec: None) is not None
    rng = random.Random(family)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": _family_conversation(rng, family)}, ensure_ascii=False) + "\n"
                            for _ in range(80)), encoding="utf-8")
    records = read_dataset(str(path)).records
    expected = [_reference(rec, tok, mapping, FAMILY_MAX_LEN) for rec in records]
    assert [t for _, t in tokenize_records(records, tok, mapping, FAMILY_MAX_LEN)] == expected
    assert all(IGNORE_INDEX in t.labels and set(t.labels) != {IGNORE_INDEX} for t in expected)


def _trained_runs(tok, tokenized):
    """The trained text, one string per run of trained tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in tokenized.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tok.decode(run) for run in runs]


HI, PORT = {"role": "user", "content": "Hi"}, {"role": "user", "content": "Port?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def _answer(content):
    return {"role": "assistant", "content": content}


# The chats whose templates do not render them turn by turn (the data stage refused each of them before), and
# exactly what is trained: each answer as the template renders it in the whole chat, with its end-of-turn.
NOT_TURN_BY_TURN = {
    # Qwen3: the final answer gets a think block (empty when the answer did not think), earlier ones lose theirs.
    "qwen3-multi": ("qwen3", [SYSTEM, HI, _answer("<think>\nA greeting.\n</think>\n\nHello!"), PORT,
                              _answer("7341.")],
                    ["Hello!<|im_end|>\n", "<think>\n\n</think>\n\n7341.<|im_end|>\n"]),
    "qwen3-multi-thought": ("qwen3", [HI, _answer("Hello!"), PORT, _answer("<think>\nThe docs.\n</think>\n\n7341.")],
                            ["Hello!<|im_end|>\n", "<think>\nThe docs.\n</think>\n\n7341.<|im_end|>\n"]),
    # DeepSeek-R1: the generation prompt opens <think>, a finished answer does not; reasoning is dropped from all.
    "deepseek-r1-plain": ("deepseek-r1", [HI, _answer("Hello!")], [f"Hello!{R1_EOS}"]),
    "deepseek-r1-multi": ("deepseek-r1", [SYSTEM, HI, _answer("<think>\nA greeting.\n</think>Hello!"), PORT,
                                          _answer("7341.")], [f"Hello!{R1_EOS}", f"7341.{R1_EOS}"]),
    # Phi-3: EOS after the final turn only.
    "phi3-multi": ("phi3", [HI, _answer("Hello!"), PORT, _answer("7341.")],
                   ["Hello!<|end|>\n", "7341.<|end|>\n<|endoftext|>"]),
    "phi4-mini-multi": ("phi4-mini", [SYSTEM, HI, _answer("Hello!"), PORT, _answer("7341.")],
                        ["Hello!<|end|>", "7341.<|end|><|endoftext|>"]),
    # Mistral v3: the system prompt goes into the user turn that ends the chat (and is dropped when none does).
    "mistral-v3-system": ("mistral-v3", [SYSTEM, HI, _answer("Hello!")], [" Hello!</s>"]),
    "mistral-v3-system-multi": ("mistral-v3", [SYSTEM, HI, _answer("Hello!"), PORT, _answer("7341.")],
                                [" Hello!</s>", " 7341.</s>"]),
    "mistral-v3-tekken-system-multi": ("mistral-v3-tekken", [SYSTEM, HI, _answer("Hello!"), PORT, _answer("7341.")],
                                       ["Hello!</s>", "7341.</s>"]),
}


@pytest.mark.parametrize("case", sorted(NOT_TURN_BY_TURN))
def test_chats_not_rendered_turn_by_turn_train_the_answers_and_their_end_of_turn(tmp_path, case):
    family, messages, answers = NOT_TURN_BY_TURN[case]
    tok, mapping = family_tokenizer(family)
    path = _file(tmp_path, [{"messages": messages}] * 3)
    prepare_data(DataConfig(train=str(path), max_seq_length=FAMILY_MAX_LEN), tok, mapping, tmp_path / "out", seed=0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    trained = Tokenized(rows[0]["input_ids"], rows[0]["labels"])
    assert _trained_runs(tok, trained) == answers
    assert tok.decode(trained.input_ids) == tok.apply_chat_template(messages, tokenize=False)


QWEN3_TOOL = {"type": "function", "function": {
    "name": "lookup_port", "description": "The TCP port a service listens on.",
    "parameters": {"type": "object", "properties": {"service": {"type": "string"}}, "required": ["service"]}}}
QWEN3_CALL = {"type": "function", "function": {"name": "lookup_port", "arguments": {"service": "zephyr"}}}


def _tool_chat(rng):
    turns = [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": "", "tool_calls": [QWEN3_CALL]},
             {"role": "tool", "content": "7341"}, _answer(_text(rng))]
    if rng.random() < 0.5:
        turns = [SYSTEM, *turns]
    if rng.random() < 0.5:
        turns += [{"role": "user", "content": _text(rng)}, _answer(_text(rng))]
    return {"messages": turns, "tools": [QWEN3_TOOL]}


def test_qwen3_tool_chats_fast_and_exact_agree_and_train_the_calls(tmp_path, every_row_fast):
    tok, mapping = family_tokenizer("qwen3")
    rng = random.Random("qwen3-tools")
    path = _file(tmp_path, [_tool_chat(rng) for _ in range(40)])
    records = read_dataset(str(path)).records
    expected = [tokenize_conversation(r.messages, tok, mapping, FAMILY_MAX_LEN, source=r.source, tools=r.tools)
                for r in records]
    assert [t for _, t in tokenize_records(records, tok, mapping, FAMILY_MAX_LEN)] == expected
    runs = _trained_runs(tok, expected[0])
    assert runs[0] == ('<tool_call>\n{"name": "lookup_port", "arguments": {"service": "zephyr"}}\n</tool_call>'
                       '<|im_end|>\n')
    assert "7341" not in "".join(runs)  # the tool's result is not the assistant's


@pytest.mark.parametrize("name", sorted(set(FAMILY_TOKENS) - {"deepseek-r1"}) + sorted(FORMATS))
def test_replacing_a_turn_finds_the_turn_by_turn_spans_wherever_both_apply(name):
    # The rule for chats not rendered turn by turn is sound where it can be checked: on every chat the turn-by-turn
    # rule labels (of every format but DeepSeek-R1, which renders none turn by turn), the two give the same spans.
    tok, mapping = family_tokenizer(name) if name in FAMILY_TOKENS else _format_tokenizer(name)
    render = lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)  # noqa: E731
    rng, compared = random.Random(name), 0
    for _ in range(120):
        messages = _family_conversation(rng, name)
        full = render(messages, False)
        if (spans := labels._turn_by_turn_spans(messages, full, render)) is not None:
            assert labels._replaced_turn_spans(messages, full, render, mapping.format) == spans, messages
            compared += 1
    assert compared >= 30


def _format_tokenizer(name):
    tok = build_tiny_tokenizer(**FORMATS[name])
    return tok, match_chat_template(
        lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g), tok.bos_token)
