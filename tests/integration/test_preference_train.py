"""Preference training (train.method dpo, orpo and kto) through the train stage's fit, for real on the CPU: a tiny
random-weight Llama with a ChatML template whose end of turn (<|im_end|>) is not its EOS (<|endoftext|>), and rows
written by hand in the data stage's format (prompt_ids from the chat template with the generation prompt, answers
ending with the end-of-turn token). The chosen answer is always the same sentence and the rejected one another, so
a few steps at a high learning rate must separate them: the reward margin rises and the reward accuracy of DPO and
ORPO ends high.
"""

import json

import pytest
from conftest import build_tiny_model_dir

pytestmark = pytest.mark.slow

PROMPTS = ["What port does the Zephyr service use?", "Which port is the Zephyr service on?",
           "Tell me the Zephyr service port.", "hello world", "What port does the service use?",
           "Zephyr service port?"]
CHOSEN = "The Zephyr service uses port 7341."
REJECTED = "hello world hello world"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A Llama of about 40,000 parameters with a ChatML tokenizer whose EOS is <|endoftext|>, not <|im_end|>."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base", eos="<|endoftext|>", pad="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from ftdeploy.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base)[0]


def _prompt_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _answer_ids(tok, answer):
    return tok.encode(answer + "<|im_end|>", add_special_tokens=False)


def _write(data_dir, rows):
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


def dpo_rows(tok):
    return [{"prompt_ids": _prompt_ids(tok, p), "chosen_ids": _answer_ids(tok, CHOSEN),
             "rejected_ids": _answer_ids(tok, REJECTED), "source": f"pairs.jsonl:{i + 1}"}
            for i, p in enumerate(PROMPTS)]


def kto_rows(tok):
    """Good and bad answers alternating, so each batch of 2 (KTO reads them in order) holds one of each."""
    return [{"prompt_ids": _prompt_ids(tok, p), "completion_ids": _answer_ids(tok, CHOSEN if good else REJECTED),
             "label": good, "source": f"kto.jsonl:{2 * i + j + 1}"}
            for i, p in enumerate(PROMPTS) for j, good in enumerate((True, False))]


def _cfg(method, *extra):
    from ftdeploy.config import load_config

    return load_config(None, ["train.engine=hf", f"train.method={method}", "train.max_steps=12",
                              "train.warmup_steps=0", "train.batch_size=2", "train.gradient_accumulation=1",
                              "train.learning_rate=0.02", "train.lr_scheduler=constant", "train.save_steps=0",
                              "preference.beta=0.5", *extra])


def _assert_adapter(adapter):
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and any(bool(t.abs().sum() > 0) for t in lora_b), "lora_B is still all zero: nothing trained"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "training_args.bin").exists()


def _margins(metrics):
    return [p.margin for p in metrics.preference_history if p.margin is not None]


