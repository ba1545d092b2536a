"""Workflow graphs of attention capture on DiT models (issue 28): ShapesWorld-Flow (the embedded Flux-class model,
runs on a CPU), Flux.1-dev and SD3.5 (their weights are the user's; the loaders and settings follow ComfyUI's own
Flux dev and SD3.5 templates). One function per graph: (nodes, notes).
"""

from __future__ import annotations

from workflow_format import Node, preview_image, save_image, vae_decode

KS_TYPES = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"}
VIEW_TYPES = {"store": "ATTENTION_STORE", "clip": "CLIP", "samples": "LATENT", "image": "IMAGE"}
VIEW_OUTPUTS = [("heatmaps", "IMAGE"), ("overlays", "IMAGE"), ("masks", "MASK")]


def flux_loaders() -> list[Node]:
    """Flux.1-dev's three stock loaders as ComfyUI's Flux dev template has them: UNETLoader (id 1, MODEL),
    DualCLIPLoader type flux (id 2, CLIP), VAELoader (id 3, VAE)."""
    return [Node(1, "UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
                 outputs=[("MODEL", "MODEL")], pos=(0, 0), size=(320, 90)),
            Node(2, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                       "type": "flux", "device": "default"},
                 outputs=[("CLIP", "CLIP")], pos=(0, 130), size=(320, 130)),
            Node(3, "VAELoader", {"vae_name": "ae.safetensors"}, outputs=[("VAE", "VAE")], pos=(0, 300),
                 size=(320, 60))]


def sd3_loaders() -> list[Node]:
    """SD3.5 Large as ComfyUI's SD3.5 example loads it: the checkpoint (id 1: MODEL, its CLIP unused, VAE) and
    TripleCLIPLoader (id 2: clip_l + clip_g + t5xxl)."""
    return [Node(1, "CheckpointLoaderSimple", {"ckpt_name": "sd3.5_large.safetensors"},
                 outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(320, 100)),
            Node(2, "TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                         "clip_name3": "t5xxl_fp16.safetensors"},
                 outputs=[("CLIP", "CLIP")], pos=(0, 140), size=(320, 130))]


def flux_conditioning(guidance: float, y: int) -> list[Node]:
    """FluxGuidance (node 5) on the prompt's conditioning (node 4) and its ConditioningZeroOut as the negative (node
    6), at x 360 from ``y`` down: what every Flux-dev graph wires (cfg 1, no negative pass)."""
    return [
        Node(5, "FluxGuidance", {"guidance": guidance}, {"conditioning": (4, 0)}, [("CONDITIONING", "CONDITIONING")],
             {"conditioning": "CONDITIONING"}, (360, y), (300, 60)),
        Node(6, "ConditioningZeroOut", {}, {"conditioning": (4, 0)}, [("CONDITIONING", "CONDITIONING")],
             {"conditioning": "CONDITIONING"}, (360, y + 100), (300, 30), "Negative (unused at cfg 1)"),
    ]


def capture_node(nid: int, model: tuple, capture_self: bool, pos: tuple) -> Node:
    return Node(nid, "AttentionCapture", {"layers": "all", "capture_self": capture_self, "self_max_size": 32,
                                          "start": 0.0, "end": 1.0, "concepts": ""}, {"model": model},
                [("model", "MODEL"), ("store", "ATTENTION_STORE")], {"model": "MODEL"}, pos, (320, 200))


def view_nodes(nid: int, prompt: str, words: str, store: tuple, clip: tuple, samples: tuple, image: tuple,
               pos: tuple) -> list[Node]:
    """Attention Map View of the sampled words and a Preview Image of its overlays (ids nid, nid + 1)."""
    return [Node(nid, "AttentionMapView", {"prompt": prompt, "words": words, "resolution": "all", "threshold": 0.5,
                                           "batch_index": 0, "tile_size": 256, "maps": "attention"},
                 {"store": store, "clip": clip, "samples": samples, "image": image}, VIEW_OUTPUTS, VIEW_TYPES,
                 pos, (360, 380)),
            preview_image(nid + 1, (nid, 1), (pos[0] + 420, pos[1]), (300, 300), "Overlays")]


