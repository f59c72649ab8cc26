"""An instruction scan for the portability tests (issue 23): which instructions beyond x86-64-v3 a native file holds.

Used by tests/integration/test_portable_builds.py (the installed llama.cpp, the Ollama binary) and
tests/container/test_compose.py (the same inside the images). objdump and nm come from binutils (scripts/setup.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

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
