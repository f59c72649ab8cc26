"""The Python API (ftdeploy.api, and its names on the package): configs built as the CLI builds them, typed results,
typed errors instead of exits, nothing on stdout, and an `import ftdeploy` that loads nothing heavy."""

import subprocess
import sys

import pytest

import ftdeploy
from ftdeploy import api
from ftdeploy.errors import ConfigError, StageMissingError


def test_import_ftdeploy_loads_nothing_heavy_until_a_name_is_used():
    probe = ("import sys, ftdeploy\n"
             "print(sorted(m for m in ('pydantic', 'torch', 'transformers', 'rich') if m in sys.modules))\n"
             "from ftdeploy import train_and_serve, Config, load_config\n"
             "import ftdeploy.data\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), ftdeploy.data.__name__,\n"
             "      ftdeploy.api.data.__module__)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split("\n")
    assert out[0] == "[]"  # `import ftdeploy` imports neither pydantic nor rich nor torch
    # The names resolve on first use without the training stack; `ftdeploy.data` stays the data library and the data
    # stage is ftdeploy.api.data.
    assert out[1] == "[] ftdeploy.data ftdeploy.api"


def test_the_package_exposes_the_api_names():
    from ftdeploy.config_models import Config

    assert ftdeploy.Config is Config and ftdeploy.train_and_serve is api.train_and_serve
    for stage in ("train", "merge", "export", "modelfile", "register", "verify"):
        assert getattr(ftdeploy, stage) is getattr(api, stage)
    assert {"train_and_serve", "Config", "run_stage"} <= set(dir(ftdeploy))
    with pytest.raises(AttributeError):
        ftdeploy.no_such_name  # noqa: B018


def test_no_config_is_the_embedded_demo_as_on_the_command_line(tmp_path):
    demo = api.load_config()
    assert demo.name == "ftdeploy-demo" and demo.data.train == "demo" and demo.train.max_steps == 30
    # A base model of one's own leaves the demo's settings out (the seed defaults), as `--base-model` does.
    own = api.load_config(overrides={"base_model": str(tmp_path)})
    assert own.train.max_steps == 60 and own.base_model == str(tmp_path)


def test_overrides_as_set_items_or_a_mapping_and_on_a_config_or_a_file(tmp_path):
    as_items = api.load_config(overrides=["train.max_steps=7", "lora.r=8", "name=mine"])
    as_mapping = api.load_config(overrides={"train.max_steps": 7, "lora.r": 8, "name": "mine"})
    assert as_items == as_mapping and as_items.train.max_steps == 7 and as_items.lora.r == 8
    assert api.load_config(overrides="train.max_steps=9").train.max_steps == 9
    # On a Config: a new config, the given one unchanged; with no overrides, the same object.
    again = api.load_config(as_items, {"train.max_steps": 11})
    assert again.train.max_steps == 11 and again.lora.r == 8 and as_items.train.max_steps == 7
    assert api.load_config(as_items) is as_items
    path = tmp_path / "my.yaml"
    path.write_text("name: from-file\ntrain:\n  max_steps: 3\n")
    from_file = api.load_config(path, ["lora.r=4"])
    assert (from_file.name, from_file.train.max_steps, from_file.lora.r) == ("from-file", 3, 4)


def test_bad_overrides_raise_one_config_error_naming_each_and_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError) as err:
        api.load_config(overrides={"lora.r": "x", "nope": 1})
    message = str(err.value)
    assert "lora.r: expected an integer" in message and "[from overrides['lora.r']]" in message
    assert "nope: unknown key" in message
    with pytest.raises(ConfigError, match=r"\[from --set train.max_steps=-1\]"):
        api.load_config(overrides=["train.max_steps=-1"])
    with pytest.raises(ConfigError, match="no such file"):
        api.load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown stage 'serve'"):
        api.run_stage("serve", overrides={"runs_dir": str(tmp_path)})


def test_a_stage_without_its_run_raises_the_typed_error_and_leaves_nothing(tmp_path, capfd):
    runs = tmp_path / "runs"
    with pytest.raises(StageMissingError, match="no run named 'nope'"):
        api.merge(overrides={"runs_dir": str(runs), "name": "nope"})
    assert not runs.exists()
    assert capfd.readouterr().out == ""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from conftest import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")


@pytest.mark.slow  # the tiny model: torch and transformers load
@pytest.mark.parametrize("progress", [True, False], ids=["progress", "quiet"])
def test_the_data_stage_returns_its_typed_result_and_prints_nothing_on_stdout(tiny_base, tmp_path, capfd, progress):
    from ftdeploy.results import DataResult

    capfd.readouterr()  # what building the tiny model printed
    result = api.data(overrides={"base_model": str(tiny_base), "runs_dir": str(tmp_path), "name": "tiny"},
                      progress=progress)
    captured = capfd.readouterr()
    assert isinstance(result, DataResult) and result.rows == 20 and result.eval_rows == 5
    assert captured.out == ""  # file-descriptor level: a library writing to fd 1 would show here too
    assert ("[1/7] data" in captured.err and "data done in" in captured.err) == progress
    assert (tmp_path / "tiny" / "data" / "train.jsonl").is_file()


def test_a_stage_that_fails_is_shown_as_failed_not_done(tmp_path, capfd):
    """The progress lines never say a stage is done when it raised: here the data stage, on a data file that is not
    there (refused before anything loads)."""
    from ftdeploy.errors import DataError

    with pytest.raises(DataError, match="no such file"):
        api.data(overrides={"data.train": str(tmp_path / "missing.jsonl"), "runs_dir": str(tmp_path / "runs")})
    err = capfd.readouterr().err
    assert "data failed" in err and "data done" not in err


def test_a_missing_training_stack_is_the_typed_error_that_names_the_extra(tmp_path, monkeypatch):
    from ftdeploy.optional import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a base install: `import transformers` fails
    with pytest.raises(MissingDependencyError, match=r"transformers, which is not installed here: pip install "
                                                     r"'ftdeploy\[train\]'"):
        api.data(overrides={"runs_dir": str(tmp_path / "runs")}, progress=False)
    assert not (tmp_path / "runs").exists()
