"""scripts/serve_fetched_run.sh: the parts of a run packed on the GPU device are joined and unpacked, its lock dropped,
and the run goes on through export, modelfile, register and verify (here with a stand-in `ftdeploy` that records each
call); a folder without parts is an error naming it."""

import io
import os
import subprocess
import tarfile

from conftest import REPO

SCRIPT = REPO / "scripts" / "serve_fetched_run.sh"


def _pack(run_files: dict[str, bytes], out, engine: str, part_bytes: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in run_files.items():
            info = tarfile.TarInfo(f"gpu-{engine}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    for i in range(0, len(data), part_bytes):
        (out / f"{engine}-run.tar.part-{i // part_bytes:02d}").write_bytes(data[i:i + part_bytes])


def test_the_parts_are_joined_and_the_run_goes_on_from_export(tmp_path):
    fetched, runs, calls = tmp_path / "fetched", tmp_path / "runs", tmp_path / "calls.txt"
    fetched.mkdir()
    weights = os.urandom(50_000)
    _pack({"merged/model.safetensors": weights, "manifest.json": b"{}", ".lock": b"4242"}, fetched, "hf", 16_384)
    assert len(list(fetched.iterdir())) > 2  # split across several parts
    stub = tmp_path / "ftdeploy"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    proc = subprocess.run([str(SCRIPT), str(fetched), "hf", str(runs)], env={**os.environ, "FTDEPLOY": str(stub)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (runs / "gpu-hf" / "merged" / "model.safetensors").read_bytes() == weights
    assert not (runs / "gpu-hf" / ".lock").exists()
    stages = [line.split()[0] for line in calls.read_text().splitlines()]
    assert stages == ["export", "modelfile", "register", "verify"]
    assert all(f"--runs-dir {runs} --name gpu-hf --set verify.compare=false" in line
               for line in calls.read_text().splitlines())


def test_a_folder_without_the_engines_parts_is_an_error_naming_it(tmp_path):
    proc = subprocess.run([str(SCRIPT), str(tmp_path), "unsloth", str(tmp_path / "runs")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert f"no unsloth-run.tar.part-* in {tmp_path}" in proc.stderr
    assert not (tmp_path / "runs").exists()
