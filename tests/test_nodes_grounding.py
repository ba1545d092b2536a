"""Tier 2: grounding nodes in a real ComfyUI (tiny SD1.5 / SDXL models, ShapesWorld, the executor)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import torch
from comfy_env import (
    ON_GPU,
    ROOT,
    SAME_SAMPLES,
    StubServer,
    bound,
    comfy_or_skip,
    encode,
    register_pack,
    rel,
    sample,
    sdxl_cond,
    tiny_clip,
    tiny_sd15,
    tiny_sdxl,
)

pack = comfy_or_skip()

import comfy.model_management as mm  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
from attention_lab.attention.grounding import GroundingLayoutError  # noqa: E402
from attention_lab.attention.grounding_dataset import DatasetError, GroundingDataset  # noqa: E402
from attention_lab.attention.grounding_features import FeatureRecorder  # noqa: E402
from attention_lab.attention.shapesworld.world import COLOURS  # noqa: E402
from attention_lab.nodes.grounding_dataset import GroundingDatasetAdd, GroundingDatasetLoad  # noqa: E402
from attention_lab.nodes.grounding_features import ROWS, GroundingFeaturesNode, compute_features  # noqa: E402
from attention_lab.nodes.grounding_head import (  # noqa: E402
    EMBEDDED_HEAD,
    EMBEDDED_HEAD_PATH,
    HEAD_FOLDER,
    GroundingHeadLoader,
    GroundingHeadTrain,
    head_options,
)
from attention_lab.nodes.grounding_segment import GroundedSegment  # noqa: E402
from attention_lab.nodes.grounding_words import check_word_known, positions_in  # noqa: E402
from attention_lab.nodes.shapesworld import ShapesWorldPseudoMasks, ShapesWorldScenes, load_shapesworld  # noqa: E402

import nodes  # noqa: E402


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15(), tiny_clip()


@pytest.fixture(scope="module")
def sw():
    return load_shapesworld()


@pytest.fixture()
def out_dir(tmp_path):
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    old_heads = folder_paths.folder_names_and_paths[HEAD_FOLDER]
    folder_paths.folder_names_and_paths[HEAD_FOLDER] = ([str(tmp_path / "heads")], {".safetensors"})
    yield tmp_path
    folder_paths.set_output_directory(old)
    folder_paths.folder_names_and_paths[HEAD_FOLDER] = old_heads


def _reference_blocks(model, positive, negative, latent, timestep, seed, rows=ROWS[0]):
    """Block outputs seen by plain torch forward hooks on the UNet's layers (independent of the patches), with
    each call's cond_or_uncond taken from a unet function wrapper: {block id: {kind: (B, C, H, W)}}."""
    m = model.clone()
    dm = m.get_model_object("diffusion_model")
    calls = []

    def wrapper(apply_model, args):
        calls.append({"cou": list(args["cond_or_uncond"]), "out": {}})
        return apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    handles = []
    named = [(f"input.{i}", b) for i, b in enumerate(dm.input_blocks)] + [("middle.0", dm.middle_block)] + \
        [(f"output.{i}", b) for i, b in enumerate(dm.output_blocks)]
    for bid, mod in named:   # ComfyUI runs a block's layers one by one: the block's output is its last layer's
        handles.append(mod[-1].register_forward_hook(
            lambda mod, a, out, bid=bid: calls[-1]["out"].__setitem__(bid, out)))
    try:
        compute_features(m, positive, negative, latent, timestep, seed, rows)
    finally:
        for h in handles:
            h.remove()
    ref: dict = {}
    for call in calls:
        for bid, out in call["out"].items():
            for kind, chunk in zip(call["cou"], out.chunk(len(call["cou"]))):
                ref.setdefault(bid, {})[kind] = chunk
    return ref, calls


