"""Tier 1: the word-map comparison on ShapesWorld-Flow (attention/shapesworld/flow_word_maps.py): the store path
reproduces flow_evaluate's own observer, the core function scores every map kind in [0, 1], bad flags are refused
(with the others in tests/test_cli.py)."""

import pytest
import torch

from attention.concept_attention import concept_qkv, concept_update
from attention.shapesworld import flow_word_maps as fwm
from attention.shapesworld.flow_evaluate import capture_noised
from attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS, ShapesWorldFlowModel
from attention.shapesworld.world import SceneSpec, ShapesWorld


@pytest.fixture(scope="module")
def model():
    assert DEFAULT_FLOW_WEIGHTS.is_file(), f"{DEFAULT_FLOW_WEIGHTS} is not shipped"
    return ShapesWorldFlowModel()


def test_store_raw_maps_equal_the_observer_maps(model):
    """One band: the AttentionStore's cross view through the hook (every block) is flow_evaluate's
    JointAttentionObserver img2txt/all map of the same scene and noise (the node's path = the figure's)."""
    seed, band = 123, 0.4
    scene = ShapesWorld(seed=seed).sample(SceneSpec([(None, None)] * 2))
    maps = fwm.scene_maps(model, scene, 0, seed, (band,), 3, 0.3, 1)
    obs = capture_noised(model, scene, band, seed * 1000 + int(band * 10))
    grid = tuple(maps["raw"].shape[-2:])
    for got, pos in zip(maps["raw"], model.object_positions(scene)):
        want = obs.word_map(pos, "img2txt", "all", grid) / len(pos)
        assert torch.allclose(got, want, atol=1e-6)
    concept = maps["concept"]
    assert concept.shape == maps["raw"].shape and ((concept > 0) & (concept < 1)).all()  # a softmax over >= 2


def test_comfy_style_block_runs_the_twins_text_stream(model):
    """ConceptAttention's steps 2 and 3 through the adapter are the twin block's own text-stream computations."""
    block = model.transformer.double_blocks[0]
    g = torch.Generator().manual_seed(0)
    tokens, vec = torch.randn(1, 3, 128, generator=g), torch.randn(1, 128, generator=g)
    with torch.no_grad():
        q, k, v, mods = concept_qkv(fwm.ComfyStyleBlock(block), tokens, vec)
        m1, m2 = block.txt_mod(vec)
        for got, want in zip((q, k, v), block._qkv("txt", tokens, m1)):
            assert torch.allclose(got, want, atol=1e-6)
        out = torch.randn(1, 3, 128, generator=g)
        got = concept_update(fwm.ComfyStyleBlock(block), tokens, out, mods)
        assert torch.allclose(got, block._finish("txt", tokens, out, m1, m2), atol=1e-5)


def test_word_map_iou_runs_on_two_scenes(model):
    out = fwm.word_map_iou(model, scenes=2)
    assert set(out) == set(fwm.MAPS)
    for kind, row in out.items():
        assert row["objects"] == 3, kind                                # 1 + 2 objects
        assert 0.0 <= row["best_iou"] <= 1.0 and 0.0 <= row["threshold"] <= 1.0, (kind, row)


@pytest.mark.parametrize("argv,message", [
    (["--scenes", "0"], "argument --scenes: 0 is out of range: give an integer >= 1"),
    (["--clusters", "65"], "argument --clusters: 65 is out of range"),
    (["--cluster-threshold", "1.5"], "argument --cluster-threshold: 1.5 is out of range"),
    (["--steps", "10", "0"], "argument --steps: 0 is out of range"),
    (["--threads", "-1"], "argument --threads: -1 is out of range"),
    (["--repeats", "0"], "argument --repeats: 0 is out of range"),
])
def test_bad_values_are_refused_before_the_model_loads(argv, message, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(fwm, "load_model", refuse)
    with pytest.raises(SystemExit) as exit_:
        fwm.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("error:") == 1, err
