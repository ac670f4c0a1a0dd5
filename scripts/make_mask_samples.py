#!/usr/bin/env python3
"""Draw the bundled masks for the coffee sample (client/samples/coffee.png, 512x341): the cup and saucer,
and the table around them, for the masks example (docs/masks.md).

Made by this project (CC0), deterministic. The cup and saucer are the union of three ellipses fitted by
hand to the photograph (the saucer, the cup, the spoon's handle) with a soft edge a few pixels wide; the
table mask is its complement, so the two cover every pixel once.

    python scripts/make_mask_samples.py       # writes client/samples/coffee_mask_cup.png and coffee_mask_table.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "client" / "samples"
SIZE = (512, 341)  # coffee.png's
# (centre x, centre y, radius x, radius y), px: the saucer, the cup above it, the spoon's handle.
ELLIPSES = ((237.0, 198.0, 174.0, 132.0), (248.0, 100.0, 104.0, 90.0), (346.0, 112.0, 18.0, 58.0))
SOFT = 4.0  # px of the edge's ramp from white to black


def cup_mask(size: tuple[int, int] = SIZE) -> np.ndarray:
    """float (H, W) in [0, 1]: 1 inside the ellipses, 0 outside, a linear ramp SOFT px wide between."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    mask = np.zeros((height, width))
    for cx, cy, rx, ry in ELLIPSES:
        radius = np.hypot((xx - cx) / rx, (yy - cy) / ry)  # 1 on the outline
        outside = (radius - 1.0) * min(rx, ry)  # about the distance in px beyond the outline
        mask = np.maximum(mask, np.clip(0.5 - outside / SOFT, 0.0, 1.0))
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLES)
    args = parser.parse_args(argv)
    cup = cup_mask()
    for name, mask in (("coffee_mask_cup.png", cup), ("coffee_mask_table.png", 1.0 - cup)):
        path = args.out / name
        Image.fromarray((mask * 255 + 0.5).astype(np.uint8), mode="L").save(path, optimize=True)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
