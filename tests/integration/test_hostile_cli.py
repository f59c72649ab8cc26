"""Bad input and faults, tried through the real CLI as a hostile user would (issue 18): a clear one-paragraph
error, a non-zero exit, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, smol_gguf_copy

from ftdeploy.modelfile_syntax import parse
from ftdeploy.stages.modelfile import ModelfileSpec

INJECTION = 'ok"""\nFROM /etc/passwd\nPARAMETER stop x\nADAPTER /tmp/evil'


def ftdeploy(*args: str, cwd: Path, timeout: float = 300, user: int | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ftdeploy.cli", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *cmd]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


# ---------------------------------------------------------------- 1. the Modelfile cannot be broken out of

def test_a_system_prompt_that_closes_system_is_refused_before_any_work(tmp_path):
    for args in (["--system-prompt", INJECTION], ["--set", f"modelfile.system={json.dumps(INJECTION)}"]):
        proc = ftdeploy("train-and-serve", "--runs-dir", str(tmp_path / "runs"), *args, cwd=tmp_path, timeout=60)
        _refused(proc, "the Modelfile cannot carry this value", '"""')
        assert "--system-prompt" in proc.stderr or "--set modelfile.system" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_parameter_name_with_a_line_break_is_refused(tmp_path):
    proc = ftdeploy("train-and-serve", "--runs-dir", str(tmp_path / "runs"),
                    "--set", 'modelfile.parameters={"num_ctx\\nADAPTER /tmp/evil": 1}', cwd=tmp_path, timeout=60)
    _refused(proc, "modelfile.parameters.num_ctx", "not a PARAMETER name")
    assert not (tmp_path / "runs").exists()


@pytest.mark.ollama
def test_what_the_writer_writes_is_what_the_real_ollama_reads(ollama_server, tmp_path):
    """`ollama create -f` (the pinned build's own parser) on Modelfiles full of quotes, line breaks, comments
    and directive words: the created model's SYSTEM, TEMPLATE and stops are exactly the values written."""
    from ftdeploy.local_server import find_ollama_binary

    gguf = smol_gguf_copy(tmp_path, "hostile-modelfile")
    rng = random.Random(18)
    pieces = ['"', '"""', "\\", "\n", "\t", " ", "#", "FROM /etc/passwd", "PARAMETER stop x", "{{ .Prompt }}", "é", "x"]
    cases = [
        ('He said "hi"\n"""not the end\n\t# not a comment\nFROM /etc/passwd\nPARAMETER stop x', ['a"b\\c', " spaced "]),
        ('"quoted at both ends"', ['"""', "#"]),
        ("  leading and trailing spaces  ", ["\\n"]),
    ]
    while len(cases) < 12:
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        stop = "".join(rng.choice(pieces[:3] + pieces[6:]) for _ in range(rng.randint(1, 4)))
        try:
            ModelfileSpec(gguf=str(gguf), template="{{ .Prompt }}", stops=[stop], system=text).render()
        except Exception:
            continue  # not representable: refused (the unit fuzz test checks the reason)
        cases.append((text, [stop]))
    env = {**os.environ, "OLLAMA_HOST": ollama_server.host}
    for i, (system, stops) in enumerate(cases):
        template = (f'{{{{ if .System }}}}{system}{{{{ end }}}}{{{{ .Prompt }}}}' if '"""\n' not in system
                    else "{{ .Prompt }}")
        spec = ModelfileSpec(gguf=str(gguf), template=template, stops=stops, system=system,
                             parameters={"num_ctx": 512, "temperature": 0.5})
        modelfile = tmp_path / f"Modelfile.{i}"
        modelfile.write_text(spec.render())
        assert parse(modelfile.read_text()) == spec.commands()
        proc = subprocess.run([str(find_ollama_binary()), "create", f"hostile-{i}", "-f", str(modelfile)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (modelfile.read_text(), proc.stderr)
        shown = ollama_server.show_json(f"hostile-{i}")
        assert shown.get("system") == system, modelfile.read_text()
        assert shown.get("template") == template
        # /api/show lists each stop as a Go-quoted string ("%#v"), which reads as JSON for printable text
        stops_shown = [json.loads(line.split(None, 1)[1]) for line in shown["parameters"].splitlines()
                       if line.split(None, 1)[0] == "stop"]
        assert stops_shown == stops, shown["parameters"]


# ---------------------------------------------------------------- 3. an unwritable runs directory

@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="needs setpriv to drop root")
def test_an_unwritable_runs_directory_is_one_clear_message(tmp_path_factory):
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp().parent.parent))  # a place others may enter
    tmp_path.chmod(0o755)
    runs = tmp_path / "runs"
    runs.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: try as nobody against a root-owned directory
        user = 65534
    else:
        runs.chmod(0o555)
        user = None
    proc = ftdeploy("data", "--runs-dir", str(runs), cwd=tmp_path, user=user, timeout=120,
                    env={"FTDEPLOY_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)})
    message = _refused(proc, f"cannot write {runs / 'ftdeploy-demo'}", "Permission denied", "--runs-dir")
    assert "chown" in message and str(runs) in message
    assert list(runs.iterdir()) == []
    shutil.rmtree(tmp_path)


def test_an_unwritable_plot_path_names_the_file(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q?", "response": "a."}\n')
    target = Path("/proc/version/plot.png")  # a path no one can create, root included
    proc = ftdeploy("data", "--runs-dir", str(tmp_path / "runs"), "inspect", str(data), "--plot", str(target),
                    cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "/proc/version" in proc.stderr


# ---------------------------------------------------------------- 6. failed or pointless commands leave nothing

@pytest.mark.parametrize("command", ["verify", "register", "merge", "export", "modelfile", "train"])
def test_a_command_on_a_run_that_does_not_exist_says_so_and_writes_nothing(tmp_path, command):
    runs = tmp_path / "runs"
    started = time.monotonic()
    # The host is unreachable on purpose: the missing run must be reported first, without waiting for it.
    proc = ftdeploy(command, "--runs-dir", str(runs), "--name", "no-such-run", "--ollama-host", "http://127.0.0.1:9",
                    cwd=tmp_path, timeout=60)
    _refused(proc, "no run named 'no-such-run'", "train-and-serve")
    assert "127.0.0.1:9" not in proc.stderr
    assert time.monotonic() - started < 30
    assert not runs.exists()


def test_a_run_that_fails_in_preflight_leaves_no_directory(tmp_path):
    runs = tmp_path / "runs"
    proc = ftdeploy("train-and-serve", "--runs-dir", str(runs), "--ollama-host", "http://127.0.0.1:9", cwd=tmp_path,
                    timeout=120)
    _refused(proc, "127.0.0.1:9")
    assert not (runs / "ftdeploy-demo").exists()


def test_data_inspect_makes_no_run_directory(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q?", "response": "a."}\n')
    proc = ftdeploy("data", "--runs-dir", str(tmp_path / "runs"), "inspect", str(data), "--json",
                    cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(json.loads(proc.stdout)["plot"]).is_file()
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 7. errors point at the right place

def test_config_errors_name_where_each_value_came_from(tmp_path):
    proc = ftdeploy("config", "--set", "lora.r=-1", "--name", "x" * 300, cwd=tmp_path, timeout=60)
    message = _refused(proc)
    assert "lora.r: must be in [1, 4096], got -1  [from --set lora.r=-1]" in message
    assert "too long" in message and "300" in message and "[from --name]" in message
    assert "demo.yaml" not in message  # a file the user never named

    config = tmp_path / "mine.yaml"
    config.write_text("lora:\n  r: 0\n")
    proc = ftdeploy("config", "--config", str(config), cwd=tmp_path, timeout=60)
    assert f"lora.r: must be in [1, 4096], got 0  [from {config}, key lora.r]" in _refused(proc)

    proc = ftdeploy("config", cwd=tmp_path, timeout=60, env={"OLLAMA_HOST": "not a host!"})
    assert "[from $OLLAMA_HOST]" in _refused(proc)


def test_bad_data_leaves_a_good_run_as_it_was_and_makes_no_new_one(tmp_path):
    """Issue 24: `ftdeploy data --name identity --data bad.jsonl` rewrote the good run's config.yaml and turned its
    "done" data record into "failed"; in a new run it left config.yaml, manifest.json and .lock behind. Every bad row
    is still named, in one message."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(4)))
    rows = [{"prompt": "q0", "response": "a0"}, *({"prompt": f"q{i}"} for i in range(1, 4))]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    proc = ftdeploy("data", "--runs-dir", str(runs), "--name", "identity", "--data", str(good), cwd=tmp_path,
                    timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = runs / "identity"
    records = {name: (run / name).read_bytes() for name in ("config.yaml", "manifest.json")}
    data_files = sorted((p.name, p.stat().st_mtime_ns) for p in (run / "data").iterdir())

    proc = ftdeploy("data", "--runs-dir", str(runs), "--name", "identity", "--data", str(bad), cwd=tmp_path,
                    timeout=300)
    _refused(proc, f"{bad}:2", f"{bad}:4")
    assert {name: (run / name).read_bytes() for name in records} == records
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / "data").iterdir()) == data_files

    proc = ftdeploy("data", "--runs-dir", str(runs), "--name", "fresh", "--data", str(bad), cwd=tmp_path, timeout=300)
    _refused(proc, f"{bad}:2", f"{bad}:4")
    assert sorted(p.name for p in runs.iterdir()) == ["identity"]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Issue 24: a list-form alias bomb as --config hung (killed at 60 s), a dict-form one ended in MemoryError."""
    lists = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    maps = "a: &a {a0: lol, a1: lol, a2: lol, a3: lol, a4: lol, a5: lol, a6: lol, a7: lol, a8: lol}\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} {{{', '.join(f'{chr(98 + i)}{j}: *{chr(97 + i)}' for j in range(9))}}}\n"
        for i in range(8))
    for name, text in (("lists", lists + "lora:\n  target_modules: *i\n"), ("maps", maps + "modelfile:\n  parameters:\n"
                                                                            "    <<: *i\n")):
        bomb = tmp_path / f"{name}.yaml"
        bomb.write_text(text)
        started = time.monotonic()
        proc = ftdeploy("config", "--config", str(bomb), cwd=tmp_path, timeout=60)
        _refused(proc, f"{bomb}: refused: it holds more than 10000 values once its aliases (*name) are expanded")
        assert proc.returncode == 2 and time.monotonic() - started < 30


def test_a_stopped_stage_is_never_left_running_and_says_how_to_go_on(tmp_path):
    """`docker stop` and CI cancellation send SIGTERM: the stage must not stay "running" in the manifest, and the
    user is told that it stopped and how to continue. Stopped before it wrote anything, a new run leaves nothing."""
    runs = tmp_path / "runs"
    manifest = runs / "ftdeploy-demo" / "manifest.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ftdeploy.cli", "data", "--runs-dir", str(runs)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if manifest.is_file() and '"running"' in manifest.read_text():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the data stage never started")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM" in err and "Run the same command again to continue where it stopped" in err
    assert "Traceback" not in err
    if manifest.exists():  # stopped after the stage wrote something: recorded as stopped
        record = json.loads(manifest.read_text())["stages"]["data"]
        assert record["status"] == "failed" and "stopped" in record["error"], record
    else:  # stopped before (the tokenizer was loading): nothing of the new run is left
        assert not (runs / "ftdeploy-demo").exists()
