"""Make the README's example images from the bundled samples (client/samples/), with the real engine.

Run: .venv/bin/python scripts/make_docs_images.py [--max-size 384] [--iterations 200] [--out docs/images]

Writes color_modes.jpg: content | style | the three colour modes (style, luminance, histogram), labelled;
and prints the settings and seconds of each run, for the captions.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stylize_service.models.paths import default_model_path
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.types import ColorMode, SilentObserver, StyleSource, StylizeSettings

SAMPLES = Path(__file__).resolve().parents[1] / "client" / "samples"
LABEL_HEIGHT = 22


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float32) / 255.0


def to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8))


def labelled_row(panels: list[tuple[str, Image.Image]], height: int) -> Image.Image:
    """The panels scaled to one height, side by side, each with its label underneath."""
    scaled = [
        (label, image.resize((round(image.width * height / image.height), height))) for label, image in panels
    ]
    gap = 6
    width = sum(image.width for _, image in scaled) + gap * (len(scaled) - 1)
    row = Image.new("RGB", (width, height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(row)
    x = 0
    for label, image in scaled:
        row.paste(image, (x, 0))
        draw.text((x + 4, height + 5), label, fill="black")
        x += image.width + gap
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--content", type=Path, default=SAMPLES / "coffee.png")
    parser.add_argument("--style", type=Path, default=SAMPLES / "style_swirls.jpg")
    parser.add_argument("--max-size", type=int, default=384)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()

    engine = Engine(default_model_path())
    content, style = load(args.content), load(args.style)
    base = StylizeSettings(max_size=args.max_size, iterations=args.iterations)
    results: dict[ColorMode, np.ndarray] = {}
    for mode in (ColorMode.STYLE, ColorMode.LUMINANCE, ColorMode.HISTOGRAM):
        settings = replace(base, color_mode=mode)
        started = time.perf_counter()
        result = engine.stylize(content, [StyleSource(style)], settings, SilentObserver())
        print(
            f"{mode.value}: {settings.max_size} px, {result.iterations} iterations, {result.evaluations} "
            f"evaluations, loss {result.losses.total:.4g}, {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        results[mode] = result.image

    args.out.mkdir(parents=True, exist_ok=True)
    panels = [
        ("content", to_image(content)),
        ("style", to_image(style)),
        ("color_mode style", to_image(results[ColorMode.STYLE])),
        ("color_mode luminance", to_image(results[ColorMode.LUMINANCE])),
        ("color_mode histogram", to_image(results[ColorMode.HISTOGRAM])),
    ]
    labelled_row(panels, height=200).save(args.out / "color_modes.jpg", quality=88)
    print(f"images: {args.out}")


if __name__ == "__main__":
    main()
