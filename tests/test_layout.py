"""The layout of core/: no import cycle (lazy imports included), nothing in core imports the app layer, and the
folders import one way (grids <- model <- methods <- studies <- analysis <- present, cli)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

CORE = ROOT / "core"
# what each folder may import from core (itself included); the top-level modules are the public API / the handle
ALLOWED = {
    "grids": {"grids"},
    "model": {"grids", "model"},
    "methods": {"grids", "model", "methods"},
    "studies": {"grids", "model", "methods", "studies"},
    "analysis": {"grids", "model", "methods", "studies"},
    "present": {"grids", "model", "methods", "studies", "analysis", "present"},
    "cli": {"grids", "model", "methods", "studies", "analysis", "present", "cli"},
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every core module ``path`` imports, at any depth of the file (lazy imports too)."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in ("core", "ui", "pages", "streamlit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in ("core", "ui", "pages", "streamlit"):
                continue
            for a in node.names:  # "from pkg import module" names a module
                sub = f"{target}.{a.name}"
                out.add(sub if sub in modules else target)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for p in CORE.rglob("*.py")]
    modules = {_module(p) for p in files}
    return {_module(p): _imports(p, modules) for p in files}


def _folder(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "core"


def test_core_never_imports_the_app_layer():
    bad = {m: sorted(i for i in imps if i.split(".")[0] in ("ui", "pages", "streamlit")) for m, imps in _graph().items()}
    assert {m: v for m, v in bad.items() if v} == {}


def test_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_folders_import_one_way():
    wrong = []
    for mod, imps in _graph().items():
        folder = _folder(mod)
        if folder not in ALLOWED:  # core/__init__, __main__ and the public API modules
            continue
        for i in imps:
            if i.startswith("core.") or i == "core":
                target = _folder(i) if i != "core" else "core"
                if target in ("quant", "awq", "gptq", "hqq"):  # the public API is for outside callers
                    wrong.append((mod, i))
                elif target not in ALLOWED[folder] and target != folder:
                    wrong.append((mod, i))
    assert wrong == []


def test_the_graph_sees_imports():
    """The checks above read real edges: a known lazy import and a known relative one are in the graph."""
    g = _graph()
    assert "core.methods.base" in g["core.methods.gptq"]
    assert "core.analysis" in g["core.cli"]  # lazy, inside cmd_analyze
    assert "core.grids.quant" in g["core.grids.spec"]
