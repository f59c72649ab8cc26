"""The native code ftdeploy builds runs on any x86-64-v3 CPU, not only on the machine that built it (issue 23).

A host-native llama.cpp died with SIGILL (AMX `tileloadd`) on a machine that advertised AMX and could not run it.
Two kinds of proof, neither depending on what this host's CPU has:
* an instruction scan of the installed llama.cpp libraries and of the Ollama binary's cgo code: nothing beyond
  x86-64-v3 (no AVX-512, AMX or AVX-VNNI);
* the quantizer, the quant gate and an Ollama answer run as a Haswell would run them (AVX2, nothing of AVX-512 or
  AMX), under Debian's qemu-user; the same emulator kills an AVX-512 program, so it would catch one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from native_scan import go_text, scan

from ftdeploy.cpu import STAMP, cpu_flags, llama_report, target_of_cmake_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction sets are checked on x86-64 hosts"),
]

HASWELL = "Haswell"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
EXTENSION = "ftdeploy-haswell"

KINDS_C = r"""
#include <immintrin.h>
__attribute__((target("avx2,fma"))) void v3_only(float *a) {
  __m256 x = _mm256_loadu_ps(a); _mm256_storeu_ps(a, _mm256_fmadd_ps(x, x, x)); }
__attribute__((target("avx512f"))) void uses_zmm(float *a) {
  __m512 x = _mm512_loadu_ps(a); _mm512_storeu_ps(a, _mm512_add_ps(x, x)); }
__attribute__((target("avx512f,avx512vl"))) void evex_on_ymm(int *a) {
  __m256i x = _mm256_loadu_si256((void *)a); _mm256_storeu_si256((void *)a, _mm256_ternarylogic_epi32(x, x, x, 0x96)); }
__attribute__((target("avxvnni"))) void avx_vnni(int *a) {
  __m256i x = _mm256_loadu_si256((void *)a); _mm256_storeu_si256((void *)a, _mm256_dpbusd_avx_epi32(x, x, x)); }
__attribute__((target("amx-tile"))) void amx(const void *p) { _tile_loadd(0, p, 64); _tile_release(); }
"""

AVX512_PROGRAM = r"""
#include <immintrin.h>
#include <stdio.h>
__attribute__((target("avx512f"), noinline)) float twice(float *a) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(a))); }
int main(void) { float a[16] = {1}; printf("%f\n", twice(a)); return 0; }
"""


def _qemu() -> str:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is missing: scripts/setup.sh installs Debian's qemu-user")
    return qemu


def _compile(source: str, out: Path, *flags: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O2", *flags, str(src), "-o", str(out)], check=True, capture_output=True)
    return out


def _total(found: dict[str, Counter[str]]) -> dict[str, int]:
    return {kind: sum(per_symbol.values()) for kind, per_symbol in found.items()}


# ---------------------------------------------------------------- the scan

def test_the_scan_names_each_instruction_set_beyond_x86_64_v3(tmp_path: Path) -> None:
    found = scan(_compile(KINDS_C, tmp_path / "kinds.o", "-c"))
    by_kind = {kind: set(per_symbol) for kind, per_symbol in found.items()}
    assert by_kind == {"avx512": {"uses_zmm", "evex_on_ymm"}, "avx-vnni": {"avx_vnni"}, "amx": {"amx"}}
    assert not any("v3_only" in symbols for symbols in by_kind.values())


def test_the_scan_leaves_out_only_the_range_it_is_told_to(tmp_path: Path) -> None:
    obj = _compile(KINDS_C, tmp_path / "kinds.o", "-c")
    everything = scan(obj)
    assert scan(obj, skip=(0, 1 << 62)) == {}
    assert scan(obj, skip=(1 << 62, 1 << 63)) == everything


def test_the_installed_llama_cpp_is_the_portable_build() -> None:
    import llama_cpp

    stamp = Path(sys.prefix) / STAMP
    assert stamp.is_file(), f"{stamp} is missing: scripts/setup.sh stamps the flags it built llama.cpp with"
    assert target_of_cmake_args(stamp.read_text()) in ("x86-64-v3", "x86-64"), stamp.read_text()
    libraries = sorted(p for p in (Path(llama_cpp.__file__).parent / "lib").glob("*.so*") if p.is_file())
    assert any(p.name.startswith("libggml-cpu") for p in libraries), libraries
    beyond = {p.name: _total(found) for p in libraries if (found := scan(p))}
    assert beyond == {}, f"instructions beyond x86-64-v3 in llama.cpp: {beyond}"
    ok, line = llama_report(cpu_flags())  # what `ftdeploy doctor` says of it, from the library's own report
    assert ok and f"built for {target_of_cmake_args(stamp.read_text())} (" in line and "AVX512" not in line, line


def test_the_ollama_binary_runs_ggml_built_for_x86_64_v3_at_most() -> None:
    from ftdeploy.local_server import find_ollama_binary

    binary = find_ollama_binary()
    assert binary is not None, "no ollama binary: scripts/setup.sh builds it"
    symbols = subprocess.run(["nm", str(binary)], capture_output=True, text=True).stdout
    assert "ggml_graph_compute" in symbols, "the binary has no symbol table: scripts/install-ollama.sh keeps it"
    go = go_text(binary)
    assert go is not None
    everything = scan(binary)
    # Go's runtime has AVX-512 code of its own (memmove, the GC's expandAVX512_*), behind Go's CPU checks: the scan
    # sees it, and leaves it out only by address.
    assert sum(_total(everything).values()) > 0
    assert "amx" not in everything, _total(everything)
    cgo = scan(binary, skip=go)
    assert cgo == {}, f"beyond x86-64-v3 in Ollama's ggml (C/C++): { {k: dict(v) for k, v in cgo.items()} }"


# ---------------------------------------------------------------- the emulated Haswell

def test_the_emulated_haswell_kills_an_avx512_program(tmp_path: Path) -> None:
    program = _compile(AVX512_PROGRAM, tmp_path / "avx512")
    proc = subprocess.run([_qemu(), "-cpu", HASWELL, str(program)], capture_output=True, text=True, timeout=60)
    assert proc.returncode in (-4, 132), (proc.returncode, proc.stdout, proc.stderr[-300:])


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory) -> Path:
    """A Llama-shaped model with random weights, wide enough (256) for llama.cpp's K-quant blocks, as an F16 GGUF."""
    import torch
    from tiny_families import FAMILIES, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftdeploy.stages.export import convert

    root = tmp_path_factory.mktemp("haswell")
    # Llama 3.1's special tokens over a 400-piece SentencePiece model: a vocabulary small enough that the emulated
    # CPU spends its time in the transformer blocks, which llama.cpp quantizes with its K-quant kernels.
    family = next(f for f in FAMILIES if f.name == "llama3.1")
    tokenizer = build_tokenizer(family, root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return convert(root / "model", root / "tiny-f16.gguf", "f16")


QUANT_GATE = """
import json, sys
from pathlib import Path
from ftdeploy.fidelity import token_fidelity
from ftdeploy.stages.export import quantize
f16, out = Path(sys.argv[1]), Path(sys.argv[2])
quantize(f16, out, "q4_k_m")
print(json.dumps(token_fidelity(f16, out, ["hello world, the port is 7341", "what is the capital of France?"])))
"""


def test_quantize_and_the_quant_gate_run_on_a_haswell(tiny_f16: Path) -> None:
    out = tiny_f16.with_name("tiny-q4_k_m.gguf")
    proc = subprocess.run([_qemu(), "-cpu", HASWELL, sys.executable, "-c", QUANT_GATE, str(tiny_f16), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-1500:])
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scores["tokens"] > 0 and 0.0 <= scores["top1_agreement"] <= 1.0 and scores["ppl"] > 0, scores
    assert out.stat().st_size < tiny_f16.stat().st_size


def _as_root(script: str) -> subprocess.CompletedProcess:
    """A shell line as root: directly when we are root (this project's CI), else through passwordless sudo (GitHub's
    runners)."""
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    return subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True)


