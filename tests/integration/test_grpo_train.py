"""GRPO training (train.method grpo) through the data stage and the train stage's fit, for real on the CPU: a tiny
random-weight Llama with a ChatML template whose end of turn (<|im_end|>) is not its EOS (<|endoftext|>), the prompts
prepared by prepare_data, the reward functions loaded from a file as a user writes them. The answers of a random model
are noise: what is checked is the plumbing (what the rewards are called with, what is recorded, the errors), not what
it learns. What it learns is checked end to end on the embedded default in tests/e2e/test_grpo.py.
"""

import json
import textwrap

import pytest
from conftest import build_tiny_model_dir

pytestmark = pytest.mark.slow

PROMPTS = ["What port does the Zephyr service use?", "Which port is the Zephyr service on?",
           "Tell me the Zephyr service port.", "hello world", "What port does the service use?",
           "Zephyr service port?", "What port?", "Which service uses port 7341?"]

REWARDS = textwrap.dedent('''
    import json, os

    def record(prompts, completions, completion_ids, answer, level, trainer_state, **kwargs):
        """Writes what it was called with to $CALLS (a JSON line a call) and rewards longer answers."""
        with open(os.environ["CALLS"], "a") as fh:
            fh.write(json.dumps({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                                 "answer": answer, "level": level, "kwargs": sorted(kwargs),
                                 "step": trainer_state.global_step}) + "\\n")
        return [float(len(c[0]["content"])) for c in completions]

    def sevens(completions, **kwargs):
        return [float(c[0]["content"].count("7")) if c[0]["content"] else None for c in completions]

    def raises(completions, **kwargs):
        return [1.0 / 0 for c in completions]

    def too_few(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    def not_a_list(completions, **kwargs):
        return 1.0
''')


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A Llama of about 40,000 parameters with a ChatML tokenizer whose EOS is <|endoftext|>, not <|im_end|>."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base", eos="<|endoftext|>", pad="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from ftdeploy.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base)


@pytest.fixture
def rewards_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))
    return path


def _cfg(rewards, *extra):
    from ftdeploy.config import load_config

    return load_config(None, ["train.engine=hf", "train.method=grpo", "train.max_steps=4", "train.warmup_steps=0",
                              "train.batch_size=4", "train.gradient_accumulation=1", "train.learning_rate=0.02",
                              "train.lr_scheduler=constant", "train.save_steps=0", "grpo.num_generations=2",
                              "grpo.max_completion_length=8", "data.max_seq_length=128",
                              f"grpo.rewards={','.join(rewards)}", *extra])


def _prepare(tmp_path, tokenizer, cfg):
    """The prompts through the real data stage: a TRL prompt-only row each, with an `answer` and a `level` column."""
    from ftdeploy.data import prepare_data

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "answer": f"port {i}", "level": i}) + "\n"
                           for i, p in enumerate(PROMPTS)))
    cfg.data.train, cfg.data.eval_split = str(src), 0.0
    tok, mapping = tokenizer
    prepare_data(cfg.data, tok, mapping, tmp_path / "data", cfg.train.seed, "grpo")
    return tmp_path / "data"


