"""Where the tiles of an exactly tiled evaluation lie: pure geometry, no network.

Every position of every feature map is owned by exactly one tile. A tile is run with a halo around its
owned region that covers the receptive field of the deepest layer used, and its window starts on the
pooling grid of that layer, so that the tile's features at owned positions are those of the whole image.
The planner (server/engine/memory.py) sizes tiles with this module; server/engine/tiling.py runs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stylize_service.models.layers import LayerChoice
from stylize_service.models.vgg16 import BLOCK_ENDS, CONVS, downsampling


def receptive_radius(layer: str) -> int:
    """How far (input px) beyond a feature's own position the input can influence it, at `layer`."""
    radius, jump = 0, 1
    for spec in CONVS:
        radius += jump  # a 3x3, stride 1 convolution reaches one position further at this resolution
        if spec.relu == layer:
            return radius
        if spec.name in BLOCK_ENDS:
            radius += jump  # a 2x2, stride 2 pool reaches one position further ...
            jump *= 2  # ... and halves the resolution
    raise ValueError(f"unknown layer {layer!r}")


def alignment(layer: str) -> int:
    """Tile windows start on multiples of this, so that the pools see the windows the whole image has."""
    return downsampling(layer)


def halo(layer: str) -> int:
    """The halo around a tile's owned region: the receptive radius, rounded up to the pooling grid."""
    align = alignment(layer)
    return -(-receptive_radius(layer) // align) * align


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
    """The tiles of an image of height x width for a layer choice, owned parts of about `tile` px."""

    def __init__(self, height: int, width: int, tile: int, choice: LayerChoice) -> None:
        align = alignment(choice.deepest)
        self.tile = max(align, tile // align * align)
        self.halo = halo(choice.deepest)
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