@pytest.fixture
def haswell_binfmt():
    """Files named *.ftdeploy-haswell run under qemu-x86_64 (as the CPU QEMU_CPU names): Ollama starts its model
    runner by executing its own binary again, and qemu-user runs only the process it started."""
    qemu = _qemu()
    entry = BINFMT / EXTENSION
    proc = _as_root(f"[ -e {BINFMT}/register ] || mount -t binfmt_misc binfmt_misc {BINFMT}; "
                    f"[ -e {entry} ] || echo ':{EXTENSION}:E::{EXTENSION}::{qemu}:' > {BINFMT}/register")
    if not entry.exists():
        pytest.fail(f"cannot register a binfmt_misc handler for *.{EXTENSION} ({proc.stderr.strip()}): "
                    "this test needs root or passwordless sudo")
    try:
        yield EXTENSION
    finally:
        _as_root(f"[ ! -e {entry} ] || echo -1 > {entry}")


def test_ollama_answers_on_a_haswell(tiny_f16: Path, tmp_path: Path, haswell_binfmt: str, monkeypatch) -> None:
    import ollama

    from ftdeploy.local_server import find_ollama_binary, free_port
    from ftdeploy.ollama import start_local_server
    from ftdeploy.stages.export import quantize

    binary = find_ollama_binary()
    assert binary is not None
    emulated = tmp_path / f"ollama.{haswell_binfmt}"
    shutil.copyfile(binary, emulated)
    emulated.chmod(0o755)
    gguf = quantize(tiny_f16, tmp_path / "tiny-q4_k_m.gguf", "q4_k_m")
    monkeypatch.setenv("QEMU_CPU", HASWELL)
    server = start_local_server(port=free_port(), models_dir=tmp_path / "models", log_path=tmp_path / "serve.log",
                                binary=emulated, wait=180, detach=False)
    try:
        client = ollama.Client(host=server.host, timeout=600)
        digest = client.create_blob(gguf)
        client.create(model="haswell-tiny", files={gguf.name: digest}, template="{{ .Prompt }}", stream=False)
        reply = client.generate(model="haswell-tiny", prompt="hello world", raw=True,
                                options={"num_predict": 4, "temperature": 0, "seed": 0})
        assert reply.done and (reply.eval_count or 0) >= 1, reply
        # The runner that produced it was emulated too, not only the server.
        runners = [pid for pid in _pids_running(emulated) if pid != server.pid]
        assert runners, (tmp_path / "serve.log").read_text()[-1500:]
        assert all(os.readlink(f"/proc/{pid}/exe").endswith("qemu-x86_64") for pid in runners)
    finally:
        server.stop()


def _pids_running(binary: Path) -> list[int]:
    pids = []
    deadline = time.monotonic() + 5
    while not pids and time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(str(binary).encode() == arg for arg in argv) and b"runner" in argv:
                pids.append(int(proc.name))
        time.sleep(0.2)
    return pids
