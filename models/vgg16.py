"""The VGG16 feature architecture (Simonyan & Zisserman 2014, configuration D) as data.

Thirteen 3x3 stride-1 same-padded convolutions, each followed by a ReLU, in five blocks closed by a 2x2 pool.
Layer names follow the neural-style convention: conv{block}_{index} and relu{block}_{index}.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvSpec:
    name: str  # conv1_1
    block: int
    index: int
    in_channels: int
    out_channels: int

    @property
    def relu(self) -> str:
        return f"relu{self.block}_{self.index}"


def _specs() -> tuple[ConvSpec, ...]:
    widths = (64, 128, 256, 512, 512)
    depths = (2, 2, 3, 3, 3)
    specs = []
    in_channels = 3
    for block, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        for index in range(1, depth + 1):
            specs.append(ConvSpec(f"conv{block}_{index}", block, index, in_channels, width))
            in_channels = width
    return tuple(specs)


CONVS: tuple[ConvSpec, ...] = _specs()
RELU_LAYERS: tuple[str, ...] = tuple(spec.relu for spec in CONVS)
# The 2x2 pools above each ReLU layer, and its channels: a layer's map is 2 ** pools times smaller than
# the image on each side (downsampling), and the tiles and the pyramid align to that grid.
POOLS_BEFORE: dict[str, int] = {spec.relu: spec.block - 1 for spec in CONVS}
CHANNELS: dict[str, int] = {spec.relu: spec.out_channels for spec in CONVS}


def downsampling(layer: str) -> int:
    """How many image pixels one position of `layer`'s map spans along each side: 2 ** its pools."""
    return 2 ** POOLS_BEFORE[layer]


# The last conv of each block is followed by pool{block}.
BLOCK_ENDS: frozenset[str] = frozenset(
    spec.name
    for spec, nxt in zip(CONVS, (*CONVS[1:], None), strict=True)
    if nxt is None or nxt.block != spec.block
)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image with values in [0, 1] becomes the network's input: x = (rgb * scale - mean) / std,
    with channels in channel_order. mean and std are given in the network's channel order."""

    channel_order: str  # "RGB" or "BGR"
    input_scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")


CAFFE_PREPROCESSING = Preprocessing("BGR", 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
TORCHVISION_PREPROCESSING = Preprocessing("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class VGGWeights:
    """The 13 conv layers' kernels (out, in, 3, 3) and biases, float32, plus how inputs must be prepared."""

    kernels: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    preprocessing: Preprocessing
    source: str  # human-readable provenance, recorded in the model's metadata

    def __post_init__(self) -> None:
        for spec in CONVS:
            kernel = self.kernels.get(spec.name)
            bias = self.biases.get(spec.name)
            expected = (spec.out_channels, spec.in_channels, 3, 3)
            if kernel is None or bias is None:
                raise ValueError(f"weights for {spec.name} are missing")
            if kernel.shape != expected:
                raise ValueError(f"{spec.name} kernel has shape {kernel.shape}, expected {expected}")
            if bias.shape != (spec.out_channels,):
                raise ValueError(f"{spec.name} bias has shape {bias.shape}, expected ({spec.out_channels},)")
