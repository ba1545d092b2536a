"""StructureDiffusion: every noun phrase's own encoding as cross-attention values (Feng et al. 2022).

Glue only: the phrase chunker, the alignment and the patch live in ``attention/structure.py`` (procedure of
weixi-feng/Structured-Diffusion-Guidance, see its header). The node encodes the prompt and each phrase with the
user's CLIP, builds the mean aligned value states and returns a patched clone of the MODEL with the prompt's
CONDITIONING: rows of the batch that carry exactly that conditioning get the structured values, everything
else (the negative, other prompts) samples as before.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention import logger
from ..attention.structure import StructuredValuePatch, aligned_values, phrase_spans
from ..attention.structure import noun_phrases as find_noun_phrases
from ..attention.words import split_word_list
from .common import CATEGORY, add_outer_sample_wrapper, encode_prompt, prompt_words

WRAPPER_KEY = "attention_lab_structure"


def structured_values(clip, prompt: str, phrases: list[str]) -> tuple[list, torch.Tensor, torch.Tensor]:
    """(the prompt's CONDITIONING, its states (m, c), the mean aligned value states (m, c))."""
    cond = encode_prompt(clip, prompt)
    full = cond[0][0][0]
    pw = prompt_words(clip, prompt)

    def occurrences(p: str):   # a phrase not in the prompt is refused, naming it and the prompt's words
        return pw.occurrences(p) or (pw.positions(p, "noun phrase"),)
    spans = phrase_spans(phrases, occurrences)
    states = [clip.encode_from_tokens(clip.tokenize(p))[0] for p in phrases]
    if any(s.shape[-1] != full.shape[-1] for s in states):
        raise ValueError(f"the CLIP encodes the phrases to width {states[0].shape[-1]} but the prompt to "
                         f"{full.shape[-1]}; use one CLIP for both")
    value = aligned_values(full.float(), [s.float() for s in states], spans).mean(0)
    return cond, full, value.to(full.dtype)


class StructureDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StructureDiffusion",
            display_name="StructureDiffusion (Noun-Phrase Values)",
            category=CATEGORY,
            description=(
                "Training-free structured guidance (Feng et al. 2022, 'Training-Free Structured Diffusion Guidance "
                "for Compositional Text-to-Image Synthesis'): each noun phrase of the prompt is also encoded on its "
                "own, and the cross-attention values of the prompt's rows become the mean of the prompt's states "
                "and, per phrase, the prompt's states with that phrase's own encoding at its tokens; keys stay the "
                "prompt's. Meant against attributes leaking between objects ('a red car and a white sheep'). "
                "Connect the MODEL and the positive CONDITIONING it outputs to your sampler."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (SD1.x, SD2.x, SDXL or ShapesWorld); "
                                                "it is cloned, yours stays as it is."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt and the phrases."),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "The positive prompt. The node outputs its CONDITIONING: sample with that one, since only "
                    "rows carrying exactly these states get the phrase values.")),
                io.String.Input("noun_phrases", default="", tooltip=(
                    "Noun phrases of the prompt, comma separated, e.g. 'a red car, a white sheep'; each must "
                    "appear in the prompt word for word (listed twice = its first two occurrences). Empty: "
                    "found automatically (chunks of 2+ words between 'and', prepositions and punctuation, plus "
                    "'A and B' coordinations; the official code uses a constituency parser).")),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A clone of the model with the phrase values."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt's CONDITIONING, exactly as "
                                                                        "CLIP Text Encode makes it."),
                io.String.Output(display_name="phrases", tooltip="The noun phrases used, separated by ' | '."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, noun_phrases) -> io.NodeOutput:
        phrases = split_word_list(noun_phrases) or find_noun_phrases(prompt)
        cond, full, value = structured_values(clip, prompt, phrases)
        patch = StructuredValuePatch(full, value)
        m = model.clone()
        m.set_model_attn2_patch(patch)

        def before():
            patch.hits = 0

        def after(ok: bool):
            if ok and phrases and patch.hits == 0:
                logger.warning("StructureDiffusion: no row of the sampled batch carried this node's prompt, so "
                               "nothing changed; connect the node's 'positive' output to the sampler (conditioning "
                               "nodes in between change the states it looks for)")
        add_outer_sample_wrapper(m, WRAPPER_KEY, before, after)
        if phrases:
            logger.info("StructureDiffusion: %d noun phrase(s): %s", len(phrases), " | ".join(phrases))
        else:
            logger.info("StructureDiffusion: no noun phrase of 2+ words in %r; the model samples as without the "
                        "node", prompt)
        return io.NodeOutput(m, cond, " | ".join(phrases))
