"""Static checks of the container wiring, fast and engine-free; tests/container runs the same files for real.

The files are parsed (compose with yaml, the Dockerfile into its stages and instructions, the .dockerignore with the
rules Docker applies) and held to what makes them work together: a service named in an address exists and shares a
network, a COPY source is in the build context, the entrypoint an image names is one it installs."""

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RUNTIME_TARGETS = ("cpu", "gpu")


class ComposeLoader(yaml.SafeLoader):
    """Compose files use merge tags such as !reset; keep their value."""


ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: {"__tag__": suffix})


def _compose(name="compose.yaml"):
    return yaml.load((REPO / name).read_text(), Loader=ComposeLoader)


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments): comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        out.append((instruction.upper(), re.sub(r"\s+", " ", args).strip()))
        pending = ""
    return out


def _stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """{stage: (what it is built FROM, its instructions)}, in the Dockerfile's order."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current = None
    for instruction, args in _instructions():
        if instruction == "FROM":
            source, _, name = args.partition(" AS ")
            current = name or source
            stages[current] = (source, [])
        elif current is not None:
            stages[current][1].append((instruction, args))
    return stages


def _lineage(stage: str) -> list[str]:
    """`stage` and the stages it builds on, base first."""
    stages = _stages()
    chain = [stage]
    while stages[chain[0]][0] in stages:
        chain.insert(0, stages[chain[0]][0])
    return chain


def _global_args() -> dict[str, str]:
    """The ARGs before the first FROM (the ones a FROM line may use), with their defaults."""
    args = {}
    for instruction, value in _instructions():
        if instruction == "FROM":
            break
        if instruction == "ARG":
            name, _, default = value.partition("=")
            args[name] = default
    return args


def _copies(stage: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY in `stage` and the stages it builds on."""
    out = []
    for name in _lineage(stage):
        for instruction, args in _stages()[name][1]:
            if instruction == "COPY":
                *sources, dest = [a for a in args.split() if not a.startswith("--")]
                out.append((sources, dest))
    return out


def _in_build_context(path: str) -> bool:
    """Whether `path` (relative to the repo) is sent to the builder: the .dockerignore's rules in order, the last that
    matches the path or a folder above it wins, and a `!` rule lets it back in."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        pattern = rule.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            included = rule.startswith("!")
    return included


def _tool(name):
    found = shutil.which(name) or shutil.which(str(Path(__import__("sys").executable).parent / name))
    if not found:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs it")
    return found


def test_the_build_context_rules_are_read_as_docker_reads_them():
    assert _in_build_context("pyproject.toml") and _in_build_context("ftdeploy/assets/demo/demo.yaml")
    assert not _in_build_context("ftdeploy/__pycache__/cli.cpython-311.pyc")
    for private in ("runs/demo/manifest.json", ".venv/bin/python", "tests/unit/test_containers.py", ".git/config"):
        assert not _in_build_context(private), f"{private} would be sent to the builder"


def test_ollama_sidecar_is_pinned_healthchecked_and_internal():
    compose = _compose()
    ollama = compose["services"]["ollama"]
    image, tag = ollama["image"].split(":")
    assert image == "ollama/ollama"
    assert tuple(int(x) for x in tag.split(".")) >= (0, 17, 1)  # the GGUF out-of-bounds read fix
    check = ollama["healthcheck"]["test"]  # what ftdeploy's depends_on waits for
    assert check[0] in ("CMD", "CMD-SHELL") and not {"curl", "wget"} & set(" ".join(check).split()), \
        "the ollama image has neither curl nor wget"
    assert "ports" not in ollama
    assert all(compose["networks"][n].get("internal") is True for n in ollama["networks"])
    assert any(v.endswith(":/root/.ollama") for v in ollama["volumes"])  # models outlive the container


def test_ftdeploy_reaches_the_healthy_sidecar_by_service_name_and_keeps_its_runs():
    compose = _compose()
    svc = compose["services"]["ftdeploy"]
    assert svc["depends_on"]["ollama"]["condition"] == "service_healthy"
    from ftdeploy.sidecar import sidecar_spec

    listens = int(next(iter(sidecar_spec()["ports"])).split("/")[0])  # the port Ollama listens on in its image
    host = urlsplit(svc["environment"]["OLLAMA_HOST"])
    assert host.hostname in compose["services"] and host.port == listens
    assert set(compose["services"][host.hostname]["networks"]) & set(svc["networks"]), "no network in common"
    # the closing hint's `docker compose exec SERVICE ollama run NAME` must name that same service
    assert svc["environment"]["FTDEPLOY_COMPOSE_OLLAMA_SERVICE"] == host.hostname
    assert re.fullmatch(r"\$\{HF_TOKEN(:?-)?\}", svc["environment"]["HF_TOKEN"]), "the token comes from the shell"
    # SOURCE:TARGET[:MODE], the source possibly a ${VAR:-default} with colons of its own
    mounts = dict(re.fullmatch(r"(?:\$\{[^}]*\}|[^:]*):([^:]+)(?::(\w+))?", v).groups() for v in svc["volumes"])
    assert mounts["/data"] == "ro"
    from ftdeploy.config import Config

    workdir = [args for instruction, args in _stages()[svc["build"]["target"]][1] if instruction == "WORKDIR"][-1]
    assert f"{workdir}/{Config().runs_dir}" in mounts, "the runs folder the image writes is the mounted one"


def test_the_gpu_service_builds_the_gpu_image_and_reserves_the_gpu():
    compose = _compose()
    svc = compose["services"]["ftdeploy"]
    assert svc["build"]["target"] == "gpu" and "gpu" in _stages()
    for service in ("ftdeploy", "ollama"):
        gpu = compose["services"][service]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    # The gpu target must get torch with CUDA, whatever the cpu target's index is.
    assert svc["build"]["args"]["TORCH_INDEX_URL"] == ""


def test_cpu_override_drops_the_gpu_and_uses_the_cpu_target():
    services = _compose("compose.cpu.yaml")["services"]
    svc = services["ftdeploy"]
    assert svc["build"]["target"] == "cpu" and "cpu" in _stages()
    assert svc["deploy"] == services["ollama"]["deploy"] == {"__tag__": "reset"}
    assert "download.pytorch.org/whl/cpu" in svc["build"]["args"]["TORCH_INDEX_URL"]


def _docker_workflow() -> dict:
    return yaml.safe_load((REPO / ".github" / "workflows" / "docker.yml").read_text())


def _build_jobs(workflow: dict, target: str) -> list[str]:
    """The jobs of `workflow` that build the image `target` (a docker/build-push-action step with that target)."""
    return [name for name, job in workflow["jobs"].items() for step in job.get("steps", [])
            if "docker/build-push-action@" in step.get("uses", "") and step["with"].get("target") == target]


def _published_tags(target: str) -> set[str]:
    """The tags docker.yml pushes for `target` from the default branch (docker/metadata-action's rules in the job that
    builds it), with its flavor's suffix."""
    workflow = _docker_workflow()
    [builder] = _build_jobs(workflow, target)
    meta = next(s for s in workflow["jobs"][builder]["steps"] if s.get("id") == "meta")["with"]
    rule = re.search(r"suffix=([^,\s]*)", meta.get("flavor", ""))
    suffix = rule[1] if rule else ""
    image = meta["images"].replace("${{ github.repository }}", "ftdeploy/ftdeploy")
    raw = re.findall(r"type=raw,value=(\S+?),enable=\{\{is_default_branch\}\}", meta["tags"])
    return {f"{image}:{tag}{suffix}" for tag in raw}


