"""Workflow graphs of the generation pipelines: attention capture, prompt mixing (MnM), StructureDiffusion,
SpaText; ShapesWorld-Flow text-to-image. One function per pipeline: (nodes, notes) for the SD or the ShapesWorld
variant.
"""

from __future__ import annotations

from workflow_format import Node, loader_node, mask_to_image, preview_image, save_image, vae_decode


def capture_graph(shapesworld: bool) -> tuple[list[Node], list]:
    prompt = ("a red circle and a blue square on a gray background" if shapesworld
              else "a photo of a cat riding a bicycle on a sunny street")
    words = "circle, square, background" if shapesworld else "cat, bicycle, street"
    size = 256 if shapesworld else 512
    nodes = [
        loader_node(shapesworld),
        Node(2, "CLIPTextEncode", {"text": prompt}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 160), "Positive prompt"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 200), (400, 120), "Negative prompt"),
        Node(4, "AttentionCapture", {"layers": "all", "capture_self": True, "self_max_size": 32, "start": 0.0,
                                     "end": 1.0, "concepts": ""}, {"model": (1, 0)},
             [("model", "MODEL"), ("store", "ATTENTION_STORE")], {"model": "MODEL"}, (360, 360), (320, 200)),
        Node(5, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(6, "KSampler", {"seed": 7, "steps": 20, "cfg": 5.0 if shapesworld else 7.5, "sampler_name": "euler",
                             "scheduler": "simple" if shapesworld else "normal", "denoise": 1.0},
             {"model": (4, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (5, 0)},
             [("LATENT", "LATENT")], {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                                      "latent_image": "LATENT"}, (800, 0), (320, 270)),
        vae_decode(7, (6, 0), (1, 2), (1160, 0)),
        save_image(8, (7, 0), "attention_lab", (1420, 0), (300, 300)),
        Node(9, "AttentionMapView", {"prompt": prompt, "words": words, "resolution": "all", "threshold": 0.5,
                                     "batch_index": 0, "tile_size": 256, "maps": "attention"},
             {"store": (4, 1), "clip": (1, 1), "samples": (6, 0), "image": (7, 0)},
             [("heatmaps", "IMAGE"), ("overlays", "IMAGE"), ("masks", "MASK")],
             {"store": "ATTENTION_STORE", "clip": "CLIP", "samples": "LATENT", "image": "IMAGE"},
             (800, 330), (360, 380)),
        preview_image(10, (9, 1), (1220, 360), (300, 300), "Overlays"),
    ]
    note = ("Attention maps. Change the positive prompt AND the 'prompt' of Attention Map View together "
            "(they must be the same text), and list the words to show in 'words'. The heatmap grid has a row "
            "per word and a column per feature size (then their mean); overlays are previewed on the right. "
            "'layers' on Attention Capture narrows what is recorded ('16', 'output.3-5'). Expected: each "
            "noun's map lights up on its object.")
    if shapesworld:
        note += (" ShapesWorld is pixel-space: the 256x256 empty latent gives 32x32 images; runs on a CPU in "
                 "seconds.")
    else:
        note += " Pick your SD1.5 or SDXL checkpoint in the loader."
    return nodes, [(note, (0, 600))]


SW_MIX = ("a red circle and a blue square on a gray background", "circle", "triangle, star, diamond, cross",
          "square")


def prompt_mix_graph(shapesworld: bool) -> tuple[list[Node], list]:
    if shapesworld:
        prompt, obj, proxies, keep = SW_MIX
        size, cfg, scheduler, window, injection = 256, 5.0, "simple", (0.34, 1.0), 1.0
        nouns, background_nouns = "circle, square, background", "background"      # the caption names its background
    else:
        prompt, obj, proxies, keep = ("a hamburger and a cup of coffee on a wooden table", "hamburger", "",
                                      "cup, table")
        size, cfg, scheduler, window, injection = 512, 7.5, "ddim_uniform", (0.14, 0.34), 0.8
        nouns, background_nouns = "hamburger, cup, coffee, table", ""             # what NLTK tags as nouns
    nodes = [
        loader_node(shapesworld),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "PromptMixSampler",
             {"prompt": prompt, "object_word": obj, "proxy_words": proxies, "suggestions": 4,
              "preserve_words": keep, "seed": 7, "steps": 50, "cfg": cfg, "scheduler": scheduler,
              "mix_start": window[0], "mix_end": window[1], "self_injection_end": injection,
              "injection_threshold": 0.05,
              "blend_at": 0.7, "clusters": 5, "cluster_threshold": 0.3, "nouns": nouns,
              "background_nouns": background_nouns,
              "proxy_candidates": "word-internal pieces (official)"},
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)},
             [("latents", "LATENT"), ("blend_masks", "MASK"), ("proxies", "STRING")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT"},
             (360, 0), (380, 620)),
        vae_decode(5, (4, 0), (1, 2), (800, 0)),
        save_image(6, (5, 0), "attention_lab_mnm", (1060, 0), (420, 300), "Original, then one variation per proxy"),
        mask_to_image(7, (4, 1), (800, 360)),
        preview_image(8, (7, 0), (1060, 360), (420, 260), "Blend masks (white = kept from the variation)"),
        Node(9, "PreviewAny", {}, {"source": (4, 2)}, [], {"source": "*"}, (800, 460), (220, 120),
             "Proxy words used"),
    ]
    note = ("Prompt mixing (MnM, 'Localizing Object-level Shape Variations'). Change 'prompt' and 'object_word' "
            "together (the word must be in the prompt); 'proxy_words' lists the shapes to try, one variation each "
            "(leave it empty to have 'suggestions' words proposed from the vocabulary); 'preserve_words' are the "
            "other objects to keep. The window [mix_start, mix_end) is where the proxy's cross-attention values "
            "are used: earlier = bigger changes. Expected: the first image is the plain generation; in the "
            "others the object changes shape while the rest stays (the background is copied back at 'blend_at').")
    if shapesworld:
        note += (" ShapesWorld fixes a small object's shape late, so this variant mixes over [0.34, 1) instead of "
                 "the paper's [0.14, 0.34) for SD 1.4, with the self-attention injection through the window's end "
                 "(measured: python -m attention.shapesworld.prompt_mix). "
                 "Runs on a CPU in seconds; 256x256 empty latent = 32x32 images.")
    else:
        note += (" Official settings for SD 1.4/1.5 at 512 px (50 DDIM steps, cfg 7.5). Pick your checkpoint in "
                 "the loader; proxy suggestion encodes the CLIP vocabulary once (fast on a GPU, minutes on a CPU).")
    return nodes, [(note, (0, 660))]


