"""Workflow graphs of editing on DiT models (issue 29): Prompt-to-Prompt from a seed and from a rectified-flow
inversion, and prompt mixing, on ShapesWorld-Flow (the embedded Flux-class model that runs on a CPU), Flux.1-dev
and SD3.5 (their weights are the user's; loaders and sampler settings as ComfyUI's own Flux dev and SD3.5
templates, tools/workflow_graphs_dit.py). One function per graph: (nodes, notes).
"""

from __future__ import annotations

from workflow_format import Node, mask_to_image, preview_image, save_image, vae_decode
from workflow_graphs_dit import KS_TYPES, flux_conditioning, flux_loaders, sd3_loaders

FLOW_SOURCE = "a red circle and a blue square on a gray background"
FLOW_TARGETS = ("a green circle and a blue square on a gray background\n"
                "a yellow circle and a blue square on a gray background")
FLOW_BLEND = "red, green, yellow"
PHOTO_SOURCE = "a photo of a cat riding a bicycle on a sunny street"
PHOTO_TARGETS = ("a photo of a dog riding a bicycle on a sunny street\n"
                 "a photo of a tiger riding a bicycle on a sunny street")
PHOTO_BLEND = "cat, dog, tiger"
P2P_TYPES = {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT",
             "positive": "CONDITIONING", "inversion": "ATTENTION_LAB_INVERSION"}
P2P_OUTPUTS = [("latents", "LATENT"), ("blend_mask", "MASK")]
INV_OUTPUTS = [("inversion", "ATTENTION_LAB_INVERSION"), ("reconstruction", "LATENT")]
INV_TYPES = {"model": "MODEL", "clip": "CLIP", "image": "IMAGE", "vae": "VAE", "positive": "CONDITIONING"}
FLUX_FILES = ("Model files as in attention_capture_flux (ComfyUI's Flux dev template): flux1-dev.safetensors in "
              "models/diffusion_models/, clip_l.safetensors + t5xxl_fp16.safetensors in models/text_encoders/, "
              "ae.safetensors in models/vae/; pick yours in the three loaders. ")
SD3_FILES = ("Model files as in attention_capture_sd3 (ComfyUI's SD3.5 example): sd3.5_large.safetensors in "
             "models/checkpoints/, clip_l, clip_g and t5xxl_fp16 in models/text_encoders/; pick yours in the loaders. ")


def p2p_widgets(source: str, targets: str, blend: str, seed: int, steps: int, cfg: float,
                self_replace: float = 0.4) -> dict:
    return {"source_prompt": source, "target_prompts": targets, "edit": "auto", "seed": seed, "steps": steps,
            "cfg": cfg, "scheduler": "simple", "cross_replace_steps": 0.8, "cross_replace_words": "",
            "self_replace_steps": self_replace, "reweight": "", "blend_words": blend, "blend_threshold": 0.3,
            "blend_start": 0.2}


def text(nid: int, prompt: str, clip: tuple, pos: tuple, title: str) -> Node:
    return Node(nid, "CLIPTextEncode", {"text": prompt}, {"clip": clip}, [("CONDITIONING", "CONDITIONING")],
                {"clip": "CLIP"}, pos, (400, 140), title)


def edit_tail(nid: int, latents: tuple, vae: tuple, prefix: str, x: int, title: str) -> list[Node]:
    """VAE Decode + Save Image of P2P's latents, MaskToImage + Preview of its LocalBlend masks (ids nid..nid+3)."""
    return [vae_decode(nid, latents, vae, (x, 0)),
            save_image(nid + 1, (nid, 0), prefix, (x + 260, 0), (420, 300), title),
            mask_to_image(nid + 2, (latents[0], 1), (x, 360)),
            preview_image(nid + 3, (nid + 2, 0), (x + 260, 360), (420, 260), "LocalBlend masks (white = may change)")]


def flow_loader() -> Node:
    return Node(1, "ShapesWorldFlowLoader", {"weights": ""},
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100))


