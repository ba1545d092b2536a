"""What tools/editor_check.py compares for a template opened in the editor: the widget values the editor holds
against the saved file, the widget names against /object_info (the rule of tests/test_nodes_widgets.py), ranges
and options, and the editor's API export against the twin in workflows/api/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from workflow_format import FILE_LISTS

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
# model files (the loaders' combos, as tools/workflow_format.py lists them) and images the user supplies
FILE_WIDGETS = {tuple(w.split(".")) for w in FILE_LISTS} | {("LoadImage", "image"), ("LoadImageMask", "image")}


def expected_widgets(info: dict) -> list[str]:
    """Widget names the editor makes for a node, from its /object_info entry (tests/test_nodes_widgets.py)."""
    names = []
    for section in ("required", "optional"):
        upload = None
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}
            if kind == "COMBO" or isinstance(kind, list):
                kind = "COMBO"
            if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or opts.get("forceInput"):
                continue
            names.append(name)
            control = opts.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            if control:
                names.append("control_after_generate")
            if section == "required" and opts.get("image_upload") and upload is None:
                upload = "upload"
        if upload:      # the Comfy.UploadImage extension appends its input to the end of the required ones
            names.append(upload)
    if info["name"] == "PreviewAny":
        names.append("previewMode")
    return names


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9,
                                                                                           abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check_template(name: str, r: dict, object_info: dict) -> dict:
    saved = json.loads((WORKFLOWS / f"{name}.json").read_text())
    by_id = {n["id"]: n for n in r["nodes"]}
    mismatches, schema, outside, files = [], [], [], []
    missing = sorted({n["type"] for n in r["nodes"] if not n["registered"]}
                     | {n["type"] for n in saved["nodes"] if n["id"] not in by_id})
    for n in saved["nodes"]:
        live = by_id.get(n["id"])
        if live is None:
            continue
        want, got = n.get("widgets_values", []), [w["value"] for w in live["widgets"]]
        if not same(want, got):
            mismatches.append(f"{n['type']}#{n['id']}: saved {want} -> editor's widgets {got}")
        names = [w["name"] for w in live["widgets"]]
        if n["type"] in object_info:
            expect = expected_widgets(object_info[n["type"]])
            if names != expect:
                schema.append(f"{n['type']}#{n['id']}: editor {names} vs /object_info {expect}")
        for w in live["widgets"]:
            where = f"{n['type']}.{w['name']} = {w['value']!r}"
            if w["values"] is not None and w["value"] not in w["values"]:
                (files if (n["type"], w["name"]) in FILE_WIDGETS else outside).append(where)
            if isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool):
                if (w["min"] is not None and w["value"] < w["min"]) or (w["max"] is not None and w["value"] > w["max"]):
                    outside.append(f"{where} outside [{w['min']}, {w['max']}]")
    api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    exported, extra = {}, []
    for k, v in (r["prompt"] or {}).items():
        # inputs the editor exports for its own widgets that the node does not declare (PreviewAny's preview and
        # previewMode): the server ignores them, the twin leaves them out
        declared = {i for sec in object_info.get(v["class_type"], {}).get("input", {}).values() for i in sec}
        extra += [f"{v['class_type']}#{k}.{i}" for i in v["inputs"] if i not in declared]
        exported[k] = {"class_type": v["class_type"], "inputs": {i: x for i, x in v["inputs"].items() if i in declared}}
    twin_diff = [] if same(twin, exported) else [
        f"{k}: {twin.get(k)} vs editor {exported.get(k)}" for k in sorted(set(twin) | set(exported), key=str)
        if not same(twin.get(k), exported.get(k))]
    return {"saved_nodes": len(saved["nodes"]), "saved_links": len(saved["links"]), "missing": missing,
            "mismatches": mismatches, "schema": schema, "outside": outside, "files": files, "editor_only": extra,
            "twin_diff": twin_diff if r["prompt"] is not None else [f"graphToPrompt failed: {r['prompt_error']}"]}
