#!/usr/bin/env python3
"""Measure the figures behind three of the server's bounds (issue 11's resource controls).

    .venv/bin/python scripts/measure_bounds.py cache     # memory of a compiled layer choice vs its estimate
    .venv/bin/python scripts/measure_bounds.py weights   # largest losses per unit weight (the weight bound)
    .venv/bin/python scripts/measure_bounds.py frames    # server CPU vs worker time with huge PNG frames

cache: for choices whose deepest layer goes from relu2_1 to relu5_3, each in a fresh process, the resident
memory a compile and one 32 px evaluation add, against the bytes of the two graphs' weights (initializers)
and the estimate the graph cache charges (server/engine/network.py, estimated_session_bytes).

weights: every content and style layer at weight 1 over pairs of extreme 64 px images (black, white, noise,
binary noise, checkerboard, stripes): the largest per-layer loss and gradient element, and what the weight
bound (server/engine/validation.py, MAX_WEIGHT) leaves of float32's range.

frames: starts stylize-server (concurrency 1) and runs 5 jobs at once at max_size 32 with a PNG frame every
iteration at frame_max_size 4096: the server's CPU seconds against the seconds its worker was busy (the jobs'
`ran=` in its log). Frames are encoded by the job's worker, so the CPU stays within what the worker may use
(its onnxruntime threads). Measured with this command: 33.3 s of CPU for 32.4 s of worker time; the code
before, which encoded frames on the handler threads, used 33.0 s of CPU for 3.0 s of worker time.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from stylize_service.server import procfs

ROOT = Path(__file__).resolve().parent.parent
CACHE_LAYERS = ("relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1", "relu5_3")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def rss() -> int:
    return procfs.status_value("self", "VmRSS")


def network(model: Path | None):
    from stylize_service.models.paths import default_model_path
    from stylize_service.server.engine.network import FeatureNetwork

    return FeatureNetwork(model or default_model_path(), intra_op_threads=2)


# --- cache ---------------------------------------------------------------------------------------


def cache_one(layer: str, model: Path | None) -> dict[str, float]:
    """In this (fresh) process: compile one choice, evaluate it once at 32 px, measure what RSS grew by."""
    from stylize_service.models import graphs
    from stylize_service.models.layers import LayerChoice
    from stylize_service.server.engine.network import estimated_session_bytes, initializer_bytes

    net = network(model)
    choice = LayerChoice.of({"content": [layer], "style": ["relu1_1"]})
    targets, loss = (
        graphs.build_targets_model(net._features, choice),
        graphs.build_loss_model(net._features, choice),
    )
    weights = initializer_bytes(targets) + initializer_bytes(loss)
    estimate = estimated_session_bytes(targets, loss)
    del targets, loss
    gc.collect()
    before = rss()
    compiled = net.compiled(choice)
    x = net.to_network(np.random.default_rng(0).random((32, 32, 3)).astype(np.float32))
    feeds = compiled.feeds(
        compiled.targets(x),
        {"content": 1.0, "style": 1.0, "tv": 1.0},
        {"content": {layer: 1.0}, "style": {"relu1_1": 1.0}},
    )
    compiled.evaluate(x, feeds)
    gc.collect()
    return {"weights": weights, "grown": rss() - before, "estimate": estimate}


def measure_cache(model: Path | None) -> int:
    print("| deepest layer | weights (MB) | RSS growth (MB) | growth / weights | estimate (MB) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for layer in CACHE_LAYERS:
        command = [sys.executable, __file__, "cache-one", layer, *(["--model", str(model)] if model else [])]
        figures = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        ratio = figures["grown"] / figures["weights"]
        worst = max(worst, figures["grown"] / figures["estimate"])
        print(
            f"| {layer} | {figures['weights'] / 1e6:.1f} | {figures['grown'] / 1e6:.1f} | {ratio:.2f} | "
            f"{figures['estimate'] / 1e6:.1f} |"
        )
    print(f"largest measured growth / estimate: {worst:.2f} (at most 1: the estimate does not undercount)")
    return 0


# --- weights -------------------------------------------------------------------------------------


def extreme_images(size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    stripes = (np.arange(size) % 2)[None, :].repeat(size, 0).astype(np.float32)
    return {
        "black": np.zeros((size, size, 3), np.float32),
        "white": np.ones((size, size, 3), np.float32),
        "noise": rng.random((size, size, 3)).astype(np.float32),
        "binary noise": (rng.random((size, size, 3)) > 0.5).astype(np.float32),
        "checkerboard": (np.indices((size, size)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, 2),
        "red/cyan stripes": np.stack([stripes, 1 - stripes, 1 - stripes], -1),
    }


def measure_weights(model: Path | None) -> int:
    from stylize_service.models.layers import LayerChoice
    from stylize_service.server.engine.validation import MAX_WEIGHT

    net = network(model)
    layers = list(net.layers)
    compiled = net.compiled(LayerChoice.of({"content": layers, "style": layers}))
    unit = {"content": 1.0, "style": 1.0, "tv": 1.0}
    per_layer = {"content": dict.fromkeys(layers, 1.0), "style": dict.fromkeys(layers, 1.0)}
    images = extreme_images()
    worst: dict[tuple[str, str], float] = {}
    for target in images.values():
        targets = compiled.targets(net.to_network(target))
        feeds = compiled.feeds(targets, unit, per_layer)
        for image in images.values():
            evaluation = compiled.evaluate(net.to_network(image), feeds)
            for term in ("content", "style"):
                for layer, value in evaluation.per_layer[term].items():
                    worst[(term, layer)] = max(worst.get((term, layer), 0.0), value)
            worst[("tv", "64 px")] = max(worst.get(("tv", "64 px"), 0.0), evaluation.terms["tv"])
            worst[("gradient", "any element")] = max(
                worst.get(("gradient", "any element"), 0.0), float(np.abs(evaluation.grad).max())
            )
    print("| term | layer | largest value at weight 1 |")
    print("|---|---|---|")
    for (term, layer), value in worst.items():
        print(f"| {term} | {layer} | {value:.3g} |")
    layered = sum(v for (term, _), v in worst.items() if term in ("content", "style"))
    # tv is a sum over pixels: scale the 64 px figure to a 4096 px square.
    tv_4096 = worst[("tv", "64 px")] * (4096 / 63) ** 2
    largest = MAX_WEIGHT**2 * layered + MAX_WEIGHT * tv_4096
    print(f"every layer of both terms at MAX_WEIGHT = {MAX_WEIGHT:g} (term and layer weights): {largest:.3g}")
    print(f"float32's largest value: {FLOAT32_MAX:.3g}; margin {FLOAT32_MAX / largest:.3g}x")
    return 0 if largest < FLOAT32_MAX else 1


# --- frames --------------------------------------------------------------------------------------


def measure_frames(jobs: int, iterations: int) -> int:
    import grpc

    from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
    from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc

    sys.path.insert(0, str(ROOT / "scripts"))
    from loadtest import ServerProcess, tiny_images

    server = ServerProcess(
        ["--concurrency", "1", "--queue-size", str(jobs), "--max-jobs-per-client", str(jobs)]
    )
    try:
        server.wait_serving()
        content, style = tiny_images(3)
        request = pb.StylizeRequest(
            content_image=content,
            styles=[pb.StyleImage(image=style)],
            options=pb.StylizeOptions(
                max_size=32,
                iterations=iterations,
                frame_every=1,
                frame_max_size=4096,
                frame_format=pb.IMAGE_FORMAT_PNG,
            ),
        )
        frames = [0] * jobs

        def run(index: int) -> None:
            limit = 256 * 2**20
            options = [("grpc.max_receive_message_length", limit)]
            with grpc.insecure_channel(server.address, options=options) as channel:
                for response in pb_grpc.StyleTransferStub(channel).Stylize(request, timeout=600):
                    frames[index] += response.HasField("frame")

        cpu_before = server.cpu_seconds()
        started = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        cpu = server.cpu_seconds() - cpu_before
    finally:
        server.stop()
    ran = sum(
        float(m.group(1)) for line in server.lines if (m := re.search(r" job \d+ .* ran=([\d.]+)s", line))
    )
    print(
        f"{jobs} jobs at max_size 32, {iterations} iterations, a 4096 px PNG frame every iteration "
        f"({sum(frames)} frames received), concurrency 1"
    )
    print(
        f"server CPU {cpu:.1f} s, worker busy {ran:.1f} s (CPU / worker time {cpu / ran:.2f}), wall {wall:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the feature network (default: the built one)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("cache", help="memory of a compiled layer choice against its estimate")
    one = commands.add_parser("cache-one", help=argparse.SUPPRESS)
    one.add_argument("layer")
    commands.add_parser("weights", help="largest losses per unit weight on extreme images")
    frames = commands.add_parser("frames", help="server CPU against worker time with huge PNG frames")
    frames.add_argument("--jobs", type=int, default=5)
    frames.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "cache":
        return measure_cache(args.model)
    if args.command == "cache-one":
        print(json.dumps(cache_one(args.layer, args.model)))
        return 0
    if args.command == "weights":
        return measure_weights(args.model)
    return measure_frames(args.jobs, args.iterations)


if __name__ == "__main__":
    raise SystemExit(main())
