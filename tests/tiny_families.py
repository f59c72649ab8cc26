"""Tiny models of each chat family ftdeploy serves: the family's architecture with random weights, a tokenizer that
carries the family's special tokens, and the family's real chat template (tests/data). Seconds to build, a few
hundred KB to a few MB as a GGUF.

Tokenizers. llama.cpp's converter identifies a byte-level BPE tokenizer by hashing how it splits a fixed text, and
refuses one it does not know; SmolLM2's tokenizer (the embedded demo base) hashes to a known one ("smollm") and added
special tokens leave the hash alone, so the families without BOS (Qwen3, Phi-4, Phi-4-mini) reuse it. The hash
includes BOS, though, and transformers gives every Qwen2 model its own pre-tokenizer: those families get a
SentencePiece `tokenizer.model` trained here in milliseconds instead, with the special tokens as pieces of it, which
the converter reads without a hash (and which Gemma 2 and Phi-3's converters require anyway).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"

# Every family is built at this shape: 2 layers of width 64. Head size 16 keeps Q8_0's 32-wide blocks whole.
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048}

# Words of the probe chats (ftdeploy.stages.verify.PARITY_CHATS) for the SentencePiece vocabularies.
_SP_CORPUS = ["Name three colors.", "You answer in one short sentence.", "What is a river?", "Hi!",
              "Hello! How can I help?", "Tell me a fact about the sea.", "system user assistant model",
              "The Zephyr service uses port 7341. What port does the Zephyr service use?"] * 20


@dataclass(frozen=True)
class Family:
    """One chat family: what its tiny model is built of, and the ftdeploy chat format it must map to."""

    name: str  # the test id
    chat_format: str  # the ftdeploy.templates format its chat template must map to
    architecture: str  # the transformers model class, e.g. "Gemma2ForCausalLM"
    template_file: str  # its real chat template, under tests/data/
    specials: tuple[str, ...]  # the family's special tokens: each must be a single token in the GGUF
    bos: str | None
    eos: str
    add_bos: bool = False  # the tokenizer puts BOS before every sequence (Llama, Gemma, Mistral)
    sentencepiece: bool = False  # a trained SentencePiece tokenizer.model instead of SmolLM2's BPE
    tokenizer_class: str | None = None  # written into tokenizer_config.json (the converter reads it for Phi)
    system_role: bool = True  # the chat template takes a system message (Gemma 2's raises on one)
    config: dict[str, Any] = field(default_factory=dict)  # config keys beyond TINY_SHAPE
    # Why this family cannot pass yet, and the exception that says so: a strict xfail, lifted the moment it passes.
    xfail: tuple[str, type[Exception]] | None = None

    def template(self) -> str:
        return (DATA / self.template_file).read_text()


_DEEPSEEK = ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")

FAMILIES = (
    Family("qwen2.5", "chatml", "Qwen2ForCausalLM", "tool_templates/qwen2.5.jinja",
           ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"),
           bos=None, eos="<|im_end|>", sentencepiece=True),
    Family("llama3.1", "llama3", "LlamaForCausalLM", "tool_templates/llama3.1.jinja",
           ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
            "<|python_tag|>"),
           bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, sentencepiece=True),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", "chat_templates/qwen3.jinja",
           ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"),
           bos=None, eos="<|im_end|>"),
    Family("deepseek-r1-distill-llama", "deepseek-r1", "LlamaForCausalLM", "chat_templates/deepseek-r1.jinja",
           (*_DEEPSEEK, "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<think>", "</think>"),
           bos=_DEEPSEEK[0], eos=_DEEPSEEK[1], add_bos=True, sentencepiece=True),
    Family("gemma2", "gemma", "Gemma2ForCausalLM", "chat_templates/gemma2.jinja", ("<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<eos>", add_bos=True, sentencepiece=True, tokenizer_class="GemmaTokenizer",
           system_role=False, config={"query_pre_attn_scalar": 16, "sliding_window": 512}),
    Family("gemma3", "gemma", "Gemma3ForCausalLM", "chat_templates/gemma3.jinja", ("<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<eos>", add_bos=True, sentencepiece=True, tokenizer_class="GemmaTokenizer",
           config={"query_pre_attn_scalar": 16, "sliding_window": 512}),
    Family("mistral-v3", "mistral-v3", "MistralForCausalLM", "chat_templates/mistral-v3.jinja",
           ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]"),
           bos="<s>", eos="</s>", add_bos=True, sentencepiece=True),
    Family("mistral-nemo", "mistral-v3-tekken", "MistralForCausalLM", "chat_templates/mistral-v3-tekken.jinja",
           ("[INST]", "[/INST]"), bos="<s>", eos="</s>", add_bos=True, sentencepiece=True),
    Family("mistral-v7", "mistral-v7", "MistralForCausalLM", "chat_templates/mistral-v7.jinja",
           ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
           bos="<s>", eos="</s>", add_bos=True, sentencepiece=True),
    Family("phi3", "phi3", "Phi3ForCausalLM", "chat_templates/phi3.jinja",
           ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"),
           bos="<s>", eos="<|end|>", sentencepiece=True, tokenizer_class="LlamaTokenizer", config={"pad_token_id": 0}),
    Family("phi4-mini", "phi4-mini", "Phi3ForCausalLM", "chat_templates/phi4-mini.jinja",
           ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>", "<|endoftext|>"),
           bos="<|endoftext|>", eos="<|endoftext|>", tokenizer_class="GPT2Tokenizer"),
    Family("phi4", "phi4", "Phi3ForCausalLM", "chat_templates/phi4.jinja",
           ("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"),
           bos="<|endoftext|>", eos="<|im_end|>", tokenizer_class="GPT2Tokenizer"),
)


# ---------------------------------------------------------------- builders


def smollm2_tokenizer_dir() -> Path:
    """The embedded demo base's Hugging Face directory (materialised once into the shared ftdeploy cache)."""
    from ftdeploy.base_model import resolve_base_model

    return Path(resolve_base_model("smollm2-135m-instruct"))


