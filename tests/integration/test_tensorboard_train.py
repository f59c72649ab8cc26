"""train.report_to=tensorboard for real: a short training of a tiny model through the Python API writes TensorBoard
event files in the run directory, TensorBoard's own reader gets the loss of every logged step back, and the report
links the folder. (wandb and mlflow need their services: README documents them.)"""

import json

import pytest
from conftest import build_tiny_model_dir

pytestmark = pytest.mark.slow


def test_tensorboard_holds_the_loss_of_every_step_and_the_report_links_it(tmp_path_factory, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ftdeploy import api

    base = build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")
    runs = tmp_path_factory.mktemp("runs")
    overrides = {"base_model": str(base), "runs_dir": str(runs), "name": "tb", "train.max_steps": 4,
                 "train.batch_size": 2, "train.gradient_accumulation": 1, "train.report_to": "tensorboard"}
    capfd.readouterr()
    api.data(overrides=overrides)
    trained = api.train(overrides=overrides)
    assert capfd.readouterr().out == ""  # the API prints nothing on stdout, training included

    run_dir = runs / "tb"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    log_dir = run_dir / "tensorboard" / manifest["stages"]["train"]["fingerprint"]
    assert trained.tracker == "tensorboard" and trained.tracker_run == str(log_dir)
    assert list(log_dir.glob("events.out.tfevents.*"))

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(h["step"], h["loss"]) for h in manifest["metrics"]["train"]["loss_history"]]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 in the event file
    assert "train/learning_rate" in events.Tags()["scalars"]

    from ftdeploy.report import build_report

    report, _ = build_report(run_dir)
    assert f"Training logs in TensorBoard: `{log_dir}`" in report.read_text()
