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


BEN = ("Ben has 10 books and gives away 3. How many books are left? Work it out, then end your reply with one line "
       "of the form `Answer: <number>`.")


def test_verify_asks_greedily_as_transformers_decodes_not_with_ollamas_repeat_penalty(ollama_server, tmp_path):
    """Ollama's default repeat penalty (1.1 over the last 64 tokens, the prompt's included) turns the model away from
    a word of the prompt: SmolLM2 answers this prompt "Ben has ..." greedily, and "The answer is ..." under the
    penalty. verify's served requests turn it off, so a served model that is the trained model agrees with it (a
    GRPO run on these prompts failed agreement at 0% before)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftdeploy.base_model import resolve_base_model
    from ftdeploy.chat_template import mapping_for_template, read_gguf_chat_template
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.data import Record
    from ftdeploy.stages.modelfile import build_spec
    from ftdeploy.stages.register import register
    from ftdeploy.stages.verify import ask_all

    gguf = smol_gguf_copy(tmp_path, "greedy")
    spec = build_spec(mapping_for_template(read_gguf_chat_template(gguf), "t"), gguf, ModelfileConfig(), None, {})
    register(ollama_server.client, "smol-greedy", spec, show_progress=False)
    row = Record("ben.jsonl:1", messages=[{"role": "user", "content": BEN}])
    served = ask_all(ollama_server.client, "smol-greedy", [row], 8)

    base = resolve_base_model("smollm2-135m-instruct")
    tok, model = AutoTokenizer.from_pretrained(str(base)), AutoModelForCausalLM.from_pretrained(str(base))
    chat = [{"role": "system", "content": spec.system}] if spec.system else []
    ids = tok.apply_chat_template([*chat, {"role": "user", "content": BEN}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        greedy = tok.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:])
    assert greedy.startswith("Ben has") and served[0].answer.startswith(greedy.strip()), (greedy, served[0].answer)
    # Ollama's defaults, as a plain chat gets them: the penalty moves the first word.
    default = ollama_server.chat("smol-greedy", BEN, num_predict=8)
    assert not default.startswith("Ben"), default
