"""Tiny vision models of each family ftdeploy serves: the family's architecture with random weights, its real
processor configuration and chat template, and a tokenizer holding the family's special tokens at the ids Ollama's
engine hard-codes for them. Built in seconds, no hub needed.

Why the vocabularies are full size: Ollama's engine writes the image tokens itself, by id (model/models/qwen25vl:
<|vision_start|> 151652, <|image_pad|> 151655, <|vision_end|> 151653; model/models/gemma3: "\\n\\n" 108,
<start_of_image> 255999, <end_of_image> 256000), so the tokenizers have Qwen2.5's 151,665 and Gemma 3's 262,144 entries:
the family's special tokens at their real ids, a small trained vocabulary for the text, and unused fillers between.

* Qwen2.5-VL: SmolLM2's byte-level BPE vocabulary and merges (the demo base's) under Qwen2's pre-tokenizer, its own
  special tokens moved out of the way, fillers up to 151,643 and Qwen2.5's 22 added tokens after.
* Qwen3-VL: the same, with Qwen3's 26 added tokens (<tool_response> </tool_response> <think> </think> last); its
  engine (model/models/qwen3vl) writes the image tokens by the same ids as Qwen2.5-VL's.
* Gemma 3: a SentencePiece BPE model trained here in milliseconds, its pieces placed among Gemma 3's fixed ones
  (<pad> <eos> <bos> <unk> <mask> 0-4, <start_of_turn> 105, <end_of_turn> 106, "\\n" 107, "\\n\\n" 108, the image
  markers) in a 262,144-piece tokenizer.model (Ollama reads SentencePiece for Gemma), and <image_soft_token> 262144.
* Mistral 3: Tekken's 1,000 special tokens first (<unk> <s> </s> [INST] [/INST] ... [IMG] 10, [IMG_BREAK] 12,
  [IMG_END] 13, [SYSTEM_PROMPT] 17 ..., <SPECIAL_n> up to 999), SmolLM2's byte-level BPE vocabulary and merges after
  them, fillers up to 131,072, under Tekken's pre-tokenizer (Ollama's engine hard-codes it: model/models/mistral3).
* LFM2-VL: LFM2's specials first (<|pad|> <|startoftext|> <|endoftext|> ... <|im_start|> 6, <|im_end|> 7), <image> 396,
  <|img_row_R_col_C|> 397-496, <|img_thumbnail|> 497, <|image_start|> 498, <|image_end|> 499 (the converter finds the
  markers by text, the engine takes <image> from config.json's image_token_id), SmolLM2's vocabulary after them,
  fillers up to 65,536, under the Llama 3 pre-tokenizer (the engine's for LFM2).

Shapes follow what Ollama 0.17.4 can serve: Qwen2.5-VL's text head size must be 128 (its converter writes no
rope.dimension_count, and the engine's default is 128); Gemma 3 must have 256 image tokens (the engine reads
mm_tokens_per_image under a key the converter does not write, and falls back to 256), so 64-pixel images in 4-pixel
patches. Weights are drawn so that greedy answers vary with the prompt and the image (a random Gemma with tied
embeddings repeats its last token, so the tiny one's are untied). Qwen3-VL: text head size 128, mrope sections
[24, 20, 20] and a 48 x 48 vision position grid (the engine reads none of them from the converter's GGUF), and more
text layers than deepstack ones (see _qwen3); 256-pixel images, the fewest pixels its processor and Ollama take
unenlarged (65,536). LFM2-VL: tied embeddings (the converter maps no lm_head), 256-pixel images: 16 x 16 patches, the
vision tower's position grid as LFM2-VL's is, 64 image tokens.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiny_families import smollm2_tokenizer_dir

DATA = Path(__file__).resolve().parent / "data"

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>")
QWEN3_ADDED = QWEN_ADDED + ("<tool_response>", "</tool_response>", "<think>", "</think>")  # Qwen3's 151665-151668
QWEN_FIRST_SPECIAL = 151643
QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")
GEMMA_PIECES = 262144
GEMMA_FIXED = {0: ("<pad>", 3), 1: ("<eos>", 3), 2: ("<bos>", 3), 3: ("<unk>", 2), 4: ("<mask>", 4),
               105: ("<start_of_turn>", 4), 106: ("<end_of_turn>", 4), 107: ("\n", 1), 108: ("\n\n", 1),
               255999: ("<start_of_image>", 4), 256000: ("<end_of_image>", 4)}
GEMMA_IMAGE_TOKEN = 262144
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
MISTRAL_VOCAB = 131072
TEKKEN_PRETOKENIZE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                      r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
LFM2_SPECIALS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
                 "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
                 "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>")
# <image>; after it <|img_row_R_col_C|> 397-496 (row-major), <|img_thumbnail|> 497, <|image_start|> 498,
# <|image_end|> 499, as LFM2-VL has them (Ollama's own test: model/models/lfm2/model_multimodal_test.go)
LFM2_IMAGE_TOKEN = 396
LFM2_VOCAB = 65536
LLAMA3_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = ["Name three colors.", "You answer in one short sentence.", "What is a river?", "Hi!",
           "What is in the picture?", "Describe the image.", "It is red. It is blue. A square on a gradient.",
           "Hello! How can I help?", "system user assistant model", "The Zephyr service uses port 7341."] * 20


@dataclass(frozen=True)
class VisionFamily:
    """One vision family's tiny model: how it is built, and what its test asks of the served model."""

    name: str
    architecture: str
    template_file: str  # its real chat template, under tests/data/
    image_size: int  # the test images' side: a size each processor (and Ollama) takes as it is, no resizing
    # Why this family cannot pass yet, and the exception that says so: a strict xfail, lifted the day it passes.
    xfail: tuple[str, type[Exception]] | None = None

    def template(self) -> str:
        return (DATA / self.template_file).read_text()


