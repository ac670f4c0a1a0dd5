"""Make the README's example images from the bundled samples (client/samples/), with the real engine.

Run: .venv/bin/python scripts/make_docs_images.py [--max-size 384] [--iterations 200] [--out docs/images]
     [--only color_modes|masks]

Writes color_modes.jpg: content | style | the three colour modes (style, luminance, histogram), labelled;
and masks.jpg (docs/masks.md): content | the cup's mask | the table's mask | their styles | the result,
the swirls painted on the cup and saucer and the mosaic on the table (client/samples). Prints the
settings and seconds of each run, for the captions.
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
    parser.add_argument("--only", choices=("color_modes", "masks"), help="make only this picture")
    args = parser.parse_args()

    engine = Engine(default_model_path())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only != "masks":
        color_modes(engine, args)
    if args.only != "color_modes":
        masks(engine, args)
    print(f"images: {args.out}")


def load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), np.float32) / 255.0


def masks(engine: Engine, args: argparse.Namespace) -> None:
    """masks.jpg: one style on the cup and saucer, another on the table."""
    content = load(args.content)
    cup, table = load_mask(SAMPLES / "coffee_mask_cup.png"), load_mask(SAMPLES / "coffee_mask_table.png")
    swirls, mosaic = load(SAMPLES / "style_swirls.jpg"), load(SAMPLES / "style_mosaic.jpg")
    settings = StylizeSettings(max_size=args.max_size, iterations=args.iterations)
    started = time.perf_counter()
    result = engine.stylize(
        content, [StyleSource(swirls, mask=cup), StyleSource(mosaic, mask=table)], settings, SilentObserver()
    )
    print(
        f"masks: {settings.max_size} px, {result.iterations} iterations, {result.evaluations} evaluations, "
        f"loss {result.losses.total:.4g}, {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    panels = [
        ("content", to_image(content)),
        ("mask 1 (cup)", to_image(np.repeat(cup[..., None], 3, axis=2))),
        ("style 1", to_image(swirls)),
        ("mask 2 (table)", to_image(np.repeat(table[..., None], 3, axis=2))),
        ("style 2", to_image(mosaic)),
        ("result", to_image(result.image)),
    ]
    labelled_row(panels, height=160).save(args.out / "masks.jpg", quality=88)


def color_modes(engine: Engine, args: argparse.Namespace) -> None:
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

    panels = [
        ("content", to_image(content)),
        ("style", to_image(style)),
        ("color_mode style", to_image(results[ColorMode.STYLE])),
        ("color_mode luminance", to_image(results[ColorMode.LUMINANCE])),
        ("color_mode histogram", to_image(results[ColorMode.HISTOGRAM])),
    ]
    labelled_row(panels, height=200).save(args.out / "color_modes.jpg", quality=88)


if __name__ == "__main__":
    main()
