"""Where the tiles of an exactly tiled evaluation lie: pure geometry, no network.

Tiled evaluation runs the network one segment at a time (models/segments.py): the image through the first
segment, tile by tile, into the first pool output held whole, that through the next segment, and so on;
the segments after the tiled ones may run untiled, as one tail. Within a segment, every position of every
feature map is owned by exactly one tile. A tile is run with a halo around its owned region that covers
the receptive field of the segment's own layers, and its window starts on the segment's pooling grid, so
that the tile's features at owned positions are those of the whole map.

A TileScheme says how a stage is cut: the tile size and which blocks form tiled segments. The planner
(server/engine/memory.py) sizes tiles with this module; server/engine/tiling.py runs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stylize_service.models.layers import LayerChoice
from stylize_service.models.segments import Segment, block_of, deepest_block, segment
from stylize_service.models.vgg16 import CONVS

# The first block's channels: a deeper segment's tiles have the same memory as the first one's where their
# area is this much smaller per channel (memory per position grows with the channels).
_FIRST_CHANNELS = CONVS[0].out_channels


def receptive_radius(layer: str) -> int:
    """How far (input px) beyond a feature's own position the input can influence it, at `layer`, the
    whole network being one segment."""
    return segment(LayerChoice.of({"content": (layer,)}), 1, block_of(layer)).receptive_radius


def halo(layer: str) -> int:
    """The halo (input px) of a tile of the whole network up to `layer`: the receptive radius, rounded up
    to the pooling grid."""
    return segment(LayerChoice.of({"content": (layer,)}), 1, block_of(layer)).halo


@dataclass(frozen=True)
class TileScheme:
    """How a tiled stage is cut: `segments` are the (first, last) blocks of each tiled segment, in order
    from block 1, and the blocks after the last one, up to the choice's deepest, run untiled (the tail).
    `tile` is the owned side (px) of the first segment's tiles; each deeper segment's tiles are as large
    in memory: their side, in that segment's positions, shrinks with the square root of its channels."""

    tile: int
    segments: tuple[tuple[int, int], ...]

    @classmethod
    def whole(cls, tile: int, choice: LayerChoice) -> TileScheme:
        """The whole network as one tiled segment, with the deepest layer's halo: no map is held whole,
        the least memory, but each tile computes a wide halo."""
        return cls(tile, ((1, deepest_block(choice)),))

    @classmethod
    def by_block(cls, tile: int, blocks: int) -> TileScheme:
        """Blocks 1..blocks tiled one block at a time (halos of a few positions); the others untiled."""
        return cls(tile, tuple((block, block) for block in range(1, blocks + 1)))

    def cut(self, choice: LayerChoice) -> tuple[list[Segment], int | None]:
        """The tiled segments of a choice's network, and the first block of its untiled tail (None when
        every block is tiled)."""
        end = deepest_block(choice)
        tiled = [segment(choice, first, min(last, end)) for first, last in self.segments if first <= end]
        following = tiled[-1].last + 1
        return tiled, following if following <= end else None

    def side(self, seg: Segment) -> int:
        """The owned side of a segment's tiles, in its input's positions: a multiple of its alignment."""
        scaled = self.tile * math.sqrt(_FIRST_CHANNELS / seg.convs[0].out_channels)
        return max(seg.alignment, int(scaled) // seg.alignment * seg.alignment)

    def __str__(self) -> str:
        return f"{self.tile}px:" + "+".join(
            f"{first}" if first == last else f"{first}-{last}" for first, last in self.segments
        )


@dataclass(frozen=True)
class Span:
    """One tile's extent along one axis: the owned part [own_start, own_end) and its window."""

    own_start: int
    own_end: int
    window_start: int
    window_end: int
    length: int  # of the whole axis

    def owned_at(self, pools: int) -> slice:
        """The owned part at a layer after `pools` 2x2 pools, relative to the window at that layer."""
        factor = 2**pools
        end = self.own_end // factor if self.own_end < self.length else self.length // factor
        return slice(
            self.own_start // factor - self.window_start // factor, end - self.window_start // factor
        )

    def window_at(self, pools: int) -> slice:
        """The window at a layer after `pools` pools, in the whole map's coordinates."""
        factor = 2**pools
        start = self.window_start // factor
        return slice(start, start + (self.window_end - self.window_start) // factor)


def spans(length: int, tile: int, halo_px: int, align: int) -> list[Span]:
    """Split [0, length) into owned parts of `tile` px (a multiple of align; the last may be shorter) with
    windows reaching halo_px (a multiple of align) beyond them, clipped to the axis."""
    if tile % align or halo_px % align:
        raise ValueError(f"tile {tile} and halo {halo_px} must be multiples of {align}")
    return [
        Span(
            start,
            min(length, start + tile),
            max(0, start - halo_px),
            min(length, start + tile + halo_px),
            length,
        )
        for start in range(0, length, tile)
    ]


@dataclass(frozen=True)
class Tile:
    rows: Span
    cols: Span

    def window(self) -> tuple[slice, slice]:
        return slice(self.rows.window_start, self.rows.window_end), slice(
            self.cols.window_start, self.cols.window_end
        )

    def mask(self, pools: int) -> np.ndarray:
        """(1, 1, h, w) float32, 1 on the owned positions of the window at that layer."""
        height = (self.rows.window_end - self.rows.window_start) // 2**pools
        width = (self.cols.window_end - self.cols.window_start) // 2**pools
        mask = np.zeros((1, 1, height, width), np.float32)
        mask[..., self.rows.owned_at(pools), self.cols.owned_at(pools)] = 1.0
        return mask


class TileLayout:
    """The tiles of one segment's input map of height x width, owned parts of about `tile` positions."""

    def __init__(self, height: int, width: int, tile: int, seg: Segment) -> None:
        align = seg.alignment
        self.tile = max(align, tile // align * align)
        self.halo = seg.halo
        self.height, self.width = height, width
        self.tiles = [
            Tile(rows, cols)
            for rows in spans(height, self.tile, self.halo, align)
            for cols in spans(width, self.tile, self.halo, align)
        ]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def largest_window(self) -> tuple[int, int]:
        return (
            max(t.rows.window_end - t.rows.window_start for t in self.tiles),
            max(t.cols.window_end - t.cols.window_start for t in self.tiles),
        )


def segment_layouts(height: int, width: int, scheme: TileScheme, choice: LayerChoice) -> list[TileLayout]:
    """The layouts of a scheme's tiled segments for an image of height x width (each segment's input is
    the previous one's pool output: half its size, rounded down, per pool)."""
    layouts = []
    for seg in scheme.cut(choice)[0]:
        factor = 2 ** (seg.first - 1)
        layouts.append(TileLayout(height // factor, width // factor, scheme.side(seg), seg))
    return layouts
