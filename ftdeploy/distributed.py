"""Training on several processes, handed to torch's launcher (torchrun) rather than grown here.

The train stage of the parent `ftdeploy` process writes a launch spec (the config, the base, the
prepared data and where the adapter goes) and runs

    python -m torch.distributed.run --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]
        -m ftdeploy.distributed SPEC

Each worker rebuilds the config from the spec and runs the same training loop as one process; the
Trainer (through accelerate) sets up DDP, FSDP or DeepSpeed from the environment torchrun gives it.
Only global rank 0 writes the adapter, the checkpoints and the metrics; the parent then goes on with
merge, export and registration as after a one-process run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .errors import ConfigError, FtdeployError

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
    from importlib import resources

    return str(resources.files("ftdeploy.strategies").joinpath(BUNDLED_ZERO3))


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


def launch_command(cfg: Config, spec_path: Path) -> list[str]:
    t = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc}"]
    if t.nnodes == 1:
        cmd.append("--standalone")  # a free rendezvous port on loopback: runs side by side never collide
    else:
        cmd += [f"--nnodes={t.nnodes}", f"--node-rank={t.node_rank}", f"--master-addr={t.master_addr}",
                f"--master-port={t.master_port}"]
    return cmd + ["-m", "ftdeploy.distributed", str(spec_path)]


def launch(cfg: Config, base: Path | str, data_dir: Path, out_dir: Path, checkpoint_dir: Path | None,
           resume: bool, work_dir: Path) -> dict[str, Any]:
    """Run training on `world_size(cfg)` processes; return rank 0's metrics (on node 0)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "launch.json"
    metrics_path = work_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    spec = {"config": cfg.to_dict(), "base": str(base), "data_dir": str(data_dir), "out_dir": str(out_dir),
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None, "resume": resume,
            "metrics": str(metrics_path)}
    spec_path.write_text(json.dumps(spec, indent=2))
    cmd = launch_command(cfg, spec_path)
    env = {**os.environ}
    if not env.get("OMP_NUM_THREADS"):
        # torchrun would set 1; give each process its share of the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.train.nproc))
    log.info("launching %d training processes (%d per node, node %d of %d): %s", world_size(cfg), cfg.train.nproc,
             cfg.train.node_rank, cfg.train.nnodes, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    try:
        spec_path.unlink()
    except OSError:
        pass
    if proc.returncode != 0:
        raise FtdeployError(f"distributed training failed: {' '.join(cmd[:3])} exited with code {proc.returncode} "
                            "(each worker's error is above, prefixed with its rank)")
    if cfg.train.node_rank != 0:
        return {"world_size": world_size(cfg), "node_rank": cfg.train.node_rank}
    if not metrics_path.is_file():
        raise FtdeployError(f"distributed training ended without rank 0's metrics ({metrics_path})")
    metrics = json.loads(metrics_path.read_text())
    metrics_path.unlink()
    return metrics


def worker_main(spec_path: str) -> int:
    """Entry point of one launched process."""
    from .stages.train import fit, import_engine_first
    from .tokenizer import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    logging.basicConfig(level=logging.WARNING if rank() else logging.INFO,
                        format=f"[rank {rank()}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import_engine_first(cfg)  # before the tokenizer brings in transformers
    tokenizer, _ = load_tokenizer(spec["base"], cfg.trust_remote_code)
    checkpoint_dir = Path(spec["checkpoint_dir"]) if spec["checkpoint_dir"] else None
    metrics = fit(spec["base"], Path(spec["data_dir"]), Path(spec["out_dir"]), cfg, tokenizer, checkpoint_dir,
                  spec["resume"])
    if rank() == 0:
        tmp = Path(spec["metrics"] + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, spec["metrics"])
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
