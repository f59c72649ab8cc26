"""GRPO (train.method grpo) for the train stage: TRL's GRPOTrainer on the same PEFT model as SFT (the same LoRA, the
same engine loaders, the same training arguments), the grpo section's settings and reward functions, the data stage's
prompts (data/grpo.py). Generation runs through transformers (model.generate), on the CPU too: no vLLM.

What TRL 1.16 asks of it:
  * the batch: each prompt is answered grpo.num_generations times, and the global batch (per-device batch x processes
    x gradient accumulation: GRPOConfig's generation_batch_size) counts answers, a whole number of groups
    (`check_grpo`);
  * the prompts: conversational rows ({"prompt": messages}), rendered with the tokenizer's chat template and the
    generation prompt; TRL has no prompt length limit (the data stage refuses a prompt of data.max_seq_length tokens or
    more); each answer is at most grpo.max_completion_length tokens;
  * the rewards: callables taking prompts=, completions=, completion_ids= and every other dataset column; the data
    stage's columns travel as one JSON column, which rewards.Reward unpacks and checks;
  * the reference for grpo.beta > 0: with a PEFT model TRL copies the adapter as a "ref" adapter; the adapter is
    fresh (its B is zero), so the reference is the base, which TRL computes with the adapter disabled once "ref" is
    gone: it is deleted, and is neither kept in memory nor saved beside the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..results import RewardPoint
from ..rewards import load_rewards
from ..strategy import world_size
from ..train_auto import base_batch

# trainer_kwargs' SFTConfig arguments that GRPOConfig does not have: GRPO bounds the answers it samples
# (max_completion_length) and TRL leaves the prompts as they are.
_NOT_GRPO_ARGS = ("dataset_kwargs", "packing", "max_length")


def grpo_kwargs(cfg: Config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """GRPOConfig's kwargs: the training arguments SFT is given (trainer_kwargs: steps, batch, lr, schedule,
    optimizer, precision, checkpoints, ...) with the grpo section's."""
    out = {k: v for k, v in kwargs.items() if k not in _NOT_GRPO_ARGS}
    g = cfg.grpo
    out.update(num_generations=g.num_generations, max_completion_length=g.max_completion_length,
               temperature=g.temperature, beta=g.beta, log_completions=False)
    return out


def check_grpo(cfg: Config) -> None:
    """What GRPOTrainer would refuse once the model is loaded, refused before: a global batch that is not a whole
    number of groups, and reward functions that do not load (ConfigError naming the keys)."""
    from ..config import split_global_batch

    world = world_size(cfg)
    batch, accumulation = split_global_batch(base_batch(cfg.train.batch_size), cfg.train.gradient_accumulation, world,
                                             cfg.train.keep_global_batch)
    answers, group = batch * accumulation * world, cfg.grpo.num_generations
    if answers % group:
        shape = f"{batch} x {accumulation} over {world} processes" if world > 1 else \
            f"train.batch_size {batch} x train.gradient_accumulation {accumulation}"
        fit = (answers // group + 1) * group
        raise ConfigError(
            f"train.method grpo: the global batch ({shape}) is {answers} answers, which is not a multiple of "
            f"grpo.num_generations {group}: GRPO answers each prompt grpo.num_generations times and scores the answers "
            f"against each other, so a batch holds whole groups (TRL's GRPOTrainer). Make train.batch_size x "
            f"train.gradient_accumulation a multiple of {group} (e.g. {fit}), or set grpo.num_generations to a "
            f"divisor of {answers} (2 or more)")
    load_rewards(cfg.grpo.rewards)


def grpo_trainer(model: Any, rows: list[dict[str, Any]], cfg: Config, tokenizer: Any, kwargs: dict[str, Any],
                 callbacks: Sequence[Any]) -> Any:
    """TRL's GRPOTrainer on the prompts (data.load_grpo_rows) with the grpo section's reward functions.

    trl is imported here, after the engine: under Unsloth, trl.GRPOTrainer is the class Unsloth patched as it was
    imported."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(model=model, reward_funcs=load_rewards(cfg.grpo.rewards), args=GRPOConfig(**kwargs),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=list(callbacks))
    if "ref" in getattr(model, "peft_config", {}):  # grpo.beta > 0: TRL's copy of the fresh adapter is the base
        model.delete_adapter("ref")
    return trainer


def reward_point(step: int, logs: dict[str, Any]) -> RewardPoint | None:
    """The reward figures of one GRPOTrainer log entry (None: an entry without them): `reward`, `reward_std`,
    `rewards/<function>/mean` and, with beta > 0, `kl`; TRL logs a mean no answer had as None."""
    if "reward" not in logs:
        return None

    def number(key: str) -> float | None:
        value = logs.get(key)
        return None if value is None else float(value)

    functions = {key[len("rewards/"):-len("/mean")]: number(key) for key in logs
                 if key.startswith("rewards/") and key.endswith("/mean")}
    return RewardPoint(step=step, reward=number("reward"), reward_std=number("reward_std"), functions=functions,
                       kl=number("kl"))


def reward_history_from(ckpt: Path) -> list[RewardPoint]:
    """The reward points logged before a checkpoint, so a resumed run reports the whole curve."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    points = [reward_point(e["step"], e) for e in state.get("log_history", []) if "loss" in e]
    return [p for p in points if p is not None]


def plot_rewards(ax: Any, points: Sequence[RewardPoint]) -> None:
    """The mean reward per step with its standard deviation as a band, and each reward function's mean."""
    steps = [p.step for p in points if p.reward is not None]
    means = [p.reward for p in points if p.reward is not None]
    handles = ax.plot(steps, means, "-o", markersize=2.5, label="mean reward")
    band = [(p.step, p.reward, p.reward_std) for p in points if p.reward is not None and p.reward_std is not None]
    if band:
        ax.fill_between([s for s, _, _ in band], [m - d for _, m, d in band], [m + d for _, m, d in band], alpha=0.2)
    names = list(dict.fromkeys(name for p in points for name in p.functions))
    for name in names:
        xy = [(p.step, p.functions[name]) for p in points if p.functions.get(name) is not None]
        if xy and len(names) > 1:
            handles += ax.plot([s for s, _ in xy], [v for _, v in xy], ":", markersize=2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (summed over the functions)")
    ax.set_title("rewards of the sampled answers")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="best", fontsize="small")
