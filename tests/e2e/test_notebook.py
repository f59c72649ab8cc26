"""examples/quickstart.ipynb, executed cell by cell by a real Jupyter kernel (nbclient + ipykernel, this interpreter):
a cell that raises fails the test. The notebook takes its runs directory, run name and Ollama address from the
environment; given the session's demo run (conftest.demo_cli_run, which the CLI made with the same config), its
train_and_serve skips every finished stage and only registers and verifies again, so it costs about a minute, not
another training."""

import json
import re
import sys

import pytest
from conftest import E2E_RUN, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.ollama, pytest.mark.slow]

NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def _kernel_for_this_interpreter(jupyter_dir):
    """A kernelspec that starts ipykernel in this interpreter (the one ftdeploy is installed in), whatever
    `python3` kernel the machine has."""
    spec = jupyter_dir / "kernels" / "ftdeploy-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ftdeploy tests", "language": "python"}))
    return spec.name


def _text(output) -> str:
    """An output's text, without the terminal colours rich and IPython put in their plain-text forms."""
    if output["output_type"] == "stream":
        text = output["text"]
    elif output["output_type"] == "error":
        text = "\n".join(output["traceback"])
    else:
        text = output.get("data", {}).get("text/plain", "")
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_the_quickstart_notebook_trains_serves_and_asks_the_model_through_the_api(demo_cli_run, ollama_server,
                                                                                tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    _, run_dir, _ = demo_cli_run
    monkeypatch.setenv("FTDEPLOY_RUNS_DIR", str(run_dir.parent))
    monkeypatch.setenv("FTDEPLOY_NAME", E2E_RUN)
    monkeypatch.setenv("OLLAMA_HOST", ollama_server.host)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
    kernel = _kernel_for_this_interpreter(tmp_path / "jupyter")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name=kernel, timeout=900,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"a cell of {NOTEBOOK.name} failed:\n{str(exc)[-6000:]}")

    cells = {cell.source: cell.outputs for cell in notebook.cells if cell.cell_type == "code"}
    run_cell = next(outputs for source, outputs in cells.items() if source.startswith("served = train_and_serve"))
    # The API prints nothing on stdout (not even what a library writes to the file descriptor: the kernel forwards
    # that too); progress is rich's display output, the logs stderr.
    assert not [o for o in run_cell if o["output_type"] == "stream" and o["name"] == "stdout"], run_cell
    shown = "".join(_text(o) for o in run_cell)
    assert "[6/7] register" in shown and "[7/7] verify" in shown, shown[-3000:]
    summary = "".join(_text(o) for outputs in cells.values() for o in outputs if o["output_type"] == "execute_result")
    assert "'skipped (unchanged)': ('data', 'train', 'merge', 'export', 'modelfile')" in summary, summary
    assert "'verified': True" in summary
    answer = next(outputs for source, outputs in cells.items() if "client.chat(" in source)
    assert "7341" in "".join(_text(o) for o in answer), answer