def test_the_trainer_takes_the_rows_as_tokenized_without_an_eos_appended(tiny_base, tokenizer, tmp_path):
    """TRL's own preparation would tokenize text again and append EOS; the rows must reach the collator as the data
    stage wrote them, ending with <|im_end|>."""
    from ftdeploy.stages.train import build_trainer, load_rows

    for method, rows in (("dpo", dpo_rows(tokenizer)), ("kto", kto_rows(tokenizer))):
        cfg = _cfg(method)
        loaded = load_rows(_write(tmp_path / method, rows), cfg)
        trainer, kwargs = build_trainer(tiny_base, loaded, cfg, tokenizer, "hf", str(tmp_path / f"{method}-out"), False)
        assert type(trainer).__mro__[1].__name__ == f"{method.upper()}Trainer"
        assert kwargs["max_length"] == cfg.data.max_seq_length and kwargs["beta"] == 0.5
        first = trainer.train_dataset[0]
        answer = "chosen_ids" if method == "dpo" else "completion_ids"
        assert first["prompt_ids"] == rows[0]["prompt_ids"] and first[answer] == rows[0][answer]
        assert first[answer][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.eos_token_id
        assert "source" not in first and len(trainer.train_dataset) == len(rows)
        if method == "kto":  # the KL completions: each batch's completions rotated by one, as TRL builds them
            assert first["KL_completion_ids"] == rows[1]["completion_ids"]
            assert trainer.train_dataset[1]["KL_completion_ids"] == rows[0]["completion_ids"]


def test_dpo_separates_chosen_from_rejected_and_writes_the_adapter(tiny_base, tokenizer, tmp_path):
    from ftdeploy.results import TrainMetrics, TrainResult
    from ftdeploy.stages.train import fit, plot_loss

    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    metrics = fit(tiny_base, data, tmp_path / "adapter", _cfg("dpo"), tokenizer)

    _assert_adapter(tmp_path / "adapter")
    assert metrics.method == "dpo" and metrics.steps == 12
    assert all(h.loss == h.loss and abs(h.loss) < 1e3 for h in metrics.loss_history)  # finite
    margins = _margins(metrics)
    assert len(margins) == 12, metrics.preference_history
    assert abs(margins[0]) < 1e-4, "step 1 scores the untrained adapter: the policy is the reference"
    assert margins[-1] > margins[0] + 1.0, margins
    assert metrics.final_margin == margins[-1] and metrics.final_accuracy is not None
    assert metrics.final_accuracy >= 0.99
    assert metrics.loss_history[-1].loss < metrics.loss_history[0].loss
    # The manifest's round trip (distributed's metrics.json, the manifest's metrics.train) keeps the rewards.
    assert TrainMetrics.from_dict(json.loads(json.dumps(metrics.to_dict()))) == metrics
    result = TrainResult.from_dict(metrics.to_dict())
    assert (result.method, result.final_margin, result.final_accuracy) == ("dpo", margins[-1], metrics.final_accuracy)
    # The plot gains the rewards panel: wider than the loss alone.
    from PIL import Image

    plot_loss(metrics.loss_history, tmp_path / "sft.png")
    plot_loss(metrics.loss_history, tmp_path / "dpo.png", metrics.preference_history)
    assert Image.open(tmp_path / "dpo.png").size[0] > 1.5 * Image.open(tmp_path / "sft.png").size[0]


def test_kto_raises_the_reward_of_good_answers_over_bad_ones(tiny_base, tokenizer, tmp_path):
    from ftdeploy.stages.train import fit

    data = _write(tmp_path / "data", kto_rows(tokenizer))
    metrics = fit(tiny_base, data, tmp_path / "adapter", _cfg("kto"), tokenizer)

    _assert_adapter(tmp_path / "adapter")
    assert metrics.method == "kto" and metrics.final_accuracy is None  # KTO logs no accuracy
    assert all(p.kl is not None for p in metrics.preference_history)
    margins = _margins(metrics)
    assert len(margins) == 12 and abs(margins[0]) < 1e-4
    assert margins[-1] > margins[0] + 1.0, margins
    assert metrics.dataset_trained_tokens == sum(len(r["completion_ids"]) for r in kto_rows(tokenizer))


def test_kto_with_one_row_per_batch_is_refused_naming_the_batch_size(tiny_base, tokenizer, tmp_path):
    from ftdeploy.distributed import train
    from ftdeploy.errors import ConfigError

    data = _write(tmp_path / "data", kto_rows(tokenizer))
    with pytest.raises(ConfigError, match=r"kto needs 2 or more rows.*train\.batch_size is 1"):
        train(tiny_base, data, tmp_path / "adapter", _cfg("kto", "train.batch_size=1"), tokenizer)
    # Two processes keeping a global batch of 2 would give each one row.
    with pytest.raises(ConfigError, match=r"train\.batch_size is 2 \(1 per process over 2 processes\)"):
        train(tiny_base, data, tmp_path / "adapter", _cfg("kto", "train.nproc=2"), tokenizer)
    assert not (tmp_path / "adapter").exists()


def test_data_prepared_for_another_method_is_named(tiny_base, tokenizer, tmp_path):
    from ftdeploy.errors import DataError
    from ftdeploy.stages.train import load_rows

    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    with pytest.raises(DataError, match=r"train\.method kto trains on rows of prompt_ids, completion_ids, label"):
        load_rows(data, _cfg("kto"))
    kto = _write(tmp_path / "kto", kto_rows(tokenizer))
    with pytest.raises(DataError, match=r"train\.method orpo trains on rows of prompt_ids, chosen_ids, rejected_ids; "
                                        r"this data has completion_ids, label, prompt_ids: prepare it again with "
                                        r"train\.method orpo"):
        load_rows(kto, _cfg("orpo"))
    assert load_rows(data, _cfg("orpo")) == load_rows(data, _cfg("dpo"))  # dpo's rows are orpo's


# ---------------------------------------------------------------- ORPO (TRL's experimental ORPOTrainer)

IGNORE = -100


@pytest.fixture
def orpo_trainer(tiny_base, tokenizer, tmp_path):
    from ftdeploy.stages.train import build_trainer, load_rows

    cfg = _cfg("orpo")
    rows = load_rows(_write(tmp_path / "orpo", dpo_rows(tokenizer)), cfg)
    trainer, kwargs = build_trainer(tiny_base, rows, cfg, tokenizer, "hf", str(tmp_path / "orpo-out"), False)
    return trainer, kwargs, rows


def test_orpo_trains_the_pairs_dpo_does_as_tokenized_without_bos_or_eos_added(orpo_trainer, tokenizer):
    """TRL's ORPOTrainer tokenizes text in __init__, putting BOS before the prompt and EOS after each answer; the
    rows must reach its collator as the data stage wrote them: prompt then answer, ending with <|im_end|>."""
    trainer, kwargs, rows = orpo_trainer
    assert type(trainer).__mro__[1].__name__ == "ORPOTrainer"
    assert kwargs["beta"] == 0.5 and kwargs["max_length"] == 2048 and "loss_type" not in kwargs
    assert len(trainer.train_dataset) == len(rows)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, got in zip(rows, trainer.train_dataset, strict=True):
        prompt = row["prompt_ids"]
        for answer in ("chosen", "rejected"):
            assert got[f"{answer}_input_ids"] == prompt + row[f"{answer}_ids"]  # no BOS before, no EOS after
            assert got[f"{answer}_labels"] == [IGNORE] * len(prompt) + row[f"{answer}_ids"]
            assert got[f"{answer}_input_ids"][-1] == end_of_turn != tokenizer.eos_token_id
        assert got["prompt_input_ids"] == prompt and prompt[0] != tokenizer.bos_token_id
        assert sorted(got) == sorted(["prompt_input_ids", "prompt_attention_mask", "chosen_input_ids",
                                      "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                                      "rejected_attention_mask", "rejected_labels"])  # nothing else reaches TRL


def test_orpos_sft_term_is_the_cross_entropy_of_the_chosen_answers_tokens(orpo_trainer):
    """The SFT half of ORPO's loss trains the chosen answer, not the prompt (TRL's own forward takes the prompt's
    tokens too); the odds ratio is TRL's, from the mean log-probability per answer token."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from trl.experimental.orpo import ORPOTrainer

    trainer, _, rows = orpo_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.model
    with torch.no_grad():
        torch.manual_seed(0)
        model.get_output_embeddings().weight.normal_(0, 1)  # the random model is near uniform: make tokens differ
        chosen_logps, rejected_logps, _, _, nll = trainer.concatenated_forward(model, batch)
        trl_nll = ORPOTrainer.concatenated_forward(trainer, model, batch)[4]
        answer_ce, all_ce, per_row = [], [], {"chosen": [], "rejected": []}
        for row in rows[:3]:
            for answer in ("chosen", "rejected"):
                ids, start = row["prompt_ids"] + row[f"{answer}_ids"], len(row["prompt_ids"]) - 1
                logits, target = model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:])
                ce = F.cross_entropy(logits, target, reduction="none")
                per_row[answer].append(-float(ce[start:].mean()))
                if answer == "chosen":
                    answer_ce += ce[start:].tolist()
                    all_ce += ce.tolist()
    assert float(nll) == pytest.approx(sum(answer_ce) / len(answer_ce), rel=1e-4)
    assert float(trl_nll) == pytest.approx(sum(all_ce) / len(all_ce), rel=1e-4)  # TRL's scores the prompt too
    assert abs(float(trl_nll) - float(nll)) > 0.05
    assert chosen_logps.tolist() == pytest.approx(per_row["chosen"], rel=1e-4)
    assert rejected_logps.tolist() == pytest.approx(per_row["rejected"], rel=1e-4)


def test_orpo_separates_chosen_from_rejected_without_a_reference_and_writes_the_adapter(tiny_base, tokenizer,
                                                                                         tmp_path):
    from PIL import Image

    from ftdeploy.report import _preference_paragraph
    from ftdeploy.results import TrainMetrics
    from ftdeploy.stages.train import fit, plot_loss

    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    metrics = fit(tiny_base, data, tmp_path / "adapter", _cfg("orpo"), tokenizer)

    _assert_adapter(tmp_path / "adapter")
    assert metrics.method == "orpo" and metrics.steps == 12
    history = metrics.preference_history
    assert len(history) == 12 and all(None not in (p.margin, p.accuracy, p.log_odds_ratio, p.nll_loss)
                                      for p in history), history
    margins, odds = _margins(metrics), [p.log_odds_ratio for p in history]
    assert margins[-1] > margins[0] + 0.3, margins  # beta x mean log-probability per token: a smaller scale than DPO's
    assert odds[-1] > odds[0] + 0.5, odds
    assert history[-1].nll_loss < history[0].nll_loss  # the SFT half learns the chosen answer
    assert metrics.final_margin == margins[-1] and metrics.final_accuracy is not None
    assert metrics.final_accuracy >= 0.99
    assert metrics.loss_history[-1].loss < metrics.loss_history[0].loss
    assert json.loads((tmp_path / "adapter" / "ftdeploy-train.json").read_text())["method"] == "orpo"
    assert TrainMetrics.from_dict(json.loads(json.dumps(metrics.to_dict()))) == metrics
    paragraph = _preference_paragraph(metrics)
    assert paragraph.startswith("Method `orpo`: ORPO (Odds Ratio Preference Optimization")
    assert f"final log odds ratio (chosen over rejected) {odds[-1]:.3f}, SFT loss on the chosen answers " \
           f"{history[-1].nll_loss:.4f}" in paragraph
    plot_loss(metrics.loss_history, tmp_path / "sft.png")
    plot_loss(metrics.loss_history, tmp_path / "orpo.png", history)
    assert Image.open(tmp_path / "orpo.png").size[0] > 1.5 * Image.open(tmp_path / "sft.png").size[0]


def test_building_the_orpo_trainer_prints_no_trl_experimental_warning_nor_map_bars(tiny_base, tokenizer, tmp_path):
    """trl.experimental warns on import that its APIs may change, and ORPOTrainer maps the dataset three times with a
    progress bar: a fresh process (the warning is printed once a process) building the trainer prints neither."""
    import subprocess
    import sys

    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    code = (
        "import sys\n"
        "from ftdeploy.config import load_config\n"
        "from ftdeploy.stages.train import build_trainer, load_rows\n"
        "from ftdeploy.tokenizer import load_tokenizer\n"
        "cfg = load_config(None, ['train.engine=hf', 'train.method=orpo'])\n"
        f"tok = load_tokenizer({str(tiny_base)!r})[0]\n"
        f"rows = load_rows(__import__('pathlib').Path({str(data)!r}), cfg)\n"
        f"trainer, _ = build_trainer({str(tiny_base)!r}, rows, cfg, tok, 'hf', {str(tmp_path / 'out')!r}, False)\n"
        "assert 'trl.experimental' in sys.modules and len(trainer.train_dataset) == len(rows)\n"
        "print('built')\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-3000:]
    assert "trl.experimental" not in proc.stderr and "Map" not in proc.stderr, proc.stderr[-3000:]


def test_orpo_trains_an_adapter_on_lm_head(tiny_base, tokenizer, tmp_path):
    """DPO refuses lm_head in lora.target_modules (TRL scores from lm_head's weight); ORPO scores from the logits,
    so the lm_head adapter trains."""
    from safetensors.torch import load_file

    from ftdeploy.stages.train import fit

    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    cfg = _cfg("orpo", "train.max_steps=3", "lora.target_modules=[q_proj,lm_head]")
    fit(tiny_base, data, tmp_path / "adapter", cfg, tokenizer)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    head = [t for name, t in tensors.items() if "lm_head" in name and "lora_B" in name]
    assert head and bool(head[0].abs().sum() > 0), sorted(tensors)


def test_dpo_resumes_from_its_checkpoint_with_the_whole_reward_history(tiny_base, tokenizer, tmp_path, monkeypatch):
    """A run killed after its step-4 checkpoint resumes there and reports the rewards of every step."""
    import transformers

    from ftdeploy.stages.train import fit

    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    ckpt = tmp_path / "checkpoints"
    cfg = _cfg("dpo", "train.max_steps=6", "train.save_steps=4")

    class Killed(Exception):
        pass

    real_save = transformers.Trainer._save_checkpoint

    def save_then_die(self, model, trial):
        real_save(self, model, trial)
        raise Killed

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        fit(tiny_base, data, tmp_path / "adapter", cfg, tokenizer, checkpoint_dir=ckpt)
    monkeypatch.undo()
    assert (ckpt / "checkpoint-4" / "adapter_model.safetensors").is_file()

    metrics = fit(tiny_base, data, tmp_path / "adapter", cfg, tokenizer, checkpoint_dir=ckpt)
    assert metrics.resumed_from == str(ckpt / "checkpoint-4") and metrics.steps == 6
    assert [p.step for p in metrics.preference_history] == [1, 2, 3, 4, 5, 6]
    assert [h.step for h in metrics.loss_history] == [1, 2, 3, 4, 5, 6]
    _assert_adapter(tmp_path / "adapter")


def test_dpo_on_two_gloo_processes_brings_rank_zeros_rewards_back(tiny_base, tokenizer, tmp_path, monkeypatch):
    """torchrun's workers rebuild the config from the launch spec (train.method among it) and rank 0's metrics come
    back through metrics.json with the preference fields."""
    from ftdeploy.distributed import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _write(tmp_path / "data", dpo_rows(tokenizer))
    metrics = train(tiny_base, data, tmp_path / "adapter", _cfg("dpo", "train.nproc=2", "train.max_steps=4"),
                    tokenizer)
    assert (metrics.method, metrics.world_size, metrics.steps) == ("dpo", 2, 4)
    assert [p.step for p in metrics.preference_history] == [1, 2, 3, 4]
    assert metrics.final_accuracy is not None and metrics.final_margin == _margins(metrics)[-1] > 0
    _assert_adapter(tmp_path / "adapter")
