"""The terms of the Gatys loss, one builder each, registered by name.

A term writes its part of the loss graph; models.graphs assembles the terms into the targets graph (what a
term compares against, computed once from the content or style image) and the loss graph (every term's
weighted value, their sum and the gradient). Adding a term means one new LossTerm subclass here, one entry
in TERMS, and its weight (and layers) in the engine's settings.

Layered terms compare the network's features at chosen layers with targets; a layer's value is
`weight * layer_weight * layer_loss`. Unlayered terms look at the image itself.

Tiled evaluation (server.engine.tiling) evaluates the same loss exactly, tile by tile, with every
position of every feature map owned by one tile (a 0/1 mask marks a tile's owned positions):
- `region_separable` terms (content, tv) are sums over positions: each tile adds `region_loss` over
  its owned positions, scaled by a fed factor (the term's weights over the whole map's element count);
- the others (style) need a statistic of the whole image first: a first pass sums each tile's
  `statistic` (the Gram matrix of its owned features); `finish` turns the sum into the term's value and a
  coefficient, and a second pass backpropagates each tile's `surrogate`, a scalar whose gradient with
  respect to the owned features equals the true loss's given that whole-image statistic.

Spatial control (docs/masks.md): a choice with guides (LayerChoice.guides > 0) takes the style term in its
guided form, GuidedStyleTerm: one Gram matrix per guide (a region of the picture with its own style). Its
graphs read per-layer spatial inputs (`spatial_inputs`, whole maps cut per tile like the content targets)
and a vector of the guides' weights (`vector_inputs`).
"""

from __future__ import annotations

from abc import ABC
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .vgg16 import CHANNELS

if TYPE_CHECKING:  # graphs are built by models.graphs; the terms need no onnx to be named and planned
    from .onnx_builder import GraphBuilder


class LossTerm(ABC):
    name: ClassVar[str]
    layered: ClassVar[bool]
    region_separable: ClassVar[bool]
    # The request's settings (StylizeSettings fields, as the proto's StylizeOptions names them) that
    # hold this term's weight and, for a layered term, its layers: the one place a term meets settings.
    weight_setting: ClassVar[str]
    layers_setting: ClassVar[str] = ""

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        """Layered terms: the node computing this term's target at `layer` from a reference image's features."""
        raise NotImplementedError(f"{self.name} has no layer targets")

    def target_shape(self, layer: str) -> list[int | None]:
        """Layered terms: the shape of the target fed to the loss graph (None = any size)."""
        raise NotImplementedError(f"{self.name} has no layer targets")

    def spatial_inputs(self, layer: str) -> dict[str, list[int | None]]:
        """Inputs (name -> shape) of this term's graphs at `layer` that are maps of the layer's positions,
        (N, 1, h, w): fed whole to the untiled graphs, cut to each tile's window at the layer when tiled."""
        return {}

    def vector_inputs(self) -> dict[str, list[int | None]]:
        """Inputs (name -> shape) of the loss graph that are neither spatial nor targets."""
        return {}

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        """Layered terms: the unweighted scalar loss of one layer."""
        raise NotImplementedError(f"{self.name} has no layers")

    def image_loss(self, b: GraphBuilder, image: str) -> str:
        """Unlayered terms: the unweighted scalar loss of the network input `image`."""
        raise NotImplementedError(f"{self.name} is layered")

    # --- tiled evaluation ---

    def region_loss(self, b: GraphBuilder, features: str, mask: str, target: str, layer: str) -> str:
        """Separable layered terms: the unscaled sum of the layer's loss over the owned positions."""
        raise NotImplementedError(f"{self.name} is not separable by region")

    def region_image_loss(self, b: GraphBuilder, image: str, mask: str) -> str:
        """Separable unlayered terms: the unscaled sum of the loss over the owned pixels."""
        raise NotImplementedError(f"{self.name} is not an image term separable by region")

    def region_scale(self, weight: float, layer_weight: float, count: int) -> float:
        """The factor turning a region sum into the term's (weighted) share of the loss; count is the
        element count of the whole feature map (or image)."""
        raise NotImplementedError(f"{self.name} is not separable by region")

    def statistic(self, b: GraphBuilder, features: str, mask: str, layer: str) -> str:
        """Non-separable terms: a tile's share of the whole-image statistic (sums over tiles)."""
        raise NotImplementedError(f"{self.name} needs no whole-image statistic")

    def statistic_shape(self, layer: str) -> list[int | None]:
        raise NotImplementedError(f"{self.name} needs no whole-image statistic")

    def finish(
        self,
        statistic: np.ndarray,
        target: np.ndarray,
        count: int,
        weight: float,
        vectors: dict[str, np.ndarray] | None = None,
    ) -> tuple[float, np.ndarray]:
        """Non-separable terms: the whole-image statistic (summed over tiles, count elements) -> the layer's
        weighted value and the coefficient that its surrogate takes. vectors: the values of the term's
        vector_inputs."""
        raise NotImplementedError(f"{self.name} needs no whole-image statistic")

    def target_from_statistic(self, statistic: np.ndarray, count: int) -> np.ndarray:
        """Non-separable terms: the target of a reference image from its summed statistic."""
        raise NotImplementedError(f"{self.name} needs no whole-image statistic")

    def surrogate(self, b: GraphBuilder, features: str, mask: str, coefficient: str, layer: str) -> str:
        """Non-separable terms: a scalar whose gradient with respect to the owned features is the loss's."""
        raise NotImplementedError(f"{self.name} needs no whole-image statistic")


