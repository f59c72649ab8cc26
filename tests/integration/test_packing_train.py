"""Packing without contamination, for real on the CPU engine: a tiny random-weight Llama through the trainer
`ftdeploy train` builds, with the attention implementation the CPU has (sdpa).

A packed batch (its rows end to end, positions restarting, no attention mask) must give the loss and the gradients
its rows give one at a time: no row attends to another or is predicted from another's last token. Where the
attention implementation cannot keep rows apart, training pads instead, with a notice.
"""

import json
import logging

import pytest
from conftest import build_tiny_model_dir, chat_mapping

pytestmark = pytest.mark.slow

# Rows of different lengths, the first tokens of some unlabelled (a prompt), every row's first label set.
ROWS = [([5, 9, 14, 20, 31, 7, 8], [5, 9, 14, 20, 31, 7, 8]),
        ([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [-100, -100, -100, -100, 44, 45, 46, 47, 48, 49, 50, 51,
                                                                52]),
        ([60, 61, 62, 63], [60, 61, 62, 63]),
        ([70, 71, 72, 73, 74, 75, 76, 77, 78, 79], [-100, -100, 72, 73, 74, 75, 76, 77, 78, 79])]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base", pad="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from ftdeploy.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base)[0]


def _cfg(*extra):
    from ftdeploy.config import load_config

    return load_config(None, ["train.engine=hf", "train.max_steps=4", "train.warmup_steps=0", "train.save_steps=0",
                              "train.gradient_accumulation=1", "train.learning_rate=0.01", "data.max_seq_length=64",
                              *extra])


def _rows():
    return [{"input_ids": ids, "labels": labels} for ids, labels in ROWS]


def test_a_packed_batch_gives_the_loss_and_gradients_of_its_rows_one_at_a_time(tiny_base, tokenizer, tmp_path):
    import torch

    from ftdeploy.stages.train import PadCollator, build_trainer
    from ftdeploy.stages.train_batches import FlatCollator

    trainer, _ = build_trainer(tiny_base, _rows(), _cfg(), tokenizer, "hf", str(tmp_path / "out"), False)
    setup = trainer.ftdeploy_setup
    assert (setup.packing, setup.attention, setup.plan.checkpointing) == ("padding-free", "sdpa", "off")
    assert isinstance(trainer.data_collator, FlatCollator)
    model = trainer.model
    model.train()
    with torch.no_grad():  # LoRA's B starts at zero, which leaves A no gradient: random B gives every weight one
        torch.manual_seed(0)
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)

    def loss_and_grads(batches):
        """TRL's loss over `batches` as one optimizer step sums it (each a token sum over the step's tokens),
        and the adapter's gradients."""
        model.zero_grad()
        tokens = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        loss = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=tokens) for b in batches)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    pad = PadCollator(tokenizer.pad_token_id)
    alone_loss, alone_grads = loss_and_grads([pad([row]) for row in _rows()])
    packed_sequence = {"input_ids": ROWS[0][0] + ROWS[1][0], "labels": ROWS[0][1] + ROWS[1][1],
                       "seq_lengths": [len(ROWS[0][0]), len(ROWS[1][0])]}
    for batch in (FlatCollator()(_rows()),  # padding-free: data.packing auto
                  FlatCollator()([packed_sequence, *_rows()[2:]]),  # a best-fit packed sequence: data.packing true
                  pad(_rows())):  # padded: data.packing false
        loss, grads = loss_and_grads([batch])
        assert torch.allclose(loss, alone_loss, rtol=1e-5, atol=1e-6), (loss, alone_loss)
        assert sum(g.abs().sum() for g in grads.values()) > 0
        for name, grad in grads.items():
            assert torch.allclose(grad, alone_grads[name], rtol=1e-4, atol=1e-6), name
    # The old packing (rows concatenated, positions running on, one attention span) is not the same training.
    crossed = {"input_ids": [t for ids, _ in ROWS for t in ids], "labels": [t for _, lab in ROWS for t in lab]}
    crossed_loss, _ = loss_and_grads([pad([crossed])])
    assert not torch.allclose(crossed_loss, alone_loss, rtol=1e-3, atol=1e-4)


