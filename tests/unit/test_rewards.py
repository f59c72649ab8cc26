"""GRPO's reward functions (ftdeploy/rewards.py): loading `module:function` and `path/to/file.py:function` (each
failure a ConfigError naming the key and the spec), calling one as TRL's GRPOTrainer does (the data stage's rows
unpacked into keyword columns) with what it returns checked (a RewardError naming it and the rows), and the bundled
arithmetic example on hand-written completions."""

import json
import sys

import pytest

from ftdeploy.errors import ConfigError, RewardError
from ftdeploy.rewards import (
    EXAMPLE_SPECS,
    ROW_COLUMN,
    Reward,
    exact_answer,
    format_reward,
    load_reward,
    load_rewards,
    row_columns,
)


def said(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's on the Python path, and a file of rewards beside it."""
    (tmp_path / "team_rewards.py").write_text(
        "def brevity(completions, **kw):\n    return [-len(c[0]['content']) / 100 for c in completions]\n"
        "THRESHOLD = 3\n")
    (tmp_path / "rewards_dir").mkdir()
    (tmp_path / "rewards_dir" / "mine.py").write_text(
        "def length(completions, **kw):\n    return [len(c[0]['content']) for c in completions]\n"
        "def also(completions, **kw):\n    return [0.0 for c in completions]\n"
        "class Scorer:\n    def __call__(self, completions, **kw):\n        return [1.0] * len(completions)\n"
        "scorer = Scorer()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("team_rewards", None)


def test_the_default_rewards_are_the_bundled_example():
    from ftdeploy.config import load_config
    from ftdeploy.config_models import EXAMPLE_REWARDS

    assert tuple(load_config(None, []).grpo.rewards) == EXAMPLE_REWARDS == EXAMPLE_SPECS
    assert [r.__name__ for r in load_rewards(EXAMPLE_SPECS)] == ["format_reward", "exact_answer"]


def test_a_module_function_and_a_file_function_load(user_module):
    module = load_reward("team_rewards:brevity")
    assert module.__name__ == "brevity" and module(prompts=[[]], completions=[said("abcd")]) == [-0.04]
    relative = load_reward("rewards_dir/mine.py:length")  # read from the working directory
    absolute = load_reward(f"{user_module / 'rewards_dir' / 'mine.py'}:also")
    assert relative(prompts=[[]], completions=[said("abc")]) == [3.0] and absolute.__name__ == "also"
    # one file, imported once, under a private name (not `mine`, which could shadow a module of that name)
    assert relative.fn.__module__ == absolute.fn.__module__ and relative.fn.__module__.startswith("_ftdeploy_reward_")
    assert "mine" not in sys.modules
    instance = load_reward("rewards_dir/mine.py:scorer")  # a callable instance is a reward; TRL names it its class
    assert instance.__name__ == "Scorer" and instance(prompts=[[]], completions=[said("x")]) == [1.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("team_rewards", "'team_rewards' is not module:function or path/to/file.py:function"),
    ("team_rewards:", "is not module:function"),
    ("team_rewards:missing", "'team_rewards:missing': team_rewards has no 'missing'; its functions: brevity"),
    ("team_rewards:THRESHOLD", "'team_rewards:THRESHOLD' is a int, not a function"),
    ("rewards_dir/mine.py:Scorer", "is a class (give a function, or an instance of the class)"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("rewards_dir/nope.py:f", "no such file"),
    ("rewards_dir/mine.py:nope", "has no 'nope'; its functions: also, length"),
])
def test_a_reward_that_does_not_load_is_a_config_error_naming_it(user_module, spec, message):
    with pytest.raises(ConfigError) as err:
        load_rewards([spec])
    assert str(err.value).startswith("grpo.rewards: ") and message in str(err.value), str(err.value)


def test_a_file_that_fails_to_import_names_its_error_and_line(user_module):
    (user_module / "broken.py").write_text("x = 1\nimport helper_that_is_not_installed\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed: ModuleNotFoundError: No module named "
                                          r"'helper_that_is_not_installed' \(at broken.py:2\)"):
        load_reward("broken.py:f")
    (user_module / "uses_missing.py").write_text("import helper_that_is_not_installed\n")
    with pytest.raises(ConfigError, match="importing uses_missing failed: No module named 'helper_that_is"):
        load_reward("uses_missing:f")


def test_two_rewards_of_one_name_and_none_at_all_are_refused(user_module):
    (user_module / "other.py").write_text("def length(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match="two reward functions are named length"):
        load_rewards(["rewards_dir/mine.py:length", "other.py:length"])
    with pytest.raises(ConfigError, match="grpo.rewards: no reward functions"):
        load_rewards([])


def test_the_rows_reach_the_function_as_keyword_columns():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, level, trainer_state, log_extra, log_metric, **kw):
        seen.update(answer=answer, level=level, ids=completion_ids, state=trainer_state, rest=sorted(kw))
        log_extra("note", ["x"] * len(completions))  # verify's hooks do nothing, and take TRL's arguments
        log_metric("m", 1.0)
        return [1, 2.5, None]

    rows = [{"source": "d.jsonl:1", "columns": {"answer": 4, "level": "easy"}},
            {"source": "d.jsonl:1", "columns": {"answer": 4, "level": "easy"}},
            {"source": "d.jsonl:2", "columns": {"answer": 9}}]
    reward = Reward(spy, "here:spy")
    out = reward(prompts=[[]] * 3, completions=[said("a")] * 3, completion_ids=[[1], [2], [3]],
                 **{ROW_COLUMN: [json.dumps(r) for r in rows]}, trainer_state="state")
    assert out == [1.0, 2.5, None]  # ints become floats; None stays "not applicable"
    assert seen == {"answer": [4, 4, 9], "level": ["easy", "easy", None], "ids": [[1], [2], [3]], "state": "state",
                    "rest": []}
    assert row_columns([]) == {}


@pytest.mark.parametrize(("returned", "message"), [
    ("boom", "reward function bad (here:bad) raised ValueError: nope (at test_rewards.py:"),
    ([1.0], "returned 1 rewards for 2 completions"),
    ({"a": 1}, "returned dict {'a': 1}, not a list"),
    ([1.0, "high"], "returned str 'high' as reward 1: each reward is a number, or None"),
    ([1.0, float("inf")], "returned inf as reward 1: a reward must be finite"),
])
def test_what_a_reward_returns_is_checked_and_a_failure_names_it_and_its_rows(returned, message):
    def bad(completions, **kw):
        if returned == "boom":
            raise ValueError("nope")
        return returned

    rows = [{"source": "d.jsonl:3", "columns": {}}, {"source": "d.jsonl:3", "columns": {}}]
    with pytest.raises(RewardError) as err:
        Reward(bad, "here:bad").score([[]] * 2, [said("a"), said("b")], rows)
    assert message in str(err.value) and str(err.value).endswith("scoring the completions of d.jsonl:3"), str(err.value)


def test_numpy_like_and_async_rewards_are_taken():
    class Array(list):
        def tolist(self):
            return list(self)

    async def later(completions, **kw):
        return [0.5] * len(completions)

    assert Reward(lambda completions, **kw: Array([1, float("nan")]), "x:y").score([[]] * 2, [said("")] * 2) == \
        [1.0, None]
    assert Reward(later, "x:later").score([[]], [said("")]) == [0.5]


def test_format_reward_wants_a_final_answer_line():
    completions = [said("3 + 4 = 7.\nAnswer: 7"), said("answer: -12.5."), said("Answer: 7\nHope that helps!"),
                   said("The answer is 7."), said(""), "Answer: 1,024", said("Answer: seven")]
    assert format_reward(completions) == [1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0]


def test_exact_answer_compares_the_answer_line_with_the_answer_column():
    completions = [said("4 + 3 is 7.\nAnswer: 7"), said("Answer: 8"), said("It is 7."), said("Answer: 1,024"),
                   said("Answer: 2.50"), said("Answer: 7"), said("Answer: 7"), said("Answer: 3")]
    answers = [7, 7, 7, "1024", 2.5, "The total is 7 apples.\nAnswer: 7", None, "Three, so 3 in all"]
    assert exact_answer(completions, answer=answers) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, None, 1.0]
    assert exact_answer([said("Answer: 1")]) == [None]  # a row with no answer column: not applicable


def test_the_demo_rows_carry_answers_the_example_scores():
    from ftdeploy.assets import asset

    for name in ("arithmetic.jsonl", "arithmetic_eval.jsonl"):
        rows = [json.loads(line) for line in asset("demo", name).read_text().splitlines()]
        assert len(rows) == (40 if name == "arithmetic.jsonl" else 6)
        for row in rows:
            assert row["prompt"][-1]["role"] == "user" and "`Answer: <number>`" in row["prompt"][-1]["content"]
            right = said(f"Let me see.\nAnswer: {row['answer']}")
            assert format_reward([right]) == [1.0] and exact_answer([right], answer=[row["answer"]]) == [1.0]
