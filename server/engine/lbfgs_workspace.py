"""L-BFGS-B's memory, as facts: how many correction pairs it keeps and what its workspaces hold.

Pure (no scipy), so that the memory model can count what server/engine/optimizer.py allocates for scipy's
setulb without importing it; both read the sizes here. OptimizerState, what those workspaces hold between
two calls of setulb, lives here for the same reason: checkpoints carry it and are sized without scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# L-BFGS-B correction pairs. More pairs save evaluations but not time: setulb's step grows with them
# (0.12 of an evaluation at 512 px with 10, 0.22 with 20), and 20, 30 or 50 came within 2% of the
# 500-iteration loss at most 6% sooner than 10 (docs: design decisions, L-BFGS-B's history).
MAXCOR = 10


def workspace_lengths(variables: int, history: int) -> tuple[int, int]:
    """The lengths of setulb's float64 workspace `wa` and int32 workspace `iwa` for n = variables and
    m = history: 2mn + 5n + 11m² + 8m and 3n."""
    n, m = variables, history
    return 2 * m * n + 5 * n + 11 * m * m + 8 * m, 3 * n


def lbfgs_bytes_per_variable(history: int) -> int:
    """Bytes per variable of one L-BFGS-B run: setulb's float64 workspace (2 * history + 5 vectors, from
    workspace_lengths) and its int32 one (3); x, its last evaluated copy, the gradient and both bounds
    (float64); the bound kinds (int32); our float32 copies of the point and the gradient."""
    float64_per_variable = workspace_lengths(1, history)[0] - workspace_lengths(0, history)[0]
    int32_per_variable = workspace_lengths(1, history)[1]
    return 8 * float64_per_variable + 4 * int32_per_variable + 8 * 5 + 4 + 8


# The sizes of setulb's small state arrays: its task codes, and the logical, integer and float scalars it
# keeps between calls (scipy.optimize._lbfgsb_py allocates the same).
TASK_LENGTH, LSAVE_LENGTH, ISAVE_LENGTH, DSAVE_LENGTH = 2, 4, 44, 29


@dataclass(frozen=True, eq=False)
class OptimizerState:
    """Everything server.engine.optimizer.minimize_direct keeps between two calls of setulb, taken at an
    iteration boundary: continuing from it repeats the uninterrupted run bit for bit. Defined here, away
    from scipy, so that checkpoints can be read and sized without importing it. Arrays are flat copies.

    `routine` names the setulb that made it (scipy's version): its private layout may change with scipy,
    so a state is only resumed by the same routine."""

    routine: str
    history: int  # m, the correction pairs the workspaces are sized for
    x: np.ndarray  # float64 (n,): the accepted iterate
    f: float  # the loss setulb was last handed
    g: np.ndarray  # float64 (n,): the gradient setulb was last handed (it may have written into it)
    wa: np.ndarray  # float64 workspace_lengths(n, m)[0]: the correction pairs and setulb's vectors
    iwa: np.ndarray  # int32 (3n,)
    task: np.ndarray  # int32 (2,)
    ln_task: np.ndarray  # int32 (2,)
    lsave: np.ndarray  # int32 (4,)
    isave: np.ndarray  # int32 (44,)
    dsave: np.ndarray  # float64 (29,)
    evaluated_x: np.ndarray  # float64 (n,): the point last evaluated, answered from memory if asked again
    loss: float  # that evaluation's loss
    grad: np.ndarray  # (n,), the objective's dtype: that evaluation's gradient
    evaluations: int  # in this optimisation, for its maxfun rule
    iterations: int  # likewise, for maxiter

    @property
    def variables(self) -> int:
        return int(self.x.size)

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields by name."""
        return {name: getattr(self, name) for name in _STATE_DTYPES}

    def check(self) -> None:
        """Raises ValueError unless every array has the dtype and length setulb expects for this many
        variables and this history: setulb trusts its arguments' sizes, so a state that does not fit must
        never reach it."""
        n = self.variables
        wa_length, iwa_length = workspace_lengths(n, self.history)
        lengths = {
            "x": n,
            "g": n,
            "wa": wa_length,
            "iwa": iwa_length,
            "task": TASK_LENGTH,
            "ln_task": TASK_LENGTH,
            "lsave": LSAVE_LENGTH,
            "isave": ISAVE_LENGTH,
            "dsave": DSAVE_LENGTH,
            "evaluated_x": n,
            "grad": n,
        }
        if self.history < 1 or self.evaluations < 1 or self.iterations < 0:
            raise ValueError(
                f"L-BFGS-B state: history {self.history}, evaluations {self.evaluations}, "
                f"iterations {self.iterations} are out of range"
            )
        for name, array in self.arrays().items():
            dtype = _STATE_DTYPES[name]
            if array.ndim != 1 or array.size != lengths[name]:
                raise ValueError(
                    f"L-BFGS-B state: {name} has shape {array.shape}, expected ({lengths[name]},) "
                    f"for {n} variables and history {self.history}"
                )
            if dtype is not None and array.dtype != dtype:
                raise ValueError(f"L-BFGS-B state: {name} is {array.dtype}, expected {np.dtype(dtype)}")
            if dtype is None and array.dtype.kind != "f":
                raise ValueError(f"L-BFGS-B state: {name} is {array.dtype}, expected a float dtype")


# Each array field's dtype (None: any float, the objective's gradient as it returned it).
_STATE_DTYPES: dict[str, type[np.generic] | None] = {
    "x": np.float64,
    "g": np.float64,
    "wa": np.float64,
    "iwa": np.int32,
    "task": np.int32,
    "ln_task": np.int32,
    "lsave": np.int32,
    "isave": np.int32,
    "dsave": np.float64,
    "evaluated_x": np.float64,
    "grad": None,
}


def state_bytes(variables: int, history: int, grad_itemsize: int = 4) -> int:
    """The bytes of an OptimizerState's arrays for n = variables and m = history (the gradient float32,
    as the network's are): about (8 * (2m + 8) + 12 + grad_itemsize) bytes per variable."""
    n = variables
    wa_length, iwa_length = workspace_lengths(n, history)
    float64s = 3 * n + wa_length + DSAVE_LENGTH  # x, g, evaluated_x, wa, dsave
    int32s = iwa_length + 2 * TASK_LENGTH + LSAVE_LENGTH + ISAVE_LENGTH
    return 8 * float64s + 4 * int32s + grad_itemsize * n
