"""Registration against the real Ollama server (the pinned build), through the real CLI."""

import json
import shutil

import pytest
from click.testing import CliRunner

from ftdeploy.base_model import embedded_gguf
from ftdeploy.cli import cli

pytestmark = pytest.mark.ollama


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """SmolLM2-135M-Instruct as shipped (Q4_1, ~98 MB) copied into the test's own folder."""
    path = tmp_path_factory.mktemp("gguf") / "smol.gguf"
    shutil.copyfile(embedded_gguf("smollm2-135m-instruct"), path)
    return path


def _register(gguf, name, host):
    result = CliRunner().invoke(cli, ["register", "--gguf", str(gguf), "--name", name, "--ollama-host", host, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def test_register_show_chat_and_reregister_uploads_nothing(ollama_server, small_gguf):
    first = _register(small_gguf, "smol-it", ollama_server.host)
    assert first["model"] == "smol-it" and first["digest"].startswith("sha256:")
    assert first["uploaded_bytes"] == small_gguf.stat().st_size

    names = [m.model for m in ollama_server.client.list_models()]
    assert "smol-it:latest" in names
    shown = ollama_server.client.show("smol-it")
    assert "<|im_start|>" in shown.template
    assert "<|im_end|>" in shown.parameters
    assert "SmolLM" in ollama_server.show_json("smol-it").get("system", "")

    # Asked as a user asks it: the official client.
    reply = ollama_server.official.chat(model="smol-it",
                                        messages=[{"role": "user", "content":
                                                   "What is the capital of France? Answer in one sentence."}],
                                        options={"temperature": 0, "num_predict": 128})
    assert reply.message.content.strip()
    assert reply.done_reason == "stop", reply  # the stop token ends the answer

    again = _register(small_gguf, "smol-it", ollama_server.host)
    assert again["uploaded_bytes"] == 0 and again["digest"] == first["digest"]


def test_a_gguf_that_is_not_one_registers_nothing(ollama_server, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + b"\0" * 100)
    result = CliRunner().invoke(cli, ["register", "--gguf", str(bad), "--name", "bad-it",
                                      "--ollama-host", ollama_server.host])
    assert result.exit_code == 1 and "not a GGUF file" in result.output
    assert "bad-it:latest" not in [m.model for m in ollama_server.client.list_models()]


def test_ollama_builds_the_prompt_the_chat_template_builds(ollama_server, small_gguf):
    from ftdeploy.chat_template import read_gguf_chat_template
    from ftdeploy.stages.verify import PARITY_CHATS, template_parity

    _register(small_gguf, "smol-parity", ollama_server.host)
    result = template_parity(ollama_server.client, "smol-parity", read_gguf_chat_template(small_gguf).renderer(),
                             None, PARITY_CHATS)
    assert result.checked == len(PARITY_CHATS)
    assert result.passed, json.dumps(result.to_dict()["mismatches"], indent=1)


def test_parity_check_catches_a_template_that_differs(ollama_server, small_gguf):
    """A TEMPLATE that adds one newline after the generation prompt changes the answers: caught."""
    from ftdeploy.chat_template import mapping_for_template, read_gguf_chat_template
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.stages.modelfile import build_spec
    from ftdeploy.stages.register import register
    from ftdeploy.stages.verify import PARITY_CHATS, template_parity

    chat = read_gguf_chat_template(small_gguf)
    spec = build_spec(mapping_for_template(chat, "t"), small_gguf, ModelfileConfig(), None, {})
    spec.template = spec.template + "\n\n"
    register(ollama_server.client, "smol-broken", spec, show_progress=False)
    result = template_parity(ollama_server.client, "smol-broken", chat.renderer(), None, PARITY_CHATS)
    assert not result.passed


def test_a_gguf_truncated_by_one_byte_is_refused_and_nothing_is_registered(ollama_server, small_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(small_gguf.read_bytes()[:-1])
    result = CliRunner().invoke(cli, ["register", "--gguf", str(truncated), "--name", "trunc-it",
                                      "--ollama-host", ollama_server.host])
    assert result.exit_code == 1
    assert f"{truncated}: not a complete GGUF" in result.output or "truncated" in result.output
    assert "trunc-it:latest" not in [m.model for m in ollama_server.client.list_models()]
