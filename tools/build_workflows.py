"""Build the workflow JSON files: UI graphs for the editor, API twins for /prompt, thumbnails.

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py            # rewrite workflows/
    COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py --check    # write nothing; exit 1 if a file differs

Each workflow is described once here as nodes with their widget values by name and their links.
The saved ``widgets_values`` are generated from the node definitions of the ComfyUI at
COMFYUI_PATH (stock nodes and ours alike): one entry per widget input in the editor's order, plus
the entries the editor adds itself (``control_after_generate`` after a seed, ``upload`` after the last
required widget of LoadImage / LoadImageMask, PreviewAny's ``previewMode``), each value checked against its
input's type, range and options.
Writes ``workflows/<name>.json`` (UI, LiteGraph version 0.4; the editor's template browser lists
these) and ``workflows/api/<name>_api.json`` (API format). Thumbnails: tools/build_help_images.py.
"""

from __future__ import annotations

import json
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from comfy_boot import node_info  # noqa: E402

from attention import cli  # noqa: E402  (standard library only)

OUT = Path(__file__).resolve().parents[1] / "workflows"
API = OUT / "api"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_OPTIONS = ("fixed", "increment", "decrement", "randomize")
# widgets that the editor's own extensions add to stock nodes (ComfyUI frontend 1.35, extension Comfy.PreviewAny;
# its two 'preview' display widgets take no saved value: on load the editor hands widgets_values out to the other
# widgets only, so [false] sets previewMode; the editor itself saves [null, null, false], which would load
# previewMode = null, checked in tools/editor_check.py): (name, value saved in our files)
EXTENSION_WIDGETS = {"PreviewAny": [("previewMode", False)]}


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
    if kind == "COMBO" and value not in opts["options"] and not opts.get("image_upload") and not where.startswith(
            "CheckpointLoaderSimple"):  # model and image file lists are the installation's
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


def _loader(shapesworld: bool) -> Node:
    if shapesworld:
        return Node(1, "ShapesWorldLoader", {"weights": ""},
                    outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100))
    return Node(1, "CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100))


def capture_graph(shapesworld: bool) -> tuple[list[Node], list]:
    prompt = ("a red circle and a blue square on a gray background" if shapesworld
              else "a photo of a cat riding a bicycle on a sunny street")
    words = "circle, square, background" if shapesworld else "cat, bicycle, street"
    size = 256 if shapesworld else 512
    nodes = [
        _loader(shapesworld),
        Node(2, "CLIPTextEncode", {"text": prompt}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 160), "Positive prompt"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 200), (400, 120), "Negative prompt"),
        Node(4, "AttentionCapture", {"layers": "all", "capture_self": True, "self_max_size": 32, "start": 0.0,
                                     "end": 1.0}, {"model": (1, 0)},
             [("model", "MODEL"), ("store", "ATTENTION_STORE")], {"model": "MODEL"}, (360, 360), (320, 200)),
        Node(5, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(6, "KSampler", {"seed": 7, "steps": 20, "cfg": 5.0 if shapesworld else 7.5, "sampler_name": "euler",
                             "scheduler": "simple" if shapesworld else "normal", "denoise": 1.0},
             {"model": (4, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (5, 0)},
             [("LATENT", "LATENT")], {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                                      "latent_image": "LATENT"}, (800, 0), (320, 270)),
        Node(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1160, 0), (220, 50)),
        Node(8, "SaveImage", {"filename_prefix": "attention_lab"}, {"images": (7, 0)}, [], {"images": "IMAGE"},
             (1420, 0), (300, 300)),
        Node(9, "AttentionMapView", {"prompt": prompt, "words": words, "resolution": "all", "threshold": 0.5,
                                     "batch_index": 0, "tile_size": 256},
             {"store": (4, 1), "clip": (1, 1), "samples": (6, 0), "image": (7, 0)},
             [("heatmaps", "IMAGE"), ("overlays", "IMAGE"), ("masks", "MASK")],
             {"store": "ATTENTION_STORE", "clip": "CLIP", "samples": "LATENT", "image": "IMAGE"},
             (800, 330), (360, 380)),
        Node(10, "PreviewImage", {}, {"images": (9, 1)}, [], {"images": "IMAGE"}, (1220, 360), (300, 300),
             "Overlays"),
    ]
    note = ("Attention maps. Change the positive prompt AND the 'prompt' of Attention Map View together "
            "(they must be the same text), and list the words to show in 'words'. The heatmap grid has a row "
            "per word and a column per feature size (then their mean); overlays are previewed on the right. "
            "'layers' on Attention Capture narrows what is recorded ('16', 'output.3-5'). Expected: each "
            "noun's map lights up on its object.")
    if shapesworld:
        note += (" ShapesWorld is pixel-space: the 256x256 empty latent gives 32x32 images; runs on a CPU in "
                 "seconds.")
    else:
        note += " Pick your SD1.5 or SDXL checkpoint in the loader."
    return nodes, [(note, (0, 600))]


