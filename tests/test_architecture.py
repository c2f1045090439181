"""The shape of the code: which part may import which, no import circles, files a reader can hold in mind.

The import graph is read from the source (every import, also those inside functions: a lazy import is still a
dependency), for the pack's own modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "protobooth"
MAX_ENGINE_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; for `from x import y`, both x and x.y, y may be a module)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [path for folder in ("engine", "nodes") for path in (ROOT / folder).rglob("*.py")] + [ROOT / "__init__.py"]
    modules = {_module_name(path): path for path in files}
    return {name: {imported for imported in _imports(path) if imported in modules and imported != name}
            for name, path in modules.items()}


def _external(prefix: str) -> dict[str, set[str]]:
    files = list((ROOT / prefix).rglob("*.py"))
    return {_module_name(path): _imports(path) for path in files}


def test_no_import_circles():
    graph = _graph()
    done, on_path, circles = set(), [], []

    def visit(name: str) -> None:
        if name in on_path:
            circles.append(on_path[on_path.index(name):] + [name])
            return
        if name in done:
            return
        on_path.append(name)
        for imported in sorted(graph[name]):
            # a package's __init__ importing its own submodules is how it exports them, not a circle
            if not imported.startswith(name + "."):
                visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert circles == [], "\n".join(" -> ".join(circle) for circle in circles)


def test_the_engine_imports_no_comfyui_benchmark_or_test_kit():
    for module, imported in _external("engine").items():
        bad = sorted(i for i in imported if i.split(".")[0] in ("comfy", "folder_paths", "nodes", "kit", "tests",
                                                               "comfyui_harness")
                     or i.startswith((f"{PACKAGE}.benchmarks", f"{PACKAGE}.nodes", f"{PACKAGE}.tests")))
        assert not bad, f"{module} imports {bad}"


def test_the_nodes_import_no_test_kit_and_no_test_models():
    for module, imported in _external("nodes").items():
        bad = sorted(i for i in imported if i.split(".")[0] in ("kit", "tests", "comfyui_harness")
                     or i.startswith((f"{PACKAGE}.tests", f"{PACKAGE}.benchmarks", f"{PACKAGE}.engine.models.tiny")))
        assert not bad, f"{module} imports {bad}"


def test_every_engine_file_is_short_enough_to_read_in_one_sitting():
    long = {str(path.relative_to(ROOT)): n for path in (ROOT / "engine").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_ENGINE_LINES}
    assert long == {}


def test_the_graph_reader_sees_relative_and_lazy_imports():
    graph = _graph()
    assert f"{PACKAGE}.engine.train.settings" in graph[f"{PACKAGE}.engine.train.trainer"]  # from .settings import ...
    assert f"{PACKAGE}.engine.models.loading" in graph[f"{PACKAGE}.engine.cli.train"]  # inside a function
    assert f"{PACKAGE}.engine.concept.concept" in graph[f"{PACKAGE}.nodes.concept"]  # from ..engine.concept.concept
