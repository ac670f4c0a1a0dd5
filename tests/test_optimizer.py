"""run_lbfgs and its two L-BFGS-B drivers: the same iterates as scipy.optimize.minimize, the reports, the
stopping rules, cancellation, bad bounds, the fallback to the public driver, and BLAS held at one thread.

The problems are small enough that BLAS never splits its work over threads, so holding it at one thread
does not change their iterates: run_lbfgs must reproduce the old path bit for bit."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import OptimizeResult, minimize
from threadpoolctl import threadpool_info, threadpool_limits

from stylize_service.server.engine import optimizer
from stylize_service.server.engine.network import Evaluation
from stylize_service.server.engine.optimizer import (
    Convergence,
    LbfgsOptions,
    Step,
    driver,
    minimize_direct,
    minimize_public,
    run_lbfgs,
    single_threaded_blas,
)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SHAPE = (1, 3, 6, 8)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def pixel_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Per-channel bounds shaped like the network's (pixels in [0, 1], normalised), flattened."""
    _, channels, height, width = SHAPE
    low = np.broadcast_to((-MEAN / STD)[:, None, None], (channels, height, width))
    high = np.broadcast_to(((1 - MEAN) / STD)[:, None, None], (channels, height, width))
    return low.astype(np.float64).ravel(), high.astype(np.float64).ravel()


class Problem:
    """A smooth, non-convex loss of an image (distance to a target plus a Rosenbrock-like coupling of
    neighbouring pixels) whose target lies partly outside the bounds, so that a line search takes several
    evaluations and bounds become active. Records every evaluated x."""

    def __init__(self) -> None:
        self.target = np.random.default_rng(0).normal(scale=2.5, size=SHAPE).astype(np.float32)
        self.evaluated: list[bytes] = []

    def __call__(self, x: np.ndarray) -> Evaluation:
        assert x.dtype == np.float32 and x.shape == SHAPE
        self.evaluated.append(x.tobytes())
        x64 = x.astype(np.float64)
        d = x64 - self.target
        left, right = x64[..., :-1], x64[..., 1:]
        r = right - left * left
        loss = float(np.sum(d**2) + np.sum(r**2))
        grad = 2 * d
        grad[..., 1:] += 2 * r
        grad[..., :-1] -= 4 * left * r
        return Evaluation(loss, {"content": loss}, {}, grad.astype(np.float32))


def start() -> np.ndarray:
    """A start with pixels beyond the bounds on both sides (scipy clips it into them)."""
    return np.random.default_rng(7).normal(scale=3.0, size=SHAPE).astype(np.float32)


def reference_run_lbfgs(
    evaluate: Callable[[np.ndarray], Evaluation],
    x0: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    iterations: int,
    on_step: Callable[[Step], None],
) -> Step:
    """run_lbfgs as it was before the direct driver: scipy.optimize.minimize with the bounds as a list of
    (low, high) pairs, the same options and the same reporting."""
    shape = x0.shape
    last: list[Step] = []
    count = {"evaluations": 0, "iterations": 0}

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = flat.reshape(shape).astype(np.float32)
        evaluation = evaluate(x)
        count["evaluations"] += 1
        step = Step(count["iterations"], count["evaluations"], x, evaluation)
        last[:] = [step]
        if count["evaluations"] == 1:
            on_step(step)
        return evaluation.loss, evaluation.grad.astype(np.float64).ravel()

    def callback(intermediate_result: OptimizeResult) -> None:
        count["iterations"] += 1
        step = last[0]
        assert np.array_equal(step.x.ravel(), intermediate_result.x.astype(np.float32))
        step = Step(count["iterations"], count["evaluations"], step.x, step.evaluation)
        last[:] = [step]
        on_step(step)

    minimize(
        fun,
        x0.astype(np.float64).ravel(),
        jac=True,
        method="L-BFGS-B",
        bounds=list(zip(*bounds, strict=True)),
        callback=callback,
        options={
            "maxiter": iterations,
            "maxfun": 2 * iterations + 20,
            "maxcor": 10,
            "ftol": 0.0,
            "gtol": 0.0,
        },
    )
    return last[0]


