"""Demo section: the quality harness on held-out prompts and scenes (also writes ``figures.json``).

The same figures at full size: ``python -m attention.shapesworld.evaluate``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..shapesworld.evaluate import attention_localization, cluster_localization, generation_quality
from ..shapesworld.harness import classifier_accuracy
from ..shapesworld.model import ShapesWorldModel


def quality_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    n_prompts, n_scenes, n_cluster = (20, 12, 10) if quick else (50, 40, 20)
    gq = generation_quality(model, n_prompts)
    loc = attention_localization(model, n_scenes)
    cl = cluster_localization(model, n_cluster)
    (out / "figures.json").write_text(json.dumps({"generation": gq, "localization": loc, "clustering": cl},
                                                 indent=1))
    sizes = list(next(iter(loc["iou"].values())))
    lines = ["## Quality harness", "",
             f"* Named colours present in {gq['colour_presence']:.0%} of {gq['images']} images (gate 90%); "
             f"classifier agrees with the named shape for {gq['shape_agreement']:.0%} of {gq['objects']} objects "
             f"(gate 70%).",
             f"* Region classifier held-out accuracy: {json.dumps(classifier_accuracy())}.",
             f"* Cross-attention localization on {loc['scenes']} held-out scenes, best-threshold mean IoU "
             f"(shape word vs object mask):", "", "| maps | " + " | ".join(sizes) + " |",
             "|---" * (1 + len(sizes)) + "|"]
    for name, row in loc["iou"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['best_iou']:.3f}" for v in row.values()) + " |")
    lines += ["", f"* SelfAttnCluster masks against the ground truth on {cl['scenes']} held-out scenes (noised to "
              f"t={cl['t']}, {cl['clusters']} clusters, threshold {cl['threshold']}): mean IoU "
              f"{cl['word_mask_iou']:.3f} for the shape words' masks, {cl['background_mask_iou']:.3f} for the "
              f"background mask.",
              f"* Leakage at the coarsest resolution (share of the shape word's attention mass): "
              f"{json.dumps(loc['leakage_coarsest'])}", "", "All figures: [figures.json](figures.json).", ""]
    return lines
