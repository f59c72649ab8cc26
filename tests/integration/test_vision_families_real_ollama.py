"""Every vision family ftdeploy serves, through the real Ollama (the pinned build), one tiny model per family.

Each family's model is built from its own architecture with random weights, its real processor configuration and
chat template (tests/tiny_vision.py); it goes through ftdeploy's serving path: the serving copy of the merged model
(ftdeploy/vision.py), the Modelfile's TEMPLATE and stops, and registration by upload + Ollama's own conversion
(ftdeploy/stages/register_vision.py). Then the served model is asked an image chat, greedy, with two different images,
and its tokens are compared with the merged model's, computed with transformers:

* on the prompt Ollama builds (its image tokens, its attention): the served model is the merged model, weights, vision
  tower and projector alike; the image reaches the model (the answers to two images differ);
* on the prompt the training processor builds: the served model answers as the model was trained. Where Ollama
  0.17.4 builds a different prompt (Gemma 3: vision.FAMILIES' served_differs), a strict xfail that says why.

Random weights are enough: the tiny models' greedy answers move with every token of the prompt and every pixel of the
image (see tiny_vision.py), so equal answers mean equal computations.
"""

from __future__ import annotations

import pytest
from tiny_vision import FAMILIES, GEMMA_IMAGE_TOKEN, VisionFamily, build_vision_model_dir, test_image

pytestmark = [pytest.mark.ollama, pytest.mark.slow]

TOKENS = 12  # greedy tokens compared
QUESTION = "What is in the picture?"
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
SEEDS = (0, 1)  # two images


@pytest.fixture(scope="module")
def served(ollama_server, tmp_path_factory):
    """family name -> (its MergedVision, its served model name), built and registered once per module."""
    built: dict[str, tuple] = {}

    def get(family: VisionFamily):
        if family.name not in built:
            built[family.name] = _serve(family, ollama_server, tmp_path_factory.mktemp(family.name))
        return built[family.name]

    return get


def _serve(family: VisionFamily, ollama_server, tmp):
    from ftdeploy.chat_template import mapping_for_template, read_chat_template
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.stages.modelfile import build_spec, sampling_defaults
    from ftdeploy.stages.register_vision import register_vision
    from ftdeploy.stages.verify_vision import MergedVision
    from ftdeploy.vision import serving_copy

    merged_dir = build_vision_model_dir(family, tmp / "merged")
    files = serving_copy(merged_dir, tmp / "ollama")
    mapping = mapping_for_template(read_chat_template(merged_dir), f"{family.name} chat template")
    spec = build_spec(mapping, str(tmp / "ollama"), ModelfileConfig(), None, sampling_defaults(merged_dir))
    name = f"vision-{family.name}"
    register_vision(ollama_server.client, name, spec, files, "f16", show_progress=False)
    return MergedVision(merged_dir), name, spec


def _served_tokens(ollama_server, name: str, png: bytes) -> list[str]:
    from ftdeploy.stages.verify_vision import served_answer

    return served_answer(ollama_server.client, name, CHAT, [png], TOKENS).tokens


