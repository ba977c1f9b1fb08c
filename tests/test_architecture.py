"""The package layering of DESIGN.md §3, read from the source: who may import whom, and no import cycles.

Every `import` statement counts, also those inside functions: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "protocols", "fastavatar_stream")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "node_modules" not in p.parts}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module `name` refers to (`engine.model.lgrt.LGRT` -> `engine.model.lgrt`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for name in names:
            target = _resolve(name, known)
            if target and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imports(module, path, known) for module, path in known.items()}


def _edges_into(graph: dict[str, set[str]], source_prefix: str, target_prefix: str,
                allow=lambda module: False) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if m.split(".")[0] == source_prefix and not allow(m)
                  for t in targets if t == target_prefix or t.startswith(target_prefix + "."))


def test_engine_and_protocols_import_nothing_of_the_daemon(graph):
    assert _edges_into(graph, "engine", "fastavatar_stream") == []
    assert _edges_into(graph, "protocols", "fastavatar_stream") == []


def test_engine_and_protocols_stay_apart(graph):
    assert _edges_into(graph, "engine", "protocols") == []
    assert _edges_into(graph, "protocols", "engine") == []


def test_the_runtime_engine_never_imports_what_makes_models(graph):
    def in_train_wing(module: str) -> bool:
        return module.startswith("engine.train") or module == "engine.testing"

    assert _edges_into(graph, "engine", "engine.train", allow=in_train_wing) == []


def test_the_daemon_serves_without_the_training_wing_except_the_train_command(graph):
    assert _edges_into(graph, "fastavatar_stream", "engine.train",
                       allow=lambda m: m == "fastavatar_stream.commands.train") == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_the_import_graph_of_our_packages_has_no_cycle(graph):
    assert _cycles(graph) == []


def test_the_checker_sees_a_cycle_and_a_wrong_direction():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _edges_into({"engine.x": {"fastavatar_stream.y"}}, "engine", "fastavatar_stream") == [
        "engine.x -> fastavatar_stream.y"]
