"""The package's imports run one way, down the floors, with no circle (DESIGN.md "The layers").

Every import counts, the ones inside functions too (an in-function import hides a circle, it does not break
it). The graph is read from the source with `ast`, so the test sees what the code says, not what one run
happened to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import faceforge

PACKAGE = Path(faceforge.__file__).parent

# the floors, bottom first; a module may import from its own floor or any floor below, never above
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("faceforge.core",)),
    ("parts", ("faceforge.data", "faceforge.backbones", "faceforge.heads", "faceforge.distill")),
    ("build", ("faceforge.build",)),
    ("jobs", ("faceforge.train", "faceforge.eval", "faceforge.deploy")),
    ("cli", ("faceforge.cli",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int | None:
    for level, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the faceforge modules it imports (a package's __init__ re-exporting its children excluded)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    deps.add(target)
        graph[name] = deps
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (the circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert strongly_connected(import_graph()) == []


def test_every_module_sits_on_a_floor():
    graph = import_graph()
    homeless = [m for m in graph if m != "faceforge" and floor_of(m) is None]
    assert homeless == [], f"modules on no floor of FLOORS: {homeless}"


def test_imports_run_down_the_floors():
    up = [
        f"{source} ({FLOORS[floor_of(source)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})"
        for source, targets in import_graph().items() if source != "faceforge"
        for target in targets if target != "faceforge" and floor_of(target) > floor_of(source)
    ]
    assert up == []


def test_every_registered_part_is_named_in_the_docs():
    """A user reads docs/ before the code: every registered name of every registry is written there as `name`."""
    from faceforge.backbones import BACKBONES
    from faceforge.data.samplers import SAMPLERS
    from faceforge.heads import HEADS
    from faceforge.train.data import DATASETS
    from faceforge.train.objectives import OBJECTIVES
    from faceforge.train.optim import OPTIMIZERS, SCHEDULES

    docs = "".join(p.read_text(encoding="utf-8") for p in (PACKAGE.parent / "docs").glob("*.md"))
    missing = [f"{r.kind} {name!r}" for r in (HEADS, BACKBONES, DATASETS, SAMPLERS, OBJECTIVES, OPTIMIZERS, SCHEDULES)
               for name in r.names() if f"`{name}`" not in docs]
    assert missing == []