def test_compose_uses_the_tags_the_docker_workflow_publishes():
    gpu_image = _compose()["services"]["ftdeploy"]["image"]
    cpu_image = _compose("compose.cpu.yaml")["services"]["ftdeploy"]["image"]
    default = re.compile(r"\$\{FTDEPLOY_IMAGE:-(\S+)\}")
    assert default.fullmatch(gpu_image)[1] in _published_tags("gpu")
    assert default.fullmatch(cpu_image)[1] in _published_tags("cpu")


def test_the_pushed_cpu_image_is_the_one_the_compose_test_ran():
    """docker.yml builds the cpu image once; the compose end-to-end job runs that image (loaded from the build job's
    artifact, never built again), and the push job pushes that same artifact, checked by image ID, only after the
    test passed: no job builds it a second time."""
    from tests.container.test_compose import PREBUILT_CPU_IMAGE

    workflow = _docker_workflow()
    jobs = workflow["jobs"]
    builders = _build_jobs(workflow, "cpu")
    assert len(builders) == 1, f"jobs that build the cpu image by name: {builders} (one, not a matrix, not two)"
    [builder] = builders
    build = next(s for s in jobs[builder]["steps"] if "docker/build-push-action@" in s.get("uses", ""))["with"]
    assert build.get("push") is False and build.get("load") is True, build
    upload = next(s for s in jobs[builder]["steps"] if "actions/upload-artifact@" in s.get("uses", ""))["with"]
    assert "image-id" in jobs[builder]["outputs"] and "tags" in jobs[builder]["outputs"]

    def steps_text(name: str) -> str:
        return "\n".join(str(step.get("run", "")) + str(step.get("env", "")) for step in jobs[name]["steps"])

    def loads_the_built_image(name: str) -> None:
        assert builder in jobs[name]["needs"]
        download = [s["with"] for s in jobs[name]["steps"] if "actions/download-artifact@" in s.get("uses", "")]
        assert [d["name"] for d in download] == [upload["name"]], name
        text = steps_text(name)
        assert "docker load" in text and f"needs.{builder}.outputs.image-id" in text, name  # and checks its ID
        assert not re.search(r"docker (buildx )?build|compose[^\n]* build", text), f"{name} builds an image"

    e2e = next(name for name, job in jobs.items() if "tests/container" in steps_text(name))
    loads_the_built_image(e2e)
    # tests/container runs the image under the name it was built and loaded as, instead of building one
    tested = [s["env"][PREBUILT_CPU_IMAGE] for s in jobs[e2e]["steps"] if PREBUILT_CPU_IMAGE in s.get("env", {})]
    assert tested == [build["tags"]], tested
    pushers = [name for name in jobs if "docker push" in steps_text(name)]
    assert len(pushers) == 1, pushers
    [pusher] = pushers
    loads_the_built_image(pusher)
    assert set(jobs[pusher]["needs"]) >= {builder, e2e} and "pull_request" in jobs[pusher]["if"]
    assert f"needs.{builder}.outputs.tags" in steps_text(pusher)
    assert not any("docker/build-push-action@" in s.get("uses", "") for s in jobs[pusher]["steps"])
    for name in _build_jobs(workflow, "gpu"):  # the gpu image is not run by the test, but waits for it
        assert e2e in jobs[name]["needs"]


