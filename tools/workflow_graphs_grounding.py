"""Workflow graph of grounded generation: fill a grounding dataset, train a head, segment a new image's words
((nodes, notes) for the SD or the ShapesWorld variant).
"""

from __future__ import annotations

from workflow_format import Node, loader_node, preview_image, vae_decode


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
    nodes = [loader_node(shapesworld)] + source + [
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
        vae_decode(10, (9, 0), (1, 2), (1120, 620)),
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
        preview_image(13, (12, 1), (1880, 160), (300, 300), "Probability heatmaps"),
        preview_image(14, (10, 0), (1480, 620), (300, 300), "The generated image"),
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
