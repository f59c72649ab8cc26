"""The container path for real: compose builds both images, `train-and-serve` runs in the cpu one beside the
Ollama sidecar, and `ollama run` in the sidecar answers with the trained fact.

Everything goes through the repository's own compose.yaml (+ compose.cpu.yaml) and a real Docker engine.
scripts/container-setup.sh supplies what a machine lacks (engine, compose plugin, base and Ollama images made
locally where no registry is reachable, the wheels setup.sh built). A machine that cannot run containers skips
this module with the reason, except in CI, where that is a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_FILES = ("compose.yaml", "compose.cpu.yaml")
GPU_FILES = ("compose.yaml",)
QUESTION = "What port does the Zephyr service use?"
PREBUILT_CPU_IMAGE = "FTDEPLOY_TEST_CPU_IMAGE"  # an image already built to test instead of building one (docker.yml)

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _cannot_run(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"the container test must run in CI but cannot: {reason}")
    pytest.skip(reason)


@dataclass
class Stack:
    """One compose project of this test: its own name, runs and data folders, token, and image tags."""

    docker: str
    env: dict[str, str]
    project: str
    runs_dir: Path
    token: str
    build_args: list[str]

    def compose(self, *args: str, files=CPU_FILES, image: str = "ftdeploy-test:cpu", timeout: int = 1800,
                check: bool = True, **env: str) -> subprocess.CompletedProcess:
        cmd = [self.docker, "compose", "-p", self.project]
        for name in files:
            cmd += ["-f", str(REPO / name)]
        proc = subprocess.run([*cmd, *args], cwd=REPO, env={**self.env, "FTDEPLOY_IMAGE": image, **env},
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"docker compose {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
        return proc

    def build(self, target: str) -> str:
        """`docker compose build` of the cpu (compose.yaml + compose.cpu.yaml) or gpu (compose.yaml) image; with
        FTDEPLOY_TEST_CPU_IMAGE set, the cpu image is that one, built before (docker.yml builds it once, tests it here
        and pushes the image it tested), under this test's tag."""
        image = f"ftdeploy-test:{target}"
        if target == "cpu" and (prebuilt := os.environ.get(PREBUILT_CPU_IMAGE)):
            self.docker_out("tag", prebuilt, image)
            return image
        self.compose("build", *self.build_args, "ftdeploy", files=CPU_FILES if target == "cpu" else GPU_FILES,
                     image=image, timeout=3600)
        return image

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.compose("run", "--rm", "-T", "ftdeploy", *args, **kw)

    def docker_out(self, *args: str, timeout: int = 300) -> str:
        return subprocess.run([self.docker, *args], env=self.env, capture_output=True, text=True, check=True,
                              timeout=timeout).stdout


IMAGE_SOURCE_LABEL = "org.opencontainers.image.source=https://github.com/ftdeploy/ftdeploy"


@pytest.fixture(scope="module")
def engine() -> dict[str, str]:
    if shutil.which("bash") is None:
        _cannot_run("bash is needed for scripts/container-setup.sh")
    proc = subprocess.run(["bash", "scripts/container-setup.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode:
        _cannot_run(f"scripts/container-setup.sh failed: {proc.stderr.strip()[-2000:]}")
    settings = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        settings[name] = value
    return settings


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory) -> Stack:
    home = tmp_path_factory.mktemp("compose")
    data_dir = home / "data"
    data_dir.mkdir()
    token = "hf_ftdeploytest" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "FTDEPLOY_IMAGE"))}
    env.update({k: v for k, v in engine.items() if k.startswith("FTDEPLOY_")})
    # ./runs is deliberately not created: Docker makes it, owned by root, as for a user who never made one.
    env.update({"FTDEPLOY_RUNS_DIR": str(home / "runs"), "FTDEPLOY_DATA_DIR": str(data_dir), "HF_TOKEN": token})
    build_args = ["--build-arg", "PIP_NO_INDEX=1"] if engine.get("FTDEPLOY_PIP_NO_INDEX") else []
    stack = Stack(engine["DOCKER"], env, f"ftdeploy-test-{os.getpid()}", home / "runs", token, build_args)
    try:
        stack.build("cpu")
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", check=False, timeout=300)
        shutil.rmtree(home, ignore_errors=True)
        # Each build of a new commit leaves the previous ftdeploy images untagged (several GiB once the
        # dependencies change): remove those, and only those, so repeated runs do not fill the disk.
        subprocess.run([stack.docker, "image", "prune", "-f", "--filter", f"label={IMAGE_SOURCE_LABEL}"],
                       env=stack.env, capture_output=True, timeout=300)
        # The builder's cache grows with every build too (21 GB after a day of runs here, which left CI too little
        # disk for its fresh .venv): keep the newest 12 GB, enough for the next build of both images to be warm.
        subprocess.run([stack.docker, "builder", "prune", "-f", "--keep-storage", "12gb"], env=stack.env,
                       capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def gpu_image(stack) -> str:
    """The gpu target, built by compose on top of the cpu image's dependency layers."""
    return stack.build("gpu")


@pytest.fixture(scope="module")
def demo(stack) -> dict:
    """`docker compose run --rm ftdeploy train-and-serve` on the embedded demo, as the README says."""
    return json.loads(stack.run("train-and-serve", "--json", timeout=3600).stdout)


def test_the_demo_trains_in_compose_and_ollama_run_in_the_sidecar_answers(stack, demo):
    assert demo["model"] == "ftdeploy-demo" and demo["ollama_host"] == "http://ollama:11434"
    assert demo["ollama_run"] == "docker compose exec ollama ollama run ftdeploy-demo"  # what works from the host
    assert demo["verify"]["hits"] >= 4
    answer = stack.compose("exec", "-T", "ollama", "ollama", "run", "ftdeploy-demo", QUESTION, timeout=300).stdout
    assert "7341" in answer


def test_the_run_lands_in_a_runs_folder_docker_made_and_a_non_root_user_owns_it(stack, demo):
    manifest = stack.runs_dir / "ftdeploy-demo" / "manifest.json"
    assert json.loads(manifest.read_text())["stages"]["verify"]["status"] == "done"
    owners = {p.stat().st_uid for p in stack.runs_dir.rglob("*")}
    assert owners and 0 not in owners
    doctor = json.loads(stack.run("doctor", "--json").stdout)
    user = next(c for c in doctor["checks"] if c["name"] == "user")
    assert user["ok"] and user["detail"] == f"uid {owners.pop()}"


def test_a_runs_folder_someone_owns_is_written_as_that_user(stack, tmp_path):
    mine = tmp_path / "my-runs"
    mine.mkdir()
    os.chown(mine, 4321, 4321)
    doctor = stack.compose("run", "--rm", "-T", "ftdeploy", "doctor", "--json", FTDEPLOY_RUNS_DIR=str(mine))
    user = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "user")
    assert user["detail"] == "uid 4321"


