"""Fixed costs outside the network passes: L-BFGS-B set-up per stage, and a short job's overhead.

Run: .venv/bin/python scripts/benchmark_overhead.py [--sizes 512x384 1024x768] [--iterations 12] [--max-size 512]
     [--histories 10 20] [--parts 1 2] [--ways old direct new]

Three ways to run L-BFGS-B (server/engine/optimizer.py), side by side in one process:
  old     scipy.optimize.minimize (minimize_public), BLAS threads as the process has them: run_lbfgs
          before the direct driver;
  direct  scipy's routine driven with array bounds (minimize_direct), same BLAS threads as old;
  new     direct with BLAS held at one thread: what run_lbfgs does now.

1. Optimizer: each way on a trivial objective, a diagonal quadratic whose minimum lies partly outside the
   pixel bounds, so that only the optimizer's own time shows. set-up: before the first call of scipy's
   routine (setulb), less the first evaluation; routine: time inside setulb (the same calls for every
   way); driver: the rest outside the objective (copies, conversions). The last column says whether the
   evaluated points are bit-identical to old's: direct's must be; new's differ in the last bits where a
   threaded BLAS summed in another order.
2. Job: a short job (default 12 iterations at 512 px, the bundled samples, init content, single scale)
   through the real Engine, old and new, with each of --histories correction pairs. Every network pass
   is timed by wrapping the compiled graphs' methods; the rest of elapsed_seconds is the job's overhead,
   and setulb's share of it is timed too. The engine benchmark's seconds per evaluation (scripts/benchmark_gradient.py's measurement, median of --repeats) is measured just before
   and just after each job and set against its elapsed_seconds / evaluations.

The machine's two cores are shared, so seconds move between runs; the ratios within a run are the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from stylize_service.models.paths import default_model_path
from stylize_service.server.engine import optimizer
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.memory import JobMemory
from stylize_service.server.engine.network import CompiledChoice, FeatureNetwork
from stylize_service.server.engine.types import Init, SilentObserver, StyleSource, StylizeSettings
from stylize_service.server.imageio import decode_image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "client" / "samples"
MAX_PIXELS = 25_000_000  # the server's default limit


@dataclass(frozen=True)
class Way:
    drive: optimizer.Driver
    blas: Callable[[], contextlib.AbstractContextManager]


WAYS = {
    "old": Way(optimizer.minimize_public, contextlib.nullcontext),
    "direct": Way(optimizer.minimize_direct, contextlib.nullcontext),
    "new": Way(optimizer.minimize_direct, optimizer.single_threaded_blas),
}
# ImageNet statistics (the model's metadata has the same): bounds of pixels in [0, 1] after normalising.
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


class Stopwatch:
    """Start times and durations of calls to wrapped callables, by name."""

    def __init__(self) -> None:
        self.starts: dict[str, list[float]] = {}
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.starts.setdefault(name, []).append(start)
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds.setdefault(name, []).append(time.perf_counter() - start)

        return timed

    def total(self, name: str) -> float:
        return sum(self.seconds.get(name, []))

    def count(self, name: str) -> int:
        return len(self.seconds.get(name, []))


@contextlib.contextmanager
def timed_routine(watch: Stopwatch) -> Iterator[None]:
    """Time scipy's L-BFGS-B routine (setulb) as "setulb", however a driver reaches it."""
    import scipy.optimize._lbfgsb_py as scipy_driver  # where minimize finds the routine

    saved = optimizer._scipy_lbfgsb, scipy_driver._lbfgsb
    timed = SimpleNamespace(setulb=watch.wrap("setulb", saved[0].setulb))
    optimizer._scipy_lbfgsb = scipy_driver._lbfgsb = timed
    try:
        yield
    finally:
        optimizer._scipy_lbfgsb, scipy_driver._lbfgsb = saved


# --- 1. the optimizer alone ------------------------------------------------------------------------


@dataclass
class OptimizerTiming:
    setup: float
    routine: float
    driver: float
    evaluations: int
    evaluated: list[bytes]


