"""Merge stage: the adapter merged into a 16-bit copy of its base (never into 4-bit weights)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import StageMissingError
from ..runs import atomic_path

log = logging.getLogger(__name__)


def merge(base: Path | str, adapter_dir: Path, merged_dir: Path, trust_remote_code: bool = False) -> Path:
    """Reload the base in 16/32-bit, apply the adapter, merge, save bf16 safetensors + tokenizer + chat template."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StageMissingError(f"{adapter_dir}: no adapter found; run `ftdeploy train` first")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_cuda = torch.cuda.is_available()
    # Merge in fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU; always save 16-bit.
    work_dtype = torch.bfloat16 if on_cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=work_dtype, trust_remote_code=trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = model.merge_and_unload()
    merged = merged.to(torch.bfloat16)
    # The pad token chosen for training is part of the model's tokenizer from now on.
    merged.config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(merged_dir) as tmp:
        save_merged(merged, tokenizer, base, tmp)
    return merged_dir


def save_merged(merged: object, tokenizer: object, base: Path | str, folder: Path) -> None:
    """The merged model as bf16 safetensors, its tokenizer (or processor) and the base's generation config (where the
    base has one) into `folder`."""
    from transformers import GenerationConfig

    merged.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(str(folder))  # type: ignore[attr-defined]
    try:
        GenerationConfig.from_pretrained(str(base)).save_pretrained(str(folder))
    except OSError:
        pass
