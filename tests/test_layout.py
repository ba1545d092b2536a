"""Tier 1: the house's layout, read from the source with ast (nothing is imported).

The import graph of the pack (attention/, nodes/, tools/, the root __init__.py) has no circle; attention/ is pure
torch/numpy/scikit-learn (no ComfyUI module); the methods' files (attention/*.py) import neither the ShapesWorld
model and its figure commands (attention/shapesworld/) nor the demo (attention/demo/); the model depends on
nothing above it; only the ShapesWorld loaders (UNet, flow) among the nodes know ShapesWorld; files stay readable
in one sitting.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attention", "nodes")
SCRIPTS = ("tools",)                 # scripts that import their neighbours by bare name (sys.path[0] = tools/)
# what attention/ may import besides the standard library and itself
CORE_THIRD_PARTY = {"torch", "numpy", "sklearn", "scipy", "safetensors", "PIL"}   # scipy: scikit-learn brings it
COMFY_TOP_LEVEL = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "execution",
                   "server", "latent_preview", "node_helpers", "comfyui_version"}
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = {module_name(p): p for d in PACKAGES + SCRIPTS for p in (ROOT / d).rglob("*.py")}
    files["__root__"] = ROOT / "__init__.py"
    return files


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, relative level) of every import statement, at any depth (lazy ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.append((node.module or "", [a.name for a in node.names], node.level))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], 0) for a in node.names]
    return out


def graph() -> dict[str, set[str]]:
    """module -> the pack's modules it imports (a package's __init__ counts as the package's module)."""
    files = source_files()
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        package = "" if name == "__root__" else (name if path.name == "__init__.py" else name.rpartition(".")[0])
        deps = set()
        for module, names, level in imports(path):
            if level:
                base = package.split(".") if package else []
                base = base[:len(base) - level + 1]
                module = ".".join(base + ([module] if module else []))
            elif package.split(".")[0] in SCRIPTS:          # a script's neighbour: tools/<module>.py
                module = f"{package.split('.')[0]}.{module}"
            for candidate in [module] + [f"{module}.{n}" for n in names]:
                if candidate in files and candidate != name:
                    deps.add(candidate)
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_graph_is_read():
    edges = graph()
    assert {"attention.shapesworld.model", "attention.demo", "nodes.grounding_head", "tools.build_workflows",
            "__root__"} <= set(edges)
    assert "attention.shapesworld.model" in edges["attention.cli"]             # a lazy import inside a function
    assert "nodes.grounding_features" in edges["nodes.grounding_head"]         # a relative import
    assert "tools.workflow_format" in edges["tools.build_workflows"]           # a script's neighbour
    assert "attention.store" in edges["nodes.capture"]                         # nodes -> attention (..attention)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]   # the finder finds one


def test_no_import_circle():
    found = cycles(graph())
    assert not found, f"import circles (each a set of modules that import each other): {found}"


def test_the_core_imports_no_comfyui_and_only_torch_numpy_sklearn():
    allowed = set(sys.stdlib_module_names) | CORE_THIRD_PARTY
    bad = []
    for name, path in source_files().items():
        if not name.startswith("attention"):
            continue
        for module, _, level in imports(path):
            top = module.split(".")[0]
            if not level and (top in COMFY_TOP_LEVEL or top not in allowed):
                bad.append(f"{path.relative_to(ROOT)}: import {module}")
    assert not bad, bad


def test_methods_import_no_model_figure_or_demo_module():
    edges, files = graph(), source_files()
    methods = [m for m, p in files.items()            # attention/*.py: the methods (cli.py: the commands' helpers)
               if p.parent == ROOT / "attention" and p.name not in ("__init__.py", "cli.py")]
    assert {"attention.p2p", "attention.grounding", "attention.store"} <= set(methods)
    bad = {m: sorted(d for d in edges[m] if d.startswith(("attention.shapesworld", "attention.demo", "attention.cli")))
           for m in methods}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}
    figures = [m for m in edges if m.startswith("attention.shapesworld")]
    assert not any(d.startswith("attention.demo") for m in figures for d in edges[m]), "the model imports the demo"


def test_the_model_depends_on_nothing_above_it():
    below = closure(graph(), "attention.shapesworld.model")
    above = {"attention.cli", "attention.shapesworld.train", "attention.shapesworld.recipe",
             "attention.shapesworld.evaluate"}
    assert not below & above and not any(m.startswith("attention.demo") for m in below), sorted(below)


def test_only_the_shapesworld_loader_nodes_know_shapesworld():
    edges = graph()
    knowing = sorted(m for m in edges if m.startswith("nodes")
                     and any(d.startswith(("attention.shapesworld", "attention.demo")) for d in edges[m]))
    assert knowing == ["nodes.shapesworld", "nodes.shapesworld_flow"], knowing   # the UNet's and the DiT's


def test_files_are_readable_in_one_sitting():
    """Over MAX_LINES lines, a file says at its top (module docstring) why it is long ("long because ...")."""
    long = []
    for d in PACKAGES + SCRIPTS + ("benchmarks", "tests"):
        for path in (ROOT / d).rglob("*.py"):
            text = path.read_text()
            lines = text.count("\n")
            if lines > MAX_LINES and "long because" not in (ast.get_docstring(ast.parse(text)) or "").lower():
                long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long, f"split these by what a user does, or say at their top why they are long: {long}"
