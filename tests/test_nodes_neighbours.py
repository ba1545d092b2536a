"""Tier 2: issue 27's inputs as other packs and users really wire them, each example with the value or the message
(tiny SD1.5 in a real ComfyUI): MASKs with an extra axis and of a slightly other size, stray files in a dataset
folder, textual-inversion names in every node that takes words, an inversion used with a LoRA clone."""

import logging

import pytest
import torch
from comfy_env import comfy_or_skip, encode, rel, sample, tiny_clip, tiny_sd15

pack = comfy_or_skip()

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from attention_lab.attention.grounding_dataset import GroundingDataset  # noqa: E402
from attention_lab.attention.masks import MaskLayoutError  # noqa: E402
from attention_lab.attention.p2p import build_plan  # noqa: E402
from attention_lab.attention.render import masks_from_maps, normalize, upsample  # noqa: E402
from attention_lab.attention.store import word_maps  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture, AttentionMapView  # noqa: E402
from attention_lab.nodes.cluster import SelfAttnCluster  # noqa: E402
from attention_lab.nodes.dpl import DPLTokenOptimizer, background_at  # noqa: E402
from attention_lab.nodes.grounding_dataset import GroundingDatasetAdd, GroundingDatasetLoad  # noqa: E402
from attention_lab.nodes.grounding_features import ROWS, GroundingFeaturesNode  # noqa: E402
from attention_lab.nodes.grounding_head import HEAD_FOLDER, GroundingHeadTrain  # noqa: E402
from attention_lab.nodes.grounding_segment import GroundedSegment  # noqa: E402
from attention_lab.nodes.inversion import NullTextInvert  # noqa: E402
from attention_lab.nodes.learnable_tokens import initial_values, locate  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler, words_fn  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402
from attention_lab.nodes.spatext import SpaTextGuider  # noqa: E402
from attention_lab.nodes.structure import StructureDiffusion  # noqa: E402

PROMPT = "a photo of embedding:emb3 cat and a red dog in a garden"      # the prompt
EMB = (4, 5)                                                            # key positions of emb3's two vectors


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD1.5 model and a CLIP whose embeddings folder holds emb3 (two vectors), as a user's."""
    import safetensors.torch
    folder = tmp_path_factory.mktemp("embeddings")
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(7)) * 0.02
    safetensors.torch.save_file({"clip_l": vectors}, str(folder / "emb3.safetensors"))
    with torch.inference_mode():
        return tiny_sd15(), tiny_clip(str(folder)), vectors


@pytest.fixture()
def out_dir(tmp_path):
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    old_heads = folder_paths.folder_names_and_paths[HEAD_FOLDER]
    folder_paths.folder_names_and_paths[HEAD_FOLDER] = ([str(tmp_path / "heads")], {".safetensors"})
    yield tmp_path
    folder_paths.set_output_directory(old)
    folder_paths.folder_names_and_paths[HEAD_FOLDER] = old_heads


def add(latent, clip, prompt, words, masks, name):
    with torch.inference_mode():
        return GroundingDatasetAdd.execute(latent, clip, prompt, words, masks, name).result[0]


def train(model, clip, ds, steps=1):
    with torch.inference_mode():
        return GroundingHeadTrain.execute(model, clip, ds, steps, 2, 1e-3, 0, 1, "prompt", "a photo of a {word}",
                                          ROWS[0], "small", "")


def word_masks(n, h, w):
    m = torch.zeros(n, h, w)
    for i in range(n):
        m[i, (i % 3) * h // 4:(i % 3) * h // 4 + h // 2, w // 8:w // 2] = 1
    return m


# 1. masks with an extra axis ---------------------------------------------------------------------------------

def test_masks_with_an_extra_axis_reach_the_dataset_as_masks_and_train(sd, out_dir):
    model, clip, _ = sd
    latent = {"samples": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))}
    masks = word_masks(4, 128, 128)
    for name, layout in (("channel", masks[:, None]), ("last", masks[..., None]), ("plain", masks)):
        ds = add(latent, clip, "a cat on a mat", "cat, mat", layout, name)
        ex = ds.load()
        assert len(ex) == 2 and all(e.masks.shape == (2, 128, 128) for e in ex), name
        assert torch.equal(torch.cat([e.masks for e in ex]).float(), masks)        # the same masks, any layout
    out = train(model, clip, GroundingDatasetLoad.execute("channel").result[0])   # the expand() failure
    assert "trained 1 steps on 2 images" in out.ui.value
    with pytest.raises(MaskLayoutError, match=r"GroundingDatasetAdd: 'masks' has shape \(4, 3, 128, 128\)"):
        add(latent, clip, "a cat on a mat", "cat, mat", masks[:, None].expand(4, 3, 128, 128), "bad")
    with pytest.raises(MaskLayoutError, match=r"'masks' has shape \(4, 128, 128, 3\).*Convert Image to Mask"):
        add(latent, clip, "a cat on a mat", "cat, mat", masks[..., None].expand(4, 128, 128, 3), "bad")
    assert len(GroundingDataset.at(out_dir / "output" / "attention_lab" / "grounding", "bad")) == 0


