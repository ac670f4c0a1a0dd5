"""A job's memory: predicted from its stages, admitted against a budget, and bounded with tiles.

The model counts what a job holds above the idle server at its peak, the largest of its stages:
- L-BFGS-B's state: scipy keeps 2 * history correction vectors and a workspace of 5 more, plus the point,
  its last evaluated copy, gradient and bounds, all float64, integer workspaces, and our float32 copies:
  lbfgs_bytes_per_variable(history) per variable, three variables (colour channels) per pixel;
- the stage's own arrays (content, start point, gradient, targets at full size);
- one loss-and-gradient evaluation: EVAL_BYTES_PER_PIXEL of the stage's pixels untiled, or, tiled, the
  tile sessions and TILE_EVAL_BYTES_PER_PIXEL of the largest tile window;
and, before the optimisation, the stage's target passes: the content's, then each style image's, one at a
time, at the stage's longest side times style_scale in the style's own aspect ratio, which can be far
larger than the stage (a 256 px stage at style_scale 8 takes a 2048 px style). A style pass too large for
the budget runs in tiles of its own (exact: its Gram matrices are sums over the tiles). The decoded style
images are held for the whole job.
Masked styles add their guides (guide_bytes_per_pixel, estimated from the tensors' sizes).
The per-pixel figures were measured with the default layers (the deepest, relu5_1, with five style
layers) by scripts/benchmark_memory.py, which also prints predicted against measured peaks; deeper or
fewer layers need no more.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from stylize_service.models.layers import LayerChoice
from stylize_service.models.terms import TERMS
from stylize_service.models.vgg16 import CHANNELS, POOLS_BEFORE

from .lbfgs_workspace import MAXCOR, lbfgs_bytes_per_variable
from .pyramid import Stage, style_longest
from .resample import scaled_size, shrunk_size
from .tile_layout import TileLayout

MiB = 2**20
# L-BFGS-B's history (correction pairs) per stage, tried in this order: the full one at any tile size
# first, then shorter ones. Tiles bound the network's memory but not the optimiser's, 16 bytes per
# variable and pair: at 2048x1536 the full history alone takes 2.4 GB, three pairs 1.4 GB. A shorter
# history changes the iterates (each step uses less curvature information), not the loss being
# minimised; Progress reports it (correction_pairs). Nocedal and Wright give 3 to 20 as the usual range.
HISTORIES = (MAXCOR, 5, 3)


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
# Target passes (forward only), measured by scripts/benchmark_memory.py --targets (one style pass of The
# Starry Night per fresh process, scaled from a decoded copy twice its size; peak above the ready network).
# Untiled, as CompiledChoice.targets runs it: 92, 578, 2447 and 3410 MB at 512, 1024, 2048 and 3072 px
# (164K to 5.9M pixels: 586, 924, 979 and 606 bytes per pixel), which 40 MB and 1 KB per pixel covers. Tiled,
# as TiledEvaluator's statistics pass runs it (2048 px in 128, 256, 512 px tiles; 4096 px in 256 and 1024 px
# tiles): 2400 to 2760 bytes per pixel of the largest window where there are 12 tiles or more, 900 with 4
# (the arena, never shrunk between tiles, fragments over windows of different shapes): 3000 covers them.
TARGETS_FIXED_BYTES = 40 * MiB
TARGETS_BYTES_PER_PIXEL = 1024
TILE_STATISTICS_BYTES_PER_PIXEL = 3000
NETWORK_INPUT_BYTES_PER_PIXEL = 12  # float32, (1, 3, h, w): a tiled pass holds the whole input
# Compiling the tile sessions (FeatureNetwork.tile_sessions) at the start of a job that uses them: its
# resident memory rose by 420 MB for a moment, 114 MB of which stayed (TILE_SESSIONS_BYTES covers those).
TILE_SESSIONS_BUILD_BYTES = 450 * MiB
# Scaling a style image to a stage's size (resample.resize, channel by channel through Pillow): measured
# 7.4 bytes per source pixel and 23 per result pixel shrinking, 47 to 48 per result pixel enlarging.
RESIZE_BYTES_PER_SOURCE_PIXEL = 8
RESIZE_BYTES_PER_PIXEL = 48
# The decoded style images (float32 RGB) and the copies the colour modes make of them, for the whole job.
STYLE_ARRAY_BYTES_PER_PIXEL = 24
PLAN_HEADROOM = 0.1  # measured: a server's job peaked 9% above the one-process prediction (README, Memory)
TILE_SIZES = (1024, 768, 512, 384, 256, 128)  # tried largest first when a stage does not fit untiled
DEFAULT_MARGIN_FRACTION = 0.1  # of the machine's or container's memory, left to the kernel and others
MIN_MARGIN_BYTES = 512 * MiB


class MemoryExceeded(Exception):
    """A job cannot fit the memory budget at any tile size. `cause` names what does not fit where that is
    not the job's own size (a style image at the size a stage scales it to)."""

    def __init__(self, needed: int, budget: int, cause: str = "") -> None:
        if cause:
            message = (
                f"{cause} needs about {needed / MiB:.0f} MB of memory even in the smallest tiles, more than "
                f"the {budget / MiB:.0f} MB this server has for a job; use a smaller style_scale, style "
                "image or max_size"
            )
        else:
            message = (
                f"the job needs about {needed / MiB:.0f} MB of memory even in the smallest tiles, more than "
                f"the {budget / MiB:.0f} MB this server has for a job; use a smaller max_size"
            )
        super().__init__(message)
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class JobMemory:
    """The plan of one job: each stage's tile size for its evaluations (0 = untiled) and L-BFGS-B history
    (correction pairs), the predicted peak above idle, and each stage's tile size for its style target
    passes (0 = untiled; in a tiled stage the stage's own tile size unless a smaller one is needed)."""

    tiles: tuple[int, ...]
    histories: tuple[int, ...]
    peak_bytes: int
    style_tiles: tuple[int, ...]


