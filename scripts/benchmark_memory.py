"""Peak memory of one stylization: predicted by the memory model against measured, with and without tiles.

Run: .venv/bin/python scripts/benchmark_memory.py [--sizes 512 1024 2048 4096] [--budgets-mb 0 3000]

Each row runs in a fresh process: the engine is loaded and warmed up as the server does, its resident
memory is the idle baseline, then one single-stage job (min_size = max_size, 1 iteration, init content) of
the Tübingen photograph in the style of The Starry Night runs with the tiles that server.engine.memory plans
for the budget (0 = the default budget: the container's or machine's memory less 10%). Measured peak is the
process's maximum resident set size; predicted is idle + the plan's peak. A job that fits at no tile size
is refused, as the server refuses it.

With --server SIZE (and --server-limit-mb, default 3000), one such job goes through the RPC instead: a
real `stylize-server --memory-limit-mb LIMIT` process runs it, and its peak resident memory (VmHWM) and
its resident memory 15 s after the Result are read from /proc. --content, --style, --style-scale,
--iterations and --min-size (0 = the server's default pyramid) change the job; the planned peak is read
from the server's log line of the job (memory=, tiles=, style_tiles=), or the refusal is printed.

With --targets SIZE [SIZE ...] (and --targets-schemes, default 0 256:whole 512:whole 256:3), one style target
pass of The Starry Night at SIZE px (its longest side) is measured in a fresh process per row: untiled (0),
as Engine._targets runs it, or in a tile scheme (TILE:whole, the whole network as one segment, or
TILE:BLOCKS, the first BLOCKS blocks tiled one at a time), as TiledEvaluator's forward pass runs it. The
style is held decoded at twice the pass size, so that the pass also resizes it, as every stage but a
single-stage job's does. Its peak is read after resetting the process's high-water mark once the network
is ready; "sessions" is what building the tile sessions added.

With --schemes SCHEME [SCHEME ...] (and --schemes-size, default 1024), one loss-and-gradient evaluation of
Tübingen per scheme (and untiled), each in a fresh process after its targets passes: its peak above that,
server.engine.memory's prediction of it, and its time beside the untiled one's. --tile-sizes forces tile
sizes on the jobs of the main table (0: as planned).

With --torch, the same loss and gradient in PyTorch eager (one evaluation, in its own process; `pip install
torch==2.13.0`) and our one untiled evaluation (also in its own process) are measured side by side; that
compares the evaluations alone, without L-BFGS-B's state, which the two would share.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the engine is imported in the children only
    from stylize_service.models.layers import LayerChoice
    from stylize_service.server.engine.tile_layout import TileScheme

from stylize_service.server import procfs

# The benchmark pair (tubingen.jpg, starry_night.jpg): the shared images beside the checkout, or the
# folder STYLIZE_BENCHMARK_IMAGES names (tests/test_memory_prediction.py makes stand-ins where those are
# missing: memory depends on the images' sizes, not on what they show).
SHARED = Path(
    os.environ.get("STYLIZE_BENCHMARK_IMAGES") or Path(__file__).resolve().parents[2] / "shared" / "images"
)
MiB = 2**20


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: procfs.peak_rss_bytes says why not ru_maxrss)."""
    return procfs.peak_rss_bytes()


def load(path: Path, longest: int) -> np.ndarray:
    from stylize_service.server.engine.resample import resize_longest

    return resize_longest(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0, longest)


def parse_scheme(text: str, choice: LayerChoice) -> TileScheme | None:
    """A tile scheme on the command line: 0 (untiled), TILE:whole or TILE:BLOCKS (TileScheme.by_block)."""
    from stylize_service.server.engine.tile_layout import TileScheme

    if text == "0":
        return None
    tile, form = text.split(":")
    return (
        TileScheme.whole(int(tile), choice) if form == "whole" else TileScheme.by_block(int(tile), int(form))
    )


