#!/usr/bin/env python3
"""Time an engine checkpoint at 512, 1024 and 2048 px: taking the optimiser's state, serializing it, writing
it to a file and reading it back; and its size against checkpoint_bytes()'s prediction.

Run: .venv/bin/python scripts/benchmark_checkpoint.py [--sizes 512 1024 2048] [--history 10] [--repeats 3]

The state is a real one of the right shapes, but not of a stylization: minimize_direct runs a few iterations
of a cheap quadratic over the 3 x W x H variables of a W x H stage (4:3), and the callback takes the state
as Engine.stylize does (StateCapture), so the arrays, the copy and the bytes are a checkpoint's at that
size; no network runs (a 2048 px stylization would take hours on a small machine). Times are the median of
--repeats. "write" is Checkpoint.write to a file in --dir followed by an fsync; "read" is Checkpoint.read
from that file (from the page cache, most likely). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylize_service.server.engine import optimizer  # noqa: E402
from stylize_service.server.engine.checkpoint import Checkpoint, checkpoint_bytes, plan_key  # noqa: E402
from stylize_service.server.engine.lbfgs_workspace import MAXCOR, OptimizerState  # noqa: E402
from stylize_service.server.engine.pyramid import Stage  # noqa: E402

MB = 1e6


def live_state(width: int, height: int, history: int) -> tuple[OptimizerState, float]:
    """The state minimize_direct hands out after 3 iterations over a W x H stage's variables, and how
    long that take() (the copy) took."""
    n = 3 * width * height
    target = np.linspace(-1.0, 1.0, n)
    taken: list[tuple[OptimizerState, float]] = []
    capture = optimizer.StateCapture()

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        d = x - target
        return float(d @ d), (2 * d).astype(np.float32)  # float32: the network's gradients are

    def callback(x: np.ndarray) -> bool:
        started = time.perf_counter()
        state = capture.take()
        seconds = time.perf_counter() - started
        assert state is not None
        taken[:] = [(state, seconds)]
        return False

    low, high = np.full(n, -2.0), np.full(n, 2.0)
    options = optimizer.LbfgsOptions(maxiter=3, maxfun=20, maxcor=history)
    with optimizer.single_threaded_blas():
        optimizer.minimize_direct(fun, np.zeros(n), low, high, options, callback, capture=capture)
    return taken[-1]


def timed(action: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median seconds of `repeats` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def measure(longest: int, history: int, repeats: int, folder: str) -> str:
    width, height = longest, longest * 3 // 4
    takes, state = [], None
    for _ in range(repeats):  # each take is of a fresh run: the copy is what is timed
        state, seconds = live_state(width, height, history)
        takes.append(seconds)
    assert state is not None
    image = state.x.reshape(1, 3, height, width).astype(np.float32)
    stage = Stage(0, 1, width, height, 500)

    def build() -> Checkpoint:
        return Checkpoint(
            stage=0,
            stage_iteration=state.iterations,
            iterations_done=state.iterations,
            evaluations=state.evaluations,
            elapsed_seconds=1.0,
            recent_losses=(1.0, 0.9, 0.8),
            image=image.copy(),
            optimizer=state,
            plan_key=plan_key([stage], [history]),
        )

    checkpoint = build()
    to_bytes_s, data = timed(checkpoint.to_bytes, repeats)
    assert isinstance(data, bytes)
    length = len(data)
    from_bytes_s, _ = timed(lambda: Checkpoint.from_bytes(data), repeats)
    data = b""  # freed before the file tests
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".checkpoint") as file:

        def write() -> None:
            file.seek(0)
            file.truncate()
            checkpoint.write(file)
            file.flush()
            os.fsync(file.fileno())

        write_s, _ = timed(write, repeats)

        def read() -> Checkpoint:
            file.seek(0)
            return Checkpoint.read(file)

        read_s, _ = timed(read, repeats)
    predicted = checkpoint_bytes(width, height, history)
    take_s = statistics.median(takes)
    return (
        f"| {width}x{height} | {3 * width * height:,} | {history} | {take_s:.3f} | {to_bytes_s:.3f} | "
        f"{from_bytes_s:.3f} | {write_s:.3f} | {read_s:.3f} | {length / MB:,.1f} | "
        f"{predicted / length - 1:+.3%} | {length / (take_s + write_s) / MB:,.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time taking, serializing, writing and reading an engine checkpoint (see the docstring)."
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="longest sides, px")
    parser.add_argument("--history", type=int, default=MAXCOR, help="L-BFGS-B correction pairs")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the write test's file goes")
    args = parser.parse_args(argv)
    print(
        "State: minimize_direct on a quadratic over the stage's 3 x W x H variables (synthetic objective, "
        "real L-BFGS-B state and shapes; no stylization run)."
    )
    print()
    print(
        "| stage (4:3) | variables | history | take s | to_bytes s | from_bytes s | write+fsync s | read s "
        "| bytes MB | checkpoint_bytes() error | take+write MB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for longest in args.sizes:
        print(measure(longest, args.history, args.repeats, args.dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