@dataclass(frozen=True)
class StylePass:
    """One style image's target pass in a stage: the image as the worker holds it and as the stage runs
    it, (width, height) each."""

    index: int  # in the request's styles
    decoded: tuple[int, int]
    size: tuple[int, int]

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def decoded_style_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """A style image's (width, height) once decoded: shrunk, never enlarged, to `longest`
    (job_worker._decode_inputs; pyramid.style_longest of the output's size)."""
    return shrunk_size(size, longest)


def style_passes(stage: Stage, decoded: Sequence[tuple[int, int]], style_scale: float) -> list[StylePass]:
    """The stage's style passes: each decoded style scaled (up or down) to the stage's style size."""
    longest = style_longest(stage.longest, style_scale)
    return [StylePass(index, size, scaled_size(*size, longest)) for index, size in enumerate(decoded)]


@functools.lru_cache(maxsize=256)
def _largest_window(height: int, width: int, tile: int, choice: LayerChoice) -> int:
    rows, cols = TileLayout(height, width, tile, choice).largest_window()
    return rows * cols


def style_pass_bytes(size: tuple[int, int], decoded: tuple[int, int], window_pixels: int = 0) -> int:
    """Predicted bytes above idle of one style target pass at size = (width, height), scaled from the
    decoded style: untiled (window_pixels 0), or tile by tile with window_pixels the largest tile
    window (the tile sessions not included)."""
    pixels = size[0] * size[1]
    if not window_pixels:
        return TARGETS_FIXED_BYTES + TARGETS_BYTES_PER_PIXEL * pixels  # measured with the resize in it
    resize = (
        RESIZE_BYTES_PER_SOURCE_PIXEL * decoded[0] * decoded[1] + RESIZE_BYTES_PER_PIXEL * pixels
        if size != decoded
        else 0
    )
    # The resize's temporaries are gone before the network runs; its result (the input) is not.
    return max(
        resize, NETWORK_INPUT_BYTES_PER_PIXEL * pixels + TILE_STATISTICS_BYTES_PER_PIXEL * window_pixels
    )


def _content_target_bytes(stage: Stage, choice: LayerChoice) -> int:
    """The separable terms' targets, kept whole (float32) at their layers' resolutions."""
    return sum(
        4 * CHANNELS[layer] * stage.pixels // 4 ** POOLS_BEFORE[layer]
        for term, layers in choice.layers
        if TERMS[term].region_separable
        for layer in layers
    )