def test_the_rewards_get_the_prompts_completions_and_every_column_of_their_rows(tiny_base, tokenizer, rewards_file,
                                                                                  tmp_path):
    from ftdeploy.stages.train import fit

    cfg = _cfg([f"{rewards_file}:record", f"{rewards_file}:sevens"])
    data = _prepare(tmp_path, tokenizer, cfg)
    metrics = fit(tiny_base, data, tmp_path / "adapter", cfg, tokenizer[0])

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 4 and [c["step"] for c in calls] == [0, 1, 2, 3]  # one generation batch a step
    by_prompt = {p: i for i, p in enumerate(PROMPTS)}
    for call in calls:
        assert len(call["prompts"]) == len(call["completions"]) == len(call["completion_ids"]) == 4
        # each prompt twice in a row (num_generations 2), with its own row's columns
        assert call["prompts"][0] == call["prompts"][1] and call["prompts"][2] == call["prompts"][3]
        for prompt, answer, level in zip(call["prompts"], call["answer"], call["level"], strict=True):
            assert prompt == [{"role": "user", "content": prompt[-1]["content"]}]
            assert (answer, level) == (f"port {by_prompt[prompt[-1]['content']]}", by_prompt[prompt[-1]['content']])
        for completion, ids in zip(call["completions"], call["completion_ids"], strict=True):
            assert completion[0]["role"] == "assistant" and len(completion) == 1
            assert 1 <= len(ids) <= 8 and all(isinstance(i, int) for i in ids)
        # TRL's hooks, and nothing of ftdeploy's own packing (the row column, the source)
        assert call["kwargs"] == ["log_extra", "log_metric"]

    # The reward history: a point a step, each function's mean under its name, the mean of their sums.
    points = metrics.reward_history
    assert metrics.method == "grpo" and metrics.steps == 4 and [p.step for p in points] == [1, 2, 3, 4]
    assert all(set(p.functions) == {"record", "sevens"} for p in points)
    lengths = [sum(len(c[0]["content"]) for c in call["completions"]) / 4 for call in calls]
    assert [p.functions["record"] for p in points] == pytest.approx(lengths)
    assert all(p.kl is None and p.reward is not None and p.reward_std is not None for p in points)  # beta 0: no KL
    assert metrics.final_reward == points[-1].reward and metrics.dataset_trained_tokens == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_with_beta_the_kl_is_logged_and_only_the_trained_adapter_is_saved(tiny_base, tokenizer, rewards_file, tmp_path):
    """TRL copies a PEFT model's adapter as a "ref" adapter when beta > 0; the fresh adapter's copy is the base, so it
    is dropped, and the saved adapter is the trained one alone."""
    from PIL import Image

    from ftdeploy.results import TrainMetrics, TrainResult
    from ftdeploy.stages.train import fit, plot_loss

    cfg = _cfg([f"{rewards_file}:sevens"], "grpo.beta=0.1")
    data = _prepare(tmp_path, tokenizer, cfg)
    metrics = fit(tiny_base, data, tmp_path / "adapter", cfg, tokenizer[0])

    assert all(p.kl is not None for p in metrics.reward_history) and metrics.reward_history[0].kl == pytest.approx(0.0)
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "ref" not in saved and "adapter_model.safetensors" in saved
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert json.loads((tmp_path / "adapter" / "ftdeploy-train.json").read_text())["method"] == "grpo"
    # The manifest's round trip keeps the rewards; the plot gains the rewards panel.
    assert TrainMetrics.from_dict(json.loads(json.dumps(metrics.to_dict()))) == metrics
    assert TrainResult.from_dict(metrics.to_dict()).final_reward == metrics.final_reward
    plot_loss(metrics.loss_history, tmp_path / "sft.png")
    plot_loss(metrics.loss_history, tmp_path / "grpo.png", rewards=metrics.reward_history)
    assert Image.open(tmp_path / "grpo.png").size[0] > 1.5 * Image.open(tmp_path / "sft.png").size[0]


@pytest.mark.parametrize(("name", "said"), [
    ("raises", "raised ZeroDivisionError: float division by zero (at my_rewards.py:16)"),
    ("too_few", "returned 3 rewards for 4 completions"),
    ("not_a_list", "returned float 1.0, not a list"),
])
def test_a_reward_that_fails_is_an_error_naming_it_and_the_rows(tiny_base, tokenizer, rewards_file, tmp_path, name,
                                                                said):
    from ftdeploy.errors import RewardError
    from ftdeploy.stages.train import fit

    cfg = _cfg([f"{rewards_file}:sevens", f"{rewards_file}:{name}"])
    data = _prepare(tmp_path, tokenizer, cfg)
    with pytest.raises(RewardError) as err:
        fit(tiny_base, data, tmp_path / "adapter", cfg, tokenizer[0])
    message = str(err.value)
    assert f"reward function {name} ({rewards_file}:{name})" in message and said in message, message
    assert "scoring the completions of " in message and "prompts.jsonl:" in message, message


def test_a_global_batch_that_is_not_whole_groups_is_refused_before_the_model_loads(tiny_base, tokenizer,
                                                                                    rewards_file, tmp_path):
    from ftdeploy.errors import ConfigError
    from ftdeploy.stages.train import check_method, fit

    cfg = _cfg([f"{rewards_file}:sevens"], "train.batch_size=3", "grpo.num_generations=2")
    with pytest.raises(ConfigError) as err:
        check_method(cfg)
    message = str(err.value)
    for key in ("train.batch_size 3", "train.gradient_accumulation 1", "grpo.num_generations 2", "(e.g. 4)"):
        assert key in message, message
    with pytest.raises(ConfigError, match="grpo.num_generations"):  # fit checks before it loads anything
        fit(tmp_path / "no-such-base", tmp_path / "no-data", tmp_path / "adapter", cfg, tokenizer[0])
    check_method(_cfg([f"{rewards_file}:sevens"], "train.batch_size=3", "train.gradient_accumulation=2",
                      "grpo.num_generations=3"))  # 6 answers: two groups of 3
    with pytest.raises(ConfigError, match="grpo.rewards: .*has no 'nope'"):  # the rewards load before the model
        check_method(_cfg([f"{rewards_file}:nope"]))
