"""ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear; 120 columns), mypy and vulture (dead code), as configured in
pyproject.toml, and a length budget for functions, run with the rest of the tests, so `.ci/run` fails on a lint or
type error, unused code or a function grown too long like on any other."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lint  # tens of seconds: `-m "not lint"` leaves them out of a quick local loop


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs the dev extra")
    return found


def test_ruff_finds_nothing():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "ftdeploy", "tests", "scripts"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_mypy_finds_nothing():
    proc = subprocess.run([_tool("mypy")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout


def test_vulture_finds_no_dead_code():
    """Unused functions, classes, methods, attributes and variables in ftdeploy/ ([tool.vulture]: 60% confidence,
    tests/unit/vulture_whitelist.py for what only a framework or another library uses). Code reached only from tests
    counts as unused: remove it, or move it to the tests."""
    proc = subprocess.run([_tool("vulture")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


MAX_FUNCTION_LINES = 80
# Over the budget today, each allowed at most the lines it has now (by qualified name, so a move to another module
# keeps its entry). Shrink these: split one under the budget and delete its entry; never raise a number.
OVER_BUDGET = {
}


def _function_lengths() -> dict[str, tuple[str, int]]:
    """Qualified name (Class.method, outer.inner) -> (where, lines from `def` to its last line) in ftdeploy/."""
    found: dict[str, tuple[str, int]] = {}

    def visit(node: ast.AST, prefix: str, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    assert child.end_lineno is not None
                    found[name] = (f"{path.relative_to(REPO)}:{child.lineno}", child.end_lineno - child.lineno + 1)
                visit(child, f"{name}.", path)
            else:
                visit(child, prefix, path)

    for path in sorted((REPO / "ftdeploy").rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), "", path)
    return found


def test_no_function_is_longer_than_the_budget():
    lengths = _function_lengths()
    too_long = [f"{where} {name}: {n} lines" for name, (where, n) in sorted(lengths.items())
                if n > OVER_BUDGET.get(name, MAX_FUNCTION_LINES)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (or over their OVER_BUDGET entry): split them\n" \
        + "\n".join(too_long)
    stale = [name for name in OVER_BUDGET if lengths.get(name, ("", 0))[1] <= MAX_FUNCTION_LINES]
    assert not stale, f"within the budget now, or gone: delete their OVER_BUDGET entries: {stale}"
