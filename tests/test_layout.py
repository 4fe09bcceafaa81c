"""The package layout keeps its promises: no import circles (lazy imports included), the lower
stages never import the higher ones, and only the command line, the display and batch's console print."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "caffe_bn_merge"
LOWER = ("caffe_bn_merge.io", "caffe_bn_merge.maths", "caffe_bn_merge.graph", "caffe_bn_merge.net")
HIGHER = ("caffe_bn_merge.rules", "caffe_bn_merge.verification", "caffe_bn_merge.batch", "caffe_bn_merge.cli")
PRINTERS = {"caffe_bn_merge.cli", "caffe_bn_merge.batch.console", "caffe_bn_merge.display"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (a name imported from a package may be a module)."""
    if node.level == 0:
        base = node.module or ""
    else:
        anchor = module.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, node.module] if node.module else anchor)
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its body (lazy imports too)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found.update(_resolve(module, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module] = {name for name in found if name in files and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_circles() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("lower", LOWER)
def test_lower_stages_do_not_import_higher_ones(lower: str) -> None:
    graph = import_graph()
    offending = {
        m: sorted(t for t in targets if _under(t, HIGHER)) for m, targets in graph.items() if _under(m, (lower,))
    }
    assert {m: t for m, t in offending.items() if t} == {}


def test_only_the_command_line_prints() -> None:
    printing = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            called = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
            console = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rich.console")
            if called or console:
                printing.add(_module_name(path))
    assert printing <= PRINTERS


def test_every_folder_of_code_is_a_package() -> None:
    """`packages = find:` ships only folders with an `__init__.py`: a folder without one would be
    left out of `pip install .` while an editable install still works."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert sorted(str(f) for f in folders if not (f / "__init__.py").is_file()) == []


def test_no_test_file_imports_another() -> None:
    """Shared test code lives in conftest.py and harness.py, never in a test file."""
    importing = []
    for path in (PACKAGE.parent / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            importing += [f"{path.name}: {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert importing == []