class ContentTerm(LossTerm):
    """mean((F_l - P_l)^2): the features of the image against the content image's."""

    name = "content"
    layered = True
    region_separable = True
    weight_setting = "content_weight"
    layers_setting = "content_layers"

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        return b.op("Identity", [features], out)

    def target_shape(self, layer: str) -> list[int | None]:
        return [1, CHANNELS[layer], None, None]

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        return b.mean_square(features, target)

    def region_loss(self, b: GraphBuilder, features: str, mask: str, target: str, layer: str) -> str:
        diff = b.op("Sub", [features, target])
        return b.op("ReduceSum", [b.op("Mul", [b.op("Mul", [diff, diff]), mask])], keepdims=0)

    def region_scale(self, weight: float, layer_weight: float, count: int) -> float:
        return weight * layer_weight / count  # mean = sum / count


class StyleTerm(LossTerm):
    """mean((G_l - A_l)^2), G = F Fᵀ / (C H W): the image's Gram matrices against the style images'."""

    name = "style"
    layered = True
    region_separable = False  # the Gram matrix sums over the whole feature map
    weight_setting = "style_weight"
    layers_setting = "style_layers"

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        return b.gram(features, layer, out)

    def target_shape(self, layer: str) -> list[int | None]:
        return [CHANNELS[layer], CHANNELS[layer]]

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        return b.mean_square(b.gram(features, layer), target)

    def statistic(self, b: GraphBuilder, features: str, mask: str, layer: str) -> str:
        """F_own F_ownᵀ, unnormalised: the tiles' sum divided by the whole map's C H W is G."""
        return b.gram_sum(b.op("Mul", [features, mask]), layer)

    def statistic_shape(self, layer: str) -> list[int | None]:
        return [CHANNELS[layer], CHANNELS[layer]]

    def target_from_statistic(self, statistic: np.ndarray, count: int) -> np.ndarray:
        return (statistic / np.float32(count)).astype(np.float32)

    def finish(
        self,
        statistic: np.ndarray,
        target: np.ndarray,
        count: int,
        weight: float,
        vectors: dict[str, np.ndarray] | None = None,
    ) -> tuple[float, np.ndarray]:
        # L = w mean((G - A)^2) with G = S / N over C x C entries; dL/dS = 2 w (G - A) / (C^2 N).
        channels = statistic.shape[0]
        difference = statistic.astype(np.float64) / count - target
        value = weight * float(np.mean(difference**2))
        coefficient = (2.0 * weight / (channels * channels * count)) * difference
        return value, coefficient.astype(np.float32)

    def surrogate(self, b: GraphBuilder, features: str, mask: str, coefficient: str, layer: str) -> str:
        # sum(K * F_own F_ownᵀ) has gradient (K + Kᵀ) F_own = 2 K F_own = dL/dF_own for the symmetric K.
        return b.op(
            "ReduceSum", [b.op("Mul", [coefficient, self.statistic(b, features, mask, layer)])], keepdims=0
        )


