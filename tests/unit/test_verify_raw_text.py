"""Raw-text data (the `text` layout, TRL's plain-string prompt/completion rows) with no eval rows: verify compares
served with merged on raw continuations of prefixes of the sampled training texts, through /api/generate raw,
instead of ending `no_prompts` and blaming "an older ftdeploy"."""

import json
from types import SimpleNamespace

import pytest
from conftest import build_tiny_model_dir

from ftdeploy.config import DataConfig, VerifyConfig, load_config
from ftdeploy.data import load_train_sample, prepare_data
from ftdeploy.report import sections
from ftdeploy.results import ExportResult, VerifySummary
from ftdeploy.stages.verify import failures
from ftdeploy.templates import match_chat_template

TEXTS = [f"The Zephyr service uses port {7000 + i}. hello world the Zephyr service uses port {7341 + i}."
         for i in range(6)]
PAIRS = [{"prompt": f"What port does the Zephyr service use {i}?", "completion": f" The Zephyr service uses port {i}."}
         for i in range(5)]


def _mapping(tok):
    return match_chat_template(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                               tok.bos_token)


def _prepared(tmp_path, tokenizer, rows, name):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_data(DataConfig(train=str(path)), tokenizer, _mapping(tokenizer), tmp_path / name, seed=0)
    return tmp_path / name


def _ctx(data_dir):
    return SimpleNamespace(run=SimpleNamespace(data_dir=data_dir), cfg=load_config(overrides=[]))


def test_the_data_stage_samples_raw_texts_and_verify_continues_them(tmp_path, tiny_tokenizer):
    from ftdeploy.pipeline.artifacts import raw_text_data, verify_examples

    texts = _prepared(tmp_path, tiny_tokenizer, [{"text": t} for t in TEXTS], "text")
    sample = load_train_sample(texts)
    assert [r.text for r in sample] == TEXTS and all(r.messages is None for r in sample)
    examples, source = verify_examples(_ctx(texts))
    assert source == "train" and len(examples) == len(TEXTS) and raw_text_data(_ctx(texts), examples, source)

    pairs = _prepared(tmp_path, tiny_tokenizer, PAIRS, "pairs")
    sample = load_train_sample(pairs)
    assert [r.text[: r.context_chars] for r in sample] == [p["prompt"] for p in PAIRS]
    # Chat data keeps its path.
    chats = _prepared(tmp_path, tiny_tokenizer, [{"messages": [{"role": "user", "content": p["prompt"]},
                                                               {"role": "assistant", "content": p["completion"]}]}
                                                 for p in PAIRS], "chats")
    examples, source = verify_examples(_ctx(chats))
    assert source == "train" and not raw_text_data(_ctx(chats), examples, source)


class _RawOllama:
    """Answers /api/generate raw=True as the merged model continues the prompt (greedy, its own limit)."""

    def __init__(self, model, drift=False):
        self.model, self.drift, self.requests = model, drift, []

    def generate(self, model, prompt, raw=False, options=None, keep_alive=None):
        self.requests.append((model, prompt, raw, options))
        g = self.model.continue_texts([prompt], [options["num_predict"]])[0]
        text = "Zephyr Zephyr Zephyr" if self.drift else g.text
        return {"response": text, "done_reason": "stop" if g.stopped and not self.drift else "length"}


@pytest.fixture(scope="module")
def tiny_merged(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "merged")


@pytest.mark.slow
def test_raw_continuations_are_compared_with_the_merged_model_and_gated(tmp_path, tiny_tokenizer, tiny_merged):
    from ftdeploy.fidelity import HFModel
    from ftdeploy.stages.verify import verify_raw

    examples = load_train_sample(_prepared(tmp_path, tiny_tokenizer, [{"text": t} for t in TEXTS]
                                           + [{"text": "hello"}], "text"))
    pairs = load_train_sample(_prepared(tmp_path, tiny_tokenizer, PAIRS, "pairs"))
    client = _RawOllama(HFModel(tiny_merged))
    summary = verify_raw(client, "m", {"m:q4_k_m": "q4_k_m"}, "q8_0", tiny_merged, examples + pairs, VerifyConfig(),
                         0, ExportResult())
    # "hello" is one token: too short to split. The others: a prefix each, asked raw of every served tag.
    assert summary.raw and summary.total == len(TEXTS) + len(PAIRS) == len(summary.prompts)
    assert all(raw and options["temperature"] == 0 for _, _, raw, options in client.requests)
    assert [m for m, *_ in client.requests] == ["m"] * summary.total + ["m:q4_k_m"] * summary.total
    assert all(t.startswith(p) for p, t in zip(summary.prompts, TEXTS, strict=False))
    assert summary.prompts[len(TEXTS):] == [p["prompt"] for p in PAIRS], "a prompt/completion row: its prompt"
    assert summary.template_parity is None and summary.system is None
    served = summary.model("served")
    assert served and served.token_agreement == 1.0 and served.passed and summary.failures == []
    assert len(summary.model("merged").replies) == summary.total

    drifted = verify_raw(_RawOllama(HFModel(tiny_merged), drift=True), "m", {}, "q8_0", tiny_merged, examples,
                         VerifyConfig(), 0, ExportResult())
    assert "agreement" in [f.check for f in drifted.failures], "the same min_agreement gate applies"


def test_raw_text_with_nothing_to_continue_says_what_the_data_is(tmp_path):
    from ftdeploy.pipeline.artifacts import raw_text_data

    found = failures(VerifySummary(prompt_source="train", raw=True), "m")
    assert [f.check for f in found] == ["no_prompts"]
    assert "the data is raw text" in found[0].message and "usable prefix" in found[0].message
    assert "older ftdeploy" not in found[0].message
    # Data prepared before the sample kept raw texts: an empty sample, and stats.json names the layout.
    (tmp_path / "stats.json").write_text(json.dumps({"layout": "text"}))
    assert raw_text_data(_ctx(tmp_path), [], "train")
    (tmp_path / "stats.json").write_text(json.dumps({"layout": "messages"}))
    assert not raw_text_data(_ctx(tmp_path), [], "train")


def test_the_report_and_summary_say_raw_continuations_were_verified():
    summary = VerifySummary(total=6, prompt_source="train", raw=True, passed=True, min_agreement=0.7,
                            prompts=["The Zephyr service"] * 6)
    manifest = {"metrics": {"verify": summary.to_dict()}, "stages": {}}
    verdict = " ".join(dict((t, text) for t, text, _ in sections(manifest, "m"))["Verdict"])
    assert "**PASS**" in verdict and "verified on raw continuations of 6 training texts" in verdict
    assert "Template parity does not apply to raw prompts" in verdict and "reference scoring" not in verdict
