"""Tier 2: every saved widget value of every UI workflow matches the real node definitions.

The editor (ComfyUI frontend 1.35) restores ``widgets_values`` by position: one entry per widget input
(INT, FLOAT, STRING, BOOLEAN, COMBO, required then optional, in ``input_order``), followed, for an INT or
FLOAT that asks for it, or for an INT named seed/noise_seed that does not say (useIntWidget), by
``control_after_generate``; the ``upload`` widget of LoadImage / LoadImageMask comes after the last required
widget (the Comfy.UploadImage extension appends it to the required inputs: image, channel, upload); the
Comfy.PreviewAny extension adds ``previewMode`` to PreviewAny. A missing entry shifts every later widget.
This module re-derives that list from ComfyUI's own definitions (stock nodes and ours) independently of
tools/build_workflows.py, and checks count, order, type, range and options, and that each API twin
carries the same values by name. Also: every input and output of our nodes is on its help page, and the
ShapesWorld DPL template's image has two separate objects that Self-Attention Cluster labels both.
"""

import asyncio
import json
import numbers
import uuid

import numpy as np
import pytest
import torch
from comfy_env import ROOT, comfy_or_skip, register_pack
from PIL import Image

pack = comfy_or_skip()

import execution  # noqa: E402
from attention_lab.attention.shapesworld.harness import colour_blobs  # noqa: E402

import nodes  # noqa: E402

WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FILE_LISTS = {("CheckpointLoaderSimple", "ckpt_name"), ("UNETLoader", "unet_name"), ("VAELoader", "vae_name"),
              ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"), ("TripleCLIPLoader", "clip_name1"),
              ("TripleCLIPLoader", "clip_name2"), ("TripleCLIPLoader", "clip_name3")}  # the installation's model files


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy_out")
    register_pack(out)
    return out


def definition(node_type: str) -> dict:
    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):                    # V3 (ours and most of comfy_extras)
        return cls.GET_NODE_INFO_V1()
    spec = cls.INPUT_TYPES()
    return {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}}


def expected_widgets(node_type: str) -> list[tuple[str, str, dict]]:
    info = definition(node_type)
    rows = []
    for section in ("required", "optional"):
        upload = None
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}
            if isinstance(kind, list):
                kind, opts["options"] = "COMBO", list(kind)
            if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or opts.get("forceInput"):
                continue
            rows.append((name, kind, opts))
            wants_control = opts.get("control_after_generate")
            if wants_control is None:
                wants_control = kind == "INT" and name in ("seed", "noise_seed")
            if wants_control:
                rows.append(("control_after_generate", "CONTROL", {}))
            if section == "required" and opts.get("image_upload") and upload is None:
                upload = ("upload", "UPLOAD", {"target": name})
        if upload:      # Comfy.UploadImage appends its input to the end of the required ones
            rows.append(upload)
    if node_type == "PreviewAny":
        rows.append(("previewMode", "BOOLEAN", {}))
    return rows


def saved_nodes():
    for path in UI_FILES:
        for n in json.loads(path.read_text())["nodes"]:
            yield pytest.param(path, n, id=f"{path.stem}:{n['id']}:{n['type']}")


