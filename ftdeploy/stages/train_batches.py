"""How the training rows become batches, and the memory plan the model is trained with (train.py's build_trainer).

Packing without contamination. A padding-free batch is its rows end to end in one sequence, with no attention mask:
`position_ids` restart at 0 for each row and the first label of each row is -100 (transformers'
DataCollatorWithFlattening), so no row's first token is predicted from the previous row's last. transformers
(5.x) turns such position_ids into block-diagonal attention itself: masking_utils finds the rows where the positions
restart (sdpa, eager and flex attention), flash attention runs varlen over them. data.packing auto batches the rows
this way (the same rows a step as padding, so the same loss and gradients, without computing pad tokens); true
trains the data stage's best-fit packed sequences, each split back into its rows (`seq_lengths`) the same way.

Before training, keeps_rows_apart runs the model on two rows end to end and checks that the second row's logits are
its logits alone, not those it gets attending to the first: an attention implementation (or an engine's kernel)
that ignores the restarting positions fails it, and training falls back to padded batches with a one-line notice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, split_global_batch
from ..data import IGNORE_INDEX
from ..errors import DataError
from ..strategy import world_size
from ..train_auto import (
    AUTO,
    PACKED,
    PADDED,
    ModelFigures,
    Plan,
    base_batch,
    packing_mode,
    plan_memory,
)

log = logging.getLogger(__name__)

PROBE_TOKENS = 12  # tokens of each of the two rows the attention check runs


def split_rows(feature: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a packed sequence (its `seq_lengths`), or the row itself."""
    lengths = feature.get("seq_lengths")
    if not lengths:
        return [feature]
    rows, at = [], 0
    for n in lengths:
        rows.append({"input_ids": feature["input_ids"][at:at + n], "labels": feature["labels"][at:at + n]})
        at += n
    return rows


class FlatCollator:
    """Padding-free batches: every row of the batch (each packed sequence's rows) end to end in one sequence, positions
    restarting at 0 for each, each row's first label -100 (DataCollatorWithFlattening), no attention mask. With flash
    attention, the rows' boundaries go along as its varlen arguments too (cu_seq_lens); for Unsloth, whose attention
    kernels read them from the batch, as `packed_seq_lengths` (unsloth.utils.packing)."""

    def __init__(self, flash: bool = False, unsloth: bool = False):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                  return_flash_attn_kwargs=flash)
        self.unsloth = unsloth

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for f in features for row in split_rows(f)]
        batch = self.flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        if self.unsloth:
            import torch

            batch["packed_seq_lengths"] = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int32)
        if not bool((batch["labels"] != IGNORE_INDEX).any()):
            raise DataError(
                "a training batch has every label masked (nothing to learn); check train_on and the chat template")
        return batch


def attention_name(model: Any) -> str:
    """The attention implementation the model runs (sdpa, eager, flash_attention_2, ...; "" when it names none)."""
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def keeps_rows_apart(model: Any, first: list[int], second: list[int], collator: FlatCollator | None = None) -> bool:
    """Whether the model, given two rows as `collator` batches them for training (end to end, positions restarting,
    no attention mask), keeps the second row from attending to the first: its logits must be (within float noise)
    those it has alone, and nowhere near those it has attending to the first row (the same ids and positions with an
    all-ones mask). A model that cannot run such a batch at all does not keep them apart."""
    import torch

    collator = collator or FlatCollator()
    device = model.get_input_embeddings().weight.device

    def logits(rows: list[list[int]]) -> Any:
        batch = collator([{"input_ids": r, "labels": r} for r in rows])
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        # no cache, as in training: transformers looks for rows in the positions only without one
        return model(**inputs, use_cache=False).logits[0, -len(second):].float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone, packed = logits([second]), logits([first, second])
            ids = torch.tensor([first + second], device=device)
            positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
            crossed = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                            use_cache=False).logits[0, len(first):].float()
    except Exception as exc:  # noqa: BLE001 - any failure to run a packed batch means padding instead
        log.debug("the attention check could not run a packed batch: %s: %s", type(exc).__name__, exc)
        return False
    finally:
        model.train(was_training)
    leak = float((packed - alone).abs().max())
    cross = float((crossed - alone).abs().max())
    return leak == 0.0 or leak <= 0.5 * cross