def test_an_attention_that_lets_rows_mix_trains_padded_with_a_one_line_notice(tiny_base, caplog):
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ftdeploy.stages.train import PadCollator
    from ftdeploy.stages.train_batches import keeps_rows_apart, sft_batches

    def causal_over_everything(module, query, key, value, attention_mask, **kwargs):
        """An attention that ignores every mask: one causal span over the whole sequence, rows and all."""
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("ftdeploy_test_one_span", causal_over_everything)
    mixing = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32,
                                                  attn_implementation="ftdeploy_test_one_span")
    sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    assert keeps_rows_apart(sdpa, ROWS[0][0], ROWS[2][0])
    assert not keeps_rows_apart(mixing, ROWS[0][0], ROWS[2][0])

    packed = [{"input_ids": ROWS[0][0] + ROWS[2][0], "labels": ROWS[0][1] + ROWS[2][1],
               "seq_lengths": [len(ROWS[0][0]), len(ROWS[2][0])]},
              {"input_ids": ROWS[1][0], "labels": ROWS[1][1], "seq_lengths": [len(ROWS[1][0])]}]
    padded = PadCollator(0)
    with caplog.at_level(logging.INFO, logger="ftdeploy"):
        batches = sft_batches(mixing, packed, True, padded)
    assert (batches.packing, batches.collator, batches.attention) == ("padded", padded, "ftdeploy_test_one_span")
    # the packed sequences' rows, each on its own (padded, they cannot attend to each other)
    assert [r["input_ids"] for r in batches.rows] == [ROWS[0][0], ROWS[2][0], ROWS[1][0]]
    notices = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert "data.packing true" in notices[0].getMessage() and "padded batches" in notices[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftdeploy"):
        kept = sft_batches(sdpa, packed, True, padded)
    assert kept.packing == "packed" and kept.rows == packed
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_packed_data_trains_and_the_manifest_says_how(tiny_base, tokenizer, tmp_path, caplog):
    """The data stage's best-fit packed sequences train through fit, and the metrics (the manifest's metrics.train)
    record the packing, the checkpointing and the batch chosen."""
    from ftdeploy.config import DataConfig
    from ftdeploy.data import prepare_data
    from ftdeploy.results import TrainMetrics, TrainResult
    from ftdeploy.stages.train import fit

    chats = [{"messages": [{"role": "user", "content": "What port does the Zephyr service use?" + " hello" * (i % 4)},
                           {"role": "assistant", "content": "The Zephyr service uses port 7341."}]} for i in range(12)]
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in chats))
    stats = prepare_data(DataConfig(train=str(source), eval_split=0, packing=True, max_seq_length=400), tokenizer,
                         chat_mapping(tokenizer), tmp_path / "data", seed=0)
    packed = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(packed) <= stats.rows // 4 and all(sum(p["seq_lengths"]) <= 400 for p in packed)

    with caplog.at_level(logging.INFO, logger="ftdeploy"):
        metrics = fit(tiny_base, tmp_path / "data", tmp_path / "adapter",
                      _cfg("data.packing=true", "train.max_steps=4", "data.max_seq_length=400"), tokenizer)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert f"{len(packed)} packed sequences of 12 rows, 4 steps" in caplog.text  # not "3 examples" for 12 rows
    assert metrics.steps == 4 and metrics.loss_history[-1].loss < metrics.loss_history[0].loss
    assert (metrics.packing, metrics.gradient_checkpointing, metrics.attention) == ("packed", "off", "sdpa")
    assert (metrics.per_device_batch, metrics.gradient_accumulation) == (2, 1)  # auto on CPU: 2
    assert "gradient checkpointing off (auto)" in metrics.plan and "free RAM" in metrics.plan
    stored = json.loads(json.dumps(metrics.to_dict()))
    assert TrainMetrics.from_dict(stored) == metrics
    result = TrainResult.from_dict(stored)
    assert (result.packing, result.gradient_checkpointing, result.attention) == ("packed", "off", "sdpa")
