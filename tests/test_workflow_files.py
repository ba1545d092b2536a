"""Tier 1: the editor's template browser finds only graphs in workflows/, each with its API twin.

ComfyUI 0.8 (app/custom_node_manager.py) lists every workflows/*.json of a pack as a template (no
recursion) and serves the folder at /api/workflow_templates/<pack>/; the frontend (1.35) shows
<name>.jpg from there as the template's thumbnail. API-format twins for /prompt live in workflows/api/.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API = WORKFLOWS / "api"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
EDITOR_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


def test_there_are_templates():
    assert len(UI_FILES) >= 14


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_top_level_json_is_a_ui_graph_with_an_api_twin(path):
    ui = json.loads(path.read_text())
    assert isinstance(ui, dict) and {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(ui), \
        f"{path.name} is not a UI graph; API-format files belong in workflows/api/"
    ids = {n["id"] for n in ui["nodes"]}
    assert len(ids) == len(ui["nodes"])
    for n in ui["nodes"]:
        assert isinstance(n["type"], str) and isinstance(n.get("widgets_values", []), list), n
    for link_id, src, src_slot, dst, dst_slot, _ in ui["links"]:
        assert src in ids and dst in ids
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert link_id in src_node["outputs"][src_slot]["links"]
        assert dst_node["inputs"][dst_slot]["link"] == link_id

    twin = API / f"{path.stem}_api.json"
    assert twin.is_file(), f"{path.name} has no API twin {twin.relative_to(ROOT)}"
    api = json.loads(twin.read_text())
    graph_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in EDITOR_ONLY}
    assert set(api) == set(graph_nodes), f"{twin.name}: nodes differ from {path.name}"
    for nid, entry in api.items():
        assert entry["class_type"] == graph_nodes[nid]["type"]
        # every link of the graph is an input of the API twin, to the same source node and slot
        for inp in graph_nodes[nid]["inputs"]:
            if inp.get("link") is not None:
                link = next(li for li in ui["links"] if li[0] == inp["link"])
                assert entry["inputs"][inp["name"]] == [str(link[1]), link[2]], (nid, inp["name"])


def test_every_api_file_has_its_graph():
    for path in API.glob("*.json"):
        assert path.stem.endswith("_api") and (WORKFLOWS / f"{path.stem[:-4]}.json").is_file(), path.name
        api = json.loads(path.read_text())
        assert all({"class_type", "inputs"} <= set(v) for v in api.values()), f"{path.name} is not API format"


def test_no_other_json_lies_directly_in_workflows():
    for path in WORKFLOWS.iterdir():
        assert path.is_dir() or path.suffix in (".json", ".jpg"), f"{path.name}: only templates and thumbnails here"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_every_template_has_a_small_thumbnail(path):
    thumb = path.with_suffix(".jpg")          # the frontend asks for <name>.jpg (mediaSubtype "jpg")
    assert thumb.is_file(), f"no thumbnail {thumb.name}: run tools/build_help_images.py"
    assert thumb.stat().st_size < 60_000
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size[0] <= 640
