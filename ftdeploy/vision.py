"""Vision models: which architectures ftdeploy trains and serves, and the copy of a merged model that Ollama reads.

How a vision fine-tune reaches Ollama (decided from Ollama 0.17.4's own source, the pinned server):

* Ollama converts these architectures itself on `POST /api/create` with `files` (convert/convert.go,
  `LoadModelMetadata`): Gemma3ForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VL..., Mistral3...,
  Mllama..., Llama4..., Gemma3n..., Lfm2Vl.... The result is one GGUF holding the language model, the vision tower
  (`v.*` tensors) and the projector (`mm.*`), in the layout its own engine's models read (model/models/gemma3,
  model/models/qwen25vl); `vision.block_count` in it is what gives `/api/show` the `vision` capability
  (server/images.go). `quantize` on the same request quantizes the language model and leaves `v.*` and `mm.*` at
  16 bits (server/quantization.go), as Ollama's own library models are made; it takes F16, Q8_0, Q4_K_S and Q4_K_M.
* llama.cpp's converter writes the vision tower as a second, `mmproj` GGUF. Ollama's engine refuses such a split
  model ("split vision models aren't supported", llm/server.go) and falls back to its llama.cpp compatibility runner,
  which is not the engine its gemma3/qwen25vl models run on (fs/ggml: OllamaEngineRequired lists both).

So ftdeploy uploads the merged 16-bit safetensors (with the tokenizer files) and lets Ollama convert and quantize
them: the served model is the one Ollama's own engine runs for these families. What the converter reads, and where
a checkpoint saved by transformers 5 differs from it, is made good in a serving copy (`serving_copy`):

* tokenizer: `tokenizer.model` (SentencePiece) is preferred, else `tokenizer.json` (byte-level BPE); the special
  tokens' ids come from `tokenizer.json`'s added tokens and `tokenizer_config.json`'s `bos_token`/`eos_token`, and
  whether BOS is added from `tokenizer_config.json`'s `add_bos_token`, which transformers 5 no longer writes (Gemma 3
  would be served without its BOS; LFM2-VL's template opens with it, and the Modelfile's TEMPLATE, `chatml-bos`, leaves
  it to the tokenizer); the chat template from `tokenizer_config.json`.
* config.json: the converter reads the text model's sizes at the top level (transformers 5 nests them in
  `text_config`), Qwen2.5-VL's `rope_theta` and `rope_scaling.mrope_section` (now `rope_parameters`) and its vision
  `in_chans` (now `in_channels`; without it the served model gets 0 image channels), Gemma 3's attention head counts,
  Mistral 3's `text_config.rope_parameters.factor` (absent where there is no scaling: the converter writes it as 0,
  and the engine's RoPE divides by it, making every logit NaN); Qwen3-VL's text model in `text_config` itself, its
  `rope_theta` and `rope_scaling` there and the vision tower's `rope_theta` under those names (now `rope_parameters`;
  without `rope_theta` the served model's rope base is 0).
* preprocessor_config.json: Qwen3-VL's converter reads the image sizes, mean and std there and fails without it;
  transformers 5 keeps the image processor's settings in `processor_config.json`, so the copy writes them out.
  LFM2-VL's converter reads `processor_config.json` itself (tiling, image-token limits, mean, std): the copy carries it.
* tensors: transformers 5 saves Gemma 3's vision tower as `vision_tower.*`; the converter maps
  `vision_tower.vision_model.*` (the checkpoints' layout on the Hub), so the copy renames them (the safetensors
  header only: the tensor bytes are copied as they are); LFM2-VL's `model.vision_tower.*` likewise.

What Ollama 0.17.4 computes differently from transformers, measured on tiny models of each family against the real
server (tests/integration/test_vision_families_real_ollama.py), is in each family's `served_differs`. Not measured
there (the test images need no resizing): an image whose sides are not what the model takes is resized by Ollama
with a bilinear filter (model/imageproc) where the processors use bicubic (Qwen2.5-VL) or PIL's bilinear (Gemma 3),
so its pixels differ slightly; and Ollama shrinks a Qwen2.5-VL image to at most 2,097,152 pixels where the processor
allows 12,845,056. Mistral 3: Ollama rounds an image's sides up to the patch size (14 pixels, model/models/mistral3
imageproc.go) where the processor rounds them up to patch size x spatial merge (28), so an image with an odd number of
patches a side is served with fewer image tokens (its last row and column of patches dropped by the merge: a 98-pixel
square image is 196 prompt tokens served, 204 trained), and its projector's GELU is the tanh approximation where
transformers computes the exact one (within Ollama's numeric error on the tiny model: 0.007 at most). Qwen3-VL: Ollama
numbers the text after an image from the image's first position plus its width in merged patches
(model/models/qwen3vl/model.go PostTokenize) where transformers adds the larger side (get_rope_index), so an image
taller than wide is served with other positions than trained (measured, its own test: the tiny model's greedy answer
changes, log-probabilities move by up to 0.5; square and wide images are served as trained); Ollama shrinks its images
to at most 2,097,152 pixels where the processor allows 16,777,216, and resizes them bilinearly where it uses bicubic.
LFM2-VL: its projector's GELU is the tanh approximation where transformers computes the exact one, and Ollama resizes
an image with Go's bilinear filter where the processor uses torchvision's antialiased one; measured on the tiny model
beyond the family test's image: a 128-pixel image (enlarged) and a 1024-pixel one (2 x 2 tiles and a thumbnail) move the
log-probabilities by 0.017 and 0.026, the greedy answer unchanged; wide and tall images (the position embeddings
interpolated, as transformers does) are served as trained (0.004).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelError

# What Ollama's create takes as `quantize` for a model it converts (fs/ggml/type.go ParseFileType).
OLLAMA_QUANTS = ("f16", "q8_0", "q4_k_s", "q4_k_m")
# Vision architectures Ollama 0.17.4 converts itself that ftdeploy does not carry yet (not checked end to end).
OLLAMA_CONVERTS_UNCHECKED: tuple[str, ...] = ()
# Vision architectures Ollama 0.17.4 converts but serves wrong, measured on a tiny model against the real server: a
# fine-tune of one would be registered and then answer as a different model. Refused in preflight, saying why.
OLLAMA_SERVES_WRONG = {
    "MllamaForConditionalGeneration": (
        "Ollama 0.17.4 computes its cross-attention gates with an in-place tanh (model/models/mllama/model_text.go "
        "AttentionGate.Tanh and MLPGate.Tanh; ggml_tanh_inplace), so every forward pass applies tanh to the loaded "
        "gates once more: only the first token after a load is the trained model's (measured: the same greedy chat "
        "asked three times scores -5.64, -5.95, -6.24 and changes its answer)"),
    "Llama4ForConditionalGeneration": (
        "Ollama 0.17.4 normalizes Llama 4's text model with LayerNorm, which subtracts the mean, where Llama 4 uses "
        "RMSNorm (model/models/llama4/model_text.go:111, 114, 162: nn.LayerNorm), applies the query/key norm on the "
        "NoPE layers too where transformers applies it on the RoPE layers only (model_text.go:39), and closes an "
        "image with <|image_start|> (200080) where <|image_end|> (200081) belongs (model.go:163). Measured on a tiny "
        "model: a text-only chat's served log-probabilities are up to 2.7 off the merged model's and its greedy "
        "answer differs, while the merged model with those changes gives the served ones within 0.008"),
    "Gemma3nForConditionalGeneration": (
        "Ollama 0.17.4 converts Gemma 3n as a text model: its converter drops the vision tower and its projector "
        "(convert/convert_gemma3n.go:87-92, \"TODO: handle audio and vision towers\") and its gemma3n engine has no "
        "vision model (model/models/gemma3n). Measured on a tiny model: the converted model has no v.* or mm.* "
        "tensors and no vision keys, and /api/show lists only 'completion', so the fine-tune would be served blind"),
}
# Files of a merged model that Ollama's converter reads (besides the *.safetensors).
_CONVERTER_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "generation_config.json")


@dataclass(frozen=True)
class VisionFamily:
    """One vision architecture ftdeploy trains and serves."""

    name: str  # e.g. "qwen2.5-vl"
    architecture: str  # config.json "architectures"[0]
    ollama_architecture: str  # the GGUF general.architecture Ollama's converter writes
    add_bos: bool  # the tokenizer puts BOS first (written into the serving copy's tokenizer_config.json)
    language_model: str  # a regex of the language model's linear layers (LoRA's targets by default)
    vision_tower: str  # a regex of the vision tower's and projector's linear layers (lora.finetune_vision)
    served_differs: str = ""  # what Ollama 0.17.4 computes differently from transformers for an image prompt
    # What it computes differently for some images only (not the family test's): verify says so, the test pins it.
    caveat: str = ""


_LANGUAGE = r"(?:gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj|o_proj)"
FAMILIES = {f.architecture: f for f in (
    VisionFamily("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "qwen25vl", add_bos=False,
                 language_model=rf"^(?:model\.)?(?:language_model\.)?layers\.\d+\.(?:self_attn|mlp)\.{_LANGUAGE}$",
                 vision_tower=r"^(?:model\.)?visual\.(?:blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|"
                              r"down_proj))|merger\.mlp\.\d+)$"),
    VisionFamily("gemma3", "Gemma3ForConditionalGeneration", "gemma3", add_bos=True,
                 language_model=rf"^(?:model\.)?language_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\."
                                rf"{_LANGUAGE}$",
                 vision_tower=r"^(?:model\.)?vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\."
                              r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc\d)$",
                 served_differs="Ollama 0.17.4 writes the newlines around the image as \"\\n\" + \"\\n\\n\" where "
                                "Gemma 3's processor writes \"\\n\\n\\n\" (its own tokens: model/models/gemma3 "
                                "PostTokenize), and lets the image's tokens attend to the text after the image in "
                                "the same batch (kvcache Causal Except), where transformers confines them to the "
                                "image. On the tiny test model this moves the log-probabilities by about 0.02, "
                                "15 times Ollama's own numeric error, without changing the greedy answer"),
    VisionFamily("mistral3", "Mistral3ForConditionalGeneration", "mistral3", add_bos=True,
                 language_model=rf"^(?:model\.)?language_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\."
                                rf"{_LANGUAGE}$",
                 vision_tower=r"^(?:model\.)?(?:vision_tower\.transformer\.layers\.\d+\.(?:attention\.(?:q_proj|k_proj|"
                              r"v_proj|o_proj)|feed_forward\.(?:gate_proj|up_proj|down_proj))|multi_modal_projector\."
                              r"(?:linear_[12]|patch_merger\.merging_layer))$"),
    VisionFamily("qwen3-vl", "Qwen3VLForConditionalGeneration", "qwen3vl", add_bos=False,
                 language_model=rf"^(?:model\.)?(?:language_model\.)?layers\.\d+\.(?:self_attn|mlp)\.{_LANGUAGE}$",
                 vision_tower=r"^(?:model\.)?visual\.(?:blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.linear_fc[12])|"
                              r"(?:merger|deepstack_merger_list\.\d+)\.linear_fc[12])$",
                 caveat="Ollama 0.17.4 numbers the text after an image by the image's width in merged patches "
                        "(model/models/qwen3vl/model.go PostTokenize) where transformers uses its longer side, so "
                        "answers about images taller than wide can differ from the trained model's"),
    VisionFamily("lfm2-vl", "Lfm2VlForConditionalGeneration", "lfm2", add_bos=True,
                 language_model=r"^(?:model\.)?language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|"
                                r"out_proj)|conv\.(?:in_proj|out_proj)|feed_forward\.w[123])$",
                 vision_tower=r"^(?:model\.)?(?:vision_tower\.(?:vision_model\.)?encoder\.layers\.\d+\."
                              r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])|"
                              r"multi_modal_projector\.linear_[12])$"),
)}


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else ""


def is_vision_config(config: dict[str, Any]) -> bool:
    """A model with a vision tower: its config has a vision_config (every image-text-to-text model's does)."""
    return isinstance(config.get("vision_config"), dict)


def is_vision_model(model_dir: Path) -> bool:
    return is_vision_config(read_config(model_dir))


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())


