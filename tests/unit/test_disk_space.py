"""The set-up scripts stop with a sentence about disk space, not an unrelated failure, when the disk is full
(on a disk with a few MiB free, `python -m venv` fails with only `ensurepip ... returned non-zero exit status 1`),
and they stop before they write: no venv, no wheel built, no image pulled or built."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _need_space(directory: Path, gib: int, what: str) -> subprocess.CompletedProcess:
    script = f'. scripts/lib-disk.sh; need_space "$1" {gib} "$2"'
    return subprocess.run(["bash", "-c", script, "setup.sh", str(directory), what], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_too_little_space_names_the_disk_what_is_free_and_what_for(tmp_path):
    proc = _need_space(tmp_path / "not" / "made" / "yet", 10**7, "a first install into .venv")
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith("setup.sh: only ") and " MiB free on the disk holding " in message
    assert str(tmp_path) in message, "the nearest existing folder is the one measured and named"
    assert "a first install into .venv needs about 10000000 GiB" in message


def test_enough_space_says_nothing(tmp_path):
    proc = _need_space(tmp_path, 0, "anything")
    assert (proc.returncode, proc.stderr) == (0, "")


def _almost_full_disk(tmp_path: Path) -> dict[str, str]:
    """An environment whose `df` reports 1 MiB free on every disk, and a log of the commands that would write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "df").write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                                "echo 'fake 100000000 99998976 1024 100% /'\n")
    (bin_dir / "df").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}


def _calls(env: dict[str, str]) -> list[str]:
    log = Path(env["CALLS"])
    return log.read_text().splitlines() if log.exists() else []


def _setup_sh_copy(tmp_path: Path, env: dict[str, str], venv: bool) -> Path:
    """scripts/setup.sh with what it reads, in a folder of its own, run with $PYTHON answering its version check and
    logging anything else (`-m venv`); `venv`: with a .venv whose python answers the script's questions and logs
    every pip command (each one fails, as an empty wheelhouse would)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "scripts/lib-disk.sh", "scripts/lib-cpu.sh", "pyproject.toml"):
        shutil.copy(REPO / name, repo / name)
    env["PYTHON"] = str(tmp_path / "bin" / "system-python")
    _stub(Path(env["PYTHON"]), f'[ "$1" = -c ] && exec {sys.executable} "$@"')
    if venv:
        (repo / ".venv" / "bin").mkdir(parents=True)
        _stub(repo / ".venv" / "bin" / "python", '[ "$1" = -c ] && { echo cp311; exit 0; }')
    return repo


def _stub(path: Path, first: str) -> None:
    """An executable that runs `first`, then logs its command line and fails."""
    path.write_text(f'#!/bin/sh\n{first}\necho "{path.name} $*" >> "$CALLS"\nexit 1\n')
    path.chmod(0o755)


def _run(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_a_first_setup_on_a_full_disk_stops_before_making_the_venv(tmp_path):
    env = _almost_full_disk(tmp_path)
    repo = _setup_sh_copy(tmp_path, env, venv=False)
    proc = _run(repo / "scripts" / "setup.sh", env)
    assert proc.returncode == 1
    assert "setup.sh: only 1 MiB free" in proc.stderr and "a first install into .venv" in proc.stderr, proc.stderr
    assert _calls(env) == [] and not (repo / ".venv").exists()


def test_setup_on_a_full_disk_builds_no_wheel(tmp_path):
    """With a .venv: llama-cpp-python is not built (no wheel for these flags yet), and, where that wheel is there,
    the wheelhouse is not filled; pip is never asked to write a wheel."""
    env = _almost_full_disk(tmp_path)
    repo = _setup_sh_copy(tmp_path, env, venv=True)
    wheels = tmp_path / "wheels"
    env["FTDEPLOY_WHEELHOUSE"] = str(wheels)
    proc = _run(repo / "scripts" / "setup.sh", env)
    assert proc.returncode == 1 and "building llama-cpp-python needs about 2 GiB" in proc.stderr, proc.stderr
    assert _calls(env) == []

    # The llama.cpp wheel for these flags is there: the next step is filling the wheelhouse.
    flags = subprocess.run(["bash", "-c", '. scripts/lib-cpu.sh; llama_cmake_args "$(cpu_target)"'], cwd=repo,
                           env=env, capture_output=True, text=True, check=True).stdout
    (wheels / "llama_cpp_python.cmake-args").write_text(flags)
    version = re.search(r'"llama-cpp-python==([^"]+)"', (repo / "pyproject.toml").read_text())[1]
    (wheels / f"llama_cpp_python-{version}-cp311-cp311-linux_x86_64.whl").touch()
    proc = _run(repo / "scripts" / "setup.sh", env)
    assert proc.returncode == 1 and "filling the wheelhouse needs about 4 GiB" in proc.stderr, proc.stderr
    assert _calls(env) and not [c for c in _calls(env) if " wheel " in c], _calls(env)


def test_container_setup_on_a_full_disk_stops_before_building_or_pulling(tmp_path):
    env = _almost_full_disk(tmp_path)
    docker_root = tmp_path / "docker-root"
    docker_root.mkdir()
    docker = tmp_path / "bin" / "docker"
    # An engine that answers, holds no image yet and keeps its data in docker_root; every call is logged.
    docker.write_text('#!/bin/sh\necho "docker $*" >> "$CALLS"\n'
                      f'[ "$1 $2" = "info -f" ] && echo {docker_root}\nexit 0\n')
    docker.chmod(0o755)
    shutil.copy(docker, tmp_path / "bin" / "dockerd")
    # The script prefers /usr/bin/docker by path: a bash function of that name (BASH_ENV) stands in for it, so no
    # real engine is asked, let alone started.
    (tmp_path / "stub.sh").write_text(f'/usr/bin/docker() {{ "{docker}" "$@"; }}\n')
    env.update(BASH_ENV=str(tmp_path / "stub.sh"), FTDEPLOY_CACHE=str(tmp_path / "cache"))
    # A copy: past the check, the script empties the checkout's .wheelhouse.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("container-setup.sh", "lib-disk.sh", "lib-cpu.sh"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    proc = _run(repo / "scripts" / "container-setup.sh", env)
    assert proc.returncode == 1
    assert (f"container-setup.sh: only 1 MiB free on the disk holding {docker_root}; building the ftdeploy cpu and "
            "gpu images needs about 25 GiB") in proc.stderr, proc.stderr
    assert {c.split()[1] for c in _calls(env)} <= {"info", "images"}, _calls(env)
    assert proc.stdout == ""  # no settings printed for a build that cannot happen
