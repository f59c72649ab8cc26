from pathlib import Path

import pytest

from ftdeploy.config import Config, describe_keys, load_config, parse_set
from ftdeploy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_seed_workflow():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    # batch_size auto: 2 where nothing sizes it (ftdeploy/train_auto.py), the seed's 2 x 4
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.gradient_accumulation) == (2e-4, "auto", 4)
    assert (cfg.train.gradient_checkpointing, cfg.data.packing) == ("auto", "auto")
    assert (cfg.train.warmup_steps, cfg.train.seed, cfg.data.max_seq_length) == (5, 3407, 2048)
    assert cfg.export.quant == ["auto"]


def test_a_key_of_auto_or_a_value_takes_either_and_names_both_when_given_neither():
    cfg = load_config(None, ["train.batch_size=8", "train.gradient_checkpointing=false", "data.packing=true"])
    assert (cfg.train.batch_size, cfg.train.gradient_checkpointing, cfg.data.packing) == (8, False, True)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.batch_size=0", "train.gradient_checkpointing=1", "data.packing=sometimes"])
    lines = str(err.value).splitlines()
    assert "3 problems" in lines[0], lines  # one each, though each member of the union reports one
    assert "data.packing: must be auto or true or false, got 'sometimes'" in lines[1]
    assert "train.batch_size: must be auto or an integer >= 1, got 0" in lines[2]
    assert "train.gradient_checkpointing: must be auto or true or false, got 1" in lines[3]


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\nlora:\n  r: sixteen\n  rank: 4\ntrain:\n  max_steps: -1\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "4 problems" in msg
    assert "lora.r: expected an integer, got 'sixteen'" in msg
    assert "lora.rank: unknown key" in msg
    assert "bogus: unknown key" in msg
    assert "train.max_steps: must be >= 0" in msg or "max_steps" in msg
    assert str(path) in msg


def test_semantic_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["name=Not A Name", "export.quant=q4_k_m,q9_z", "train.learning_rate=3"])
    msg = str(err.value)
    assert "name: 'Not A Name' is not a valid Ollama model name" in msg
    assert "export.quant[1]: unknown quantization type 'q9_z'" in msg
    assert "train.learning_rate: must be in (0, 1)" in msg


def test_a_learning_rate_written_like_every_trainer_writes_it_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads `2e-4`, with no dot, as a string; Axolotl's and LLaMA-Factory's configs and the
    Unsloth notebooks all write it that way, in a file and after --set alike."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 2e-4\n  weight_decay: 1E-2\nlora:\n  dropout: .5e-1\n")
    cfg = load_config(path)
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.lora.dropout) == (2e-4, 1e-2, 0.05)
    assert load_config(overrides=["train.learning_rate=3e-5"]).train.learning_rate == 3e-5
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number, got '2e-4x'"):
        load_config(overrides=["train.learning_rate=2e-4x"])
    with pytest.raises(ConfigError, match="lora.r: expected an integer, got '1e2'"):
        load_config(overrides=["lora.r=1e2"])  # an exponent is no integer, as in Python


def test_set_overrides_and_flags_layer_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\ntrain:\n  max_steps: 10\n")
    cfg = load_config(path, ["train.max_steps=20", "lora.target_modules=[q_proj, v_proj]"], {"name": "from-flag"})
    assert cfg.name == "from-flag"
    assert cfg.train.max_steps == 20
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_quant_flag_is_comma_separated_and_lowercased():
    cfg = load_config(flags={"export.quant": "Q4_K_M,q8_0"})
    assert cfg.export.quant == ["q4_k_m", "q8_0"]


def test_parse_set_requires_key_value():
    assert parse_set("train.seed=7") == (["train", "seed"], 7)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set("train.seed")


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_start_with_their_command(path):
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ftdeploy ") and path.name in first


def test_every_key_has_help():
    rows = describe_keys(Config)
    assert rows and all(text for _, _, text in rows)


# ---------------------------------------------------------------- issue 24: a user's own settings and mistakes