def targets_bytes(
    stage: Stage, choice: LayerChoice, tile: int, style_tile: int, passes: Sequence[StylePass]
) -> int:
    """Predicted bytes above idle while the stage's targets are computed (tile sessions and the decoded
    styles not included): the content pass, untiled or in the stage's tiles, then, holding the content's
    targets, the largest style pass, untiled or in tiles of style_tile px."""
    content_targets = _content_target_bytes(stage, choice)
    if tile:
        window = _largest_window(stage.height, stage.width, tile, choice)
        content_pass = content_targets + TILE_STATISTICS_BYTES_PER_PIXEL * window
    else:
        content_pass = TARGETS_FIXED_BYTES + TARGETS_BYTES_PER_PIXEL * stage.pixels
    style_pass = max(
        (
            style_pass_bytes(
                p.size,
                p.decoded,
                _largest_window(p.size[1], p.size[0], style_tile, choice) if style_tile else 0,
            )
            for p in passes
        ),
        default=0,
    )
    return STAGE_ARRAY_BYTES_PER_PIXEL * stage.pixels + max(content_pass, content_targets + style_pass)


def guide_bytes_per_pixel(choice: LayerChoice) -> int:
    """What masked styles add to an evaluation, per pixel of the image (or tile window) it runs: each
    guide's guided features at each style layer and their gradient, float32. Estimated from those
    tensors' sizes, not measured: at most this much more is live at once (0 without masks)."""
    if not choice.guides:
        return 0
    return choice.guides * sum(
        2 * 4 * CHANNELS[layer] // 4 ** POOLS_BEFORE[layer] for layer in choice.layers_of("style")
    )


