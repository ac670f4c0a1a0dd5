"""A job's memory: predicted from its stages, admitted against a budget, and bounded with tiles.

The model counts what a job holds above the idle server at its peak, the largest of its stages:
- L-BFGS-B's state: scipy keeps 2 * history correction vectors and a workspace of 5 more, plus the point,
  its last evaluated copy, gradient and bounds, all float64, integer workspaces, and our float32 copies:
  lbfgs_bytes_per_variable(history) per variable, three variables (colour channels) per pixel;
- the stage's own arrays (content, start point, gradient, targets at full size);
- one loss-and-gradient evaluation: EVAL_BYTES_PER_PIXEL of the stage's pixels untiled, or, tiled
  (server/engine/tiling.py, a TileScheme), the tile sessions, the pool outputs held whole between the
  tiled segments, and the largest of one tile's run, the untiled tail's, and the gradients passed between
  segments; a feature map's memory grows with its channels times its positions ("channel-positions"),
  so the tiles and the tail are counted per channel-position;
and, before the optimisation, the stage's target passes: the content's, then each style image's, one at a
time, at the stage's longest side times style_scale in the style's own aspect ratio, which can be far
larger than the stage (a 256 px stage at style_scale 8 takes a 2048 px style). A style pass too large for
the budget runs in tiles of its own (exact: its Gram matrices are sums over the tiles). The decoded style
images are held for the whole job.
The figures were measured with the default layers (the deepest, relu5_1, with five style layers) by
scripts/benchmark_memory.py, which also prints predicted against measured peaks; deeper or fewer layers
need no more.

Among the ways that fit, the planner takes the full L-BFGS-B history where it fits, untiled where that
fits (the untiled evaluation is the reference), else the tiled way of least predicted time
(predicted_seconds: the network's multiply-adds, a tiled segment's three passes over its windows, halos
included, and a fixed cost per tile run).
Masked styles add their guides (guide_bytes_per_pixel, estimated from the tensors' sizes).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from stylize_service.models.layers import LayerChoice
from stylize_service.models.segments import Segment, deepest_block, segment
from stylize_service.models.terms import TERMS
from stylize_service.models.vgg16 import CHANNELS, CONVS, POOLS_BEFORE

from .lbfgs_workspace import MAXCOR, lbfgs_bytes_per_variable
from .pyramid import Stage, style_longest
from .resample import scaled_size, shrunk_size
from .tile_layout import TileScheme, segment_layouts

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
# arrays, i.e. 40 MB and 1.88 KB per pixel.
EVAL_FIXED_BYTES = 40 * MiB
EVAL_BYTES_PER_PIXEL = 1880
STAGE_ARRAY_BYTES_PER_PIXEL = 64  # float32 RGB content, start, point and gradient copies
# Target passes (forward only), measured by scripts/benchmark_memory.py --targets (one style pass of The
# Starry Night per fresh process, scaled from a decoded copy twice its size; peak above the ready network).
# Untiled, as CompiledChoice.targets runs it: 92, 578, 2447 and 3410 MB at 512, 1024, 2048 and 3072 px
# (164K to 5.9M pixels: 586, 924, 979 and 606 bytes per pixel), which 40 MB and 1 KB per pixel covers.
TARGETS_FIXED_BYTES = 40 * MiB
TARGETS_BYTES_PER_PIXEL = 1024
NETWORK_INPUT_BYTES_PER_PIXEL = 12  # float32, (1, 3, h, w): a tiled pass holds the whole input
# Tiled (server/engine/tiling.py): per channel-position (a map's channels times its positions; the default
# layers' whole network has 122 per image pixel, the first block 64) and fixed, measured by
# scripts/benchmark_memory.py --schemes (one evaluation in a fresh process after its targets passes, its
# loss sessions run for the first time in it, as a job's are): one tile's run, forward and backward, of a
# one-block segment's window (24), and of the whole network's as one segment (41: 5000 bytes per window
# pixel, measured in 256 px tiles at 2048x1536 and in 1024 px tiles at 4096x3072); a forward run
# (statistics) of either (25: 3000 bytes per window pixel of the whole network); the untiled tail's run
# from the pool output it starts at, forward and backward (8; 7.4 fits tails from blocks 2, 3 and 4 at
# 2048x1536), and forward only (9, as the untiled targets pass); and, once per evaluation, what the first
# runs of the loss sessions leave in the arena (measured 186 to 254 MB, at most 300 with the tail, above the per-position figures at
# 1024x768).
TILE_BYTES_PER_CHANNEL_POSITION = 24
MULTI_BLOCK_TILE_BYTES_PER_CHANNEL_POSITION = 41
TILE_STATISTICS_BYTES_PER_CHANNEL_POSITION = 25
TAIL_BYTES_PER_CHANNEL_POSITION = 8
TAIL_TARGETS_BYTES_PER_CHANNEL_POSITION = 9
TILED_EVALUATION_FIXED_BYTES = 300 * MiB
# The tile sessions of a job (FeatureNetwork.tile_sessions: a statistics and a loss session per tiled
# segment, a targets and a loss session for the tail), resident once built and run: 242 to 247 MB for
# every scheme of the default layers, whose sessions hold 80 MB of weights in all (measured with a tiny
# evaluation in a fresh process): 4 MB per session and 2.8 bytes per byte of its weights. A job holds the
# sessions of every stage's schemes (TileSessions.prepare); TILE_SESSIONS_BYTES is the first guess.
SESSION_FIXED_BYTES = 4 * MiB
SESSION_BYTES_PER_WEIGHT_BYTE = 2.8
TILE_SESSIONS_BYTES = 250 * MiB
# Compiling the tile sessions at the start of a job that uses them: a moment's peak of about 420 MB (of
# the whole network's two sessions; the segments' are built one after another).
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
# The time model (predicted_seconds), for ranking the ways a stage fits, not for reporting: multiply-adds
# at a nominal rate, a backward pass weighted as BACKWARD_COST forward passes (one evaluation took about
# 2.3 targets passes at 512x384), and a fixed cost per onnxruntime run of a tile.
NOMINAL_MULTIPLY_ADDS_PER_SECOND = 30e9
BACKWARD_COST = 1.3
SECONDS_PER_TILE_RUN = 0.004


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
    """The plan of one job: each stage's tile scheme for its evaluations (None = untiled) and L-BFGS-B
    history (correction pairs), the predicted peak above idle, and each stage's tile scheme for its style
    target passes (None = untiled)."""

    schemes: tuple[TileScheme | None, ...]
    histories: tuple[int, ...]
    peak_bytes: int
    style_schemes: tuple[TileScheme | None, ...]

    @property
    def tiles(self) -> tuple[int, ...]:
        """Each stage's tile size (px, of its first segment's tiles), 0 where untiled."""
        return tuple(scheme.tile if scheme else 0 for scheme in self.schemes)

    @property
    def style_tiles(self) -> tuple[int, ...]:
        return tuple(scheme.tile if scheme else 0 for scheme in self.style_schemes)


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


def _block_channels(block: int) -> int:
    return next(spec.out_channels for spec in CONVS if spec.block == block)


def channel_positions(seg: Segment, height: int, width: int) -> int:
    """The channel-positions of a segment's maps over an input of height x width positions: each of its
    blocks' width times the positions at that block's resolution."""
    return sum(
        _block_channels(block) * (height // 2 ** (block - seg.first)) * (width // 2 ** (block - seg.first))
        for block in range(seg.first, seg.last + 1)
    )


@dataclass(frozen=True)
class _SchemeCost:
    """What a TileScheme holds and costs at one image size."""

    evaluation: int  # bytes at the peak of one evaluation (tiling.TiledEvaluator._evaluate), input aside
    forward: int  # bytes at the peak of a targets pass (its forward steps), input aside
    seconds: float  # predicted time of one evaluation
    tiles: int  # tile runs of one evaluation's forward pass


@functools.lru_cache(maxsize=1024)
def scheme_cost(height: int, width: int, scheme: TileScheme, choice: LayerChoice) -> _SchemeCost:
    """The peak of each step of a tiled evaluation, with what it holds then: going forward, the pool
    outputs made so far (the inputs of the later segments) and one tile's run; the tail's run beside all
    of them; going backward, segment by segment, the inputs of the segments not yet done, the gradient at
    the segment's output and the one being summed at its input, and one tile's run. A targets pass holds
    only the segment's input and output beside a tile's run, or the tail's."""
    segments, tail = scheme.cut(choice)
    layouts = segment_layouts(height, width, scheme, choice)
    inputs: list[int] = []  # bytes of each segment's input; the first is the image, held by the stage
    outputs: list[int] = []
    windows: list[int] = []  # bytes of a tile's run, forward and backward
    evaluation = forward = tiles = 0
    seconds = 0.0
    for seg, layout in zip(segments, layouts, strict=True):
        input_bytes = 4 * seg.input_channels * layout.height * layout.width
        output_bytes = 0
        if seg.output:
            factor = 2**seg.output_pools
            output_bytes = 4 * seg.output_channels * (layout.height // factor) * (layout.width // factor)
        rows, cols = layout.largest_window()
        positions = channel_positions(seg, rows, cols)
        per_position = (
            TILE_BYTES_PER_CHANNEL_POSITION
            if seg.first == seg.last
            else MULTI_BLOCK_TILE_BYTES_PER_CHANNEL_POSITION
        )
        inputs.append(input_bytes if seg.first > 1 else 0)
        outputs.append(output_bytes)
        windows.append(per_position * positions)
        statistics = TILE_STATISTICS_BYTES_PER_CHANNEL_POSITION * positions
        evaluation = max(evaluation, sum(inputs) + output_bytes + statistics)  # forward
        forward = max(forward, inputs[-1] + output_bytes + statistics)
        area = sum(
            (t.rows.window_end - t.rows.window_start) * (t.cols.window_end - t.cols.window_start)
            for t in layout
        )
        seconds += (2 + BACKWARD_COST) * _multiply_adds(seg, area) / NOMINAL_MULTIPLY_ADDS_PER_SECOND
        seconds += 2 * SECONDS_PER_TILE_RUN * len(layout)
        tiles += len(layout)
    if tail is not None:
        seg = segment(choice, tail, deepest_block(choice))
        factor = 2 ** (tail - 1)
        tail_positions = channel_positions(seg, height // factor, width // factor)
        held = sum(inputs) + outputs[-1]  # every segment's input, and the tail's
        gradient = outputs[-1]
        evaluation = max(evaluation, held + TAIL_BYTES_PER_CHANNEL_POSITION * tail_positions + gradient)
        forward = max(
            forward,
            outputs[-1] + TARGETS_FIXED_BYTES + TAIL_TARGETS_BYTES_PER_CHANNEL_POSITION * tail_positions,
        )
        area = (height // factor) * (width // factor)
        seconds += (1 + BACKWARD_COST) * _multiply_adds(seg, area) / NOMINAL_MULTIPLY_ADDS_PER_SECOND
    for index in reversed(range(len(segments))):  # backward: the gradient at the output, the one at the input
        gradient_in = 4 * segments[index].input_channels * layouts[index].height * layouts[index].width
        evaluation = max(evaluation, sum(inputs[: index + 1]) + outputs[index] + gradient_in + windows[index])
    return _SchemeCost(TILED_EVALUATION_FIXED_BYTES + evaluation, forward, seconds, tiles)


def _multiply_adds(seg: Segment, positions: int) -> float:
    """The forward pass's multiply-adds of a segment's convolutions over `positions` input positions."""
    return sum(
        9.0 * spec.in_channels * spec.out_channels * positions / 4 ** (spec.block - seg.first)
        for spec in seg.convs
    )


def predicted_seconds(stage: Stage, choice: LayerChoice, scheme: TileScheme | None) -> float:
    """The time model's seconds for one evaluation of the stage: for ranking ways, not for reporting."""
    if scheme is None:
        whole = segment(choice, 1, deepest_block(choice))
        return (1 + BACKWARD_COST) * _multiply_adds(whole, stage.pixels) / NOMINAL_MULTIPLY_ADDS_PER_SECOND
    return scheme_cost(stage.height, stage.width, scheme, choice).seconds


def style_pass_bytes(
    size: tuple[int, int],
    decoded: tuple[int, int],
    scheme: TileScheme | None = None,
    choice: LayerChoice | None = None,
) -> int:
    """Predicted bytes above idle of one style target pass at size = (width, height), scaled from the
    decoded style: untiled (scheme None), or in a scheme's tiles (the tile sessions not included)."""
    pixels = size[0] * size[1]
    if scheme is None:
        return TARGETS_FIXED_BYTES + TARGETS_BYTES_PER_PIXEL * pixels  # measured with the resize in it
    assert choice is not None
    resize = (
        RESIZE_BYTES_PER_SOURCE_PIXEL * decoded[0] * decoded[1] + RESIZE_BYTES_PER_PIXEL * pixels
        if size != decoded
        else 0
    )
    # The resize's temporaries are gone before the network runs; its result (the input) is not.
    cost = scheme_cost(size[1], size[0], scheme, choice)
    return max(resize, NETWORK_INPUT_BYTES_PER_PIXEL * pixels + cost.forward)


def _content_target_bytes(stage: Stage, choice: LayerChoice) -> int:
    """The separable terms' targets, kept whole (float32) at their layers' resolutions."""
    return sum(
        4 * CHANNELS[layer] * stage.pixels // 4 ** POOLS_BEFORE[layer]
        for term, layers in choice.layers
        if TERMS[term].region_separable
        for layer in layers
    )


def targets_bytes(
    stage: Stage,
    choice: LayerChoice,
    scheme: TileScheme | None,
    style_scheme: TileScheme | None,
    passes: Sequence[StylePass],
) -> int:
    """Predicted bytes above idle while the stage's targets are computed (tile sessions and the decoded
    styles not included): the content pass, untiled or in the stage's scheme, then, holding the
    content's targets, the largest style pass, untiled or in style_scheme."""
    content_targets = _content_target_bytes(stage, choice)
    if scheme is not None:
        content_pass = content_targets + scheme_cost(stage.height, stage.width, scheme, choice).forward
    else:
        content_pass = TARGETS_FIXED_BYTES + TARGETS_BYTES_PER_PIXEL * stage.pixels
    style_pass = max((style_pass_bytes(p.size, p.decoded, style_scheme, choice) for p in passes), default=0)
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


def stage_bytes(
    stage: Stage,
    choice: LayerChoice,
    scheme: TileScheme | None,
    history: int = MAXCOR,
    sessions: int = TILE_SESSIONS_BYTES,
) -> int:
    """Predicted bytes above idle while `stage` runs, untiled (scheme None) or in a tile scheme, with
    `history` L-BFGS-B correction pairs; masked styles' guides included (guide_bytes_per_pixel)."""
    pixels = stage.width * stage.height
    held = lbfgs_bytes_per_variable(history) * 3 * pixels + STAGE_ARRAY_BYTES_PER_PIXEL * pixels
    held += _guide_map_bytes(stage, choice)
    if scheme is None:
        return held + EVAL_FIXED_BYTES + (EVAL_BYTES_PER_PIXEL + guide_bytes_per_pixel(choice)) * pixels
    cost = scheme_cost(stage.height, stage.width, scheme, choice)
    targets = _content_target_bytes(stage, choice)
    rows, cols = segment_layouts(stage.height, stage.width, scheme, choice)[0].largest_window()
    guides = guide_bytes_per_pixel(choice) * rows * cols
    return held + targets + sessions + cost.evaluation + guides


def tile_schemes(tile: int, choice: LayerChoice) -> list[TileScheme]:
    """The ways to tile with `tile` px tiles: a first segment of block 1 (or of blocks 1 to 2, or 1 to 3:
    no pool output of theirs held whole, for a wider halo), then the following blocks one at a time up to
    some block, the rest untiled; and the whole network as one segment (the least memory, the widest
    halo)."""
    blocks = deepest_block(choice)
    schemes = []
    for first_end in range(1, min(3, blocks) + 1):
        for end in range(first_end, blocks + 1):
            following = tuple((block, block) for block in range(first_end + 1, end + 1))
            schemes.append(TileScheme(tile, ((1, first_end), *following)))
    whole = TileScheme.whole(tile, choice)
    return [*schemes, whole] if whole not in schemes else schemes


def plan_job(
    stages: list[Stage],
    choice: LayerChoice,
    budget: int | None,
    forced_tile: int = 0,
    *,
    style_sizes: Sequence[tuple[int, int]],
    style_scale: float,
) -> JobMemory:
    """Tile schemes and histories per stage so that the job's predicted peak fits `budget` (bytes above
    idle; None = no limit): the full history where it fits in some way, untiled where that fits, else the
    tile scheme of least predicted time that fits; only then a shorter history (HISTORIES). forced_tile > 0
    tiles every stage larger than it, in tiles of that size. style_sizes: each style image's
    (width, height) as received (header or decoded); its passes run untiled in an untiled stage and in the
    stage's scheme in a tiled one, or in the scheme of least predicted memory that fits. A stage's peak is
    the larger of its target passes' and its optimisation's; a job that uses tiles also holds the tile
    sessions throughout, built at its start. Raises MemoryExceeded when a stage fits in no way."""
    final = stages[-1].longest if stages else 0
    decoded = [decoded_style_size(size, style_longest(final, style_scale)) for size in style_sizes]
    held = STYLE_ARRAY_BYTES_PER_PIXEL * sum(width * height for width, height in decoded)
    plan = _plan_stages(stages, choice, budget, forced_tile, decoded, style_scale, held, sessions=0)
    if not any(plan.schemes) and not any(plan.style_schemes):
        return plan
    # The engine builds the tile sessions of every stage when the job starts and keeps them to its end:
    # every stage holds them all, and their compilation takes a moment's peak of its own. Their size
    # depends on the schemes chosen, which depend on it: plan again until the estimate holds.
    sessions = TILE_SESSIONS_BYTES
    for _ in range(3):
        plan = _plan_stages(
            stages, choice, budget, forced_tile, decoded, style_scale, held, sessions=sessions
        )
        needed = job_sessions_bytes(plan, choice)
        if needed <= sessions:
            break
        sessions = needed
    build = held + TILE_SESSIONS_BUILD_BYTES
    if budget is not None and build > budget:
        raise MemoryExceeded(max(build, plan.peak_bytes), budget)
    return replace(plan, peak_bytes=max(plan.peak_bytes, build))


@dataclass(frozen=True)
class _Way:
    scheme: TileScheme | None
    history: int
    style_scheme: TileScheme | None
    need: int  # the stage's peak: the larger of its targets' and its optimisation's
    optimisation: int
    seconds: float


def _plan_stages(
    stages: list[Stage],
    choice: LayerChoice,
    budget: int | None,
    forced_tile: int,
    decoded: list[tuple[int, int]],
    style_scale: float,
    held: int,
    sessions: int,
) -> JobMemory:
    """plan_job's choice per stage, the decoded styles (`held` bytes) held throughout and `sessions` bytes
    of tile sessions too (0: a tiled stage counts TILE_SESSIONS_BYTES of its own, an untiled one none)."""
    schemes: list[TileScheme | None] = []
    style_schemes: list[TileScheme | None] = []
    histories: list[int] = []
    peak = 0
    for stage in stages:
        passes = style_passes(stage, decoded, style_scale)
        candidates: list[TileScheme | None]
        if forced_tile and max(stage.width, stage.height) > forced_tile:
            candidates = list(tile_schemes(forced_tile, choice))
        else:
            longest = max(stage.width, stage.height)
            candidates = [None, *(s for t in TILE_SIZES if t < longest for s in tile_schemes(t, choice))]
        ways: list[_Way] = []
        for history in HISTORIES:
            for scheme in candidates:
                optimisation = held + stage_bytes(
                    stage, choice, scheme, history, sessions or TILE_SESSIONS_BYTES
                )
                if scheme is None:  # stage_bytes counts a tiled stage's own
                    optimisation += sessions
                seconds = predicted_seconds(stage, choice, scheme)
                for style_scheme in _style_scheme_candidates(scheme, passes, choice):
                    targets = held + targets_bytes(stage, choice, scheme, style_scheme, passes)
                    targets += sessions
                    ways.append(
                        _Way(scheme, history, style_scheme, max(optimisation, targets), optimisation, seconds)
                    )
        # Leave PLAN_HEADROOM of the budget unplanned where some way does (the model was measured in one
        # process; a server also holds requests, threads' heaps and encoded images); else use it all.
        roomy = [way for way in ways if budget is None or way.need <= budget * (1 - PLAN_HEADROOM)]
        fitting = roomy or [way for way in ways if budget is None or way.need <= budget]
        if not fitting:
            needed = min(way.need for way in ways)
            if budget is not None and passes and min(way.optimisation for way in ways) <= budget:
                raise MemoryExceeded(needed, budget, _style_cause(stage, passes, style_scale))
            raise MemoryExceeded(needed, budget or 0)
        best = _best(fitting)
        schemes.append(best.scheme)
        histories.append(best.history)
        style_schemes.append(best.style_scheme)
        peak = max(peak, best.need)
    return JobMemory(tuple(schemes), tuple(histories), peak, tuple(style_schemes))


def _session_weights(choice: LayerChoice, first: int, last: int) -> int:
    """The bytes of the convolution weights of blocks first..last up to the choice's deepest layer."""
    return sum(
        4 * (9 * spec.in_channels + 1) * spec.out_channels for spec in segment(choice, first, last).convs
    )


def job_sessions_bytes(plan: JobMemory, choice: LayerChoice) -> int:
    """The tile sessions a job builds for its plan (Engine.stylize: TileSessions.prepare for every stage's
    scheme, with backward passes, and style scheme, forward only), each counted once."""
    keys: set[tuple[str, int, int]] = set()
    end = deepest_block(choice)
    for schemes, backward in ((plan.schemes, True), (plan.style_schemes, False)):
        for scheme in schemes:
            if scheme is None:
                continue
            segments, tail = scheme.cut(choice)
            for seg in segments:
                keys.add(("statistics", seg.first, seg.last))
                if backward:
                    keys.add(("loss", seg.first, seg.last))
            if tail is not None:
                keys.add(("tail_targets", tail, end))
                if backward:
                    keys.add(("tail_loss", tail, end))
    return sum(
        SESSION_FIXED_BYTES + int(SESSION_BYTES_PER_WEIGHT_BYTE * _session_weights(choice, first, last))
        for _, first, last in keys
    )


def _best(fitting: list[_Way]) -> _Way:
    """The first history that fits (the longest); untiled where it fits; else the least predicted time,
    and between equal times the one listed first (the stage's own scheme for its style passes)."""
    history = fitting[0].history
    ways = [way for way in fitting if way.history == history]
    untiled = [way for way in ways if way.scheme is None]
    return untiled[0] if untiled else min(ways, key=lambda way: way.seconds)


def _style_scheme_candidates(
    scheme: TileScheme | None, passes: Sequence[StylePass], choice: LayerChoice
) -> list[TileScheme | None]:
    """Schemes for a stage's style passes, the stage's own first (untiled in an untiled stage), then
    smaller tiles, by_block and whole, where the largest pass is larger than them."""
    longest = max((max(p.size) for p in passes), default=0)
    limit = scheme.tile if scheme else longest
    others = [s for t in TILE_SIZES if t < limit for s in tile_schemes(t, choice)]
    if scheme is not None:
        others = [s for s in tile_schemes(scheme.tile, choice) if s != scheme] + others
    return [scheme, *others]


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
