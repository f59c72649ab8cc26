"""The set-up scripts stop with a sentence about disk space, not an unrelated failure, when the disk is full.

A CI run once failed in 3 s with only `ensurepip ... returned non-zero exit status 1`: the disk had 3.5 MiB free.
"""

import subprocess
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


def test_both_setup_scripts_check_before_they_write():
    setup = (REPO / "scripts/setup.sh").read_text()
    assert setup.index("need_space . ") < setup.index('-m venv .venv')
    assert setup.index('need_space "$wheels"') < setup.index("--wheel-dir")  # before the first pip wheel
    container = (REPO / "scripts/container-setup.sh").read_text()
    assert container.index('need_space "$docker_root"') < container.index("debootstrap --variant")
