"""The demo base learns to call a made-up tool: SmolLM2 trained on the bundled `lookup_port(service)` data with
ftdeploy's `chatml-tools` template, through the real stages, served by the real Ollama and asked through the
official client's /api/chat with the tool declared. Services the data never names must come back as parsed
`message.tool_calls` with the right argument, and tool results as answers that quote them."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]

DEMO = REPO / "ftdeploy" / "assets" / "demo"
NAME = "ftdeploy-tools"


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tool_model(ollama_server, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    common = ["--runs-dir", str(runs), "--name", NAME, "--set", "data.chat_template=chatml-tools",
              "--set", f"data.train={DEMO / 'tools.jsonl'}", "--set", f"data.eval={DEMO / 'tools_eval.jsonl'}",
              # the base's answers and forgetting (the demo e2e checks them) are not what this test is about
              "--set", "verify.compare=false"]
    # The user's one command: train-and-serve ends with verify, which asks the eval rows with their tools declared
    # and compares the served tool calls with the merged model's.
    stderr = {"train-and-serve": _cli("train-and-serve", *common, "--ollama-host", ollama_server.host).stderr}
    return runs / NAME, stderr


def _eval_rows():
    return [json.loads(line) for line in (DEMO / "tools_eval.jsonl").read_text().splitlines() if line.strip()]


def _ask(ollama_server, row):
    messages = list(row["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return ollama_server.official.chat(model=NAME, messages=messages, tools=row.get("tools"),
                                       options={"temperature": 0, "num_predict": 64}).message


def test_the_served_model_calls_the_tool_for_services_it_never_saw(tool_model, ollama_server):
    trained = (DEMO / "tools.jsonl").read_text()
    asks = [r for r in _eval_rows() if r.get("expect") == "lookup_port"]
    assert len(asks) == 3
    right = 0
    for row in asks:
        service = row["messages"][-1]["tool_calls"][0]["function"]["arguments"]["service"]
        assert service not in trained  # held out: the call is learned, not remembered
        message = _ask(ollama_server, row)
        for call in message.tool_calls or []:  # a call, when made, is parsed and names the asked service
            assert call.function.name == "lookup_port" and dict(call.function.arguments) == {"service": service}
            assert not (message.content or "").strip().startswith("<tool_call>")  # parsed, not raw text
        right += bool(message.tool_calls)
    assert right >= 1, f"{right}/3 held-out services got a lookup_port call"  # 2/3 measured on 2026-11-24


def test_the_served_model_answers_from_the_tool_result(tool_model, ollama_server):
    rows = [r for r in _eval_rows() if r["messages"][-2:-1] and r["messages"][-2]["role"] == "tool"]
    assert rows
    for row in rows:
        port = json.loads(row["messages"][-2]["content"])["port"]
        message = _ask(ollama_server, row)
        assert not message.tool_calls and str(port) in message.content, message


def test_verify_compared_the_served_tool_calls_with_the_merged_models(tool_model):
    run, _ = tool_model
    report = json.loads((run / "verify.json").read_text())
    assert report["passed"] and report["template_parity"]["passed"]
    assert report["template_parity"]["checked"] == 5  # plain, system, multi-turn, tool call, tool result
    asks = [i for i, r in enumerate(_eval_rows()) if r.get("expect") == "lookup_port"]
    served = next(m for m in report["models"] if m["role"] == "served")
    merged = next(m for m in report["models"] if m["role"] == "merged")
    called = [i for i in asks if served["replies"][i].startswith("<tool_call>")]
    assert called, served["replies"]
    # A parsed call reads as the merged model wrote it: the same text where the quantized model chose the same
    # tokens (one run's q4_k_m spelled one unseen service "reere-sync" for the merged "orrery-sync": the gate for
    # that is verify's agreement, above), and the same function in every call.
    same = [i for i in called if served["replies"][i] == merged["replies"][i]]
    assert len(same) >= max(1, len(called) - 1), [(served["replies"][i], merged["replies"][i]) for i in called]
    def name(reply: str) -> str:
        return json.loads(reply.split("\n")[1])["name"]

    assert all(name(served["replies"][i]) == name(merged["replies"][i]) for i in called)


def test_ollama_lists_the_tools_capability_and_the_stages_printed_no_library_warning(tool_model, ollama_server):
    shown = ollama_server.official.show(NAME)
    assert "tools" in (shown.capabilities or [])
    _, stderr = tool_model
    for stage, text in stderr.items():
        assert "FutureWarning" not in text and "DeprecationWarning" not in text, f"{stage}:\n{text[-2000:]}"
