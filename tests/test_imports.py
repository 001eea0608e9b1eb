"""The import graph read from the source (every Import/ImportFrom in each module's AST, those inside functions
included): no cycle between modules of exporter/, none between the packages, stats/ and evals/ one way only,
and the runtime never reaches torch or the exporter."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cli": "unskill", "exporter": "unskill.exporter", "stats": "unskill.stats", "evals": "unskill.evals",
            "runtime": "unskill.runtime", "cluster": "unskill.cluster"}   # folder -> import name (pyproject's package-dir)


def module_name(path: Path) -> str:
    package = PACKAGES[path.parent.name]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def modules() -> dict[str, Path]:
    return {module_name(path): path for folder in PACKAGES for path in (ROOT / folder).glob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of this project that `name` imports, anywhere in its source."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:   # unskill.runtime.ksd.X -> unskill.runtime.ksd
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    table = modules()
    return {name: imports_of(name, path, set(table)) for name, path in table.items()}


def package_of(module: str) -> str:
    """unskill.stats.probe -> unskill.stats; the top package and its command modules (cli/) -> unskill."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in ("exporter", "stats", "evals", "runtime", "cluster") \
        else "unskill"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from .folder import save_model\n    from unskill.runtime import io\n")
    known = {"unskill.exporter.folder", "unskill.runtime", "unskill.runtime.io", "unskill.exporter.mod"}
    assert imports_of("unskill.exporter.mod", source, known) == {"unskill.exporter.folder", "unskill.runtime.io"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_within_exporter():
    graph = import_graph()
    inside = {m: {t for t in targets if t.startswith("unskill.exporter.")}
              for m, targets in graph.items() if m.startswith("unskill.exporter.")}
    assert find_cycle(inside) is None


@pytest.mark.parametrize("package", ["unskill.runtime", "unskill.stats", "unskill.evals"])
def test_no_import_cycle_within_the_library_packages(package):
    graph = import_graph()
    inside = {m: {t for t in targets if t.startswith(package + ".")}
              for m, targets in graph.items() if m.startswith(package + ".")}
    assert find_cycle(inside) is None


def test_no_import_cycle_between_packages():
    """cli -> exporter -> stats -> runtime and evals -> stats: each package imports only those below it."""
    between: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        source = package_of(module)
        between.setdefault(source, set()).update(package_of(t) for t in targets if package_of(t) != source)
    assert find_cycle(between) is None, between
    assert "unskill.evals" not in between["unskill.stats"] and "unskill.stats" in between["unskill.evals"]
    assert between["unskill.runtime"] == set(), between["unskill.runtime"]
    # cluster/ (Ray) sits beside the commands: only cli/ imports it, so the library works without ray
    assert [p for p, targets in between.items() if "unskill.cluster" in targets] == ["unskill"], between


def test_the_runtime_imports_neither_torch_nor_the_exporter():
    for path in (ROOT / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("torch", "transformers", "optimum", "unskill.exporter")), (path, name)
