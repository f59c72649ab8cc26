"""How training is spread over processes: pure arithmetic and checks on the config, no launching.

Both the trainer (stages/train.py, for the Trainer's strategy arguments) and the launcher
(distributed.py, which starts the processes and then runs the trainer in each) read this module;
it imports neither, so neither imports the other through it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .assets import asset
from .config import Config
from .errors import ConfigError

log = logging.getLogger(__name__)

BUNDLED_ZERO3 = "zero3.json"


def world_size(cfg: Config) -> int:
    return cfg.train.nproc * cfg.train.nnodes


def rank() -> int:
    """Global rank of this process (0 outside a launched worker)."""
    return int(os.environ.get("RANK", "0"))


def check_strategy(cfg: Config, engine: str, has_deepspeed: bool | None = None) -> None:
    """What each engine can do on several processes; a clear error for what it cannot."""
    if world_size(cfg) == 1:
        return
    strategy = cfg.train.strategy
    if engine == "unsloth" and strategy != "ddp":
        raise ConfigError(
            f"train.strategy={strategy}: Unsloth trains on several GPUs only as DDP (a whole 4-bit copy of the "
            "model per GPU); for a model that does not fit one GPU use --engine hf with strategy fsdp or deepspeed")
    if strategy == "deepspeed":
        if has_deepspeed is None:
            import importlib.util

            has_deepspeed = importlib.util.find_spec("deepspeed") is not None
        if not has_deepspeed:
            raise ConfigError("train.strategy=deepspeed: deepspeed is not installed (pip install deepspeed), "
                              "or use strategy fsdp, which needs nothing beyond torch")


def deepspeed_config_path(cfg: Config) -> str:
    if cfg.train.deepspeed_config:
        path = Path(cfg.train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: {path}: no such file")
        return str(path)
    return str(asset("strategies", BUNDLED_ZERO3))


def strategy_args(cfg: Config, on_cuda: bool) -> dict[str, Any]:
    """The Trainer arguments that select the multi-process strategy (empty for one process)."""
    if world_size(cfg) == 1:
        return {}
    args: dict[str, Any] = {"ddp_backend": "nccl" if on_cuda else "gloo"}
    if not on_cuda and cfg.train.strategy != "ddp":
        log.warning("train.strategy=%s on CPU: accelerate shards only on accelerators, so these processes run "
                    "as DDP (a full copy each)", cfg.train.strategy)
    if cfg.train.strategy == "ddp":
        # LoRA leaves most parameters frozen; DDP must not wait for gradients that never come.
        args["ddp_find_unused_parameters"] = False
    elif cfg.train.strategy == "fsdp":
        args["fsdp"] = "full_shard auto_wrap"
        # A full state dict, gathered to rank 0 when saving: with a sharded one, Trainer.save_model writes no
        # adapter at all, and the checkpoints would hold no adapter_model.safetensors to resume from.
        args["fsdp_config"] = {"use_orig_params": False, "cpu_ram_efficient_loading": True,
                               "sync_module_states": True, "activation_checkpointing": False,
                               "state_dict_type": "FULL_STATE_DICT"}
    elif cfg.train.strategy == "deepspeed":
        args["deepspeed"] = deepspeed_config_path(cfg)
    return args
