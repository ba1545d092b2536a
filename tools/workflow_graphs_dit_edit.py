"""Workflow graphs of Prompt-to-Prompt on DiT models (issue 29): ShapesWorld-Flow, the embedded Flux-class model
that runs on a CPU (the same graph works on Flux and SD3 with their loaders). One function per graph:
(nodes, notes).
"""

from __future__ import annotations

from workflow_format import Node, mask_to_image, preview_image, save_image, vae_decode

FLOW_SOURCE = "a red circle and a blue square on a gray background"
FLOW_TARGETS = ("a green circle and a blue square on a gray background\n"
                "a yellow circle and a blue square on a gray background")


def p2p_flow_graph(_shapesworld: bool = True) -> tuple[list[Node], list]:
    """ShapesWorld-Flow Loader -> P2P Edit Sampler (a colour swap from a seed, LocalBlend on the swapped words)
    -> VAE Decode -> Save Image, and the LocalBlend masks."""
    widgets = {"source_prompt": FLOW_SOURCE, "target_prompts": FLOW_TARGETS, "edit": "auto", "seed": 3,
               "steps": 20, "cfg": 4.0, "scheduler": "simple", "cross_replace_steps": 0.8,
               "cross_replace_words": "", "self_replace_steps": 0.4, "reweight": "",
               "blend_words": "red, green, yellow", "blend_threshold": 0.3, "blend_start": 0.2}
    nodes = [
        Node(1, "ShapesWorldFlowLoader", {"weights": ""},
             outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], pos=(0, 0), size=(300, 100)),
        Node(2, "CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, [("CONDITIONING", "CONDITIONING")],
             {"clip": "CLIP"}, (0, 160), (300, 120), "Negative prompt"),
        Node(3, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, {},
             [("LATENT", "LATENT")], {}, (0, 330), (300, 110)),
        Node(4, "P2PEditSampler", widgets,
             {"model": (1, 0), "clip": (1, 1), "negative": (2, 0), "latent_image": (3, 0)},
             [("latents", "LATENT"), ("blend_mask", "MASK")],
             {"model": "MODEL", "clip": "CLIP", "negative": "CONDITIONING", "latent_image": "LATENT"},
             (360, 0), (400, 640)),
        vae_decode(5, (4, 0), (1, 2), (800, 0)),
        save_image(6, (5, 0), "attention_lab_flow_p2p", (1060, 0), (420, 300),
                   "Source, then one image per target prompt"),
        mask_to_image(7, (4, 1), (800, 360)),
        preview_image(8, (7, 0), (1060, 360), (420, 260), "LocalBlend masks (white = may change)"),
    ]
    note = ("Prompt-to-Prompt on ShapesWorld-Flow, the pack's embedded rectified-flow transformer loaded as ComfyUI's "
            "own Flux class: the same node edits Flux and SD3 (connect their loaders). On a DiT the edit works on "
            "each block's joint attention: the image->text part takes the source's (word swap / refine / reweight), "
            "the image->image part is the source's for the first 'self_replace_steps', and the edited rows are "
            "scaled back to sum 1 (docs/dit-editing.md). A colour swap, because this small model draws the named "
            "colour every time but the named shape only a quarter of the time. Expected: the first image is the "
            "plain generation, the circle turns green, then yellow, the square and background stay (LocalBlend on "
            "the colour words). Flux dev: cfg 1 with FluxGuidance on the conditioning. Runs on a CPU in seconds.")
    return nodes, [(note, (0, 700))]