def test_dpl_and_spatext_take_the_same_layouts(sd):
    model, clip, _ = sd
    bg = torch.ones(1, 128, 128)
    bg[:, 32:96, 32:96] = 0
    want = background_at(bg, (4, 4), (16, 16))
    for layout in (bg[0], bg[:, None], bg[..., None]):
        assert torch.equal(background_at(layout, (4, 4), (16, 16)), want)
    with pytest.raises(MaskLayoutError, match=r"DPLTokenOptimizer: 'background' has shape \(1, 2, 128, 128\)"):
        background_at(bg[:, None].expand(1, 2, 128, 128), (4, 4), (16, 16))
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    with torch.inference_mode():
        g = SpaTextGuider.execute(model, clip, pos, neg, 7.5, 7.5, mask_1=bg[:, None], prompt_1="a dog").result[0]
        assert torch.equal(g.masks, bg)
        with pytest.raises(MaskLayoutError, match=r"SpaTextGuider: 'mask_1' has shape \(1, 128, 128, 3\)"):
            SpaTextGuider.execute(model, clip, pos, neg, 7.5, 7.5, mask_1=bg[..., None].expand(1, 128, 128, 3),
                                  prompt_1="a dog")


# 2. one size tolerance ---------------------------------------------------------------------------------------

def test_a_mask_two_pixels_narrow_is_resized_everywhere_and_another_aspect_refused(sd, out_dir):
    model, clip, _ = sd
    latent = {"samples": torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))}   # 192x128
    near = word_masks(2, 128, 190)                                          # the 190x128: 1.0 % off
    ex = add(latent, clip, "a cat on a mat", "cat, mat", near, "near").load()
    assert ex[0].masks.shape == (2, 128, 192)                               # stored at the image's aspect
    with pytest.raises(ValueError, match=r"GroundingDatasetAdd: 'masks' is 128x128 \(aspect 1.000\) but the latent "
                                         r"is 24x16 \(aspect 1.500\): 33.3 % off, beyond the 2 %"):
        add(latent, clip, "a cat on a mat", "cat, mat", word_masks(2, 128, 128), "far")
    bg = torch.ones(1, 128, 190)
    assert background_at(bg, (4, 6), (16, 24)).shape == (4, 6)
    with pytest.raises(ValueError, match=r"DPLTokenOptimizer: 'background' is 128x128 .* but the image latent is "
                                         r"24x16 .*33.3 % off, beyond the 2 %"):
        background_at(torch.ones(1, 128, 128), (4, 6), (16, 24))
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    lat = torch.zeros(1, 4, 16, 24)
    with torch.inference_mode():
        g = SpaTextGuider.execute(model, clip, pos, neg, 7.5, 7.5, mask_1=bg, prompt_1="a dog").result[0]
        out = sample_guider(g, lat)
        assert out.shape == lat.shape and torch.isfinite(out).all()
        g = SpaTextGuider.execute(model, clip, pos, neg, 7.5, 7.5, mask_1=torch.ones(1, 128, 128),
                                  prompt_1="a dog").result[0]
        with pytest.raises(ValueError, match=r"SpaTextGuider: 'region masks' is 128x128 \(aspect 1.000\) but the "
                                             r"latent \(latent pixels\) is 24x16 \(aspect 1.500\): 33.3 % off"):
            sample_guider(g, lat)


def sample_guider(g, lat, steps=2):
    import comfy.sample
    import comfy.samplers
    noise = comfy.sample.prepare_noise(lat, 1)
    sigmas = comfy.samplers.calculate_sigmas(g.model_patcher.get_model_object("model_sampling"), "normal", steps)
    return g.sample(noise, lat, comfy.samplers.sampler_object("euler"), sigmas.cpu(), disable_pbar=True, seed=1)


# 3. stray files in a dataset folder --------------------------------------------------------------------------