def p2p_flow_graph(_shapesworld: bool = True) -> tuple[list[Node], list]:
    """ShapesWorld-Flow Loader -> P2P Edit Sampler (a colour swap from a seed, LocalBlend on the swapped words)
    -> VAE Decode -> Save Image, and the LocalBlend masks."""
    nodes = [
        flow_loader(),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "P2PEditSampler", p2p_widgets(FLOW_SOURCE, FLOW_TARGETS, FLOW_BLEND, 3, 20, 4.0),
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)}, P2P_OUTPUTS,
             P2P_TYPES, (360, 0), (400, 640)),
        *edit_tail(5, (4, 0), (1, 2), "attention_lab_flow_p2p", 800, "Source, then one image per target prompt"),
    ]
    note = ("Prompt-to-Prompt on ShapesWorld-Flow, the pack's embedded rectified-flow transformer loaded as ComfyUI's "
            "own Flux class: the same node edits Flux and SD3 (p2p_edit_flux, p2p_edit_sd3). On a DiT the edit works "
            "on each block's joint attention: the image->text part takes the source's (word swap / refine / "
            "reweight), the image->image part is the source's for the first 'self_replace_steps', and the edited "
            "rows are scaled back to sum 1 (docs/dit-editing.md). A colour swap, because this small model draws the "
            "named colour every time but the named shape only a quarter of the time. Expected: the first image is "
            "the plain generation, the circle turns green, then yellow, the square and background stay (LocalBlend "
            "on the colour words). Runs on a CPU in seconds.")
    return nodes, [(note, (0, 700))]


def p2p_flux_graph(_shapesworld: bool = False) -> tuple[list[Node], list]:
    """Flux.1-dev loaders -> P2P Edit Sampler from a seed (cfg 1, the source prompt's conditioning through
    FluxGuidance 3.5 on 'positive'; word swap cat -> dog / tiger with LocalBlend)."""
    nodes = [
        *flux_loaders(),
        text(4, PHOTO_SOURCE, (2, 0), (360, 0), "Source prompt (= P2P's source_prompt)"),
        *flux_conditioning(3.5, 180),
        Node(7, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(8, "P2PEditSampler", p2p_widgets(PHOTO_SOURCE, PHOTO_TARGETS, PHOTO_BLEND, 7, 20, 1.0),
             {"model": (1, 0), "clip": (2, 0), "negative": (6, 0), "latent_image": (7, 0), "positive": (5, 0)},
             P2P_OUTPUTS, P2P_TYPES, (800, 0), (400, 640)),
        *edit_tail(9, (8, 0), (3, 0), "attention_lab_flux_p2p", 1240, "Source, then one image per target prompt"),
    ]
    note = ("Prompt-to-Prompt on Flux.1-dev from a seed. " + FLUX_FILES +
            "Flux dev is guidance-distilled: cfg stays 1 (no negative pass) and the guidance is FluxGuidance's on "
            "'positive', which must encode 'source_prompt' (the same text; each target line takes its place on the "
            "edit rows). One target per line, same length as the source for a word swap (edit 'auto' picks swap / "
            "refine). The edit replaces the image->text part of every block's joint attention with the source's "
            "for 'cross_replace_steps' and the image->image part for 'self_replace_steps'; LocalBlend keeps "
            "everything outside 'blend_words' (docs/dit-editing.md). Expected: the source image, then the cat "
            "turned into a dog and a tiger on the same street. Try it on a CPU first with "
            "p2p_edit_shapesworld_flow.")
    return nodes, [(note, (0, 560))]


def p2p_sd3_graph(_shapesworld: bool = False) -> tuple[list[Node], list]:
    """SD3.5 loaders -> P2P Edit Sampler from a seed (CFG 4.5, euler-like own loop on the simple schedule)."""
    nodes = [
        *sd3_loaders(),
        text(4, "", (2, 0), (360, 0), "Negative prompt"),
        Node(6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 320), (300, 110)),
        Node(8, "P2PEditSampler", p2p_widgets(PHOTO_SOURCE, PHOTO_TARGETS, PHOTO_BLEND, 7, 32, 4.5),
             {"model": (1, 0), "clip": (2, 0), "negative": (4, 0), "latent_image": (6, 0)}, P2P_OUTPUTS,
             P2P_TYPES, (800, 0), (400, 640)),
        *edit_tail(9, (8, 0), (1, 2), "attention_lab_sd3_p2p", 1240, "Source, then one image per target prompt"),
    ]
    note = ("Prompt-to-Prompt on Stable Diffusion 3.5 (MMDiT joint attention) from a seed. " + SD3_FILES +
            "CFG model: 32 steps on the simple schedule at cfg 4.5 as ComfyUI's SD3.5 Large template; the edit "
            "works on the positive rows, the negative rows are left alone. One target per line, LocalBlend on "
            "'blend_words'; edit 'auto' runs cat -> dog as a word swap and cat -> tiger as refine, because T5 "
            "reads 'tiger' as 3 tokens where 'cat' is one (the log says so). SD3's context is its CLIP-L/G part "
            "then its T5 part: the words are found in both (docs/dit-editing.md). Expected: the source image, then "
            "the cat turned into a dog and a tiger with the street kept.")
    return nodes, [(note, (0, 560))]


