"""scipy's L-BFGS-B driving a loss+gradient function, one report per iteration.

Two drivers run the same routine (scipy's `setulb`, the L-BFGS-B step) on the same inputs, so they give
the same iterates bit for bit:

- `minimize_public` goes through `scipy.optimize.minimize`. For bounded problems scipy converts the bounds
  into a Python list of pairs and back and then classifies them in a Python loop over every variable:
  about 1.5 s per optimisation at 512x384 (590k variables) and 6 s at 1024x768 before the first
  iteration (scripts/benchmark_overhead.py measures it), plus a handful of full-size copies per
  evaluation.
- `minimize_direct` calls `setulb` itself with bounds prepared as arrays in a few milliseconds. `setulb`
  lives in a private scipy module, so it is used only once a small probe problem has shown that it
  reproduces `minimize_public` exactly on the installed scipy; otherwise `run_lbfgs` logs why and falls
  back to the public driver (slower set-up, same results).

`setulb` calls BLAS for vectors of the image's size. With BLAS threads it took 0.13-0.35 s per evaluation
at 512x384 on two shared cores, against 0.05-0.13 s with one (its calls are too small for threads to pay,
and the threads contend with onnxruntime's and other processes'), so run_lbfgs holds BLAS at one thread
while it runs. A side effect: the iterates no longer depend on the machine's core count (a threaded BLAS
sums in an order that does).

Exact resume: at an iteration boundary `minimize_direct` holds all of setulb's state in its own arrays, so
it can hand out a copy (OptimizerState, through a StateCapture) and later start from one instead of x0;
the continuation is bit-identical to the uninterrupted run. The public driver's state lives inside scipy
and cannot be taken: with it StateCapture.take() gives None and a restart from the iterate is the best
a resume can do.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy
from scipy.optimize import Bounds, OptimizeResult, minimize
from threadpoolctl import ThreadpoolController

from .network import Evaluation

try:  # private: see the module docstring for why, and how its use is guarded
    from scipy.optimize import _lbfgsb as _scipy_lbfgsb
except ImportError:  # pragma: no cover - a scipy without it gets the public driver
    _scipy_lbfgsb = None

from .lbfgs_workspace import (
    DSAVE_LENGTH,
    ISAVE_LENGTH,
    LSAVE_LENGTH,
    MAXCOR,
    TASK_LENGTH,
    OptimizerState,
    workspace_lengths,
)

log = logging.getLogger(__name__)

# flat float64 x -> (loss, gradient with x's size in any float dtype). x is the optimiser's own array: read
# it during the call, never keep or modify it.
Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]
# Called with each iteration's accepted point (flat float64), on the same terms as Objective's x; True
# ends the optimisation there.
IterationCallback = Callable[[np.ndarray], bool]


CONVERGENCE_WINDOW = 10  # iterations over which Convergence measures the improvement


class Convergence:
    """The early stop of a stage: the relative improvement of the loss over the last `window`
    iterations, (L[i - window] - L[i]) / L[i - window], has fallen below `tolerance` (0 = never)."""

    def __init__(
        self, tolerance: float, window: int = CONVERGENCE_WINDOW, recent: tuple[float, ...] = ()
    ) -> None:
        """recent: the losses recorded so far (`recent_losses` of the rule being resumed)."""
        self.tolerance = tolerance
        self.window = window
        self._losses: collections.deque[float] = collections.deque(recent, maxlen=window + 1)

    @property
    def recent_losses(self) -> tuple[float, ...]:
        """The losses the rule still looks at, oldest first: all it needs to go on after a resume."""
        return tuple(self._losses)

    def converged(self, loss: float) -> bool:
        """Record the loss after the next iteration (the first call: the starting point's)."""
        self._losses.append(loss)
        if self.tolerance <= 0 or len(self._losses) <= self.window:
            return False
        before = self._losses[0]  # the loss `window` iterations ago
        return before > 0 and (before - loss) / before < self.tolerance


@dataclass(frozen=True)
class LbfgsOptions:
    """Stopping rules. There are no tolerances: ftol and gtol are zero, so a run does `maxiter` iterations
    unless `maxfun` evaluations are used up or the line search can make no progress."""

    maxiter: int
    maxfun: int
    maxcor: int = MAXCOR  # correction pairs kept (the "limited memory")
    maxls: int = 20  # line-search steps per iteration (scipy's default)


class StateCapture:
    """Copies the driver's state on request while an iteration callback runs: the state at that iteration
    boundary, from which `resume` continues exactly. Outside a callback, or with a driver whose state
    cannot be taken (the public one), take() gives None."""

    def __init__(self) -> None:
        self._source: Callable[[], OptimizerState] | None = None

    def take(self) -> OptimizerState | None:
        """A copy (the run goes on changing its own arrays) of the state at the current boundary."""
        return None if self._source is None else self._source()

    @contextlib.contextmanager
    def offering(self, source: Callable[[], OptimizerState]) -> Iterator[None]:
        """For the driver: take() calls `source` for the duration."""
        self._source = source
        try:
            yield
        finally:
            self._source = None


class Driver(Protocol):
    """Runs L-BFGS-B from x0 (or from `resume`, a state a capture took from the same driver), calling
    `callback` with each accepted point and offering its state through `capture` meanwhile."""

    def __call__(
        self,
        fun: Objective,
        x0: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        options: LbfgsOptions,
        callback: IterationCallback,
        *,
        resume: OptimizerState | None = None,
        capture: StateCapture | None = None,
    ) -> None: ...


# After on_step returned False for an accepted iteration that the optimisation goes on from: the step,
# and a function that copies the optimiser's state there (None where it cannot be taken).
ContinueCallback = Callable[["Step", Callable[[], OptimizerState | None]], None]


@dataclass(frozen=True)
class Step:
    iteration: int  # within this optimisation, 0 = the starting point
    evaluations: int  # within this optimisation
    x: np.ndarray  # float32, the image's shape
    evaluation: Evaluation


def run_lbfgs(
    evaluate: Callable[[np.ndarray], Evaluation],
    x0: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    iterations: int,
    on_step: Callable[[Step], bool],
    before_evaluation: Callable[[], None],
    history: int = MAXCOR,
    *,
    on_continue: ContinueCallback | None = None,
    resume: OptimizerState | None = None,
) -> Step:
    """Minimise from x0 for at most `iterations` L-BFGS iterations within the pixel bounds, keeping
    `history` correction pairs (server.engine.memory shortens it for images too large for the budget).
    on_step returning True after an iteration ends the optimisation there (an early stop).

    `before_evaluation` runs before every evaluation and may raise to abandon the run (cancellation).
    on_step sees the starting point (iteration 0) and every iteration's accepted point. Returns the last step.

    on_continue (checkpoints): called after on_step returned False when the optimisation goes on past that
    iteration, with the step and a function that copies the optimiser's state there (an OptimizerState;
    None with the public driver). resume: such a state, to continue that optimisation exactly instead of
    starting from x0 (x0 then only gives the image's shape); `iterations` and `history` must be the
    ones it ran with. No starting point is reported then: steps go on from the state's iteration.
    """
    shape = x0.shape
    lower, upper = _flat_bounds(bounds, x0.size)
    last: list[Step] = []
    # Resumed: the counts go on from the state's (they equal the driver's own counts).
    count = {
        "evaluations": resume.evaluations if resume else 0,
        "iterations": resume.iterations if resume else 0,
    }
    options = LbfgsOptions(maxiter=iterations, maxfun=2 * iterations + 20, maxcor=history)
    capture = StateCapture() if on_continue is not None else None

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        before_evaluation()
        x = flat.reshape(shape).astype(np.float32)
        evaluation = evaluate(x)
        count["evaluations"] += 1
        step = Step(count["iterations"], count["evaluations"], x, evaluation)
        last[:] = [step]
        if count["evaluations"] == 1:
            on_step(step)  # the starting point: no stop before the first iteration
        return evaluation.loss, evaluation.grad

    def callback(accepted: np.ndarray) -> bool:
        count["iterations"] += 1
        step = last[0]
        if not np.array_equal(step.x.ravel(), accepted.astype(np.float32)):
            # L-BFGS-B accepts the last point its line search evaluated, so this does not happen in
            # practice; evaluate again rather than report losses of another point.
            x = accepted.reshape(shape).astype(np.float32)
            before_evaluation()
            count["evaluations"] += 1
            step = Step(0, count["evaluations"], x, evaluate(x))
        step = Step(count["iterations"], count["evaluations"], step.x, step.evaluation)
        last[:] = [step]
        if on_step(step):
            return True
        if on_continue is not None and not _stops_after(count["iterations"], count["evaluations"], options):
            assert capture is not None
            on_continue(step, capture.take)
        return False

    with single_threaded_blas():
        driver()(
            fun,
            x0.astype(np.float64).ravel(),
            lower,
            upper,
            options,
            callback,
            resume=resume,
            capture=capture,
        )
        if not last:
            # Resumed into a run that ended before evaluating again (setulb stopped at once): report the
            # resumed point itself, evaluated once more.
            before_evaluation()
            x = x0.astype(np.float32)
            last.append(Step(count["iterations"], count["evaluations"] + 1, x, evaluate(x)))
    return last[0]


def _stops_after(iterations: int, evaluations: int, options: LbfgsOptions) -> bool:
    """The stopping rules that both drivers apply after an iteration's callback (scipy's order)."""
    return iterations >= options.maxiter or evaluations > options.maxfun


def exact_resume_available() -> bool:
    """Whether the driver in use can hand out and resume its state (the direct one)."""
    return driver() is minimize_direct


def routine_id() -> str:
    """The setulb whose states minimize_direct takes and resumes (OptimizerState.routine)."""
    return f"scipy {scipy.__version__} setulb"


class _BlasHold:
    """Keeps every BLAS library of the process at one thread while at least one holder is inside
    `held()`, and restores the libraries' own settings when the last one leaves. Counted, so that
    concurrent optimisations neither race nor leave the process limited."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._limit = contextlib.ExitStack()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._limit.enter_context(_blas_controller().limit(limits=1, user_api="blas"))
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._limit.close()  # the libraries' settings from before the first holder


@functools.cache
def _blas_controller() -> ThreadpoolController:
    # Scans the loaded libraries once; scipy's BLAS is loaded by this module's imports.
    return ThreadpoolController()


_blas_hold = _BlasHold()


def single_threaded_blas() -> contextlib.AbstractContextManager[None]:
    """BLAS at one thread for the duration (see the module docstring for why)."""
    return _blas_hold.held()


def _flat_bounds(bounds: tuple[np.ndarray, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Both bounds as flat float64 arrays of `size` (a scalar applies to every element)."""
    flat = []
    for name, bound in zip(("lower", "upper"), bounds, strict=True):
        b = np.asarray(bound, np.float64).ravel()
        if b.size not in (1, size):
            raise ValueError(f"L-BFGS-B bounds: {name} bound has {b.size} elements, x0 has {size}")
        if np.isnan(b).any():
            raise ValueError(f"L-BFGS-B bounds: {name} bound contains NaN")
        flat.append(np.broadcast_to(b, (size,)))
    lower, upper = flat
    if np.any(lower > upper):
        raise ValueError("L-BFGS-B bounds: a lower bound is greater than its upper bound")
    return lower, upper


def minimize_public(
    fun: Objective,
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    options: LbfgsOptions,
    callback: IterationCallback,
    *,
    resume: OptimizerState | None = None,
    capture: StateCapture | None = None,
) -> None:
    """L-BFGS-B through scipy.optimize.minimize (public API; slow bounds set-up for large problems). Its
    state stays inside scipy: `capture` offers nothing, and a `resume` state is refused."""
    if resume is not None:
        raise ValueError("scipy.optimize.minimize cannot resume an L-BFGS-B state")

    def scipy_callback(intermediate_result: OptimizeResult) -> None:
        if callback(intermediate_result.x):
            raise StopIteration  # scipy's way for a callback to end the optimisation

    minimize(
        lambda x: _as_float64(fun(x)),
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(lower, upper),
        callback=scipy_callback,
        options={
            "maxiter": options.maxiter,
            "maxfun": options.maxfun,
            "maxcor": options.maxcor,
            "maxls": options.maxls,
            "ftol": 0.0,
            "gtol": 0.0,
        },
    )


def _as_float64(result: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
    loss, grad = result
    return loss, np.asarray(grad, np.float64).ravel()


# setulb's task codes (scipy.optimize._lbfgsb_py): what the routine asks for when it returns.
_TASK_FG = 3  # evaluate f and g at x
_TASK_NEW_X = 1  # x is the next iterate
_TASK_STOP = 5
_STOP_MAXFUN = 502
_STOP_MAXITER = 504


def minimize_direct(
    fun: Objective,
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    options: LbfgsOptions,
    callback: IterationCallback,
    *,
    resume: OptimizerState | None = None,
    capture: StateCapture | None = None,
) -> None:
    """L-BFGS-B by calling scipy's setulb routine in the loop that scipy.optimize.minimize runs, with the
    bounds prepared as arrays. Same inputs to setulb, hence the same iterates, as `minimize_public`.

    During each callback `capture` offers a copy of the loop's state as it will be when the loop calls
    setulb next (the stopping rules change nothing where the run goes on); `resume` enters the loop with
    such a state in place of x0's start, so the run goes on exactly as the one it was taken from. The
    bounds and options must be that run's."""
    if _scipy_lbfgsb is None:
        raise RuntimeError("this scipy has no scipy.optimize._lbfgsb")
    setulb = _scipy_lbfgsb.setulb
    n = x0.size
    m = options.maxcor
    has_lower, has_upper = np.isfinite(lower), np.isfinite(upper)
    # setulb's bound kinds: 0 none, 1 lower only, 2 both, 3 upper only.
    nbd = np.where(has_lower, np.where(has_upper, 2, 1), np.where(has_upper, 3, 0)).astype(np.int32)
    low = np.where(has_lower, lower, 0.0)
    high = np.where(has_upper, upper, 0.0)

    if resume is not None:
        if resume.routine != routine_id() or resume.history != m or resume.variables != n:
            raise ValueError(
                f"L-BFGS-B state of {resume.routine}, history {resume.history}, {resume.variables} "
                f"variables cannot resume under {routine_id()}, history {m}, {n} variables"
            )
        resume.check()  # setulb trusts the arrays' sizes
        # Copies: the state stays as it was (a checkpoint may be resumed twice).
        x, g, wa, evaluated_x = (np.array(a) for a in (resume.x, resume.g, resume.wa, resume.evaluated_x))
        iwa, task, ln_task = (np.array(a) for a in (resume.iwa, resume.task, resume.ln_task))
        lsave, isave, dsave = (np.array(a) for a in (resume.lsave, resume.isave, resume.dsave))
        f, loss, grad = resume.f, resume.loss, np.array(resume.grad)
        evaluations, iterations = resume.evaluations, resume.iterations
    else:
        # Like scipy: the start is clipped into the bounds and evaluated before the first setulb call, f
        # and g are handed to setulb only when it asks for them, and a request for the point last
        # evaluated is answered from memory.
        x = np.clip(np.asarray(x0, np.float64).ravel(), lower, upper)
        evaluated_x = x.copy()
        loss, grad = fun(x)
        evaluations = 1
        f = 0.0
        g = np.zeros(n, np.float64)  # setulb may write into g; `grad` stays the evaluation's gradient
        # The workspaces are written through at once rather than left to the kernel's lazy zero pages
        # (np.zeros): setulb fills its 2 * m correction columns one pair per iteration, so they would keep
        # growing in resident memory for m iterations after admission. Touched now, a stage reaches its
        # peak in its first iteration, where the memory model (server.engine.memory) is measured.
        wa_length, iwa_length = workspace_lengths(n, m)  # the sizes the memory model counts
        wa = np.full(wa_length, 0.0)  # np.full writes every page
        iwa = np.full(iwa_length, 0, np.int32)
        task = np.zeros(TASK_LENGTH, np.int32)
        ln_task = np.zeros(TASK_LENGTH, np.int32)
        lsave = np.zeros(LSAVE_LENGTH, np.int32)
        isave = np.zeros(ISAVE_LENGTH, np.int32)
        dsave = np.zeros(DSAVE_LENGTH, np.float64)
        iterations = 0
    factr, pgtol = 0.0, 0.0

    def state() -> OptimizerState:
        """A copy of the loop's state, every variable that the next setulb call and its answers read."""
        return OptimizerState(
            routine=routine_id(),
            history=m,
            x=x.copy(),
            f=f,
            g=g.copy(),
            wa=wa.copy(),
            iwa=iwa.copy(),
            task=task.copy(),
            ln_task=ln_task.copy(),
            lsave=lsave.copy(),
            isave=isave.copy(),
            dsave=dsave.copy(),
            evaluated_x=evaluated_x.copy(),
            loss=loss,
            grad=np.array(grad).ravel(),  # np.array: a copy
            evaluations=evaluations,
            iterations=iterations,
        )

    while True:
        setulb(
            m,
            x,
            low,
            high,
            nbd,
            f,
            g,
            factr,
            pgtol,
            wa,
            iwa,
            task,
            lsave,
            isave,
            dsave,
            options.maxls,
            ln_task,
        )
        if task[0] == _TASK_FG:
            if not np.array_equal(x, evaluated_x):
                loss, grad = fun(x)
                evaluations += 1
                np.copyto(evaluated_x, x)
            f = loss
            np.copyto(g, np.ravel(grad))
        elif task[0] == _TASK_NEW_X:
            iterations += 1
            with capture.offering(state) if capture is not None else contextlib.nullcontext():
                stop = callback(x)
            if stop:
                return
            if iterations >= options.maxiter:
                task[:] = (_TASK_STOP, _STOP_MAXITER)
            elif evaluations > options.maxfun:
                task[:] = (_TASK_STOP, _STOP_MAXFUN)
        else:
            return


@functools.cache
def driver() -> Driver:
    """The direct driver where it reproduces the public one on this scipy, else the public one."""
    try:
        same = _record(minimize_direct) == _record(minimize_public)
        reason = "its iterates differ from scipy.optimize.minimize's on a probe problem"
    except Exception as error:  # a changed private signature surfaces as any kind of error
        same, reason = False, f"calling it failed ({error!r})"
    if same:
        return minimize_direct
    log.warning(
        "scipy's L-BFGS-B routine cannot be driven directly: %s; using scipy.optimize.minimize, which adds "
        "seconds of set-up per optimisation for large images",
        reason,
    )
    return minimize_public


def _record(drive: Driver) -> list[tuple[str, bytes, float]]:
    """Every evaluated and accepted point of a small bounded Rosenbrock problem: a start outside the
    bounds, infinite bounds, line searches of several evaluations and a bound active at the end."""
    n = 12
    lower, upper = np.full(n, -1.0), np.full(n, 0.8)
    upper[0], lower[1] = np.inf, -np.inf
    events: list[tuple[str, bytes, float]] = []

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x[:-1], x[1:]
        loss = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
        grad = np.zeros(n)
        grad[:-1] += -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
        grad[1:] += 200.0 * (b - a * a)
        events.append(("f", x.tobytes(), loss))
        return loss, grad.astype(np.float32)  # float32, as the network's gradients are

    def callback(x: np.ndarray) -> bool:
        events.append(("x", x.tobytes(), 0.0))
        return len(events) > 60  # an early stop, which both drivers must honour alike

    drive(fun, np.linspace(-2.0, 2.0, n), lower, upper, LbfgsOptions(maxiter=30, maxfun=80), callback)
    return events
