#!/usr/bin/env python3
"""Paint the bundled style sample: swirling brush strokes in deep blues and yellows.

The image is made by this project (CC0) so the demo needs no third-party artwork. It is deterministic: the
same seed and size give the same pixels (given the same numpy and Pillow versions).

How it paints: a smooth stream function psi (low-frequency noise plus a few Gaussian vortices) defines a
divergence-free flow v = (d psi/dy, -d psi/dx), the "curl" of psi. Thousands of particles are traced along
the flow and each trace is drawn as a brush stroke, in three passes from broad to fine. Stroke colours come
from a palette indexed by a second smooth field that turns yellow near the vortex centres.

    python scripts/make_style_sample.py                    # writes client/samples/style_swirls.jpg
    python scripts/make_style_sample.py --size 768 -o /tmp/style.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "client" / "samples" / "style_swirls.jpg"

# From night blue through cobalt to a pale sky, then ochre to bright yellow.
PALETTE = np.array(
    [
        (8, 18, 58),
        (16, 40, 110),
        (31, 76, 168),
        (72, 126, 214),
        (170, 206, 230),
        (226, 164, 38),
        (246, 206, 64),
        (252, 238, 150),
    ],
    dtype=np.float64,
)

# (width, length in steps, share of the canvas to cover, contrast jitter) for each pass, broad to fine.
PASSES = (
    (13, 26, 2.2, 0.10),
    (7, 22, 2.6, 0.16),
    (3, 16, 2.0, 0.24),
)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [0, 1] on a (size, size) grid, bicubically interpolated from a (cells, cells) random grid."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float64)
    return (out - out.min()) / max(float(np.ptp(out)), 1e-9)


def vortices(rng: np.random.Generator, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream function with `count` Gaussian vortices, and a [0, 1] "glow" that peaks at their centres."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    psi = np.zeros((size, size))
    glow = np.zeros((size, size))
    for _ in range(count):
        cx, cy = rng.uniform(0.12, 0.88, size=2) * size
        sigma = rng.uniform(0.07, 0.14) * size
        spin = rng.choice((-1.0, 1.0)) * rng.uniform(0.8, 1.2)
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * sigma**2))
        psi += spin * sigma * bump
        glow = np.maximum(glow, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * (0.55 * sigma) ** 2)))
    return psi, glow


def flow_field(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit flow vectors (size, size, 2) as (dx, dy), and the colour field in [0, 1]."""
    psi_v, glow = vortices(rng, size, count=5)
    psi = 0.35 * size * (smooth_noise(rng, size, 4) + 0.4 * smooth_noise(rng, size, 9)) + 1.6 * psi_v
    dpsi_dy, dpsi_dx = np.gradient(psi)
    flow = np.stack([dpsi_dy, -dpsi_dx], axis=-1)
    flow /= np.linalg.norm(flow, axis=-1, keepdims=True) + 1e-9
    base = 0.55 * smooth_noise(rng, size, 5) + 0.1 * smooth_noise(rng, size, 16)
    colour = np.clip(base + 0.75 * glow, 0.0, 1.0)
    return flow, colour


def palette_colour(t: float, jitter: float) -> tuple[int, int, int]:
    pos = t * (len(PALETTE) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(PALETTE) - 1)
    rgb = PALETTE[lo] + (pos - lo) * (PALETTE[hi] - PALETTE[lo])
    rgb = rgb * (1.0 + jitter)
    r, g, b = np.clip(rgb, 0, 255).astype(int)
    return int(r), int(g), int(b)


def trace(flow: np.ndarray, starts: np.ndarray, steps: int, step_len: float) -> np.ndarray:
    """Particle paths (n, steps + 1, 2) following the flow from `starts` (n, 2) given as (x, y)."""
    size = flow.shape[0]
    paths = np.empty((len(starts), steps + 1, 2))
    pos = starts.astype(np.float64).copy()
    paths[:, 0] = pos
    for k in range(1, steps + 1):
        ix = np.clip(pos[:, 0].astype(int), 0, size - 1)
        iy = np.clip(pos[:, 1].astype(int), 0, size - 1)
        pos = pos + step_len * flow[iy, ix]
        paths[:, k] = pos
    return paths


def paint(size: int = 512, seed: int = 1508) -> Image.Image:
    rng = np.random.default_rng(seed)
    flow, colour = flow_field(rng, size)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in PALETTE[1]))
    draw = ImageDraw.Draw(canvas)
    margin = 0.1 * size
    for width, steps, coverage, contrast in PASSES:
        count = int(coverage * size * size / (width * steps * 1.5))
        starts = rng.uniform(-margin, size + margin, size=(count, 2))
        paths = trace(flow, starts, steps, step_len=1.5)
        jitters = rng.normal(0.0, contrast, size=count)
        shifts = rng.normal(0.0, 0.06, size=count)
        for path, jitter, shift in zip(paths, jitters, shifts, strict=True):
            x0 = int(np.clip(path[0, 0], 0, size - 1))
            y0 = int(np.clip(path[0, 1], 0, size - 1))
            t = float(np.clip(colour[y0, x0] + shift, 0.0, 1.0))
            points = [(float(x), float(y)) for x, y in path]
            draw.line(points, fill=palette_colour(t, jitter), width=width, joint="curve")
            # A thin lighter streak along each stroke, as a loaded brush leaves.
            if width >= 3:
                draw.line(points, fill=palette_colour(t, jitter + 0.25), width=max(1, width // 4))
    return canvas.filter(ImageFilter.SMOOTH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="PNG or JPEG path to write")
    parser.add_argument("--size", type=int, default=512, help="side of the square image in pixels")
    parser.add_argument("--seed", type=int, default=1508, help="random seed")
    args = parser.parse_args(argv)
    image = paint(args.size, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix.lower() in (".jpg", ".jpeg"):
        image.save(args.output, quality=90, optimize=True)
    else:
        image.save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