FAMILIES = (
    VisionFamily("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "vision_templates/qwen2.5-vl.jinja", 56),
    VisionFamily("gemma3", "Gemma3ForConditionalGeneration", "chat_templates/gemma3.jinja", 64),
    # Mistral Small 3.1's template; 112 pixels: 8 x 8 patches of 14, merged 2 x 2 (the processor rounds an image up to
    # 28 pixels, Ollama to 14)
    VisionFamily("mistral3", "Mistral3ForConditionalGeneration", "chat_templates/mistral-v7.jinja", 112),
    # 256 pixels: Qwen3-VL's processor (and Ollama) enlarge an image of fewer than 65,536 pixels
    VisionFamily("qwen3-vl", "Qwen3VLForConditionalGeneration", "vision_templates/qwen3-vl.jinja", 256),
    # 256 pixels: the fewest LFM2-VL's processor (and Ollama) take unenlarged (64 image tokens), and 16 x 16 patches,
    # the vision tower's position grid, which neither side then interpolates
    VisionFamily("lfm2-vl", "Lfm2VlForConditionalGeneration", "vision_templates/lfm2-vl.jinja", 256),
)
BY_NAME = {f.name: f for f in FAMILIES}


# ---------------------------------------------------------------- tokenizers


def qwen_tokenizer(folder: Path, extra: tuple[str, ...] = QWEN_ADDED) -> Any:
    from transformers import AutoTokenizer

    smol = json.loads((smollm2_tokenizer_dir() / "tokenizer.json").read_text())
    vocab = smol["model"]["vocab"]
    for added in smol["added_tokens"]:  # SmolLM2's own specials (<|im_start|> at 1, ...) make way for Qwen's
        del vocab[added["content"]]
        vocab[f"<|smollm2_special_{added['id']}|>"] = added["id"]
    for i in range(len(vocab), QWEN_FIRST_SPECIAL):
        vocab[f"<|filler_{i}|>"] = i
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    smol.update(
        added_tokens=[{"id": QWEN_FIRST_SPECIAL + i, "content": t, "single_word": False, "lstrip": False,
                       "rstrip": False, "normalized": False, "special": t in QWEN_SPECIALS}
                      for i, t in enumerate(QWEN_SPECIALS + extra)],
        normalizer={"type": "NFC"}, post_processor=level, decoder=level,
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PRETOKENIZE}, "behavior": "Isolated", "invert": False},
            level]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(smol, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "add_prefix_space": False, "errors": "replace", "model_max_length": 32768}))
    return AutoTokenizer.from_pretrained(folder)


