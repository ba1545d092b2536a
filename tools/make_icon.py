"""Draw the pack's registry icon, assets/icon.png (256x256): a red circle and a blue square, as in the
ShapesWorld demos, under a warm cross-attention glow on the circle.

    python tools/make_icon.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "assets" / "icon.png"


def main(size: int = 256):
    big = size * 4                                   # drawn large, scaled down for smooth edges
    yy, xx = np.mgrid[0:big, 0:big] / big
    glow = np.exp(-((xx - 0.36) ** 2 + (yy - 0.58) ** 2) / (2 * 0.16 ** 2))       # the word "circle" attending
    base = np.stack([0.13 + 0.75 * glow, 0.13 + 0.38 * glow ** 2, 0.16 + 0.05 * glow], -1)
    img = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = 0.17 * big
    cx, cy = 0.36 * big, 0.58 * big
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(225, 40, 40))
    d.rectangle([0.56 * big, 0.16 * big, 0.86 * big, 0.46 * big], fill=(40, 90, 225))
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, big - 1, big - 1], radius=big // 8, fill=255)
    img.putalpha(mask.filter(ImageFilter.GaussianBlur(2)))
    img.resize((size, size), Image.LANCZOS).save(OUT, optimize=True)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
