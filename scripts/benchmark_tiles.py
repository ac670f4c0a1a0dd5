"""Exact tiles against the untiled evaluation, through the service: seconds per evaluation, side by side.

Run: .venv/bin/python scripts/benchmark_tiles.py [--size 1024] [--configs 0 512 256 128] [--iterations 3]
                                                 [--rounds 2]
     .venv/bin/python scripts/benchmark_tiles.py --arithmetic 2048 1536 [--arithmetic-tiles 512 256 128]

Each config is a real `stylize-server` process running the same seeded single-stage job (min_size =
max_size = --size, init content, seed 1, Tübingen in the style of The Starry Night):
- a number: `--tile-size` (0 = untiled; the default memory budget);
- LIMIT_MB@mem: no forced tiles, `--memory-limit-mb LIMIT_MB`, so the tiles are what the planner chooses
  for that budget (e.g. 3000@mem at 2048 px).
Seconds per evaluation come from the job's Progress messages (elapsed seconds and evaluations, from the
first report to the last, so the targets passes and the start-up are left out); the configs run one after
another, --rounds times over (the fastest round is kept), so that they share the machine's state. The
iteration-0 loss (that of the content image, before any step) is compared with the untiled config's: the
tiles change the cost, not the result. The server's peak resident memory (VmHWM), its resident memory 15 s
after the job, and the plan of its log line (tiles=, correction_pairs=) are printed beside.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stylize_service.server import procfs

SHARED = Path(
    os.environ.get("STYLIZE_BENCHMARK_IMAGES") or Path(__file__).resolve().parents[2] / "shared" / "images"
)
MiB = 2**20


@dataclass
class Run:
    config: str
    seconds_per_evaluation: float
    first_loss: float
    tile_size: int
    tiles: int
    correction_pairs: int
    peak: int
    after: int
    plan: str


def run_config(config: str, size: int, iterations: int) -> Run | str:
    """One job through a fresh server configured by `config`; a string says why it did not run."""
    from stylize_service.client.api import StylizeClient, StylizeError
    from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
    from stylize_service.server.readiness import wait_for_ready_file

    workdir = Path(tempfile.mkdtemp(prefix="stylize-tiles-"))
    ready, log_path = workdir / "ready.json", workdir / "server.log"
    flags = ["--tile-size", config] if not config.endswith("@mem") else ["--memory-limit-mb", config[:-4]]
    command = [
        sys.executable,
        "-m",
        "stylize_service.server.main",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--state-dir",
        str(workdir / "state"),
        *flags,
    ]
    with log_path.open("w") as log_file:
        server = subprocess.Popen(command, stderr=log_file)
    try:
        try:
            address = wait_for_ready_file(ready, server, timeout=300).address
        except (RuntimeError, TimeoutError) as err:
            return f"the server did not start ({err}): " + log_path.read_text()[-500:]
        progress: list[pb.Progress] = []
        with StylizeClient(address, retries=0) as client:
            client.wait_ready(timeout=300)
            try:
                client.run(
                    SHARED / "tubingen.jpg",
                    [SHARED / "starry_night.jpg"],
                    on_event=lambda event: progress.append(event) if isinstance(event, pb.Progress) else None,
                    max_size=size,
                    min_size=size,
                    iterations=iterations,
                    init=pb.INIT_CONTENT,
                    seed=1,
                )
            except StylizeError as err:
                return f"refused: {err}"
        peak = procfs.status_value(server.pid, "VmHWM")
        time.sleep(15)  # then the resident memory the job left behind
        after = procfs.status_value(server.pid, "VmRSS")
        server.terminate()
        server.wait(60)
        first, last = progress[0], progress[-1]
        planned = next((line for line in log_path.read_text().splitlines() if " memory=" in line), "")
        return Run(
            config,
            (last.elapsed_seconds - first.elapsed_seconds) / max(1, last.evaluations - first.evaluations),
            first.losses.total,
            last.tile_size,
            last.tiles,
            last.correction_pairs,
            peak,
            after,
            " ".join(w for w in planned.split() if w.startswith(("memory=", "tiles=", "correction_pairs="))),
        )
    finally:
        server.terminate()
        server.wait(60)


def arithmetic(width: int, height: int, tiles: list[int]) -> None:
    """The tile designs' halo, window area, memory and time arithmetic at one size, from the engine's own
    geometry (server/engine/tile_layout.py) and models (server/engine/memory.py); nothing is run."""
    from stylize_service.server.engine import memory
    from stylize_service.server.engine.plan import layer_choice
    from stylize_service.server.engine.pyramid import Stage
    from stylize_service.server.engine.tile_layout import TileScheme, segment_layouts
    from stylize_service.server.engine.types import StylizeSettings

    choice = layer_choice(StylizeSettings(), 1)
    stage = Stage(0, 1, width, height, iterations=1)
    untiled = memory.predicted_seconds(stage, choice, None)
    untiled_bytes = memory.EVAL_FIXED_BYTES + memory.EVAL_BYTES_PER_PIXEL * stage.pixels
    print(f"\n{width}x{height}, default layers; untiled evaluation: {untiled_bytes / MiB:.0f} MB predicted\n")
    print(
        "| scheme | segments: halo (positions), tile side, tiles | window / owned area | predicted MB | predicted time vs untiled |"
    )
    print("|---|---|---|---|---|")
    for tile in tiles:
        designs = [
            TileScheme.whole(tile, choice),
            TileScheme.by_block(tile, 5),
            TileScheme.by_block(tile, 3),
            TileScheme.by_block(tile, 1),
            TileScheme(tile, ((1, 2), (3, 3))),
        ]
        for scheme in designs:
            segments, tail = scheme.cut(choice)
            layouts = segment_layouts(height, width, scheme, choice)
            parts = [
                f"{seg}: {seg.halo}, {layout.tile}, {len(layout)}"
                for seg, layout in zip(segments, layouts, strict=True)
            ]
            if tail is not None:
                parts.append(f"{tail}-5 untiled")
            first = layouts[0]
            window = sum(
                (t.rows.window_end - t.rows.window_start) * (t.cols.window_end - t.cols.window_start)
                for t in first
            )
            cost = memory.scheme_cost(height, width, scheme, choice)
            print(
                f"| {scheme} | {'; '.join(parts)} | {window / (first.height * first.width):.2f} | "
                f"{cost.evaluation / MiB:.0f} | {cost.seconds / untiled:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--configs", nargs="+", default=["0", "512", "256", "128"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--arithmetic",
        nargs=2,
        type=int,
        metavar=("WIDTH", "HEIGHT"),
        help="print the tile designs' halo, memory and time arithmetic at this size (nothing is run)",
    )
    parser.add_argument("--arithmetic-tiles", type=int, nargs="+", default=[512, 256, 128])
    args = parser.parse_args()
    if args.arithmetic:
        arithmetic(*args.arithmetic, args.arithmetic_tiles)
        return
    best: dict[str, Run | str] = {}
    for round_index in range(args.rounds):
        for config in args.configs:
            started = time.perf_counter()
            outcome = run_config(config, args.size, args.iterations)
            done = time.perf_counter() - started
            shown = outcome if isinstance(outcome, str) else f"{outcome.seconds_per_evaluation:.2f} s/eval"
            print(
                f"round {round_index + 1}, config {config}: {shown} ({done:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            kept = best.get(config)
            if (
                isinstance(outcome, Run)
                and (
                    not isinstance(kept, Run) or outcome.seconds_per_evaluation < kept.seconds_per_evaluation
                )
            ) or kept is None:
                best[config] = outcome
    base = best.get(args.configs[0])
    print(f"\n{args.size} px, {args.iterations} iterations, fastest of {args.rounds} rounds\n")
    print(
        "| config | tile size | tiles | plan | pairs | s per evaluation | vs first | iteration-0 loss vs first | peak MB | 15 s after MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        run = best[config]
        if isinstance(run, str):
            print(f"| {config} | {run} ||||||||")
            continue
        ratio = (
            run.seconds_per_evaluation / base.seconds_per_evaluation
            if isinstance(base, Run)
            else float("nan")
        )
        difference = (
            abs(run.first_loss - base.first_loss) / base.first_loss if isinstance(base, Run) else float("nan")
        )
        print(
            f"| {config} | {run.tile_size or 'untiled'} | {run.tiles} | {run.plan} | {run.correction_pairs} | "
            f"{run.seconds_per_evaluation:.2f} | {ratio:.2f} | {difference:.1e} | {run.peak / MiB:.0f} | "
            f"{run.after / MiB:.0f} |"
        )


if __name__ == "__main__":
    main()
