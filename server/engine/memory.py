"""A job's memory: predicted from its stages, admitted against a budget, and bounded with tiles.

The model counts what a job holds above the idle server at its peak, the largest of its stages:
- L-BFGS-B's state: scipy keeps 2 * history correction vectors and a workspace of 5 more, plus the point,
  its last evaluated copy, gradient and bounds, all float64, integer workspaces, and our float32 copies:
  lbfgs_bytes_per_variable(history) per variable, three variables (colour channels) per pixel;
- the stage's own arrays (content, start point, gradient, targets at full size);
- one loss-and-gradient evaluation: EVAL_BYTES_PER_PIXEL of the stage's pixels untiled, or, tiled, the
  tile sessions and TILE_EVAL_BYTES_PER_PIXEL of the largest tile window.
The per-pixel figures were measured with the default layers (the deepest, relu5_1, with five style
layers) by scripts/benchmark_memory.py, which also prints predicted against measured peaks; deeper or
fewer layers need no more.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from stylize_service.models.graphs import POOLS_BEFORE, LayerChoice
from stylize_service.models.onnx_builder import CHANNELS

from .optimizer import MAXCOR
from .pyramid import Stage
from .tiling import TileLayout

MiB = 2**20
# L-BFGS-B's history (correction pairs) per stage, tried in this order: the full one at any tile size
# first, then shorter ones. Tiles bound the network's memory but not the optimiser's, 16 bytes per
# variable and pair: at 2048x1536 the full history alone takes 2.4 GB, three pairs 1.4 GB. A shorter
# history changes the iterates (each step uses less curvature information), not the loss being
# minimised; Progress reports it (correction_pairs). Nocedal and Wright give 3 to 20 as the usual range.
HISTORIES = (MAXCOR, 5, 3)


def lbfgs_bytes_per_variable(history: int) -> int:
    """setulb's float64 workspace, 2 * history + 5 vectors; x, its last evaluated copy, the gradient and
    both bounds (float64); the bound kinds (int32) and 3 int32 of integer workspace; our float32 copies
    of the point and the gradient."""
    return 8 * (2 * history + 5) + 8 * 5 + 4 + 12 + 8


# Measured (one-iteration single-stage jobs on the Tübingen/Starry Night pair, peak RSS above the warmed-up
# server, with L-BFGS-B's workspace resident from the start; scripts/benchmark_memory.py prints predicted
# against measured): untiled at 512 and 1024 px, 412 and 1520 MB above the L-BFGS state and the stage's
# arrays, i.e. 40 MB and 1.88 KB per pixel. Tiled: 2048x1536 in 256 px tiles (a 416 x 416 window) and
# 4096x3072 in 1024 px tiles (1184 x 1184) held 844 and 6705 MB above those and the whole-size targets,
# which TILE_SESSIONS_BYTES + TILE_EVAL_BYTES_PER_PIXEL x the window covers (925 and 6785 MB). A tiled
# evaluation costs more per window pixel than an untiled one per image pixel: each tile's run also
# takes the whole-image Grams, masks and its share of the gradient.
EVAL_FIXED_BYTES = 40 * MiB
EVAL_BYTES_PER_PIXEL = 1880
TILE_EVAL_BYTES_PER_PIXEL = 5000
TILE_SESSIONS_BYTES = 100 * MiB
STAGE_ARRAY_BYTES_PER_PIXEL = 64  # float32 RGB content, start, point and gradient copies
PLAN_HEADROOM = 0.1  # measured: a server's job peaked 9% above the one-process prediction (README, Memory)
TILE_SIZES = (1024, 768, 512, 384, 256, 128)  # tried largest first when a stage does not fit untiled
DEFAULT_MARGIN_FRACTION = 0.1  # of the machine's or container's memory, left to the kernel and others
MIN_MARGIN_BYTES = 512 * MiB


class MemoryExceeded(Exception):
    """A job cannot fit the memory budget at any tile size."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"the job needs about {needed / MiB:.0f} MB of memory even in the smallest tiles, more than "
            f"the {budget / MiB:.0f} MB this server has for a job; use a smaller max_size"
        )
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class JobMemory:
    """The plan of one job: each stage's tile size (0 = untiled) and L-BFGS-B history (correction
    pairs), and the predicted peak above idle."""

    tiles: tuple[int, ...]
    histories: tuple[int, ...]
    peak_bytes: int


def stage_bytes(stage: Stage, choice: LayerChoice, tile: int, history: int = MAXCOR) -> int:
    """Predicted bytes above idle while `stage` runs, untiled (tile 0) or in tiles of `tile` px, with
    `history` L-BFGS-B correction pairs."""
    pixels = stage.width * stage.height
    held = lbfgs_bytes_per_variable(history) * 3 * pixels + STAGE_ARRAY_BYTES_PER_PIXEL * pixels
    if not tile:
        return held + EVAL_FIXED_BYTES + EVAL_BYTES_PER_PIXEL * pixels
    window_rows, window_cols = TileLayout(stage.height, stage.width, tile, choice).largest_window()
    # The separable terms' targets are kept whole (float32), at their layers' resolutions.
    targets = sum(
        4 * CHANNELS[layer] * pixels // 4 ** POOLS_BEFORE[layer] for layer in choice.layers_of("content")
    )
    return held + targets + TILE_SESSIONS_BYTES + TILE_EVAL_BYTES_PER_PIXEL * window_rows * window_cols


def plan_job(stages: list[Stage], choice: LayerChoice, budget: int | None, forced_tile: int = 0) -> JobMemory:
    """Tile sizes and histories per stage so that the job's predicted peak fits `budget` (bytes above
    idle; None = no limit): the full history where it fits at some tile size, untiled where that fits,
    else the largest tile that fits; only then a shorter history (HISTORIES). forced_tile > 0 tiles
    every stage larger than it. Raises MemoryExceeded when a stage fits in no way."""
    tiles: list[int] = []
    histories: list[int] = []
    peak = 0
    for stage in stages:
        if forced_tile and max(stage.width, stage.height) > forced_tile:
            candidates: tuple[int, ...] = (forced_tile,)
        else:
            candidates = (0, *(t for t in TILE_SIZES if t < max(stage.width, stage.height)))
        needs = [
            (tile, history, stage_bytes(stage, choice, tile, history))
            for history in HISTORIES
            for tile in candidates
        ]
        # Leave PLAN_HEADROOM of the budget unplanned where some way does (the model was measured in one
        # process; a server also holds requests, threads' heaps and encoded images); else use it all.
        roomy = [need for need in needs if budget is None or need[2] <= budget * (1 - PLAN_HEADROOM)]
        fitting = roomy or [need for need in needs if budget is None or need[2] <= budget]
        if not fitting:
            raise MemoryExceeded(min(need for _, _, need in needs), budget or 0)
        tile, history, need = fitting[0]
        tiles.append(tile)
        histories.append(history)
        peak = max(peak, need)
    return JobMemory(tuple(tiles), tuple(histories), peak)


def default_budget_bytes() -> int:
    """The memory the server may use: the container's limit (cgroup v2 memory.max, or v1's), else the
    machine's physical memory, less a margin of 10% (at least 512 MB)."""
    total = _cgroup_limit() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total - max(MIN_MARGIN_BYTES, int(total * DEFAULT_MARGIN_FRACTION))


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max", or v1's huge "unlimited" value
            return int(text)
    return None


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def megabytes(value: int) -> int:
    return math.ceil(value / MiB)
