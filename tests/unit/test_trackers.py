"""train.report_to: the tracker's package checked before anything runs, transformers' integration asked for by
name, TensorBoard's folder in the run, the setting outside the train fingerprint, and the report's link."""

import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from ftdeploy import trackers
from ftdeploy.config import load_config
from ftdeploy.optional import MissingDependencyError


@pytest.fixture
def without(monkeypatch):
    """Make the named packages look not installed, whatever this machine has."""
    def hide(*modules):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, **kw: None if name in modules else real(name, *a, **kw))

    return hide


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_package_is_named_with_the_option_and_the_install(without, tracker):
    without(tracker)
    with pytest.raises(MissingDependencyError) as err:
        trackers.check_tracker(tracker)
    assert str(err.value) == f"train.report_to={tracker} needs {tracker}, which is not installed here: pip install " \
        f"{tracker}"
    trackers.check_tracker("none")  # nothing to check


def test_train_and_serve_refuses_a_missing_tracker_before_any_stage_runs(without, tmp_path):
    """In preflight: not after the data stage, and not once the model has loaded (where transformers would fail)."""
    from ftdeploy.cli import cli

    without("mlflow")
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["train-and-serve", "--set", "train.report_to=mlflow", "--runs-dir", str(runs)])
    assert result.exit_code == 1, result.output
    assert "train.report_to=mlflow needs mlflow, which is not installed here: pip install mlflow" in result.output
    assert "==> data" not in result.output and not runs.exists()


def test_the_config_key_takes_the_trackers_transformers_integrates_and_defaults_to_none():
    from ftdeploy.errors import ConfigError

    assert load_config().train.report_to == "none"
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(overrides=["train.report_to=comet"])


def test_the_trainer_is_given_the_one_tracker_asked_for_and_the_run_name():
    from ftdeploy.stages.train import trainer_kwargs

    def kwargs(*overrides):
        return trainer_kwargs(load_config(overrides=["name=my-run", *overrides]), "hf", False, False, "o", False)

    assert kwargs()["report_to"] == []  # never transformers' "all": a tracker installed for something else stays off
    tensorboard = kwargs("train.report_to=tensorboard")
    assert tensorboard["report_to"] == ["tensorboard"] and tensorboard["run_name"] == "my-run"


def test_switching_the_tracker_retrains_nothing(tmp_path):
    from ftdeploy.pipeline import Context, fingerprint
    from ftdeploy.runs import Run

    def train_fingerprint(*overrides):
        cfg = load_config(overrides=[f"runs_dir={tmp_path}", *overrides])
        return fingerprint(Context(cfg, Run(cfg.run_dir)), "train")

    assert train_fingerprint() == train_fingerprint("train.report_to=tensorboard")
    assert train_fingerprint() != train_fingerprint("train.logging_steps=2", "train.max_steps=5")


def test_a_tracker_asked_for_on_a_skipped_training_is_said_to_get_nothing(tmp_path, caplog):
    """The demo trained without a tracker, then `--set train.report_to=tensorboard`: the training is skipped as
    unchanged, so no event files are written; a warning says so and how to train again, rather than nothing at all."""
    from ftdeploy.pipeline import Context
    from ftdeploy.pipeline.build import note_unlogged_training
    from ftdeploy.runs import Run

    def note(logged, wanted):
        caplog.clear()
        cfg = load_config(overrides=[f"runs_dir={tmp_path}", f"train.report_to={wanted}"])
        run = Run(cfg.run_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        run.update(stages={"train": {"status": "done", "outputs": {"tracker": logged}}})
        note_unlogged_training(Context(cfg, run))
        return caplog.text

    assert ("train.report_to=tensorboard: the training is unchanged and skipped, so nothing is logged to tensorboard "
            "(it logged to no tracker); `--force train` trains again with it") in note(None, "tensorboard")
    assert note("tensorboard", "tensorboard") == ""  # its events are there, and the report links them
    assert note("tensorboard", "none") == ""


def test_tensorboard_writes_in_the_run_and_the_environment_is_restored(tmp_path, monkeypatch):
    monkeypatch.delenv(trackers.TENSORBOARD_ENV, raising=False)
    with trackers.tracker_environment("tensorboard", tmp_path, "abc"):
        assert os.environ[trackers.TENSORBOARD_ENV] == str(tmp_path / "tensorboard" / "abc")
        assert trackers.tracker_run("tensorboard", "out") == str(tmp_path / "tensorboard" / "abc")
    assert trackers.TENSORBOARD_ENV not in os.environ
    monkeypatch.setenv(trackers.TENSORBOARD_ENV, "/elsewhere")  # the user's choice wins
    with trackers.tracker_environment("tensorboard", tmp_path, "abc"):
        assert os.environ[trackers.TENSORBOARD_ENV] == "/elsewhere"
    assert os.environ[trackers.TENSORBOARD_ENV] == "/elsewhere"


def test_without_a_run_url_the_report_names_the_project(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setattr(trackers.sys, "modules", {k: v for k, v in trackers.sys.modules.items() if k != "wandb"})
    assert trackers.tracker_run("wandb", "out") == "project my-project"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp")
    assert trackers.tracker_run("mlflow", "out") == "experiment exp"


@pytest.mark.parametrize(("tracker", "run", "expected_md", "expected_html"), [
    ("tensorboard", "/r/demo/tensorboard/abc", "Training logs in TensorBoard: `/r/demo/tensorboard/abc` (view with "
     "`tensorboard --logdir /r/demo/tensorboard`).", "tensorboard --logdir /r/demo/tensorboard"),
    ("wandb", "https://wandb.example/team/proj/runs/x1", "Training logs in Weights & Biases: "
     "<https://wandb.example/team/proj/runs/x1>.",
     '<a href="https://wandb.example/team/proj/runs/x1">https://wandb.example/team/proj/runs/x1</a>'),
    ("mlflow", "experiment exp", "Training logs in MLflow: experiment exp.", "in MLflow: experiment exp."),
])
def test_the_report_links_the_tracker_run(tmp_path, tracker, run, expected_md, expected_html):
    from ftdeploy.report import build_report

    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {}, "metrics": {"train": {
        "engine": "hf", "device": "cpu", "steps": 3, "tracker": tracker, "tracker_run": run}}}))
    md, page = build_report(tmp_path)
    assert expected_md in md.read_text()
    assert expected_html in page.read_text()
