"""The vision serving path's pure parts (ftdeploy/vision.py, stages/verify_vision.py, pipeline/vision.py): which
architectures are carried, the serving copy Ollama's converter reads, the chat as Ollama's /api/chat takes it, and the
preflight refusal of an architecture ftdeploy does not serve."""

from __future__ import annotations

import base64
import json
import struct
from types import SimpleNamespace

import pytest

from ftdeploy.errors import ConfigError, ModelError

QWEN = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "text_config": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
                        "num_key_value_heads": 1, "intermediate_size": 256, "vocab_size": 151936,
                        "rope_parameters": {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24], "type": "mrope"}},
        "vision_config": {"depth": 2, "hidden_size": 32, "in_channels": 3}}
GEMMA = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
         "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
         "vision_config": {"hidden_size": 32}}


def safetensors(path, names, payload=b"\x01\x02\x03\x04"):
    """A safetensors file holding one 4-byte tensor under each name."""
    header = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names):
        header[name] = {"dtype": "U8", "shape": [4], "data_offsets": [4 * i, 4 * i + 4]}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload * len(names))


def read_header(path):
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def model_dir(tmp_path, config, tensors, tokenizer_config=None):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {"bos_token": "<bos>"}))
    (folder / "processor_config.json").write_text("{}")
    safetensors(folder / "model.safetensors", tensors)
    return folder