@pytest.mark.parametrize("path,node", list(saved_nodes()))
def test_saved_widget_values_match_the_definition(registered, path, node):
    values = node.get("widgets_values", [])
    if node["type"] in ("Note", "MarkdownNote"):
        assert len(values) == 1 and isinstance(values[0], str)
        return
    rows = expected_widgets(node["type"])
    names = [r[0] for r in rows]
    assert len(values) == len(rows), f"{node['type']} saves {len(values)} values for widgets {names}: {values}"
    for (name, kind, opts), value in zip(rows, values):
        where = f"{node['type']}.{name} = {value!r}"
        if kind == "INT":
            assert isinstance(value, int) and not isinstance(value, bool), where
        elif kind == "FLOAT":
            assert isinstance(value, numbers.Real) and not isinstance(value, bool), where
        elif kind == "STRING":
            assert isinstance(value, str), where
        elif kind == "BOOLEAN":
            assert isinstance(value, bool), where
        elif kind == "COMBO" and (node["type"], name) not in FILE_LISTS and not opts.get("image_upload"):
            assert value in opts["options"], f"{where} not in {opts['options']}"
        elif kind == "CONTROL":
            assert value in CONTROL_VALUES, where
        elif kind == "UPLOAD":
            assert value == "image", where
        if kind in ("INT", "FLOAT"):
            assert opts.get("min", -np.inf) <= value <= opts.get("max", np.inf), f"{where} outside {opts}"

    api = json.loads((WORKFLOWS / "api" / f"{path.stem}_api.json").read_text())[str(node["id"])]["inputs"]
    by_name = {name: v for (name, kind, _), v in zip(rows, values)
               if kind not in ("CONTROL", "UPLOAD") and (node["type"], name) != ("PreviewAny", "previewMode")}
    linked = {k for k, v in api.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}
    constants = {k: v for k, v in api.items() if k not in linked}
    by_name = {k: v for k, v in by_name.items() if k not in linked}   # a widget fed by a link is a link in the API
    assert constants == by_name, f"API twin differs: {constants} vs {by_name}"


def test_the_checker_sees_the_control_widget_of_a_seed(registered):
    # the case of issue 19: a seed without control_after_generate in its schema still gets the widget
    ks = [r[0] for r in expected_widgets("KSampler")]
    assert ks[:2] == ["seed", "control_after_generate"]
    assert "control_after_generate" not in [r[0] for r in expected_widgets("SelfAttnCluster")]  # it says False
    assert [r[0] for r in expected_widgets("LoadImage")] == ["image", "upload"]
    # the editor (frontend 1.35.9, tools/editor_check.py) makes image, channel, upload: saved as image, upload,
    # channel, the channel widget got "image" and the API export an invalid channel
    assert [r[0] for r in expected_widgets("LoadImageMask")] == ["image", "channel", "upload"]


@pytest.mark.parametrize("node", pack.NODES, ids=lambda n: n.__name__)
def test_help_page_names_every_input_and_output(node):
    schema = node.define_schema()
    page = (ROOT / "web" / "docs" / f"{schema.node_id}.md").read_text()
    names = [i.id for i in schema.inputs] + [o.display_name or o.id or o.get_io_type() for o in schema.outputs]
    missing = [n for n in names if f"`{n}`" not in page and not (n[-2:-1] == "_" and f"`{n[:-1]}1`" in page)]
    assert not missing, f"{schema.node_id}: the help page does not describe {missing}"


class _Server:
    client_id = last_node_id = last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass


def test_shapesworld_dpl_template_image_has_both_objects_and_the_cluster_labels_both(registered):
    g = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"}
         for k, v in json.loads((WORKFLOWS / "api" / "dpl_edit_shapesworld_api.json").read_text()).items()}
    keep = {"1", "2", "10", "11", "12", "13", "14", "15", "3", "16"}   # up to the cluster
    g = {k: v for k, v in g.items() if k in keep}
    g.update({"20": {"class_type": "MaskToImage", "inputs": {"mask": ["16", 0]}},
              "21": {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}},
              "22": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}}})
    pid = str(uuid.uuid4())
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, g, None))
    assert ok, (err, node_errors)
    ex = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    ex.execute(g, pid, {}, outputs)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]

    def load(entry):
        base = registered / ("output" if entry["type"] == "output" else "temp")
        return np.asarray(Image.open(base / entry["subfolder"] / entry["filename"]).convert("RGB")) / 255.0

    image = torch.from_numpy(load(out["22"]["images"][0])).permute(2, 0, 1).float()
    assert len(colour_blobs(image, "red")) == 2, "the circle and the square are not two separate red objects"
    circle, square = (load(e)[..., 0] > 0.5 for e in out["21"]["images"])
    assert circle.any() and square.any(), "Self-Attention Cluster did not label both shapes"
    assert not (circle & square).any()