def rf_p2p_flow_graph(_shapesworld: bool = True) -> tuple[list[Node], list]:
    """ShapesWorld-Flow: KSampler makes the image to edit -> Null-Text Inversion mode rf-euler (16 steps, cfg 1)
    -> P2P Edit Sampler from the inversion (colour swap, LocalBlend); the reconstruction previewed."""
    nodes = [
        flow_loader(),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        text(10, FLOW_SOURCE, (1, 1), (0, 320), "Image prompt"),
        Node(11, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 500), (300, 110)),
        Node(12, "KSampler", {"seed": 11, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                              "denoise": 1.0},
             {"model": (1, 0), "positive": (10, 0), "negative": (2, 0), "latent_image": (11, 0)},
             [("LATENT", "LATENT")], KS_TYPES, (0, 650), (300, 270), "The image to edit"),
        vae_decode(13, (12, 0), (1, 2), (0, 960)),
        Node(3, "NullTextInvert", {"prompt": FLOW_SOURCE, "mode": "rf-euler", "steps": 16, "guidance": 1.0,
                                   "scheduler": "simple", "inner_steps": 10, "early_stop": 1e-5,
                                   "keep_best_null": False},
             {"model": (1, 0), "clip": (1, 1), "image": (13, 0), "vae": (1, 2)}, INV_OUTPUTS, INV_TYPES,
             (360, 0), (380, 330), "Rectified-flow inversion"),
        Node(4, "P2PEditSampler", p2p_widgets(FLOW_SOURCE, FLOW_TARGETS, FLOW_BLEND, 0, 16, 1.0),
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 1), "inversion": (3, 0)},
             P2P_OUTPUTS, P2P_TYPES, (800, 0), (400, 640)),
        *edit_tail(5, (4, 0), (1, 2), "attention_lab_flow_rf_p2p", 1240, "Reconstruction, then one edit per target"),
        vae_decode(20, (3, 1), (1, 2), (800, 700)),
        preview_image(21, (20, 0), (1060, 700), (300, 300), "Reconstruction (should match the input)"),
    ]
    note = ("Rectified-flow inversion + Prompt-to-Prompt on ShapesWorld-Flow (a generated image stands in for a "
            "photo; connect Load Image + the VAE for your own). Null-Text Inversion's flow modes: 'rf-euler' (plain "
            "Euler inversion, N model evaluations) or 'fireflow' (FireFlow, Deng et al. 2024: second order, N + 1); "
            "the edit retraces the inversion with the same solver, so its first image is the reconstruction. "
            "Settings as measured in docs/dit-editing.md: rf-euler, 16 steps, cfg ('guidance') 1; on the shipped "
            "weights Euler reconstructs better than FireFlow below 17 evaluations (docs/rf-inversion.md). P2P's "
            "steps must equal the inversion's, its cfg and sigmas are the inversion's, 'source_prompt' = "
            "'prompt'. Expected: the reconstruction preview matches the input; the circle turns green, then "
            "yellow, the rest stays (LocalBlend on the colour words). Runs on a CPU in seconds.")
    return nodes, [(note, (360, 1000))]