def _expected_levels(ref, concat_uncond=True):
    groups: dict = {}
    order = sorted(ref, key=lambda b: ({"input": 0, "middle": 1, "output": 2}[b.split(".")[0]], int(b.split(".")[1])))
    for bid in order:
        parts = [ref[bid][1], ref[bid][0]] if concat_uncond else [ref[bid][0]]
        groups.setdefault(tuple(ref[bid][0].shape[-2:]), []).extend(parts)
    return [torch.cat(groups[s], 1) for s in sorted(groups, key=lambda s: s[0] * s[1])]


def test_identity_block_patches_leave_sampling_unchanged(sd15):
    model, clip = sd15
    pos, neg = encode(clip, "a cat on a mat"), encode(clip, "")
    latent = torch.zeros(2, 4, 16, 16)
    plain = sample(model, pos, neg, latent, steps=3, seed=5)
    m = model.clone()
    rec = FeatureRecorder()
    m.set_model_input_block_patch(rec.input_block_patch)
    m.set_model_output_block_patch(rec.output_block_patch)
    with rec.hook_final_block(m.get_model_object("diffusion_model")):
        patched = sample(m, pos, neg, latent, steps=3, seed=5)
    assert torch.equal(plain, patched) if not ON_GPU else rel(patched, plain) < bound(SAME_SAMPLES)
    assert rec.calls == 3 and len(rec.recorded_blocks) == 9        # 4 input + middle + 4 output blocks


@pytest.mark.parametrize("batch", [1, 3])
def test_features_equal_block_outputs_sd15(sd15, batch):
    model, clip = sd15
    pos, neg = encode(clip, "a cat on a mat"), encode(clip, "")
    latent = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(batch))
    before = json.dumps(str(model.model_options))
    with torch.inference_mode():
        f = compute_features(model, pos, neg, latent, 1, 7)
        ref, calls = _reference_blocks(model, pos, neg, latent, 1, 7)
    assert [c["cou"] for c in calls] == [[1, 0]]
    # tiny SD1.5: 4 input blocks, middle, 4 output blocks = 9 (the last output block through the out hook)
    assert len(ref) == 9 and sum(len(b) for b in f.blocks) == 9
    assert f.sizes == ((8, 8), (16, 16)) and f.batch == batch and f.concat_uncond
    assert f.channels == (2 * (32 + 64 + 64 + 64), 2 * (32 + 32 + 64 + 32 + 32))
    for ours, theirs in zip(f.levels, _expected_levels(ref)):
        assert torch.equal(ours.cpu(), theirs.cpu())          # the hooks see the compute device's tensors
    assert f.family == "sd1" and f.context_dim == 64 and f.timestep == 1
    assert abs(f.sigma - float(model.get_model_object("model_sampling").sigmas[1])) < 1e-4
    # nothing left patched: options unchanged, no hook left on the UNet's out
    assert json.dumps(str(model.model_options)) == before
    assert not model.get_model_object("diffusion_model").out._forward_pre_hooks