def gemma_tokenizer(folder: Path) -> Any:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    trained_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=trained_bytes, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    trained = pb.ModelProto()
    trained.ParseFromString(trained_bytes.getvalue())
    fixed = {piece for piece, _ in GEMMA_FIXED.values()}
    rest = iter([p for p in trained.pieces[4:] if p.piece not in fixed])
    model = pb.ModelProto()
    model.CopyFrom(trained)
    del model.pieces[:]
    for i in range(GEMMA_PIECES):
        piece = model.pieces.add()
        if i in GEMMA_FIXED:
            piece.piece, piece.type = GEMMA_FIXED[i]
            piece.score = {"\n": -0.5, "\n\n": -1.0}.get(piece.piece, 0.0)
        elif i > 108 and (learned := next(rest, None)) is not None:
            piece.CopyFrom(learned)
        else:
            piece.piece, piece.type, piece.score = f"<unused{i}>", 5, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"}}))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken("<image_soft_token>", special=True, normalized=False)], special_tokens=True)
    assert tok.convert_tokens_to_ids("<image_soft_token>") == GEMMA_IMAGE_TOKEN
    return tok


def _fixed_then_smollm2(folder: Path, fixed: list[str], size: int, pretokenize: str, config: dict) -> Any:
    """A tokenizer whose first ids are a family's fixed tokens (its specials at their real ids), SmolLM2's byte-level
    BPE vocabulary and merges after them (SmolLM2's own specials, ids 0-16, make way), fillers up to `size`, under
    the family's pre-tokenizer regex."""
    from transformers import AutoTokenizer

    smol = json.loads((smollm2_tokenizer_dir() / "tokenizer.json").read_text())
    own = {added["content"] for added in smol["added_tokens"]}
    vocab = {text: i - len(own) + len(fixed) for text, i in smol["model"]["vocab"].items() if text not in own}
    vocab.update({text: i for i, text in enumerate(fixed)})
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), size)})
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    smol["model"]["vocab"] = vocab
    smol.update(
        added_tokens=[{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                       "normalized": False, "special": True} for i, t in enumerate(fixed)],
        normalizer=None, post_processor=level, decoder=level,
        pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pretokenize}, "behavior": "Isolated", "invert": False},
            level]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(smol, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return AutoTokenizer.from_pretrained(folder)


def mistral_tokenizer(folder: Path) -> Any:
    """Tekken's specials at their real ids ([IMG] 10, [IMG_BREAK] 12, [IMG_END] 13), 1000 of them, then SmolLM2's
    vocabulary, up to 131,072 ids, under Tekken's pre-tokenizer (Ollama's engine hard-codes both)."""
    specials = list(MISTRAL_SPECIALS) + [f"<SPECIAL_{i}>" for i in range(len(MISTRAL_SPECIALS), 1000)]
    return _fixed_then_smollm2(folder, specials, MISTRAL_VOCAB, TEKKEN_PRETOKENIZE, {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": 131072})


def lfm2_tokenizer(folder: Path) -> Any:
    """LFM2's fixed tokens first (its specials, fillers, the image tokens at 396-499), SmolLM2's byte-level BPE
    vocabulary and merges after them, fillers up to 65,536, under the Llama 3 pre-tokenizer Ollama's engine uses for
    LFM2 (model/models/lfm2 New)."""
    grid = [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]
    fixed = [*LFM2_SPECIALS, *(f"<|reserved_{i}|>" for i in range(len(LFM2_SPECIALS), LFM2_IMAGE_TOKEN)), "<image>",
             *grid, "<|img_thumbnail|>", "<|image_start|>", "<|image_end|>"]
    tok = _fixed_then_smollm2(folder, fixed, LFM2_VOCAB, LLAMA3_PRETOKENIZE, {
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "model_max_length": 128000})
    assert tok.convert_tokens_to_ids(["<image>", "<|img_thumbnail|>", "<|image_end|>"]) == [396, 497, 499]
    return tok


# ---------------------------------------------------------------- models


def _qwen(folder: Path, tok: Any) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    clip = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    # Qwen2.5-VL's preprocessor_config.json values
    images = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                   merge_size=2, **clip)
    videos = Qwen2VLVideoProcessor(**clip)
    processor = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                                    chat_template=tok.chat_template)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1,
                     "num_key_value_heads": 1, "vocab_size": 151936, "max_position_embeddings": 4096,
                     "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 128,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [1]},
        tie_word_embeddings=True, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _draw(model, {"": 0.2})
    return model, processor


def _qwen3(folder: Path, tok: Any) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    # Qwen3-VL's preprocessor_config.json values
    images = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                   temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=tok.chat_template)
    # Ollama's engine takes the text head size, mrope sections and position-embedding grid as every Qwen3-VL has
    # them (128, [24, 20, 20], 48 x 48): the converter writes none of them where the engine reads them. More text
    # layers than deepstack layers: the engine adds a deepstack output after the last layer's rows are cut to the
    # outputs' and crashes (model/models/qwen3vl/model.go Forward), which no published Qwen3-VL is near
    config = Qwen3VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                     "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151645},
        vision_config={"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 2304, "deepstack_visual_indexes": [0, 1]},
        tie_word_embeddings=True, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653)
    model = Qwen3VLForConditionalGeneration(config)
    _draw(model, {"": 0.2})
    return model, processor