def rf_p2p_flux_graph(_shapesworld: bool = False) -> tuple[list[Node], list]:
    """Flux.1-dev: Load Image -> ImageScaleToTotalPixels (1 MP, multiples of 64) -> Null-Text Inversion mode
    fireflow (8 steps, cfg 1, FluxGuidance on 'positive') -> P2P Edit Sampler from the inversion."""
    nodes = [
        *flux_loaders(),
        text(4, PHOTO_SOURCE, (2, 0), (360, 0), "Image prompt (= both nodes' prompt)"),
        *flux_conditioning(1.0, 180),
        Node(13, "LoadImage", {"image": "example.png"}, {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")], {},
             (0, 400), (300, 320), "The image to edit"),
        Node(14, "ImageScaleToTotalPixels", {"upscale_method": "lanczos", "megapixels": 1.0, "resolution_steps": 64},
             {"image": (13, 0)}, [("IMAGE", "IMAGE")], {"image": "IMAGE"}, (0, 760), (300, 110)),
        Node(7, "NullTextInvert", {"prompt": PHOTO_SOURCE, "mode": "fireflow", "steps": 8, "guidance": 1.0,
                                   "scheduler": "simple", "inner_steps": 10, "early_stop": 1e-5,
                                   "keep_best_null": False},
             {"model": (1, 0), "clip": (2, 0), "image": (14, 0), "vae": (3, 0), "positive": (5, 0)},
             INV_OUTPUTS, INV_TYPES, (360, 360), (380, 330), "Rectified-flow inversion"),
        Node(8, "P2PEditSampler", p2p_widgets(PHOTO_SOURCE, PHOTO_TARGETS, PHOTO_BLEND, 0, 8, 1.0),
             {"model": (1, 0), "clip": (2, 0), "negative": (6, 0), "latent_image": (7, 1), "inversion": (7, 0)},
             P2P_OUTPUTS, P2P_TYPES, (800, 0), (400, 640)),
        *edit_tail(9, (8, 0), (3, 0), "attention_lab_flux_rf_p2p", 1240, "Reconstruction, then one edit per target"),
        vae_decode(20, (7, 1), (3, 0), (800, 700)),
        preview_image(21, (20, 0), (1060, 700), (300, 300), "Reconstruction (should match the input)"),
    ]
    note = ("Rectified-flow inversion + Prompt-to-Prompt on a photo with Flux.1-dev. " + FLUX_FILES +
            "Put the photo in ComfyUI's input folder and pick it in Load Image; it is scaled to about 1 MP in "
            "multiples of 64 px. Null-Text Inversion mode 'fireflow' (FireFlow, Deng et al. 2024: the paper edits "
            "Flux in 8 steps, 18 model evaluations); 'rf-euler' is plain Euler inversion (on the pack's "
            "ShapesWorld-Flow Euler reconstructs better at few steps: measure on your model, docs/rf-inversion.md). "
            "Flux dev has no unconditional branch: null-text is refused, cfg ('guidance') stays 1 and the "
            "distilled guidance is FluxGuidance's on 'positive' (1 here, as upstream's inversion). P2P retraces the "
            "inversion: its steps must equal the inversion's, 'source_prompt' = the inversion's 'prompt'. "
            "Expected: the reconstruction matches the photo; the edits swap the cat only (LocalBlend).")
    return nodes, [(note, (0, 900))]


def prompt_mix_flow_graph(_shapesworld: bool = True) -> tuple[list[Node], list]:
    """ShapesWorld-Flow Loader -> Prompt Mix Sampler (circle varied by proxy shapes, square preserved) -> VAE
    Decode -> Save Image, the blend masks and the proxy words used."""
    nodes = [
        flow_loader(),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "PromptMixSampler",
             {"prompt": FLOW_SOURCE, "object_word": "circle", "proxy_words": "triangle, star, cross",
              "suggestions": 4, "preserve_words": "square", "seed": 3, "steps": 20, "cfg": 4.0,
              "scheduler": "simple", "mix_start": 0.14, "mix_end": 0.34, "self_injection_end": 0.8,
              "injection_threshold": 0.05, "blend_at": 0.7, "clusters": 5, "cluster_threshold": 0.3,
              "nouns": "circle, square, background", "background_nouns": "background",
              "proxy_candidates": "word-internal pieces (official)"},
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)},
             [("latents", "LATENT"), ("blend_masks", "MASK"), ("proxies", "STRING")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT"},
             (360, 0), (380, 620)),
        vae_decode(5, (4, 0), (1, 2), (800, 0)),
        save_image(6, (5, 0), "attention_lab_flow_mnm", (1060, 0), (420, 300),
                   "Original, then one variation per proxy"),
        mask_to_image(7, (4, 1), (800, 360)),
        preview_image(8, (7, 0), (1060, 360), (420, 260), "Blend masks (white = kept from the variation)"),
        Node(9, "PreviewAny", {}, {"source": (4, 2)}, [], {"source": "*"}, (800, 460), (220, 120),
             "Proxy words used"),
    ]
    note = ("Prompt mixing (MnM) on ShapesWorld-Flow, the same node as on Flux and SD3. On a DiT each variation row "
            "is conditioned on its proxy prompt; in every block its image queries read the original's text keys, "
            "and the proxy's text values only inside [mix_start, mix_end) (docs/prompt-mixing-design.md); the "
            "self-attention injection mixes the image->image part of the joint attention. 'object_word' must be in "
            "'prompt'; one variation per proxy word. The paper's window [0.14, 0.34) and self-injection to 0.8, "
            "as measured on this model (docs/dit-editing.md: over 64 variations it changes the circle's classified "
            "shape in 37.5 %, against 43.8 % for mixing over every step with injection to 0.3, and keeps 32.3 dB "
            "outside the object against 26.2 dB); for larger changes (and position moves) start the window at 0. "
            "This small model draws a named shape only a quarter of the time, so a variation rarely becomes the "
            "proxy's shape. Expected: the circle's outline changes; the square and background stay (blend at "
            "'blend_at'). Euler on the simple schedule at "
            "cfg 4 (the model card). From an inversion: refused on DiT models. Runs on a CPU in seconds.")
    return nodes, [(note, (0, 660))]


