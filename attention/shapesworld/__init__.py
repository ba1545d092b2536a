"""ShapesWorld: a synthetic world of coloured shapes with exact masks, a tiny
text-to-image model trained on it, and the quality harness built on its ground truth."""