def time_optimizer(
    way: Way, height: int, width: int, iterations: int, history: int = optimizer.MAXCOR
) -> OptimizerTiming:
    n = 3 * height * width
    rng = np.random.default_rng(0)
    curvature = rng.uniform(0.5, 2.0, n)
    target = rng.normal(0.0, 1.5, n)
    lower = np.repeat(-MEAN / STD, height * width)
    upper = np.repeat((1 - MEAN) / STD, height * width)
    watch = Stopwatch()
    evaluated: list[bytes] = []

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        evaluated.append(x.astype(np.float32).tobytes())
        d = x - target
        grad = curvature * d
        return 0.5 * float(d @ grad), grad.astype(np.float32)  # float32 like the network's gradient

    fun = watch.wrap("objective", objective)
    options = optimizer.LbfgsOptions(iterations, 2 * iterations + 20, maxcor=history)
    with timed_routine(watch), way.blas():
        begin = time.perf_counter()
        way.drive(fun, np.zeros(n), lower, upper, options, lambda x: None)
        total = time.perf_counter() - begin
    setup = watch.starts["setulb"][0] - begin - watch.seconds["objective"][0]
    outside = total - watch.total("objective") - watch.total("setulb")
    return OptimizerTiming(setup, watch.total("setulb"), outside - setup, watch.count("objective"), evaluated)


