"""Experiment trackers (train.report_to): transformers' own integrations, switched on through
TrainingArguments.report_to, for TensorBoard, Weights & Biases and MLflow. What ftdeploy adds around them: the
package each needs, checked before training starts (transformers would only fail once the model had loaded); where
TensorBoard writes (the run directory); and the link to the tracker's run, which the report shows."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .optional import MissingDependencyError

NONE = "none"
# train.report_to -> (the module transformers' integration imports, which is also the package to install; its name)
TRACKERS = {"tensorboard": ("tensorboard", "TensorBoard"), "wandb": ("wandb", "Weights & Biases"),
            "mlflow": ("mlflow", "MLflow")}
TENSORBOARD_DIR = "tensorboard"  # in the run directory, a folder per training below it (the train fingerprint)
# transformers 5 reads TensorBoard's folder from this variable only (TrainingArguments.logging_dir is gone).
TENSORBOARD_ENV = "TENSORBOARD_LOGGING_DIR"


def check_tracker(report_to: str) -> None:
    """The tracker's package is importable here, or an error that names the option and the package to install."""
    if report_to == NONE:
        return
    module = TRACKERS[report_to][0]
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(module, f"train.report_to={report_to}")


def report_to_arg(report_to: str) -> list[str]:
    """TrainingArguments.report_to: the one integration asked for, or none (never transformers' "all")."""
    return [] if report_to == NONE else [report_to]


@contextlib.contextmanager
def tracker_environment(report_to: str, run_dir: Path, training: str) -> Iterator[None]:
    """The environment the integration reads while training runs (torchrun's workers inherit it), restored after:
    TensorBoard writes to run_dir/tensorboard/<training> (a retraining with other settings gets its own folder, so
    `tensorboard --logdir run_dir/tensorboard` shows each as a run; a resumed training continues its own); wandb
    keeps its local files in the run directory. A value the user set in the environment wins."""
    wanted: dict[str, str] = {}
    if report_to == "tensorboard":
        wanted[TENSORBOARD_ENV] = str(run_dir / TENSORBOARD_DIR / training)
    elif report_to == "wandb":
        wanted["WANDB_DIR"] = str(run_dir)
    saved = {key: os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, before in saved.items():
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


def tracker_run(report_to: str, output_dir: str) -> str | None:
    """Where the tracker's run is, once its integration has started it: TensorBoard's event folder; the wandb run's
    URL (else its project); the MLflow run's URL on a tracking server (else the run id at its tracking URI; else
    the experiment's name)."""
    if report_to == "tensorboard":
        return os.path.abspath(os.environ.get(TENSORBOARD_ENV) or os.path.join(output_dir, "runs"))
    if report_to == "wandb":
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None)
        url = getattr(run, "url", None)
        return str(url) if url else f"project {os.environ.get('WANDB_PROJECT', 'huggingface')}"
    if report_to == "mlflow":
        return _mlflow_run()
    return None


def _mlflow_run() -> str | None:
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    if mlflow is None or active is None:
        return f"experiment {os.environ.get('MLFLOW_EXPERIMENT_NAME', 'Default')}"
    uri = str(mlflow.get_tracking_uri())
    info = active.info
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    return f"run {info.run_id} at {uri}"


def make_tracker_callback(report_to: str) -> Any:
    """A TrainerCallback that notes where the tracker's run is as training begins: it comes after the integration's
    own callback (transformers puts the report_to callbacks first), which has started the run by then."""
    from transformers import TrainerCallback

    class TrackerLink(TrainerCallback):
        link: str | None = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.is_world_process_zero:
                self.link = tracker_run(report_to, args.output_dir)

    return TrackerLink()
