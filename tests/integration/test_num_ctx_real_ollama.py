"""The served model keeps the context it was trained for: the modelfile and register stages (the real CLI) on a run
whose data stage saw max_seq_length 5000 serve num_ctx 5120, which the pinned Ollama reports in /api/show and loads
the model with (/api/ps); the user's num_ctx and sampling parameters win and arrive as typed values."""

import httpx
import pytest
from click.testing import CliRunner
from conftest import smol_gguf_copy
from served_run import served_run

from ftdeploy.cli import cli

pytestmark = pytest.mark.ollama


def _stages(runs, name, host, *extra):
    for stage in ("modelfile", "register"):
        result = CliRunner().invoke(cli, [stage, "--runs-dir", str(runs), "--name", name, "--ollama-host", host,
                                          *extra])
        assert result.exit_code == 0, result.output


def _shown_parameters(server, name) -> dict[str, str]:
    lines = server.show_json(name)["parameters"].splitlines()
    return {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines if line.split()[0] != "stop"}


def test_the_served_model_reports_and_loads_the_trained_num_ctx(ollama_server, tmp_path):
    runs = tmp_path / "runs"
    gguf = smol_gguf_copy(tmp_path, "num-ctx")
    served_run(runs, "ctx-trained", gguf, {"max_length": 300, "max_seq_length": 5000, "rows": 4})
    _stages(runs, "ctx-trained", ollama_server.host)
    assert _shown_parameters(ollama_server, "ctx-trained")["num_ctx"] == "5120"

    # Ollama loads it with that context: /api/ps after one answer
    ollama_server.client.generate("ctx-trained", "Hi", options={"num_predict": 1})
    ps = httpx.get(f"{ollama_server.host}/api/ps", timeout=60).json()["models"]
    assert [m["context_length"] for m in ps if m["name"] == "ctx-trained:latest"] == [5120], ps
    ollama_server.client.generate("ctx-trained", "", keep_alive=0)  # unloaded: the session's server is shared

    # the user's settings win, and reach the server as their types (a "4096" would fail every chat as a string)
    served_run(runs, "ctx-user", gguf, {"max_length": 300, "max_seq_length": 5000, "rows": 4})
    _stages(runs, "ctx-user", ollama_server.host,
            "--set", 'modelfile.parameters={num_ctx: "4096", temperature: "0.3", top_k: 7}')
    shown = _shown_parameters(ollama_server, "ctx-user")
    assert (shown["num_ctx"], shown["temperature"], shown["top_k"]) == ("4096", "0.3", "7"), shown
    assert ollama_server.client.generate("ctx-user", "Hi", options={"num_predict": 1}, keep_alive=0).done