def test_qwen_serving_copy_has_the_keys_ollamas_converter_reads(tmp_path):
    from ftdeploy.vision import serving_copy

    files = serving_copy(model_dir(tmp_path, QWEN, ["model.layers.0.mlp.up_proj.weight"]), tmp_path / "ollama")
    assert [f.name for f in files] == ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "ollama" / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["num_attention_heads"] == 1 and config["vocab_size"] == 151936
    assert config["rope_theta"] == 1000000.0
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]}
    assert config["vision_config"]["in_chans"] == 3
    assert json.loads((tmp_path / "ollama" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    # the weights are the merged model's own file (linked), not a copy
    assert (tmp_path / "ollama" / "model.safetensors").stat().st_ino == \
        (tmp_path / "merged" / "model.safetensors").stat().st_ino


def test_gemma3_serving_copy_renames_the_vision_tower_and_adds_bos(tmp_path):
    from ftdeploy.vision import serving_copy

    names = ["language_model.model.layers.0.mlp.up_proj.weight", "vision_tower.encoder.layers.0.mlp.fc1.weight",
             "vision_tower.vision_model.post_layernorm.weight", "multi_modal_projector.mm_input_projection_weight"]
    serving_copy(model_dir(tmp_path, GEMMA, names), tmp_path / "ollama")
    header, data = read_header(tmp_path / "ollama" / "model.safetensors")
    assert sorted(k for k in header if k != "__metadata__") == sorted([
        "language_model.model.layers.0.mlp.up_proj.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "vision_tower.vision_model.post_layernorm.weight", "multi_modal_projector.mm_input_projection_weight"])
    assert data == b"\x01\x02\x03\x04" * 4 and header["__metadata__"] == {"format": "pt"}
    assert (8 + len(json.dumps(header, separators=(",", ":")))) % 8 in range(8)  # parsed back whole
    config = json.loads((tmp_path / "ollama" / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    tok = json.loads((tmp_path / "ollama" / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and tok["bos_token"] == "<bos>"
    # the merged model's own files are left as they were
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()) == {"bos_token": "<bos>"}
    assert "vision_tower.encoder.layers.0.mlp.fc1.weight" in read_header(tmp_path / "merged" / "model.safetensors")[0]


def test_mistral3_serving_copy_gives_the_text_rope_a_scaling_factor_of_one(tmp_path):
    """Without a factor the converter writes 0 and the served model divides by it (every logit NaN)."""
    from ftdeploy.vision import serving_copy

    mistral = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
               "text_config": {"hidden_size": 64, "rope_parameters": {"rope_theta": 1e9, "rope_type": "default"}},
               "vision_config": {"hidden_size": 32}}
    names = ["language_model.model.layers.0.mlp.up_proj.weight", "vision_tower.transformer.layers.0.ffn_norm.weight"]
    files = serving_copy(model_dir(tmp_path, mistral, names, {"bos_token": "<s>"}), tmp_path / "ollama")
    config = json.loads((tmp_path / "ollama" / "config.json").read_text())
    assert config["text_config"]["rope_parameters"] == {"rope_theta": 1e9, "rope_type": "default", "factor": 1.0}
    assert sorted(read_header(files[0])[0]) == sorted(["__metadata__", *names])  # the Hub's layout, as saved
    assert json.loads((tmp_path / "ollama" / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_qwen3_vl_serving_copy_has_the_rope_keys_and_the_preprocessor_config_the_converter_reads(tmp_path):
    """transformers 5 writes rope_parameters and keeps the image processor in processor_config.json; the converter
    reads text_config.rope_theta, vision_config.rope_theta and preprocessor_config.json (it fails without it)."""
    from ftdeploy.vision import serving_copy

    qwen3 = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
             "text_config": {"hidden_size": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                                    "mrope_section": [24, 20, 20],
                                                                    "mrope_interleaved": True}},
             "vision_config": {"depth": 3, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}}}
    folder = model_dir(tmp_path, qwen3, ["model.language_model.layers.0.mlp.up_proj.weight"])
    images = {"image_processor_type": "Qwen2VLImageProcessor", "size": {"shortest_edge": 65536,
                                                                        "longest_edge": 16777216}}
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": images, "video_processor": {}}))
    files = serving_copy(folder, tmp_path / "ollama")
    assert "preprocessor_config.json" in [f.name for f in files]
    assert json.loads((tmp_path / "ollama" / "preprocessor_config.json").read_text()) == images
    config = json.loads((tmp_path / "ollama" / "config.json").read_text())
    assert config["text_config"]["rope_theta"] == 5e6 and config["vision_config"]["rope_theta"] == 10000.0
    assert config["text_config"]["rope_scaling"]["mrope_section"] == [24, 20, 20]
    assert json.loads((tmp_path / "ollama" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    qwen3["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]  # Ollama's engine takes [24, 20, 20]
    (folder / "config.json").write_text(json.dumps(qwen3))
    with pytest.raises(ModelError, match=r"mrope sections \[16, 24, 24\]"):
        serving_copy(folder, tmp_path / "ollama")


def test_lfm2_vl_serving_copy_renames_the_vision_tower_and_carries_the_processor_config(tmp_path):
    """transformers 5 saves the vision tower as model.vision_tower.*, the converter maps
    model.vision_tower.vision_model.*; it reads the tiling and image-token limits from processor_config.json; the
    template opens with BOS, which Ollama's tokenizer then adds. LoRA's patterns find LFM2's linear layers."""
    import re

    from ftdeploy.vision import FAMILIES, serving_copy

    lfm2 = {"architectures": ["Lfm2VlForConditionalGeneration"], "model_type": "lfm2_vl",
            "text_config": {"hidden_size": 64, "model_type": "lfm2"}, "vision_config": {"hidden_size": 32}}
    names = ["model.language_model.layers.0.conv.in_proj.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
             "model.vision_tower.vision_model.post_layernorm.weight", "model.multi_modal_projector.linear_1.weight"]
    folder = model_dir(tmp_path, lfm2, names, {"bos_token": "<|startoftext|>"})
    images = {"image_processor_type": "Lfm2VlImageProcessor", "tile_size": 512, "max_image_tokens": 256}
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": images}))
    files = serving_copy(folder, tmp_path / "ollama")
    header, data = read_header(files[0])
    assert sorted(k for k in header if k != "__metadata__") == sorted([
        "model.language_model.layers.0.conv.in_proj.weight",
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "model.vision_tower.vision_model.post_layernorm.weight", "model.multi_modal_projector.linear_1.weight"])
    assert data == b"\x01\x02\x03\x04" * 4
    assert json.loads((tmp_path / "ollama" / "processor_config.json").read_text())["image_processor"] == images
    assert json.loads((tmp_path / "ollama" / "config.json").read_text())["text_config"]["hidden_size"] == 64
    assert json.loads((tmp_path / "ollama" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    family = FAMILIES["Lfm2VlForConditionalGeneration"]
    for layer in ("self_attn.out_proj", "conv.in_proj", "conv.out_proj", "feed_forward.w2"):
        assert re.search(family.language_model, f"model.language_model.layers.3.{layer}"), layer
    assert not re.search(family.language_model, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    for name in ("model.vision_tower.encoder.layers.1.self_attn.out_proj", "model.multi_modal_projector.linear_2"):
        assert re.search(family.vision_tower, name), name


@pytest.mark.parametrize(("arch", "said"), [
    ("LlavaForConditionalGeneration", "not supported"),
    ("Gemma3nForConditionalGeneration", "converts Gemma 3n as a text model"),
    ("MllamaForConditionalGeneration", "in-place tanh"),  # converted, but served wrong: why is said
    ("Llama4ForConditionalGeneration", "where Llama 4 uses RMSNorm"),
])
def test_an_architecture_not_carried_is_refused_naming_those_that_are(arch, said):
    from ftdeploy.vision import family_of

    with pytest.raises(ConfigError) as err:
        family_of({"architectures": [arch], "vision_config": {}}, "base_model /m")
    assert said in str(err.value)
    assert "Qwen2_5_VLForConditionalGeneration (qwen2.5-vl), Gemma3ForConditionalGeneration (gemma3)" in str(err.value)


def test_only_the_quants_ollama_makes_are_taken():
    from ftdeploy.vision import check_quants

    check_quants(["q4_k_m", "Q8_0", "f16"])
    with pytest.raises(ConfigError, match="q5_k_m: a vision model is quantized by Ollama itself"):
        check_quants(["q5_k_m"])


def test_image_parts_become_img_marks_in_place_with_the_images_alongside():
    from ftdeploy.stages.verify_vision import ollama_messages

    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " with "}, {"type": "image"}]},
            {"role": "assistant", "content": "Same."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    out = ollama_messages(chat, [b"one", b"two", b"three"])
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "user", "content": "Compare [img] with [img]",
                      "images": [base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()]}
    assert out[2] == {"role": "assistant", "content": "Same."}
    assert out[3] == {"role": "user", "content": "[img]And this?", "images": [base64.b64encode(b"three").decode()]}


def _ctx(tmp_path, config, **settings):
    from ftdeploy.config import config_from_dict

    base = tmp_path / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(config))
    cfg = config_from_dict({"base_model": str(base), **settings})
    return SimpleNamespace(cfg=cfg, base_if_local=lambda: base)


def test_preflight_refuses_an_unsupported_vision_base_and_settings_a_vision_run_cannot_take(tmp_path):
    from ftdeploy.pipeline.vision import check_vision_base

    with pytest.raises(ConfigError, match="LlavaForConditionalGeneration: not supported. Vision architectures"):
        check_vision_base(_ctx(tmp_path / "a", {"architectures": ["LlavaForConditionalGeneration"],
                                                "vision_config": {}}), ["data", "train"])
    check_vision_base(_ctx(tmp_path / "b", QWEN), ["data", "train", "export"])
    with pytest.raises(ConfigError, match="export.quant q6_k"):
        check_vision_base(_ctx(tmp_path / "c", QWEN, export={"quant": ["q6_k"]}), ["export"])
    with pytest.raises(ConfigError, match="train.method dpo: vision models train with sft only"):
        check_vision_base(_ctx(tmp_path / "d", QWEN, train={"method": "dpo"}), ["train"])
    check_vision_base(_ctx(tmp_path / "e", {"architectures": ["LlamaForCausalLM"]}), ["data", "train"])  # text
    # A checkpoint Ollama would serve wrong fails here, before training, not at export
    odd = {"architectures": ["Qwen3VLForConditionalGeneration"], "vision_config": {},
           "text_config": {"rope_parameters": {"rope_theta": 5e6, "mrope_section": [16, 24, 24]}}}
    with pytest.raises(ModelError, match=r"mrope sections \[16, 24, 24\]"):
        check_vision_base(_ctx(tmp_path / "f", odd), ["data", "train"])


def test_the_cli_fails_in_preflight_before_any_stage(tmp_path):
    from click.testing import CliRunner

    from ftdeploy.cli import cli

    base = tmp_path / "llava"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"],
                                                  "vision_config": {}}))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    result = CliRunner().invoke(cli, ["train-and-serve", "--base-model", str(base), "--data", str(data),
                                      "--runs-dir", str(tmp_path / "runs"), "--ollama-host", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "Vision architectures ftdeploy trains and serves: Qwen2_5_VLForConditionalGeneration" in result.output
    assert not (tmp_path / "runs" / "ftdeploy-demo" / "data").exists()
