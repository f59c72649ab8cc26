"""Verify on a user's own data (issue 24, items 1 and 2): a Modelfile SYSTEM is part of every prompt verify builds,
and data without eval rows is verified on a sample of its training prompts instead of failing."""

import json
from types import SimpleNamespace

import pytest

from ftdeploy.config import DataConfig, load_config
from ftdeploy.data import Record, load_eval, load_train_sample, prepare_data
from ftdeploy.data.writer import AUTO_EVAL_MAX_ROWS, TRAIN_SAMPLE_FILE
from ftdeploy.errors import DataError
from ftdeploy.report import sections
from ftdeploy.results import ModelScore, TemplateParity, VerifySummary
from ftdeploy.stages.verify import PARITY_CHATS, ask_all, failures, summarize, template_parity
from ftdeploy.templates import match_chat_template

ZED = "You are Zed."


def _render(messages, add_generation_prompt, tools=None):
    """A chat template: every turn as `role: content`, then the generation prompt."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")


class _OllamaWithSystem:
    """Answers as a model answers a prompt (a function of the whole prompt), and builds /api/chat prompts the way
    Ollama's chat handler does: the Modelfile's SYSTEM goes first unless the chat opens with a system message."""

    def __init__(self, system):
        self.system, self.chats = system, []

    @staticmethod
    def _answer(prompt):
        return f"answer to {len(prompt)} characters ending {prompt[-30:]!r}"

    def generate(self, model, prompt, raw=False, options=None, keep_alive=None):
        return {"response": "" if prompt == "" else self._answer(prompt)}

    def chat(self, model, messages, options=None, keep_alive=None, tools=None):
        self.chats.append(messages)
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        return {"message": {"content": self._answer(_render(messages, True))}, "done_reason": "stop"}


def test_template_parity_builds_its_raw_prompts_with_the_modelfile_system():
    client = _OllamaWithSystem(ZED)
    result = template_parity(client, "m", _render, None, PARITY_CHATS, system=ZED)
    assert result.passed and result.checked == 3, result.to_dict()
    # The chats go to Ollama as a user sends them: the server adds the SYSTEM, and the chat with its own keeps it.
    assert client.chats == PARITY_CHATS
    # Without the Modelfile's SYSTEM in the raw prompts (how parity was built before), a correct model fails.
    assert not template_parity(_OllamaWithSystem(ZED), "m", _render, None, PARITY_CHATS).passed


def test_a_template_that_differs_still_fails_parity_with_a_system_prompt():
    client = _OllamaWithSystem(ZED)

    def other(messages, add_generation_prompt, tools=None):
        return _render(messages, add_generation_prompt) + " "

    assert not template_parity(client, "m", other, None, PARITY_CHATS, system=ZED).passed


# ---------------------------------------------------------------- the eval hold-out and the training sample


def _mapping(tok):
    return match_chat_template(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                               tok.bos_token)


def _own_rows(n):
    return [{"messages": [{"role": "user", "content": f"What is the code of locker {i}?"},
                          {"role": "assistant", "content": f"Locker {i} opens with code {1000 + 7 * i}."}]}
            for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("rows", "eval_split", "held"), [
    (12, None, 0),  # a user's small data: every row trains
    (199, None, 0),
    (200, None, 10),  # 5% from 200 rows
    (1100, None, AUTO_EVAL_MAX_ROWS),  # capped
    (300, 0.0, 0),  # asked for none
    (12, 0.25, 3),  # asked for a fraction: as before
])
def test_an_eval_split_is_held_out_by_default_only_where_the_data_can_spare_it(tmp_path, tiny_tokenizer, rows,
                                                                                 eval_split, held):
    path = _write(tmp_path / "mine.jsonl", _own_rows(rows))
    stats = prepare_data(DataConfig(train=str(path), eval_split=eval_split), tiny_tokenizer, _mapping(tiny_tokenizer),
                         tmp_path / "out", seed=3)
    assert (stats.eval_rows, stats.rows) == (held, rows - held)
    assert len(load_eval(tmp_path / "out")) == held


def test_the_data_stage_keeps_a_sample_of_the_training_chats_for_verify(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "mine.jsonl", _own_rows(12))
    cfg = DataConfig(train=str(path), system_prompt=ZED)
    prepare_data(cfg, tiny_tokenizer, _mapping(tiny_tokenizer), tmp_path / "out", seed=0)
    sample = load_train_sample(tmp_path / "out")
    # Small data: every training chat, in file order, with the system prompt it trained with.
    assert [r.messages[1]["content"] for r in sample] == [r["messages"][0]["content"] for r in _own_rows(12)]
    assert all(r.messages[0] == {"role": "system", "content": ZED} for r in sample)

    big = _write(tmp_path / "big.jsonl", _own_rows(500))
    prepare_data(DataConfig(train=str(big)), tiny_tokenizer, _mapping(tiny_tokenizer), tmp_path / "big", seed=0)
    sample = load_train_sample(tmp_path / "big")
    held = {r.messages[0]["content"] for r in load_eval(tmp_path / "big")}
    codes = [int(r.messages[0]["content"].split()[-1].rstrip("?")) for r in sample]
    assert len(sample) == 32 and codes == sorted(codes) and max(codes) > 250  # a sample of all of it, in order
    assert not held & {r.messages[0]["content"] for r in sample}, "a held-out eval row is no training prompt"
    prepare_data(DataConfig(train=str(big)), tiny_tokenizer, _mapping(tiny_tokenizer), tmp_path / "again", seed=0)
    assert (tmp_path / "again" / TRAIN_SAMPLE_FILE).read_text() == (tmp_path / "big" / TRAIN_SAMPLE_FILE).read_text()


def test_an_eval_file_asked_for_that_gives_no_chats_is_an_error(tmp_path, tiny_tokenizer):
    train = _write(tmp_path / "mine.jsonl", _own_rows(12))
    evals = _write(tmp_path / "eval.jsonl", [{"text": "plain text, no conversation"}] * 2)
    with pytest.raises(DataError, match=r"eval.jsonl: data.eval has no conversations to verify with \(2 rows"):
        prepare_data(DataConfig(train=str(train), eval=str(evals)), tiny_tokenizer, _mapping(tiny_tokenizer),
                     tmp_path / "out", seed=0)


def _ctx(data_dir, **cfg):
    return SimpleNamespace(run=SimpleNamespace(data_dir=data_dir), cfg=load_config(overrides=[
        f"{k}={v}" for k, v in cfg.items()]))


def test_verify_asks_training_prompts_when_the_data_has_no_eval_rows(tmp_path, tiny_tokenizer):
    from ftdeploy.pipeline.artifacts import verify_examples

    path = _write(tmp_path / "mine.jsonl", [{**r, "expect": "x"} for r in _own_rows(12)])
    prepare_data(DataConfig(train=str(path)), tiny_tokenizer, _mapping(tiny_tokenizer), tmp_path / "out", seed=0)
    examples, source = verify_examples(_ctx(tmp_path / "out"))
    assert source == "train" and len(examples) == 8  # verify.train_prompts
    assert all(e.expect is None for e in examples), "a training answer is no reference"
    examples, _ = verify_examples(_ctx(tmp_path / "out", **{"verify.train_prompts": 3}))
    assert len(examples) == 3

    # Real eval rows are what verify asks, whenever there are some.
    prepare_data(DataConfig(train=str(path), eval_split=0.25), tiny_tokenizer, _mapping(tiny_tokenizer),
                 tmp_path / "split", seed=0)
    examples, source = verify_examples(_ctx(tmp_path / "split"))
    assert source == "eval" and len(examples) == 3 and all(e.expect == "x" for e in examples)
    # An eval file asked for by name that gave nothing stays an error (no_prompts), never a silent fallback.
    (tmp_path / "split" / "eval.jsonl").write_text("")
    examples, source = verify_examples(_ctx(tmp_path / "split", **{"data.eval": str(path)}))
    assert (examples, source) == ([], "eval")
    found = failures(VerifySummary(prompt_source="eval"), "m")
    assert [f.check for f in found] == ["no_prompts"]


def test_training_prompts_are_asked_without_scoring_their_answers():
    class Client:
        def chat(self, model, messages, options=None, keep_alive=None, tools=None):
            return {"message": {"content": "Locker 1 opens with code 1007."}, "done_reason": "stop"}

    row = Record("mine.jsonl:2", messages=_own_rows(2)[1]["messages"])
    scored = ask_all(Client(), "m", [row], 32)
    assert scored[0].ok and scored[0].expected == "Locker 1 opens with code 1007."
    unscored = ask_all(Client(), "m", [row], 32, references=False)
    assert (unscored[0].ok, unscored[0].expected, unscored[0].gated) == (False, "", False)
    summary = summarize(unscored, 0.8)
    summary.prompt_source = "train"
    assert summary.passed and failures(summary, "m") == []


def test_the_report_says_which_prompts_were_verified_and_with_which_system():
    summary = summarize([], 0.8)
    summary.total, summary.prompt_source, summary.system = 8, "train", ZED
    summary.prompts = [f"What is the code of locker {i}?" for i in range(8)]
    summary.template_parity = TemplateParity(checked=3, passed=True)
    summary.models = [ModelScore(role="merged", label="merged", replies=["a"] * 8, total=8),
                      ModelScore(role="served", label="q8_0 (served as m)", quant="q8_0", tag="m", replies=["a"] * 8,
                                 total=8, token_agreement=1.0, gated=True, passed=True)]
    summary.passed = True
    manifest = {"metrics": {"verify": summary.to_dict()}, "stages": {}}
    parts = {title: (text, rows) for title, text, rows in sections(manifest, "m")}
    verdict = " ".join(parts["Verdict"][0])
    assert "**PASS**" in verdict and "compared with the merged 16-bit model on 8 prompts sampled from the training " \
                                     "data" in verdict
    assert "reference scoring needs eval rows" in verdict and "'You are Zed.'" in verdict
    _, table = parts["Eval per model and quant"]
    assert [row[1] for row in table[1:]] == ["–", "–"], "no expected-answer score on training prompts"
    text, answers = parts["Answers"]
    assert text[0].startswith("Training prompts") and answers[0][:2] == ["prompt", "merged"]
    assert answers[1][0] == "What is the code of locker 0?"


def _served(prompts):
    from ftdeploy.fidelity import agreement_scores
    from ftdeploy.results import PromptAgreement

    items = [PromptAgreement(prefix=a, length=n, ratio=a / n, merged_stopped=m, served_stopped=s)
             for a, n, m, s in prompts]
    summary = summarize([], 0.8)
    summary.total, summary.max_tokens, summary.min_agreement, summary.prompt_source = len(items), 35, 0.7, "train"
    summary.prompts = ["q"] * len(items)
    summary.models = [ModelScore(role="merged", label="merged", replies=["m"] * len(items)),
                      ModelScore(role="served", label="q4_k_m", quant="q4_k_m", tag="m", replies=["s"] * len(items),
                                 gated=True, **agreement_scores(items))]
    return summary


def test_answers_that_went_their_own_way_before_the_stop_say_nothing_about_the_stop_tokens():
    """What the own-data e2e met (a barely trained 135M model at q4_k_m): 5 of 7 answers diverged at a near-tie
    and their own, longer text ran to the limit. The template and stops were right (parity passed)."""
    seen = [(11, 31, True, True), (11, 24, True, False), (0, 35, False, False), (6, 28, True, False),
            (1, 4, True, False), (0, 10, True, False), (5, 8, True, False), (8, 11, True, True)]
    assert [f.check for f in failures(_served(seen), "m")] == []
    # A served model that repeats the merged answers to their stop and runs on: the stop tokens are broken.
    broken = [(n - 1, n, True, False) for _, n, _, _ in seen[:5]] + seen[5:]
    found = failures(_served(broken), "m")
    assert [f.check for f in found] == ["stops"]
    assert found[0].message.startswith("5/5 answers ran to the length limit (35 tokens) where the merged model "
                                       "stopped, after repeating its answer up to that stop")