def prompt_mix_graph(shapesworld: bool) -> tuple[list[Node], list]:
    if shapesworld:
        prompt, obj, proxies, keep = SW_MIX
        size, cfg, scheduler, window, injection = 256, 5.0, "simple", (0.34, 1.0), 1.0
        nouns, background_nouns = "circle, square, background", "background"      # the caption names its background
    else:
        prompt, obj, proxies, keep = ("a hamburger and a cup of coffee on a wooden table", "hamburger", "",
                                      "cup, table")
        size, cfg, scheduler, window, injection = 512, 7.5, "ddim_uniform", (0.14, 0.34), 0.8
        nouns, background_nouns = "hamburger, cup, coffee, table", ""             # what NLTK tags as nouns
    nodes = [
        _loader(shapesworld),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "PromptMixSampler",
             {"prompt": prompt, "object_word": obj, "proxy_words": proxies, "suggestions": 4,
              "preserve_words": keep, "seed": 7, "steps": 50, "cfg": cfg, "scheduler": scheduler,
              "mix_start": window[0], "mix_end": window[1], "self_injection_end": injection,
              "injection_threshold": 0.05,
              "blend_at": 0.7, "clusters": 5, "cluster_threshold": 0.3, "nouns": nouns,
              "background_nouns": background_nouns,
              "proxy_candidates": "word-internal pieces (official)"},
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)},
             [("latents", "LATENT"), ("blend_masks", "MASK"), ("proxies", "STRING")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT"},
             (360, 0), (380, 620)),
        Node(5, "VAEDecode", {}, {"samples": (4, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (800, 0), (220, 50)),
        Node(6, "SaveImage", {"filename_prefix": "attention_lab_mnm"}, {"images": (5, 0)}, [], {"images": "IMAGE"},
             (1060, 0), (420, 300), "Original, then one variation per proxy"),
        Node(7, "MaskToImage", {}, {"mask": (4, 1)}, [("IMAGE", "IMAGE")], {"mask": "MASK"}, (800, 360), (220, 50)),
        Node(8, "PreviewImage", {}, {"images": (7, 0)}, [], {"images": "IMAGE"}, (1060, 360), (420, 260),
             "Blend masks (white = kept from the variation)"),
        Node(9, "PreviewAny", {}, {"source": (4, 2)}, [], {"source": "*"}, (800, 460), (220, 120),
             "Proxy words used"),
    ]
    note = ("Prompt mixing (MnM, 'Localizing Object-level Shape Variations'). Change 'prompt' and 'object_word' "
            "together (the word must be in the prompt); 'proxy_words' lists the shapes to try, one variation each "
            "(leave it empty to have 'suggestions' words proposed from the vocabulary); 'preserve_words' are the "
            "other objects to keep. The window [mix_start, mix_end) is where the proxy's cross-attention values "
            "are used: earlier = bigger changes. Expected: the first image is the plain generation; in the "
            "others the object changes shape while the rest stays (the background is copied back at 'blend_at').")
    if shapesworld:
        note += (" ShapesWorld fixes a small object's shape late, so this variant mixes over [0.34, 1) instead of "
                 "the paper's [0.14, 0.34) for SD 1.4, with the self-attention injection through the window's end "
                 "(measured: python -m attention.shapesworld.prompt_mix). "
                 "Runs on a CPU in seconds; 256x256 empty latent = 32x32 images.")
    else:
        note += (" Official settings for SD 1.4/1.5 at 512 px (50 DDIM steps, cfg 7.5). Pick your checkpoint in "
                 "the loader; proxy suggestion encodes the CLIP vocabulary once (fast on a GPU, minutes on a CPU).")
    return nodes, [(note, (0, 660))]


P2P_SW = ("a red circle and a blue square on a gray background",
          "a red triangle and a blue square on a gray background\n"
          "a green circle and a blue square on a gray background", "circle, triangle")
P2P_SD = ("a cat sitting next to a mirror", "a tiger sitting next to a mirror\na silver cat sculpture sitting next to "
          "a mirror", "cat, tiger")


def p2p_widgets(source, targets, blend, shapesworld, inverted):
    return {"source_prompt": source, "target_prompts": targets, "edit": "auto", "seed": 5, "steps": 50,
            "cfg": 5.0 if shapesworld and not inverted else 7.5,
            "scheduler": "simple" if shapesworld else "ddim_uniform",
            "cross_replace_steps": 0.8, "cross_replace_words": "", "self_replace_steps": 0.4 if not inverted else 0.5,
            "reweight": "", "blend_words": blend, "blend_threshold": 0.3, "blend_start": 0.2}


def p2p_graph(shapesworld: bool) -> tuple[list[Node], list]:
    source, targets, blend = P2P_SW if shapesworld else P2P_SD
    size = 256 if shapesworld else 512
    nodes = [
        _loader(shapesworld),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "P2PEditSampler", p2p_widgets(source, targets, blend, shapesworld, False),
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)},
             [("latents", "LATENT"), ("blend_mask", "MASK")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT"},
             (360, 0), (400, 640)),
        Node(5, "VAEDecode", {}, {"samples": (4, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (800, 0), (220, 50)),
        Node(6, "SaveImage", {"filename_prefix": "attention_lab_p2p"}, {"images": (5, 0)}, [], {"images": "IMAGE"},
             (1060, 0), (420, 300), "Source, then one image per target prompt"),
        Node(7, "MaskToImage", {}, {"mask": (4, 1)}, [("IMAGE", "IMAGE")], {"mask": "MASK"}, (800, 360), (220, 50)),
        Node(8, "PreviewImage", {}, {"images": (7, 0)}, [], {"images": "IMAGE"}, (1060, 360), (420, 260),
             "LocalBlend masks (white = may change)"),
    ]
    note = ("Prompt-to-Prompt on a generated image. 'source_prompt' is sampled from 'seed'; every line of "
            "'target_prompts' is one edit: same word count = word swap (replace), otherwise refine (words added). "
            "'reweight' takes 'word:factor' (e.g. 'smiling:4', negative allowed); 'blend_words' restricts changes to "
            "where those words' attention is (LocalBlend). Lower 'cross_replace_steps' / 'self_replace_steps' for "
            "bigger changes. Expected: the first image is the plain generation, the edits keep its layout.")
    note += (" ShapesWorld: runs on a CPU in seconds." if shapesworld else
             " Official settings for SD 1.x at 512 px; pick your checkpoint.")
    return nodes, [(note, (0, 700))]


def _image_to_edit(shapesworld: bool, source: str, seed: int) -> list[Node]:
    """Loader, negative prompt and the image to edit (node 13): a ShapesWorld generation standing in for a
    photo, or LoadImage."""
    nodes = [_loader(shapesworld),
             Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
                  {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt")]
    if shapesworld:  # the image to edit: a generation stands in for a photo
        nodes += [
            Node(10, "CLIPTextEncode", {"text": source}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
                 {"clip": "CLIP"}, (0, 320), (300, 120), "Image prompt"),
            Node(11, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, {},
                 [("LATENT", "LATENT")], {}, (0, 480), (300, 110)),
            Node(12, "KSampler", {"seed": seed, "steps": 30, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
                                  "denoise": 1.0},
                 {"model": (1, 0), "positive": (10, 0), "negative": (2, 0), "latent_image": (11, 0)},
                 [("LATENT", "LATENT")], {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                                          "latent_image": "LATENT"}, (0, 630), (300, 270), "The image to edit"),
            Node(13, "VAEDecode", {}, {"samples": (12, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
                 {"samples": "LATENT", "vae": "VAE"}, (0, 940), (220, 50)),
        ]
    else:
        nodes.append(Node(13, "LoadImage", {"image": "example.png"}, {},
                          [("IMAGE", "IMAGE"), ("MASK", "MASK")], {}, (0, 320), (300, 320), "The image to edit"))
    return nodes


def nti_p2p_graph(shapesworld: bool) -> tuple[list[Node], list]:
    source, targets, blend = P2P_SW if shapesworld else P2P_SD
    nodes = _image_to_edit(shapesworld, source, NTI_SW_SEED)
    image = (13, 0)
    nodes += [
        Node(3, "NullTextInvert", {"prompt": source, "mode": "null-text", "steps": 50, "guidance": 7.5,
                                   "scheduler": "simple" if shapesworld else "ddim_uniform", "inner_steps": 10,
                                   "early_stop": 1e-5, "keep_best_null": False},
             {"model": (1, 0), "clip": (1, 1), "image": image, "vae": (1, 2)},
             [("inversion", "ATTENTION_LAB_INVERSION"), ("reconstruction", "LATENT")],
             {"model": "MODEL", "clip": "CLIP", "image": "IMAGE", "vae": "VAE"}, (360, 0), (380, 330)),
        Node(4, "P2PEditSampler", p2p_widgets(source, targets, blend, shapesworld, True),
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 1), "inversion": (3, 0)},
             [("latents", "LATENT"), ("blend_mask", "MASK")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT",
              "inversion": "ATTENTION_LAB_INVERSION"}, (800, 0), (400, 640)),
        Node(5, "VAEDecode", {}, {"samples": (4, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1240, 0), (220, 50)),
        Node(6, "SaveImage", {"filename_prefix": "attention_lab_nti_p2p"}, {"images": (5, 0)}, [],
             {"images": "IMAGE"}, (1500, 0), (420, 300), "Reconstruction, then one edit per target"),
        Node(7, "VAEDecode", {}, {"samples": (3, 1), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (800, 700), (220, 50)),
        Node(8, "PreviewImage", {}, {"images": (7, 0)}, [], {"images": "IMAGE"}, (1060, 700), (300, 300),
             "Null-text reconstruction (should match the input)"),
    ]
    note = ("Null-Text Inversion + Prompt-to-Prompt on a real image. The image is inverted with 'prompt' on Null-Text "
            "Inversion (which must equal P2P's 'source_prompt'); 'mode' null-text is the paper (best, slowest), "
            "negative-prompt and ddim are 1x-cost alternatives. Then each line of 'target_prompts' is an edit of "
            "that image. Expected: the reconstruction preview matches the input; edits change only the named "
            "object (LocalBlend on 'blend_words').")
    note += (" ShapesWorld: a generated image stands in for a photo; runs on a CPU in about a minute." if shapesworld
             else " Put your photo in ComfyUI's input folder and pick it in Load Image; SD 1.x at 512 px.")
    return nodes, [(note, (360, 1000))]


DPL_SW = ("a red circle and a red square on a gray background", "circle, square",
          "a red triangle and a red square on a gray background")
NTI_SW_SEED = 11
DPL_SW_SEED = 13   # the image DPL edits: two separate red objects (seed 11 fused them into one blob)
DPL_SD = ("a cat and a dog on the grass", "cat, dog", "a cat and a tiger on the grass")


def dpl_graph(shapesworld: bool) -> tuple[list[Node], list]:
    source, nouns, target = DPL_SW if shapesworld else DPL_SD
    nodes = _image_to_edit(shapesworld, source, DPL_SW_SEED)
    sched = "simple" if shapesworld else "ddim_uniform"
    dpl = {"prompt": source, "nouns": nouns, "steps": 50, "guidance": 7.5, "scheduler": sched, "lam_at": 1.0,
           "lam_bg": 0.05, "lam_dj": 0.05, "alphas": "25, 50, 25", "betas": "0.3, 0.7, 0.9",
           "attn_iters": 21, "lr": 0.001, "null_iters": 51, "null_early_stop": 0.0,
           "map_size": 0, "null_start": "empty prompt each step (official DPL)",
           "token_init": "word-internal piece (official)", "keep_best_null": False}
    nodes += [
        Node(14, "VAEEncode", {}, {"pixels": (13, 0), "vae": (1, 2)}, [("LATENT", "LATENT")],
             {"pixels": "IMAGE", "vae": "VAE"}, (360, 940), (220, 50)),
        Node(15, "AttentionCapture", {"layers": "all", "capture_self": True, "self_max_size": 32, "start": 0.0,
                                      "end": 1.0}, {"model": (1, 0)},
             [("model", "MODEL"), ("store", "ATTENTION_STORE")], {"model": "MODEL"}, (360, 0), (320, 200)),
        Node(3, "NullTextInvert", {"prompt": source, "mode": "ddim", "steps": 50, "guidance": 7.5,
                                   "scheduler": sched, "inner_steps": 10, "early_stop": 1e-5,
                                   "keep_best_null": False},
             {"model": (15, 0), "clip": (1, 1), "latent": (14, 0)},
             [("inversion", "ATTENTION_LAB_INVERSION"), ("reconstruction", "LATENT")],
             {"model": "MODEL", "clip": "CLIP", "latent": "LATENT"}, (360, 240), (380, 330),
             "DDIM inversion with capture"),
        Node(16, "SelfAttnCluster", {"prompt": source, "words": nouns, "clusters": 5, "threshold": 0.2,
                                     "self_resolution": 32, "cross_resolution": 16, "seed": 1, "batch_index": 0},
             {"store": (15, 1), "clip": (1, 1), "samples": (3, 1), "image": (13, 0)},
             [("word_masks", "MASK"), ("background", "MASK"), ("clusters", "IMAGE")],
             {"store": "ATTENTION_STORE", "clip": "CLIP", "samples": "LATENT", "image": "IMAGE"},
             (360, 620), (360, 380), "Background mask"),
        Node(4, "DPLTokenOptimizer", dpl, {"model": (1, 0), "clip": (1, 1), "latent": (14, 0), "background": (16, 1)},
             [("inversion", "ATTENTION_LAB_INVERSION"), ("reconstruction", "LATENT"), ("noun_maps", "IMAGE")],
             {"model": "MODEL", "clip": "CLIP", "latent": "LATENT", "background": "MASK"}, (800, 0), (400, 640)),
        Node(5, "P2PEditSampler", {"source_prompt": source, "target_prompts": target, "edit": "auto", "seed": 5,
                                   "steps": 50, "cfg": 7.5, "scheduler": sched, "cross_replace_steps": 0.8,
                                   "cross_replace_words": "", "self_replace_steps": 0.5, "reweight": "",
                                   "blend_words": "", "blend_threshold": 0.3, "blend_start": 0.2},
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (4, 1), "inversion": (4, 0)},
             [("latents", "LATENT"), ("blend_mask", "MASK")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT",
              "inversion": "ATTENTION_LAB_INVERSION"}, (1240, 0), (400, 640)),
        Node(6, "VAEDecode", {}, {"samples": (5, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1680, 0), (220, 50)),
        Node(7, "SaveImage", {"filename_prefix": "attention_lab_dpl"}, {"images": (6, 0)}, [],
             {"images": "IMAGE"}, (1940, 0), (420, 300), "Reconstruction, then the edit"),
        Node(8, "PreviewImage", {}, {"images": (4, 2)}, [], {"images": "IMAGE"}, (1240, 700), (420, 260),
             "Optimized noun attention"),
        Node(9, "PreviewImage", {}, {"images": (16, 2)}, [], {"images": "IMAGE"}, (800, 700), (300, 300),
             "Self-attention clusters"),
    ]
    note = ("Dynamic Prompt Learning + Prompt-to-Prompt on a real image (Wang et al. 2023, official pipeline). "
            "1) DDIM inversion of the image with Attention Capture; Self-Attention Cluster (5 clusters, threshold "
            "0.2) labels the clusters with the nouns, the rest is the background mask. 2) DPL Token Optimizer learns "
            "per-step noun tokens (attention balancing, background leakage, disjoint objects, gradual thresholds), "
            "then null-text. 3) P2P Edit Sampler edits with those tokens. Keep 'prompt', 'source_prompt' and the "
            "cluster's 'prompt' the same text, and 'nouns' = the cluster's 'words'.")
    note += (" ShapesWorld: a same-colour distractor, the official DPL.sh values; a few minutes on a CPU. On this "
             "tiny model DPL does not sharpen the maps (the swap also changes the square), and the null text "
             "restarted from the empty prompt every step reconstructs worse than null_start = previous step "
             "(this graph's reconstruction MSE 1.3e-2 against 4.6e-4; README)."
             if shapesworld else " Official DPL.sh values for SD 1.x at 512 px; expect minutes per image on a GPU.")
    return nodes, [(note, (0, 1060))]


def structure_graph(shapesworld: bool) -> tuple[list[Node], list]:
    prompt = ("a red circle and a blue square on a gray background" if shapesworld
              else "a red car and a white sheep")
    size = 256 if shapesworld else 512
    cfg, sched = (5.0, "simple") if shapesworld else (7.5, "normal")
    sampler = {"seed": 11, "steps": 20 if shapesworld else 50, "cfg": cfg, "sampler_name": "euler",
               "scheduler": sched, "denoise": 1.0}
    ks_types = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"}
    nodes = [
        _loader(shapesworld),
        Node(2, "StructureDiffusion", {"prompt": prompt, "noun_phrases": ""}, {"model": (1, 0), "clip": (1, 1)},
             [("MODEL", "MODEL"), ("positive", "CONDITIONING"), ("phrases", "STRING")],
             {"model": "MODEL", "clip": "CLIP"}, (360, 0), (400, 220)),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 260), (400, 120), "Negative prompt"),
        Node(4, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 4}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(5, "KSampler", dict(sampler), {"model": (2, 0), "positive": (2, 1), "negative": (3, 0),
                                            "latent_image": (4, 0)},
             [("LATENT", "LATENT")], ks_types, (800, 0), (320, 270), "With noun-phrase values"),
        Node(6, "VAEDecode", {}, {"samples": (5, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1160, 0), (220, 50)),
        Node(7, "SaveImage", {"filename_prefix": "attention_lab_structure"}, {"images": (6, 0)}, [],
             {"images": "IMAGE"}, (1420, 0), (320, 320), "StructureDiffusion"),
        Node(8, "KSampler", dict(sampler), {"model": (1, 0), "positive": (2, 1), "negative": (3, 0),
                                            "latent_image": (4, 0)},
             [("LATENT", "LATENT")], ks_types, (800, 360), (320, 270), "Without (same seed)"),
        Node(9, "VAEDecode", {}, {"samples": (8, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1160, 360), (220, 50)),
        Node(10, "PreviewImage", {}, {"images": (9, 0)}, [], {"images": "IMAGE"}, (1420, 360), (320, 320),
             "Plain model"),
    ]
    note = ("StructureDiffusion (Feng et al. 2022): every noun phrase of the prompt is also encoded alone and its "
            "states become extra cross-attention values at its tokens (keys stay the prompt's), against attributes "
            "leaking between objects. Top: with the node; bottom: the plain model, same prompt and seed. Leave "
            "'noun_phrases' empty to find them automatically, or list them comma separated; sample with the node's "
            "'positive' output (only rows carrying exactly that conditioning get the phrase values).")
    note += (" ShapesWorld: runs on a CPU in seconds; on this tiny model binding is already ~92 % and the node "
             "changes it by nothing measurable (README)." if shapesworld else
             " The paper's CC-500 style prompt; pick your SD1.5 or SDXL checkpoint in the loader.")
    return nodes, [(note, (0, 700))]


def spatext_graph(shapesworld: bool) -> tuple[list[Node], list]:
    if shapesworld:
        scene, size, regions = "on a gray background", 256, [("a red circle", (16, 96, 112, 112)),
                                                            ("a blue square", (136, 32, 112, 112))]
        cfg, cfg_local, sched, steps = 5.0, 7.5, "simple", 20
    else:
        scene, size, regions = "a sunny beach, photo", 512, [("a black horse", (32, 224, 256, 256)),
                                                            ("a red full moon", (320, 32, 160, 160))]
        cfg, cfg_local, sched, steps = 7.5, 7.5, "normal", 30
    mask_types = {"destination": "MASK", "source": "MASK"}
    nodes = [
        _loader(shapesworld),
        Node(2, "CLIPTextEncode", {"text": scene}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 120), "Global prompt (the scene)"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 160), (400, 120), "Negative prompt"),
        Node(4, "SolidMask", {"value": 0.0, "width": size, "height": size}, {}, [("MASK", "MASK")], {},
             (0, 320), (300, 110), "Empty canvas"),
    ]
    guider_inputs = {"model": (1, 0), "clip": (1, 1), "positive": (2, 0), "negative": (3, 0)}
    for k, (_text, (x, y, w, h)) in enumerate(regions, start=1):
        src, comp = 3 + 2 * k, 4 + 2 * k
        nodes += [Node(src, "SolidMask", {"value": 1.0, "width": w, "height": h}, {}, [("MASK", "MASK")], {},
                       (0, 320 + 160 * k), (300, 110), f"Region {k} box"),
                  Node(comp, "MaskComposite", {"x": x, "y": y, "operation": "add"},
                       {"destination": (4, 0), "source": (src, 0)}, [("MASK", "MASK")], mask_types,
                       (340, 320 + 160 * k), (300, 140), f"Region {k}")]
        guider_inputs[f"mask_{k}"] = (comp, 0)
    widgets = {"cfg_global": cfg, "cfg_local": cfg_local}
    for k in range(1, 5):
        widgets[f"prompt_{k}"] = regions[k - 1][0] if k <= len(regions) else ""
    nodes += [
        Node(9, "SpaTextGuider", widgets, guider_inputs, [("GUIDER", "GUIDER"), ("region_map", "IMAGE")],
             {"model": "MODEL", "clip": "CLIP", "positive": "CONDITIONING", "negative": "CONDITIONING",
              "mask_1": "MASK", "mask_2": "MASK"}, (800, 0), (400, 520)),
        Node(10, "RandomNoise", {"noise_seed": 5}, {}, [("NOISE", "NOISE")], {}, (800, 560), (300, 100)),
        Node(11, "KSamplerSelect", {"sampler_name": "euler"}, {}, [("SAMPLER", "SAMPLER")], {}, (800, 700),
             (300, 60)),
        Node(12, "BasicScheduler", {"scheduler": sched, "steps": steps, "denoise": 1.0}, {"model": (1, 0)},
             [("SIGMAS", "SIGMAS")], {"model": "MODEL"}, (800, 800), (300, 110)),
        Node(13, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 4}, {},
             [("LATENT", "LATENT")], {}, (800, 950), (300, 110)),
        Node(14, "SamplerCustomAdvanced", {}, {"noise": (10, 0), "guider": (9, 0), "sampler": (11, 0),
                                               "sigmas": (12, 0), "latent_image": (13, 0)},
             [("output", "LATENT"), ("denoised_output", "LATENT")],
             {"noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER", "sigmas": "SIGMAS",
              "latent_image": "LATENT"}, (1240, 0), (300, 130)),
        Node(15, "VAEDecode", {}, {"samples": (14, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1580, 0), (220, 50)),
        Node(16, "SaveImage", {"filename_prefix": "attention_lab_spatext"}, {"images": (15, 0)}, [],
             {"images": "IMAGE"}, (1840, 0), (320, 320)),
        Node(17, "PreviewImage", {}, {"images": (9, 1)}, [], {"images": "IMAGE"}, (1240, 200), (300, 300),
             "Region map"),
    ]
    note = ("SpaText-style region prompts without fine-tuning: the global prompt describes the scene, each region "
            "(a MASK, here a box pasted on an empty canvas with Mask Composite) gets its own text. Pixels of a "
            "region attend to its text, others to the global prompt; cfg_global and cfg_local weigh the two "
            "conditions (equal values = plain CFG on the regional pass). Keep the objects out of the global prompt: "
            "pixels outside the regions read it, so an object it names can appear there too.")
    note += (" ShapesWorld: runs on a CPU in seconds." if shapesworld else
             " Pick your SD1.5 or SDXL checkpoint in the loader; mask sizes are in image pixels.")
    return nodes, [(note, (0, 1000))]


def grounding_graph(shapesworld: bool) -> tuple[list[Node], list]:
    """Grounded generation (Li et al. 2023): fill a dataset, train a head, segment a new generation's words."""
    ks_types = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"}
    if shapesworld:
        prompt, words, size = "a red star and a blue circle on a gray background", "star, circle", 256
        source = [
            Node(2, "ShapesWorldScenes", {"seed": 0, "count": 64, "shapes": "circle, square, triangle, cross",
                                          "max_objects": 3, "same_colour_share": 0.35}, {},
                 [("images", "IMAGE"), ("prompts", "STRING"), ("words", "STRING"), ("masks", "MASK")], {},
                 (0, 160), (320, 170), "Training scenes (seen shapes, exact masks)"),
            Node(3, "VAEEncode", {}, {"pixels": (2, 0), "vae": (1, 2)}, [("LATENT", "LATENT")],
                 {"pixels": "IMAGE", "vae": "VAE"}, (0, 380), (220, 50)),
        ]
        add_inputs = {"latent": (3, 0), "clip": (1, 1), "prompts": (2, 1), "words": (2, 2), "masks": (2, 3)}
        add_widgets = {"prompts": "", "words": "", "dataset": "shapesworld_seen"}
        train = {"steps": 150, "batch": 16, "lr": 3e-4, "seed": 0, "timestep": 1, "query": "prompt",
                 "template": "a {word}", "rows": "uncond + cond", "head_size": "small", "save_name": "shapesworld_demo"}
    else:
        prompt, words, size = "a photograph of a cat and a dog", "cat, dog", 512
        source = [
            Node(2, "LoadImage", {"image": "example.png"}, {},
                 [("IMAGE", "IMAGE"), ("MASK", "MASK")], {}, (0, 160), (320, 320), "Training image"),
            Node(3, "VAEEncode", {}, {"pixels": (2, 0), "vae": (1, 2)}, [("LATENT", "LATENT")],
                 {"pixels": "IMAGE", "vae": "VAE"}, (0, 520), (220, 50)),
            Node(15, "LoadImageMask", {"image": "example.png", "channel": "alpha"}, {},
                 [("MASK", "MASK")], {}, (0, 600), (320, 320), "Mask of 'cat' (replace with SAM / CLIPSeg)"),
        ]
        add_inputs = {"latent": (3, 0), "clip": (1, 1), "masks": (15, 0)}
        add_widgets = {"prompts": "a photograph of a cat", "words": "cat", "dataset": "my_grounding_set"}
        train = {"steps": 2000, "batch": 4, "lr": 1e-4, "seed": 0, "timestep": 1, "query": "template",
                 "template": "a photograph of a {word}", "rows": "uncond + cond", "head_size": "upstream",
                 "save_name": "grounding_head"}
    nodes = [_loader(shapesworld)] + source + [
        Node(4, "GroundingDatasetAdd", add_widgets, add_inputs, [("dataset", "GROUNDING_DATASET")],
             {"latent": "LATENT", "clip": "CLIP", "prompts": "STRING", "words": "STRING", "masks": "MASK"},
             (380, 160), (340, 300)),
        Node(5, "GroundingHeadTrain", train, {"model": (1, 0), "clip": (1, 1), "dataset": (4, 0)},
             [("head", "GROUNDING_HEAD"), ("path", "STRING")],
             {"model": "MODEL", "clip": "CLIP", "dataset": "GROUNDING_DATASET"}, (760, 160), (340, 420)),
        Node(6, "CLIPTextEncode", {"text": prompt}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (380, 620), (340, 120), "Prompt of the image to segment"),
        Node(7, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (380, 780), (340, 100), "Negative prompt (empty, as the paper's uncond)"),
        Node(8, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (380, 920), (300, 110)),
        Node(9, "KSampler", {"seed": 7, "steps": 20 if shapesworld else 30, "cfg": 5.0 if shapesworld else 7.5,
                             "sampler_name": "euler", "scheduler": "simple" if shapesworld else "normal",
                             "denoise": 1.0},
             {"model": (1, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)},
             [("LATENT", "LATENT")], ks_types, (760, 620), (320, 270)),
        Node(10, "VAEDecode", {}, {"samples": (9, 0), "vae": (1, 2)}, [("IMAGE", "IMAGE")],
             {"samples": "LATENT", "vae": "VAE"}, (1120, 620), (220, 50)),
        Node(11, "GroundingFeatures", {"timestep": 1, "seed": 0, "rows": "uncond + cond"},
             {"model": (1, 0), "positive": (6, 0), "latent": (9, 0), "negative": (7, 0)},
             [("features", "GROUNDING_FEATURES")],
             {"model": "MODEL", "positive": "CONDITIONING", "latent": "LATENT", "negative": "CONDITIONING"},
             (1120, 720), (320, 200)),
        Node(12, "GroundedSegment", {"prompt": prompt, "words": words, "threshold": 0.5, "query": "auto",
                                     "seen_only": False},
             {"head": (5, 0), "features": (11, 0), "clip": (1, 1), "image": (10, 0)},
             [("masks", "MASK"), ("heatmaps", "IMAGE"), ("overlays", "IMAGE")],
             {"head": "GROUNDING_HEAD", "features": "GROUNDING_FEATURES", "clip": "CLIP", "image": "IMAGE"},
             (1480, 160), (360, 400)),
        Node(13, "PreviewImage", {}, {"images": (12, 1)}, [], {"images": "IMAGE"}, (1880, 160), (300, 300),
             "Probability heatmaps"),
        Node(14, "PreviewImage", {}, {"images": (10, 0)}, [], {"images": "IMAGE"}, (1480, 620), (300, 300),
             "The generated image"),
    ]
    note = ("Grounded generation (Li et al. 2023). Top: Grounding Dataset Add stores each image's latent, prompt, "
            "words and one mask per word; Grounding Head Train recomputes the frozen UNet's features of a batch of "
            "stored latents each step and trains the head to find each word's mask. Bottom: a new image is "
            "generated, Grounding Features reads its UNet features (t = 1, uncond and cond rows, as the paper) and "
            "Grounded Segment outputs one mask per word, also for words the head never saw.")
    if shapesworld:
        note += (" ShapesWorld: the training scenes show only circle, square, triangle and cross with their exact "
                 "masks, about a third of them in one colour so that only the shape tells the objects apart "
                 "(ShapesWorld Scenes' same_colour_share; ours, not the paper's: without such scenes a head finds the "
                 "colour, which the causal text encoder writes into the shape word's state); ShapesWorld Pseudo "
                 "Masks labels generated images instead, as the paper's detector. The test prompt names a star, "
                 "an unseen shape. 'prompt' queries (the word's "
                 "states in the prompt) transfer to unseen shapes on this tiny model where the paper's template "
                 "queries do not (docs/grounding-nodes.md). Change ShapesWorld Scenes' seed and queue again to add "
                 "64 new scenes and retrain: ComfyUI caches an unchanged graph, so queueing it as it is adds and "
                 "trains nothing (and the same seed after a restart adds the same scenes again). Runs on a CPU in "
                 "a few minutes.")
    else:
        note += (" Where the masks come from: any MASK source, one per word, e.g. segment-anything + GroundingDINO "
                 "or CLIPSeg custom nodes, a mask painted in the mask editor (Load Image's MASK), or Attention Lab's "
                 "Self-Attention Cluster word masks; replace the Load Image (as Mask) placeholder. Fill the dataset "
                 "by queueing many images (mute the train and segment nodes meanwhile), then train: each step runs "
                 "the UNet once per image, so train on a GPU. Pick your SD1.5 or SDXL checkpoint in the loader.")
    return nodes, [(note, (0, 1060))]


SW_MIX = ("a red circle and a blue square on a gray background", "circle", "triangle, star, diamond, cross",
          "square")


GRAPHS = (("attention_capture", capture_graph, False), ("attention_capture_shapesworld", capture_graph, True),
          ("prompt_mixing", prompt_mix_graph, False), ("prompt_mixing_shapesworld", prompt_mix_graph, True),
          ("p2p_edit", p2p_graph, False), ("p2p_edit_shapesworld", p2p_graph, True),
          ("nti_p2p_edit", nti_p2p_graph, False), ("nti_p2p_edit_shapesworld", nti_p2p_graph, True),
          ("dpl_edit", dpl_graph, False), ("dpl_edit_shapesworld", dpl_graph, True),
          ("structure_diffusion", structure_graph, False), ("structure_diffusion_shapesworld", structure_graph, True),
          ("spatext", spatext_graph, False), ("spatext_shapesworld", spatext_graph, True),
          ("grounding", grounding_graph, False), ("grounding_shapesworld", grounding_graph, True))


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--out", type=cli.output_dir, default=str(OUT),
                   help="folder to write the UI graphs into (created if missing); the API twins go to its api/")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and name the files that differ from what would be written")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    from comfy_boot import boot  # after the arguments: --help and bad flags need no ComfyUI
    comfy_nodes = boot()
    stale = []
    if not args.check:
        (out_dir / "api").mkdir(parents=True, exist_ok=True)
    for name, build, sw in GRAPHS:
        nodes, notes = build(sw)
        infos = {n.type: node_info(comfy_nodes, n.type) for n in nodes}
        files = {out_dir / f"{name}.json": json.dumps(ui_format(nodes, notes, infos), indent=1) + "\n",
                 out_dir / "api" / f"{name}_api.json": json.dumps(api_format(nodes, infos), indent=1) + "\n"}
        for path, text in files.items():
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path.relative_to(out_dir)))
            else:
                path.write_text(text)
        if not args.check:
            print("wrote", name)
    if args.check:
        print(f"{len(stale)} of {2 * len(GRAPHS)} files differ from the builder{': ' if stale else ''}"
              f"{', '.join(stale)}" + (" (run tools/build_workflows.py to rewrite them)" if stale else ""))
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
