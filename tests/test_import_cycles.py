"""The house has no import circles: the graph of the project's own imports (every import, also the ones inside
functions, which run as surely, only later; not those under `if TYPE_CHECKING:`) has no cycle.

    python tests/test_import_cycles.py     # prints the graph's size and any cycle
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {"build", "runs", "data", "__pycache__"}  # and hidden folders (.venv, .git)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the project (a test module also by its bare name: tests import each
    other so)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in SKIPPED or p.startswith(".") for p in parts):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
        if parts[0] == "tests" and len(parts) == 2:
            out.setdefault(parts[1], path)
    return out


def imported_names(tree: ast.Module, module: str, package: bool):
    """Every name an import statement of `tree` can load (`from a import b` loads a and, if it is a module, a.b)."""
    nodes = [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                here = module.split(".") if package else module.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        nodes.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    canonical = {}
    for name, path in modules.items():
        canonical.setdefault(path, name)
    graph = {}
    for path, name in canonical.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for t in imported_names(tree, name, path.name == "__init__.py"):
            parts = t.split(".")
            for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                # importing a.b.c runs a/__init__.py and a/b/__init__.py first: edges to them too, except to the
                # importer's own packages (always loaded before it, whatever it imports)
                if prefix in modules and not name.startswith(prefix + "."):
                    targets.add(canonical[modules[prefix]])
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle through them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(one_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path start -> ... -> start inside a strongly connected component (breadth first)."""
    start = min(component)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert {"config", "train", "model.bank", "pipeline.base"} <= graph.keys()  # it read the house
    assert "config" in graph["pipeline.augment"]  # and sees imports (this one is allowed: config is the ground)
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_finder_finds_a_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import a\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.a"]]


if __name__ == "__main__":
    g = import_graph()
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges")
    for c in cycles(g):
        print("cycle:", " -> ".join(c))