def capture_flow_graph(_shapesworld: bool = True) -> tuple[list[Node], list]:
    """ShapesWorld-Flow Loader -> Attention Capture -> KSampler -> VAE Decode -> Attention Map View and
    Self-Attention Cluster (the 32x32 images are 8x8 tokens: every layer records both maps)."""
    prompt = "a red circle and a blue square on a gray background"
    words = "circle, square, background"
    nodes = [
        Node(1, "ShapesWorldFlowLoader", {"weights": ""},
             outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100)),
        Node(2, "CLIPTextEncode", {"text": prompt}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 160), "Positive prompt"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 200), (400, 120), "Negative prompt"),
        capture_node(4, (1, 0), True, (360, 360)),
        Node(5, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(6, "KSampler", {"seed": 7, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                             "denoise": 1.0},
             {"model": (4, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (5, 0)},
             [("LATENT", "LATENT")], KS_TYPES, (800, 0), (320, 270)),
        vae_decode(7, (6, 0), (1, 2), (1160, 0)),
        save_image(8, (7, 0), "attention_lab_flow_capture", (1420, 0), (300, 300)),
        *view_nodes(9, prompt, words, (4, 1), (1, 1), (6, 0), (7, 0), (800, 330)),
        Node(11, "SelfAttnCluster", {"prompt": prompt, "words": words, "clusters": 5, "threshold": 0.3,
                                     "self_resolution": 8, "cross_resolution": 8, "seed": 1, "batch_index": 0,
                                     "labels": "attention"},
             {"store": (4, 1), "clip": (1, 1), "samples": (6, 0), "image": (7, 0)},
             [("word_masks", "MASK"), ("background", "MASK"), ("clusters", "IMAGE")], VIEW_TYPES,
             (800, 750), (360, 380), "Self-attention clusters"),
    ]
    note = ("Attention maps of ShapesWorld-Flow, the pack's embedded rectified-flow transformer loaded as ComfyUI's "
            "own Flux class: the same graph works on Flux (attention_capture_flux). Change the positive prompt AND "
            "the 'prompt' of Attention Map View and Self-Attention Cluster together (the same text), and list the "
            "words to show in 'words'. Flux attention is joint: the maps are the image tokens' attention to the "
            "words' text tokens. Self-Attention Cluster groups the image tokens by their self-attention (8x8 "
            "tokens here) and names each cluster by the word it attends to most. Pixel-space: the 256x256 empty "
            "latent gives 32x32 images; euler + simple at cfg 4 as in the model card (docs/shapesworld-flow.md). "
            "Runs on a CPU in seconds.")
    return nodes, [(note, (0, 560))]


def capture_flux_graph(_shapesworld: bool = False) -> tuple[list[Node], list]:
    """Flux.1-dev as ComfyUI's own Flux dev template loads it (UNETLoader, DualCLIPLoader type flux, VAELoader,
    FluxGuidance 3.5, KSampler euler/simple at cfg 1), with Attention Capture on the model."""
    prompt = "a photo of a cat riding a bicycle on a sunny street"
    nodes = [
        *flux_loaders(),
        Node(4, "CLIPTextEncode", {"text": prompt}, {"clip": (2, 0)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 160), "Positive prompt"),
        *flux_conditioning(3.5, 200),
        capture_node(7, (1, 0), False, (360, 380)),
        Node(8, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(9, "KSampler", {"seed": 7, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                             "denoise": 1.0},
             {"model": (7, 0), "positive": (5, 0), "negative": (6, 0), "latent_image": (8, 0)},
             [("LATENT", "LATENT")], KS_TYPES, (800, 0), (320, 270)),
        vae_decode(10, (9, 0), (3, 0), (1160, 0)),
        save_image(11, (10, 0), "attention_lab_flux", (1420, 0), (300, 300)),
        *view_nodes(12, prompt, "cat, bicycle, street", (7, 1), (2, 0), (9, 0), (10, 0), (800, 330)),
    ]
    note = ("Attention maps of Flux.1-dev. Model files (ComfyUI's own Flux dev template uses the same): "
            "flux1-dev.safetensors in ComfyUI/models/diffusion_models/ (huggingface.co/Comfy-Org/flux1-dev), "
            "clip_l.safetensors and t5xxl_fp16.safetensors in ComfyUI/models/text_encoders/ "
            "(huggingface.co/comfyanonymous/flux_text_encoders), ae.safetensors in ComfyUI/models/vae/ "
            "(huggingface.co/black-forest-labs/FLUX.1-dev); pick them in the three loaders if your files are named "
            "otherwise. Change the positive prompt AND the 'prompt' of Attention Map View together, and list the "
            "words to show in 'words'. Flux-dev is guidance-distilled: FluxGuidance sets the guidance, cfg stays 1. "
            "'layers' narrows what is recorded ('double.15-18', 'single'); self-attention is off here (1024x1024 is "
            "64x64 tokens). Try the same graph on a CPU with attention_capture_shapesworld_flow.")
    return nodes, [(note, (0, 560))]


def capture_sd3_graph(_shapesworld: bool = False) -> tuple[list[Node], list]:
    """SD3.5 Large as ComfyUI's SD3.5 example loads it (the checkpoint for MODEL and VAE, TripleCLIPLoader for
    clip_l + clip_g + t5xxl), with Attention Capture on the model; sampler settings of ComfyUI's SD3.5 template."""
    prompt = "a photo of a cat riding a bicycle on a sunny street"
    nodes = [
        *sd3_loaders(),
        Node(3, "CLIPTextEncode", {"text": prompt}, {"clip": (2, 0)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 160), "Positive prompt"),
        Node(4, "CLIPTextEncode", {"text": ""}, {"clip": (2, 0)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 200), (400, 120), "Negative prompt"),
        capture_node(5, (1, 0), False, (360, 360)),
        Node(6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 320), (300, 110)),
        Node(7, "KSampler", {"seed": 7, "steps": 32, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple",
                             "denoise": 1.0},
             {"model": (5, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (6, 0)},
             [("LATENT", "LATENT")], KS_TYPES, (800, 0), (320, 270)),
        vae_decode(8, (7, 0), (1, 2), (1160, 0)),
        save_image(9, (8, 0), "attention_lab_sd3", (1420, 0), (300, 300)),
        *view_nodes(10, prompt, "cat, bicycle, street", (5, 1), (2, 0), (7, 0), (8, 0), (800, 330)),
    ]
    note = ("Attention maps of Stable Diffusion 3.5 (MMDiT joint attention). Model files, as in ComfyUI's SD3.5 "
            "example: sd3.5_large.safetensors (or sd3.5_medium / sd3.5_large_turbo) in ComfyUI/models/checkpoints/ "
            "(huggingface.co/stabilityai/stable-diffusion-3.5-large), clip_l.safetensors, clip_g.safetensors and "
            "t5xxl_fp16.safetensors in ComfyUI/models/text_encoders/ (huggingface.co/Comfy-Org/"
            "stable-diffusion-3.5-fp8, text_encoders/); pick them in the loaders if named otherwise. Sampler: euler, "
            "simple, cfg 4.5 as ComfyUI's SD3.5 Large template. Change the positive prompt AND the 'prompt' of "
            "Attention Map View together, and list the words to show in 'words'. 'layers' narrows what is "
            "recorded (joint blocks by index, e.g. 'double.10-20'; see Attention Capture's help); self-attention is "
            "off here (1024x1024 is 64x64 tokens).")
    return nodes, [(note, (0, 560))]