def _ollama_prompt_reference(family: VisionFamily, merged, spec, png_image) -> list[str]:
    """The merged model's greedy tokens on the prompt Ollama builds: for Qwen2.5-VL the processor's own (asserted
    equal below), for Gemma 3 Ollama's image tokens (model/models/gemma3 PostTokenize) and its attention (the
    image's tokens see the whole prompt: kvcache Causal Except)."""
    if family.name != "gemma3":
        return merged.answer(CHAT, [png_image], TOKENS, spec.system).tokens
    import torch

    from ftdeploy.stages.train_vision import pil_images, render
    from ftdeploy.stages.verify import with_system

    proc, model, tok = merged.processor, merged.model, merged.processor.tokenizer
    before, after = render(proc, with_system(CHAT, spec.system), True).split("<start_of_image>")
    ids = (tok(before, add_special_tokens=False).input_ids + [108, 255999] + [GEMMA_IMAGE_TOKEN] * 256
           + [256000, 108] + tok(after, add_special_tokens=False).input_ids)
    pixels = proc.image_processor(images=pil_images([png_image]), return_tensors="pt")["pixel_values"]
    prompt, is_image = len(ids), torch.tensor(ids) == GEMMA_IMAGE_TOKEN
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
    out: list[str] = []
    for _ in range(TOKENS):
        n = len(ids)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[:prompt, :prompt] |= is_image[:, None]  # an image token sees every token of the prompt's batch
        mask = torch.where(allowed, 0.0, float("-inf"))[None, None]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels,
                           attention_mask={"full_attention": mask, "sliding_attention": mask}).logits
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
        out.append(tok.decode([token]))
    return out


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_the_served_model_is_the_merged_model_and_sees_the_image(family, served, ollama_server):
    merged, name, spec = served(family)
    shown = ollama_server.show_json(name)
    assert "vision" in shown["capabilities"]
    assert shown["details"]["family"] == {"qwen2.5-vl": "qwen25vl", "gemma3": "gemma3"}[family.name]
    answers = {}
    for seed in SEEDS:
        image, png = test_image(seed, family.image_size)
        answers[seed] = _served_tokens(ollama_server, name, png)
        assert answers[seed] == _ollama_prompt_reference(family, merged, spec, png), f"image {seed}"
        assert len(answers[seed]) == TOKENS
    assert answers[SEEDS[0]] != answers[SEEDS[1]], "the answer does not change with the image"


def _as_trained_params() -> list:
    params = []
    for family in FAMILIES:
        marks = []
        if family.name == "gemma3":
            from ftdeploy.vision import FAMILIES as SERVED

            reason = SERVED["Gemma3ForConditionalGeneration"].served_differs
            marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))
        params.append(pytest.param(family, id=family.name, marks=marks))
    return params


@pytest.mark.parametrize("family", _as_trained_params())
def test_the_served_model_answers_an_image_chat_as_trained(family, served, ollama_server):
    """Served against the merged model on the prompt its processor builds, as in training: the same greedy tokens
    for both images, and the same number of prompt tokens (the TEMPLATE writes the chat the training template
    writes, image included)."""
    merged, name, spec = served(family)
    from ftdeploy.stages.verify_vision import ollama_messages

    for seed in SEEDS:
        image, png = test_image(seed, family.image_size)
        want = merged.answer(CHAT, [png], TOKENS, spec.system).tokens
        reply = ollama_server.official.chat(model=name, messages=ollama_messages(CHAT, [png]),
                                            options={"temperature": 0, "num_predict": 1})
        assert reply.prompt_eval_count == len(merged.inputs(CHAT, [png], spec.system)["input_ids"][0])
        assert _served_tokens(ollama_server, name, png) == want, f"image {seed}"


@pytest.mark.parametrize("family", FAMILIES[:1], ids=[f.name for f in FAMILIES[:1]])
def test_ollama_quantizes_the_language_model_and_keeps_the_vision_tower(family, ollama_server, tmp_path):
    from ftdeploy.chat_template import mapping_for_template, read_chat_template
    from ftdeploy.config import ModelfileConfig
    from ftdeploy.stages.modelfile import build_spec
    from ftdeploy.stages.register_vision import register_vision
    from ftdeploy.vision import serving_copy

    merged_dir = build_vision_model_dir(family, tmp_path / "merged")
    files = serving_copy(merged_dir, tmp_path / "ollama")
    spec = build_spec(mapping_for_template(read_chat_template(merged_dir), "t"), str(tmp_path / "ollama"),
                      ModelfileConfig(), None, {})
    register_vision(ollama_server.client, "vision-q8", spec, files, "q8_0", show_progress=False)
    shown = ollama_server.show_json("vision-q8")
    assert shown["details"]["quantization_level"] == "Q8_0" and "vision" in shown["capabilities"]
    import httpx

    verbose = httpx.post(f"{ollama_server.host}/api/show", json={"model": "vision-q8", "verbose": True}, timeout=60)
    tensors = {t["name"]: t["type"] for t in verbose.json()["tensors"]}
    assert tensors["blk.0.ffn_down.weight"] == "Q8_0"
    assert {t for name, t in tensors.items() if name.startswith("v.") and name.endswith("weight")} <= {"F16", "F32"}
    _, png = test_image(0, family.image_size)
    assert _served_tokens(ollama_server, "vision-q8", png)