def _gemma(folder: Path, tok: Any) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    images = Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  resample=2, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template,
                                image_seq_length=256)
    config = Gemma3Config(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 262208, "query_pre_attn_scalar": 16,
                     "sliding_window": 512, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": False},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 4, "vision_use_head": False},
        mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000, image_token_index=GEMMA_IMAGE_TOKEN,
        tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(config)
    _draw(model, {"multi_modal": 0.1, "vision": 0.2, "embed": 0.2, "": 0.05})
    return model, processor


def _mistral3(folder: Path, tok: Any) -> tuple[Any, Any]:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    # Mistral Small 3.1's preprocessor_config.json and processor_config.json values
    images = PixtralImageProcessor(size={"longest_edge": 1540}, patch_size=14, resample=3)
    processor = PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=14, spatial_merge_size=2,
                                 chat_template=tok.chat_template)
    # rms_norm_eps 1e-5: Ollama's engine takes it for the projector's norm (it reads a key the converter does not write)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": MISTRAL_VOCAB,
                     "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
                     "sliding_window": None, "tie_word_embeddings": False},
        vision_config={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "head_dim": 16, "patch_size": 14, "image_size": 1540,
                       "hidden_act": "silu", "rope_theta": 10000.0},
        image_token_index=10, spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
        vision_feature_layer=-1, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(config)
    _draw(model, {"vision": 0.2, "multi_modal": 0.2, "embed": 0.2, "lm_head": 0.3, "": 0.1})
    return model, processor


