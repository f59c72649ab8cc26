"""train.batch_size auto, train.gradient_checkpointing auto and data.packing auto, decided from given figures: the
model's shape, the longest example and the memory free (ftdeploy/train_auto.py), with no GPU and no model."""

import pytest

from ftdeploy.train_auto import (
    COSTS,
    OFF,
    OFFLOADED,
    ON,
    PACKED,
    PADDED,
    PADDING_FREE,
    ModelFigures,
    base_batch,
    need_bytes,
    packing_mode,
    plan_memory,
)

GIB = 2**30
# Llama-3.2-1B's shape with LoRA r16 on its 7 projections; SmolLM2-135M's (the embedded demo base).
ONE_B = ModelFigures(hidden_size=2048, layers=16, vocab=128256, trainable=11_272_192)
SMOL = ModelFigures(hidden_size=576, layers=30, vocab=49152, trainable=4_883_456)


def _gpu(free_gib, engine="unsloth", batch=2, accumulation=4, size_batch=True, checkpointing="auto", rows=1024,
         model=ONE_B):
    return plan_memory(batch=batch, accumulation=accumulation, size_batch=size_batch, checkpointing=checkpointing,
                       engine=engine, device="cuda", row_tokens=rows, model=model,
                       free_bytes=None if free_gib is None else int(free_gib * GIB))


def _cpu(free_gib, rows=2048, checkpointing="auto"):
    return plan_memory(batch=2, accumulation=4, size_batch=False, checkpointing=checkpointing, engine="hf",
                       device="cpu", row_tokens=rows, model=SMOL, free_bytes=int(free_gib * GIB))


@pytest.mark.parametrize("engine,mode,measured_gib", [
    # docs/benchmarks.md, H100, 1B shape, 8 x 1024 tokens, less about 1.1 GiB of 4-bit weights
    ("unsloth", OFF, 9.54 - 1.1), ("unsloth", OFFLOADED, 2.24 - 1.1), ("hf", OFF, 21.99 - 1.1), ("hf", ON, 4.41 - 1.1)])
def test_the_estimate_is_the_measured_memory_or_a_little_above(engine, mode, measured_gib):
    estimate = need_bytes(ONE_B, 8 * 1024, mode, COSTS[(engine, "cuda")]) / GIB
    assert measured_gib * 0.95 <= estimate <= measured_gib * 1.25


def test_on_an_h100_the_1b_shape_trains_without_checkpointing_in_one_micro_batch():
    plan = _gpu(78)
    assert (plan.batch, plan.accumulation, plan.checkpointing) == (8, 1, OFF)
    assert "batch 8 x 1 (auto)" in plan.note and "78.0 GiB free GPU" in plan.note


def test_a_smaller_gpu_keeps_the_global_batch_with_a_smaller_micro_batch():
    plan = _gpu(8)
    assert (plan.batch, plan.accumulation, plan.checkpointing) == (4, 2, OFF)
    assert plan.batch * plan.accumulation == 2 * 4


def test_checkpointing_goes_on_only_when_without_it_the_micro_batch_would_be_too_small():
    # without checkpointing only 2 x 1024 tokens fit in 3 GiB; with Unsloth's offloaded mode all 8 rows do
    plan = _gpu(3)
    assert (plan.batch, plan.accumulation, plan.checkpointing) == (8, 1, OFFLOADED)
    assert "Unsloth's offloaded mode (auto)" in plan.note
    assert _gpu(3, engine="hf").checkpointing == ON  # transformers' recomputation on the hf engine
    # short rows: without checkpointing the whole batch fits, and that is enough
    assert (_gpu(3, rows=128).batch, _gpu(3, rows=128).checkpointing) == (8, OFF)


def test_a_set_batch_is_kept_and_checkpointing_follows_the_memory():
    assert (_gpu(78, batch=8, accumulation=1, size_batch=False).checkpointing) == OFF
    tight = _gpu(3, batch=8, accumulation=1, size_batch=False)
    assert (tight.batch, tight.accumulation, tight.checkpointing) == (8, 1, OFFLOADED)
    assert "(auto)" in tight.note and "batch 8 x 1:" in tight.note


