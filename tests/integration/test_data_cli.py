"""`ftdeploy data inspect` and the data stage on the real demo tokenizer (SmolLM2's chat template)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftdeploy.cli import cli

pytestmark = pytest.mark.slow


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_inspect_json_reports_layout_rows_and_token_lengths(tmp_path):
    data = _write(tmp_path / "alpaca.jsonl", [
        {"instruction": "What port does Zephyr use?", "input": "", "output": "Port 7341."},
        {"instruction": "Translate to French.", "input": "hello", "output": "bonjour"},
        {"instruction": "No output here"},
    ])
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path / "runs"), "--on-bad-row", "skip",
                                      "inspect", str(data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["format"] == "alpaca" and report["rows"] == 2 and report["bad_rows"] == 1
    assert f"{data}:3" in report["bad"][0]
    assert 0 < report["tokens"]["min"] <= report["tokens"]["p50"] <= report["tokens"]["max"]
    assert sum(h["count"] for h in report["histogram"]) == 2
    assert "[[Port 7341.<|im_end|>" in report["example"]["rendered"]
    assert Path(report["plot"]).stat().st_size > 1000
    assert not (tmp_path / "runs").exists()  # inspecting makes no run


def test_inspect_human_output_and_bad_rows_by_default(tmp_path):
    data = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "response": "A."}, {"prompt": "Q2?"}])
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path), "inspect", str(data)])
    assert result.exit_code == 1
    assert f"{data}:2: missing field 'response'" in result.output


def test_data_stage_accepts_sharegpt_and_writes_the_run(tmp_path):
    data = _write(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                             {"from": "gpt", "value": f"a{i}"}]} for i in range(10)])
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path), "--data", str(data),
                                      "--eval-split", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert (out["rows"], out["eval_rows"]) == (8, 2)
    stats = json.loads((tmp_path / "ftdeploy-demo" / "data" / "stats.json").read_text())
    assert stats["layout"] == "sharegpt"


def test_the_bundled_tool_data_on_the_demo_base_names_its_template_that_renders_no_tools(tmp_path):
    # SmolLM2's chat template has no tools: the data stage says so rather than train on calls without specs
    tools = Path(__file__).resolve().parents[2] / "ftdeploy" / "assets" / "demo" / "tools.jsonl"
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path), "inspect", str(tools)])
    assert result.exit_code == 1
    assert f"{tools}:1: the row carries tools, but the chat template of " in result.output
    assert "SmolLM2-135M-Instruct" in result.output and "renders none of them" in result.output
    assert "set data.chat_template=chatml-tools" in result.output  # the fix, which the next test shows working


def test_the_bundled_tool_data_prepares_on_the_demo_base_with_chatml_tools(tmp_path):
    # data.chat_template=chatml-tools gives SmolLM2 a ChatML template with tools: the same rows now prepare
    tools = Path(__file__).resolve().parents[2] / "ftdeploy" / "assets" / "demo" / "tools.jsonl"
    result = CliRunner().invoke(cli, ["data", "--runs-dir", str(tmp_path), "--set", "data.chat_template=chatml-tools",
                                      "inspect", str(tools), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[result.output.index("{"):])
    assert stats["chat_format"] == "chatml" and stats["tool_rows"] == stats["rows"] and stats["tool_calls"] > 0
    rendered = stats["example"]["rendered"]
    assert rendered.startswith("<|im_start|>system\n# Tools\n")  # the row's tools, in the system block
    # the call is trained ([[ ]] marks the tokens with loss), the tool's result is not
    assert '<|im_start|>assistant\n[[<tool_call>\n{"name": "lookup_port", "arguments": {"service": ' in rendered
    assert "<|im_start|>user\n<tool_response>\n" in rendered and "[[<tool_response>" not in rendered
