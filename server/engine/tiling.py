"""Exact tiled evaluation: the loss and its gradient of a large image, computed tile by tile.

The tiles' geometry is server/engine/tile_layout.py's: each tile owns its positions of every feature map,
and its window's features there are those of the whole image, bit for bit up to the order of float
additions. Then (models.terms):
- separable terms (content, tv) are summed over the owned parts;
- the style term needs the whole image's Gram matrices: a first pass sums them over the tiles' owned
  features, then each tile runs forward and backward against those fixed Grams. With masked styles
  (guides) the term's spatial inputs, whole maps at their layers (Targets.spatial), are cut to each
  tile's window at their layer exactly as the content targets are, and multiply the owned-position mask.
Each tile's input gradient is added into the whole image's gradient at the tile's window, so the loss and
gradient equal the untiled ones up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stylize_service.models import graphs
from stylize_service.models.graphs import IMAGE_LAYER
from stylize_service.models.terms import TERMS
from stylize_service.models.vgg16 import POOLS_BEFORE

from .guides import ones_maps
from .network import Evaluation, Targets, TileSessions
from .tile_layout import Tile, TileLayout


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

    def _spatial_layers(self) -> dict[str, str]:
        """The terms' spatial inputs (LossTerm.spatial_inputs, e.g. the guides) by name -> their layer."""
        return {
            name: layer
            for term_name, layers in self._choice.layers
            for layer in layers
            for name in self._choice.term(term_name).spatial_inputs(layer)
        }

    def _cut(self, tile: Tile, spatial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each spatial input (a whole map at its layer) cut to the tile's window at that layer, as the
        content targets are."""
        layers = self._spatial_layers()
        cut = {}
        for name, whole in spatial.items():
            pools = _pools(layers[name])
            cut[name] = np.ascontiguousarray(
                whole[..., tile.rows.window_at(pools), tile.cols.window_at(pools)]
            )
        return cut

    def _default_spatial(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The spatial inputs of an image given none: for a guided choice, all-ones guides (plain Grams)."""
        if not self._choice.guides:
            return {}
        return ones_maps(image.shape[-2], image.shape[-1], self._choice.layers_of("style"))

    def _whole_image(
        self,
        image: np.ndarray,
        statistics: bool,
        features: bool,
        spatial: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """One pass over the tiles of `image`: the non-separable terms' statistics summed over the tiles
        ({term: {layer: sum}}, float64) and/or the whole feature maps of the separable layered terms'
        layers, assembled from the tiles' owned parts. spatial: the terms' spatial inputs as whole maps
        (None = their defaults for this image)."""
        spatial = self._default_spatial(image) if spatial is None else spatial
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
                {**self._masks(tile, mask_layers), **self._cut(tile, spatial)},
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

    def separable_targets(self, content: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """The separable layered terms' targets (whole feature maps) of a network input (1, 3, h, w)."""
        _, features = self._whole_image(content, statistics=False, features=True)
        return {
            name: {layer: features[layer] for layer in layers}
            for name, layers in self._choice.layers
            if TERMS[name].region_separable
        }

    def statistic_targets(
        self, image: np.ndarray, guides: dict[str, np.ndarray] | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        """The non-separable terms' targets (style: Gram matrices) of one network input (1, 3, h, w), from
        their statistics summed over the tiles: those of the untiled image, up to float rounding. guides:
        for a guided choice, the image's guide maps (its style mask), None = all ones."""
        sums, _ = self._whole_image(image, statistics=True, features=False, spatial=guides)
        return {
            name: {
                layer: self._choice.term(name).target_from_statistic(
                    total, _map_count(layer, total.shape[-1], image.shape[-2], image.shape[-1])
                )
                for layer, total in layers.items()
            }
            for name, layers in sums.items()
        }

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
        sums, _ = self._whole_image(x, statistics=True, features=False, spatial=targets.spatial)
        for name, layers in sums.items():
            for layer, total in layers.items():
                count = _map_count(layer, total.shape[-1], height, width)
                value, coefficient = self._choice.term(name).finish(
                    total,
                    targets.by_term[name][layer],
                    count,
                    weights[name] * layer_weights[name][layer],
                    targets.vectors,
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
            tile_feeds.update(self._cut(tile, targets.spatial))
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
