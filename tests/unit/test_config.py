from pathlib import Path

import pytest

from ftdeploy.config import Config, describe_keys, load_config, parse_set
from ftdeploy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_seed_workflow():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.gradient_accumulation) == (2e-4, 2, 4)
    assert (cfg.train.warmup_steps, cfg.train.seed, cfg.data.max_seq_length) == (5, 3407, 2048)
    assert cfg.export.quant == ["q4_k_m"]


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
