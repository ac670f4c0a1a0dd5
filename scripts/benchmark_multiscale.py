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
from stylize_service.server.engine import pyramid
from stylize_service.server.engine.engine import Engine
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


def stages(content: np.ndarray, settings: StylizeSettings) -> list[pyramid.Stage]:
    """The engine's own plan for these settings (default layers: relu5_1 is the deepest)."""
    size = (content.shape[1], content.shape[0])
    return pyramid.plan(
        size,
        settings.max_size,
        settings.min_size,
        settings.iterations,
        min_short_side=16,
        deepest_layer="relu5_1",
    )


def equal_time_iterations(content: np.ndarray, settings: StylizeSettings, iterations: int) -> int:
    """Total multiscale iterations whose cost, by the pyramid's cost model, is `iterations` full-size ones."""
    total = iterations
    for _ in range(20):
        cost = pyramid.cost_in_final_iterations(stages(content, replace(settings, iterations=total)))
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
        # tolerance 0: the iteration counts compared are run in full.
        base = StylizeSettings(max_size=size, iterations=iterations, init=Init.CONTENT, tolerance=0.0)
        min_size = size // args.min_divisor
        runs = {
            "single": replace(base, min_size=size),
            "multiscale": replace(base, min_size=min_size),
            "multiscale, equal time": replace(
                base,
                min_size=min_size,
                iterations=equal_time_iterations(content, replace(base, min_size=min_size), iterations),
            ),
        }
        results: dict[str, tuple[float, StylizeResult]] = {}
        for name, settings in runs.items():
            started = time.perf_counter()
            result = engine.stylize(content, style, settings, SilentObserver())
            results[name] = (time.perf_counter() - started, result)
            schedule = " → ".join(f"{s.longest}px: {s.iterations} it" for s in stages(content, settings))
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