def test_a_renamed_backup_is_skipped_by_add_load_and_train(sd, out_dir, caplog):
    model, clip, _ = sd
    latent = {"samples": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    ds = add(latent, clip, "a cat on a mat", "cat, mat", word_masks(4, 128, 128), "strays")
    backup = ds.path / "000002_old.safetensors"
    backup.write_bytes((ds.path / "000002.safetensors").read_bytes())
    (ds.path / ".DS_Store").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        ds = add(latent, clip, "a cat on a mat", "cat, mat", word_masks(4, 128, 128), "strays")  # no int() failure
        assert len(ds) == 4 and (ds.path / "000004.safetensors").is_file()
        loaded = GroundingDatasetLoad.execute("strays")
        assert "4 image(s)" in loaded.ui.value
        out = train(model, clip, loaded.result[0])
    assert "on 4 images" in out.ui.value                              # the backup is not a fifth
    named = [r.getMessage() for r in caplog.records if "skipped 000002_old.safetensors" in r.getMessage()]
    assert len(named) == 3 and ".DS_Store" not in named[0]                 # one line each for add, load, train


# 4. textual-inversion names: one word in every node that takes words -----------------------------------------

def test_structure_diffusion_finds_phrases_with_an_embedding(sd):
    model, clip, _ = sd
    with torch.inference_mode():
        _, _, phrases = StructureDiffusion.execute(model, clip, PROMPT, "").result
    assert phrases == "a photo | embedding:emb3 cat | a red dog | a garden | embedding:emb3 cat and a red dog"
    with torch.inference_mode():
        _, _, listed = StructureDiffusion.execute(model, clip, PROMPT, "embedding:emb3 cat").result
    assert listed == "embedding:emb3 cat"


def test_p2p_words_name_the_embedding_and_its_vectors(sd):
    model, clip, _ = sd
    target = PROMPT.replace("cat", "tiger")
    words_of = words_fn(clip)
    assert words_of(PROMPT).positions("embedding:emb3") == EMB and words_of(PROMPT).positions("cat") == (6,)
    plan = build_plan(PROMPT, [target], "auto", 4, 0.8, {}, 0.4, {"embedding:emb3": 2.0}, 77, 64, words_of)
    assert plan.kind == ["replace"] and plan.equalizer[0][list(EMB)].tolist() == [2.0, 2.0]
    assert (plan.equalizer[0] == 2).sum() == 2
    with torch.inference_mode():
        out = P2PEditSampler.execute(model, clip, PROMPT, target, encode(clip, ""),
                                     {"samples": torch.zeros(1, 4, 16, 16)}, "auto", 1, 3, 7.5, "simple", 0.8,
                                     "embedding:emb3:0.5", 0.4, "embedding:emb3:2", "embedding:emb3 cat, tiger", 0.3,
                                     0.2).result[0]["samples"]
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_viewer_cluster_and_prompt_mix_take_the_embedding_as_a_word(sd):
    model, clip, _ = sd
    lat = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        m, store = AttentionCapture.execute(model, "all", True, 32, 0.0, 1.0).result
        out = sample(m, encode(clip, PROMPT), encode(clip, ""), lat, steps=3)
        heat, over, masks = AttentionMapView.execute(store, clip, PROMPT, "embedding:emb3, dog", {"samples": out},
                                                     "8", 0.5, 0, 32).result
        maps = word_maps(store, [EMB, (10,)], (8, 8), 0)                  # both vectors of emb3, then 'dog'
        assert torch.equal(masks, masks_from_maps(normalize(upsample(maps, (32, 32))), 0.5))
        assert not torch.equal(maps[0], word_maps(store, [EMB[:1]], (8, 8), 0)[0])
        wm, bg, _ = SelfAttnCluster.execute(store, clip, PROMPT, "embedding:emb3, dog", {"samples": out}, 3, 0.3, 16,
                                            8, 1, 0).result
        assert wm.shape == (2, 16, 16)
        mixed = PromptMixSampler.execute(model, clip, PROMPT, encode(clip, ""), {"samples": lat}, "dog", "tiger", 1,
                                         "embedding:emb3", 0, 3, 7.5, "simple", 0.0, 0.5, 0.5, 0.05, 0.5, 2,
                                         0.3).result
        assert torch.isfinite(mixed[0]["samples"]).all()


def test_dpl_learns_an_embedding_noun_from_its_vectors_and_grounding_takes_it(sd, out_dir):
    model, clip, vectors = sd
    with torch.inference_mode():
        nt = locate(clip, PROMPT, "embedding:emb3, dog")
        assert nt.positions == [EMB, (10,)]
        start = initial_values(clip, PROMPT, nt)[0]
    assert torch.equal(start[:2], vectors.float())                         # the inversion's own vectors
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))}
    ds = add(latent, clip, PROMPT, "embedding:emb3, dog", word_masks(2, 128, 128), "emb")
    assert ds.vocabulary() == ["dog", "embedding:emb3"]
    head = train(model, clip, ds).result[0]
    with torch.inference_mode():
        feats = GroundingFeaturesNode.execute(model, encode(clip, PROMPT), latent, 1, 0, ROWS[0],
                                              encode(clip, "")).result[0]
        seg = GroundedSegment.execute(head, feats, clip, PROMPT, "embedding:emb3", 0.5, "auto", False).result[0]
    assert seg.shape == (1, 16, 16)