def test_features_cond_only_and_low_memory_split(sd15):
    model, clip = sd15
    pos, neg = encode(clip, "a cat on a mat"), encode(clip, "")
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        joint = compute_features(model, pos, neg, latent, 1, 3)
        cond = compute_features(model, pos, None, latent, 1, 3, rows="cond only")
        bm = model.model
        bm.memory_required = lambda *a, **k: 1e30          # ComfyUI then evaluates uncond and cond separately
        try:
            split = compute_features(model, pos, neg, latent, 1, 3)
            ref, calls = _reference_blocks(model, pos, neg, latent, 1, 3)
        finally:
            del bm.memory_required
    assert [c["cou"] for c in calls] == [[1], [0]]
    for a, b in zip(joint.levels, split.levels):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=bound(1e-5))
    assert not cond.concat_uncond and cond.channels == tuple(c // 2 for c in joint.channels)
    for a, b in zip(cond.levels, joint.levels):              # cond half of each block = the cond-only features
        assert a.shape[1] * 2 == b.shape[1]
    with pytest.raises(ValueError, match="needs the negative"):
        compute_features(model, pos, None, latent, 1, 3)


def test_features_sdxl_three_levels_or_two():
    model = tiny_sdxl()
    pos, neg = sdxl_cond(1), sdxl_cond(2)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f = compute_features(model, pos, neg, latent, 1, 0)
        ref, _ = _reference_blocks(model, pos, neg, latent, 1, 0)
    assert f.family == "sdxl" and f.context_dim == 2048
    for ours, theirs in zip(f.levels, _expected_levels(ref)):
        assert torch.equal(ours.cpu(), theirs.cpu())


def _tiny_dataset(clip, n=2, hw=16, words=("cat", "mat")):
    g = torch.Generator().manual_seed(1)
    latent = {"samples": torch.randn(n, 4, hw, hw, generator=g)}
    masks = torch.zeros(n * len(words), hw * 8, hw * 8)
    for i in range(n * len(words)):
        masks[i, (i % 4) * 16:(i % 4) * 16 + 40, 10:70] = 1
    return latent, "a cat on a mat", ", ".join(words), masks


def test_dataset_train_segment_sd15(sd15, out_dir):
    model, clip = sd15
    latent, prompt, words, masks = _tiny_dataset(clip)
    with torch.inference_mode():
        ds = GroundingDatasetAdd.execute(latent, clip, prompt, words, masks, "tiny").result[0]
        assert len(ds) == 2 and ds.vocabulary() == ["cat", "mat"]
        head, path = GroundingHeadTrain.execute(model, clip, ds, 3, 2, 1e-3, 0, 1, "prompt", "a photo of a {word}",
                                                ROWS[0], "small", "tiny_head").result
        assert path.endswith("tiny_head.safetensors") and (out_dir / "heads" / "tiny_head.safetensors").is_file()
        assert head.meta.seen_words == ("cat", "mat") and head.meta.query == "prompt"
        assert "tiny_head.safetensors" in head_options()
        loaded = GroundingHeadLoader.execute("tiny_head.safetensors").result[0]
        feats = GroundingFeaturesNode.execute(model, encode(clip, prompt), {"samples": latent["samples"][:1]}, 1, 0,
                                              ROWS[0], encode(clip, "")).result[0]
        m, heat, over = GroundedSegment.execute(loaded, feats, clip, prompt, "cat, mat", 0.5, "auto", False).result
    assert m.shape == (2, 16, 16) and heat.shape == (2, 16, 16, 3) and over.shape == (2, 16, 16, 3)
    # template queries against a prompt-trained head, unseen words with seen_only, another layout: refused
    with torch.inference_mode():
        with pytest.raises(GroundingLayoutError, match="'prompt' queries"):
            GroundedSegment.execute(loaded, feats, clip, prompt, "cat", 0.5, "template", False)
        with pytest.raises(ValueError, match=r"\['dog'\] are not among the head's seen words"):
            GroundedSegment.execute(loaded, feats, clip, "a cat and a dog", "cat, dog", 0.5, "auto", True)
        cond_only = GroundingFeaturesNode.execute(model, encode(clip, prompt), latent, 1, 0, "cond only").result[0]
        with pytest.raises(GroundingLayoutError, match="uncond ‖ cond.*cond only"):
            GroundedSegment.execute(loaded, cond_only, clip, prompt, "cat", 0.5, "auto", False)


def test_dataset_bad_input(sd15, out_dir):
    model, clip = sd15
    latent, prompt, words, masks = _tiny_dataset(clip)
    add = GroundingDatasetAdd.execute
    with torch.inference_mode():
        with pytest.raises(ValueError, match="3 masks for 4 words"):
            add(latent, clip, prompt, words, masks[:3], "bad")
        with pytest.raises(ValueError, match="not in the prompt"):
            add(latent, clip, prompt, "cat, dog", masks, "bad")
        with pytest.raises(ValueError, match="aspect"):
            add(latent, clip, prompt, words, masks[:, :, :64], "bad")
        with pytest.raises(DatasetError, match="not allowed"):
            add(latent, clip, prompt, words, masks, "../escape")
        with pytest.raises(ValueError, match="tokenizes to nothing"):
            check_word_known(clip, "", "l")
        empty = masks.clone()
        empty[1] = 0                                           # image 0's 'mat' is empty: warned and skipped
        ds = add(latent, clip, prompt, words, empty, "partial").result[0]
        ex = ds.load()
        assert [e.words for e in ex] == [["cat"], ["cat", "mat"]]
        with pytest.raises(DatasetError, match="does not exist"):
            GroundingDatasetLoad.execute("never_filled")
        with pytest.raises(ValueError, match="no '\\{word\\}' placeholder"):
            GroundingHeadTrain.execute(model, clip, ds, 1, 1, 1e-3, 0, 1, "template", "a photo", ROWS[0],
                                       "small", "")


def test_training_interrupted_leaves_earlier_head(sd15, out_dir, monkeypatch):
    model, clip = sd15
    latent, prompt, words, masks = _tiny_dataset(clip)
    with torch.inference_mode():
        ds = GroundingDatasetAdd.execute(latent, clip, prompt, words, masks, "intr").result[0]
        GroundingHeadTrain.execute(model, clip, ds, 1, 1, 1e-3, 0, 1, "prompt", "{word}", ROWS[0], "small", "h")
        path = out_dir / "heads" / "h.safetensors"
        before = path.read_bytes()
        calls = {"n": 0}

        def interrupt():
            calls["n"] += 1
            if calls["n"] > 2:
                raise mm.InterruptProcessingException()
        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
        with pytest.raises(mm.InterruptProcessingException):
            GroundingHeadTrain.execute(model, clip, ds, 50, 1, 1e-3, 1, 1, "prompt", "{word}", ROWS[0], "small",
                                       "h")
    assert path.read_bytes() == before and len(ds) == 2
    assert not [p for p in (out_dir / "heads").iterdir() if p.name.startswith(".")]


def test_shapesworld_mask_sources(sw, out_dir):
    imgs, prompts, words, masks = ShapesWorldScenes.execute(3, 6, "circle, square", 3).result
    assert imgs.shape == (6, 32, 32, 3) and len(prompts.splitlines()) == 6
    lines = [w.split(", ") for w in words.splitlines()]
    assert all(set(ws) <= {"circle", "square"} for ws in lines)
    assert masks.shape[0] == sum(len(ws) for ws in lines)
    kept, pm, report = ShapesWorldPseudoMasks.execute(imgs, prompts).result
    # exact scenes: the pseudo-labeller keeps most objects and its masks match the exact ones
    assert pm.shape[0] >= masks.shape[0] - 2, report
    with pytest.raises(ValueError, match="unknown shapes"):
        ShapesWorldScenes.execute(0, 1, "hexagon", 1)
    # same_colour_share: the share 0 scenes are the scenes of before; share 1 gives one colour and distinct shapes
    assert torch.equal(ShapesWorldScenes.execute(3, 6, "circle, square", 3, 0.0).result[0], imgs)
    _, same_prompts, same_words, _ = ShapesWorldScenes.execute(5, 8, "circle, square, star", 3, 1.0).result
    for caption, ws in zip(same_prompts.splitlines(), same_words.splitlines()):
        named = [w for w in caption.split() if w in COLOURS]
        assert len(ws.split(", ")) >= 2 and len(set(named)) == 1, caption
    with pytest.raises(ValueError, match="needs two distinct shapes"):
        ShapesWorldScenes.execute(0, 4, "star", 3, 0.5)
    model, clip, _ = sw
    with pytest.raises(ValueError, match="'hexagon' is not in the text encoder's vocabulary.*has the words "
                                         r"\['a', 'red', 'hexagon'\]"):
        positions_in(clip, "a red hexagon", "hexagon")
    with torch.inference_mode():                 # an SD dataset (4-channel latents) with the ShapesWorld model
        sd_latent = {"samples": torch.zeros(1, 4, 4, 4)}
        ds = GroundingDatasetAdd.execute(sd_latent, clip, "a red circle", "circle", torch.ones(1, 32, 32),
                                         "sd_set").result[0]
        with pytest.raises(ValueError, match=r"latents with \[4\] channels but this model's latents have 3"):
            GroundingHeadTrain.execute(model, clip, ds, 1, 1, 1e-3, 0, 1, "prompt", "a {word}", ROWS[0],
                                       "small", "")


# --------------------------------------------------------------------------------------------- executor

@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy_grounding")
    register_pack(out)
    folder_paths.folder_names_and_paths[HEAD_FOLDER] = ([str(out / "heads")], {".safetensors"})   # not models/
    for name in ("GroundingFeatures", "GroundingDatasetAdd", "GroundingHeadTrain", "GroundedSegment",
                 "GroundingHeadLoader", "GroundingDatasetLoad", "ShapesWorldScenes", "ShapesWorldPseudoMasks"):
        assert name in nodes.NODE_CLASS_MAPPINGS, name
    return execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args={"lru": 0, "ram": 0}), out


