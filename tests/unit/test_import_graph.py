"""honed's modules form no import cycle: a shared piece that two stages need lives below both.

Every import counts, at module level or inside a function (a late import hides a cycle from Python but not from
a reader): the test parses the sources, so it needs none of the heavy dependencies."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "honed"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The honed modules `path` imports: `import a.b`, `from a import b` (module b or a name in a)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules} - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a → … → a) per strongly connected component of more than one module."""
    found, done = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycle = path + [start]
                    if frozenset(cycle) not in done:
                        done.add(frozenset(cycle))
                        found.append(cycle)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_honed_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_walk_sees_a_cycle_and_late_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    graph = import_graph()
    assert "honed.train.trainer" in graph["honed.cli"]  # imported inside a function in cli.py


def test_stage_handoffs_need_neither_torch_nor_the_training_driver():
    graph = import_graph()
    for module in ("honed.artifacts", "honed.train.plan"):
        assert not {m for m in graph[module] if m.startswith("honed.train.trainer")}, module
    assert "import torch" not in (PACKAGE / "artifacts.py").read_text()
    serve = {m for name, deps in graph.items() if name.startswith("honed.serve") for m in deps}
    assert not {m for m in serve if m.startswith("honed.train")}, "serving imports the training code"
