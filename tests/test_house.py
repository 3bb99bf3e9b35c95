"""The house rules of issue 22 that can be read off the source (with `ast`, nothing is imported):

- no import circle among the modules of crbp_deploy/;
- no module under crbp_deploy/ other than cli.py and commands/ imports crbp_deploy.commands or crbp_deploy.cli
  (the CLI is a thin layer over the library, never the other way round);
- no function in crbp_deploy/ longer than MAX_FUNCTION_LINES lines;
- one definition each of TASKS, EVAL_BATCH, the quality scorer, IoU and the dataset opener (by the names
  the issue found them under: a second name for the same thing counts as a second definition).

An import is any `import` / `from ... import` statement, at module level or inside a function or class (a
deferred import still couples the two modules), and `importlib.import_module("crbp_deploy....")` with a literal
name. `from package import name` points at the submodule `package.name` when there is one, else at the
package. A module name computed at run time (a registry of "module:Class" strings) is not followed.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "crbp_deploy"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FUNCTION_LINES = 80
CLI_MODULES = ("cli", "commands")  # the CLI layer, under the package: these and everything under them


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str  # relative to the folder that holds the package
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root (a package's name is its __init__.py)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (None: not one of ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _from_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The modules of ours that one AST node imports."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _from_base(module, path, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            names.append(sub if alias.name != "*" and sub in known else base)
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ast.unparse(node.func) in ("importlib.import_module", "import_module")):
        names = [node.args[0].value]
    return [target for target in map(lambda n: _owner(n, known), names) if target is not None]


def import_graph(root: Path = SOURCE, package: str = PACKAGE) -> tuple[dict[str, Path], list[Edge]]:
    known = modules(root, package)
    edges = []
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for target in _targets(module, path, node, known):
                if target != module:
                    edges.append(Edge(module, target, str(path.relative_to(root.parent)), node.lineno))
    return known, edges


def strongly_connected(nodes, edges: list[Edge]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); the components of more than one module, each sorted."""
    succ = {n: sorted({e.target for e in edges if e.source == n}) for n in nodes}
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def one_circle(component: list[str], edges: list[Edge]) -> list[Edge]:
    """A shortest circle through the component's first module, as the import statements that make it."""
    members = set(component)
    start = component[0]
    first = {}
    for e in edges:
        if e.source in members and e.target in members:
            first.setdefault((e.source, e.target), e)
    previous: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for (a, b), e in sorted(first.items()):
                if a != node:
                    continue
                if b == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, previous[path[0].source])
                    return path
                if b not in previous:
                    previous[b] = e
                    nxt.append(b)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # cannot happen in a strongly connected component


def import_circles(root: Path = SOURCE, package: str = PACKAGE) -> list[str]:
    known, edges = import_graph(root, package)
    lines = []
    for component in strongly_connected(known, edges):
        circle = one_circle(component, edges)
        chain = " -> ".join([e.source for e in circle] + [circle[0].source])
        lines.append(f"{chain}  ({', '.join(e.where() for e in circle)}; component: {', '.join(component)})")
    return lines


def _in_cli_layer(module: str, package: str) -> bool:
    return any(module == f"{package}.{m}" or module.startswith(f"{package}.{m}.") for m in CLI_MODULES)


def cli_imports_from_library(root: Path = SOURCE, package: str = PACKAGE) -> list[str]:
    _, edges = import_graph(root, package)
    return sorted(f"{e.where()}: {e.source} imports {e.target}" for e in edges
                  if _in_cli_layer(e.target, package) and not _in_cli_layer(e.source, package))


def long_functions(root: Path = SOURCE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """file:function:lines for every function (methods and nested ones too) longer than `limit` lines,
    counted from its `def` line to its last line (docstring, comments and blank lines included)."""
    found = []

    def visit(node: ast.AST, prefix: str, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{name}:{lines}")
                visit(child, name + ".", path)
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".", path)
            else:
                visit(child, prefix, path)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "", path)
    return found


