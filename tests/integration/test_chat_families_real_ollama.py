"""Every chat format ftdeploy supports, served right by the real Ollama (the pinned build), one tiny model per family.

Each family's model is built from its own architecture with random weights, a tokenizer carrying the family's special
tokens and the family's chat template (tests/tiny_families.py); it goes through ftdeploy's own export (llama.cpp's
converter and quantizer), modelfile and register stages; then verify's template parity check asks the served model
each probe chat twice, as the prompt the training template renders (sent raw) and as a chat that Ollama's TEMPLATE
renders. Random weights are enough: greedy answers of one model can differ only where the prompts do, and with random
weights a changed prompt almost always changes them (the seed is fixed, so this one does). Two checks keep the test
honest: the family's special tokens are single tokens of the GGUF (a special token split into
pieces would render the same text and still mean nothing to the model), and a TEMPLATE one newline off fails parity.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny_families import FAMILIES, Family, build_model_dir

from ftdeploy.stages.verify import PARITY_CHATS, PARITY_TOOL_CHATS

pytestmark = [pytest.mark.ollama, pytest.mark.slow]

# The probe chats, by what each one exercises.
CHATS = dict(zip(("plain", "system", "multi-turn"), PARITY_CHATS, strict=True))
# A request that declares a tool, and a chat where the assistant called it and the tool answered: asked of every
# family whose Modelfile serves tools (its training template writes tools as the format does).
TOOL_CHATS = dict(zip(("tool call", "tool result"), PARITY_TOOL_CHATS, strict=True))
# The families whose chat template writes tools, all served with them (Mistral Nemo's Tekken template writes none).
SERVES_TOOLS = {"qwen2.5", "qwen3", "llama3.1", "mistral-v3", "mistral-v7"}


def _families() -> list:
    """One test per family; a family that cannot pass yet is a strict xfail on the exception that says why (e.g.
    TemplateError while templates.py has no format for it), so it fails the run the day it passes."""
    params = []
    for family in FAMILIES:
        marks = []
        if family.xfail:
            reason, raises = family.xfail
            marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
        params.append(pytest.param(family, id=family.name, marks=marks))
    return params


def _gguf_tokens(gguf_path, texts: tuple[str, ...]) -> dict[str, list[int]]:
    """How llama.cpp tokenizes each text with the GGUF's vocabulary, special tokens parsed."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return {text: vocab.tokenize(text.encode(), add_bos=False, special=True) for text in texts}
    finally:
        vocab.close()


@pytest.mark.parametrize("family", _families())
def test_ollama_renders_the_chats_the_family_was_trained_on(family: Family, ollama_server, tmp_path):
    from ftdeploy.chat_template import mapping_for_template, read_chat_template
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.stages.export import export
    from ftdeploy.stages.modelfile import build_spec, sampling_defaults
    from ftdeploy.stages.register import register
    from ftdeploy.stages.verify import template_parity

    merged_dir = build_model_dir(family, tmp_path / "merged")
    chat_template = read_chat_template(merged_dir)
    mapping = mapping_for_template(chat_template, f"{family.name} chat template")  # TemplateError: no format
    assert mapping.format.name == family.chat_format

    gguf_path = export(merged_dir, tmp_path / "gguf", family.name, ["q8_0"])["q8_0"]
    tokens = _gguf_tokens(gguf_path, family.specials)
    split = {text: ids for text, ids in tokens.items() if len(ids) != 1}
    assert not split, f"special tokens split into pieces in the GGUF: {split}"

    spec = build_spec(mapping, gguf_path, ModelfileConfig(), None, sampling_defaults(merged_dir))
    name = f"family-{family.name}"
    register(ollama_server.client, name, spec, show_progress=False)
    render = chat_template.renderer()
    strip_bos = chat_template.bos if mapping.format.bos_in_template else None
    assert mapping.tools == (family.name in SERVES_TOOLS)
    probes = [*CHATS.items(), *(TOOL_CHATS.items() if mapping.tools else [])]
    chats = [chat for what, chat in probes if family.system_role or what != "system"]
    calls_text = mapping.tool_calls_text if mapping.tools else None
    parity = template_parity(ollama_server.client, name, render, strip_bos, chats, calls_text=calls_text)
    assert parity.checked == len(chats)
    assert parity.passed, json.dumps(parity.to_dict()["mismatches"], indent=1, ensure_ascii=False)

    # The same check fails a TEMPLATE that differs by one newline after the generation prompt.
    off = dataclasses.replace(spec, template=spec.template + "\n")
    register(ollama_server.client, f"{name}-off", off, show_progress=False)
    assert not template_parity(ollama_server.client, f"{name}-off", render, strip_bos, chats,
                               calls_text=calls_text).passed