def child_job(size: int, budget_mb: int, tile: int = 0) -> dict:
    from stylize_service.models.paths import default_model_path
    from stylize_service.server.engine.engine import Engine
    from stylize_service.server.engine.memory import MemoryExceeded, default_budget_bytes
    from stylize_service.server.engine.types import Init, SilentObserver, StyleSource, StylizeSettings
    from stylize_service.server.procfs import rss_bytes as current_rss_bytes

    engine = Engine(default_model_path(), tile_size=tile)
    engine.warm_up()
    content, style = load(SHARED / "tubingen.jpg", size), load(SHARED / "starry_night.jpg", size)
    idle = current_rss_bytes()
    budget = budget_mb * MiB if budget_mb else default_budget_bytes()
    settings = StylizeSettings(max_size=size, min_size=size, iterations=1, init=Init.CONTENT)
    row: dict = {"size": size, "budget": budget, "idle": idle, "pixels": content.shape[0] * content.shape[1]}
    try:
        style_sizes = [(style.shape[1], style.shape[0])]
        plan = engine.plan((content.shape[1], content.shape[0]), style_sizes, settings, budget=budget - idle)
    except MemoryExceeded as err:
        return {**row, "refused": str(err)}
    started = time.perf_counter()
    result = engine.stylize(content, [StyleSource(style)], settings, SilentObserver(), plan=plan)
    seconds = time.perf_counter() - started
    return {
        **row,
        "tiles": plan.memory.tiles[0],
        "scheme": str(plan.memory.schemes[0] or "untiled"),
        "correction_pairs": plan.memory.histories[0],
        "predicted": idle + plan.memory.peak_bytes,
        "peak": peak_rss(),
        "seconds_per_evaluation": seconds / result.evaluations,
        "after": current_rss_bytes(),
    }


def child_targets(size: int, scheme_text: str) -> dict:
    """One style target pass at `size` px, untiled (0) or in a tile scheme (parse_scheme), in this
    process."""
    from stylize_service.models.paths import default_model_path
    from stylize_service.server.engine.network import FeatureNetwork
    from stylize_service.server.engine.plan import layer_choice
    from stylize_service.server.engine.resample import resize_longest
    from stylize_service.server.engine.tiling import TiledEvaluator
    from stylize_service.server.engine.types import StylizeSettings
    from stylize_service.server.procfs import rss_bytes as current_rss_bytes

    network = FeatureNetwork(default_model_path())
    choice = layer_choice(StylizeSettings(), 1)
    compiled = network.compiled(choice)
    compiled.targets(network.to_network(load(SHARED / "starry_night.jpg", 64)))  # warm, as the server is
    compiled.shrink_arenas()
    style = load(SHARED / "starry_night.jpg", 2 * size)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # as tile_sessions() does, so "sessions" is theirs alone
    before_sessions = current_rss_bytes()
    scheme = parse_scheme(scheme_text, choice)
    tiled = None
    if scheme is not None:
        sessions = network.tile_sessions(choice)
        sessions.prepare(*scheme.cut(choice), backward=False)
        tiled = TiledEvaluator(sessions, scheme)
    idle = current_rss_bytes()
    if not procfs.reset_peak():
        return {"error": "cannot reset VmHWM (/proc/self/clear_refs)"}
    x = network.to_network(resize_longest(style, size))
    if tiled is None:
        compiled.targets(x)
        window = (x.shape[-2], x.shape[-1])
    else:
        tiled.statistic_targets(x)
        window = tiled.layout(x).largest_window()
    return {
        "size": size,
        "scheme": scheme_text,
        "width": x.shape[-1],
        "height": x.shape[-2],
        "pixels": x.shape[-2] * x.shape[-1],
        "window_pixels": window[0] * window[1],
        "sessions": idle - before_sessions,
        "idle": idle,
        "peak": peak_rss(),
    }