def _lfm2_vl(folder: Path, tok: Any) -> tuple[Any, Any]:
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration, Lfm2VlImageProcessor, Lfm2VlProcessor

    # LFM2-VL-1.6B's processor_config.json values
    images = Lfm2VlImageProcessor(downsample_factor=2, do_image_splitting=True, min_tiles=2, max_tiles=10,
                                  use_thumbnail=True, min_image_tokens=64, max_image_tokens=256, encoder_patch_size=16,
                                  tile_size=512, max_pixels_tolerance=2.0, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Lfm2VlProcessor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    # Tied embeddings, as every LFM2's: the converter maps no lm_head (convert/convert_lfm2.go), the engine takes the
    # token embeddings for the output. Short-convolution layers between attention layers, as LFM2 has them
    config = Lfm2VlConfig(
        text_config={"model_type": "lfm2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": LFM2_VOCAB,
                     "max_position_embeddings": 4096, "norm_eps": 1e-5, "conv_L_cache": 3,
                     "block_auto_adjust_ff_dim": False,
                     "layer_types": ["conv", "full_attention", "conv", "full_attention"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                     "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, "tie_word_embeddings": True},
        vision_config={"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 16, "num_patches": 256,
                       "vision_use_head": False},
        image_token_id=LFM2_IMAGE_TOKEN, projector_hidden_size=64, downsample_factor=2, tie_word_embeddings=True)
    model = Lfm2VlForConditionalGeneration(config)
    # embeddings smaller than the layers' weights: with tied embeddings the answer otherwise repeats its last token
    _draw(model, {"vision": 0.2, "multi_modal": 0.2, "embed": 0.1, "": 0.2})
    return model, processor


def _draw(model: Any, stds: dict[str, float]) -> None:
    """Every weight matrix drawn from N(0, std), std by the first key found in its name; norms and biases as made
    (Gemma's projector starts at zero, which would make every image look the same)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name and not name.endswith("bias"):
                param.normal_(0, next(std for key, std in stds.items() if key in name))


def build_vision_model_dir(family: VisionFamily, path: Path, seed: int = 0) -> Path:
    """A merged-model directory as the merge stage leaves one: config, random fp32 safetensors, tokenizer and
    processor files, the chat template."""
    import torch

    if family.name == "mistral3":
        tok = mistral_tokenizer(path)
    elif family.name == "qwen3-vl":
        tok = qwen_tokenizer(path, QWEN3_ADDED)
    elif family.name == "lfm2-vl":
        tok = lfm2_tokenizer(path)
    else:
        tok = (qwen_tokenizer if family.name == "qwen2.5-vl" else gemma_tokenizer)(path)
    tok.chat_template = family.template()
    torch.manual_seed(seed)
    build = {"qwen2.5-vl": _qwen, "qwen3-vl": _qwen3, "mistral3": _mistral3, "lfm2-vl": _lfm2_vl}.get(family.name,
                                                                                                     _gemma)
    model, processor = build(path, tok)
    model.config.architectures = [family.architecture]
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ---------------------------------------------------------------- images


def test_image(seed: int, size: int) -> tuple[Any, bytes]:
    """A gradient of a colour drawn from `seed` (distinct images look distinct to a random vision tower, where noise
    averages out), as a PIL image and as PNG bytes; `size` pixels square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    x = np.linspace(0, 1, size)[None, :, None]
    y = np.linspace(0, 1, size)[:, None, None]
    pixels = (base * (1 - x) + (255 - base) * y * x).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(pixels, (size, size, 3)).copy())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return image, buf.getvalue()


test_image.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


COLOURS = ((230, 20, 20), (20, 40, 230), (20, 200, 40), (128, 128, 128))  # red, blue, green, grey


def colour_image(index: int, size: int) -> bytes:
    """A plain picture of COLOURS[index] with a dark square in a corner that moves with it, as PNG bytes: pictures a
    random vision tower tells apart well (the e2e test's images, each with its own answer)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLOURS[index])
    corner = [(0, 0), (size // 2, 0), (0, size // 2), (size // 2, size // 2)][index]
    ImageDraw.Draw(image).rectangle([corner, (corner[0] + size // 2 - 1, corner[1] + size // 2 - 1)], fill=(10, 10, 10))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
