"""The package's import structure: no module imports another that (even lazily, inside a function) imports it
back, every module imports on its own, and none pulls in torch or transformers when imported."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ftdeploy"
HEAVY = ("torch", "transformers", "unsloth", "peft", "trl", "datasets", "llama_cpp")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _executed_nodes(tree: ast.AST):
    """Every node, except the bodies of `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in (child, *_executed_nodes(child)))
            continue
        yield node
        yield from _executed_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (top level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _executed_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
                # `from . import base_model` imports the submodule; the package only when a name is its own
                # (`from .config import Config`): by then a module's own package has been initialised anyway
                targets = [*names, *([base] if any(n not in modules for n in names) else [])]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert graph["ftdeploy.distributed"] >= {"ftdeploy.stages.train", "ftdeploy.strategy"}, "the graph is read"
    assert "ftdeploy.pipeline.verify" in graph["ftdeploy.pipeline.registry"]
    assert "ftdeploy.config" not in graph["ftdeploy.stages.verify"], "annotation-only imports never run"
    assert cycles(graph) == []


@pytest.mark.lint  # one interpreter per module: tens of seconds
@pytest.mark.parametrize("module", sorted(_modules()))
def test_each_module_imports_alone_without_the_training_stack(module):
    probe = (f"import sys, {module}\n"
             f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
             "print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"importing {module} loads {proc.stdout.strip()}"