def child_scheme(size: int, scheme_text: str) -> dict:
    """One loss-and-gradient evaluation of the Tübingen photograph at `size` px in a tile scheme (0:
    untiled), its targets computed first: its peak above the ready network and targets, and its time."""
    from stylize_service.models.paths import default_model_path
    from stylize_service.server.engine.evaluators import WholeImageEvaluator, blend_targets
    from stylize_service.server.engine.network import FeatureNetwork
    from stylize_service.server.engine.plan import layer_choice
    from stylize_service.server.engine.tiling import TiledEvaluator
    from stylize_service.server.engine.types import StylizeSettings
    from stylize_service.server.procfs import rss_bytes as current_rss_bytes

    network = FeatureNetwork(default_model_path())
    settings = StylizeSettings()
    choice = layer_choice(settings, 1)
    compiled = network.compiled(choice)
    compiled.targets(network.to_network(load(SHARED / "starry_night.jpg", 64)))  # warm, as the server is
    compiled.shrink_arenas()
    scheme = parse_scheme(scheme_text, choice)
    evaluator: object = WholeImageEvaluator(compiled)
    if scheme is not None:
        sessions = network.tile_sessions(choice)
        sessions.prepare(*scheme.cut(choice), backward=True)
        evaluator = TiledEvaluator(sessions, scheme)
    x = network.to_network(load(SHARED / "tubingen.jpg", size))
    style = network.to_network(load(SHARED / "starry_night.jpg", size))
    targets = blend_targets(
        choice,
        evaluator.separable_targets(x),
        [(1.0, evaluator.statistic_targets(style))],  # type: ignore[attr-defined]
    )
    del style
    compiled.shrink_arenas()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    idle = current_rss_bytes()
    if not procfs.reset_peak():
        return {"error": "cannot reset VmHWM (/proc/self/clear_refs)"}
    weights = {"content": settings.content_weight, "style": settings.style_weight, "tv": settings.tv_weight}
    layer_weights = {term: dict.fromkeys(layers, 1.0) for term, layers in choice.layers}
    evaluate = evaluator.evaluator(targets, weights, layer_weights)  # type: ignore[attr-defined]
    started = time.perf_counter()
    result = evaluate(x)
    seconds = time.perf_counter() - started
    return {
        "size": size,
        "scheme": scheme_text,
        "height": x.shape[-2],
        "width": x.shape[-1],
        "idle": idle,
        "peak": peak_rss(),
        "seconds": seconds,
        "loss": result.loss,
    }


def schemes_table(size: int, schemes: list[str]) -> None:
    """One evaluation per scheme, each in a fresh process: its peak above the ready network and targets,
    server.engine.memory's prediction of it, and its time beside the untiled one's."""
    from stylize_service.server.engine import memory
    from stylize_service.server.engine.plan import layer_choice
    from stylize_service.server.engine.pyramid import Stage
    from stylize_service.server.engine.types import StylizeSettings

    choice = layer_choice(StylizeSettings(), 1)
    print("| size | scheme | above idle MB | predicted MB | s/eval | vs untiled | loss vs untiled |")
    print("|---|---|---|---|---|---|---|")
    base: dict | None = None
    for text in ["0", *schemes]:
        row = spawn("scheme", str(size), text)
        if "error" in row:
            print(f"| {size} | {text} | error: {row['error']} |||||", flush=True)
            continue
        base = base or row
        stage = Stage(0, 1, row["width"], row["height"], iterations=1)
        scheme = parse_scheme(text, choice)
        if scheme is None:
            predicted = memory.EVAL_FIXED_BYTES + memory.EVAL_BYTES_PER_PIXEL * stage.pixels
        else:
            cost = memory.scheme_cost(stage.height, stage.width, scheme, choice)
            predicted = cost.evaluation
        print(
            f"| {row['width']}x{row['height']} | {scheme or 'untiled'} | {mb(row['peak'] - row['idle'])} | "
            f"{mb(predicted)} | {row['seconds']:.2f} | {row['seconds'] / base['seconds']:.2f} | "
            f"{abs(row['loss'] - base['loss']) / base['loss']:.1e} |",
            flush=True,
        )


