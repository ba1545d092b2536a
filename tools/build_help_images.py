"""Figure command: the help-page pictures (web/docs/images/<NodeId>.png) and the template thumbnails
(workflows/<name>.jpg), made by running the ShapesWorld templates through ComfyUI's own executor.

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_help_images.py [--only NAME ... | --pictures NODE ...]

Each ShapesWorld API workflow in workflows/api/ runs as saved (its steps and seeds), with a few
Preview Image nodes added to reach intermediate outputs; the pictures are cut from the results
and scaled up by whole pixels (ShapesWorld images are 32x32). A template for an SD checkpoint
(or for Flux / SD3.5 weights, DRAWN) cannot run here: its thumbnail is a drawing of its graph instead.
About 5 minutes on 2 idle CPU cores (the DPL template is most of it). ``--fast`` runs the editing samplers
with FAST_STEPS steps and the DPL loops with a few iterations (for a busy machine; the pages' captions say
which settings made the pictures).
The ShapesWorld grounding template's thumbnail is Grounded Segment's help-page picture (THUMB_FROM_PICTURE).
``--pictures NodeId ...`` writes only those help-page pictures (running only the templates they come from)
and leaves every other picture and every thumbnail as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_boot import ROOT, boot  # noqa: E402

sys.path.insert(0, str(ROOT))

WORKFLOWS = ROOT / "workflows"
IMAGES = ROOT / "web" / "docs" / "images"
SCALE = 3                      # 32x32 ShapesWorld pixels -> 96x96 on the help pages
THUMB = (320, 240)
GAP = 4
logger = logging.getLogger("attention_lab.help_images")


def preview(source: tuple[str, int]) -> dict:
    # (a second Preview Image of an output the template already previews would be served from the cache and
    # report no images)
    return {"class_type": "PreviewImage", "inputs": {"images": [source[0], source[1]]}}


def mask_preview(nid: str, source: tuple[str, int]) -> dict:
    return {nid: {"class_type": "MaskToImage", "inputs": {"mask": [source[0], source[1]]}},
            nid + "p": preview((nid, 0))}


FAST_STEPS = 12
# --fast: (template, node id) -> inputs replaced (the images to edit and the plain samplers keep theirs)
FAST = {("prompt_mixing_shapesworld", "4"): {"steps": FAST_STEPS}, ("p2p_edit_shapesworld", "4"): {"steps": FAST_STEPS},
        ("nti_p2p_edit_shapesworld", "3"): {"steps": FAST_STEPS},
        ("nti_p2p_edit_shapesworld", "4"): {"steps": FAST_STEPS},
        ("dpl_edit_shapesworld", "3"): {"steps": FAST_STEPS},
        ("dpl_edit_shapesworld", "4"): {"steps": FAST_STEPS, "attn_iters": 3, "null_iters": 3},
        ("dpl_edit_shapesworld", "5"): {"steps": FAST_STEPS}}
# the DPL template up to Self-Attention Cluster, always as saved (the cluster's picture; a cheap first check)
CLUSTER_NODES = {"1", "2", "10", "11", "12", "13", "14", "15", "3", "16"}
# per ShapesWorld template: nodes added to reach outputs that no saved node shows
EXTRA = {   # in the order they run: cheap first
    "dpl_cluster": {"90": preview(("13", 0)), "91": preview(("16", 2)), **mask_preview("92", ("16", 0))},
    "attention_capture_shapesworld": {},               # node 10 previews the overlays
    "spatext_shapesworld": {},
    "structure_diffusion_shapesworld": {},
    "p2p_edit_shapesworld": {},
    "prompt_mixing_shapesworld": {},
    "nti_p2p_edit_shapesworld": {"90": preview(("13", 0))},                              # the image to edit
    "dpl_edit_shapesworld": {"90": preview(("13", 0))},
    "flow_txt2img_shapesworld": {},                    # ShapesWorld-Flow (needs the shipped flow weights)
    "attention_capture_shapesworld_flow": {},          # node 10 previews the overlays, node 11 shows the clusters
    "p2p_edit_shapesworld_flow": {},                   # DiT editing (tools/workflow_graphs_dit_edit.py)
    "rf_p2p_edit_shapesworld_flow": {"90": preview(("13", 0))},                          # the image to edit
    "prompt_mixing_shapesworld_flow": {},
}

# help-page picture (node id) -> the entry of EXTRA whose run makes it
PICTURES = {"SelfAttnCluster": "dpl_cluster", "AttentionCapture": "attention_capture_shapesworld",
            "AttentionMapView": "attention_capture_shapesworld", "SpaTextGuider": "spatext_shapesworld",
            "StructureDiffusion": "structure_diffusion_shapesworld",
            "ShapesWorldLoader": "structure_diffusion_shapesworld", "P2PEditSampler": "p2p_edit_shapesworld",
            "PromptMixSampler": "prompt_mixing_shapesworld", "NullTextInvert": "nti_p2p_edit_shapesworld",
            "DPLTokenOptimizer": "dpl_edit_shapesworld", "ShapesWorldFlowLoader": "flow_txt2img_shapesworld"}
# ShapesWorld templates whose thumbnail is a help-page picture made elsewhere (the grounding pictures come from
# the embedded head, not from a template run: training a head here would take minutes and write a model file)
THUMB_FROM_PICTURE = {"grounding_shapesworld": "GroundedSegment"}
# templates for weights that do not exist here: their thumbnail is a drawing of the graph, with this caption
DRAWN = {"attention_capture_flux": "graph for Flux.1-dev weights (green: Attention Lab nodes)",
         "attention_capture_sd3": "graph for SD3.5 weights (green: Attention Lab nodes)",
         "p2p_edit_flux": "graph for Flux.1-dev weights (green: Attention Lab nodes)",
         "p2p_edit_sd3": "graph for SD3.5 weights (green: Attention Lab nodes)",
         "rf_p2p_edit_flux": "graph for Flux.1-dev weights (green: Attention Lab nodes)",
         "prompt_mixing_flux": "graph for Flux.1-dev weights (green: Attention Lab nodes)"}


class _Server:
    client_id = last_node_id = last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass


def run_workflow(name: str, out_dir: Path, fast: bool, steps: int | None = None) -> dict[str, list[np.ndarray]]:
    """Run workflows/api/<name>_api.json plus EXTRA[name]; every output node's images as (H, W, 3) floats."""
    import execution
    source = "dpl_edit_shapesworld" if name == "dpl_cluster" else name
    prompt = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"}
              for k, v in json.loads((WORKFLOWS / "api" / f"{source}_api.json").read_text()).items()}
    if name == "dpl_cluster":
        prompt = {k: v for k, v in prompt.items() if k in CLUSTER_NODES}
    for (template, nid), inputs in FAST.items():
        if fast and template == name:
            prompt[nid]["inputs"].update(inputs)
    for nid, node in prompt.items():
        if steps and "steps" in node["inputs"] and not (name.startswith(("nti_", "dpl_")) and nid == "12"):
            node["inputs"]["steps"] = steps        # every sampler but the one drawing the image to edit
    prompt.update(EXTRA[name])
    pid = str(uuid.uuid4())
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    if not ok:
        raise RuntimeError(f"{name}: {err} {node_errors}")
    ex = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    t0 = time.time()
    ex.execute(prompt, pid, {}, outputs)
    if not ex.success:
        raise RuntimeError(f"{name}: {ex.status_messages[-1]}")
    logger.info("%s ran in %.1f s", name, time.time() - t0)
    images = {}
    for node, out in ex.history_result["outputs"].items():
        images[node] = [np.asarray(Image.open(out_dir / ("output" if e["type"] == "output" else "temp")
                                              / e["subfolder"] / e["filename"]).convert("RGB")) / 255.0
                        for e in out.get("images", [])]
    return images


