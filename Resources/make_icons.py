"""Draw the extension and module icons (128 x 128 PNG) and copy the demo preview as the screenshot.

Run from the repository root:  .venv/bin/python Resources/make_icons.py [DEMO_PREVIEW.png]

The icon is a stylised axial SPECT/CT slice: a grey body outline with lungs and spine, a hot
177Lu uptake spot in the liver region, and the two heads of a dual-head gamma camera.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
SCALE = 4  # draw at 4x and downsample: antialiased edges


def _grid(n):
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    return x / n, y / n


def draw_icon(size: int = SIZE) -> Image.Image:
    n = size * SCALE
    canvas = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    s = n / 128.0

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    # Rounded dark tile.
    draw.rounded_rectangle(box(2, 2, 126, 126), radius=22 * s, fill=(24, 28, 38, 255))
    # Gamma camera heads (dual head, 90 degrees): top and right.
    draw.rounded_rectangle(box(26, 10, 102, 20), radius=3 * s, fill=(70, 130, 200, 255))
    draw.rounded_rectangle(box(108, 36, 118, 104), radius=3 * s, fill=(70, 130, 200, 255))
    # Collimator hatching on the heads.
    for x in range(30, 100, 6):
        draw.line(box(x, 20, x, 23), fill=(150, 190, 235, 255), width=max(1, int(1.2 * s)))
    for y in range(40, 102, 6):
        draw.line(box(105, y, 108, y), fill=(150, 190, 235, 255), width=max(1, int(1.2 * s)))
    # Body (CT soft tissue), lungs, spine.
    draw.ellipse(box(10, 38, 104, 108), fill=(150, 150, 150, 255), outline=(215, 215, 215, 255), width=int(2.5 * s))
    draw.ellipse(box(22, 48, 48, 76), fill=(60, 60, 60, 255))
    draw.ellipse(box(66, 48, 92, 76), fill=(60, 60, 60, 255))
    draw.ellipse(box(50, 89, 64, 102), fill=(245, 245, 245, 255))

    # Hot spot: a Gaussian uptake coloured with a PET-like heat map, blended over the body.
    x, y = _grid(n)
    cx, cy, sigma = 40 / 128, 84 / 128, 11 / 128
    uptake = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
    cx2, cy2, sigma2 = 76 / 128, 86 / 128, 6 / 128  # a smaller second lesion
    uptake = np.maximum(uptake, 0.75 * np.exp(-((x - cx2) ** 2 + (y - cy2) ** 2) / (2 * sigma2 ** 2)))
    rgba = (colormaps["hot"](0.15 + 0.85 * uptake) * 255).astype(np.uint8)
    rgba[..., 3] = (np.clip(uptake * 1.6, 0, 1) * 255).astype(np.uint8)
    heat = Image.fromarray(rgba, "RGBA")
    body_mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(body_mask).ellipse(box(10, 38, 104, 108), fill=255)
    heat.putalpha(Image.fromarray(np.minimum(np.asarray(heat.getchannel("A")), np.asarray(body_mask))))
    glow = heat.filter(ImageFilter.GaussianBlur(3 * s))
    canvas = Image.alpha_composite(canvas, glow)
    canvas = Image.alpha_composite(canvas, heat)
    return canvas.resize((size, size), Image.LANCZOS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    icon = draw_icon()
    targets = [ROOT / "Resources" / "SelfSupervisedSPECT.png",
               ROOT / "SelfSupervisedSPECT" / "Resources" / "Icons" / "SelfSupervisedSPECT.png"]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        icon.save(target, optimize=True)
        print(f"wrote {target}")
    if argv:  # the demo's preview (image fused with CT) is the extension's screenshot
        screenshot = ROOT / "Resources" / "DemoPreview.png"
        shutil.copyfile(argv[0], screenshot)
        print(f"wrote {screenshot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