def report(step: Step) -> tuple[int, int, bytes, float]:
    return step.iteration, step.evaluations, step.x.tobytes(), step.evaluation.loss


def run_both(iterations: int) -> tuple[list, list]:
    """(reports, evaluated points, last step) of the reference and of run_lbfgs on the same problem."""
    results = []
    for run in ("reference", "run_lbfgs"):
        problem, steps = Problem(), []
        if run == "reference":
            last = reference_run_lbfgs(problem, start(), pixel_bounds(), iterations, steps.append)
        else:
            last = run_lbfgs(problem, start(), pixel_bounds(), iterations, steps.append, lambda: None)
        results.append(([report(s) for s in steps], problem.evaluated, report(last)))
    return results[0], results[1]


@pytest.fixture
def fresh_driver_choice() -> Iterator[None]:
    """Forget the cached driver choice before and after a test that changes what the probe sees."""
    driver.cache_clear()
    yield
    driver.cache_clear()


def test_the_installed_scipy_is_driven_directly() -> None:
    # Fails when a scipy upgrade changes its private L-BFGS-B routine: run_lbfgs then still works through
    # scipy.optimize.minimize, only with its slow set-up, and minimize_direct needs a look.
    assert driver() is minimize_direct


@pytest.mark.parametrize("iterations", [1, 12, 40])
def test_run_lbfgs_reproduces_scipy_minimize_with_list_bounds(iterations: int) -> None:
    reference, ours = run_both(iterations)
    assert ours == reference
    reports, evaluated, last = ours
    assert [r[0] for r in reports] == list(range(len(reports)))  # iteration 0 (the start), 1, 2, ...
    assert len(reports) == iterations + 1
    assert last == reports[-1]
    assert len(evaluated) > iterations + 1  # some line searches needed more than one evaluation