def run(executor, prompt: dict) -> dict:
    pid = str(uuid.uuid4())
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert ok, (err, node_errors)
    executor.execute(prompt, pid, {}, outputs)
    errors = [d for ev, d in executor.status_messages if ev == "execution_error"]
    assert executor.success, errors[0]["exception_message"] if errors else executor.status_messages
    return executor.history_result["outputs"]


def test_shapesworld_api_workflow_end_to_end(executor):
    ex, out = executor
    prompt = json.loads((ROOT / "workflows" / "api" / "grounding_shapesworld_api.json").read_text())
    for node in prompt.values():                     # keep the CPU test short: fewer scenes and steps
        if node["class_type"] == "ShapesWorldScenes":
            node["inputs"]["count"] = 8
        if node["class_type"] == "GroundingHeadTrain":    # batches after the first encode new prompts in the loop
            node["inputs"].update(steps=4, batch=2)
    outputs = run(ex, prompt)
    seg = [k for k, v in prompt.items() if v["class_type"] == "GroundedSegment"][0]
    assert outputs[seg]["images"], outputs[seg]
    ds_dir = out / "output" / "attention_lab" / "grounding"
    name = [v for v in prompt.values() if v["class_type"] == "GroundingDatasetAdd"][0]["inputs"]["dataset"]
    assert len(GroundingDataset.at(ds_dir, name)) == 8                  # every scene has at least one word
    assert (out / "heads" / "shapesworld_demo.safetensors").is_file()


