"""Workflow graphs of the editing pipelines: Prompt-to-Prompt, Null-Text Inversion + P2P, Dynamic Prompt
Learning. One function per pipeline: (nodes, notes) for the SD or the ShapesWorld variant.
"""

from __future__ import annotations

from workflow_format import Node, loader_node, mask_to_image, preview_image, save_image, vae_decode

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
        loader_node(shapesworld),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "P2PEditSampler", p2p_widgets(source, targets, blend, shapesworld, False),
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)},
             [("latents", "LATENT"), ("blend_mask", "MASK")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT"},
             (360, 0), (400, 640)),
        vae_decode(5, (4, 0), (1, 2), (800, 0)),
        save_image(6, (5, 0), "attention_lab_p2p", (1060, 0), (420, 300), "Source, then one image per target prompt"),
        mask_to_image(7, (4, 1), (800, 360)),
        preview_image(8, (7, 0), (1060, 360), (420, 260), "LocalBlend masks (white = may change)"),
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
    nodes = [loader_node(shapesworld),
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
            vae_decode(13, (12, 0), (1, 2), (0, 940)),
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
        vae_decode(5, (4, 0), (1, 2), (1240, 0)),
        save_image(6, (5, 0), "attention_lab_nti_p2p", (1500, 0), (420, 300),
                   "Reconstruction, then one edit per target"),
        vae_decode(7, (3, 1), (1, 2), (800, 700)),
        preview_image(8, (7, 0), (1060, 700), (300, 300), "Null-text reconstruction (should match the input)"),
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
                                      "end": 1.0, "concepts": ""}, {"model": (1, 0)},
             [("model", "MODEL"), ("store", "ATTENTION_STORE")], {"model": "MODEL"}, (360, 0), (320, 200)),
        Node(3, "NullTextInvert", {"prompt": source, "mode": "ddim", "steps": 50, "guidance": 7.5,
                                   "scheduler": sched, "inner_steps": 10, "early_stop": 1e-5,
                                   "keep_best_null": False},
             {"model": (15, 0), "clip": (1, 1), "latent": (14, 0)},
             [("inversion", "ATTENTION_LAB_INVERSION"), ("reconstruction", "LATENT")],
             {"model": "MODEL", "clip": "CLIP", "latent": "LATENT"}, (360, 240), (380, 330),
             "DDIM inversion with capture"),
        Node(16, "SelfAttnCluster", {"prompt": source, "words": nouns, "clusters": 5, "threshold": 0.2,
                                     "self_resolution": 32, "cross_resolution": 16, "seed": 1, "batch_index": 0,
                                     "labels": "attention"},
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
        vae_decode(6, (5, 0), (1, 2), (1680, 0)),
        save_image(7, (6, 0), "attention_lab_dpl", (1940, 0), (420, 300), "Reconstruction, then the edit"),
        preview_image(8, (4, 2), (1240, 700), (420, 260), "Optimized noun attention"),
        preview_image(9, (16, 2), (800, 700), (300, 300), "Self-attention clusters"),
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
