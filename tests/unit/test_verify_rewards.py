"""verify for GRPO runs (stages/verify_rewards.py): the reward functions, called as in training, on greedy answers to
the eval prompts from the served model (a scripted Ollama client), the merged model and the base (a tiny real
checkpoint through transformers); each function's mean and GRPO's summed reward per model."""

import pytest

from ftdeploy.data import Record
from ftdeploy.errors import RewardError
from ftdeploy.rewards import load_rewards
from ftdeploy.stages.verify_rewards import score_replies

PROMPTS = ["What is 3 + 4? End with `Answer: <number>`.", "What is 2 + 3? End with `Answer: <number>`."]
EXAMPLES = [Record("eval.jsonl:1", messages=[{"role": "user", "content": PROMPTS[0]}], columns={"answer": 7}),
            Record("eval.jsonl:2", messages=[{"role": "user", "content": PROMPTS[1]}], columns={"answer": 5})]


def test_score_replies_sums_as_grpo_does_and_a_failing_reward_names_the_eval_row(tmp_path):
    (tmp_path / "r.py").write_text(
        "def only_first(completions, answer, **kw):\n    return [1.0 if a == 7 else None for a in answer]\n"
        "def ids(completions, completion_ids, **kw):\n    return [float(len(i)) for i in completion_ids]\n"
        "def broken(completions, answer, **kw):\n    return [1 / (a - 5) for a in answer]\n")
    rewards = load_rewards([f"{tmp_path / 'r.py'}:only_first", f"{tmp_path / 'r.py'}:ids"])
    check = score_replies(EXAMPLES, {"served": ["a", "bcd"]}, rewards, tokens=lambda text: list(range(len(text))))
    assert check.items[0].rewards == {"only_first": 1.0, "ids": 1.0} and check.items[1].rewards["only_first"] is None
    assert check.served == pytest.approx((2.0 + 3.0) / 2) and check.merged is None and check.base is None
    assert {f.name: f.scored for f in check.functions} == {"only_first": 1, "ids": 2}
    with pytest.raises(RewardError, match=r"reward function broken .* raised ZeroDivisionError: division by zero .*"
                                          r"scoring the completions of eval.jsonl:1, eval.jsonl:2"):
        score_replies(EXAMPLES, {"served": ["a", "b"]}, load_rewards([f"{tmp_path / 'r.py'}:broken"]))