#: concept -> the module-level names it has been defined under; at most one of them may be defined, once.
#: (The dataset opener is `Task.open` in crbp_deploy/tasks/: a module-level opener would be a second one.)
ONE_DEFINITION = {
    "TASKS": {"TASKS"},
    "EVAL_BATCH": {"EVAL_BATCH"},
    "the quality scorer": {"Scorer"},
    "IoU": {"iou_counts", "pixel_counts"},
    "the dataset opener": {"open_data", "open_dataset", "open_pathfinder", "load_pathfinder", "load_panoptic_split"},
}


def module_level_names(tree: ast.Module):
    """(name, line) for every name a module binds at its top level (also inside a top-level if/try)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        yield name.id, node.lineno
        elif isinstance(node, (ast.If, ast.Try)):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", [])
                        + [n for h in getattr(node, "handlers", []) for n in h.body])


def repeated_definitions(root: Path = SOURCE) -> list[str]:
    found: dict[str, list[str]] = {concept: [] for concept in ONE_DEFINITION}
    for path in sorted(root.rglob("*.py")):
        for name, line in module_level_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for concept, names in ONE_DEFINITION.items():
                if name in names:
                    found[concept].append(f"{path.relative_to(root.parent)}:{line} {name}")
    return [f"{concept}: {'; '.join(where)}" for concept, where in found.items() if len(where) > 1]


# --- the rules ----------------------------------------------------------------------------------------------
def test_no_import_circle():
    circles = import_circles()
    assert not circles, "import circles in crbp_deploy/:\n" + "\n".join(circles)


def test_library_does_not_import_the_cli():
    bad = cli_imports_from_library()
    assert not bad, "only cli.py and commands/ may import the CLI layer:\n" + "\n".join(bad)


def test_no_function_longer_than_80_lines():
    bad = long_functions()
    assert not bad, f"functions longer than {MAX_FUNCTION_LINES} lines (file:function:lines):\n" + "\n".join(bad)


def test_one_definition_each():
    bad = repeated_definitions()
    assert not bad, "defined more than once:\n" + "\n".join(bad)


# --- the checks themselves: they see what they must see -----------------------------------------------------
def test_the_import_graph_sees_every_kind_of_import():
    known, edges = import_graph()
    pairs = {(e.source, e.target) for e in edges}
    assert f"{PACKAGE}.cli" in known and f"{PACKAGE}.commands" in known and f"{PACKAGE}.errors" in known
    assert (f"{PACKAGE}.cli", f"{PACKAGE}.commands") in pairs  # from .commands import register_all
    assert (f"{PACKAGE}.cli", f"{PACKAGE}.errors") in pairs  # from .errors import CrbpError
    assert len(pairs) > 2 * len(known) // 3, "too few imports found: the resolver misses some"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def toy(tmp_path):
    """A package `toy` with one circle through a deferred relative import and one through `import a.b`."""
    return _write(tmp_path / "toy", {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from . import a\n    return a\n",
        "c.py": "import toy.sub.d\n",
        "sub/__init__.py": "",
        "sub/d.py": "import importlib\nimportlib.import_module('toy.c')\n",
        "clean.py": "import os\nfrom toy import a\nfrom .sub import d\n",
        "cli.py": "from .clean import a\n",
        "commands/__init__.py": "from ..cli import a\n",
        "library.py": "def g():\n    from .commands import x\n",
        "long.py": "class K:\n    def m(self):\n" + "        x = 1\n" * 5 + "\ndef short():\n    pass\n",
        "twice.py": "TASKS = {}\nif True:\n    def pixel_counts():\n        pass\n",
        "sub/again.py": "TASKS: dict = {}\nclass Scorer:\n    EVAL_BATCH = 1\n",
    })


def test_the_checks_find_planted_violations(toy):
    circles = import_circles(toy, "toy")
    assert len(circles) == 2, circles
    assert circles[0].startswith("toy.a -> toy.b -> toy.a  (toy/a.py:1, toy/b.py:2;"), circles
    assert circles[1].startswith("toy.c -> toy.sub.d -> toy.c  (toy/c.py:1, toy/sub/d.py:2;"), circles
    assert cli_imports_from_library(toy, "toy") == ["toy/library.py:2: toy.library imports toy.commands"]
    assert long_functions(toy, limit=5) == ["toy/long.py:K.m:6"]
    assert long_functions(toy, limit=6) == []
    assert repeated_definitions(toy) == ["TASKS: toy/sub/again.py:1 TASKS; toy/twice.py:1 TASKS"]
