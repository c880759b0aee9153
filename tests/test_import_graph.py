"""The package's import graph, read from the source with ast: no cycles.

An import inside a function counts as an edge too: a lazy import hides a
cycle from Python's loader, it does not remove it. A module importing its own
parent package (`from keras_vitscale.training import errors` inside
training/) is an edge to the submodule it names, not to the package.
"""

import ast
from pathlib import Path

import keras_vitscale

PACKAGE_DIR = Path(keras_vitscale.__file__).parent


def module_files():
    """{dotted module name: path} of every module in the package."""
    files = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_names(module, path):
    """Every dotted name one module's import statements mention."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph():
    """{module: set of package modules it imports}."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in files:  # `from pkg import func` -> pkg
                name = name.rpartition(".")[0]
            # A submodule naming an ancestor package only runs what the
            # import system runs anyway; it is not a cycle.
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "keras_vitscale.model" in graph
    assert "keras_vitscale.config" in graph["keras_vitscale.model"]


def test_find_cycles_sees_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_are_edges(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from pkg.other import thing\n")
    assert set(imported_names("pkg.mod", path)) == {"pkg.other", "pkg.other.thing"}


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    graph = import_graph()
    described = ["  " + " <-> ".join(c) + "\n" + "\n".join(
        f"    {m} imports {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)