def test_iterates_stay_within_the_bounds_and_the_loss_falls() -> None:
    low, high = pixel_bounds()
    steps: list[Step] = []
    run_lbfgs(Problem(), start(), (low, high), 25, steps.append, lambda: None)
    for step in steps:
        flat = step.x.astype(np.float64).ravel()
        # float32 rounding of a point on a bound may land just outside it
        assert np.all(flat >= low - 1e-6) and np.all(flat <= high + 1e-6)
    losses = [s.evaluation.loss for s in steps]
    assert all(b <= a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.3 * losses[0]
    at_bounds = np.isclose(steps[-1].x.ravel(), low, atol=1e-6) | np.isclose(
        steps[-1].x.ravel(), high, atol=1e-6
    )
    assert at_bounds.any()  # the problem does exercise the bounds


def record(drive: optimizer.Driver, x0: np.ndarray, lower, upper, options: LbfgsOptions) -> list:
    """Every evaluation and every accepted point of one drive over a Rosenbrock-like function."""
    events: list = []

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x[:-1], x[1:]
        loss = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
        grad = np.zeros_like(x)
        grad[:-1] += -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
        grad[1:] += 200.0 * (b - a * a)
        events.append(("f", x.tobytes(), loss))
        return loss, grad

    drive(fun, x0, lower, upper, options, lambda x: events.append(("x", x.tobytes())))
    return events


@pytest.mark.parametrize(
    "case",
    ["two-sided", "one-sided and free", "unbounded", "maxfun stops first"],
)
def test_the_drivers_give_identical_iterates(case: str) -> None:
    n = 30
    x0 = np.linspace(-2.0, 2.5, n)
    lower, upper = np.full(n, -1.5), np.full(n, 0.9)
    options = LbfgsOptions(maxiter=40, maxfun=100)
    if case == "one-sided and free":
        lower[::3] = -np.inf
        upper[1::3] = np.inf
        lower[2::5], upper[2::5] = -np.inf, np.inf
    elif case == "unbounded":
        lower[:], upper[:] = -np.inf, np.inf
        x0 = np.linspace(-1.0, 1.2, n)
    elif case == "maxfun stops first":
        options = LbfgsOptions(maxiter=40, maxfun=12)
    direct = record(minimize_direct, x0, lower, upper, options)
    public = record(minimize_public, x0, lower, upper, options)
    assert direct == public
    accepted = sum(1 for e in direct if e[0] == "x")
    evaluations = sum(1 for e in direct if e[0] == "f")
    if case == "maxfun stops first":
        # scipy checks maxfun only at the end of an iteration, so the count may pass it a little
        assert accepted < options.maxiter and evaluations > options.maxfun
    else:
        assert accepted == options.maxiter


@pytest.mark.parametrize("case", ["two-sided", "maxfun stops first"])
def test_a_captured_state_resumes_the_direct_driver_bit_for_bit(case: str) -> None:
    """Interrupted at an iteration boundary (its state taken, the run ended there) and resumed from the
    state, twice over: the evaluations and iterates are the uninterrupted run's, bit for bit."""
    n = 30
    x0, lower, upper = np.linspace(-2.0, 2.5, n), np.full(n, -1.5), np.full(n, 0.9)
    lower[::4] = -np.inf  # one-sided variables too
    options = LbfgsOptions(maxiter=40, maxfun=12 if case == "maxfun stops first" else 100)
    uninterrupted = record(minimize_direct, x0, lower, upper, options)

    capture = optimizer.StateCapture()
    events: list = []
    taken: list[optimizer.OptimizerState] = []

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x[:-1], x[1:]
        loss = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
        grad = np.zeros_like(x)
        grad[:-1] += -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
        grad[1:] += 200.0 * (b - a * a)
        events.append(("f", x.tobytes(), loss))
        return loss, grad

    def interrupt_at_fifth(x: np.ndarray) -> bool:
        events.append(("x", x.tobytes()))
        if sum(1 for e in events if e[0] == "x") < 5:
            return False
        state = capture.take()
        assert state is not None
        taken.append(state)
        return True  # the "crash"

    minimize_direct(fun, x0, lower, upper, options, interrupt_at_fifth, capture=capture)
    assert capture.take() is None  # nothing on offer outside a callback
    (state,) = taken
    assert state.iterations == 5 and state.routine == optimizer.routine_id()
    state.check()
    before = list(events)
    for _ in range(2):  # a state resumes as often as asked: the driver works on copies
        events[:] = before
        minimize_direct(
            fun, np.zeros(n), lower, upper, options, lambda x: events.append(("x", x.tobytes())), resume=state
        )
        assert events == uninterrupted


def test_a_state_that_does_not_fit_is_refused_before_setulb_sees_it() -> None:
    n = 30
    x0, lower, upper = np.linspace(-2.0, 2.5, n), np.full(n, -1.5), np.full(n, 0.9)
    capture = optimizer.StateCapture()
    taken: list[optimizer.OptimizerState] = []
    options = LbfgsOptions(maxiter=10, maxfun=40)

    def stop(x: np.ndarray) -> bool:
        taken.append(capture.take())  # type: ignore[arg-type]
        return True

    minimize_direct(lambda x: (float(np.sum(x**2)), 2 * x), x0, lower, upper, options, stop, capture=capture)
    with pytest.raises(ValueError, match=r"history 10, 30 variables cannot resume under .* history 5"):
        minimize_direct(
            lambda x: (0.0, x), x0, lower, upper, LbfgsOptions(10, 40, maxcor=5), stop, resume=taken[0]
        )
    with pytest.raises(ValueError, match=r"scipy\.optimize\.minimize cannot resume"):
        minimize_public(lambda x: (0.0, x), x0, lower, upper, options, stop, resume=taken[0])
    truncated = dataclasses.replace(taken[0], wa=taken[0].wa[:-1])
    with pytest.raises(ValueError, match="wa has shape"):
        minimize_direct(lambda x: (0.0, x), x0, lower, upper, options, stop, resume=truncated)


def test_run_lbfgs_resumed_from_a_state_reports_the_rest_of_the_run() -> None:
    """on_continue hands out the state where the run goes on (not after its last iteration); run_lbfgs
    resumed from it reports no starting point and the same later steps as the uninterrupted run."""
    full: list[Step] = []
    run_lbfgs(Problem(), start(), pixel_bounds(), 9, full.append, lambda: None)
    states: dict[int, optimizer.OptimizerState | None] = {}

    def on_continue(step: Step, state: Callable[[], optimizer.OptimizerState | None]) -> None:
        states[step.iteration] = state()

    run_lbfgs(Problem(), start(), pixel_bounds(), 9, lambda step: None, lambda: None, on_continue=on_continue)
    assert sorted(states) == list(range(1, 9))  # not iteration 0, not the last
    rest: list[Step] = []
    last = run_lbfgs(Problem(), start(), pixel_bounds(), 9, rest.append, lambda: None, resume=states[4])
    assert [s.iteration for s in rest] == list(range(5, 10))
    assert [(s.evaluations, s.x.tobytes(), s.evaluation.loss) for s in rest] == [
        (s.evaluations, s.x.tobytes(), s.evaluation.loss) for s in full[5:]
    ]
    assert last.x.tobytes() == full[-1].x.tobytes()


def test_convergence_compares_the_loss_with_the_one_a_window_earlier() -> None:
    rule = Convergence(tolerance=0.01, window=3)
    # Improvements over three iterations: 100 -> 90 (10%), 95 -> 89 (6.3%), 90 -> 89.5 (0.6%).
    assert [rule.converged(loss) for loss in (100, 95, 90, 90, 89, 89.5, 89.4)] == [
        False,
        False,
        False,
        False,
        False,
        True,
        True,
    ]
    never = Convergence(tolerance=0.0, window=3)
    assert not any(never.converged(loss) for loss in [5.0] * 20)  # 0 = run every iteration


@pytest.mark.parametrize("drive", [minimize_direct, minimize_public])
def test_an_iteration_callback_that_returns_true_ends_the_optimisation(drive: Callable) -> None:
    n = 30
    x0, lower, upper = np.linspace(-2.0, 2.5, n), np.full(n, -1.5), np.full(n, 0.9)
    accepted: list[np.ndarray] = []

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(np.sum((x - 0.3) ** 4)), (4 * (x - 0.3) ** 3).astype(np.float32)

    def callback(x: np.ndarray) -> bool:
        accepted.append(x.copy())
        return len(accepted) == 4

    drive(fun, x0, lower, upper, LbfgsOptions(maxiter=40, maxfun=100), callback)
    assert len(accepted) == 4


def test_run_lbfgs_stops_after_the_step_that_on_step_calls_converged() -> None:
    problem, steps = Problem(), []

    def on_step(step: Step) -> bool:
        steps.append(step)
        return step.iteration == 6

    last = run_lbfgs(problem, start(), pixel_bounds(), 50, on_step, lambda: None)
    assert last.iteration == 6 and [s.iteration for s in steps] == list(range(7))


def test_cancellation_stops_before_the_next_evaluation() -> None:
    class Cancelled(Exception):
        pass

    problem, steps = Problem(), []
    calls = 0

    def before_evaluation() -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_lbfgs(problem, start(), pixel_bounds(), 50, steps.append, before_evaluation)
    assert len(problem.evaluated) == 4
    assert steps[0].iteration == 0 and steps[0].evaluations == 1
    assert [s.iteration for s in steps] == list(range(len(steps)))


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((np.ones(144), np.zeros(144)), "lower bound is greater"),
        ((np.zeros(143), np.ones(144)), "lower bound has 143 elements, x0 has 144"),
        ((np.zeros(144), np.full(144, np.nan)), "upper bound contains NaN"),
    ],
)
def test_bad_bounds_are_refused_by_name(bounds: tuple[np.ndarray, np.ndarray], message: str) -> None:
    problem = Problem()
    with pytest.raises(ValueError, match=message):
        run_lbfgs(problem, start(), bounds, 5, lambda step: None, lambda: None)
    assert problem.evaluated == []


