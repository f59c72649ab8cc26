"""The GPU path, on a CUDA device (the lent H100/H200; CI has none): QLoRA with each engine, Unsloth and the
transformers + PEFT + bitsandbytes one, through the real `ftdeploy data`, `train` and `merge` commands, on a small
Llama-shaped model built here from a config (random weights: no download is possible on the device) that carries
the SmolLM2 tokenizer and chat template.

What must hold for each engine: training ran on CUDA with the engine asked for, from a 4-bit NF4 base, with
`adamw_8bit`, and learned (the loss fell); the merged model is a plain 16-bit checkpoint of the base's shape (no
quantization state left in it); and the merged model, loaded alone, has the learned behaviour: its loss on the
training answers is more than a nat under the base's.

Where llama-cpp-python is installed the run goes on through `export` (GGUF, Q4_K_M) and `modelfile`. Where it is
not (the device image), set FTDEPLOY_GPU_OUT: each run folder is packed there in parts of at most 15 MiB
(`<engine>-run.tar.part-NN`), to be brought back through the device's output folder and served here with
scripts/serve_fetched_run.sh against the real Ollama server.

The SmolLM2 tokenizer comes from FTDEPLOY_TEST_TOKENIZER (a folder with tokenizer.json and tokenizer_config.json),
else from the embedded demo base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.slow]

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the lent device)", allow_module_level=True)

PART_BYTES = 15 * 2**20


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "ftdeploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
    assert proc.returncode == 0, f"ftdeploy {args[0]}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _tokenizer_dir() -> Path:
    given = os.environ.get("FTDEPLOY_TEST_TOKENIZER")
    if given:
        return Path(given)
    from ftdeploy.base_model import resolve_base_model

    return Path(resolve_base_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """About 7.6 M parameters (6.3 M of them the tied 49,152 x 128 embedding), bf16, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("gpu-base")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _answer_loss(model_dir: Path, rows: list[dict]) -> float:
    """Mean cross-entropy over the trained (label != -100) tokens of the data stage's rows, in bf16 on CUDA."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device="cuda")
            labels = torch.tensor([row["labels"]], device="cuda")
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def _pack(run_dir: Path, out: Path, engine: str) -> list[Path]:
    """The run folder without trainer scratch, as a tar split into parts the device's output folder takes."""
    out.mkdir(parents=True, exist_ok=True)
    whole = out / f"{engine}-run.tar"
    with tarfile.open(whole, "w") as tar:
        tar.add(run_dir, arcname=run_dir.name,
                filter=lambda info: None if "-trainer" in info.name or "/checkpoints" in info.name else info)
    data, parts = whole.read_bytes(), []
    for i in range(0, len(data), PART_BYTES):
        part = out / f"{engine}-run.tar.part-{i // PART_BYTES:02d}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part)
    whole.unlink()
    return parts


@pytest.mark.parametrize("engine", ["unsloth", "hf"])
def test_qlora_trains_merges_and_exports_on_cuda(engine, base_dir, tmp_path):
    from ftdeploy.data import load_tokenized

    name = f"gpu-{engine}"
    common = ["--runs-dir", str(tmp_path), "--name", name, "--base-model", str(base_dir),
              "--set", f"train.engine={engine}", "--set", "train.max_steps=400", "--set", "train.learning_rate=0.002",
              "--set", "train.warmup_steps=5", "--set", "train.save_steps=0", "--set", "verify.compare=false"]
    for stage in ("data", "train", "merge"):
        _cli(stage, *common)
    run = tmp_path / name
    manifest = json.loads((run / "manifest.json").read_text())
    trained = manifest["metrics"]["train"]
    assert (trained["engine"], trained["device"], trained["optim"]) == (engine, "cuda", "adamw_8bit")
    losses = [h["loss"] for h in trained["loss_history"]]
    # From ln(vocab) = 10.8: a random base has little to build on, so learning shows as nats, not a ratio.
    assert losses[-1] < losses[0] - 1.0, losses

    merged = run / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # 16-bit, not the 4-bit training copy
    from safetensors import safe_open

    with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not [n for n in names if "absmax" in n or "quant" in n or "lora_" in n], names
    assert dtypes <= {"BF16", "F16", "F32"}, dtypes
    assert tuple(q_proj.shape) == (128, 128)

    rows = load_tokenized(run / "data")
    base_loss, merged_loss = _answer_loss(base_dir, rows), _answer_loss(merged, rows)
    assert merged_loss < base_loss - 1.0, (base_loss, merged_loss)

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        out = os.environ.get("FTDEPLOY_GPU_OUT")
        if out:
            parts = _pack(run, Path(out), engine)
            print(f"{engine}: base loss {base_loss:.3f}, merged {merged_loss:.3f}; packed {len(parts)} parts")
        return
    _cli("export", *common)
    _cli("modelfile", *common)
    assert (run / "Modelfile").is_file()
