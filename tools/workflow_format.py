"""The two workflow file formats, written from a graph's nodes: the editor's UI graph and the API twin for /prompt.

The saved ``widgets_values`` are generated from the node definitions of the ComfyUI at COMFYUI_PATH (stock
nodes and ours alike): one entry per widget input in the editor's order, plus the entries the editor adds itself
(``control_after_generate`` after a seed, ``upload`` after the last required widget of LoadImage /
LoadImageMask, PreviewAny's ``previewMode``), each value checked against its input's type, range and options.
Used by tools/build_workflows.py; the graphs themselves are tools/workflow_graphs_*.py.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_OPTIONS = ("fixed", "increment", "decrement", "randomize")
# widgets that the editor's own extensions add to stock nodes (ComfyUI frontend 1.35, extension Comfy.PreviewAny;
# its two 'preview' display widgets take no saved value: on load the editor hands widgets_values out to the other
# widgets only, so [false] sets previewMode; the editor itself saves [null, null, false], which would load
# previewMode = null, checked in tools/editor_check.py): (name, value saved in our files)
EXTENSION_WIDGETS = {"PreviewAny": [("previewMode", False)]}
# combo widgets whose options are the installation's model files (none here): any file name is accepted
FILE_LISTS = {"CheckpointLoaderSimple.ckpt_name", "UNETLoader.unet_name", "VAELoader.vae_name",
              "DualCLIPLoader.clip_name1", "DualCLIPLoader.clip_name2", "TripleCLIPLoader.clip_name1",
              "TripleCLIPLoader.clip_name2", "TripleCLIPLoader.clip_name3"}


@dataclass
class Node:
    id: int
    type: str
    widgets: dict                        # widget input name -> value (editor-only entries are added from the schema)
    inputs: dict = field(default_factory=dict)   # input name -> (source node id, output slot)
    outputs: list = field(default_factory=list)  # [(name, type)]
    input_types: dict = field(default_factory=dict)  # input name -> socket type
    pos: tuple = (0, 0)
    size: tuple = (320, 160)
    title: str | None = None
    control: str = "fixed"               # saved control_after_generate of a seed (the files are reproducible)


def widget_inputs(info: dict, sections=("required", "optional")):
    """(name, type, options) of every input the editor shows as a widget, in its order (required, optional)."""
    for section in sections:
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}
            if isinstance(kind, list):
                kind, opts["options"] = "COMBO", kind
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                yield name, kind, opts


def editor_widgets(node_type: str, info: dict) -> list[tuple[str, str, dict]]:
    """The editor's saved widget list: the widget inputs plus the entries the frontend adds (useIntWidget adds
    control_after_generate when the input asks for it, or, when it does not say, to inputs named seed/noise_seed;
    the Comfy.UploadImage extension appends an ``upload`` input to the *end* of the required inputs for the first
    required combo with image_upload, so LoadImageMask saves image, channel, upload)."""
    out = []
    for section in ("required", "optional"):
        upload = None
        for name, kind, opts in widget_inputs(info, (section,)):
            out.append((name, kind, opts))
            control = opts.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            if control and kind not in ("INT", "FLOAT"):
                raise NotImplementedError(f"{node_type}.{name}: control_after_generate on a {kind} widget")
            if control:
                out.append(("control_after_generate", "CONTROL", {"options": list(CONTROL_OPTIONS)}))
            if section == "required" and opts.get("image_upload") and upload is None:
                upload = ("upload", "UPLOAD", {"target": name})
        if upload:
            out.append(upload)
    out += [(name, "EXTENSION", {}) for name, _ in EXTENSION_WIDGETS.get(node_type, [])]
    return out


def check_value(where: str, kind: str, opts: dict, value) -> None:
    ok = {"INT": isinstance(value, int) and not isinstance(value, bool),
          "FLOAT": isinstance(value, numbers.Real) and not isinstance(value, bool),
          "STRING": isinstance(value, str), "BOOLEAN": isinstance(value, bool)}.get(kind, True)
    if not ok:
        raise TypeError(f"{where}: {value!r} is not a {kind}")
    if kind in ("INT", "FLOAT") and not opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")):
        raise ValueError(f"{where}: {value} outside {opts.get('min')}..{opts.get('max')}")
    if kind == "COMBO" and value not in opts["options"] and not opts.get("image_upload") and where not in FILE_LISTS:
        raise ValueError(f"{where}: {value!r} is not one of {opts['options']}")


def widget_values(n: Node, info: dict) -> tuple[list, dict]:
    """(the UI file's widgets_values, the API file's widget inputs) of node ``n``."""
    saved, api = [], {}
    names = [name for name, _, _ in widget_inputs(info)]
    unknown = set(n.widgets) - set(names)
    missing = [x for x in names if x not in n.widgets]
    if unknown or missing:
        raise KeyError(f"node {n.id} {n.type}: widgets {sorted(unknown)} unknown, {missing} missing")
    extension = dict(EXTENSION_WIDGETS.get(n.type, []))
    for name, kind, opts in editor_widgets(n.type, info):
        if kind == "CONTROL":
            value = n.control
        elif kind == "UPLOAD":
            value = opts["target"]           # the upload button's value: the name of the image input it fills
        elif kind == "EXTENSION":
            value = extension[name]
        else:
            value = n.widgets[name]
            check_value(f"{n.type}.{name}", kind, opts, value)
            api[name] = value
        if kind == "CONTROL" and value not in CONTROL_OPTIONS:
            raise ValueError(f"node {n.id}: control_after_generate {value!r}")
        saved.append(value)
    return saved, api


def ui_format(nodes: list[Node], notes: list[tuple[str, tuple]], infos: dict) -> dict:
    links, ui_nodes = [], []
    link_id = 0
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in nodes:
        for name, (src, slot) in n.inputs.items():
            link_id += 1
            src_type = next(x for x in nodes if x.id == src).outputs[slot][1]
            links.append([link_id, src, slot, n.id, list(n.inputs).index(name), src_type])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, name)] = link_id
    for order, n in enumerate(nodes):
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                "order": order, "mode": 0,
                "inputs": [dict({"name": k, "type": n.input_types.get(k, "*"), "link": in_links[(n.id, k)]},
                                **({"widget": {"name": k}} if k in n.widgets else {}))   # a widget fed by a link
                           for k in n.inputs],
                "outputs": [{"name": name, "type": t, "slot_index": i, "links": out_links.get((n.id, i), [])}
                            for i, (name, t) in enumerate(n.outputs)],
                "properties": {"Node name for S&R": n.type}, "widgets_values": widget_values(n, infos[n.type])[0]}
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    nid = max(n.id for n in nodes)
    for i, (text, pos) in enumerate(notes):
        ui_nodes.append({"id": nid + 1 + i, "type": "Note", "pos": list(pos), "size": [420, 200], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {"text": ""}, "widgets_values": [text]})
    return {"id": "00000000-0000-4000-8000-000000000001", "revision": 0,
            "last_node_id": nid + len(notes), "last_link_id": link_id, "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def api_format(nodes: list[Node], infos: dict) -> dict:
    out = {}
    for n in nodes:
        inputs = widget_values(n, infos[n.type])[1]
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.inputs.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def loader_node(shapesworld: bool) -> Node:
    if shapesworld:
        return Node(1, "ShapesWorldLoader", {"weights": ""},
                    outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100))
    return Node(1, "CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100))


# The stock nodes every graph ends with. ``src`` arguments are (source node id, output slot).

def vae_decode(nid: int, samples: tuple, vae: tuple, pos: tuple) -> Node:
    return Node(nid, "VAEDecode", {}, {"samples": samples, "vae": vae}, [("IMAGE", "IMAGE")],
                {"samples": "LATENT", "vae": "VAE"}, pos, (220, 50))


def save_image(nid: int, images: tuple, prefix: str, pos: tuple, size: tuple, title: str | None = None) -> Node:
    return Node(nid, "SaveImage", {"filename_prefix": prefix}, {"images": images}, [], {"images": "IMAGE"},
                pos, size, title)


def preview_image(nid: int, images: tuple, pos: tuple, size: tuple, title: str | None = None) -> Node:
    return Node(nid, "PreviewImage", {}, {"images": images}, [], {"images": "IMAGE"}, pos, size, title)


def mask_to_image(nid: int, mask: tuple, pos: tuple) -> Node:
    return Node(nid, "MaskToImage", {}, {"mask": mask}, [("IMAGE", "IMAGE")], {"mask": "MASK"}, pos, (220, 50))
