"""Tier 1: every registered node has a help page for the editor's node library.

ComfyUI's frontend (1.35, NodeHelpService.fetchCustomNodeHelp) fetches
/extensions/<pack folder>/docs/<NodeId>/<locale>.md, then /extensions/<pack folder>/docs/<NodeId>.md,
where /extensions/<pack folder>/ serves the pack's WEB_DIRECTORY. Relative image paths in a page are
resolved against /extensions/<pack folder>/docs/. The registered node ids are read from the source
(the NODES list of __init__.py and each class's node_id), since ComfyUI is not installed here.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def web_directory() -> Path:
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEB_DIRECTORY" for t in node.targets):
            return (ROOT / node.value.value).resolve()
    raise AssertionError("__init__.py sets no WEB_DIRECTORY at module level: the editor would serve no help pages")


def registered_node_ids() -> list[str]:
    """node_id of every class in the NODES list of __init__.py, found in the module it is imported from."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    modules = {alias.asname or alias.name: node.module for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.level == 1 for alias in node.names}
    names = next(node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NODES" for t in node.targets))
    ids = []
    for elt in names.elts:
        path = ROOT / (modules[elt.id].replace(".", "/") + ".py")
        cls = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name == elt.id)
        found = [kw.value.value for n in ast.walk(cls) if isinstance(n, ast.Call)
                 for kw in n.keywords if kw.arg == "node_id"]
        assert len(found) == 1, f"{elt.id} in {path.name}: expected one node_id=..., found {found}"
        ids.append(found[0])
    return ids


def test_the_node_list_is_read():
    ids = registered_node_ids()
    assert len(ids) == len(set(ids)) >= 10
    assert {"AttentionCapture", "SelfAttnCluster", "PromptMixSampler", "DPLTokenOptimizer", "NullTextInvert",
            "P2PEditSampler"} <= set(ids)


def page_path(node_id: str) -> Path:
    docs = web_directory() / "docs"
    for path in (docs / node_id / "en.md", docs / f"{node_id}.md"):
        if path.is_file():
            return path
    raise AssertionError(f"no help page for {node_id}: write {docs / (node_id + '.md')} (the editor looks for "
                         f"docs/{node_id}/<locale>.md, then docs/{node_id}.md under WEB_DIRECTORY)")


@pytest.mark.parametrize("node_id", registered_node_ids())
def test_every_registered_node_has_a_help_page(node_id):
    text = page_path(node_id).read_text()
    for section in ("## How to wire it", "## Inputs", "## Outputs", "## Limits", "## Errors"):
        assert section in text, f"{node_id}: page lacks a '{section}' section"
    for src in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert not src.startswith(("/", "http")), f"{node_id}: {src} must be relative to docs/ to be served"
        picture = web_directory() / "docs" / src
        assert picture.is_file(), f"{node_id}: missing picture {picture}"
        assert picture.stat().st_size < 150_000, f"{picture} is {picture.stat().st_size} bytes; keep pictures small"


def test_web_directory_holds_no_script():
    # the editor loads every .js under WEB_DIRECTORY as an extension; this pack ships none
    assert not list(web_directory().rglob("*.js"))


# Pages whose ShapesWorld picture is not made yet (tools/build_help_images.py --pictures NodeId); empty since
# 2026-11-30, every page has one. Strict: a page that gets its picture must leave this set.
PICTURE_PENDING: set[str] = set()


@pytest.mark.parametrize("node_id", registered_node_ids())
def test_every_help_page_shows_a_picture(node_id):
    text = page_path(node_id).read_text()
    has = bool(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    if node_id in PICTURE_PENDING:
        assert not has, f"{node_id} has its picture now: remove it from PICTURE_PENDING"
        pytest.xfail(f"{node_id}: picture not made yet (run tools/build_help_images.py)")
    assert has, f"{node_id}: page has no picture (run tools/build_help_images.py)"