def test_sdxl_dataset_train_segment(out_dir):
    from comfy_env import tiny_sdxl_clip
    model, clip = tiny_sdxl(), tiny_sdxl_clip()
    latent, prompt, words, masks = _tiny_dataset(clip, n=2)
    prompts = "a cat on a mat\na cat on a red mat"              # two prompts: one stacked conditioning per batch
    with torch.inference_mode():
        ds = GroundingDatasetAdd.execute(latent, clip, prompts, words, masks, "xl").result[0]
        head, _ = GroundingHeadTrain.execute(model, clip, ds, 2, 2, 1e-3, 0, 1, "template", "a photo of a {word}",
                                             ROWS[0], "small", "").result
        feats = GroundingFeaturesNode.execute(model, encode(clip, prompt), latent, 1, 0, ROWS[0],
                                              encode(clip, "")).result[0]
        m, _, _ = GroundedSegment.execute(head, feats, clip, prompt, "cat, mat", 0.5, "auto", False).result
    assert head.meta.family == "sdxl" and head.meta.context_dim == 2048 and len(head.meta.channels) == 2
    assert m.shape == (4, 16, 16)                                  # 2 images x 2 words


def test_embedded_shapesworld_head_through_the_nodes(sw):
    """The committed head (wt-16core's figure command) on features computed by ComfyUI: seen words on exact scenes."""
    if not EMBEDDED_HEAD_PATH.is_file():
        pytest.skip("assets/shapesworld_grounding.safetensors is not committed on this branch")
    model, clip, vae = sw
    with torch.inference_mode():
        head = GroundingHeadLoader.execute(EMBEDDED_HEAD).result[0]
        imgs, prompts, words, masks = ShapesWorldScenes.execute(99, 6, "", 3).result
        inter = union = 0.0
        k = 0
        for i, (p, ws) in enumerate(zip(prompts.splitlines(), words.splitlines())):
            feats = GroundingFeaturesNode.execute(model, encode(clip, p), {"samples": vae.encode(imgs[i:i + 1])},
                                                  1, i, ROWS[0], encode(clip, "")).result[0]
            m = GroundedSegment.execute(head, feats, clip, p, ws, 0.5, "auto", False, imgs[i:i + 1]).result[0]
            for j in range(m.shape[0]):
                gt, pr = masks[k] > 0.5, m[j] > 0.5
                inter += float((gt & pr).sum())
                union += float((gt | pr).sum())
                k += 1
    assert inter / union > 0.5, inter / union