# 5. an inversion used with another model ---------------------------------------------------------------------

def lora_of(model, clip, seed=5):
    """A rank-2 LoRA on every attention value projection, applied as LoraLoader does
    (comfy.sd.load_lora_for_models)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(k for k, v in key_map.items() if k.startswith("lora_unet") and v.endswith(".to_v.weight")):
        w = weights[key_map[name]]
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g)
        sd[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g)
    return comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 0.0)[0]


def invert(model, clip, mode="ddim"):
    with torch.inference_mode():
        return NullTextInvert.execute(model, clip, "a cat and a dog in a garden", mode, 3, 7.5, "simple", 2, 1e-5,
                                      latent={"samples": torch.zeros(1, 4, 16, 16)}).result[0]


def edit(model, clip, inv):
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, "a cat and a dog in a garden", "a tiger and a dog in a garden",
                                      encode(clip, ""), {"samples": torch.zeros(1, 4, 16, 16)}, "auto", 1, 3, 7.5,
                                      "simple", 0.8, "", 0.4, "", "", 0.3, 0.2, inversion=inv).result[0]["samples"]


def test_an_inversion_on_the_base_model_is_refused_on_a_lora_clone_by_name(sd, caplog):
    model, clip, _ = sd
    lora = lora_of(model, clip)
    assert lora.model is model.model                                      # what the old check compared
    lat, pos, neg = torch.zeros(1, 4, 16, 16), encode(clip, "a cat"), encode(clip, "")
    with torch.inference_mode():
        assert rel(sample(lora, pos, neg, lat, steps=2), sample(model, pos, neg, lat, steps=2)) > 1e-4   # it matters
    inv = invert(model, clip)
    with pytest.raises(ValueError, match=r"P2PEditSampler: the inversion was made with another MODEL .* the weight "
                                         r"patches \(LoRA.*inverted with no patched weights, now 14 patched weights.*"
                                         r"Connect the same MODEL output"):
        edit(lora, clip, inv)
    with pytest.raises(ValueError, match=r"PromptMixSampler: the inversion was made with another MODEL"):
        with torch.inference_mode():
            PromptMixSampler.execute(lora, clip, "a cat and a dog in a garden", neg, {"samples": lat}, "cat", "tiger",
                                     1, "dog", 0, 3, 7.5, "simple", 0.0, 0.5, 0.5, 0.05, 0.5, 2, 0.3, inversion=inv)
    on_lora = invert(lora, clip)
    with pytest.raises(ValueError, match=r"inverted with 14 patched weights, now no patched weights"):
        edit(model, clip, on_lora)
    with pytest.raises(ValueError, match=r"other patches of the same count"):
        edit(lora_of(model, clip, seed=6), clip, on_lora)
    sampling = model.clone()
    ms = model.get_model_object("model_sampling")
    sampling.add_object_patch("model_sampling", type(ms)(model.model.model_config))  # as ModelSamplingDiscrete
    with pytest.raises(ValueError, match=r"the object patches \['model_sampling'\]"):
        edit(sampling, clip, inv)
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        edit(model.clone(), clip, inv)                                    # a clone changes nothing
        edit(lora.clone(), clip, on_lora)
        with torch.inference_mode():
            captured = AttentionCapture.execute(model, "all", True, 32, 0.0, 1.0).result[0]
        edit(captured, clip, inv)                                         # capture only reads
        edit(model, clip, invert(captured, clip))
    assert "inversion was made" not in caplog.text
    with torch.inference_mode():
        structured = StructureDiffusion.execute(model, clip, "a cat and a dog in a garden", "").result[0]
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        edit(structured, clip, inv)
    assert "P2PEditSampler: the inversion was made with a MODEL whose options differ from this one's in " \
           "transformer_options.patches.attn2_patch" in caplog.text


def test_a_dpl_inversion_is_checked_the_same_way(sd):
    model, clip, _ = sd
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inv = DPLTokenOptimizer.execute(model, clip, {"samples": image}, PROMPT, "embedding:emb3, dog", 2, 7.5,
                                        "simple", 1.0, 0.05, 0.05, "25, 50, 25", "0.3, 0.7, 0.9", 1, 1e-2, 1, 0.0,
                                        0).result[0]
    assert inv.extra["dpl"].counts == [2, 1]
    with pytest.raises(ValueError, match=r"P2PEditSampler: the inversion was made with another MODEL"):
        with torch.inference_mode():
            P2PEditSampler.execute(lora_of(model, clip), clip, PROMPT, PROMPT, encode(clip, ""), {"samples": image},
                                   "auto", 1, 2, 7.5, "simple", 0.8, "", 0.4, "", "", 0.3, 0.2, inversion=inv)