def test_ranges_are_declared_with_the_keys_and_reported_together():
    """Values that used to be accepted (a 2.3 TB allocation for lora.r, a traceback for dropout 5) are refused at once,
    every one of them in the same message, each with its range."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["lora.r=1000000000", "lora.dropout=5", "lora.alpha=-3", "train.warmup_steps=-10",
                               "train.save_steps=-1", "train.epochs=-1", "data.max_seq_length=99999999"])
    msg = str(err.value)
    assert "7 problems" in msg
    for expected in ("lora.r: must be in [1, 4096], got 1000000000", "lora.dropout: must be in [0, 1), got 5.0",
                     "lora.alpha: must be >= 1, got -3", "train.warmup_steps: must be >= 0, got -10",
                     "train.save_steps: must be >= 0, got -1", "train.epochs: must be > 0, got -1.0",
                     "data.max_seq_length: must be in [1, 1048576], got 99999999"):
        assert expected in msg
    assert "[from --set lora.r=1000000000]" in msg
    # save_steps 0 is documented ("0: never"); a NaN is in no range
    assert load_config(overrides=["train.save_steps=0"]).train.save_steps == 0
    with pytest.raises(ConfigError, match=r"train.learning_rate: must be in \(0, 1\), got nan"):
        load_config(overrides=["train.learning_rate=.nan"])
    assert any("Must be in [1, 4096]" in text for key, _, text in describe_keys(Config) if key == "lora.r")


def test_a_run_name_is_one_path_component():
    """`--name identity/data` made a run inside run identity's data/ folder, which its next data stage deleted."""
    for name in ("identity/data", "a/b:v1"):
        with pytest.raises(ConfigError, match=r"name: .* a run name is one folder under runs_dir"):
            load_config(flags={"name": name})
    assert load_config(flags={"name": "identity-data:v1"}).name == "identity-data:v1"


def test_an_empty_data_path_is_a_config_error():
    with pytest.raises(ConfigError, match="data.train: empty"):
        load_config(flags={"data.train": ""})


def test_an_unclosed_ipv6_host_is_a_config_error():
    with pytest.raises(ConfigError, match=r"ollama.host: 'http://\[::1' is not a host URL"):
        load_config(flags={"ollama.host": "http://[::1"})
    assert load_config(flags={"ollama.host": "http://[::1]:11434"}).ollama.host == "http://[::1]:11434"


@pytest.mark.parametrize("text, reason", [
    ("train:\n  seed: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 64 levels deep"),
    ("a: &a [*a]\n", "refers to the anchor it is inside of"),
    ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(6))
     + "lora:\n  target_modules: *g\n", "more than 10000 values once its aliases"),
], ids=["deep", "recursive", "alias-bomb"])
def test_yaml_past_a_configs_size_or_depth_is_refused_naming_the_file(tmp_path, text, reason):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: refused: ") and reason in str(err.value)


def test_a_config_that_is_not_utf8_or_not_a_file_says_what_it_is(tmp_path):
    import os

    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(latin)
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"pipe.yaml: a named pipe \(FIFO\), not a YAML file"):
        load_config(fifo)
    with pytest.raises(ConfigError, match=r"--config /dev/null: a character device, not a YAML file"):
        load_config("/dev/null")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_an_empty_config_says_it_runs_the_demo(tmp_path, caplog):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    cfg = load_config(empty)
    assert cfg.base_model == "smollm2-135m-instruct"
    assert f"{empty} is empty: every key takes its default, which is the embedded demo" in caplog.text


def test_a_multi_line_set_value_keeps_its_line_breaks(caplog):
    """YAML folds the lines of a plain scalar into one: `--set data.system_prompt="$(cat prompt.txt)"` lost them."""
    assert parse_set("data.system_prompt=You are Zed.\nAnswer briefly.") == (
        ["data", "system_prompt"], "You are Zed.\nAnswer briefly.")
    assert load_config(overrides=["data.system_prompt=one\ntwo"]).data.system_prompt == "one\ntwo"
    assert parse_set("lora.target_modules=[q_proj,\n v_proj]")[1] == ["q_proj", "v_proj"]  # YAML still reads lists
    assert parse_set("data.system_prompt='one\ntwo'")[1] == "one two"
    assert "YAML folds the line breaks inside a quoted value" in caplog.text


def test_where_a_value_came_from_is_kept_for_messages(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base_model: ./nope\n")
    assert load_config(path).given_as("base_model") == f"base_model ./nope [from {path}, key base_model]"
    assert load_config(flags={"base_model": "./x"}, flag_names={"base_model": "--base-model"}).given_as(
        "base_model") == "--base-model ./x"
    assert "origins" not in load_config(path).to_dict()


def test_a_key_of_another_section_is_named_where_it_lives():
    """Ollama's settings are `ollama.parameters` in issues and peer tools; here the Modelfile holds them."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["ollama.parameters={num_ctx: 8192}"])
    assert "ollama.parameters: unknown key (did you mean modelfile.parameters?)" in str(err.value)