def optimizer_table(
    sizes: list[tuple[int, int]], iterations: int, ways: list[str], history: int = optimizer.MAXCOR
) -> None:
    print(f"## 1. L-BFGS-B on a trivial objective, {iterations} iterations, {history} correction pairs")
    print()
    print(
        "| size | variables | way | set-up s | setulb s / evaluation | driver s / evaluation | "
        "evaluations | same points as old |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width, height in sizes:
        runs = {name: time_optimizer(WAYS[name], height, width, iterations, history) for name in ways}
        for name, run in runs.items():
            same = "-" if "old" not in runs else ("yes" if run.evaluated == runs["old"].evaluated else "no")
            print(
                f"| {width}x{height} | {3 * width * height} | {name} | {run.setup:.3f} | "
                f"{run.routine / run.evaluations:.3f} | {run.driver / run.evaluations:.4f} | "
                f"{run.evaluations} | {same} |",
                flush=True,
            )
    print()


# --- 2. a short job through the Engine -------------------------------------------------------------


@contextlib.contextmanager
def instrumented(watch: Stopwatch, way: Way) -> Iterator[None]:
    """Time the network passes and scipy's routine, and make run_lbfgs run L-BFGS-B `way`."""
    saved = CompiledChoice.evaluate, CompiledChoice.targets, optimizer.driver, optimizer.single_threaded_blas
    CompiledChoice.evaluate = watch.wrap("evaluation", CompiledChoice.evaluate)
    CompiledChoice.targets = watch.wrap("targets", CompiledChoice.targets)
    optimizer.driver = lambda: way.drive
    optimizer.single_threaded_blas = way.blas
    try:
        with timed_routine(watch):
            yield
    finally:
        (
            CompiledChoice.evaluate,
            CompiledChoice.targets,
            optimizer.driver,
            optimizer.single_threaded_blas,
        ) = saved


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_benchmark(model: str, width: int, height: int, repeats: int) -> Callable[[], float]:
    """scripts/benchmark_gradient.py's evaluation ("ours s/eval"), warmed up: returns a function that
    times it `repeats` times and gives the median seconds."""
    gradient = load_script("benchmark_gradient")
    evaluate, *_ = gradient.onnx_evaluation(FeatureNetwork(model), height, width)
    gradient.interleaved_medians({"ours": evaluate}, 1)  # its warm-up calls

    def median() -> float:
        return gradient.interleaved_medians({"ours": evaluate}, repeats)["ours"]

    return median


def job_table(
    model: str, max_size: int, iterations: int, repeats: int, ways: list[str], histories: list[int]
) -> None:
    print(f"## 2. A {iterations}-iteration job at {max_size} px through the Engine (bundled samples)")
    print()
    start = time.perf_counter()
    content = decode_image((SAMPLES / "coffee.png").read_bytes(), MAX_PIXELS, max_size)
    style = decode_image((SAMPLES / "style_swirls.jpg").read_bytes(), MAX_PIXELS, max_size)
    decoding = time.perf_counter() - start
    engine = Engine(model)
    start = time.perf_counter()
    engine.warm_up()  # the server does this before it serves
    compiling = time.perf_counter() - start
    # tolerance 0: the job runs all its iterations, as the comparison assumes.
    settings = StylizeSettings(
        max_size=max_size, min_size=max_size, iterations=iterations, init=Init.CONTENT, tolerance=0.0
    )
    # onnxruntime's first runs at a new shape are slower: a throw-away job makes the measured ones alike.
    engine.stylize(
        content, [StyleSource(style)], StylizeSettings(max_size=max_size, iterations=1), SilentObserver()
    )
    height, width = content.shape[:2]
    benchmark = engine_benchmark(model, width, height, repeats)
    print(
        f"Decoding both samples: {decoding:.3f} s. Compiling the default graphs: {compiling:.1f} s, once per "
        "server (at start, before it serves) and once per other layer choice (its first job)."
    )
    print()
    print(
        "| way | pairs | elapsed s | evaluations | evaluations s | targets s | other s | of it setulb s | "
        "setulb s / iteration | of it the rest s | elapsed / evaluations s | elapsed / evaluation s | "
        "benchmark s | job / benchmark | setulb per iteration / benchmark |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ways:
        for history in histories:
            # The memory plan is where a job's history comes from (server.engine.memory), one stage here.
            memory = JobMemory(schemes=(None,), histories=(history,), peak_bytes=0, style_schemes=(None,))
            plan = dataclasses.replace(
                engine.plan((width, height), [(style.shape[1], style.shape[0])], settings), memory=memory
            )
            before = benchmark()
            watch = Stopwatch()
            with instrumented(watch, WAYS[name]):
                result = engine.stylize(content, [StyleSource(style)], settings, SilentObserver(), plan=plan)
            reference = (before + benchmark()) / 2
            evaluations, targets = watch.total("evaluation"), watch.total("targets")
            other = result.elapsed_seconds - evaluations - targets
            setulb = watch.total("setulb")
            per_evaluation = result.elapsed_seconds / result.evaluations
            print(
                f"| {name} | {history} | {result.elapsed_seconds:.2f} | {result.evaluations} | "
                f"{evaluations:.2f} | {targets:.2f} | {other:.2f} | {setulb:.2f} | "
                f"{setulb / result.iterations:.3f} | {other - setulb:.2f} | "
                f"{result.elapsed_seconds / evaluations:.3f} | {per_evaluation:.3f} | {reference:.3f} | "
                f"{per_evaluation / reference:.3f} | {setulb / result.iterations / reference:.3f} |",
                flush=True,
            )
    print()
    print(
        "elapsed / evaluations s: elapsed_seconds over the seconds inside the job's loss evaluations, its cost "
        "relative to its own evaluations, which load on the shared cores moves little. elapsed / evaluation "
        "s: elapsed_seconds / evaluations, set against the engine benchmark (scripts/benchmark_gradient.py's "
        f"evaluation at {width}x{height}, median of {repeats}, measured just before and just after the job; "
        "their mean). setulb per iteration / benchmark: L-BFGS-B's own step in evaluations, what "
        "scripts/benchmark_schedules.py report --step-cost takes."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1024x768"], help="WIDTHxHEIGHT, part 1")
    parser.add_argument("--optimizer-iterations", type=int, default=6, help="part 1")
    parser.add_argument(
        "--histories", type=int, nargs="+", default=[optimizer.MAXCOR], help="correction pairs, both parts"
    )
    parser.add_argument("--iterations", type=int, default=12, help="the job's iterations, part 2")
    parser.add_argument("--max-size", type=int, default=512, help="the job's longest side, part 2")
    parser.add_argument(
        "--repeats", type=int, default=3, help="engine benchmark evaluations timed before and after each job"
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--parts", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    parser.add_argument(
        "--ways", nargs="+", choices=list(WAYS), help="default: all in part 1, old and new in 2"
    )
    args = parser.parse_args()
    if 1 in args.parts:
        sizes = [(int(w), int(h)) for w, h in (size.lower().split("x") for size in args.sizes)]
        for history in args.histories:
            optimizer_table(sizes, args.optimizer_iterations, args.ways or list(WAYS), history)
    if 2 in args.parts:
        job_table(
            args.model,
            args.max_size,
            args.iterations,
            args.repeats,
            args.ways or ["old", "new"],
            args.histories,
        )


if __name__ == "__main__":
    main()
