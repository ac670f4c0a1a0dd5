"""L-BFGS-B's memory, as facts: how many correction pairs it keeps and what its workspaces hold.

Pure (no scipy), so that the memory model can count what server/engine/optimizer.py allocates for scipy's
setulb without importing it; both read the sizes here.
"""

from __future__ import annotations

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
