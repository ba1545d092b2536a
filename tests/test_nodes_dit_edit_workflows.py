"""Tier 2: the ShapesWorld-Flow editing templates (tools/workflow_graphs_dit_edit.py) as the HTTP API would queue
them, through ComfyUI's executor, at their saved steps: rectified-flow inversion + P2P, and prompt mixing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from comfy_env import comfy_or_skip, register_pack

comfy_or_skip()

from attention_lab.attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS  # noqa: E402
from test_nodes_workflow import WORKFLOWS, load_png, new_executor, run  # noqa: E402

pytestmark = pytest.mark.skipif(not DEFAULT_FLOW_WEIGHTS.is_file(), reason="no shipped ShapesWorld-Flow weights")


def saved_graph(name: str) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"}
            for k, v in json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text()).items()}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("comfy_out")
    register_pack(d)
    return d


def test_rf_inversion_p2p_workflow_reconstructs_and_swaps_the_colour(out_dir):
    """rf_p2p_edit_shapesworld_flow: the edit's first image (the inversion retraced) is the image to edit at over
    20 dB PSNR (docs/dit-editing.md: 28.8 dB on average over 8 scenes), the green edit is green where it changed."""
    g = saved_graph("rf_p2p_edit_shapesworld_flow")
    g["90"] = {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}}          # the image to edit
    out = run(new_executor(), g)
    image = load_png(out_dir, out["90"]["images"][0]).astype(float) / 255
    saved = [load_png(out_dir, e).astype(float) / 255 for e in out["6"]["images"]]
    assert len(saved) == 3 and out["8"]["images"] and out["21"]["images"]
    psnr = 10 * np.log10(1 / np.mean((saved[0] - image) ** 2))
    assert psnr > 20, psnr
    green = saved[1]
    changed = np.abs(green - saved[0]).max(-1) > 0.2
    assert changed.any() and green[..., 1][changed].mean() > green[..., 0][changed].mean()


def test_prompt_mix_flow_workflow_varies_the_object_and_keeps_most_of_the_image(out_dir):
    """prompt_mixing_shapesworld_flow: the original and one variation per proxy word; every variation differs from
    the original, by less than a tenth of the range on average (the square and background are kept)."""
    out = run(new_executor(), saved_graph("prompt_mixing_shapesworld_flow"))
    saved = [load_png(out_dir, e).astype(float) / 255 for e in out["6"]["images"]]
    assert len(saved) == 4 and out["9"]["text"] == ["triangle, star, cross"]
    diffs = [float(np.abs(v - saved[0]).mean()) for v in saved[1:]]
    assert all(0.005 < d < 0.1 for d in diffs), diffs
