"""The coarse-to-fine pyramid: stage sizes, iterations per stage, and what each stage costs.

Stages double in size up to the output's; each later stage starts from the previous one's result scaled
up (with the content or init image's own detail kept: Engine._start). The default schedule and the cost
model are measured (README, Benchmarks; scripts/benchmark_multiscale.py imports this module so that it
measures exactly these rules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .resample import scaled_size
from .types import InvalidSettings
from .validation import MAX_SIZE, MIN_SIZE

STAGE_FACTOR = 2.0  # each stage's longest side is this times the previous one's
# When min_size is unset: one stage up to this size, coarse-to-fine from max_size / 4 above it. Measured
# (README, Benchmarks): at 512 px multiscale ended 2.6% higher in loss in equal time; at 1024 px it
# reached the same loss in equal time with visibly larger-scale structure (single-scale strokes stay
# VGG-sized, i.e. tiny at that resolution).
SINGLE_SCALE_UP_TO = 512
DEFAULT_STAGE_DIVISOR = 4


@dataclass(frozen=True)
class Stage:
    """One optimisation stage: its place in the pyramid, image size and share of the iterations."""

    index: int  # 0-based
    count: int  # stages in the pyramid
    width: int
    height: int
    iterations: int

    @property
    def longest(self) -> int:
        return max(self.width, self.height)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def is_first(self) -> bool:
        return self.index == 0


def style_longest(stage_longest: int, style_scale: float) -> int:
    """The longest side the style images are scaled to for a stage (or an output) of stage_longest px."""
    return max(MIN_SIZE, round(stage_longest * style_scale))


def default_min_size(max_size: int) -> int:
    """The first stage's longest side when the request leaves min_size unset."""
    if max_size <= SINGLE_SCALE_UP_TO:
        return max_size
    return max_size // DEFAULT_STAGE_DIVISOR


def stage_sizes(min_size: int, max_size: int) -> list[int]:
    """Longest sides of the stages: max_size, halved while at least min_size, smallest first."""
    sizes = [max_size]
    while sizes[0] / STAGE_FACTOR >= min_size:
        sizes.insert(0, round(sizes[0] / STAGE_FACTOR))
    return sizes


def stage_iterations(total: int, stages: int) -> list[int]:
    """Iterations per stage: the final, full-size stage gets half of them, the coarser stages share the
    other half equally (they are 4x cheaper per halving, and only need to set the large-scale structure)."""
    if stages == 1:
        return [total]
    final = max(1, math.ceil(total / 2))
    earlier = total - final
    base, extra = divmod(earlier, stages - 1)
    return [base + (1 if i < extra else 0) for i in range(stages - 1)] + [final]


def plan(
    content_size: tuple[int, int],
    max_size: int,
    min_size: int | None,
    iterations: int,
    *,
    min_short_side: int,
    deepest_layer: str,
) -> list[Stage]:
    """The stages for a content image of content_size = (width, height), smallest first.

    min_short_side: the smallest short side the deepest layer used can work with (2 ** its pools). With
    min_size unset, stages too small for it are dropped, so that the default rule never refuses an image
    that a single stage accepts; an explicit min_size (or max_size) that is too small is refused by name."""
    width, height = content_size

    def short_side(longest: int) -> int:
        return min(scaled_size(width, height, longest))

    if min_size is None:
        sizes = stage_sizes(default_min_size(max_size), max_size)
        sizes = [size for size in sizes if short_side(size) >= min_short_side] or sizes[-1:]
        field = "max_size"
    else:
        sizes = stage_sizes(min_size, max_size)
        field = "min_size" if len(sizes) > 1 else "max_size"
    if short_side(sizes[0]) < min_short_side:
        if short_side(MAX_SIZE) < min_short_side:
            advice = f"the image ({width}x{height}) is too thin for that at any size; use shallower layers"
        else:
            advice = "raise the size or use shallower layers"
        raise InvalidSettings(
            field,
            f"gives the image a short side of {short_side(sizes[0])} px, but layer {deepest_layer} needs "
            f"at least {min_short_side} px; {advice}",
        )
    shares = stage_iterations(iterations, len(sizes))
    return [
        Stage(index, len(sizes), *scaled_size(width, height, size), iterations=share)
        for index, (size, share) in enumerate(zip(sizes, shares, strict=True))
    ]


def cost_in_final_iterations(stages: list[Stage]) -> float:
    """A plan's cost counted in iterations of its final stage (an evaluation's cost is linear in pixels)."""
    final = stages[-1]
    return sum(stage.iterations * stage.pixels / final.pixels for stage in stages)


def remaining_seconds(stages: list[Stage], current: Stage, done: int, seconds_per_iteration: float) -> float:
    """Estimated time left: the current stage's remaining iterations at the measured rate, and the later
    stages' at that rate scaled by their pixel count (an evaluation's cost is linear in the pixels)."""
    left = (current.iterations - done) * seconds_per_iteration
    for later in stages[current.index + 1 :]:
        left += later.iterations * seconds_per_iteration * later.pixels / current.pixels
    return left