def structure_graph(shapesworld: bool) -> tuple[list[Node], list]:
    prompt = ("a red circle and a blue square on a gray background" if shapesworld
              else "a red car and a white sheep")
    size = 256 if shapesworld else 512
    cfg, sched = (5.0, "simple") if shapesworld else (7.5, "normal")
    sampler = {"seed": 11, "steps": 20 if shapesworld else 50, "cfg": cfg, "sampler_name": "euler",
               "scheduler": sched, "denoise": 1.0}
    ks_types = {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"}
    nodes = [
        loader_node(shapesworld),
        Node(2, "StructureDiffusion", {"prompt": prompt, "noun_phrases": ""}, {"model": (1, 0), "clip": (1, 1)},
             [("MODEL", "MODEL"), ("positive", "CONDITIONING"), ("phrases", "STRING")],
             {"model": "MODEL", "clip": "CLIP"}, (360, 0), (400, 220)),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 260), (400, 120), "Negative prompt"),
        Node(4, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 4}, {},
             [("LATENT", "LATENT")], {}, (0, 400), (300, 110)),
        Node(5, "KSampler", dict(sampler), {"model": (2, 0), "positive": (2, 1), "negative": (3, 0),
                                            "latent_image": (4, 0)},
             [("LATENT", "LATENT")], ks_types, (800, 0), (320, 270), "With noun-phrase values"),
        vae_decode(6, (5, 0), (1, 2), (1160, 0)),
        save_image(7, (6, 0), "attention_lab_structure", (1420, 0), (320, 320), "StructureDiffusion"),
        Node(8, "KSampler", dict(sampler), {"model": (1, 0), "positive": (2, 1), "negative": (3, 0),
                                            "latent_image": (4, 0)},
             [("LATENT", "LATENT")], ks_types, (800, 360), (320, 270), "Without (same seed)"),
        vae_decode(9, (8, 0), (1, 2), (1160, 360)),
        preview_image(10, (9, 0), (1420, 360), (320, 320), "Plain model"),
    ]
    note = ("StructureDiffusion (Feng et al. 2022): every noun phrase of the prompt is also encoded alone and its "
            "states become extra cross-attention values at its tokens (keys stay the prompt's), against attributes "
            "leaking between objects. Top: with the node; bottom: the plain model, same prompt and seed. Leave "
            "'noun_phrases' empty to find them automatically, or list them comma separated; sample with the node's "
            "'positive' output (only rows carrying exactly that conditioning get the phrase values).")
    note += (" ShapesWorld: runs on a CPU in seconds; on this tiny model binding is already ~92 % and the node "
             "changes it by nothing measurable (README)." if shapesworld else
             " The paper's CC-500 style prompt; pick your SD1.5 or SDXL checkpoint in the loader.")
    return nodes, [(note, (0, 700))]


