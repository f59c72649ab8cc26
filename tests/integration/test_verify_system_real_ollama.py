"""Template parity with a system prompt, on the real Ollama server (issue 24, item 1): a Modelfile with SYSTEM
serves the training-template prompt *with* that system message, and parity must compare with exactly that."""

import pytest
from conftest import smol_gguf_copy

pytestmark = pytest.mark.ollama

ZED = "You are Zed."


def test_a_correct_model_with_a_system_prompt_passes_template_parity(ollama_server, tmp_path):
    from ftdeploy.chat_template import mapping_for_template, read_gguf_chat_template
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.stages.modelfile import build_spec
    from ftdeploy.stages.register import register
    from ftdeploy.stages.verify import PARITY_CHATS, template_parity

    gguf = smol_gguf_copy(tmp_path, "zed")
    chat = read_gguf_chat_template(gguf)
    spec = build_spec(mapping_for_template(chat, "t"), gguf, ModelfileConfig(), ZED, {})
    assert spec.system == ZED
    register(ollama_server.client, "smol-zed", spec, show_progress=False)
    assert ollama_server.show_json("smol-zed")["system"] == ZED
    render = chat.renderer()

    result = template_parity(ollama_server.client, "smol-zed", render, None, PARITY_CHATS, system=ZED)
    assert result.passed and result.checked == len(PARITY_CHATS), result.to_dict()
    # Built without the SYSTEM (as before the fix), the two chats that have no system message of their own differ.
    before = template_parity(ollama_server.client, "smol-zed", render, None, PARITY_CHATS)
    assert not before.passed
    assert all(m.chat[0]["role"] != "system" for m in before.mismatches)
