"""Exact tiled evaluation: the loss and its gradient of a large image, computed segment by segment, tile by
tile.

The geometry is server/engine/tile_layout.py's: a TileScheme cuts the network into tiled segments at its
pooling layers (models/segments.py) and an untiled tail. Each tile owns its positions of every feature map
of its segment, and its window's features there are those of the whole map, bit for bit up to the order of
float additions. An evaluation then runs:
1. forward, segment by segment: each tile's owned part of the segment's output (a pool output) is written
   into the next segment's input, held whole, and each tile adds its owned features' share to the
   non-separable terms' statistics (style: F Fᵀ, a sum over positions);
2. the tail, untiled, forward and backward in one run: its layers' loss and the gradient at its input;
3. finish(): the whole-image statistics give the style values and the coefficients of their surrogates;
4. backward, segment by segment from the deepest: each tile recomputes its window's forward and
   backpropagates its share of the loss (separable terms summed over the owned positions, the style
   surrogates, and the gradient coming from the next segment at its owned output positions), and its
   input gradient is added into the segment's input gradient at the tile's window.
The loss and gradient equal the untiled ones up to float rounding. The targets passes (content features,
style Gram matrices) run the forward part alone. With masked styles (guides) the style term's spatial
inputs, whole maps at their layers (Targets.spatial), are cut to each tile's window at their layer exactly
as the content targets are, and the untiled tail takes them whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stylize_service.models import graphs
from stylize_service.models.graphs import IMAGE_LAYER
from stylize_service.models.segments import Segment
from stylize_service.models.terms import TERMS
from stylize_service.models.vgg16 import POOLS_BEFORE

from .guides import ones_maps
from .network import Evaluation, Targets, TileSessions
from .tile_layout import Tile, TileLayout, TileScheme

TermSums = dict[str, dict[str, np.ndarray]]  # term -> layer -> statistic summed over the tiles (float64)


def _map_count(layer: str, channels: int, height: int, width: int) -> int:
    factor = 2 ** (0 if layer == IMAGE_LAYER else POOLS_BEFORE[layer])
    return channels * (height // factor) * (width // factor)


def _window(array: np.ndarray, tile: Tile, pools: int) -> np.ndarray:
    """The part of a whole map (at `pools` pools below the tile's segment input) under the tile's window."""
    return array[..., tile.rows.window_at(pools), tile.cols.window_at(pools)]


class TiledEvaluator:
    """Targets and evaluations of one stage, segment by segment and tile by tile, with one choice's tile
    sessions."""

    def __init__(
        self,
        sessions: TileSessions,
        scheme: TileScheme,
        should_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self._sessions = sessions
        self._choice = sessions.choice
        self._scheme = scheme
        self._segments, self._tail = scheme.cut(self._choice)
        self._should_stop = should_stop  # raises to abandon (cancellation); called between tile runs
        # The terms' spatial inputs (LossTerm.spatial_inputs, e.g. the guides) by name -> their layer.
        self._spatial_layers = {
            name: layer
            for term_name, layers in self._choice.layers
            for layer in layers
            for name in self._choice.term(term_name).spatial_inputs(layer)
        }

    def layout(self, image: np.ndarray) -> TileLayout:
        """The first segment's tiles over the image (what Progress reports)."""
        return self._layout(self._segments[0], image)

    def _layout(self, seg: Segment, segment_input: np.ndarray) -> TileLayout:
        return TileLayout(segment_input.shape[-2], segment_input.shape[-1], self._scheme.side(seg), seg)

    def _cut(self, seg: Segment, tile: Tile, spatial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The spatial inputs of the segment's layers (whole maps at their layers) cut to the tile's window
        at that layer, as the content targets are."""
        layers = self._spatial_layers
        inside = set(seg.layers(self._choice))
        return {
            name: np.ascontiguousarray(_window(whole, tile, seg.pools_to(layers[name])))
            for name, whole in spatial.items()
            if layers[name] in inside
        }

    def _whole(self, spatial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The spatial inputs of the untiled tail's layers, whole."""
        layers = self._spatial_layers
        tail = {layer for _, layer in self._tail_layers()}
        return {name: whole for name, whole in spatial.items() if layers[name] in tail}

    def _default_spatial(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The spatial inputs of an image given none: for a guided choice, all-ones guides (plain Grams)."""
        if not self._choice.guides:
            return {}
        return ones_maps(image.shape[-2], image.shape[-1], self._choice.layers_of("style"))

    def _terms_at(self, seg: Segment, separable: bool) -> dict[str, list[str]]:
        """The layered terms of one kind with layers in the segment, and those layers."""
        inside = set(seg.layers(self._choice))
        found = {
            name: [layer for layer in layers if layer in inside]
            for name, layers in self._choice.layers
            if self._choice.term(name).region_separable == separable
        }
        return {name: layers for name, layers in found.items() if layers}

    def _tail_layers(self, separable: bool | None = None) -> list[tuple[str, str]]:
        """(term, layer) of the layered terms' layers in the untiled tail (of one kind, or all)."""
        tiled = {layer for seg in self._segments for layer in seg.layers(self._choice)}
        return [
            (name, layer)
            for name, layers in self._choice.layers
            if separable is None or self._choice.term(name).region_separable == separable
            for layer in layers
            if layer not in tiled
        ]

    def _forward(
        self,
        image: np.ndarray,
        *,
        statistics: bool,
        features: bool,
        keep_inputs: bool,
        spatial: dict[str, np.ndarray],
    ) -> tuple[TermSums, dict[str, np.ndarray], list[np.ndarray]]:
        """The forward pass through the tiled segments: the non-separable terms' statistics at their
        layers, summed over the tiles (float64), where `statistics`; the whole feature maps of the
        separable terms' layers, assembled from the tiles' owned parts, where `features`; and the inputs
        of every tiled segment and of the tail (keep_inputs), or only the last one. spatial: the terms'
        spatial inputs, whole."""
        sums: TermSums = {}
        whole: dict[str, np.ndarray] = {}
        inputs = [image]
        for seg in self._segments:
            current = inputs[-1]
            statistic_layers = self._terms_at(seg, separable=False) if statistics else {}
            feature_layers = sorted(
                {layer for layers in self._terms_at(seg, True).values() for layer in layers}
            )
            feature_layers = feature_layers if features else []
            wanted = [
                graphs.statistic_output(n, layer)
                for n, layers in statistic_layers.items()
                for layer in layers
            ]
            wanted += [graphs.feature_output(layer) for layer in feature_layers]
            wanted += [seg.output] if seg.output else []
            if not wanted:
                continue
            # The statistics graph takes the masks of its statistic layers, wanted or not.
            mask_layers = sorted(
                {layer for layers in self._terms_at(seg, False).values() for layer in layers}
            )
            output = None
            if seg.output:
                size = (current.shape[-2] // 2**seg.output_pools, current.shape[-1] // 2**seg.output_pools)
                output = np.zeros((1, seg.output_channels, *size), np.float32)
            layout = self._layout(seg, current)
            for index, tile in enumerate(layout):
                self._should_stop()
                rows, cols = tile.window()
                masks = {graphs.mask_input(layer): tile.mask(seg.pools_to(layer)) for layer in mask_layers}
                masks.update(self._cut(seg, tile, spatial))
                out = self._sessions.statistics(
                    seg,
                    np.ascontiguousarray(current[..., rows, cols]),
                    masks,
                    wanted,
                    # A targets pass (keep_inputs False) shrinks the arena after each segment; an
                    # evaluation does not (its steps' memory is modelled step by step, and the
                    # allocations after each shrink cost it time).
                    last=not keep_inputs and index == len(layout) - 1,
                )
                for name, layers in statistic_layers.items():
                    for layer in layers:
                        value = out[graphs.statistic_output(name, layer)].astype(np.float64)
                        held = sums.setdefault(name, {})
                        held[layer] = held[layer] + value if layer in held else value
                for layer in feature_layers:
                    tile_features = out[graphs.feature_output(layer)]
                    pools = seg.pools_to(layer)
                    if layer not in whole:
                        whole[layer] = np.zeros(
                            (
                                1,
                                tile_features.shape[1],
                                current.shape[-2] // 2**pools,
                                current.shape[-1] // 2**pools,
                            ),
                            np.float32,
                        )
                    _own(whole[layer], tile, pools)[...] = _owned(tile_features, tile, pools)
                if output is not None and seg.output:
                    _own(output, tile, seg.output_pools)[...] = _owned(
                        out[seg.output], tile, seg.output_pools
                    )
            if output is not None:
                inputs = [*inputs, output] if keep_inputs else [output]
        return sums, whole, inputs

    def separable_targets(self, content: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """The separable layered terms' targets (whole feature maps) of a network input (1, 3, h, w)."""
        spatial = self._default_spatial(content)
        _, features, inputs = self._forward(
            content, statistics=False, features=True, keep_inputs=False, spatial=spatial
        )
        targets: dict[str, dict[str, np.ndarray]] = {
            name: {layer: features[layer] for layer in layers if layer in features}
            for name, layers in self._choice.layers
            if self._choice.term(name).region_separable
        }
        if self._tail is not None and self._tail_layers(separable=True):
            tail = self._sessions.tail_targets(self._tail, inputs[-1], self._whole(spatial))
            for name, layer in self._tail_layers(separable=True):
                targets[name][layer] = tail[graphs.target_input(name, layer)]
        return targets

    def statistic_targets(
        self, image: np.ndarray, guides: dict[str, np.ndarray] | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        """The non-separable terms' targets (style: Gram matrices) of one network input (1, 3, h, w), from
        their statistics summed over the tiles and from the untiled tail: those of the untiled image, up
        to float rounding. guides: for a guided choice, the image's guide maps (its style mask), None =
        all ones."""
        spatial = self._default_spatial(image) if guides is None else guides
        sums, _, inputs = self._forward(
            image, statistics=True, features=False, keep_inputs=False, spatial=spatial
        )
        height, width = image.shape[-2], image.shape[-1]
        targets: dict[str, dict[str, np.ndarray]] = {
            name: {} for name, _ in self._choice.layers if not self._choice.term(name).region_separable
        }
        for name, layers in sums.items():
            for layer, total in layers.items():
                count = _map_count(layer, total.shape[-1], height, width)
                targets[name][layer] = self._choice.term(name).target_from_statistic(total, count)
        if self._tail is not None and self._tail_layers(separable=False):
            tail = self._sessions.tail_targets(self._tail, inputs[-1], self._whole(spatial))
            for name, layer in self._tail_layers(separable=False):
                targets[name][layer] = tail[graphs.target_input(name, layer)]
        return {name: layers for name, layers in targets.items() if layers}

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
        # 1. Forward through the tiled segments.
        sums, _, inputs = self._forward(
            x, statistics=True, features=False, keep_inputs=True, spatial=targets.spatial
        )
        # 2. The untiled tail: its layers' values and the gradient at its input.
        upstream: np.ndarray | None = None
        if self._tail is not None:
            tail_feeds: dict[str, np.ndarray] = {}
            for name, layer in self._tail_layers():
                # As the loss graph multiplies them: in float32.
                tail_feeds[graphs.scale_input(name, layer)] = np.asarray(
                    np.float32(weights[name]) * np.float32(layer_weights[name][layer])
                )
                tail_feeds[graphs.target_input(name, layer)] = targets.by_term[name][layer]
            tail_feeds.update(self._whole(targets.spatial))
            tail_feeds.update(targets.vectors)
            out = self._sessions.tail_loss(self._tail, inputs.pop(), tail_feeds)
            for name, layer in self._tail_layers():
                per_layer[name][layer] = float(out[graphs.region_output(name, layer)])
            upstream = out[graphs.GRAD]
        # 3. finish(): the non-separable terms' values and coefficients, from the whole-image statistics.
        feeds: dict[str, np.ndarray] = {}
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
        # The separable terms' scales in the tiled segments; their targets are cut per tile below.
        separable: list[tuple[str, str]] = [
            (name, IMAGE_LAYER) for name, term in TERMS.items() if not term.layered
        ]
        for seg in self._segments:
            separable += [
                (n, layer) for n, layers in self._terms_at(seg, separable=True).items() for layer in layers
            ]
        for name, layer in separable:
            term = self._choice.term(name)
            channels = 3 if layer == IMAGE_LAYER else targets.by_term[name][layer].shape[1]
            layer_weight = layer_weights[name][layer] if term.layered else 1.0
            scale = term.region_scale(weights[name], layer_weight, _map_count(layer, channels, height, width))
            feeds[graphs.scale_input(name, layer)] = np.asarray(scale, np.float32)
        regions: dict[tuple[str, str], float] = dict.fromkeys(separable, 0.0)
        # 4. Backward through the tiled segments, deepest first.
        assert len(inputs) == len(self._segments)
        for seg in reversed(self._segments):
            segment_input = inputs.pop()  # no longer held once its segment is done
            grad = np.zeros_like(segment_input)
            owned_layers = [*seg.layers(self._choice), *([IMAGE_LAYER] if seg.first == 1 else [])]
            pools = {layer: 0 if layer == IMAGE_LAYER else seg.pools_to(layer) for layer in owned_layers}
            for tile in self._layout(seg, segment_input):
                self._should_stop()
                rows, cols = tile.window()
                tile_feeds = dict(feeds)
                tile_feeds.update({graphs.mask_input(layer): tile.mask(p) for layer, p in pools.items()})
                tile_feeds.update(self._cut(seg, tile, targets.spatial))
                for name, layer in separable:
                    if layer != IMAGE_LAYER and layer in pools:
                        whole = targets.by_term[name][layer]
                        tile_feeds[graphs.target_input(name, layer)] = np.ascontiguousarray(
                            _window(whole, tile, pools[layer])
                        )
                if seg.output:
                    assert upstream is not None  # a segment with an output is followed by one
                    tile_feeds[graphs.upstream_input(seg.output)] = _window(
                        upstream, tile, seg.output_pools
                    ) * tile.mask(seg.output_pools)
                out = self._sessions.loss(
                    seg,
                    np.ascontiguousarray(segment_input[..., rows, cols]),
                    tile_feeds,
                )
                for name, layer in separable:
                    if layer in pools:
                        regions[(name, layer)] += float(out[graphs.region_output(name, layer)])
                grad[..., rows, cols] += out[graphs.GRAD]
            upstream = grad
        assert upstream is not None
        for (name, layer), value in regions.items():
            if layer == IMAGE_LAYER:
                terms[name] += value
            else:
                per_layer[name][layer] = value
        for name, values in per_layer.items():
            terms[name] += sum(values.values())
        return Evaluation(loss=sum(terms.values()), terms=terms, per_layer=per_layer, grad=upstream)


def _own(whole: np.ndarray, tile: Tile, pools: int) -> np.ndarray:
    """The tile's owned part of a whole map at `pools` pools below its segment's input (a view)."""
    return _window(whole, tile, pools)[..., tile.rows.owned_at(pools), tile.cols.owned_at(pools)]


def _owned(window: np.ndarray, tile: Tile, pools: int) -> np.ndarray:
    """The owned part of a tile's window output at `pools` pools below its segment's input."""
    return window[..., tile.rows.owned_at(pools), tile.cols.owned_at(pools)]