def _smollm2_tokenizer(family: Family, folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


def _sentencepiece_tokenizer(family: Family, folder: Path):
    """A SentencePiece BPE model with byte fallback (as Gemma's and Llama 2's are): pad, eos, bos and unk first, then
    the family's special tokens as pieces; loaded back through the family's transformers tokenizer class."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    bos = family.bos or "<s>"
    eos = family.eos if family.eos not in family.specials else "</s>"  # a chat special as EOS stays a piece of its own
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece=eos,
        bos_piece=bos, unk_piece="<unk>", user_defined_symbols=[t for t in family.specials if t not in (bos, eos)],
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": family.tokenizer_class or "LlamaTokenizer", "bos_token": bos, "eos_token": family.eos,
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": family.add_bos, "add_eos_token": False}))
    return AutoTokenizer.from_pretrained(folder)


def build_tokenizer(family: Family, folder: Path):
    """The family's tokenizer: its special tokens (special, never split), BOS, EOS and chat template."""
    from tokenizers import AddedToken

    tok = (_sentencepiece_tokenizer if family.sentencepiece else _smollm2_tokenizer)(family, folder)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials], special_tokens=True)
    tok.chat_template = family.template()
    tok.eos_token = family.eos
    if family.bos:
        tok.bos_token = family.bos
    return tok


def build_model_dir(family: Family, path: Path, seed: int = 0) -> Path:
    """A merged-model directory as the merge stage leaves one: config, random safetensors weights, tokenizer files
    with the chat template."""
    import torch
    import transformers

    model_cls = getattr(transformers, family.architecture)
    tokenizer = build_tokenizer(family, path)
    ids = {key: tokenizer.convert_tokens_to_ids(token)
           for key, token in (("bos_token_id", family.bos), ("eos_token_id", family.eos)) if token}
    config = model_cls.config_class(**{**TINY_SHAPE, "vocab_size": len(tokenizer), **ids, **family.config})
    config.architectures = [family.architecture]
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tok_cfg_path = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    # What the converter reads from tokenizer_config.json: whether BOS is added, and (Phi) the tokenizer class.
    tok_cfg.update(add_bos_token=family.add_bos, add_eos_token=False)
    if family.tokenizer_class:
        tok_cfg["tokenizer_class"] = family.tokenizer_class
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return path
