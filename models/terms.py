"""The terms of the Gatys loss, one builder each, registered by name.

A term writes its part of the loss graph; models.graphs assembles the terms into the targets graph (what a
term compares against, computed once from the content or style image) and the loss graph (every term's
weighted value, their sum and the gradient). Adding a term means one new LossTerm subclass here, one entry
in TERMS, and its weight (and layers) in the engine's settings.

Layered terms compare the network's features at chosen layers with targets; a layer's value is
`weight * layer_weight * layer_loss`. Unlayered terms look at the image itself.

Tiling seam: `region_separable` says whether a layer's loss is a sum over pixels of the feature map
(content: yes, each region can be evaluated on its own against its part of the target) or needs a
statistic of the whole image first (style: the Gram matrix sums over every position).
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar

from onnx import TensorProto

from .onnx_builder import CHANNELS, GraphBuilder


class LossTerm(ABC):
    name: ClassVar[str]
    layered: ClassVar[bool]
    region_separable: ClassVar[bool]

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        """Layered terms: the node computing this term's target at `layer` from a reference image's features."""
        raise NotImplementedError(f"{self.name} has no layer targets")

    def target_shape(self, layer: str) -> list[int | None]:
        """Layered terms: the shape of the target fed to the loss graph (None = any size)."""
        raise NotImplementedError(f"{self.name} has no layer targets")

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        """Layered terms: the unweighted scalar loss of one layer."""
        raise NotImplementedError(f"{self.name} has no layers")

    def image_loss(self, b: GraphBuilder, image: str) -> str:
        """Unlayered terms: the unweighted scalar loss of the network input `image`."""
        raise NotImplementedError(f"{self.name} is layered")


class ContentTerm(LossTerm):
    """mean((F_l - P_l)^2): the features of the image against the content image's."""

    name = "content"
    layered = True
    region_separable = True

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        return b.op("Identity", [features], out)

    def target_shape(self, layer: str) -> list[int | None]:
        return [1, CHANNELS[layer], None, None]

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        return b.mean_square(features, target)


class StyleTerm(LossTerm):
    """mean((G_l - A_l)^2), G = F Fᵀ / (C H W): the image's Gram matrices against the style images'."""

    name = "style"
    layered = True
    region_separable = False  # the Gram matrix sums over the whole feature map

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        return b.gram(features, layer, out)

    def target_shape(self, layer: str) -> list[int | None]:
        return [CHANNELS[layer], CHANNELS[layer]]

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        return b.mean_square(b.gram(features, layer), target)


class TotalVariationTerm(LossTerm):
    """1/2 sum_{i<H-1, j<W-1} ((x[i,j] - x[i,j+1])^2 + (x[i,j] - x[i+1,j])^2) over every channel."""

    name = "tv"
    layered = False
    region_separable = True

    def image_loss(self, b: GraphBuilder, image: str) -> str:
        axes = b.const("tv/axes", [2, 3], TensorProto.INT64)

        def window(start: list[int], end: list[int], tag: str) -> str:
            return b.op(
                "Slice",
                [
                    image,
                    b.const(f"tv/{tag}_start", start, TensorProto.INT64),
                    b.const(f"tv/{tag}_end", end, TensorProto.INT64),
                    axes,
                ],
            )

        corner = window([0, 0], [-1, -1], "corner")
        right = window([0, 1], [-1, 2**62], "right")
        below = window([1, 0], [2**62, -1], "below")
        dx = b.op("Sub", [corner, right])
        dy = b.op("Sub", [corner, below])
        squares = b.op("Add", [b.op("Mul", [dx, dx]), b.op("Mul", [dy, dy])])
        half = b.const("tv/half", 0.5, TensorProto.FLOAT)
        return b.op("Mul", [half, b.op("ReduceSum", [squares], keepdims=0)])


# The registry, in the order the terms are summed (and reported).
TERMS: dict[str, LossTerm] = {term.name: term for term in (ContentTerm(), StyleTerm(), TotalVariationTerm())}
LAYERED_TERMS: tuple[str, ...] = tuple(name for name, term in TERMS.items() if term.layered)