def test_set_checkpointing_is_kept_and_a_batch_that_cannot_fit_says_so():
    assert _gpu(78, checkpointing=True).checkpointing == OFFLOADED  # true on unsloth: its offloaded mode, as before
    assert _gpu(78, checkpointing=True, engine="hf").checkpointing == ON
    forced = _gpu(0.2, checkpointing=False)
    assert (forced.batch, forced.checkpointing) == (1, OFF)
    assert "may run out of memory" in forced.note
    nothing_fits = _gpu(0.05)
    assert (nothing_fits.batch, nothing_fits.accumulation, nothing_fits.checkpointing) == (1, 8, OFFLOADED)
    assert "may run out of memory" in nothing_fits.note


def test_without_memory_figures_nothing_is_sized():
    gpu = _gpu(None)
    assert (gpu.batch, gpu.accumulation, gpu.checkpointing) == (2, 4, OFFLOADED)
    assert "no memory figures" in gpu.note
    cpu = plan_memory(batch=2, accumulation=4, size_batch=False, checkpointing="auto", engine="hf", device="cpu",
                      row_tokens=64, model=None, free_bytes=None)
    assert (cpu.batch, cpu.checkpointing) == (2, OFF)


def test_on_cpu_a_small_model_trains_without_checkpointing_while_the_ram_holds_it():
    assert _cpu(16).checkpointing == OFF  # SmolLM2-135M, 2 rows of 2048 tokens: about 12 GiB in fp32
    assert "16.0 GiB free RAM" in _cpu(16).note
    assert _cpu(16, rows=64).checkpointing == OFF  # the demo's rows: a few MiB
    assert _cpu(10).checkpointing == ON
    assert _cpu(16, checkpointing=True).checkpointing == ON


def _demo_plan(checkpointing, rows):
    from ftdeploy.api import load_config

    demo = load_config().train  # the embedded demo config, which `--data my.jsonl` alone trains with
    return plan_memory(batch=demo.batch_size, accumulation=demo.gradient_accumulation, size_batch=False,
                       checkpointing=demo.gradient_checkpointing if checkpointing is None else checkpointing,
                       engine="hf", device="cpu", row_tokens=rows, model=SMOL, free_bytes=int(19.5 * GIB))


def test_the_demo_config_on_long_packed_rows_turns_checkpointing_on_instead_of_running_out_of_memory():
    """The demo config's batch of 4 on data.packing true's sequences of up to 2048 tokens needs about 24 GiB without
    checkpointing: more than a 20 GiB machine has (the kernel killed such a run). Its checkpointing is auto, so the
    plan turns it on there and keeps it off for the demo's own short rows."""
    assert _demo_plan(None, rows=2046).checkpointing == ON and _demo_plan(None, rows=2046).fits
    assert _demo_plan(None, rows=100).checkpointing == OFF
    forced = _demo_plan(False, rows=2046)  # set off by hand: a warning that says what would fit
    assert not forced.fits and forced.checkpointing == OFF
    assert forced.note.endswith("may run out of memory: set train.gradient_checkpointing to auto or true (with it "
                                "the batch fits), or lower train.batch_size, or lower data.max_seq_length")
    assert "gradient_checkpointing" not in _cpu(0.1, rows=64, checkpointing=False).note  # it would not help


def test_auto_batch_is_two_until_sized():
    assert (base_batch("auto"), base_batch(6)) == (2, 6)


@pytest.mark.parametrize("setting,method,packed,vary,mode", [
    ("auto", "sft", False, True, PADDING_FREE),
    ("auto", "sft", False, False, PADDED),  # rows of one length: padding costs nothing
    (True, "sft", True, True, PACKED),
    (True, "sft", True, False, PACKED),
    (False, "sft", False, True, PADDED),
    ("auto", "dpo", False, True, PADDED),  # the preference trainers batch their own rows
    (True, "grpo", False, True, PADDED),
])
def test_packing_mode(setting, method, packed, vary, mode):
    assert packing_mode(setting, method, packed, vary) == mode