def spatext_graph(shapesworld: bool) -> tuple[list[Node], list]:
    if shapesworld:
        scene, size, regions = "on a gray background", 256, [("a red circle", (16, 96, 112, 112)),
                                                            ("a blue square", (136, 32, 112, 112))]
        cfg, cfg_local, sched, steps = 5.0, 7.5, "simple", 20
    else:
        scene, size, regions = "a sunny beach, photo", 512, [("a black horse", (32, 224, 256, 256)),
                                                            ("a red full moon", (320, 32, 160, 160))]
        cfg, cfg_local, sched, steps = 7.5, 7.5, "normal", 30
    mask_types = {"destination": "MASK", "source": "MASK"}
    nodes = [
        loader_node(shapesworld),
        Node(2, "CLIPTextEncode", {"text": scene}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 120), "Global prompt (the scene)"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 160), (400, 120), "Negative prompt"),
        Node(4, "SolidMask", {"value": 0.0, "width": size, "height": size}, {}, [("MASK", "MASK")], {},
             (0, 320), (300, 110), "Empty canvas"),
    ]
    guider_inputs = {"model": (1, 0), "clip": (1, 1), "positive": (2, 0), "negative": (3, 0)}
    for k, (_text, (x, y, w, h)) in enumerate(regions, start=1):
        src, comp = 3 + 2 * k, 4 + 2 * k
        nodes += [Node(src, "SolidMask", {"value": 1.0, "width": w, "height": h}, {}, [("MASK", "MASK")], {},
                       (0, 320 + 160 * k), (300, 110), f"Region {k} box"),
                  Node(comp, "MaskComposite", {"x": x, "y": y, "operation": "add"},
                       {"destination": (4, 0), "source": (src, 0)}, [("MASK", "MASK")], mask_types,
                       (340, 320 + 160 * k), (300, 140), f"Region {k}")]
        guider_inputs[f"mask_{k}"] = (comp, 0)
    widgets = {"cfg_global": cfg, "cfg_local": cfg_local}
    for k in range(1, 5):
        widgets[f"prompt_{k}"] = regions[k - 1][0] if k <= len(regions) else ""
    nodes += [
        Node(9, "SpaTextGuider", widgets, guider_inputs, [("GUIDER", "GUIDER"), ("region_map", "IMAGE")],
             {"model": "MODEL", "clip": "CLIP", "positive": "CONDITIONING", "negative": "CONDITIONING",
              "mask_1": "MASK", "mask_2": "MASK"}, (800, 0), (400, 520)),
        Node(10, "RandomNoise", {"noise_seed": 5}, {}, [("NOISE", "NOISE")], {}, (800, 560), (300, 100)),
        Node(11, "KSamplerSelect", {"sampler_name": "euler"}, {}, [("SAMPLER", "SAMPLER")], {}, (800, 700),
             (300, 60)),
        Node(12, "BasicScheduler", {"scheduler": sched, "steps": steps, "denoise": 1.0}, {"model": (1, 0)},
             [("SIGMAS", "SIGMAS")], {"model": "MODEL"}, (800, 800), (300, 110)),
        Node(13, "EmptyLatentImage", {"width": size, "height": size, "batch_size": 4}, {},
             [("LATENT", "LATENT")], {}, (800, 950), (300, 110)),
        Node(14, "SamplerCustomAdvanced", {}, {"noise": (10, 0), "guider": (9, 0), "sampler": (11, 0),
                                               "sigmas": (12, 0), "latent_image": (13, 0)},
             [("output", "LATENT"), ("denoised_output", "LATENT")],
             {"noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER", "sigmas": "SIGMAS",
              "latent_image": "LATENT"}, (1240, 0), (300, 130)),
        vae_decode(15, (14, 0), (1, 2), (1580, 0)),
        save_image(16, (15, 0), "attention_lab_spatext", (1840, 0), (320, 320)),
        preview_image(17, (9, 1), (1240, 200), (300, 300), "Region map"),
    ]
    note = ("SpaText-style region prompts without fine-tuning: the global prompt describes the scene, each region "
            "(a MASK, here a box pasted on an empty canvas with Mask Composite) gets its own text. Pixels of a "
            "region attend to its text, others to the global prompt; cfg_global and cfg_local weigh the two "
            "conditions (equal values = plain CFG on the regional pass). Keep the objects out of the global prompt: "
            "pixels outside the regions read it, so an object it names can appear there too.")
    note += (" ShapesWorld: runs on a CPU in seconds." if shapesworld else
             " Pick your SD1.5 or SDXL checkpoint in the loader; mask sizes are in image pixels.")
    return nodes, [(note, (0, 1000))]