def guide_input(layer: str) -> str:
    """Input of a guided choice's graphs: the guides at `layer`, (K, 1, h, w), one map per guide (the
    targets graph takes one, a style image's)."""
    return f"guide/{layer}"


GUIDE_WEIGHTS = "guide_weights"  # input of a guided loss graph: each guide's weight, a vector of K


class GuidedStyleTerm(StyleTerm):
    """The style term with K guides (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style
    Transfer", guided Gram matrices): sum_k lambda_k mean((G_k - A_k)^2), G_k = (F T_k)(F T_k)ᵀ / (C H W).

    T_k (input guide/<layer>) is guide k's map at the layer's resolution, scaled so that its squares
    average 1 over the whole map: G_k is then the mean of f fᵀ weighted by the region's mask, normalised by
    the mask's mass (server.engine.guides makes T_k; an all-white mask gives T_k = 1 and the plain Gram).
    A_k is guide k's target and lambda_k (input guide_weights) its weight. Positions no guide covers add
    nothing. The targets graph computes one guided Gram per guide map it is fed (any number, a style
    image's one); the loss graphs unroll the K guides, so the choice's K is part of the graphs' key."""

    def __init__(self, guides: int) -> None:
        if guides < 1:
            raise ValueError(f"a guided style term needs at least one guide, got {guides}")
        self.guides = guides

    def spatial_inputs(self, layer: str) -> dict[str, list[int | None]]:
        return {guide_input(layer): [None, 1, None, None]}

    def vector_inputs(self) -> dict[str, list[int | None]]:
        return {GUIDE_WEIGHTS: [self.guides]}

    def target(self, b: GraphBuilder, features: str, layer: str, out: str) -> str:
        product = self._stacked_gram_sum(b, b.op("Mul", [features, guide_input(layer)]), layer)
        return b.op("Div", [product, b.element_count(features)], out)

    def target_shape(self, layer: str) -> list[int | None]:
        return [self.guides, CHANNELS[layer], CHANNELS[layer]]

    def layer_loss(self, b: GraphBuilder, features: str, target: str, layer: str) -> str:
        values = []
        for k in range(self.guides):
            guided = b.op("Mul", [features, self._guide(b, guide_input(layer), k)])
            gram = b.gram(guided, layer)
            weight = b.pick(GUIDE_WEIGHTS, k)
            values.append(b.op("Mul", [weight, b.mean_square(gram, b.pick(target, k))]))
        return b.op("Sum", values)

    def statistic(self, b: GraphBuilder, features: str, mask: str, layer: str) -> str:
        """sum over the owned positions of T_k^2 f fᵀ for every guide, (K, C, C), unnormalised."""
        weights = b.op("Mul", [mask, guide_input(layer)])
        return self._stacked_gram_sum(b, b.op("Mul", [features, weights]), layer)

    def statistic_shape(self, layer: str) -> list[int | None]:
        return [self.guides, CHANNELS[layer], CHANNELS[layer]]

    def finish(
        self,
        statistic: np.ndarray,
        target: np.ndarray,
        count: int,
        weight: float,
        vectors: dict[str, np.ndarray] | None = None,
    ) -> tuple[float, np.ndarray]:
        # L = w sum_k l_k mean((G_k - A_k)^2), G_k = S_k / N; dL/dS_k = 2 w l_k (G_k - A_k) / (C^2 N).
        assert vectors is not None, "a guided style term needs its guides' weights"
        guide_weights = np.asarray(vectors[GUIDE_WEIGHTS], np.float64).reshape(-1, 1, 1)
        channels = statistic.shape[-1]
        difference = statistic.astype(np.float64) / count - target
        value = weight * float(np.sum(guide_weights * np.mean(difference**2, axis=(1, 2), keepdims=True)))
        coefficient = (2.0 * weight / (channels * channels * count)) * guide_weights * difference
        return value, coefficient.astype(np.float32)

    def surrogate(self, b: GraphBuilder, features: str, mask: str, coefficient: str, layer: str) -> str:
        values = []
        for k in range(self.guides):
            weights = b.op("Mul", [mask, self._guide(b, guide_input(layer), k)])
            product = b.gram_sum(b.op("Mul", [features, weights]), layer)
            values.append(b.op("ReduceSum", [b.op("Mul", [b.pick(coefficient, k), product])], keepdims=0))
        return b.op("Sum", values)

    @staticmethod
    def _guide(b: GraphBuilder, guides: str, k: int) -> str:
        """Guide k's map, (1, 1, h, w): a slice, so that it keeps the features' rank."""
        return _slice(b, guides, [k], [k + 1], [0], "guide")

    @staticmethod
    def _stacked_gram_sum(b: GraphBuilder, guided: str, layer: str) -> str:
        """(F T_k)(F T_k)ᵀ of (K, C, h, w) guided features, stacked: (K, C, C). Not differentiated (the
        targets and tile statistics graphs have no gradient), so a batched MatMul is fine here."""
        shape = b.int64_const(b.unique(f"{layer}/stacked_shape"), [0, CHANNELS[layer], -1])
        flat = b.op("Reshape", [guided, shape])
        return b.op("MatMul", [flat, b.op("Transpose", [flat], perm=[0, 2, 1])])


