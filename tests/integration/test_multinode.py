"""Two "hosts" on loopback: `ftdeploy train --nnodes 2` run twice, node ranks 0 and 1, each with its own runs
folder (as separate machines would have), meeting at one master address. Real torchrun rendezvous, real gloo."""

import json
import os
import subprocess
import sys

import pytest

from ftdeploy.local_server import free_port

pytestmark = pytest.mark.slow


def _cli(*args):
    return [sys.executable, "-m", "ftdeploy.cli", *args]


def test_two_nodes_train_together_and_only_node_0_writes_the_adapter(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        runs = tmp_path / f"host{rank}"
        subprocess.run(_cli("data", "--runs-dir", str(runs), "--name", "mn"), check=True, env=env,
                       capture_output=True, timeout=900)
        # Node 0 trains (`train`); node 1 runs the whole job, which on a worker host ends with training and
        # never contacts Ollama (the address given is dead).
        command = ("train",) if rank == 0 else ("train-and-serve", "--ollama-host", "http://127.0.0.1:9")
        procs.append(subprocess.Popen(
            _cli(*command, "--runs-dir", str(runs), "--name", "mn", "--max-steps", "3", "--nproc", "1", "--nnodes", "2",
                 "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "--json"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out1, err1 = procs[1].communicate(timeout=900)
    assert procs[1].returncode == 0, err1[-3000:]
    assert json.loads(out1) == {"node_rank": 1, "world_size": 2, "done": "train"}
    out0, err0 = procs[0].communicate(timeout=900)
    assert procs[0].returncode == 0, err0[-3000:]
    assert json.loads(out0)["world_size"] == 2
    node0 = json.loads((tmp_path / "host0" / "mn" / "manifest.json").read_text())
    assert node0["world_size"] == 2 and node0["stages"]["train"]["status"] == "done"
    assert node0["metrics"]["train"]["global_batch"] == 4 and node0["metrics"]["train"]["steps"] == 3
    assert (tmp_path / "host0" / "mn" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "host1" / "mn" / "adapter").exists()
    assert "train" not in json.loads((tmp_path / "host1" / "mn" / "manifest.json").read_text()).get("stages", {})
