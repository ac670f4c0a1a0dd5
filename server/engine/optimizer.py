"""scipy's L-BFGS-B driving a loss+gradient function, one report per iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, OptimizeResult, minimize

from .network import Evaluation


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
    on_step: Callable[[Step], None],
    before_evaluation: Callable[[], None],
) -> Step:
    """Minimise from x0 for at most `iterations` L-BFGS iterations within the pixel bounds.

    `before_evaluation` runs before every evaluation and may raise to abandon the run (cancellation).
    on_step sees the starting point (iteration 0) and every iteration's accepted point. Returns the last step.
    """
    shape = x0.shape
    last: list[Step] = []
    count = {"evaluations": 0, "iterations": 0}

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        before_evaluation()
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
        if not np.array_equal(step.x.ravel(), intermediate_result.x.astype(np.float32)):
            # L-BFGS-B accepts the last point its line search evaluated, so this does not happen in
            # practice; evaluate again rather than report losses of another point.
            x = intermediate_result.x.reshape(shape).astype(np.float32)
            before_evaluation()
            count["evaluations"] += 1
            step = Step(0, count["evaluations"], x, evaluate(x))
        step = Step(count["iterations"], count["evaluations"], step.x, step.evaluation)
        last[:] = [step]
        on_step(step)

    minimize(
        fun,
        x0.astype(np.float64).ravel(),
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(*bounds),
        callback=callback,
        # ftol and gtol of zero: run the iterations asked for unless the line search can make no progress.
        options={
            "maxiter": iterations,
            "maxfun": 2 * iterations + 20,
            "maxcor": 10,
            "ftol": 0.0,
            "gtol": 0.0,
        },
    )
    return last[0]
