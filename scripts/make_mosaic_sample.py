#!/usr/bin/env python3
"""Paint the second bundled style sample: a mosaic of warm tiles with dark grout, for the masks example.

Made by this project (CC0) so the demo needs no third-party artwork; deterministic (the same seed and size
give the same pixels, given the same numpy and Pillow versions).

How it paints: random seed points, jittered on a grid, split the square into Voronoi cells (each pixel
takes its nearest point); each cell gets a colour from a palette of reds, oranges and ochres with a little
shading across it; pixels whose nearest and second-nearest points are almost equally far form the grout.

    python scripts/make_mosaic_sample.py                    # writes client/samples/style_mosaic.jpg
    python scripts/make_mosaic_sample.py --size 768 -o /tmp/mosaic.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "client" / "samples" / "style_mosaic.jpg"

PALETTE = np.array(
    [(150, 32, 24), (196, 64, 30), (222, 112, 40), (236, 160, 64), (184, 120, 52), (120, 40, 36)],
    dtype=np.float64,
)
GROUT = np.array((36, 26, 22), dtype=np.float64)


def paint(size: int = 512, seed: int = 2017, cells: int = 18) -> Image.Image:
    rng = np.random.default_rng(seed)
    step = size / cells
    grid = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells)), -1).reshape(-1, 2) + 0.5) * step
    points = grid + rng.uniform(-0.38, 0.38, grid.shape) * step
    colours = PALETTE[rng.integers(0, len(PALETTE), len(points))] * rng.uniform(0.85, 1.1, (len(points), 1))
    tilt = rng.normal(0, 0.35, (len(points), 2)) / step  # each tile's shading across it

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    pixels = np.stack([xx, yy], -1).reshape(-1, 2)
    nearest = np.full(len(pixels), np.inf)
    second = np.full(len(pixels), np.inf)
    owner = np.zeros(len(pixels), np.int64)
    for index, point in enumerate(points):  # one point at a time: memory stays at a few image-sized arrays
        distance = np.hypot(*(pixels - point).T)
        closer = distance < nearest
        second = np.where(closer, nearest, np.minimum(second, distance))
        owner = np.where(closer, index, owner)
        nearest = np.where(closer, distance, nearest)
    offset = pixels - points[owner]
    shade = 1.0 + np.sum(offset * tilt[owner], axis=1)
    image = colours[owner] * shade[:, None]
    grout = (second - nearest) < 0.09 * step
    image[grout] = GROUT
    image += rng.normal(0, 6, image.shape)  # a little glaze texture
    rgb = np.clip(image, 0, 255).astype(np.uint8).reshape(size, size, 3)
    return Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(0.6))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="PNG or JPEG path to write")
    parser.add_argument("--size", type=int, default=512, help="side of the square image in pixels")
    parser.add_argument("--seed", type=int, default=2017, help="random seed")
    args = parser.parse_args(argv)
    image = paint(args.size, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output, quality=92, optimize=True)
    print(f"wrote {args.output} ({args.size}x{args.size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
