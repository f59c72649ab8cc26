"""What `auto` becomes for train.batch_size, train.gradient_checkpointing and data.packing, decided from given
figures (the model's shape, the longest example, the memory free), so every choice is tested without a GPU.

Memory (plan_memory). Training needs, beyond the loaded weights, the adapter's weights, gradients and optimizer
state, and per token of a micro-batch the activations the backward pass keeps plus the loss's logits. Those per-token
costs (COSTS) were measured: on an H100 (docs/benchmarks.md, 1B shape, batch 8 x 1024, with and without
checkpointing) for each engine, and on this kind of CPU (a SmolLM2-135M shape in fp32). An estimate "fits" when it
is at most MARGIN of the memory free after the model loaded (the GPU's, or the RAM available on CPU).
  gradient checkpointing auto: off when the micro-batch fits without it (recomputing activations costs about a
    third of the step's time: Unsloth's 52,091 tokens/s fell to 34,035 with it on the 1B shape), else on: Unsloth's
    offloaded mode ("unsloth") on the unsloth engine, transformers' recomputation on hf. On CPU the same rule runs on
    the RAM available: small models train without it (RAM is plentiful, compute is what is scarce there).
  batch size auto (CUDA, SFT, one process): the largest micro-batch that divides the global batch
    (AUTO_BATCH x train.gradient_accumulation, as the default batch would give) and fits, the accumulation making up
    the rest, so the global batch, and with it what a step learns, stays the same. A micro-batch of TARGET_TOKENS
    keeps a GPU busy: when only a smaller one fits without checkpointing and a larger one fits with it, checkpointing
    goes on. Elsewhere (CPU, the preference methods and GRPO, several processes, which must agree) auto is AUTO_BATCH.
Packing (packing_mode): data.packing auto batches rows without padding (each batch's rows in one sequence, every
row with its own positions and attention) where the rows vary in length; true trains the data stage's best-fit
packed sequences the same way; both fall back to padding where the attention cannot keep rows apart.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
AUTO_BATCH = 2  # train.batch_size auto where nothing sizes it, and the micro-batch its global batch is reckoned with
MARGIN = 0.8  # an estimate fits when it is at most this share of the memory free
TARGET_TOKENS = 4096  # a micro-batch of this many tokens keeps a GPU busy
GIB = 2**30

OFF, ON, OFFLOADED = "off", "on", "unsloth"  # gradient checkpointing: none, recomputation, Unsloth's offloaded mode
PADDED, PADDING_FREE, PACKED = "padded", "padding-free", "packed"  # how rows make a batch


@dataclass(frozen=True)
class Costs:
    """Bytes a token of a micro-batch costs: per layer and unit of hidden size for its activations (all of them
    without checkpointing; with it, `stored` of them for each layer plus one layer's recomputed), and per entry of
    the vocabulary for the loss's logits."""

    activation: float
    stored: float
    logits: float


# (engine, device) -> Costs. Unsloth (bf16, fused loss): 9.54 GiB for 8 x 1024 tokens without checkpointing and 2.24
# GiB with its offloaded mode, which keeps the layer inputs in CPU memory; hf on CUDA (bf16): 21.99 and 4.41 GiB;
# hf on CPU (fp32): 3.0 and 1.6 MiB a token measured here (SmolLM2-135M's shape, sdpa, LoRA r16).
COSTS = {("unsloth", "cuda"): Costs(activation=32, stored=0, logits=0.6),
         ("hf", "cuda"): Costs(activation=75, stored=2, logits=2.2),
         ("hf", "cpu"): Costs(activation=90, stored=4, logits=32)}
TRAINABLE_BYTES = 16  # an adapter parameter: fp32 weight, gradient and two Adam moments


@dataclass(frozen=True)
class ModelFigures:
    """What the estimate reads of a model: its text decoder's shape and the adapter's parameters."""

    hidden_size: int
    layers: int
    vocab: int
    trainable: int


@dataclass(frozen=True)
class Plan:
    """The per-device batch, the accumulation, the checkpointing mode, and one line saying why; `fits`: false where
    the estimate is past the memory free (the note then says what would bring it down)."""

    batch: int
    accumulation: int
    checkpointing: str
    note: str
    fits: bool = True


def base_batch(batch_size: int | str) -> int:
    """train.batch_size as a number: auto's is AUTO_BATCH until training sizes it (plan_memory)."""
    return AUTO_BATCH if batch_size == AUTO else int(batch_size)


def need_bytes(model: ModelFigures, tokens: int, mode: str, costs: Costs) -> int:
    """Memory training needs beyond the loaded weights, for a micro-batch of `tokens` tokens."""
    h, layers = model.hidden_size, model.layers
    if mode == OFF:
        per_token = costs.activation * h * layers
    else:  # the layer inputs kept (none on the GPU when offloaded), and one layer's activations recomputed
        per_token = (0 if mode == OFFLOADED else costs.stored * h * layers) + costs.activation * h
    return int(model.trainable * TRAINABLE_BYTES + tokens * (per_token + costs.logits * model.vocab))


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_memory(*, batch: int, accumulation: int, size_batch: bool, checkpointing: bool | str, engine: str,
                device: str, row_tokens: int, model: ModelFigures | None, free_bytes: int | None) -> Plan:
    """The batch and checkpointing to train with. `batch` x `accumulation` is this process's share of the global
    batch (the configured one, or auto's AUTO_BATCH split); `size_batch`: batch_size is auto and may be sized here;
    `checkpointing`: True, False or auto; `row_tokens`: tokens of the longest example; `free_bytes`: memory free
    once the model is loaded (None: unknown, so nothing is sized: checkpointing auto is on on CUDA, off on CPU)."""
    saving = OFFLOADED if engine == "unsloth" else ON
    modes = [OFF, saving] if checkpointing == AUTO else [saving] if checkpointing else [OFF]
    costs = COSTS.get((engine, device), COSTS[("hf", device if device == "cpu" else "cuda")])
    share = batch * accumulation
    sizes = _divisors(share) if size_batch else [batch]
    if free_bytes is None or model is None:
        mode = modes[-1] if device == "cuda" else modes[0]
        return Plan(batch, accumulation, mode, f"{_said(mode, checkpointing)}, batch {batch} x {accumulation} "
                                                f"(no memory figures{'' if device == 'cuda' else ' on CPU'})")

    def first_fit(mode: str) -> int | None:
        return next((b for b in sizes if need_bytes(model, b * row_tokens, mode, costs) <= MARGIN * free_bytes),
                    None)

    found = [(mode, first_fit(mode)) for mode in modes]
    enough = min(sizes[0] * row_tokens, TARGET_TOKENS)
    chosen = next(((mode, b) for mode, b in found if b is not None and b * row_tokens >= enough), None)
    if chosen is None:  # no micro-batch large enough: the largest that fits, with the least recomputation
        fitting = [(mode, b) for mode, b in found if b is not None]
        chosen = max(fitting, key=lambda f: f[1]) if fitting else None
    warning = ""
    if chosen is None:
        chosen = (modes[-1], sizes[-1])
        warning = _remedies(checkpointing is False and first_fit(saving) is not None, sizes[-1])
    mode, b = chosen
    acc = share // b if size_batch else accumulation
    need = need_bytes(model, b * row_tokens, mode, costs)
    memory = "GPU" if device == "cuda" else "RAM"
    return Plan(b, acc, mode, f"{_said(mode, checkpointing)}, batch {b} x {acc}{' (auto)' if size_batch else ''}: "
                              f"about {_size(need)} of {free_bytes / GIB:.1f} GiB free {memory} for {b} "
                              f"row{'s' if b > 1 else ''} of up to {row_tokens} tokens{warning}", fits=not warning)


def _remedies(checkpointing_fits: bool, batch: int) -> str:
    """What a plan past the memory free says to change: checkpointing first where it was set off and would make the
    batch fit, then the batch (when above 1) and the longest sequence (data.packing true fills it)."""
    remedies = ["set train.gradient_checkpointing to auto or true (with it the batch fits)"] if checkpointing_fits \
        else []
    remedies += ["lower train.batch_size"] if batch > 1 else []
    remedies.append("lower data.max_seq_length")
    return "; may run out of memory: " + ", or ".join(remedies)


def _size(count: int) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB // 10 else f"{count / 2**20:.0f} MiB"


def _said(mode: str, setting: bool | str) -> str:
    named = {OFFLOADED: "on, Unsloth's offloaded mode"}.get(mode, mode)
    return f"gradient checkpointing {named}" + (" (auto)" if setting == AUTO else "")


def packing_mode(setting: bool | str, method: str, packed_data: bool, lengths_vary: bool) -> str:
    """How rows make a batch before the attention check: PACKED (the data stage's packed sequences, data.packing
    true), PADDING_FREE (each batch's rows in one sequence: data.packing auto where rows vary in length) or PADDED
    (data.packing false; rows of one length, where padding costs nothing; the preference methods and GRPO, whose
    trainers batch their own rows)."""
    if method != "sft" or setting is False:
        return PADDED
    if packed_data:
        return PACKED
    return PADDING_FREE if lengths_vary else PADDED
