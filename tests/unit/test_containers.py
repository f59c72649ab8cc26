"""Static checks of the container wiring: there is no Docker engine here, so what can be read is pinned."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


class ComposeLoader(yaml.SafeLoader):
    """Compose files use merge tags such as !reset; keep their value."""


ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: {"__tag__": suffix})


def _compose(name="compose.yaml"):
    return yaml.load((REPO / name).read_text(), Loader=ComposeLoader)


def _dockerfile():
    return (REPO / "Dockerfile").read_text()


def _tool(name):
    found = shutil.which(name) or shutil.which(str(Path(__import__("sys").executable).parent / name))
    if not found:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs it")
    return found


def test_ollama_sidecar_is_pinned_healthchecked_and_internal():
    ollama = _compose()["services"]["ollama"]
    image, tag = ollama["image"].split(":")
    assert image == "ollama/ollama"
    assert tuple(int(x) for x in tag.split(".")) >= (0, 17, 1)
    assert ollama["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    assert "ports" not in ollama
    assert ollama["networks"] == ["internal"]
    assert _compose()["networks"]["internal"]["internal"] is True
    assert any(v.endswith(":/root/.ollama") for v in ollama["volumes"])


def test_ftdeploy_waits_for_a_healthy_ollama_and_talks_http():
    svc = _compose()["services"]["ftdeploy"]
    assert svc["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert svc["environment"]["OLLAMA_HOST"] == "http://ollama:11434"
    assert svc["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert "./data:/data:ro" in svc["volumes"] and "./runs:/work/runs" in svc["volumes"]
    gpu = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert svc["build"]["target"] == "gpu"


def test_cpu_override_drops_the_gpu_and_uses_the_cpu_target():
    svc = _compose("compose.cpu.yaml")["services"]["ftdeploy"]
    assert svc["build"]["target"] == "cpu"
    assert svc["deploy"] == {"__tag__": "reset"}


def test_dockerfile_runs_as_non_root_with_ftdeploy_entrypoint():
    text = _dockerfile()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    runtime = [s for s in stages if re.match(r"\S+ AS (cpu|gpu)\b", s)]
    assert len(runtime) == 2
    for stage in runtime:
        users = re.findall(r"^USER (\S+)", stage, flags=re.M)
        assert users and users[-1] not in ("root", "0")
        assert 'ENTRYPOINT ["ftdeploy"]' in stage
        assert "org.opencontainers.image.licenses" in stage
        assert re.search(r"^VOLUME .*/work/runs", stage, flags=re.M)


def test_base_images_are_pinned_and_no_secret_is_baked_in():
    text = _dockerfile()
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, flags=re.M):
        assert ":" in image and not image.endswith(":latest"), image
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, flags=re.M):
        assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)\s*=", line, flags=re.I), line


def test_hadolint_passes():
    proc = subprocess.run([_tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_passes_on_the_workflows():
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"ci.yml", "docker.yml"}
    proc = subprocess.run([_tool("actionlint"), *map(str, workflows)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_actions_are_pinned_to_commits():
    for wf in (REPO / ".github" / "workflows").glob("*.yml"):
        for ref in re.findall(r"uses:\s*([^\s#]+)", wf.read_text()):
            assert re.search(r"@[0-9a-f]{40}$", ref), f"{wf.name}: {ref} is not pinned to a commit"


def test_sidecar_spec_matches_compose_and_listens_on_loopback_only():
    from ftdeploy.sidecar import OLLAMA_IMAGE, sidecar_spec

    spec = sidecar_spec(port=12345)
    assert spec["image"] == OLLAMA_IMAGE == _compose()["services"]["ollama"]["image"]
    assert spec["ports"] == {"11434/tcp": ("127.0.0.1", 12345)}
    assert spec["healthcheck"]["test"] == ["CMD", "ollama", "list"]
    assert list(spec["volumes"].values())[0]["bind"] == "/root/.ollama"


def test_ollama_up_without_an_engine_says_so_and_starts_nothing(monkeypatch):
    from click.testing import CliRunner

    from ftdeploy.cli import cli

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    result = CliRunner().invoke(cli, ["ollama", "up"])
    assert result.exit_code == 1
    assert "no Docker engine is reachable" in result.output and "install-ollama.sh" in result.output