def test_scalar_bounds_apply_to_every_element() -> None:
    steps: list[Step] = []
    run_lbfgs(Problem(), start(), (np.float64(-0.5), np.float64(0.5)), 5, steps.append, lambda: None)
    assert all(np.abs(s.x).max() <= 0.5 for s in steps)


def test_falls_back_to_minimize_when_the_private_routine_cannot_be_called(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_driver_choice: None
) -> None:
    def changed_signature(*args: object) -> None:
        raise TypeError("setulb() takes 18 positional arguments")

    monkeypatch.setattr(optimizer, "_scipy_lbfgsb", SimpleNamespace(setulb=changed_signature))
    with caplog.at_level(logging.WARNING, logger=optimizer.__name__):
        assert driver() is minimize_public
    assert "calling it failed" in caplog.text and "setulb() takes 18" in caplog.text


def test_falls_back_to_minimize_when_the_private_routine_behaves_differently(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_driver_choice: None
) -> None:
    """A routine that still accepts the call but means something else by an argument (here: fewer
    correction pairs) is caught by the probe rather than trusted."""
    original = optimizer._scipy_lbfgsb.setulb
    seen: list[int] = []

    def other_meaning(m: int, *rest: object) -> object:
        seen.append(m)
        return original(3, *rest)

    monkeypatch.setattr(optimizer, "_scipy_lbfgsb", SimpleNamespace(setulb=other_meaning))
    with caplog.at_level(logging.WARNING, logger=optimizer.__name__):
        assert driver() is minimize_public
    assert seen, "the probe did not call the direct driver"
    assert "iterates differ" in caplog.text
    # Jobs still run, through the public driver, with the same results as before.
    reference, ours = run_both(8)
    assert ours == reference


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_blas_runs_on_one_thread_during_the_optimisation_and_is_restored_after() -> None:
    problem = Problem()
    during: list[list[int]] = []

    def evaluate(x: np.ndarray) -> Evaluation:
        during.append(blas_threads())
        return problem(x)

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and all(t == 2 for t in before), "no BLAS library found to check"
        run_lbfgs(evaluate, start(), pixel_bounds(), 3, lambda step: None, lambda: None)
        assert blas_threads() == before
    assert during and all(threads == [1] * len(before) for threads in during)


