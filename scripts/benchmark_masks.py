"""Seconds per loss+gradient evaluation of a masked job against an unmasked one with the same styles.

Run: .venv/bin/python scripts/benchmark_masks.py [--sizes 256x192 512x384] [--repeats 7] [--styles 2]
     [--tile 0]

Both jobs have the default layers (content relu4_2; style relu1_1..relu5_1) and `--styles` style images.
The unmasked job blends them into one Gram target per layer (the plain graphs); the masked job gives each
its own mask, vertical strips that split the picture, so that its loss has one guided Gram matrix per
style and layer (models.terms.GuidedStyleTerm). Evaluations of the two alternate, after one warm-up each,
and the medians are printed with their ratio (masked / unmasked). --tile evaluates both in exact tiles
of that many px (server.engine.tiling, the first three blocks tiled one at a time) instead of whole.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.models.terms import guide_input
from stylize_service.server.engine.guides import Guide, blend_guided, guide_maps, guide_weights
from stylize_service.server.engine.network import Evaluation, FeatureNetwork, Targets
from stylize_service.server.engine.tile_layout import TileScheme
from stylize_service.server.engine.tiling import TiledEvaluator

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
WEIGHTS = {"content": 5.0, "style": 100.0, "tv": 1e-3}
LAYER_WEIGHTS = {"content": {"relu4_2": 1.0}, "style": dict.fromkeys(STYLE_LAYERS, 1.0)}


def strips(count: int, height: int, width: int) -> list[np.ndarray]:
    masks = []
    for index in range(count):
        mask = np.zeros((height, width), np.float32)
        mask[:, index * width // count : (index + 1) * width // count] = 1.0
        masks.append(mask)
    return masks


def evaluators(
    network: FeatureNetwork, height: int, width: int, styles: int, tile: int
) -> tuple[Callable[[np.ndarray], Evaluation], Callable[[np.ndarray], Evaluation]]:
    """The unmasked and the masked job's loss functions at height x width."""
    rng = np.random.default_rng(0)
    content = rng.uniform(-110, 140, (1, 3, height, width)).astype(np.float32)
    images = [rng.uniform(-110, 140, (1, 3, height, width)).astype(np.float32) for _ in range(styles)]
    blend = np.full(styles, 1.0 / styles)

    plain = LayerChoice.of({"content": CONTENT_LAYERS, "style": STYLE_LAYERS})
    compiled = network.compiled(plain)
    content_targets = compiled.targets(content).by_term["content"]
    grams = [compiled.targets(image).by_term["style"] for image in images]
    blended = {
        layer: sum(np.float32(w) * g[layer] for w, g in zip(blend, grams, strict=True))
        for layer in STYLE_LAYERS
    }
    plain_targets = Targets({"content": content_targets, "style": blended})

    guided = LayerChoice.of({"content": CONTENT_LAYERS, "style": STYLE_LAYERS}, guides=styles)
    masks = strips(styles, height, width)
    spatial = guide_maps(masks, STYLE_LAYERS)
    guides = [Guide((index,), mask) for index, mask in enumerate(masks)]
    stacked = {
        layer: blend_guided(guides, blend, [g[layer][None] for g in grams], spatial[guide_input(layer)])
        for layer in STYLE_LAYERS
    }
    masked_targets = Targets(
        {"content": content_targets, "style": stacked}, spatial, guide_weights(masks, list(blend))
    )
    if tile:
        plain_eval = TiledEvaluator(network.tile_sessions(plain), TileScheme.by_block(tile, 3)).evaluator(
            plain_targets, WEIGHTS, LAYER_WEIGHTS
        )
        masked_eval = TiledEvaluator(network.tile_sessions(guided), TileScheme.by_block(tile, 3)).evaluator(
            masked_targets, WEIGHTS, LAYER_WEIGHTS
        )
        return plain_eval, masked_eval
    masked_compiled = network.compiled(guided)
    plain_feeds = compiled.feeds(plain_targets, WEIGHTS, LAYER_WEIGHTS)
    masked_feeds = masked_compiled.feeds(masked_targets, WEIGHTS, LAYER_WEIGHTS)
    return (
        lambda x: compiled.evaluate(x, plain_feeds),
        lambda x: masked_compiled.evaluate(x, masked_feeds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256x192", "512x384"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--styles", type=int, default=2)
    parser.add_argument("--tile", type=int, default=0)
    args = parser.parse_args()
    network = FeatureNetwork(default_model_path())
    print(f"styles={args.styles} tile={args.tile or 'none'} repeats={args.repeats} (median seconds)")
    print(f"{'size':>10} {'unmasked':>10} {'masked':>10} {'ratio':>7}")
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        plain, masked = evaluators(network, height, width, args.styles, args.tile)
        x = np.random.default_rng(1).uniform(-110, 140, (1, 3, height, width)).astype(np.float32)
        plain(x), masked(x)  # warm-up: first runs allocate the arenas
        times: dict[str, list[float]] = {"plain": [], "masked": []}
        for _ in range(args.repeats):
            for name, evaluate in (("plain", plain), ("masked", masked)):
                started = time.perf_counter()
                evaluate(x)
                times[name].append(time.perf_counter() - started)
        plain_s, masked_s = statistics.median(times["plain"]), statistics.median(times["masked"])
        print(f"{size:>10} {plain_s:>10.3f} {masked_s:>10.3f} {masked_s / plain_s:>7.3f}")


if __name__ == "__main__":
    main()
