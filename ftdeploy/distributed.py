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
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .errors import FtdeployError
from .results import TrainMetrics
from .runs import atomic_path
from .stages.train import check_method, fit, import_engine_first, select_engine
from .strategy import check_strategy, rank, world_size

log = logging.getLogger(__name__)

def train(base: Path | str, data_dir: Path, adapter_dir: Path, cfg: Config, tokenizer: Any,
          checkpoint_dir: Path | None = None, resume: bool = True) -> TrainMetrics:
    """Train an adapter into `adapter_dir` (atomically); return metrics (engine, steps, losses, tokens/s).

    With `checkpoint_dir`, a checkpoint is saved every `train.save_steps` steps and, when `resume`,
    training continues from the newest usable one (same data order, optimizer and RNG state).
    With train.nproc x train.nnodes > 1, the work is handed to torch's launcher (`launch`); each worker trains with
    the config's train.method, and rank 0's metrics (a preference run's rewards among them) come back through
    metrics.json (TrainMetrics.to_dict / from_dict)."""
    from .data.image_writer import is_vision_data

    if is_vision_data(data_dir):  # a vision base's image chats: its own trainer, one process (train_vision.py)
        from .stages.train_vision import fit_vision

        with atomic_path(adapter_dir) as tmp:
            return fit_vision(base, data_dir, tmp, cfg, checkpoint_dir, resume)
    check_strategy(cfg, select_engine(cfg.train.engine))
    check_method(cfg)  # a KTO batch too small per process: refused before torchrun starts
    if world_size(cfg) == 1:
        with atomic_path(adapter_dir) as tmp:
            return fit(base, data_dir, tmp, cfg, tokenizer, checkpoint_dir, resume)
    work = adapter_dir.parent / ".launch"
    try:
        if cfg.train.node_rank != 0:  # this node computes; node 0 writes the adapter
            return launch(cfg, base, data_dir, work / "adapter-unused", checkpoint_dir, resume, work)
        with atomic_path(adapter_dir) as tmp:
            return launch(cfg, base, data_dir, tmp, checkpoint_dir, resume, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
           resume: bool, work_dir: Path) -> TrainMetrics:
    """Run training on `world_size(cfg)` processes; return rank 0's metrics (on node 0; on another, only the
    world size)."""
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
        return TrainMetrics(world_size=world_size(cfg))
    if not metrics_path.is_file():
        raise FtdeployError(f"distributed training ended without rank 0's metrics ({metrics_path})")
    metrics = TrainMetrics.from_dict(json.loads(metrics_path.read_text()))
    metrics_path.unlink()
    return metrics


def worker_main(spec_path: str) -> int:
    """Entry point of one launched process."""
    from .quiet import quiet_libraries
    from .tokenizer import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    logging.basicConfig(level=logging.WARNING if rank() else logging.INFO,
                        format=f"[rank {rank()}] %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    import_engine_first(cfg)  # the engine-first rule (stages/train.py): before the tokenizer imports transformers
    tokenizer, _ = load_tokenizer(spec["base"], cfg.trust_remote_code, cfg.data.chat_template)
    checkpoint_dir = Path(spec["checkpoint_dir"]) if spec["checkpoint_dir"] else None
    metrics = fit(spec["base"], Path(spec["data_dir"]), Path(spec["out_dir"]), cfg, tokenizer, checkpoint_dir,
                  spec["resume"])
    if rank() == 0:
        tmp = Path(spec["metrics"] + ".tmp")
        tmp.write_text(json.dumps(metrics.to_dict(), indent=2))
        os.replace(tmp, spec["metrics"])
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