def strip(images: list[np.ndarray], scale: int = SCALE, cols: int | None = None) -> Image.Image:
    """Images side by side (rows of ``cols``), each scaled up by whole pixels, on a gray canvas."""
    tiles = [Image.fromarray((np.clip(i, 0, 1) * 255).astype(np.uint8)) for i in images]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    cols = cols or len(tiles)
    rows = (len(tiles) + cols - 1) // cols
    # each column as wide as its widest tile, each row as high as its highest (tiles may differ in width)
    ws = [max(t.width for t in tiles[c::cols]) for c in range(cols)]
    hs = [max(t.height for t in tiles[r * cols:(r + 1) * cols]) for r in range(rows)]
    xs, ys = np.cumsum([0] + [w + GAP for w in ws]), np.cumsum([0] + [h + GAP for h in hs])
    canvas = Image.new("RGB", (int(xs[-1]) - GAP, int(ys[-1]) - GAP), (40, 40, 40))
    for k, t in enumerate(tiles):
        canvas.paste(t, (int(xs[k % cols]), int(ys[k // cols])))
    return canvas


def at_height(image: np.ndarray, height: int) -> np.ndarray:
    """``image`` (H, W, 3 floats) scaled to ``height`` rows, aspect kept (area average when shrinking)."""
    if image.shape[0] == height:
        return image
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    width = max(1, round(pil.width * height / pil.height))
    return np.asarray(pil.resize((width, height), Image.BOX if height < pil.height else Image.NEAREST)) / 255.0


def fit(picture: Image.Image, size=THUMB) -> Image.Image:
    """``picture`` scaled by whole pixels (or down) to fit ``size``, centred on a dark canvas."""
    k = min(size[0] / picture.width, size[1] / picture.height)
    k = int(k) if k >= 1 else k
    picture = picture.resize((max(1, int(picture.width * k)), max(1, int(picture.height * k))),
                             Image.NEAREST if k >= 1 else Image.LANCZOS)
    canvas = Image.new("RGB", size, (32, 32, 32))
    canvas.paste(picture, ((size[0] - picture.width) // 2, (size[1] - picture.height) // 2))
    return canvas


def graph_drawing(name: str, size=THUMB,
                  note: str = "graph for an SD checkpoint (green: Attention Lab nodes)") -> Image.Image:
    """The UI graph workflows/<name>.json drawn as boxes (title bar + body) and links, for templates that
    need an SD checkpoint and cannot be run here."""
    graph = json.loads((WORKFLOWS / f"{name}.json").read_text())
    nodes = [n for n in graph["nodes"] if n["type"] != "Note"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    margin, caption = 12, 44
    k = min((size[0] - 2 * margin) / (x1 - x0), (size[1] - 2 * margin - caption) / (y1 - y0))
    box = {n["id"]: [margin + (n["pos"][0] - x0) * k, margin + (n["pos"][1] - y0) * k,
                     margin + (n["pos"][0] - x0 + n["size"][0]) * k, margin + (n["pos"][1] - y0 + n["size"][1]) * k]
           for n in nodes}
    img = Image.new("RGB", size, (32, 32, 32))
    draw = ImageDraw.Draw(img)
    for _, src, _, dst, _, _ in graph["links"]:
        if src in box and dst in box:
            a, b = box[src], box[dst]
            draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(140, 160, 200), width=1)
    ours = {"AttentionCapture", "AttentionMapView", "SelfAttnCluster", "PromptMixSampler", "NullTextInvert",
            "DPLTokenOptimizer", "P2PEditSampler", "StructureDiffusion", "SpaTextGuider", "ShapesWorldLoader",
            "ShapesWorldFlowLoader"}
    for n in nodes:
        x, y, xe, ye = box[n["id"]]
        body = (70, 110, 90) if n["type"] in ours else (70, 70, 78)
        draw.rectangle([x, y, xe, ye], fill=body, outline=(150, 150, 150))
        draw.rectangle([x, y, xe, min(ye, y + 9)], fill=(40, 40, 46))
        draw.text((x + 2, y - 1), (n.get("title") or n["type"])[: max(1, int((xe - x) / 6))], fill=(230, 230, 230))
    font = ImageFont.load_default(size=15)
    draw.text((margin, size[1] - caption + 4), name.replace("_", " "), fill=(240, 240, 240), font=font)
    draw.text((margin, size[1] - caption + 23), note,
              fill=(170, 170, 170), font=ImageFont.load_default(size=11))
    return img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="template names (without .json) to run; default all")
    p.add_argument("--pictures", nargs="+", metavar="NODE",
                   help="node ids whose help-page pictures to write (no thumbnails); runs only their templates")
    p.add_argument("--fast", action="store_true", help="fewer steps for the editing samplers (see FAST)")
    p.add_argument("--steps", type=int, help="steps of every sampler (not the one drawing an image to edit)")
    args = p.parse_args(argv)
    if args.only and args.pictures:
        p.error("--only and --pictures exclude each other")
    unknown = [n for n in args.only or [] if n not in EXTRA and n not in THUMB_FROM_PICTURE and n not in DRAWN]
    if unknown:
        p.error(f"unknown template(s) {unknown}; known: {sorted(EXTRA) + sorted(THUMB_FROM_PICTURE) + sorted(DRAWN)}")
    unknown = [n for n in args.pictures or [] if n not in PICTURES]
    if unknown:
        p.error(f"no picture of {unknown} is made here; known: {sorted(PICTURES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot()
    import folder_paths
    out_dir = Path(tempfile.mkdtemp(prefix="attention_lab_help_"))
    folder_paths.set_output_directory(str(out_dir / "output"))
    folder_paths.set_temp_directory(str(out_dir / "temp"))
    IMAGES.mkdir(parents=True, exist_ok=True)
    wanted = set(args.pictures or [])
    names = ([n for n in EXTRA if n in {PICTURES[w] for w in wanted}] if wanted
             else [n for n in args.only if n in EXTRA] if args.only else list(EXTRA))

    def save(picture: Image.Image, node_id: str):
        if wanted and node_id not in wanted:
            return
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(IMAGES / f"{node_id}.png", optimize=True)
        logger.info("wrote %s (%dx%d)", IMAGES / f"{node_id}.png", *picture.size)

    def thumb(name: str, picture: Image.Image):
        if wanted:
            return
        fit(picture).save(WORKFLOWS / f"{name}.jpg", quality=88)
        logger.info("wrote %s", WORKFLOWS / f"{name}.jpg")

    if not args.only and not wanted:
        for ui in sorted(WORKFLOWS.glob("*.json")):
            if ui.stem not in EXTRA and ui.stem not in THUMB_FROM_PICTURE and ui.stem not in DRAWN:
                graph_drawing(ui.stem).save(WORKFLOWS / f"{ui.stem}.jpg", quality=88)
                logger.info("drew %s.jpg", ui.stem)
    for name, caption in DRAWN.items():
        if not wanted and (not args.only or name in args.only):
            graph_drawing(name, note=caption).save(WORKFLOWS / f"{name}.jpg", quality=88)
            logger.info("drew %s.jpg", name)
    for name, node_id in THUMB_FROM_PICTURE.items():
        if not wanted and (not args.only or name in args.only):
            thumb(name, Image.open(IMAGES / f"{node_id}.png").convert("RGB"))
    for name in names:
        r = run_workflow(name, out_dir, args.fast, args.steps)
        if name == "dpl_cluster":
            save(strip(r["90"] + r["91"] + r["92p"]), "SelfAttnCluster")
            image = r["90"][0]
            import torch

            from attention.shapesworld.harness import colour_blobs
            blobs = colour_blobs(torch.from_numpy(image).permute(2, 0, 1).float(), "red")
            logger.info("DPL template image: red blobs of %s px; word masks cover %s of the image",
                        [int(b.sum()) for b in blobs], [round(float((m[..., 0] > 0.5).mean()), 3) for m in r["92p"]])
        elif name == "attention_capture_shapesworld":
            save(strip(r["8"] + r["10"]), "AttentionCapture")
            grid = strip(r["9"], scale=1)
            k = min(1.0, 360 / grid.width)
            save(grid.resize((round(grid.width * k), round(grid.height * k)), Image.LANCZOS), "AttentionMapView")
            thumb(name, strip(r["8"] + r["10"]))
        elif name == "prompt_mixing_shapesworld":
            save(strip(r["6"]), "PromptMixSampler")
            thumb(name, strip(r["6"], cols=3))
        elif name == "p2p_edit_shapesworld":
            save(strip(r["6"]), "P2PEditSampler")
            thumb(name, strip(r["6"]))
        elif name == "nti_p2p_edit_shapesworld":
            save(strip(r["90"] + r["8"]), "NullTextInvert")
            thumb(name, strip(r["90"] + r["6"], cols=2))
        elif name == "dpl_edit_shapesworld":
            # the noun maps come at 8x the latent size (SD's image size), 8x ShapesWorld's: bring them to the image's
            save(strip(r["90"] + [at_height(m, r["90"][0].shape[0]) for m in r["8"]]), "DPLTokenOptimizer")
            thumb(name, strip(r["90"] + r["7"], cols=3))
        elif name == "structure_diffusion_shapesworld":
            save(strip(r["7"] + r["10"], cols=4), "StructureDiffusion")
            save(strip(r["10"], cols=4), "ShapesWorldLoader")
            thumb(name, strip(r["7"] + r["10"], cols=4))
        elif name == "spatext_shapesworld":
            h, w = r["16"][0].shape[:2]            # the region map comes at mask size: bring it to the images'
            region = np.asarray(Image.fromarray((r["17"][0] * 255).astype(np.uint8)).resize((w, h), Image.NEAREST))
            save(strip([region / 255.0] + r["16"]), "SpaTextGuider")
            thumb(name, strip([region / 255.0] + r["16"], cols=3))
        elif name == "attention_capture_shapesworld_flow":
            rows = [np.asarray(strip(r["8"] + r["10"])) / 255.0, np.asarray(strip(r["11"])) / 255.0]
            thumb(name, strip(rows, scale=1, cols=1))     # the image and the overlays; the clusters and masks
        elif name == "p2p_edit_shapesworld_flow":
            thumb(name, strip(r["6"]))
        elif name == "rf_p2p_edit_shapesworld_flow":
            thumb(name, strip(r["90"] + r["6"], cols=2))   # the image to edit, its reconstruction, the two edits
        elif name == "prompt_mixing_shapesworld_flow":
            thumb(name, strip(r["6"], cols=2))
        elif name == "flow_txt2img_shapesworld":
            save(strip(r["7"], cols=4), "ShapesWorldFlowLoader")
            thumb(name, strip(r["7"], cols=4))


if __name__ == "__main__":
    main()
