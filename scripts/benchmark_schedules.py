"""Loss against wall time for single-scale and coarse-to-fine schedules, at equal full-resolution loss.

Two steps, so that a long study survives an interruption (each run is saved as soon as it ends, and runs
already saved are skipped):

    .venv/bin/python scripts/benchmark_schedules.py run      # the curves, one JSON per pair and schedule
    .venv/bin/python scripts/benchmark_schedules.py report   # the table (Markdown) and the plot (PNG)

`run` optimises each content/style pair at --size px from the content image (init content, the default
loss) first single-scale for --iterations iterations, which gives L_ref (the loss after the last iteration)
and the time it took, then with each coarse-to-fine schedule. A schedule is written as its stages'
longest sides, each coarse one with its iterations, e.g. "128:50,256:50,512": 50 iterations at 128 px, 50
at 256 px, then the final size until the full-resolution loss reaches L_ref, or until it has run for
--cost-cap times the single-scale run's cost (its evaluations; a coarser stage's evaluation counts by its
share of the final stage's pixels, so that the machine's load does not move the cap). Every iteration's loss, wall time (time.perf_counter, from
the call into the engine, so target passes and set-up count) and CPU time (time.process_time) is recorded.

`report` reads the curves back and prints, per pair and schedule, the time to come within 2% (and 1%) of
L_ref and to reach it, as a fraction of the single-scale time; and for the early-stop rule (stop once the
relative improvement over the last --window iterations is below a tolerance) the iterations, time and
final loss at each tolerance. The plot needs matplotlib (`pip install -e '.[bench]'`). With --step-cost
the cost also counts L-BFGS-B's own step, which grows with the correction pairs kept: give it per
history in evaluations, as scripts/benchmark_overhead.py measures it.

Defaults read the Tübingen / Starry Night pair from ../shared/images beside the checkout and the bundled
samples from client/samples; add pairs with --pair CONTENT STYLE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "images"
DEFAULT_PAIRS = [
    (SHARED / "tubingen.jpg", SHARED / "starry_night.jpg"),
    (ROOT / "client" / "samples" / "coffee.png", ROOT / "client" / "samples" / "style_swirls.jpg"),
]
DEFAULT_SCHEDULES = [
    "256:50,512",
    "256:100,512",
    "128:50,256:50,512",
    "128:100,256:100,512",
    "128:40,181:40,256:40,362:40,512",
]
GOALS = (0.02, 0.01, 0.0)  # relative distance above L_ref


@dataclass(frozen=True)
class Schedule:
    """Coarse stages (longest side, iterations), the final stage's longest side, and L-BFGS-B's history
    (correction pairs; None = the engine's). Written "128:50,256:50,512", or "512/m20" for a history of
    20 pairs."""

    coarse: tuple[tuple[int, int], ...]
    final: int
    history: int | None = None

    @classmethod
    def parse(cls, text: str) -> Schedule:
        text, _, history = text.partition("/m")
        parts = text.split(",")
        coarse = tuple((int(a), int(b)) for a, b in (p.split(":") for p in parts[:-1]))
        return cls(coarse, int(parts[-1]), int(history) if history else None)

    @property
    def name(self) -> str:
        stages = ",".join([f"{s}:{i}" for s, i in self.coarse] + [str(self.final)])
        return f"{stages}/m{self.history}" if self.history else stages


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def run_name(content: Path, style: Path, schedule: str) -> str:
    name = schedule.replace(":", "x").replace(",", "_").replace("/", "_")
    return f"{content.stem}__{style.stem}__{name}.json"


def run_curves(args: argparse.Namespace) -> None:
    # Imported here so that `report` works without the model.
    from stylize_service.models.paths import default_model_path
    from stylize_service.server.engine.engine import Engine
    from stylize_service.server.engine.lbfgs_workspace import MAXCOR
    from stylize_service.server.engine.memory import JobMemory
    from stylize_service.server.engine.pyramid import Stage
    from stylize_service.server.engine.resample import scaled_size
    from stylize_service.server.engine.types import (
        Init,
        Progress,
        StyleSource,
        StylizeCancelled,
        StylizeSettings,
    )

    engine = Engine(default_model_path())
    engine.warm_up()
    args.out.mkdir(parents=True, exist_ok=True)
    # tolerance 0: every iteration runs, so the curves show what any early-stop rule would give.
    settings = StylizeSettings(
        max_size=args.size, iterations=args.iterations, init=Init.CONTENT, tolerance=0.0
    )

    class Recorder:
        """Records each iteration; stops the final stage at the target loss or the cost cap."""

        def __init__(self, stages: int, target: float | None, cap: float | None) -> None:
            self.stages, self.target, self.cap = stages, target, cap
            self.points: list[dict[str, float]] = []
            self.cpu_start = time.process_time()
            self.stop = False

        def on_progress(self, p: Progress) -> None:
            self.points.append(
                {
                    "iteration": p.iteration,
                    "evaluations": p.evaluations,
                    "stage": p.stage,
                    "width": p.width,
                    "height": p.height,
                    "loss": p.losses.total,
                    "seconds": p.elapsed_seconds,
                    "cpu_seconds": time.process_time() - self.cpu_start,
                }
            )
            final = p.stage == self.stages - 1
            if final and self.target is not None and p.losses.total <= self.target:
                self.stop = True
            if final and self.cap is not None and with_cost(self.points)[-1]["cost"] >= self.cap:
                self.stop = True

        def on_frame(self, iteration: int, image: np.ndarray) -> None:
            pass

        def should_stop(self) -> bool:
            return self.stop

    for content_path, style_path in args.pair:
        content, style = load(content_path), [StyleSource(load(style_path))]
        height, width = content.shape[:2]
        single = args.out / run_name(content_path, style_path, str(args.size))
        names = [str(args.size), *args.schedules]
        for schedule_text in names:
            path = args.out / run_name(content_path, style_path, schedule_text)
            if path.exists():
                print(f"skip {path.name} (saved)")
                continue
            schedule = Schedule.parse(schedule_text)
            if schedule_text != str(args.size):
                reference = json.loads(single.read_text())
                target = reference["points"][-1]["loss"]
                cap = args.cost_cap * with_cost(reference["points"])[-1]["cost"]
                final_iterations = 10 * args.iterations  # the target or the cap ends it
            else:
                target, cap, final_iterations = None, None, args.iterations
            stages = [
                Stage(i, len(schedule.coarse) + 1, *scaled_size(width, height, size), iterations=n)
                for i, (size, n) in enumerate([*schedule.coarse, (schedule.final, final_iterations)])
            ]
            memory = JobMemory(
                (None,) * len(stages),
                (schedule.history or MAXCOR,) * len(stages),
                peak_bytes=0,
                style_schemes=(None,) * len(stages),
            )
            style_sizes = [(s.image.shape[1], s.image.shape[0]) for s in style]
            planned = engine.plan((width, height), style_sizes, settings, schedule=stages)
            plan = dataclasses.replace(planned, memory=memory)
            recorder = Recorder(len(stages), target, cap)
            load_before = os.getloadavg()[0]
            try:
                engine.stylize(content, style, settings, recorder, plan=plan)
                ended = "iterations"
            except StylizeCancelled:
                ended = "target" if target is not None and recorder.points[-1]["loss"] <= target else "cap"
            record = {
                "content": content_path.name,
                "style": style_path.name,
                "schedule": schedule.name,
                "size": [stages[-1].width, stages[-1].height],
                "ended": ended,
                "load_average": [load_before, os.getloadavg()[0]],
                "points": recorder.points,
            }
            path.write_text(json.dumps(record))
            last = recorder.points[-1]
            print(
                f"{path.name}: {last['iteration']} iterations, {last['evaluations']} evaluations, "
                f"{last['seconds']:.0f} s, loss {last['loss']:.6g} ({ended}), load {load_before:.1f}",
                flush=True,
            )


def with_cost(points: list[dict], step_cost: float = 0.0) -> list[dict]:
    """Each point with "cost": the evaluations so far, each weighted by its stage's pixels over the final
    stage's (an evaluation's time is linear in the pixels), plus `step_cost` evaluations for each
    iteration's L-BFGS-B step (weighted alike: the step is linear in the variables), a figure that the
    machine's load does not move."""
    final = points[-1]["width"] * points[-1]["height"]
    stage, cost_before, cost = -1, 0.0, 0.0
    start = {"evaluations": 0, "iteration": 0}
    out = []
    for point in points:
        if point["stage"] != stage:
            stage, cost_before = point["stage"], cost
            start = out[-1] if out else start
        work = (point["evaluations"] - start["evaluations"]) + step_cost * (
            point["iteration"] - start["iteration"]
        )
        cost = cost_before + work * point["width"] * point["height"] / final
        out.append({**point, "cost": cost})
    return out


