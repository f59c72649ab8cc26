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
