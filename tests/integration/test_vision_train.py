"""Training a vision model on image chats (stages/train_vision.py, data/image_labels.py, data/image_writer.py), on
the tiny models of tests/tiny_vision.py: the labels fall on the answers (never on an image's tokens, never on a turn
of weight 0), the data stage keeps each image once, `data inspect` reports the images, LoRA goes on the language model
(the vision tower too with lora.finetune_vision), a few steps lower the loss, and the merged model keeps its
processor and (Gemma 3) its SentencePiece tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO
from tiny_vision import BY_NAME, build_vision_model_dir, colour_image

pytestmark = [pytest.mark.slow]

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    return {name: build_vision_model_dir(BY_NAME[name], folder / name) for name in BY_NAME}


def chat(answer: str, first: str = "It is a picture.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize(("name", "end"), [("qwen2.5-vl", "<|im_end|>\n"), ("gemma3", "<end_of_turn>\n")])
def test_labels_fall_on_the_answers_only(bases, name, end):
    from transformers import AutoProcessor

    from ftdeploy.data.image_labels import IGNORE_INDEX, tokenize_example

    processor = AutoProcessor.from_pretrained(bases[name])
    image = colour_image(0, BY_NAME[name].image_size)
    example = tokenize_example(processor, chat("Red."), [image])
    ids = example.features["input_ids"][0].tolist()
    trained = [i for i, label in zip(ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == f"It is a picture.{end}Red.{end}"
    assert processor.image_token_id in ids and processor.image_token_id not in trained
    assert example.labels[:5] == [IGNORE_INDEX] * 5
    # a turn of weight 0 stays in the text, out of the loss, with train_on all too
    untrained = tokenize_example(processor, chat("Red."), [image], untrained=(0,))
    kept = [i for i, label in zip(ids, untrained.labels, strict=True) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(kept) == f"Red.{end}"
    every = tokenize_example(processor, chat("Red."), [image], untrained=(0,), train_on="all")
    assert sum(label != IGNORE_INDEX for label in every.labels) > len(kept) + 10
    assert processor.tokenizer.decode([i for i, label in zip(ids, every.labels, strict=True)
                                       if label != IGNORE_INDEX]).count("It is a picture.") == 0


def _data(folder, size):
    (folder / "pics").mkdir(parents=True)
    rows = []
    for i, answer in enumerate(("Red.", "Blue.")):
        (folder / "pics" / f"{i}.png").write_bytes(colour_image(i, size))
        rows.append({"conversations": [{"from": "human", "value": f"<image>{QUESTION}"},
                                       {"from": "gpt", "value": answer}], "images": [f"pics/{i}.png"]})
    rows.append({"conversations": [{"from": "human", "value": f"<image>{QUESTION}"}, {"from": "gpt", "value": "Red."}],
                 "images": ["pics/0.png"]})  # the same picture again: kept once
    rows.append({"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello!"}]})
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_inspect_reports_the_images(bases, tmp_path):
    data = _data(tmp_path, 56)
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", "data", "--base-model", str(bases["qwen2.5-vl"]),
                           "inspect", str(data), "--json"], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["format"] == "sharegpt" and out["rows"] == 4 and out["bad_rows"] == 0
    assert out["images"] == {"rows_with_images": 3, "images": 3, "per_row": {"0": 1, "1": 3},
                             "sizes": {"56x56": 3}, "smallest": "56x56", "largest": "56x56"}
    assert "<|image_pad|>x4<|vision_end|>What is in the picture?" in out["example"]["rendered"]
    assert out["example"]["rendered"].endswith("[[Red.<|im_end|>\n]]")


@pytest.mark.parametrize("finetune_vision", [False, True], ids=["language-model", "finetune-vision"])
def test_a_short_train_lowers_the_loss_and_merges(bases, tmp_path, finetune_vision):
    from transformers import AutoProcessor

    from ftdeploy.config import config_from_dict
    from ftdeploy.data.image_writer import prepare_vision_data
    from ftdeploy.stages.train_vision import fit_vision, merge_vision
    from ftdeploy.tokenizer import load_tokenizer

    name = "qwen2.5-vl"
    base = bases[name]
    cfg = config_from_dict({"base_model": str(base), "data": {"train": str(_data(tmp_path, 56))},
                            "lora": {"finetune_vision": finetune_vision},
                            "train": {"max_steps": 8, "batch_size": 2, "gradient_accumulation": 1,
                                      "learning_rate": 0.005, "warmup_steps": 0, "logging_steps": 1}})
    _, mapping = load_tokenizer(base)
    stats = prepare_vision_data(cfg.data, AutoProcessor.from_pretrained(base), mapping, tmp_path / "data", 0)
    assert (stats.rows, stats.images) == (4, 2) and len(list((tmp_path / "data" / "images").iterdir())) == 2
    metrics = fit_vision(base, tmp_path / "data", tmp_path / "adapter", cfg)
    losses = [p.loss for p in metrics.loss_history]
    assert metrics.steps == 8 and min(losses[-3:]) < losses[0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        adapted = list(fh.keys())
    assert any("language_model.layers.0.self_attn.q_proj.lora_A" in k for k in adapted)
    assert any("visual" in k for k in adapted) == finetune_vision
    assert (tmp_path / "adapter" / "processor_config.json").is_file()
    merged = merge_vision(base, tmp_path / "adapter", tmp_path / "merged")
    assert {"config.json", "model.safetensors", "processor_config.json", "chat_template.jinja"} <= {
        p.name for p in merged.iterdir()}


def test_gemma3_merge_keeps_its_sentencepiece_tokenizer(bases, tmp_path):
    """transformers 5 saves tokenizer.json only; Ollama reads Gemma 3's vocabulary from tokenizer.model (without it,
    the served model tokenizes as BPE and answers nonsense)."""
    from ftdeploy.config import config_from_dict
    from ftdeploy.stages.train_vision import load_vision_model, merge_vision

    base = bases["gemma3"]
    cfg = config_from_dict({"base_model": str(base)})
    model, processor = load_vision_model(base, cfg, "hf", on_cuda=False)
    model.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer.model").exists()
    merged = merge_vision(base, tmp_path / "adapter", tmp_path / "merged")
    assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