def parse_step_costs(items: list[str]) -> dict[int, float]:
    """--step-cost PAIRS=EVALUATIONS ...: L-BFGS-B's step per iteration, in evaluations, by history."""
    costs = {}
    for item in items:
        pairs, _, value = item.partition("=")
        costs[int(pairs)] = float(value)
    return costs


@dataclass(frozen=True)
class Compared:
    """One pair's runs against its single-scale run: `reference` is that run's last point (L_ref, its
    time and cost), `runs` are (schedule, final-stage points), single scale first."""

    content: str
    style: str
    reference: dict
    runs: list[tuple[str, dict, list[dict]]]


def compared(out: Path, size: int, step_costs: dict[int, float] | None = None) -> list[Compared]:
    """The saved runs, by pair, of the pairs whose single-scale run is saved. step_costs: L-BFGS-B's step
    in evaluations by history (parse_step_costs), counted into each run's cost; a history not given
    counts 0."""
    from stylize_service.server.engine.lbfgs_workspace import MAXCOR

    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for path in sorted(out.glob("*.json")):
        run = json.loads(path.read_text())
        history = Schedule.parse(run["schedule"]).history or MAXCOR
        run["points"] = with_cost(run["points"], (step_costs or {}).get(history, 0.0))
        pairs.setdefault((run["content"], run["style"]), {})[run["schedule"]] = run
    result = []
    for (content, style), by_schedule in pairs.items():
        if str(size) not in by_schedule:
            continue
        runs = []
        for name, run in sorted(by_schedule.items(), key=lambda kv: (kv[0] != str(size), kv[0])):
            final_stage = max(p["stage"] for p in run["points"])
            runs.append((name, run, [p for p in run["points"] if p["stage"] == final_stage]))
        result.append(Compared(content, style, by_schedule[str(size)]["points"][-1], runs))
    return result