def _slice(b: GraphBuilder, source: str, start: list[int], end: list[int], axes: list[int], tag: str) -> str:
    return b.op(
        "Slice",
        [
            source,
            b.int64_const(b.unique(f"{tag}_start"), start),
            b.int64_const(b.unique(f"{tag}_end"), end),
            b.int64_const(b.unique(f"{tag}_axes"), axes),
        ],
    )


class TotalVariationTerm(LossTerm):
    """1/2 sum_{i<H-1, j<W-1} ((x[i,j] - x[i,j+1])^2 + (x[i,j] - x[i+1,j])^2) over every channel."""

    name = "tv"
    layered = False
    region_separable = True
    weight_setting = "tv_weight"

    def image_loss(self, b: GraphBuilder, image: str) -> str:
        half = b.float_const("tv/half", 0.5)
        return b.op("Mul", [half, b.op("ReduceSum", [self._squares(b, image)], keepdims=0)])

    def region_image_loss(self, b: GraphBuilder, image: str, mask: str) -> str:
        # The pairs whose top-left pixel is owned; their right and lower neighbours may lie in the halo.
        owned = _window(b, mask, [0, 0], [-1, -1], "tv_region/mask")
        return b.op("ReduceSum", [b.op("Mul", [self._squares(b, image), owned])], keepdims=0)

    @staticmethod
    def _squares(b: GraphBuilder, image: str) -> str:
        """(x[i,j] - x[i,j+1])^2 + (x[i,j] - x[i+1,j])^2 on the (i < H-1, j < W-1) grid."""
        corner = _window(b, image, [0, 0], [-1, -1], "tv/corner")
        right = _window(b, image, [0, 1], [-1, 2**62], "tv/right")
        below = _window(b, image, [1, 0], [2**62, -1], "tv/below")
        dx = b.op("Sub", [corner, right])
        dy = b.op("Sub", [corner, below])
        return b.op("Add", [b.op("Mul", [dx, dx]), b.op("Mul", [dy, dy])])

    def region_scale(self, weight: float, layer_weight: float, count: int) -> float:
        return 0.5 * weight


def _window(b: GraphBuilder, source: str, start: list[int], end: list[int], tag: str) -> str:
    """source[..., start[0]:end[0], start[1]:end[1]] of a (N, C, H, W) tensor."""
    return _slice(b, source, start, end, [2, 3], tag)


# The registry, in the order the terms are summed (and reported).
TERMS: dict[str, LossTerm] = {term.name: term for term in (ContentTerm(), StyleTerm(), TotalVariationTerm())}
LAYERED_TERMS: tuple[str, ...] = tuple(name for name, term in TERMS.items() if term.layered)


def term_of(name: str, guides: int = 0) -> LossTerm:
    """The term `name` as a choice with `guides` guides uses it: the guided style term where there are
    guides, else the registry's."""
    if guides and name == StyleTerm.name:
        return GuidedStyleTerm(guides)
    return TERMS[name]
