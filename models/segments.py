"""The feature network cut into segments at its pooling layers: the unit of exact tiled evaluation.

A segment is a run of consecutive VGG16 blocks, up to the deepest layer a choice uses. It takes the
previous segment's last pool output (the image for the first), and ends either with the choice's deepest
layer or with its last block's pool, whose output the next segment takes. Tiling one segment at a time
(server/engine/tiling.py) needs, around each tile, only the receptive field of that segment's own
convolutions: 2 to 4 positions at the segment's resolution, where tiling the whole network at once needs
the deepest layer's (188 px for relu5_1). Only the pool outputs between segments are held whole.

Pure geometry and names, no onnx: planning (server/engine/memory.py) reasons about segments without
building their graphs; models/graphs.py builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import LayerChoice
from .vgg16 import BLOCK_ENDS, CHANNELS, CONVS, POOLS_BEFORE, RELU_LAYERS, ConvSpec


def block_of(layer: str) -> int:
    """The VGG16 block (1 to 5) of a ReLU layer."""
    return POOLS_BEFORE[layer] + 1


def deepest_block(choice: LayerChoice) -> int:
    return block_of(choice.deepest)


@dataclass(frozen=True)
class Segment:
    """Blocks first..last of a choice's network (1-based, inclusive)."""

    first: int
    last: int
    deepest: str  # the deepest ReLU layer the segment computes
    pooled: bool  # it ends with pool{last}, the next segment's input

    @property
    def convs(self) -> tuple[ConvSpec, ...]:
        """The segment's convolutions, in order, up to its deepest layer."""
        end = next(i for i, spec in enumerate(CONVS) if spec.relu == self.deepest)
        return tuple(spec for spec in CONVS[: end + 1] if spec.block >= self.first)

    @property
    def input_channels(self) -> int:
        return self.convs[0].in_channels

    @property
    def output(self) -> str | None:
        """The name of the pool output the segment ends with (the next one's input); None for the last."""
        return f"pool{self.last}" if self.pooled else None

    @property
    def output_channels(self) -> int:
        return CHANNELS[self.deepest]

    def pools_to(self, layer: str) -> int:
        """The 2x2 pools between the segment's input and `layer` (a layer of the segment)."""
        return POOLS_BEFORE[layer] - (self.first - 1)

    @property
    def output_pools(self) -> int:
        """The pools between the segment's input and its output (the pool output, or the deepest layer)."""
        return self.pools_to(self.deepest) + (1 if self.pooled else 0)

    @property
    def alignment(self) -> int:
        """Tile windows start on multiples of this (input positions), so that every pool of the segment
        sees the windows that the whole map has."""
        return 2**self.output_pools

    @property
    def receptive_radius(self) -> int:
        """How far (input positions) beyond a position the segment's input can change its features: one
        per 3x3 convolution at its resolution, and one more per inner pool. A trailing pool needs none:
        its owned outputs read owned inputs only, the windows being aligned."""
        radius, jump = 0, 1
        for spec in self.convs:
            radius += jump
            if spec.name in BLOCK_ENDS and spec.relu != self.deepest:
                radius += jump
                jump *= 2
        return radius

    @property
    def halo(self) -> int:
        """The halo around a tile's owned part: the receptive radius, rounded up to the alignment."""
        align = self.alignment
        return -(-self.receptive_radius // align) * align

    def layers(self, choice: LayerChoice) -> list[str]:
        """The choice's layers that the segment computes, shallowest first."""
        return sorted(
            (layer for layer in choice.used if self.first <= block_of(layer) <= self.last),
            key=RELU_LAYERS.index,
        )

    def __str__(self) -> str:
        return f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"


def segment(choice: LayerChoice, first: int, last: int) -> Segment:
    """Blocks first..last of the choice's network; last is at most the choice's deepest block."""
    end = deepest_block(choice)
    if not 1 <= first <= last <= end:
        raise ValueError(f"blocks {first}..{last} are not within the choice's 1..{end}")
    if last == end:
        return Segment(first, last, choice.deepest, pooled=False)
    final_conv = max((spec for spec in CONVS if spec.block == last), key=lambda spec: spec.index)
    return Segment(first, last, final_conv.relu, pooled=True)