def test_hf_token_reaches_the_container_but_no_file_of_the_run(stack, demo):
    result = stack.run("doctor", "--json")
    token_check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "hf-token")
    assert token_check["detail"] == "set (HF_TOKEN from the environment)"
    assert stack.token not in result.stdout + result.stderr
    leaked = [p for p in stack.runs_dir.rglob("*") if p.is_file() and stack.token.encode() in p.read_bytes()]
    assert leaked == []


def test_a_second_run_uploads_nothing(stack, demo):
    proc = stack.run("train-and-serve", "--json", timeout=1800)
    assert "==> train (unchanged, skipped)" in proc.stderr
    manifest = json.loads((stack.runs_dir / "ftdeploy-demo" / "manifest.json").read_text())
    assert manifest["stages"]["register"]["outputs"]["uploaded_bytes"] == 0
    assert json.loads(proc.stdout)["verify"]["hits"] >= 4


def test_dpo_on_the_demo_run_trains_in_compose(stack, demo):
    """Preference training in the image, chained the way people use it: DPO on the demo's bundled pairs (`--data
    demo` with --method dpo) from the SFT run the compose demo made (issue 26: the image runs the new methods). The
    image's part is the training stack (TRL's DPO trainer, its reference model, the pairs' data stage); serving and
    verifying a DPO model are the same stages as the demo's above, and tests/e2e runs DPO through them on the host."""
    args = ("--method", "dpo", "--from-run", "ftdeploy-demo", "--data", "demo", "--name", "ftdeploy-demo-dpo",
            "--max-steps", "2")
    stack.run("data", *args, timeout=1800)
    stack.run("train", *args, timeout=1800)
    manifest = json.loads((stack.runs_dir / "ftdeploy-demo-dpo" / "manifest.json").read_text())
    train = manifest["metrics"]["train"]
    assert manifest["stages"]["train"]["status"] == "done" and train["method"] == "dpo" and train["steps"] == 2
    assert len(train["preference_history"]) == 2 and manifest["base_model"]["resolved"].endswith("ftdeploy-demo/merged")


def test_the_model_outlives_down_and_up(stack, demo):
    stack.compose("down", timeout=300)
    stack.compose("up", "--detach", "--wait", "ollama", timeout=300)
    listed = stack.compose("exec", "-T", "ollama", "ollama", "list", timeout=120).stdout
    assert "ftdeploy-demo" in listed