def first_at(final: list[dict], bound: float) -> dict | None:
    return next((point for point in final if point["loss"] <= bound), None)


def early_stop(final: list[dict], tolerance: float, window: int) -> dict | None:
    """Where the engine's rule (optimizer.Convergence) would have stopped the final stage."""
    from stylize_service.server.engine.optimizer import Convergence

    rule = Convergence(tolerance, window)
    return next((point for point in final if rule.converged(point["loss"])), None)


def fraction(point: dict, reference: dict) -> str:
    """Wall time as a fraction of the reference's, and in brackets the same in full-size evaluations."""
    return f"{point['seconds'] / reference['seconds']:.2f} ({point['cost'] / reference['cost']:.2f})"


def report(args: argparse.Namespace) -> None:
    step_costs = parse_step_costs(args.step_cost)
    pairs = compared(args.out, args.size, step_costs)
    steps = (
        ", L-BFGS-B's steps included at "
        + ", ".join(
            f"{cost:g} of an evaluation with {pairs} pairs" for pairs, cost in sorted(step_costs.items())
        )
        if step_costs
        else ""
    )
    print(
        "Time to come within 2% and 1% of L_ref and to reach it, as a fraction of the single-scale run's "
        f"time (in brackets: of its cost, full-size evaluations{steps})"
    )
    print()
    print(
        f"| pair | schedule | full-size iterations | to 2% of L_ref | to 1% | to L_ref | "
        f"loss at {args.goal_cost:g} of the cost | ended |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        reference = pair.reference
        for name, run, final in pair.runs:
            cells = []
            for goal in GOALS:
                point = first_at(final, reference["loss"] * (1 + goal))
                cells.append(fraction(point, reference) if point else "not reached")
            within = [p for p in final if p["cost"] <= args.goal_cost * reference["cost"]]
            cells.append(f"{within[-1]['loss'] / reference['loss']:.3f} x L_ref" if within else "-")
            print(
                f"| {pair.content} / {pair.style} | {name} | {len(final) - 1} | {' | '.join(cells)} | "
                f"{run['ended']} |"
            )
        print(
            f"| {pair.content} / {pair.style} | L_ref = {reference['loss']:.6g} after "
            f"{reference['seconds']:.0f} s, {reference['evaluations']} evaluations | | | | | | |"
        )
    print()
    print(
        f"Early stop of the final stage (window {args.window} iterations): time as above, and the loss "
        "reached against L_ref"
    )
    print()
    print("| pair | schedule | " + " | ".join(f"tolerance {t:g}" for t in args.tolerances) + " |")
    print("|---|---|" + "---|" * len(args.tolerances))
    for pair in pairs:
        for name, _, final in pair.runs:
            cells = []
            for tolerance in args.tolerances:
                stop = early_stop(final, tolerance, args.window)
                loss = f"{100 * (stop['loss'] / pair.reference['loss'] - 1):+.1f}%" if stop else ""
                cells.append(f"{fraction(stop, pair.reference)}, {loss}" if stop else "-")
            print(f"| {pair.content} / {pair.style} | {name} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(pairs, args)


def plot(pairs: list[Compared], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), squeeze=False)
    for axis, pair in zip(axes[0], pairs, strict=True):
        for name, _, final in pair.runs:
            axis.plot(
                [p["cost"] / pair.reference["cost"] for p in final],
                [p["loss"] / pair.reference["loss"] for p in final],
                label="single scale" if name == str(args.size) else name,
                linewidth=1.2,
            )
        axis.axhline(1.02, color="grey", linestyle="--", linewidth=0.8)
        axis.axvline(0.35, color="grey", linestyle=":", linewidth=0.8)
        axis.set_ylim(0.98, 1.3)
        axis.set_xlim(0, 1.02)
        axis.set_xlabel(f"cost / that of {args.iterations} single-scale iterations")
        axis.set_ylabel("full-resolution loss / L_ref")
        axis.set_title(f"{pair.content} in the style of {pair.style}", fontsize=10)
        axis.legend(fontsize=8)
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=100)
    print(f"\nwrote {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["run", "report"])
    parser.add_argument("--pair", nargs=2, type=Path, action="append", metavar=("CONTENT", "STYLE"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=500, help="single-scale iterations (gives L_ref)")
    parser.add_argument("--schedules", nargs="+", default=DEFAULT_SCHEDULES)
    parser.add_argument("--cost-cap", type=float, default=0.6, help="of the single-scale evaluations")
    parser.add_argument("--window", type=int, default=10, help="early stop: iterations compared")
    parser.add_argument(
        "--goal-cost", type=float, default=0.35, help="report: the loss reached at this share of the cost"
    )
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-2, 5e-3, 2e-3, 1e-3])
    parser.add_argument("--out", type=Path, default=Path("out/schedules"))
    parser.add_argument(
        "--plot", type=Path, default=None, help="report: write the curves here (PNG), against the cost"
    )
    parser.add_argument(
        "--step-cost",
        nargs="+",
        default=[],
        metavar="PAIRS=EVALUATIONS",
        help="report: L-BFGS-B's step per iteration in evaluations, by correction pairs (scripts/"
        "benchmark_overhead.py --parts 2 --iterations 60 --histories ..., its last column); default 0",
    )
    args = parser.parse_args()
    args.pair = args.pair or DEFAULT_PAIRS
    if args.step == "run":
        run_curves(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
