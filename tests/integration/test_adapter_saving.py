"""The adapter is saved through the Trainer by every process, so it is whole under ZeRO-3 and FSDP.

Neither shards on CPU (accelerate runs FSDP as DDP there; DeepSpeed needs CUDA), so ZeRO-3 is imitated where it
bites: after training, each trainable weight's data is an empty tensor, as DeepSpeed leaves a partitioned
parameter, and only the trainer's save (its gather) sees the full weights. A real 2-process gloo run checks the
saved tensors too."""

import json
import os
import subprocess
import sys

import pytest
from conftest import build_tiny_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _assert_whole_and_trained(tensors, r=16, hidden=32):
    assert tensors, "the adapter holds no tensors"
    for name, t in tensors.items():
        assert t.numel() > 0, f"{name} was saved empty"
        assert r in t.shape, f"{name}: shape {tuple(t.shape)} is not a full rank-{r} LoRA factor"
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(bool(t.abs().sum() > 0) for t in lora_b), "lora_B is still all zero: nothing trained"
    # q_proj's A factor spans the whole hidden width: a shard would hold part of it.
    assert any(t.shape == (r, hidden) for name, t in tensors.items() if "q_proj.lora_A" in name)


@pytest.mark.parametrize("main_process", [True, False], ids=["rank0", "rank1"])
def test_every_process_saves_through_the_trainer_and_a_partitioned_adapter_is_written_whole(
        tiny_base, tmp_path, monkeypatch, main_process):
    import torch
    import trl

    from ftdeploy.config import load_config
    from ftdeploy.stages.train import fit
    from ftdeploy.tokenizer import load_tokenizer

    saves = []

    class ZeroThreeLikeTrainer(trl.SFTTrainer):
        """After training, trainable weights are partitioned away (data = empty tensor), as under ZeRO-3."""

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            self.partitioned = {n: p.data for n, p in self.model.named_parameters() if p.requires_grad}
            for n, p in self.model.named_parameters():
                if n in self.partitioned:
                    p.data = torch.empty(0, dtype=p.dtype)
            return result

        def is_world_process_zero(self):
            return main_process

        def save_model(self, output_dir=None, _internal_call=False):
            saves.append(output_dir)  # the collective every rank must join
            if not main_process:
                return
            params = dict(self.model.named_parameters())
            for n, full in self.partitioned.items():  # the gather
                params[n].data = full
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                for n in self.partitioned:
                    params[n].data = torch.empty(0, dtype=params[n].dtype)

    monkeypatch.setattr(trl, "SFTTrainer", ZeroThreeLikeTrainer)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"input_ids": list(range(3 + i, 40 + i)), "labels": list(range(3 + i, 40 + i))} for i in range(4)]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["train.engine=hf", "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=2",
                             "train.gradient_accumulation=1"])
    tokenizer, _ = load_tokenizer(tiny_base)
    adapter = tmp_path / "adapter"

    fit(tiny_base, data_dir, adapter, cfg, tokenizer)

    if main_process:
        _assert_whole_and_trained(_adapter_tensors(adapter))
        assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
        assert not (adapter / "training_args.bin").exists()  # a pickle has no place in the shipped adapter
    else:
        assert not adapter.exists()
    assert saves == [str(adapter)]


def test_two_gloo_processes_save_a_whole_trained_adapter(tiny_base, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["--runs-dir", str(tmp_path), "--name", "ddp", "--base-model", str(tiny_base)]
    subprocess.run([sys.executable, "-m", "ftdeploy.cli", "data", *common], check=True, env=env, capture_output=True,
                   timeout=300)
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", "train", *common, "--max-steps", "2", "--nproc", "2",
                           "--set", "train.warmup_steps=0", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["world_size"] == 2
    adapter = tmp_path / "ddp" / "adapter"
    _assert_whole_and_trained(_adapter_tensors(adapter))
    assert not (adapter / "training_args.bin").exists()