def flow_txt2img_graph(_shapesworld: bool = True) -> tuple[list[Node], list]:
    """ShapesWorld-Flow (the embedded Flux-class model) with stock nodes only: loader -> KSampler -> VAE Decode."""
    prompt = "a red circle and a blue square on a gray background"
    nodes = [
        Node(1, "ShapesWorldFlowLoader", {"weights": ""},
             outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100)),
        Node(2, "CLIPTextEncode", {"text": prompt}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 0), (400, 160), "Positive prompt"),
        Node(3, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (360, 200), (400, 120), "Negative prompt"),
        Node(4, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 4}, {},
             [("LATENT", "LATENT")], {}, (0, 160), (300, 110)),
        Node(5, "KSampler", {"seed": 7, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                             "denoise": 1.0},
             {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)},
             [("LATENT", "LATENT")], {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                                      "latent_image": "LATENT"}, (800, 0), (320, 270)),
        vae_decode(6, (5, 0), (1, 2), (1160, 0)),
        save_image(7, (6, 0), "attention_lab_flow", (1420, 0), (320, 320)),
    ]
    note = ("ShapesWorld-Flow: the pack's embedded rectified-flow transformer, loaded as ComfyUI's own Flux class "
            "(double- and single-stream blocks with joint text-image attention), so every Flux hook works on it. "
            "Stock nodes only: change the prompt (colours red, green, blue, yellow, purple, orange, cyan; shapes "
            "circle, square, triangle, star, diamond, cross; backgrounds gray, black, white). Pixel-space: the 256x256 "
            "empty latent gives 32x32 images; euler + simple at cfg 4 is what the model card measures "
            "(docs/shapesworld-flow.md). It draws the named colours but the named shape only about one time in "
            "four (its shape gate fails, see the model card): expect coloured blobs more often than crisp shapes. "
            "Runs on a CPU in seconds.")
    return nodes, [(note, (0, 380))]