def _probe_rows(rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Two rows' first tokens, for keeps_rows_apart (a single row serves as both)."""
    found = [(r["input_ids"] * 2)[:PROBE_TOKENS] for f in rows[:2] for r in split_rows(f)][:2]
    return found[0], found[-1]


@dataclass(frozen=True)
class Setup:
    """How a training was set up, for the manifest: the plan (batch, accumulation, checkpointing), how rows made
    batches (train_auto's PADDED, PADDING_FREE or PACKED) and the attention implementation."""

    plan: Plan
    packing: str
    attention: str


@dataclass
class Batches:
    """The rows the trainer's dataset holds, the collator that batches them, how (train_auto's PADDED,
    PADDING_FREE or PACKED) and the attention implementation."""

    rows: list[dict[str, Any]]
    collator: Any
    packing: str
    attention: str


def sft_batches(model: Any, rows: list[dict[str, Any]], setting: bool | str, padded: Any,
                engine: str = "hf") -> Batches:
    """data.packing's batches for SFT (`padded`: the padding collator), after the attention check."""
    attention = attention_name(model)
    packed_data = bool(rows) and "seq_lengths" in rows[0]
    mode = packing_mode(setting, "sft", packed_data, len({len(r["input_ids"]) for r in rows}) > 1)
    if mode == PADDED:  # packed data trained with data.packing false: its rows, each padded on its own
        return Batches([row for f in rows for row in split_rows(f)] if packed_data else rows, padded, PADDED, attention)
    flat = FlatCollator(flash=attention.startswith("flash"), unsloth=engine == "unsloth")
    if engine == "unsloth":
        _allow_unsloth_overlength(model)
    if keeps_rows_apart(model, *_probe_rows(rows), collator=flat):
        what = "best-fit packed sequences" if mode == PACKED else "padding-free batches"
        log.info("train: %s (data.packing %s): each row keeps its own positions and attention (%s checked)", what,
                 str(setting).lower(), attention or "the model's attention")
        return Batches(rows, flat, mode, attention)
    log.warning("data.packing %s: the model's attention (%s) does not keep rows apart in one sequence; training on "
                "padded batches instead", str(setting).lower(), attention or "unnamed")
    unpacked = [row for f in rows for row in split_rows(f)] if packed_data else rows
    return Batches(unpacked, padded, PADDED, attention)


def _allow_unsloth_overlength(model: Any) -> None:
    """Unsloth refuses a sequence longer than its max_seq_length unless told the model takes packed batches, whose
    rows together may be longer (unsloth.utils.packing.mark_allow_overlength, as its own padding-free training)."""
    try:
        from unsloth.utils.packing import mark_allow_overlength
    except ImportError:  # an Unsloth without packing: the check decides
        return
    mark_allow_overlength(model)


# ---------------------------------------------------------------- the memory plan


def example_tokens(rows: list[dict[str, Any]], cfg: Config) -> int:
    """Tokens of the longest example a micro-batch holds one of: an SFT row (or packed sequence); a preference row's
    prompt with its longest answer, twice (DPO and ORPO run both answers, KTO its answer and the KL one); a GRPO
    answer with its prompt."""
    method = cfg.train.method
    if method == "sft":
        return max((len(r["input_ids"]) for r in rows), default=1)
    if method == "grpo":  # the prompts are text here: a token holds at least one character (and the template's)
        prompt = max((len(json.dumps(r.get("prompt"), ensure_ascii=False)) for r in rows), default=0) + 64
        return min(prompt, cfg.data.max_seq_length) + cfg.grpo.max_completion_length
    answers = ("chosen_ids", "rejected_ids", "completion_ids")
    return 2 * max((len(r["prompt_ids"]) + max(len(r.get(k, ())) for k in answers) for r in rows), default=1)


def model_figures(model: Any, cfg: Config) -> ModelFigures | None:
    """The text decoder's shape and the adapter's parameters (lora.r x (in + out) of each targeted projection), read
    from the loaded model before its adapter is added; None when its config names no such shape."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, layers, vocab = int(text.hidden_size), int(text.num_hidden_layers), int(text.vocab_size)
    except (AttributeError, TypeError):
        return None
    targets = set(cfg.lora.target_modules)
    trainable = sum(cfg.lora.r * (int(m.in_features) + int(m.out_features)) for name, m in model.named_modules()
                    if name.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features"))
    return ModelFigures(hidden, layers, vocab, trainable)


def free_memory(on_cuda: bool) -> int | None:
    """Bytes free for training: the GPU's free memory, or on CPU the RAM available (within the container's limit,
    where there is one); None when it cannot be read."""
    if on_cuda:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            available = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError):
        return None
    room = _cgroup_room()
    return min(available, room) if available is not None and room is not None else available


def _cgroup_room() -> int | None:
    """The container's memory limit less what it uses (cgroup v2, else v1); None without a limit."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        root = Path("/sys/fs/cgroup")
        try:
            cap = (root / limit).read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:
                return None
            return int(cap) - int((root / usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def planner(cfg: Config, engine: str, on_cuda: bool, rows: list[dict[str, Any]]) -> Callable[[Any], Plan]:
    """plan_for(model): the batch and checkpointing to train the loaded model with (train_auto.plan_memory on its
    figures and the memory then free), logged in one line. Several processes size nothing (each would measure its
    own memory, and they must agree on the batch); nor does a sharding strategy, whose memory is not the loaded
    model's."""

    def plan_for(model: Any) -> Plan:
        measured = world_size(cfg) == 1
        plan = _plan(cfg, engine, on_cuda, example_tokens(rows, cfg), model_figures(model, cfg) if measured else None,
                     free_memory(on_cuda) if measured else None)
        (log.info if plan.fits else log.warning)("train: %s", plan.note)
        return plan

    return plan_for


def unmeasured_plan(cfg: Config, engine: str, on_cuda: bool) -> Plan:
    """The plan with nothing measured (no model loaded): the configured batch, auto's AUTO_BATCH; checkpointing auto
    on on CUDA, off on CPU."""
    return _plan(cfg, engine, on_cuda, 0, None, None)


def _plan(cfg: Config, engine: str, on_cuda: bool, row_tokens: int, model: ModelFigures | None,
          free_bytes: int | None) -> Plan:
    t = cfg.train
    batch, accumulation = split_global_batch(base_batch(t.batch_size), t.gradient_accumulation, world_size(cfg),
                                             t.keep_global_batch)
    return plan_memory(batch=batch, accumulation=accumulation,
                       size_batch=t.batch_size == AUTO and on_cuda and t.method == "sft" and free_bytes is not None,
                       checkpointing=t.gradient_checkpointing, engine=engine, device="cuda" if on_cuda else "cpu",
                       row_tokens=row_tokens, model=model, free_bytes=free_bytes)