def test_overlapping_optimisations_keep_blas_on_one_thread_until_the_last_ends() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        first, second = single_threaded_blas(), single_threaded_blas()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert blas_threads() == [1] * len(before)  # the second still runs
        second.__exit__(None, None, None)
        assert blas_threads() == before
        with single_threaded_blas():  # and the hold can be taken again
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == before


def test_blas_is_restored_when_the_optimisation_is_cancelled() -> None:
    class Cancelled(Exception):
        pass

    def before_evaluation() -> None:
        raise Cancelled

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with pytest.raises(Cancelled):
            run_lbfgs(Problem(), start(), pixel_bounds(), 3, lambda step: None, before_evaluation)
        assert blas_threads() == before


def test_the_overhead_benchmark_times_every_way_on_the_same_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/benchmark_overhead.py part 1 on a tiny image: each way runs, and old and direct evaluate
    the same points (new may differ only where a threaded BLAS would split its sums: not at this size)."""
    spec = importlib.util.spec_from_file_location("benchmark_overhead", SCRIPTS / "benchmark_overhead.py")
    assert spec and spec.loader
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # its dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    runs = {name: benchmark.time_optimizer(way, 12, 16, 4) for name, way in benchmark.WAYS.items()}
    assert set(runs) == {"old", "direct", "new"}
    for run in runs.values():
        assert run.evaluations >= 5 and run.routine > 0 and run.setup > 0
        assert run.evaluated == runs["old"].evaluated
