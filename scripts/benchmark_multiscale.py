"""Single-scale against coarse-to-fine (multiscale) optimisation: wall time and final full-resolution loss.

Run: .venv/bin/python scripts/benchmark_multiscale.py [--sizes 512 1024] [--iterations 300 100] [--out out/multiscale]

Both runs start from the content image (init content) with the default loss, in the same process on the same
machine. The final loss of each is the loss of its final image at full resolution. The images are written
side by side (single | multiscale | multiscale with equal time) into --out. Defaults read the Tübingen / Starry Night pair from
../shared/images beside the checkout.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from stylize_service.models.paths import default_model_path
from stylize_service.server.engine.engine import Engine, stage_iterations, stage_sizes
from stylize_service.server.engine.types import (
    Init,
    SilentObserver,
    StyleSource,
    StylizeResult,
    StylizeSettings,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "images"


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def equal_time_iterations(iterations: int, min_size: int, size: int) -> int:
    """Total multiscale iterations whose cost, counted in full-size iterations, is `iterations`."""
    total = iterations
    for _ in range(20):
        sizes = stage_sizes(min_size, size)
        cost = sum(
            n * (s / size) ** 2 for s, n in zip(sizes, stage_iterations(total, len(sizes)), strict=True)
        )
        total = max(1, round(total * iterations / cost))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--content", type=Path, default=SHARED / "tubingen.jpg")
    parser.add_argument("--style", type=Path, default=SHARED / "starry_night.jpg")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--iterations", type=int, nargs="+", default=[300, 100], help="one per size")
    parser.add_argument("--min-divisor", type=int, default=4, help="multiscale min_size = size / this")
    parser.add_argument("--out", type=Path, default=Path("out/multiscale"))
    args = parser.parse_args()

    engine = Engine(default_model_path())
    content, style = load(args.content), [StyleSource(load(args.style))]
    args.out.mkdir(parents=True, exist_ok=True)
    print("| size | run | iterations | schedule | seconds | final loss | loss vs single | time vs single |")
    print("|---|---|---|---|---|---|---|---|")
    for size, iterations in zip(args.sizes, args.iterations, strict=True):
        base = StylizeSettings(max_size=size, iterations=iterations, init=Init.CONTENT)
        min_size = size // args.min_divisor
        runs = {
            "single": replace(base, min_size=size),
            "multiscale": replace(base, min_size=min_size),
            "multiscale, equal time": replace(
                base, min_size=min_size, iterations=equal_time_iterations(iterations, min_size, size)
            ),
        }
        results: dict[str, tuple[float, StylizeResult]] = {}
        for name, settings in runs.items():
            started = time.perf_counter()
            result = engine.stylize(content, style, settings, SilentObserver())
            results[name] = (time.perf_counter() - started, result)
            sizes = stage_sizes(settings.min_size or size, size)
            schedule = " → ".join(
                f"{s}px: {n} it"
                for s, n in zip(sizes, stage_iterations(settings.iterations, len(sizes)), strict=True)
            )
            seconds, loss = results[name][0], result.losses.total
            single_seconds, single_loss = results["single"][0], results["single"][1].losses.total
            print(
                f"| {size} | {name} | {settings.iterations} | {schedule} | {seconds:.0f} | {loss:.4g} | "
                f"{loss / single_loss:.3f} | {seconds / single_seconds:.2f} |",
                flush=True,
            )
        pair = np.concatenate([r.image for _, r in results.values()], axis=1)
        Image.fromarray((pair * 255 + 0.5).astype(np.uint8)).save(
            args.out / f"single_vs_multiscale_{size}.jpg", quality=92
        )
    print(f"\nimages: {args.out}")


if __name__ == "__main__":
    main()