def test_an_empty_placeholder_mask_is_named_at_the_node_and_in_the_trainers_error(sd15, out_dir, tmp_path, caplog):
    """The SD grounding template as shipped: its mask node is LoadImageMask's 'alpha' channel of ComfyUI's
    input/example.png, an image without transparency (RGB), so the mask of 'cat' is empty. Dataset Add skips it
    and says so in its text in the UI and in the log; the trainer in the same graph then says why the dataset
    does not exist instead of only asking to fill it with Dataset Add."""
    from PIL import Image
    model, clip = sd15
    (tmp_path / "input").mkdir()
    Image.new("RGB", (128, 128), (200, 120, 40)).save(tmp_path / "input" / "example.png")
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    try:
        mask = nodes.LoadImageMask().load_image("example.png", "alpha")[0]
    finally:
        folder_paths.set_input_directory(old)
    assert mask.shape == (1, 128, 128) and float(mask.max()) == 0.0
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode(), caplog.at_level("WARNING", logger="attention_lab"):
        out = GroundingDatasetAdd.execute(latent, clip, "a photograph of a cat", "cat", mask, "my_grounding_set")
        ds = out.result[0]
        with pytest.raises(DatasetError) as err:
            GroundingHeadTrain.execute(model, clip, ds, 2, 1, 1e-4, 0, 1, "template", "a photograph of a {word}",
                                       ROWS[0], "small", "grounding_head")
    text = out.ui.as_dict()["text"][0]
    why = "image 0 'cat': empty mask (no value above 0.5, largest 0.00)"
    assert text.startswith(f"WARNING: nothing was added to dataset my_grounding_set: every example given was "
                           f"skipped ({why}); it holds 0 image(s)"), text
    assert "LoadImageMask's alpha channel of an image without transparency is empty" in text
    assert text in caplog.text                                                   # the same warning in the log
    msg = str(err.value)
    assert msg.startswith("grounding dataset 'my_grounding_set' (") and (
        f"does not exist: Grounding Dataset Add skipped every example it was given ({why}). Give each word a "
        f"mask that covers its object") in msg, msg
    # a later Add with a real mask fills it, and the trainer trains on it
    with torch.inference_mode():
        full = torch.zeros(1, 128, 128)
        full[0, 32:96, 32:96] = 1
        out = GroundingDatasetAdd.execute(latent, clip, "a photograph of a cat", "cat", full, "my_grounding_set")
        assert not out.ui.as_dict()["text"][0].startswith("WARNING") and out.result[0].skipped == ()
        GroundingHeadTrain.execute(model, clip, out.result[0], 1, 1, 1e-4, 0, 1, "template",
                                   "a photograph of a {word}", ROWS[0], "small", "")
