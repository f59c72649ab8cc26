"""Static checks of the container wiring, fast and engine-free; tests/container runs the same files for real."""

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
    assert "${FTDEPLOY_DATA_DIR:-./data}:/data:ro" in svc["volumes"]
    assert "${FTDEPLOY_RUNS_DIR:-./runs}:/work/runs" in svc["volumes"]
    for service in ("ftdeploy", "ollama"):
        gpu = _compose()["services"][service]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert svc["build"]["target"] == "gpu"
    # The gpu target must get torch with CUDA, whatever the cpu target's index is.
    assert svc["build"]["args"]["TORCH_INDEX_URL"] == ""


def test_cpu_override_drops_the_gpu_and_uses_the_cpu_target():
    services = _compose("compose.cpu.yaml")["services"]
    svc = services["ftdeploy"]
    assert svc["build"]["target"] == "cpu"
    assert svc["deploy"] == services["ollama"]["deploy"] == {"__tag__": "reset"}
    assert "download.pytorch.org/whl/cpu" in svc["build"]["args"]["TORCH_INDEX_URL"]


def _published_tags(target: str) -> set[str]:
    """The tags docker.yml pushes for `target` from the default branch (docker/metadata-action's rules)."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "docker.yml").read_text())
    job = next(j for j in workflow["jobs"].values() if any(s.get("id") == "meta" for s in j["steps"]))
    meta = next(s for s in job["steps"] if s.get("id") == "meta")["with"]
    suffix = "-cpu" if target == "cpu" else ""
    assert "suffix=${{ matrix.target == 'cpu' && '-cpu' || '' }},onlatest=true" in meta["flavor"]
    image = meta["images"].replace("${{ github.repository }}", "ftdeploy/ftdeploy")
    raw = re.findall(r"type=raw,value=(\S+?),enable=\{\{is_default_branch\}\}", meta["tags"])
    return {f"{image}:{tag}{suffix}" for tag in raw}


def test_compose_uses_the_tags_the_docker_workflow_publishes():
    gpu_image = _compose()["services"]["ftdeploy"]["image"]
    cpu_image = _compose("compose.cpu.yaml")["services"]["ftdeploy"]["image"]
    default = re.compile(r"\$\{FTDEPLOY_IMAGE:-(\S+)\}")
    assert default.fullmatch(gpu_image)[1] in _published_tags("gpu")
    assert default.fullmatch(cpu_image)[1] in _published_tags("cpu")


def test_dockerfile_needs_no_registry_but_its_base_and_drops_root_in_its_entrypoint():
    text = _dockerfile()
    # A `# syntax=` line makes BuildKit pull a frontend image: air-gapped hosts cannot build that.
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.M | re.I)
    assert re.findall(r"^FROM (\S+)", text, flags=re.M)[0] == "${BASE_IMAGE}"
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    runtime = [s for s in stages if re.match(r"\S+ AS (cpu|gpu)\b", s)]
    assert len(runtime) == 2
    for stage in runtime:
        assert 'ENTRYPOINT ["ftdeploy-entrypoint"]' in stage
        assert "org.opencontainers.image.licenses" in stage
    entrypoint = (REPO / "scripts" / "docker-entrypoint.sh").read_text()
    assert entrypoint.rstrip().splitlines()[-1].startswith("exec setpriv --reuid=")
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1:] and "!runs/" not in ignored and "!.venv/" not in ignored


def test_the_dependency_layers_copy_nothing_that_changes_with_code_or_docs():
    """The deps stages hold GBs (torch, CUDA libraries): only pyproject.toml may invalidate them, so editing
    the README or the package rebuilds the last layer alone."""
    text = _dockerfile()
    deps = text[text.index("AS base"):text.index("AS cpu")]
    copied = [line.split()[1:-1] for line in deps.splitlines() if line.startswith("COPY")]
    assert [c for c in copied if not c[0].startswith("scripts/")] == [["pyproject.toml"]], copied
    for target in ("AS cpu", "AS gpu"):
        stage = text[text.index(target):]
        assert "COPY README.md ./" in stage[:stage.index("image-pip --no-deps")]


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


def test_every_file_the_dockerfile_copies_passes_the_dockerignore():
    """The build context is `*` minus the .dockerignore's exceptions: a COPY of a file left out fails the build
    ("not found"), which only the container test would otherwise see (scripts/lib-cpu.sh did, issue 23)."""
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    copied = [line.split()[1] for line in _dockerfile().splitlines() if line.startswith("COPY ")]
    assert copied
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is not in the build context"