def child_evaluation(size: int, kind: str) -> dict:
    """One untiled loss-and-gradient evaluation, ours or PyTorch's, in this process."""
    import onnx

    from stylize_service.models.layers import LayerChoice
    from stylize_service.models.paths import default_model_path
    from stylize_service.server.engine.network import FeatureNetwork

    content = load(SHARED / "tubingen.jpg", size)
    # The pixel values do not change the memory; the shape does.
    x = np.random.default_rng(0).uniform(-100, 100, (1, 3, *content.shape[:2])).astype(np.float32)
    layers = {"content": ("relu4_2",), "style": ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")}
    if kind == "ours":
        network = FeatureNetwork(default_model_path())
        compiled = network.compiled(LayerChoice.of(layers))
        idle = peak_rss()
        targets = compiled.targets(x)
        weights = {"content": 5.0, "style": 100.0, "tv": 1e-3}
        feeds = compiled.feeds(
            targets, weights, {term: dict.fromkeys(names, 1.0) for term, names in layers.items()}
        )
        compiled.evaluate(x, feeds)
        return {"kind": kind, "size": size, "idle": idle, "peak": peak_rss()}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from benchmark_gradient import torch_evaluation

    from stylize_service.models.vgg16 import CHANNELS
    from stylize_service.server.engine.network import Targets

    features = onnx.load(str(default_model_path()))
    # Targets of the right shapes (their values do not change the memory); no onnxruntime in this process.
    height, width = x.shape[-2:]
    targets = Targets(
        {
            "content": {"relu4_2": np.zeros((1, 512, height // 8, width // 8), np.float32)},
            "style": {layer: np.zeros((CHANNELS[layer],) * 2, np.float32) for layer in layers["style"]},
        }
    )
    evaluate = torch_evaluation(features, x, x, targets)
    del features
    idle = peak_rss()
    torch.set_num_threads(2)
    evaluate()
    return {"kind": kind, "size": size, "idle": idle, "peak": peak_rss()}


def server_job(
    size: int,
    limit_mb: int,
    settle_seconds: float = 15.0,
    *,
    content: Path = SHARED / "tubingen.jpg",
    style: Path = SHARED / "starry_night.jpg",
    min_size: int | None = None,
    iterations: int = 1,
    style_scale: float = 1.0,
) -> dict:
    """One job of `size` px through a real server with a memory limit: single-stage (min_size None),
    one iteration, Tübingen in the style of The Starry Night unless told otherwise; min_size 0 = the
    server's default pyramid."""
    from stylize_service.client.api import StylizeClient, StylizeError
    from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
    from stylize_service.server.readiness import wait_for_ready_file

    options: dict = {"max_size": size, "iterations": iterations, "style_scale": style_scale}
    if min_size != 0:
        options["min_size"] = min_size or size
    workdir = Path(tempfile.mkdtemp(prefix="stylize-benchmark-"))
    ready, log_path = workdir / "ready.json", workdir / "server.log"
    command = [sys.executable, "-m", "stylize_service.server.main", "--host", "127.0.0.1", "--port", "0"]
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [
                *command,
                "--memory-limit-mb",
                str(limit_mb),
                "--ready-file",
                str(ready),
                "--state-dir",
                str(workdir / "state"),
            ],
            stderr=log_file,
        )
    try:
        try:
            address = wait_for_ready_file(ready, server, timeout=300).address
        except (RuntimeError, TimeoutError) as err:
            return {"error": f"the server did not start ({err}): " + log_path.read_text()[-500:]}
        with StylizeClient(address, retries=0) as client:  # a refusal is the measurement
            client.wait_ready(timeout=300)
            idle = procfs.status_value(server.pid, "VmRSS")
            progress: list = []
            started = time.perf_counter()
            try:
                result = client.run(
                    content,
                    [style],
                    on_event=lambda event: progress.append(event) if isinstance(event, pb.Progress) else None,
                    **options,
                )
            except StylizeError as err:
                return {"size": size, "refused": str(err), "idle": idle}
            seconds = time.perf_counter() - started
            peak = procfs.status_value(server.pid, "VmHWM")
            time.sleep(settle_seconds)
            after = procfs.status_value(server.pid, "VmRSS")
        server.terminate()
        server.wait(60)
        planned = next((line for line in log_path.read_text().splitlines() if " memory=" in line), "")
        return {
            "plan": " ".join(
                word
                for word in planned.split()
                if word.startswith(("memory=", "tiles=", "style_tiles=", "correction_pairs="))
            ),
            "size": size,
            "limit": limit_mb * MiB,
            "output": f"{result.width}x{result.height}",
            "tiles": progress[-1].tile_size if progress else None,
            "correction_pairs": progress[-1].correction_pairs if progress else None,
            "idle": idle,
            "peak": peak,
            "after": after,
            "bound": max(idle + 600 * MiB, 1.5 * idle),
            "seconds": seconds,
        }
    finally:
        server.terminate()
        server.wait(60)


def spawn(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def targets_table(sizes: list[int], schemes: list[str]) -> None:
    """One style target pass per row, each in a fresh process, against server.engine.memory's model."""
    from stylize_service.server.engine.memory import TILE_SESSIONS_BYTES, style_pass_bytes
    from stylize_service.server.engine.plan import layer_choice
    from stylize_service.server.engine.types import StylizeSettings

    choice = layer_choice(StylizeSettings(), 1)
    print("| style px | scheme | sessions MB | above idle MB | predicted MB | bytes/px |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        for text in schemes:
            scheme = parse_scheme(text, choice)
            if scheme is not None and scheme.tile >= size:
                continue
            row = spawn("targets", str(size), text)
            if "error" in row:
                print(f"| {size} | {text} | error: {row['error']} ||||", flush=True)
                continue
            above = row["peak"] - row["idle"] + row["sessions"]
            shape = (row["width"], row["height"])
            decoded = (2 * row["width"], 2 * row["height"])  # as child_targets holds it (near enough)
            predicted = style_pass_bytes(shape, decoded, scheme, choice)
            predicted += TILE_SESSIONS_BYTES if scheme else 0
            print(
                f"| {size} | {scheme or 'untiled'} | {mb(row['sessions'])} | {mb(above)} | {mb(predicted)} | "
                f"{above / row['pixels']:.0f} |",
                flush=True,
            )


def mb(value: float) -> str:
    return f"{value / MiB:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--budgets-mb", type=int, nargs="+", default=[0, 3000], help="0 = the default budget")
    parser.add_argument("--torch", action="store_true", help="also one evaluation, ours and PyTorch's")
    parser.add_argument(
        "--torch-sizes",
        type=int,
        nargs="+",
        default=[512, 1024, 2048],
        help="sizes of the untiled comparison (at 4096 px neither side's evaluation fits in 24 GB)",
    )
    parser.add_argument("--server", type=int, metavar="SIZE", help="one job of SIZE px through the RPC")
    parser.add_argument("--server-limit-mb", type=int, default=3000)
    parser.add_argument("--content", type=Path, default=SHARED / "tubingen.jpg", help="with --server")
    parser.add_argument("--style", type=Path, default=SHARED / "starry_night.jpg", help="with --server")
    parser.add_argument("--style-scale", type=float, default=1.0, help="with --server")
    parser.add_argument("--iterations", type=int, default=1, help="with --server")
    parser.add_argument("--min-size", type=int, help="with --server: default SIZE; 0 = the default pyramid")
    parser.add_argument("--targets", type=int, nargs="+", metavar="SIZE", help="style target passes")
    parser.add_argument(
        "--targets-schemes",
        nargs="+",
        default=["0", "256:whole", "512:whole", "256:3"],
        help="with --targets: 0 (untiled), TILE:whole or TILE:BLOCKS",
    )
    parser.add_argument(
        "--schemes",
        nargs="+",
        metavar="SCHEME",
        help="one evaluation per tile scheme (TILE:whole, TILE:BLOCKS)",
    )
    parser.add_argument("--schemes-size", type=int, default=1024, help="with --schemes")
    parser.add_argument(
        "--tile-sizes", type=int, nargs="+", default=[0], help="forced tile sizes of the jobs (0: as planned)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        row = server_job(
            args.server,
            args.server_limit_mb,
            content=args.content,
            style=args.style,
            min_size=args.min_size,
            iterations=args.iterations,
            style_scale=args.style_scale,
        )
        print(json.dumps(row))
        if "error" not in row and "refused" not in row:
            print(
                f"\n| size | --memory-limit-mb | output | tiles | L-BFGS pairs | idle MB | peak MB | "
                f"15 s after MB | release bound MB | seconds |\n|---|---|---|---|---|---|---|---|---|---|\n"
                f"| {row['size']} | {args.server_limit_mb} | {row['output']} | {row['tiles']} | "
                f"{row['correction_pairs']} | {mb(row['idle'])} | {mb(row['peak'])} | {mb(row['after'])} | "
                f"{mb(row['bound'])} | {row['seconds']:.0f} |"
            )
        return
    if args.child:
        kind, size, extra = args.child[0], int(args.child[1]), args.child[2]
        if kind == "job":
            row = child_job(size, int(extra), int(args.child[3]) if len(args.child) > 3 else 0)
        elif kind == "targets":
            row = child_targets(size, extra)
        elif kind == "scheme":
            row = child_scheme(size, extra)
        else:
            row = child_evaluation(size, extra)
        print(json.dumps(row))
        return
    if args.targets:
        targets_table(args.targets, args.targets_schemes)
        return
    if args.schemes:
        schemes_table(args.schemes_size, args.schemes)
        return

    print(
        "| size | budget MB | tiles | L-BFGS pairs | idle MB | predicted peak MB | measured peak MB | predicted / measured | s/eval | after MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget in args.budgets_mb:
        for size in args.sizes:
            for tile in args.tile_sizes:
                row = spawn("job", str(size), str(budget), str(tile))
                label = f"| {size} | {mb(row['budget']) if 'budget' in row else budget} |"
                if "error" in row:
                    print(f"{label} error: {row['error']} ||||||||", flush=True)
                elif "refused" in row:
                    print(f"{label} refused: {row['refused']} ||||||||", flush=True)
                else:
                    print(
                        f"{label} {row['scheme']} | {row['correction_pairs']} | {mb(row['idle'])} | {mb(row['predicted'])} | "
                        f"{mb(row['peak'])} | {row['predicted'] / row['peak']:.2f} | {row['seconds_per_evaluation']:.1f} | "
                        f"{mb(row['after'])} |",
                        flush=True,
                    )
    if args.torch:
        print()
        print(
            "| size | ours: one evaluation, peak MB | PyTorch eager: one evaluation, peak MB | ours / PyTorch |"
        )
        print("|---|---|---|---|")
        for size in args.torch_sizes:
            ours, theirs = spawn("evaluation", str(size), "ours"), spawn("evaluation", str(size), "torch")
            if "error" in ours or "error" in theirs:
                print(
                    f"| {size} | {ours.get('error', mb(ours.get('peak', 0)))} | {theirs.get('error', '')} | |"
                )
                continue
            print(
                f"| {size} | {mb(ours['peak'])} | {mb(theirs['peak'])} | {ours['peak'] / theirs['peak']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
