"""Which x86-64 CPU the native code ftdeploy runs was built for, and whether this CPU runs it.

Two native parts do the arithmetic: llama.cpp inside llama-cpp-python (quantize, quant gate) and the Ollama binary's
cgo CPU backend (serving). scripts/lib-cpu.sh builds both for a stated target (x86-64-v3 by default) and stamps the
flags beside them; a host-native build can die with SIGILL on a machine that advertises instructions it cannot run.
`ftdeploy doctor` reports what is installed from here; the tests' instruction scan (`scan`) proves it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
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


# ---------------------------------------------------------------- the instruction scan (tests, CI)
# What a scan counts beyond x86-64-v3: AMX (tile registers and instructions), AVX-512 (zmm, opmask registers, the
# EVEX-only registers xmm16-31/ymm16-31, an explicit {evex} form, EVEX-only mnemonics on xmm/ymm), AVX-VNNI.
_AMX = re.compile(r"%tmm\d|\b(?:tileloadd\w*|tilestored|tilezero|tilerelease|ldtilecfg|sttilecfg|tdp\w+)\b")
_AVX512 = re.compile(
    r"%zmm\d|%k[0-7]\b|%[xy]mm(?:1[6-9]|2\d|3[01])\b|\{evex\}|\b(?:vpternlog[dq]|vperm[it]2\w+|vpermw|vpermb|"
    r"vpcompress\w|vpexpand\w|vcompressp[sd]|vexpandp[sd]|vrndscale\w+|vgetexp\w+|vgetmant\w+|vscalef\w+|"
    r"vfixupimm\w+|vrange\w+|vreduce\w+|valign[dq]|vpro[lr]v?[dq]|vpopcnt[bwdq]|vpshl[dv]\w*|vpshr[dv]\w*|"
    r"vpmullq|vpabsq|vp(?:max|min)[su]q|vpsraq|vpsravq|vplzcnt[dq]|vpconflict[dq]|vpmultishiftqb|vdbpsadbw|"
    r"v(?:broadcast|extract|insert|shuf)[fi](?:32x4|32x8|64x2|64x4)|vcvt\w*2u\w+|vcvtu\w+|vcvt\w*qq\w*|"
    r"vcvtne2ps2bf16|vcvtneps2bf16|vdpbf16ps|vpmov[dwq][bwd]|vpmovu?s[dwq][bwd]|vpmovm2\w|vpmov\w2m)\b")
_AVX512_VNNI_NO_VEX = re.compile(r"^(?!.*\{vex\}).*\bvpdp(?:bus|wss)ds?\b")
_AVX_VNNI = re.compile(r"\{vex\}\s*vpdp(?:bus|wss)ds?\b")
_SYMBOL = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def go_text(path: Path) -> tuple[int, int] | None:
    """The address range of a Go binary's own code ([runtime.text, runtime.etext), from its symbol table), or None.
    Go's runtime carries AVX-512 code (memmove, the GC's expandAVX512_* scanners) that runs only behind Go's own
    CPU-feature checks; the C and C++ a cgo build links in (ggml) lies outside this range."""
    nm = shutil.which("nm")
    if nm is None:
        raise RuntimeError("nm (binutils) is needed to find a Go binary's own code: scripts/setup.sh installs it")
    out = subprocess.run([nm, str(path)], capture_output=True, text=True).stdout
    marks = {name: int(addr, 16) for addr, _, name in (line.split(maxsplit=2) for line in out.splitlines()
                                                         if line.count(" ") == 2)
             if name in ("runtime.text", "runtime.etext")}
    if len(marks) != 2:
        return None
    return marks["runtime.text"], marks["runtime.etext"]


def classify(instruction: str) -> str | None:
    if _AMX.search(instruction):
        return "amx"
    if _AVX_VNNI.search(instruction):
        return "avx-vnni"
    if _AVX512.search(instruction) or _AVX512_VNNI_NO_VEX.search(instruction):
        return "avx512"
    return None


def scan(path: Path, skip: tuple[int, int] | None = None) -> dict[str, Counter[str]]:
    """Instructions beyond x86-64-v3 in a native file, counted by kind, per function (where the file has symbols).
    skip: an address range to leave out (a Go binary's own code, `go_text`)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise RuntimeError("objdump (binutils) is needed for the instruction scan: scripts/setup.sh installs it")
    found: dict[str, Counter[str]] = {}
    symbol = "?"
    with subprocess.Popen([objdump, "-d", "--no-show-raw-insn", "-M", "att", str(path)], stdout=subprocess.PIPE,
                          text=True, errors="replace", bufsize=1 << 20) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line[:1] != " ":
                header = _SYMBOL.match(line.rstrip("\n"))
                if header:
                    symbol = header.group(1)
                continue
            # Every instruction counted is a v... (VEX/EVEX), k... (opmask), t... (AMX) or ..tilecfg mnemonic.
            fields = line.split("\t")
            mnemonic = fields[1] if len(fields) > 1 else ""
            if mnemonic[:1] not in ("v", "k", "t", "{") and "tilecfg" not in mnemonic:
                continue
            kind = classify(line)
            if kind and not (skip and skip[0] <= int(fields[0].strip().rstrip(":"), 16) < skip[1]):
                found.setdefault(kind, Counter())[symbol] += 1
    if proc.returncode != 0:
        raise RuntimeError(f"objdump failed on {path} (exit {proc.returncode})")
    return found
