"""scripts/install-ollama.sh builds Ollama's CPU backend for the x86-64 level the host has, stamps the flags, and
rebuilds a cached binary that was built with other flags. `go` is a fake here that records what it was given."""

from __future__ import annotations

import os
import platform
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-ollama.sh"
V3 = "fpu sse sse2 avx avx2 fma f16c bmi1 bmi2 movbe abm xsave aes"
OLD = "fpu sse sse2 sse4_1 sse4_2 avx xsave aes"  # an x86-64 CPU without AVX2

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86-64 level is read on x86-64 only")

FAKE_GO = """#!/bin/sh
echo "$CGO_CFLAGS|$CGO_CXXFLAGS" >> "$FAKE_GO_LOG"
printf '#!/bin/sh\\necho "ollama version is 0.17.4"\\n' > "$GOBIN/ollama"
chmod +x "$GOBIN/ollama"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if not Path("/usr/include/nlohmann/json.hpp").is_file() or not Path("/usr/include/stb/stb_image.h").is_file():
        pytest.fail("nlohmann-json3-dev and libstb-dev are missing: scripts/setup.sh installs them")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    go.write_text(FAKE_GO)
    go.chmod(go.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    (cache / "ollama" / "v0.17.4" / "include" / "miniaudio").mkdir(parents=True)
    (cache / "ollama" / "v0.17.4" / "include" / "miniaudio" / "miniaudio.h").write_text("/* present */\n")
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_CPU_FLAGS"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FTDEPLOY_CACHE=str(cache), OLLAMA_VERSION="v0.17.4",
               FAKE_GO_LOG=str(tmp_path / "go.log"), FTDEPLOY_CPUINFO=str(tmp_path / "cpuinfo"))
    return env


def install(env: dict[str, str], cpu_flags: str, **extra: str) -> tuple[str, list[str]]:
    Path(env["FTDEPLOY_CPUINFO"]).write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
    proc = subprocess.run(["bash", str(SCRIPT)], env={**env, **extra}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = Path(env["FAKE_GO_LOG"])
    return proc.stdout.strip(), log.read_text().splitlines() if log.exists() else []


def test_builds_for_x86_64_v3_when_the_cpu_has_it_and_reuses_the_binary(env: dict[str, str]) -> None:
    path, builds = install(env, V3)
    assert path == f"{env['FTDEPLOY_CACHE']}/ollama/v0.17.4/ollama"
    assert builds == ["-O3 -march=x86-64-v3|-O3 -march=x86-64-v3"]
    assert (Path(path).parent / "cpu-flags").read_text().strip() == "-march=x86-64-v3"
    _, builds = install(env, V3)
    assert len(builds) == 1  # cached: go was not run again


def test_a_cpu_without_avx2_gets_the_baseline_and_a_binary_for_other_flags_is_rebuilt(env: dict[str, str]) -> None:
    install(env, V3)
    _, builds = install(env, OLD)
    assert builds[-1] == "-O3 |-O3 "  # no -march: baseline x86-64
    assert (Path(env["FTDEPLOY_CACHE"]) / "ollama" / "v0.17.4" / "cpu-flags").read_text().strip() == ""


def test_ollama_cpu_flags_overrides_the_detection(env: dict[str, str]) -> None:
    _, builds = install(env, V3, OLLAMA_CPU_FLAGS="")
    assert builds == ["-O3 |-O3 "]
