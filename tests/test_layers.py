"""The layering of ``pipelines/`` read from its source with ``ast`` (docs/architecture.md §2): no import circle, no
import from a stage module into a library module, and stages never branch on the task (they ask the Task)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pipelines"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The ``pipelines`` modules ``name`` imports, at any depth of its code (deferred imports count too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    # importing a.b.c runs a/__init__ and a/b/__init__: the package initialisers count as imported too
    return found | {p for t in found for p in _parents(t) if p in MODULES and p != name}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


GRAPH = {name: imports(name) for name in MODULES}


def test_find_cycle_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_pipelines_has_no_import_circle():
    # package initialisers are left out: `pipelines/__init__` importing nothing heavy is its own concern
    graph = {name: {t for t in targets if t not in ("pipelines", "pipelines.stages", "pipelines.tasks")}
             for name, targets in GRAPH.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_library_module_imports_a_stage():
    upward = sorted(f"{name} imports {target}" for name, targets in GRAPH.items()
                    if not name.startswith(("pipelines.stages", "pipelines.cli")) for target in targets
                    if target.startswith("pipelines.stages"))
    assert upward == []


def branches(source: str, name: str) -> list[str]:
    """``task ==`` / ``task !=`` / ``task in`` comparisons and ``is_seq2seq`` calls in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            names = [n for n in (node.left, *node.comparators)
                     if isinstance(n, (ast.Name, ast.Attribute, ast.Subscript))]
            if any(_mentions_task(n) for n in names):
                found.append(f"{name}:{node.lineno} compares the task")
        elif isinstance(node, ast.Call) and _called(node) == "is_seq2seq":
            found.append(f"{name}:{node.lineno} calls is_seq2seq")
    return found


def _mentions_task(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "task"
    if isinstance(node, ast.Attribute):
        return node.attr == "task"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "task"
    return False


def _called(node: ast.Call) -> str:
    return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")


def test_branch_finder_sees_comparisons_and_seq2seq_checks():
    source = "if cfg.task == 'x':\n    pass\nif is_seq2seq(c):\n    pass\nif used['task'] != t:\n    pass\n"
    assert len(branches(source, "probe.py")) == 3


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_do_not_branch_on_the_task(path):
    assert branches(path.read_text(), path.name) == []
