"""Which x86-64 CPU the native code ftdeploy runs was built for, and whether this CPU runs it.

Two native parts do the arithmetic: llama.cpp inside llama-cpp-python (quantize, quant gate) and the Ollama binary's
cgo CPU backend (serving). scripts/lib-cpu.sh builds both for a stated target (x86-64-v3 by default) and stamps the
flags beside them; a host-native build can die with SIGILL on a machine that advertises instructions it cannot run.
`ftdeploy doctor` reports what is installed from here; the tests' instruction scan (tests/native_scan.py) proves it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# llama.cpp's system-info feature names -> the /proc/cpuinfo flag each needs.
LLAMA_FEATURES: dict[str, str] = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
# gcc's x86-64-v3 (what -march=x86-64-v3 lets the compiler use).
X86_64_V3 = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "xsave")
STAMP = "llama_cpp_python.cmake-args"  # written by scripts/setup.sh into .venv and beside the cached wheel


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def target_of_cmake_args(args: str) -> str:
    """The target scripts/lib-cpu.sh names for the CMAKE_ARGS it wrote."""
    if "-DGGML_NATIVE=ON" in args:
        return "native"
    if "-DGGML_NATIVE=OFF" in args:
        return "x86-64-v3" if "-DGGML_AVX2=ON" in args else "x86-64"
    return "unknown"


def target_of_cgo_flags(flags: str) -> str:
    match = re.search(r"-march=(\S+)", flags)
    return match.group(1) if match else "x86-64"


_SYSTEM_INFO = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode(errors='replace'))"


def llama_features() -> set[str] | str:
    """The instruction sets the installed llama.cpp CPU backend was compiled with (its own report), or why it could
    not tell. Asked in a child process: a library built for another CPU may die with SIGILL as it loads."""
    try:
        proc = subprocess.run([sys.executable, "-c", _SYSTEM_INFO], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "loading it took over 120 s"
    if proc.returncode < 0:
        return f"loading it killed the process with signal {-proc.returncode}"
    if proc.returncode != 0:
        return "it does not load: " + (proc.stderr.strip().splitlines() or ["no message"])[-1]
    return {name for name, value in re.findall(r"([A-Z0-9_]+) = (\d+)", proc.stdout) if value == "1"}


def llama_report(flags: set[str]) -> tuple[bool, str]:
    """(runs here, one line) for the installed llama.cpp."""
    stamp = Path(sys.prefix) / STAMP
    target = target_of_cmake_args(stamp.read_text()) if stamp.is_file() else "unstamped (not built by setup.sh)"
    features = llama_features()
    if isinstance(features, str):
        return False, f"built for {target}; {features}: rebuild it with scripts/setup.sh"
    built = sorted(f for f in features if f in LLAMA_FEATURES)
    lacking = [f for f in built if LLAMA_FEATURES[f] not in flags] if flags else []
    beyond = [f for f in built if f.startswith(("AVX512", "AMX"))]
    line = f"built for {target} ({' '.join(built) or 'baseline'})"
    if lacking:
        return False, f"{line}: this CPU lacks {', '.join(lacking)}; rebuild it with scripts/setup.sh"
    if beyond:
        return True, (f"{line}: uses {', '.join(beyond)}, which a VM may advertise and not run (SIGILL); "
                      "the portable build is scripts/setup.sh without FTDEPLOY_CPU_TARGET=native")
    return True, f"{line}: this CPU runs it"


def ollama_report(binary: Path, flags: set[str]) -> tuple[bool, str]:
    """(runs here, one line) for a local Ollama binary built by scripts/install-ollama.sh (its stamp beside it)."""
    stamp = binary.resolve().parent / "cpu-flags"
    if not stamp.is_file():
        return True, ("not built by install-ollama.sh: its publisher's build "
                      "(official releases pick a CPU library at run time)")
    target = target_of_cgo_flags(stamp.read_text().strip())
    if target == "x86-64-v3" and flags and not set(X86_64_V3) <= flags:
        return False, (f"built for {target}; this CPU lacks {', '.join(sorted(set(X86_64_V3) - flags))}: "
                       "rerun scripts/install-ollama.sh")
    if target == "native":
        return True, f"built for {target} (this build host only): rerun scripts/install-ollama.sh for a portable build"
    return True, f"built for {target}: this CPU runs it"
