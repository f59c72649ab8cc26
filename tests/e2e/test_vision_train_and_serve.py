"""A vision fine-tune end to end (issue 27): `ftdeploy train-and-serve --base-model <a tiny vision model>
--data image-chats.jsonl` must train on the image chats, serve the model in the real Ollama with its vision intact
and verify it: served against merged on image prompts, and the eval rows' expected answers, which only the image
tells apart (the same question of two pictures, two answers). One tiny random model per family
(tests/tiny_vision.py), the data in three of the layouts people write (TRL parts with a row-level list, OpenAI
image_url parts, LLaMA-Factory placeholders) with a text chat mixed in."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from tiny_vision import BY_NAME, build_vision_model_dir, colour_image

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]

QUESTION = "What is in the picture?"
ANSWERS = ["Red.", "Blue."]  # tiny_vision.COLOURS, in order: two pictures a few steps of CPU training tell apart


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})


def _rows(images: list[str]) -> list[dict]:
    trl, openai, llama_factory = (
        lambda i: {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                                {"role": "assistant", "content": ANSWERS[i]}], "images": [images[i]]},
        lambda i: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i]}},
                                                             {"type": "text", "text": QUESTION}]},
                                {"role": "assistant", "content": ANSWERS[i]}]},
        lambda i: {"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                {"role": "assistant", "content": ANSWERS[i]}], "images": [images[i]]})
    rows = [layout(i) for i in range(len(ANSWERS)) for layout in (trl, openai, llama_factory)]
    return rows + [{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]}]


# The whole pipeline on the two families the issue names; every family's serving is checked against the real server
# in tests/integration/test_vision_families_real_ollama.py (its stages after training are the same code).
E2E = [BY_NAME["qwen2.5-vl"], BY_NAME["gemma3"]]
COMPARED = E2E[0]  # verify.compare (the base asked too) on one: the same code for every family, and CI time counts


@pytest.fixture(scope="module", params=E2E, ids=[f.name for f in E2E])
def vision_run(request, ollama_server, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family.name)
    base = build_vision_model_dir(family, folder / "base")
    (folder / "pictures").mkdir()
    for i in range(len(ANSWERS)):
        (folder / "pictures" / f"{i}.png").write_bytes(colour_image(i, family.image_size))
    images = [f"pictures/{i}.png" for i in range(len(ANSWERS))]
    (folder / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(images)))
    (folder / "eval.jsonl").write_text("".join(json.dumps({**row, "expect": ANSWERS[i]}) + "\n"
                                               for i, row in enumerate(_rows(images)[0:6:3])))
    name = f"vision-e2e-{family.name}"
    proc = _cli("train-and-serve", "--base-model", str(base), "--data", str(folder / "chats.jsonl"),
                "--eval-file", str(folder / "eval.jsonl"), "--runs-dir", str(folder / "runs"), "--name", name,
                "--max-steps", "40", "--quant", "f16", "--set", "train.learning_rate=0.005", "--set",
                "train.batch_size=4", "--set", "train.gradient_accumulation=1", "--set", "train.warmup_steps=0",
                "--set", f"verify.compare={family is COMPARED}", "--ollama-host", ollama_server.host, "--json")
    return family, proc, folder / "runs" / name, name


def test_a_vision_fine_tune_trains_serves_and_verifies(vision_run, ollama_server):
    family, proc, run_dir, name = vision_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    shown = ollama_server.show_json(name)
    assert "vision" in shown["capabilities"]
    verify = json.loads((run_dir / "verify.json").read_text())
    assert verify["passed"] and verify["prompt_source"] == "eval" and verify["expect_hits"] == len(ANSWERS)
    assert verify["template_parity"]["passed"]
    served = next(m for m in verify["models"] if m["role"] == "served")
    assert served["token_agreement"] == 1.0
    # verify.compare, as for text models: the base asked the same image chats (only the fine-tune tells the
    # pictures apart), and the general prompts asked to both (forgetting)
    assert served["hits"] == len(ANSWERS)
    if family is COMPARED:
        base = next(m for m in verify["models"] if m["role"] == "base")
        assert base["hits"] < len(ANSWERS) and len(base["replies"]) == len(ANSWERS)
        assert verify["forgetting"]["prompts"] == len(verify["forgetting"]["items"]) > 0
    else:
        assert not any(m["role"] == "base" for m in verify["models"]) and not verify["forgetting"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    data = manifest["stages"]["data"]["outputs"]
    assert data["rows"] == 3 * len(ANSWERS) + 1 and data["eval_rows"] == len(ANSWERS)
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["images"] == len(ANSWERS) and stats["vision"]


def test_the_served_model_tells_the_pictures_apart(vision_run, ollama_server):
    family, proc, _, name = vision_run
    assert proc.returncode == 0
    for i, answer in enumerate(ANSWERS):
        reply = ollama_server.official.chat(model=name, messages=[
            {"role": "user", "content": QUESTION, "images": [colour_image(i, family.image_size)]}],
            options={"temperature": 0, "num_predict": 16})
        assert reply.message.content.strip() == answer


def test_a_text_only_fine_tune_of_a_vision_base_keeps_its_vision(ollama_server, tmp_path):
    """A stranger's text chats (no image anywhere, no eval file, a system prompt) on a vision base: trained, served
    and verified on the vision path, so the served model still has its vision tower and sees the image."""
    family = E2E[0]
    base = build_vision_model_dir(family, tmp_path / "base")
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in (("Hi!", "Hello!"), ("What is a river?", "Water that flows."), ("Name a colour.", "Red."),
                          ("Thanks!", "You are welcome."))] * 3
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    name = f"vision-text-only-{family.name}"
    proc = _cli("train-and-serve", "--base-model", str(base), "--data", str(tmp_path / "chats.jsonl"),
                "--system-prompt", "You answer in one short sentence.", "--runs-dir", str(tmp_path / "runs"),
                "--name", name, "--max-steps", "4", "--quant", "f16", "--ollama-host", ollama_server.host)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    verify = json.loads((tmp_path / "runs" / name / "verify.json").read_text())
    # 12 rows hold none out: verify asks a sample of the training chats, with the system prompt
    assert verify["passed"] and verify["prompt_source"] == "train" and verify["system"]
    assert "vision" in ollama_server.show_json(name)["capabilities"]
    replies = {ollama_server.official.chat(model=name, messages=[
        {"role": "user", "content": QUESTION, "images": [colour_image(i, family.image_size)]}],
        options={"temperature": 0, "num_predict": 12}).message.content for i in range(len(ANSWERS))}
    assert len(replies) == len(ANSWERS), f"the served model answers both pictures alike: {replies}"