def prompt_mix_flux_graph(_shapesworld: bool = False) -> tuple[list[Node], list]:
    """Flux.1-dev loaders -> Prompt Mix Sampler (cat varied by proxies, bicycle preserved; cfg 1, the prompt's
    conditioning through FluxGuidance 3.5 on 'positive', the paper's window)."""
    nodes = [
        *flux_loaders(),
        text(4, PHOTO_SOURCE, (2, 0), (360, 0), "Prompt (= Prompt Mix's prompt)"),
        *flux_conditioning(3.5, 180),
        Node(7, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(8, "PromptMixSampler",
             {"prompt": PHOTO_SOURCE, "object_word": "cat", "proxy_words": "dog, rabbit, fox", "suggestions": 4,
              "preserve_words": "bicycle, street", "seed": 7, "steps": 20, "cfg": 1.0, "scheduler": "simple",
              "mix_start": 0.14, "mix_end": 0.34, "self_injection_end": 0.8, "injection_threshold": 0.05,
              "blend_at": 0.7, "clusters": 5, "cluster_threshold": 0.3, "nouns": "", "background_nouns": "",
              "proxy_candidates": "word-internal pieces (official)"},
             {"model": (1, 0), "clip": (2, 0), "negative": (6, 0), "latent_image": (7, 0), "positive": (5, 0)},
             [("latents", "LATENT"), ("blend_masks", "MASK"), ("proxies", "STRING")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT",
              "positive": "CONDITIONING"}, (800, 0), (380, 620)),
        vae_decode(9, (8, 0), (3, 0), (1240, 0)),
        save_image(10, (9, 0), "attention_lab_flux_mnm", (1500, 0), (420, 300),
                   "Original, then one variation per proxy"),
        mask_to_image(11, (8, 1), (1240, 360)),
        preview_image(12, (11, 0), (1500, 360), (420, 260), "Blend masks (white = kept from the variation)"),
        Node(13, "PreviewAny", {}, {"source": (8, 2)}, [], {"source": "*"}, (1240, 460), (220, 120),
             "Proxy words used"),
    ]
    note = ("Prompt mixing (MnM) on Flux.1-dev. " + FLUX_FILES +
            "Flux dev is guidance-distilled: cfg stays 1 and the guidance is FluxGuidance's on 'positive', which "
            "must encode 'prompt' (the same text). 'object_word' must be in the prompt; one variation per proxy "
            "word (empty: 'suggestions' words proposed from the vocabulary). On a DiT each variation is conditioned "
            "on its proxy prompt and reads the proxy's text values only inside [mix_start, mix_end) "
            "(docs/prompt-mixing-design.md). Window and injection are the paper's SD numbers: no window has been "
            "measured on a trained DiT, so try wider windows if the cat hardly changes. Expected: the original, "
            "then the cat's shape varied with the bicycle and street kept. Try it on a CPU with "
            "prompt_mixing_shapesworld_flow.")
    return nodes, [(note, (0, 560))]