def test_dockerfile_needs_no_registry_but_its_base():
    # A `# syntax=` parser directive makes BuildKit pull a frontend image: air-gapped hosts cannot build that.
    assert not re.search(r"^#\s*syntax\s*=", (REPO / "Dockerfile").read_text(), flags=re.M | re.I)
    seen: list[str] = []
    for name, (source, _) in _stages().items():
        assert source == "${BASE_IMAGE}" or source in seen, f"stage {name} is built FROM {source}, pulled"
        seen.append(name)


def test_each_image_starts_in_the_entrypoint_script_it_installs():
    """The script that drops root (scripts/docker-entrypoint.sh; tests/container checks the user for real)."""
    for target in RUNTIME_TARGETS:
        entrypoints = [args for name in _lineage(target) for instruction, args in _stages()[name][1]
                       if instruction == "ENTRYPOINT"]
        command = json.loads(entrypoints[-1])[0]  # the exec form
        installed = {PurePosixPath(dest).name: sources for sources, dest in _copies(target)
                     if PurePosixPath(dest).parent == PurePosixPath("/usr/local/bin")}  # on every image's PATH
        assert installed.get(command) == ["scripts/docker-entrypoint.sh"], f"{target}: {command} is not installed"
        labels = " ".join(args for instruction, args in _stages()[target][1] if instruction == "LABEL")
        assert "org.opencontainers.image.licenses=" in labels, f"{target}: no licence label"


def test_the_dependency_layers_copy_nothing_that_changes_with_code_or_docs():
    """The deps stages hold GBs (torch, CUDA libraries): only pyproject.toml and the scripts they run may invalidate
    them, so editing the README or the package rebuilds the last layer alone; that layer copies the README before
    installing, since pyproject.toml names it."""
    import tomllib

    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    for target in RUNTIME_TARGETS:
        for name in _lineage(target)[:-1]:
            copied = [s for instruction, args in _stages()[name][1] if instruction == "COPY" for s in args.split()[:-1]]
            assert all(s == "pyproject.toml" or s.startswith("scripts/") for s in copied), (name, copied)
        steps = _stages()[target][1]
        install = next(i for i, (instruction, args) in enumerate(steps) if instruction == "RUN" and "image-pip" in args)
        assert any(instruction == "COPY" and args.split()[0] == readme for instruction, args in steps[:install])


def test_base_images_are_pinned_and_no_secret_is_baked_in():
    for name, image in _global_args().items():
        if name.endswith("_IMAGE"):
            assert ":" in image and not image.endswith(":latest"), image
    for instruction, args in _instructions():
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)\s*=", args, flags=re.I), args


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

    ollama = _compose()["services"]["ollama"]
    spec = sidecar_spec(port=12345)
    assert spec["image"] == OLLAMA_IMAGE == ollama["image"]
    assert spec["ports"] == {"11434/tcp": ("127.0.0.1", 12345)}
    assert spec["healthcheck"]["test"] == ollama["healthcheck"]["test"]
    assert list(spec["volumes"].values())[0]["bind"] == "/root/.ollama"


def test_ollama_up_without_an_engine_says_so_and_starts_nothing(monkeypatch):
    from click.testing import CliRunner

    from ftdeploy.cli import cli

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    result = CliRunner().invoke(cli, ["ollama", "up"])
    assert result.exit_code == 1
    assert "no Docker engine is reachable" in result.output and "install-ollama.sh" in result.output


def test_everything_the_build_reads_is_in_the_build_context():
    """A COPY or bind-mount source left out of the context fails the build ("not found"), which only the container
    test would otherwise see; the package's data files must come along with `COPY ftdeploy`."""
    sources = [s for target in RUNTIME_TARGETS for sources, _ in _copies(target) for s in sources]
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", " ".join(a for _, a in _instructions()))
    assert sources
    for source in sources:
        assert _in_build_context(source), f"{source} is not in the build context"
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [f for package, patterns in package_data.items() for pattern in patterns
               for f in (REPO / package.replace(".", "/")).glob(pattern)]
    assert shipped
    for f in shipped:
        rel = f.relative_to(REPO).as_posix()
        assert _in_build_context(rel) and any(rel.startswith(s.rstrip("/") + "/") for s in sources), rel