def _guide_map_bytes(stage: Stage, choice: LayerChoice) -> int:
    """A masked stage's guides, whole (float32): each mask at the stage's size and its map at each style
    layer."""
    if not choice.guides:
        return 0
    layers = choice.layers_of("style")
    return (
        4 * choice.guides * (stage.pixels + sum(stage.pixels // 4 ** POOLS_BEFORE[layer] for layer in layers))
    )


def stage_bytes(stage: Stage, choice: LayerChoice, tile: int, history: int = MAXCOR) -> int:
    """Predicted bytes above idle while `stage` runs, untiled (tile 0) or in tiles of `tile` px, with
    `history` L-BFGS-B correction pairs; masked styles' guides included (guide_bytes_per_pixel)."""
    pixels = stage.width * stage.height
    held = lbfgs_bytes_per_variable(history) * 3 * pixels + STAGE_ARRAY_BYTES_PER_PIXEL * pixels
    held += _guide_map_bytes(stage, choice)
    if not tile:
        return held + EVAL_FIXED_BYTES + (EVAL_BYTES_PER_PIXEL + guide_bytes_per_pixel(choice)) * pixels
    window = _largest_window(stage.height, stage.width, tile, choice)
    targets = _content_target_bytes(stage, choice)
    per_window_pixel = TILE_EVAL_BYTES_PER_PIXEL + guide_bytes_per_pixel(choice)
    return held + targets + TILE_SESSIONS_BYTES + per_window_pixel * window


def plan_job(
    stages: list[Stage],
    choice: LayerChoice,
    budget: int | None,
    forced_tile: int = 0,
    *,
    style_sizes: Sequence[tuple[int, int]],
    style_scale: float,
) -> JobMemory:
    """Tile sizes and histories per stage so that the job's predicted peak fits `budget` (bytes above
    idle; None = no limit): the full history where it fits at some tile size, untiled where that fits,
    else the largest tile that fits; only then a shorter history (HISTORIES). forced_tile > 0 tiles
    every stage larger than it. style_sizes: each style image's (width, height) as received (header or
    decoded); its passes run untiled in an untiled stage and in the stage's tiles in a tiled one, or in
    the largest smaller tiles that fit. A stage's peak is the larger of its target passes' and its
    optimisation's; a job that uses tiles also holds the tile sessions throughout, built at its start.
    Raises MemoryExceeded when a stage fits in no way."""
    final = stages[-1].longest if stages else 0
    decoded = [decoded_style_size(size, style_longest(final, style_scale)) for size in style_sizes]
    held = STYLE_ARRAY_BYTES_PER_PIXEL * sum(width * height for width, height in decoded)
    plan = _plan_stages(stages, choice, budget, forced_tile, decoded, style_scale, held, sessions=False)
    if not any(plan.tiles) and not any(plan.style_tiles):
        return plan
    # The engine builds the tile sessions when the job starts and keeps them to its end: every stage
    # holds them, and their compilation takes a moment's peak of its own.
    plan = _plan_stages(stages, choice, budget, forced_tile, decoded, style_scale, held, sessions=True)
    build = held + TILE_SESSIONS_BUILD_BYTES
    if budget is not None and build > budget:
        raise MemoryExceeded(max(build, plan.peak_bytes), budget)
    return replace(plan, peak_bytes=max(plan.peak_bytes, build))


def _plan_stages(
    stages: list[Stage],
    choice: LayerChoice,
    budget: int | None,
    forced_tile: int,
    decoded: list[tuple[int, int]],
    style_scale: float,
    held: int,
    sessions: bool,
) -> JobMemory:
    """plan_job's choice per stage, the decoded styles (`held` bytes) held throughout and the tile
    sessions too where `sessions`."""
    tiles: list[int] = []
    style_tiles: list[int] = []
    histories: list[int] = []
    peak = 0
    for stage in stages:
        passes = style_passes(stage, decoded, style_scale)
        if forced_tile and max(stage.width, stage.height) > forced_tile:
            candidates: tuple[int, ...] = (forced_tile,)
        else:
            candidates = (0, *(t for t in TILE_SIZES if t < max(stage.width, stage.height)))
        ways: list[tuple[int, int, int, int, int]] = []  # tile, history, style tile, need, optimisation's
        for history in HISTORIES:
            for tile in candidates:
                optimisation = held + stage_bytes(stage, choice, tile, history)
                if sessions and not tile:  # stage_bytes counts a tiled stage's own
                    optimisation += TILE_SESSIONS_BYTES
                for style_tile in _style_tile_candidates(tile, passes):
                    targets = held + targets_bytes(stage, choice, tile, style_tile, passes)
                    if sessions:
                        targets += TILE_SESSIONS_BYTES
                    ways.append((tile, history, style_tile, max(optimisation, targets), optimisation))
        # Leave PLAN_HEADROOM of the budget unplanned where some way does (the model was measured in one
        # process; a server also holds requests, threads' heaps and encoded images); else use it all.
        roomy = [way for way in ways if budget is None or way[3] <= budget * (1 - PLAN_HEADROOM)]
        fitting = roomy or [way for way in ways if budget is None or way[3] <= budget]
        if not fitting:
            needed = min(way[3] for way in ways)
            if budget is not None and passes and min(way[4] for way in ways) <= budget:
                raise MemoryExceeded(needed, budget, _style_cause(stage, passes, style_scale))
            raise MemoryExceeded(needed, budget or 0)
        tile, history, style_tile, need, _ = fitting[0]
        tiles.append(tile)
        histories.append(history)
        style_tiles.append(style_tile)
        peak = max(peak, need)
    return JobMemory(tuple(tiles), tuple(histories), peak, tuple(style_tiles))


def _style_tile_candidates(tile: int, passes: Sequence[StylePass]) -> tuple[int, ...]:
    """Tile sizes for a stage's style passes, largest first: the stage's own (0 = untiled), then smaller
    tiles where the largest pass is larger than them."""
    longest = max((max(p.size) for p in passes), default=0)
    return (tile, *(t for t in TILE_SIZES if t < (tile or longest)))


def _style_cause(stage: Stage, passes: Sequence[StylePass], style_scale: float) -> str:
    largest = max(passes, key=lambda p: p.pixels)
    width, height = largest.size
    return (
        f"the style image styles[{largest.index}], scaled to {width}x{height} px for the "
        f"{stage.width}x{stage.height} stage (style_scale {style_scale:g}),"
    )


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


def megabytes(value: int) -> int:
    return math.ceil(value / MiB)