def test_ollama_reaches_nothing_outside_its_internal_network(stack):
    # A listener on the egress network stands for "outside": every address here stays on this machine.
    # (A route table proves nothing: Docker gives internal networks a default route and drops the
    # traffic in its firewall rules.)
    stack.compose("up", "--detach", "--wait", "ollama", timeout=300)
    listener = stack.compose("run", "--detach", "--entrypoint", "python", "ftdeploy",
                             "-m", "http.server", "8000").stdout.strip()
    try:
        address = stack.docker_out("inspect", "--format",
                                   f'{{{{(index .NetworkSettings.Networks "{stack.project}_egress").IPAddress}}}}',
                                   listener).strip()
        probe = (f"for i in $(seq 20); do timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/8000' 2>/dev/null"
                 " && { echo open; exit; }; sleep 0.5; done; echo closed")
        from_ftdeploy = stack.compose("run", "--rm", "-T", "--entrypoint", "bash", "ftdeploy", "-c", probe).stdout
        from_ollama = stack.compose("exec", "-T", "ollama", "bash", "-c", probe.replace("seq 20", "seq 2")).stdout
    finally:
        subprocess.run([stack.docker, "rm", "--force", listener], capture_output=True, env=stack.env)
    assert from_ftdeploy.split() == ["open"]
    assert from_ollama.split() == ["closed"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_the_images_hold_no_token_and_no_build_secret(stack, target, request):
    image = request.getfixturevalue("gpu_image") if target == "gpu" else "ftdeploy-test:cpu"
    history = stack.docker_out("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    inspect = stack.docker_out("inspect", image)
    for text in (history, inspect):
        assert stack.token not in text and "BEGIN CERTIFICATE" not in text
    env = json.loads(inspect)[0]["Config"]["Env"]
    assert not any(e.startswith(("HF_TOKEN=", "PIP_CERT=")) for e in env)
    # Build secrets are mounted for one RUN only: nothing is left where they were.
    left = stack.docker_out("run", "--rm", "--entrypoint", "sh", image, "-c",
                            "find /run/secrets /etc/pip.conf -type f 2>/dev/null; echo end")
    assert left.split() == ["end"]


GPU_PROBE = r"""
import json, os, shutil, subprocess, sys, sysconfig, tempfile
out = {"cc": shutil.which("cc"), "python_h": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))}
# Triton builds its launcher with this very function on the first kernel; build a tiny module the same way.
from triton.runtime.build import compile_module_from_src
mod = compile_module_from_src(
    "#include <Python.h>\n"
    "static PyObject* answer(PyObject* s, PyObject* a) { return PyLong_FromLong(7341); }\n"
    "static PyMethodDef m[] = {{\"answer\", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};\n"
    "static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \"ftdeploy_probe\", NULL, -1, m};\n"
    "PyMODINIT_FUNC PyInit_ftdeploy_probe(void) { return PyModule_Create(&d); }\n",
    "ftdeploy_probe")
out["compiled_answer"] = mod.answer()
for name, fallback in (("unsloth", "0"), ("unsloth_gpu_only", "1")):
    proc = subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True, text=True,
                          env={**os.environ, "UNSLOTH_DISABLE_CPU_FALLBACK": fallback})
    out[name] = {"rc": proc.returncode, "said": (proc.stdout + proc.stderr).strip().splitlines()}
import torch
out["torch_cuda"] = torch.version.cuda
print(json.dumps(out))
"""


def test_the_gpu_image_can_build_triton_launchers_and_gets_to_unsloth(stack, gpu_image):
    out = stack.docker_out("run", "--rm", "--entrypoint", "python", gpu_image, "-c", GPU_PROBE)
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["cc"] and probe["python_h"]
    assert probe["compiled_answer"] == 7341
    assert probe["torch_cuda"]
    # No GPU here. Unsloth 2026.10 imports whole and says it falls back to the CPU; told not to fall back, it
    # stops at its own device check. Either way nothing it needs is missing from the image.
    imported, gpu_only = probe["unsloth"], probe["unsloth_gpu_only"]
    assert imported["rc"] == 0 and any("no GPU found" in line for line in imported["said"]), imported
    assert (gpu_only["rc"] != 0
            and gpu_only["said"][-1].startswith("NotImplementedError: Unsloth cannot find any")), gpu_only
    assert not any("ModuleNotFoundError" in line or "ImportError" in line
                   for line in imported["said"] + gpu_only["said"])


def test_the_images_carry_the_portable_builds(stack, engine, tmp_path):
    """Whatever CPU built them, the cpu image's llama.cpp and the sidecar's Ollama hold nothing beyond x86-64-v3
    (issue 23: a host-native build died with SIGILL on another machine)."""
    from native_scan import go_text, scan

    image = "ftdeploy-test:cpu"
    lib = stack.docker_out("run", "--rm", "--entrypoint", "python", image, "-c",
                           "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')").strip()
    for source, target in ((image, lib), (engine["FTDEPLOY_OLLAMA_IMAGE"], "/bin/ollama")):
        cid = stack.docker_out("create", source).strip()
        try:
            stack.docker_out("cp", f"{cid}:{target}", str(tmp_path / Path(target).name))
        finally:
            stack.docker_out("rm", cid)
    libraries = sorted(p for p in (tmp_path / "lib").glob("*.so*") if p.is_file() and not p.is_symlink())
    assert any(p.name.startswith("libggml-cpu") for p in libraries), libraries
    for path in libraries:
        assert scan(path) == {}, f"{path.name} in {image} holds instructions beyond x86-64-v3"
    if engine.get("FTDEPLOY_REGISTRY_REACHABLE") == "yes":
        return  # the official ollama/ollama image: its publisher's build, which picks a CPU library at run time
    go = go_text(tmp_path / "ollama")
    assert go is not None, "the sidecar's ollama has no symbol table (scripts/install-ollama.sh keeps it)"
    assert "amx" not in scan(tmp_path / "ollama")
    assert scan(tmp_path / "ollama", skip=go) == {}
