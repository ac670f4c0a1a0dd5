"""Does each masked region take its own style? The Gram matrices of a two-region result, measured.

Run: .venv/bin/python scripts/measure_masks.py --content tubingen.jpg --left starry_night.jpg
     [--right client/samples/style_swirls.jpg] [--size 256] [--iterations 150] [--save result.png]

The content is stylized at --size px (longest side, one stage, from the content) with the left style
masked to the left half and the right style masked to the right half (default settings otherwise). Then,
at relu1_1, relu2_1 and relu3_1, each half's Gram matrix (the guided Gram of the result with that half's
mask, as the loss computes it) is compared with the two styles' Gram matrices (each style image scaled
as the job scales it): the ratio is ||G_half - A_own|| / ||G_half - A_other|| (Frobenius), well under 1
when the half took its own style. The same ratios of the unstylized content are printed beside them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.guides import guide_maps
from stylize_service.server.engine.network import FeatureNetwork
from stylize_service.server.engine.pyramid import style_longest
from stylize_service.server.engine.resample import resize_longest
from stylize_service.server.engine.types import SilentObserver, StyleSource, StylizeSettings

SAMPLES = Path(__file__).resolve().parents[1] / "client" / "samples"
LAYERS = ("relu1_1", "relu2_1", "relu3_1")


def load(path: Path, longest: int | None = None) -> np.ndarray:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), np.float32) / 255.0
    return rgb if longest is None else resize_longest(rgb, longest)


def halves(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((height, width), np.float32)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


def grams(network: FeatureNetwork, rgb: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The (guided, where a mask is given) Gram matrices of an image at LAYERS, float64."""
    compiled = network.compiled(LayerChoice.of({"content": (), "style": LAYERS}, guides=1))
    guides = None if mask is None else guide_maps([mask], LAYERS)
    targets = compiled.targets(network.to_network(rgb), guides).by_term["style"]
    return {layer: targets[layer][0].astype(np.float64) for layer in LAYERS}


def ratios(
    network: FeatureNetwork, image: np.ndarray, masks: tuple[np.ndarray, np.ndarray], styles: list[dict]
) -> dict[str, list[float]]:
    """{half: [ratio at each layer]}: distance to its own style's Gram over distance to the other's."""
    out = {}
    for index, (name, mask) in enumerate(zip(("left", "right"), masks, strict=True)):
        half = grams(network, image, mask)
        own, other = styles[index], styles[1 - index]
        out[name] = [
            float(np.linalg.norm(half[layer] - own[layer]) / np.linalg.norm(half[layer] - other[layer]))
            for layer in LAYERS
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--content", type=Path, required=True)
    parser.add_argument("--left", type=Path, required=True, help="the style of the left half")
    parser.add_argument("--right", type=Path, default=SAMPLES / "style_swirls.jpg")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--save", type=Path, help="write the result here")
    args = parser.parse_args()

    content = load(args.content, args.size)
    height, width = content.shape[:2]
    masks = halves(height, width)
    left, right = load(args.left), load(args.right)
    settings = StylizeSettings(
        max_size=args.size, min_size=args.size, iterations=args.iterations, tolerance=0.0
    )
    engine = Engine(default_model_path())
    started = time.perf_counter()
    result = engine.stylize(
        content,
        [StyleSource(left, 1.0, mask=masks[0]), StyleSource(right, 1.0, mask=masks[1])],
        settings,
        SilentObserver(),
    )
    seconds = time.perf_counter() - started
    if args.save:
        Image.fromarray((np.clip(result.image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(args.save)

    network = FeatureNetwork(default_model_path())
    side = style_longest(args.size, settings.style_scale)
    styles = [grams(network, resize_longest(style, side), None) for style in (left, right)]
    before = ratios(network, content, masks, styles)
    after = ratios(network, result.image, masks, styles)
    print(
        f"{width}x{height}, {result.iterations} iterations ({result.evaluations} evaluations) in {seconds:.0f} s; "
        f"left: {args.left.name}, right: {args.right.name}"
    )
    print("ratio = ||G_half - A_own|| / ||G_half - A_other||, result (content before stylizing)")
    print(f"{'half':<6} " + " ".join(f"{layer:>18}" for layer in LAYERS))
    for half in ("left", "right"):
        cells = " ".join(f"{a:>8.3f} ({b:>6.3f})  " for a, b in zip(after[half], before[half], strict=True))
        print(f"{half:<6} {cells}")


if __name__ == "__main__":
    main()
