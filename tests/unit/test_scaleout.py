"""Scale-out glue without a cluster: the launch command, the batch split, strategy arguments, remote-host
settings, adapter Modelfiles. The real runs (2 gloo processes, adapter on the real Ollama) are in tests/e2e."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from ftdeploy.cli import cli
from ftdeploy.config import dump_config, load_config, split_global_batch
from ftdeploy.distributed import launch_command
from ftdeploy.errors import ConfigError, OllamaError
from ftdeploy.ollama import OllamaClient, expand_headers
from ftdeploy.stages.modelfile import ModelfileSpec
from ftdeploy.stages.register import blob_digests
from ftdeploy.stages.train import trainer_kwargs
from ftdeploy.strategy import check_strategy, strategy_args


def _cfg(*sets):
    return load_config(None, list(sets))


# ---------------------------------------------------------------- distributed training


def test_the_global_batch_is_kept_by_dividing_accumulation_first():
    assert split_global_batch(2, 4, 2, keep=True) == (2, 2)
    assert split_global_batch(4, 1, 2, keep=True) == (2, 1)
    assert split_global_batch(2, 4, 2, keep=False) == (2, 4)
    assert split_global_batch(2, 4, 1, keep=True) == (2, 4)


def test_trainer_arguments_for_two_cpu_processes_keep_the_one_process_global_batch():
    one = trainer_kwargs(_cfg(), "hf", on_cuda=False, bf16=False, output_dir="o", save=False)
    two = trainer_kwargs(_cfg("train.nproc=2"), "hf", on_cuda=False, bf16=False, output_dir="o", save=False)
    assert one["per_device_train_batch_size"] * one["gradient_accumulation_steps"] == 2 * 4
    assert two["per_device_train_batch_size"] * two["gradient_accumulation_steps"] * 2 == 2 * 4
    assert two["ddp_backend"] == "gloo" and two["ddp_find_unused_parameters"] is False
    assert "ddp_backend" not in one


def test_the_trainer_arguments_raise_no_deprecation_warning(tmp_path):
    """What a user's terminal shows is part of the product: no FutureWarning from the arguments we pass."""
    import warnings

    from trl import SFTConfig

    kwargs = trainer_kwargs(_cfg(), "hf", on_cuda=False, bf16=False, output_dir=str(tmp_path), save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        SFTConfig(**kwargs)


def test_fsdp_and_deepspeed_arguments():
    fsdp = strategy_args(_cfg("train.nproc=4", "train.strategy=fsdp"), on_cuda=True)
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["ddp_backend"] == "nccl"
    # Trainer.save_model writes no adapter at all from a sharded state dict.
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    ds = strategy_args(_cfg("train.nproc=4", "train.strategy=deepspeed"), on_cuda=True)
    zero3 = json.loads(open(ds["deepspeed"]).read())
    assert zero3["zero_optimization"]["stage"] == 3


def test_fsdp_on_cpu_says_that_it_runs_as_ddp(caplog):
    strategy_args(_cfg("train.nproc=2", "train.strategy=fsdp"), on_cuda=False)
    assert "run as DDP" in caplog.text
    caplog.clear()
    strategy_args(_cfg("train.nproc=2"), on_cuda=False)
    assert "run as DDP" not in caplog.text


def test_unsloth_is_ddp_only_and_deepspeed_must_be_installed():
    with pytest.raises(ConfigError, match="Unsloth trains on several GPUs only as DDP"):
        check_strategy(_cfg("train.nproc=2", "train.strategy=fsdp"), "unsloth")
    with pytest.raises(ConfigError, match="deepspeed is not installed"):
        check_strategy(_cfg("train.nproc=2", "train.strategy=deepspeed"), "hf", has_deepspeed=False)
    check_strategy(_cfg("train.nproc=2"), "unsloth")  # DDP is fine


def test_launch_command_single_host_uses_a_free_port_and_multi_host_names_the_master(tmp_path):
    cmd = launch_command(_cfg("train.nproc=2"), tmp_path / "spec.json")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert ("--standalone" in cmd and "--nproc-per-node=2" in cmd
            and cmd[-2:] == ["ftdeploy.distributed", str(tmp_path / "spec.json")])
    multi = launch_command(_cfg("train.nproc=8", "train.nnodes=2", "train.node_rank=1", "train.master_addr=10.0.0.5",
                                "train.keep_global_batch=false",
                                "train.master_port=29400"), tmp_path / "s.json")
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.5", "--master-port=29400"} <= set(multi)
    assert "--standalone" not in multi


def test_distributed_settings_are_validated_together():
    with pytest.raises(ConfigError) as err:
        _cfg("train.nproc=3", "train.nnodes=2", "train.node_rank=2", "train.master_port=70000")
    text = str(err.value)
    assert "train.node_rank: must be in [0, 2)" in text
    assert "train.master_port: not a TCP port" in text
    assert "neither divides by the world size 6" in text
    with pytest.raises(ConfigError, match="train.strategy: fsdp needs several processes"):
        _cfg("train.strategy=fsdp")


def test_worker_rebuilds_the_same_config_from_the_launch_spec():
    from ftdeploy.config import config_from_dict

    cfg = _cfg("train.nproc=2", "train.max_steps=7", "lora.r=8")
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------- remote Ollama


def test_header_values_are_never_written_unless_they_are_env_references():
    cfg = load_config(None, [], {"ollama.headers": {"Authorization": "Bearer s3cr3t", "X-Team": "${TEAM_TOKEN}",
                                                    "X-Auth": "Bearer ${TOKEN}"}})
    dumped = dump_config(cfg)
    assert "s3cr3t" not in dumped and "<redacted>" in dumped
    assert "${TEAM_TOKEN}" in dumped and "Bearer ${TOKEN}" in dumped


def test_env_references_in_headers_are_expanded_when_sent(monkeypatch):
    monkeypatch.setenv("OLLAMA_TOKEN", "abc")
    assert expand_headers({"Authorization": "Bearer ${OLLAMA_TOKEN}"}) == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("OLLAMA_TOKEN")
    with pytest.raises(OllamaError, match="OLLAMA_TOKEN is not set"):
        expand_headers({"Authorization": "Bearer ${OLLAMA_TOKEN}"})


class _AuthProxyStub(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.seen.append(self.headers.get("Authorization"))
        ok = self.headers.get("Authorization") == "Bearer right"
        body = json.dumps({"version": "0.17.4"} if ok else {"error": "unauthorized"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def auth_stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthProxyStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_headers_reach_the_server_and_a_refusal_names_the_host_and_the_option(auth_stub):
    assert OllamaClient(auth_stub, headers={"Authorization": "Bearer right"}).version() == "0.17.4"
    with pytest.raises(OllamaError) as err:
        OllamaClient(auth_stub, headers={"Authorization": "Bearer wrong"}).version()
    assert "HTTP 401" in str(err.value) and auth_stub in str(err.value) and "--ollama-header" in str(err.value)


def test_host_urls_with_a_path_prefix_are_accepted():
    cfg = load_config(None, [], {"ollama.host": "https://gpu-box.internal/ollama"})
    assert OllamaClient(cfg.ollama.host).host == "https://gpu-box.internal:443/ollama"


def test_cli_rejects_a_header_without_a_colon_and_a_push_without_a_namespace():
    result = CliRunner().invoke(cli, ["train", "--ollama-header", "Authorization Bearer x"])
    assert result.exit_code != 0 and "--ollama-header" in result.output
    result = CliRunner().invoke(cli, ["push", "--name", "plain", "--ollama-host", "http://127.0.0.1:9"])
    assert result.exit_code != 0 and "needs a namespace" in result.output


# ---------------------------------------------------------------- adapter deploys


def test_an_adapter_modelfile_points_at_the_registered_base():
    spec = ModelfileSpec(gguf="g.gguf", template="{{ .Prompt }}", stops=["<|im_end|>"],
                         base_name="ftdeploy-base-x:q4_k_m", adapter="runs/x/adapter")
    text = spec.render("./adapter")
    assert text.startswith("FROM ftdeploy-base-x:q4_k_m\nADAPTER ./adapter\n")
    assert "g.gguf" not in text


def test_the_base_name_is_derived_from_the_base_model_and_quant():
    from ftdeploy.pipeline.artifacts import base_name

    assert (base_name(_cfg("base_model=unsloth/Llama-3.2-3B-Instruct"), "q4_k_m")
            == "ftdeploy-base-llama-3.2-3b-instruct:q4_k_m")
    assert base_name(_cfg("export.base_name=team/base:v1"), "q8_0") == "team/base:v1"


def test_blob_digests_are_read_from_an_existing_models_modelfile():
    digest = "a" * 64
    show = {"modelfile": f"# Modelfile\nFROM /root/.ollama/models/blobs/sha256-{digest}\nTEMPLATE x"}
    assert blob_digests(show) == {f"sha256:{digest}"}


class _NewOllama(BaseHTTPRequestHandler):
    created: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps({"version": "0.34.1"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.created.append(self.path)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_POST


def test_an_adapter_deploy_refuses_a_server_that_no_longer_creates_adapters(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from ftdeploy.stages.register import register_adapter

    base = tmp_path / "base.gguf"
    writer = GGUFWriter(str(base), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NewOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        spec = ModelfileSpec(gguf=str(base), template="{{ .Prompt }}", stops=[])
        with pytest.raises(OllamaError, match="0.34.1 .* no longer creates adapter models"):
            register_adapter(OllamaClient(host), "tune", "base:q4_k_m", spec, base, tmp_path, show_progress=False)
        assert _NewOllama.created == []  # nothing uploaded, nothing created
    finally:
        server.shutdown()