def family_of(config: dict[str, Any], where: str = "the base model") -> VisionFamily:
    """The vision family of a model's config, or a ConfigError naming the architectures that are supported."""
    arch = architecture(config)
    if arch in FAMILIES:
        return FAMILIES[arch]
    later = f" ({OLLAMA_SERVES_WRONG[arch]})" if arch in OLLAMA_SERVES_WRONG else \
        " (Ollama 0.17.4 converts it, but ftdeploy does not train and check it yet)" \
        if arch in OLLAMA_CONVERTS_UNCHECKED else ""
    raise ConfigError(f"{where} is a vision model of architecture {arch or 'unknown'}{later}: not supported. "
                      f"Vision architectures ftdeploy trains and serves: {supported()}")


def check_quants(quants: list[str]) -> None:
    """The quants Ollama's converter can make of a vision model (it quantizes on create)."""
    bad = [q for q in quants if q.lower() not in OLLAMA_QUANTS]
    if bad:
        raise ConfigError(f"export.quant {', '.join(bad)}: a vision model is quantized by Ollama itself on create, "
                          f"which makes {', '.join(OLLAMA_QUANTS)} only")


# ---------------------------------------------------------------- the serving copy


def serving_copy(merged_dir: Path, out_dir: Path) -> list[Path]:
    """The files Ollama's converter reads, in the form it reads them (see the module's doc): config.json and
    tokenizer_config.json adapted, Gemma 3's safetensors with their vision tensors renamed, the rest linked (or
    copied where links cannot be made). Returns the files, safetensors first."""
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    config = read_config(merged_dir)
    family = family_of(config, str(merged_dir))
    shards = sorted(merged_dir.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{merged_dir}: no *.safetensors weights to serve")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    files = []
    for shard in shards:
        files.append(out_dir / shard.name)
        if family.name in _VISION_TOWER_PREFIX:
            rename_tensors(shard, files[-1], functools.partial(_under_vision_model,
                                                               _VISION_TOWER_PREFIX[family.name]))
        else:
            _link(shard, files[-1])
    (out_dir / "config.json").write_text(json.dumps(converter_config(config, family), indent=2))
    for name in _CONVERTER_FILES[1:]:
        if (merged_dir / name).is_file():
            _link(merged_dir / name, out_dir / name)
    if (merged_dir / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((merged_dir / "tokenizer_config.json").read_text())
        tok_cfg.update(add_bos_token=family.add_bos, add_eos_token=False)
        (out_dir / "tokenizer_config.json").unlink()
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    if family.name == "qwen3-vl":
        _preprocessor_config(merged_dir, out_dir)
    if family.name == "lfm2-vl" and (merged_dir / "processor_config.json").is_file():
        # LFM2-VL's converter reads the image processor's tiling, token limits, mean and std there
        _link(merged_dir / "processor_config.json", out_dir / "processor_config.json")
    return files + sorted(p for p in out_dir.iterdir() if p.suffix != ".safetensors")


def converter_config(config: dict[str, Any], family: VisionFamily) -> dict[str, Any]:
    """config.json as Ollama 0.17.4's converter reads it: the text model's keys at the top level too (where the top
    level does not set them), and each family's renamed keys under their old names."""
    out = dict(config)
    text = config.get("text_config") or {}
    for key, value in text.items():
        if key not in ("architectures", "model_type", "dtype", "torch_dtype"):
            out.setdefault(key, value)
    if family.name == "qwen2.5-vl":
        rope = text.get("rope_parameters") or config.get("rope_parameters") or {}
        out.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
        scaling = text.get("rope_scaling") or config.get("rope_scaling") or {}
        section = rope.get("mrope_section") or scaling.get("mrope_section")
        if section and not (isinstance(config.get("rope_scaling"), dict) and config["rope_scaling"].get("type")):
            out["rope_scaling"] = {"type": "mrope", "mrope_section": section}
        vision = dict(config.get("vision_config") or {})
        vision.setdefault("in_chans", vision.get("in_channels", 3))
        out["vision_config"] = vision
    if family.name == "qwen3-vl":
        out.update(_qwen3vl_config(config))
    if family.name == "mistral3":
        # The converter writes text_config.rope_parameters.factor as it finds it, 0 where the checkpoint has no
        # scaling, and the engine divides by it (model/models/mistral3 RoPE: 1/0, every logit NaN): 1 is no scaling.
        rope = dict(text.get("rope_parameters") or {})
        rope["factor"] = rope.get("factor") or 1.0
        out["text_config"] = {**text, "rope_parameters": rope}
    return out


def _qwen3vl_config(config: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-VL's text_config and vision_config as the converter reads them (convert/convert_qwen3vl.go: the text
    model's keys in text_config, not at the top level): rope_theta and rope_scaling named as on the Hub (transformers
    5 writes rope_parameters; without rope_theta the served model gets a rope base of 0), the vision tower's
    rope_theta likewise. Ollama's engine reads the mrope sections and the vision position grid under keys the
    converter does not write (model/models/qwen3vl: "mrope_sections", "vision.num_positional_embeddings") and takes
    every published Qwen3-VL's, [24, 20, 20] and 2304: a checkpoint with others would be served wrong."""
    text = dict(config.get("text_config") or {})
    rope = text.get("rope_parameters") or {}
    section = rope.get("mrope_section") or (text.get("rope_scaling") or {}).get("mrope_section") or [24, 20, 20]
    text.setdefault("rope_theta", rope.get("rope_theta", 500000.0))  # Qwen3VLTextConfig's default_theta
    text.setdefault("rope_scaling", {"rope_type": rope.get("rope_type", "default"), "mrope_section": section,
                                     "mrope_interleaved": rope.get("mrope_interleaved", True)})
    vision = dict(config.get("vision_config") or {})
    vision.setdefault("rope_theta", (vision.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if list(section) != [24, 20, 20] or vision.get("num_position_embeddings", 2304) != 2304:
        raise ModelError(f"Qwen3-VL with mrope sections {section} and {vision.get('num_position_embeddings')} vision "
                         "position embeddings: Ollama 0.17.4 serves only [24, 20, 20] and 2304 (every published "
                         "Qwen3-VL's)")
    return {"text_config": text, "vision_config": vision}


def _preprocessor_config(merged_dir: Path, out_dir: Path) -> None:
    """preprocessor_config.json, which Qwen3-VL's converter requires (the image sizes, mean and std are read there):
    transformers 5 saves the image processor's settings inside processor_config.json instead."""
    own = merged_dir / "preprocessor_config.json"
    if own.is_file():
        _link(own, out_dir / own.name)
        return
    try:
        images = json.loads((merged_dir / "processor_config.json").read_text())["image_processor"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{merged_dir}: neither preprocessor_config.json nor an image processor in "
                         "processor_config.json: Ollama's Qwen3-VL converter reads the image sizes there") from err
    (out_dir / own.name).write_text(json.dumps(images, indent=2))


# Where transformers 5 saves a family's vision tower without the `vision_model.` level the converter maps (the
# Hub's layout: `vision_tower.vision_model.*`; under other names it writes tensors the engine does not read).
_VISION_TOWER_PREFIX = {"gemma3": "vision_tower.", "lfm2-vl": "model.vision_tower."}


def _under_vision_model(prefix: str, name: str) -> str:
    if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + name[len(prefix):]
    return name


def rename_tensors(src: Path, dst: Path, rename: Any) -> None:
    """A copy of safetensors file `src` with each tensor's name passed through `rename`: a new header, the data
    bytes copied as they are (no torch needed, memory flat)."""
    with open(src, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        renamed = {(k if k == "__metadata__" else rename(k)): v for k, v in header.items()}
        text = json.dumps(renamed, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as the format's writers keep it
        tmp = dst.with_name(dst.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            shutil.copyfileobj(fh, out, 16 << 20)
    os.replace(tmp, dst)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
