import pytest
from click.testing import CliRunner

from ftdeploy.cli import cli
from ftdeploy.errors import ConfigError
from ftdeploy.stages.train import select_engine


def test_auto_picks_unsloth_only_with_cuda_and_unsloth():
    assert select_engine("auto", has_cuda=True, has_unsloth=True) == "unsloth"
    assert select_engine("auto", has_cuda=True, has_unsloth=False) == "hf"
    assert select_engine("auto", has_cuda=False, has_unsloth=True) == "hf"
    assert select_engine("hf", has_cuda=True, has_unsloth=True) == "hf"


def test_unsloth_without_cuda_or_without_the_package_says_what_to_do():
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*--engine hf"):
        select_engine("unsloth", has_cuda=False, has_unsloth=True)
    with pytest.raises(ConfigError, match=r"pip install 'ftdeploy\[gpu\]'"):
        select_engine("unsloth", has_cuda=True, has_unsloth=False)


def test_train_and_serve_refuses_unsloth_here_before_any_stage(tmp_path):
    result = CliRunner().invoke(cli, ["train-and-serve", "--runs-dir", str(tmp_path), "--engine", "unsloth",
                                      "--ollama-host", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "--engine unsloth needs a CUDA GPU" in result.output
    assert not (tmp_path / "ftdeploy-demo" / "data").exists()


def test_bench_train_arithmetic():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bench_train as b

    assert abs(b.param_count(b.SHAPES["llama-3.2-1b"]) / 1e9 - 1.236) < 0.001
    assert abs(b.param_count(b.SHAPES["llama-3.2-3b"]) / 1e9 - 3.213) < 0.001
    assert b.peak_flops("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert b.mfu(51_434, 1_235_814_400, 989e12) == pytest.approx(0.257, abs=0.001)
    lengths = b.variable_lengths(64, 64, 2048, seed=1)
    assert min(lengths) >= 64 and max(lengths) <= 2048 and len(set(lengths)) > 10
    bins = b.pack_lengths(lengths, 2048)
    assert sorted(n for bn in bins for n in bn) == sorted(lengths)
    assert all(sum(bn) <= 2048 for bn in bins)


def test_a_preference_method_trains_with_sfts_arguments_and_the_preference_section():
    from ftdeploy.config import load_config
    from ftdeploy.stages.train import preference_kwargs, trainer_kwargs

    cfg = load_config(None, ["train.method=dpo", "preference.beta=0.3", "preference.loss_type=ipo",
                             "preference.label_smoothing=0.1", "train.learning_rate=5e-5", "data.max_seq_length=512"])
    sft = trainer_kwargs(cfg, "hf", False, False, "/tmp/out", True)
    dpo = preference_kwargs(cfg, sft)
    common = {k: v for k, v in sft.items() if k not in ("dataset_kwargs", "packing")}  # SFTConfig's own
    assert {k: dpo[k] for k in sft if k in dpo} == common
    assert (dpo["beta"], dpo["loss_type"], dpo["label_smoothing"]) == (0.3, ["ipo"], 0.1)
    assert (dpo["learning_rate"], dpo["max_length"]) == (5e-5, 512)
    kto = preference_kwargs(load_config(None, ["train.method=kto", "preference.desirable_weight=1.5",
                                               "preference.undesirable_weight=0.5"]), sft)
    assert (kto["beta"], kto["desirable_weight"], kto["undesirable_weight"]) == (0.1, 1.5, 0.5)
    assert "loss_type" not in kto and "label_smoothing" not in kto  # KTO's own loss (kto) and no smoothing


def test_settings_a_preference_method_cannot_train_with_are_refused_naming_the_key():
    from ftdeploy.config import load_config
    from ftdeploy.stages.train import check_method

    check_method(load_config(None, ["train.method=sft", "train.batch_size=1"]))
    check_method(load_config(None, ["train.method=kto", "train.batch_size=2"]))
    with pytest.raises(ConfigError, match=r"kto needs 2 or more rows.*train\.batch_size is 1"):
        check_method(load_config(None, ["train.method=kto", "train.batch_size=1", "train.gradient_accumulation=8"]))
    with pytest.raises(ConfigError, match=r"train\.method dpo: lora\.target_modules cannot include lm_head"):
        check_method(load_config(None, ["train.method=dpo", "lora.target_modules=[q_proj,lm_head]"]))
    # ORPO scores the answers from the model's logits: an lm_head adapter trains (test_preference_train shows it).
    check_method(load_config(None, ["train.method=orpo", "lora.target_modules=[q_proj,lm_head]", "train.batch_size=1"]))


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_orpo_trains_with_sfts_arguments_and_the_preference_sections_beta_as_its_lambda():
    from trl.experimental.orpo import ORPOConfig

    from ftdeploy.config import load_config
    from ftdeploy.stages.train import preference_kwargs, trainer_kwargs

    cfg = load_config(None, ["train.method=orpo", "preference.beta=0.25", "preference.loss_type=ipo",
                             "train.learning_rate=5e-5", "data.max_seq_length=512"])
    sft = trainer_kwargs(cfg, "hf", False, False, "/tmp/out", True)
    orpo = preference_kwargs(cfg, sft)
    common = {k: v for k, v in sft.items() if k not in ("dataset_kwargs", "packing")}
    assert orpo == {**common, "beta": 0.25}  # no DPO loss_type or smoothing, no KTO weights
    args = ORPOConfig(**orpo)  # every argument is ORPOConfig's
    assert (args.beta, args.max_length, args.learning_rate, args.remove_unused_columns) == (0.25, 512, 5e-5, False)


def test_orpo_rows_are_the_pair_ids_as_they_are_with_the_prompt_masked():
    from ftdeploy.stages.train import orpo_features

    row = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]}
    assert orpo_features(row) == {
        "prompt_input_ids": [5, 6, 7], "prompt_attention_mask": [1, 1, 1],
        "chosen_input_ids": [5, 6, 7, 8, 9, 2], "chosen_attention_mask": [1] * 6,
        "chosen_labels": [-100, -100, -100, 8, 9, 2],
        "rejected_input_ids": [5, 6, 7, 10, 2], "rejected_attention_mask": [1] * 5,
        "rejected_labels": [-100, -100, -100, 10, 2]}
    assert row == {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]}  # not changed


def test_orpos_log_keys_are_kept_with_the_rewards():
    from ftdeploy.stages.train import preference_point

    logs = {"loss": 1.5, "rewards/chosen": -0.2, "rewards/rejected": -0.5, "rewards/margins": 0.3,
            "rewards/accuracies": 1.0, "log_odds_ratio": -0.4, "log_odds_chosen": 0.9, "nll_loss": 1.2,
            "logps/chosen": -2.0}
    point = preference_point(3, logs)
    assert point is not None and point.to_dict() == {
        "step": 3, "rewards_chosen": -0.2, "rewards_rejected": -0.5, "margin": 0.3, "accuracy": 1.0, "kl": None,
        "log_odds_ratio": 0.9, "nll_loss": 1.2}
    assert preference_point(3, {"loss": 1.5, "learning_rate": 0.1}) is None  # an SFT entry
