"""Exact tiled evaluation: the loss and its gradient of a large image, computed tile by tile.

Every position of every feature map is owned by exactly one tile. A tile is run with a halo around its
owned region that covers the receptive field of the deepest layer used, and its window starts on the
pooling grid of that layer, so the tile's features at owned positions are those of the whole image, bit
for bit up to the order of float additions. Then (models.terms):
- separable terms (content, tv) are summed over the owned parts;
- the style term needs the whole image's Gram matrices: a first pass sums them over the tiles' owned
  features, then each tile runs forward and backward against those fixed Grams.
Each tile's input gradient is added into the whole image's gradient at the tile's window, so the loss and
gradient equal the untiled ones up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from stylize_service.models import graphs
from stylize_service.models.graphs import IMAGE_LAYER, POOLS_BEFORE, LayerChoice
from stylize_service.models.terms import TERMS
from stylize_service.models.vgg16 import BLOCK_ENDS, CONVS

from .network import Evaluation, Targets, TileSessions


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
    return 2 ** POOLS_BEFORE[layer]


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


def _pools(layer: str) -> int:
    return 0 if layer == IMAGE_LAYER else POOLS_BEFORE[layer]


def _map_count(layer: str, channels: int, height: int, width: int) -> int:
    factor = 2 ** _pools(layer)
    return channels * (height // factor) * (width // factor)


class TiledEvaluator:
    """Targets and evaluations of one stage, tile by tile, with one choice's tile sessions."""

    def __init__(
        self,
        sessions: TileSessions,
        tile: int,
        should_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self._sessions = sessions
        self._choice = sessions.choice
        self._tile = tile
        self._should_stop = should_stop  # raises to abandon (cancellation); called between tile runs

    def layout(self, image: np.ndarray) -> TileLayout:
        return TileLayout(image.shape[-2], image.shape[-1], self._tile, self._choice)

    def _masks(self, tile: Tile, layers: list[str]) -> dict[str, np.ndarray]:
        return {graphs.mask_input(layer): tile.mask(_pools(layer)) for layer in layers}

    def _whole_image(
        self, image: np.ndarray, statistics: bool, features: bool
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """One pass over the tiles of `image`: the non-separable terms' statistics summed over the tiles
        ({term: {layer: sum}}, float64) and/or the whole feature maps of the separable layered terms'
        layers, assembled from the tiles' owned parts."""
        statistic_layers = {
            name: layers
            for name, layers in self._choice.layers
            if not TERMS[name].region_separable and layers
        }
        feature_layers = sorted(
            {
                layer
                for name, layers in self._choice.layers
                if TERMS[name].region_separable
                for layer in layers
            }
        )
        wanted = [
            graphs.statistic_output(n, layer) for n, layers in statistic_layers.items() for layer in layers
        ]
        wanted = wanted if statistics else []
        wanted += [graphs.feature_output(layer) for layer in feature_layers] if features else []
        sums: dict[str, dict[str, np.ndarray]] = {name: {} for name in statistic_layers} if statistics else {}
        whole: dict[str, np.ndarray] = {}
        if not wanted:
            return sums, whole
        mask_layers = sorted({layer for layers in statistic_layers.values() for layer in layers})
        rows, cols = image.shape[-2], image.shape[-1]
        for tile in self.layout(image):
            self._should_stop()
            window_rows, window_cols = tile.window()
            out = self._sessions.statistics(
                np.ascontiguousarray(image[..., window_rows, window_cols]),
                self._masks(tile, mask_layers),
                wanted,
            )
            for name, layers in sums.items():
                for layer in statistic_layers[name]:
                    value = out[graphs.statistic_output(name, layer)].astype(np.float64)
                    layers[layer] = layers[layer] + value if layer in layers else value
            if not features:
                continue
            for layer in feature_layers:
                tile_features = out[graphs.feature_output(layer)]
                pools = _pools(layer)
                if layer not in whole:
                    factor = 2**pools
                    whole[layer] = np.zeros(
                        (1, tile_features.shape[1], rows // factor, cols // factor), np.float32
                    )
                own_rows, own_cols = tile.rows.owned_at(pools), tile.cols.owned_at(pools)
                part = whole[layer][..., tile.rows.window_at(pools), tile.cols.window_at(pools)]
                part[..., own_rows, own_cols] = tile_features[..., own_rows, own_cols]
        return sums, whole

    def targets(self, content: np.ndarray, styles: list[tuple[float, np.ndarray]]) -> Targets:
        """Separable terms' targets from `content`; the others' blended over the (weight, style image)
        pairs; images are network inputs (1, 3, h, w)."""
        _, features = self._whole_image(content, statistics=False, features=True)
        by_term: dict[str, dict[str, np.ndarray]] = {}
        for name, layers in self._choice.layers:
            if TERMS[name].region_separable:
                by_term[name] = {layer: features[layer] for layer in layers}
            else:
                by_term[name] = {}
        for weight, style in styles:
            sums, _ = self._whole_image(style, statistics=True, features=False)
            for name, by_layer in sums.items():
                for layer, total in by_layer.items():
                    count = _map_count(layer, total.shape[0], style.shape[-2], style.shape[-1])
                    part = np.float32(weight) * TERMS[name].target_from_statistic(total, count)
                    by_term[name][layer] = by_term[name].get(layer, 0) + part
        return Targets(by_term)

    def evaluator(
        self, targets: Targets, weights: dict[str, float], layer_weights: dict[str, dict[str, float]]
    ) -> Callable[[np.ndarray], Evaluation]:
        """The stage's loss function of the network input x (1, 3, H, W)."""

        def evaluate(x: np.ndarray) -> Evaluation:
            return self._evaluate(x, targets, weights, layer_weights)

        return evaluate

    def _evaluate(
        self,
        x: np.ndarray,
        targets: Targets,
        weights: dict[str, float],
        layer_weights: dict[str, dict[str, float]],
    ) -> Evaluation:
        height, width = x.shape[-2], x.shape[-1]
        per_layer: dict[str, dict[str, float]] = {name: {} for name, _ in self._choice.layers}
        terms: dict[str, float] = dict.fromkeys(TERMS, 0.0)
        feeds: dict[str, np.ndarray] = {}
        # Pass 1 and finish(): the non-separable terms' values and coefficients.
        sums, _ = self._whole_image(x, statistics=True, features=False)
        for name, layers in sums.items():
            for layer, total in layers.items():
                count = _map_count(layer, total.shape[0], height, width)
                value, coefficient = TERMS[name].finish(
                    total, targets.by_term[name][layer], count, weights[name] * layer_weights[name][layer]
                )
                per_layer[name][layer] = value
                feeds[graphs.coefficient_input(name, layer)] = coefficient
        # The separable terms' scales; their targets are cut per tile below.
        separable: list[tuple[str, str]] = []
        for name, term in TERMS.items():
            if not term.region_separable:
                continue
            for layer in self._choice.layers_of(name) if term.layered else (IMAGE_LAYER,):
                channels = 3 if layer == IMAGE_LAYER else targets.by_term[name][layer].shape[1]
                layer_weight = layer_weights[name][layer] if term.layered else 1.0
                scale = term.region_scale(
                    weights[name], layer_weight, _map_count(layer, channels, height, width)
                )
                feeds[graphs.scale_input(name, layer)] = np.asarray(scale, np.float32)
                separable.append((name, layer))
        # Pass 2: each tile's share of the separable terms and of the gradient.
        grad = np.zeros_like(x)
        regions: dict[tuple[str, str], float] = dict.fromkeys(separable, 0.0)
        mask_layers = [*sorted(self._choice.used), IMAGE_LAYER]
        for tile in self.layout(x):
            self._should_stop()
            window_rows, window_cols = tile.window()
            tile_feeds = dict(feeds)
            tile_feeds.update(self._masks(tile, mask_layers))
            for name, layer in separable:
                if layer != IMAGE_LAYER:
                    pools = _pools(layer)
                    whole = targets.by_term[name][layer]
                    tile_feeds[graphs.target_input(name, layer)] = np.ascontiguousarray(
                        whole[..., tile.rows.window_at(pools), tile.cols.window_at(pools)]
                    )
            out = self._sessions.loss(np.ascontiguousarray(x[..., window_rows, window_cols]), tile_feeds)
            for key in separable:
                regions[key] += float(out[graphs.region_output(*key)])
            grad[..., window_rows, window_cols] += out[graphs.GRAD]
        for (name, layer), value in regions.items():
            if layer == IMAGE_LAYER:
                terms[name] += value
            else:
                per_layer[name][layer] = value
        for name, values in per_layer.items():
            terms[name] += sum(values.values())
        return Evaluation(loss=sum(terms.values()), terms=terms, per_layer=per_layer, grad=grad)
