"""Exact tiled evaluation (server.engine.tiling) against the untiled loss graph: same loss and gradient, in
every tile scheme: the first blocks tiled one at a time with the rest untiled, every block tiled, and the
whole network as one tiled segment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from stylize_service.models import export
from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.models.segments import segment
from stylize_service.server.engine.evaluators import blend_targets
from stylize_service.server.engine.network import FeatureNetwork, Targets
from stylize_service.server.engine.tile_layout import (
    TileLayout,
    TileScheme,
    halo,
    receptive_radius,
    segment_layouts,
    spans,
)
from stylize_service.server.engine.tiling import TiledEvaluator
from tests.test_gradients import random_weights

STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@pytest.fixture(scope="module")
def random_network(tmp_path_factory: pytest.TempPathFactory) -> FeatureNetwork:
    path = tmp_path_factory.mktemp("tiling") / "random_vgg16.onnx"
    onnx.save(export.export_features(random_weights(3)), str(path))
    return FeatureNetwork(path, intra_op_threads=2)


@pytest.fixture(scope="module")
def real_network() -> FeatureNetwork:
    if not Path(default_model_path()).is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    return FeatureNetwork(default_model_path(), intra_op_threads=2)


def compare(
    network: FeatureNetwork,
    height: int,
    width: int,
    tile: int,
    content: tuple[str, ...] = ("relu4_2",),
    style: tuple[str, ...] = STYLE,
    pooling: str = "max",
    seed: int = 0,
    blocks: int | None = None,
) -> int:
    """Untiled and tiled loss and gradient of the same point; returns the number of tiles (of the first
    segment). blocks: the first `blocks` blocks tiled one at a time (TileScheme.by_block), the rest
    untiled; None: the whole network as one tiled segment."""
    choice = LayerChoice.of({"content": content, "style": style}, pooling)
    scheme = TileScheme.whole(tile, choice) if blocks is None else TileScheme.by_block(tile, blocks)
    rng = np.random.default_rng(seed)

    def image(h: int, w: int) -> np.ndarray:
        return rng.uniform(-110, 140, (1, 3, h, w)).astype(np.float32)

    x, content_image, style_image = image(height, width), image(height, width), image(height + 9, width - 5)
    weights = {"content": 5.0, "style": 100.0, "tv": 1e-3}
    layer_weights = {"content": dict.fromkeys(content, 1.5), "style": dict.fromkeys(style, 0.7)}

    compiled = network.compiled(choice)
    untiled_targets = Targets(
        {
            "content": compiled.targets(content_image).by_term["content"],
            "style": compiled.targets(style_image).by_term["style"],
        }
    )
    untiled = compiled.evaluate(x, compiled.feeds(untiled_targets, weights, layer_weights))

    tiled = TiledEvaluator(network.tile_sessions(choice), scheme)
    targets = blend_targets(
        choice, tiled.separable_targets(content_image), [(1.0, tiled.statistic_targets(style_image))]
    )
    for term in ("content", "style"):
        for layer, expected in untiled_targets.by_term[term].items():
            np.testing.assert_allclose(
                targets.by_term[term][layer], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
            )
    result = tiled.evaluator(targets, weights, layer_weights)(x)

    assert result.loss == pytest.approx(untiled.loss, rel=1e-5)
    # Single layers' float32 sums in the untiled graph differ from the tiles' float64 ones by a little more.
    for term, value in untiled.terms.items():
        assert result.terms[term] == pytest.approx(value, rel=5e-5, abs=1e-6 * untiled.loss)
    for term, layers in untiled.per_layer.items():
        assert result.per_layer[term] == pytest.approx(layers, rel=5e-5, abs=1e-6 * untiled.loss)
    error = np.linalg.norm(result.grad - untiled.grad) / np.linalg.norm(untiled.grad)
    assert error < 1e-4
    return len(tiled.layout(x))


def test_receptive_field_and_halo():
    assert receptive_radius("relu1_1") == 1
    assert receptive_radius("relu1_2") == 2
    assert receptive_radius("relu2_1") == 5  # pool1 adds 1, then 2 per conv at half resolution
    assert halo("relu5_1") % 16 == 0 and halo("relu5_1") >= receptive_radius("relu5_1")
    assert halo("relu1_1") == 1


def test_spans_own_every_position_once_and_align_windows():
    for length, tile in ((100, 32), (97, 16), (16, 64), (33, 32)):
        parts = spans(length, tile, 48, 16)
        owned = np.zeros(length, int)
        for part in parts:
            owned[part.own_start : part.own_end] += 1
            assert part.window_start % 16 == 0 and part.window_start <= part.own_start
            assert part.window_end >= part.own_end
        assert (owned == 1).all()


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_random_net_odd_shape(random_network, pooling):
    assert compare(random_network, 75, 109, 32, pooling=pooling) > 4


def test_random_net_deep_content_layer(random_network):
    # relu5_3 needs the largest halo; the image is smaller than two halos, so windows overlap heavily.
    assert compare(random_network, 67, 90, 48, content=("relu5_3",), style=("relu2_1",)) > 1


def test_random_net_one_tile(random_network):
    assert compare(random_network, 40, 56, 64) == 1


def test_random_net_tile_edge_on_a_pooling_boundary_and_thin_strips(random_network):
    # 96 = 3 tiles of 32 exactly (edges on the pooling grid); 97 leaves a last owned strip 1 px thin.
    assert compare(random_network, 96, 97, 32) == 3 * 4
    choice = LayerChoice.of({"content": ("relu4_2",), "style": STYLE})
    layout = TileLayout(96, 97, 32, segment(choice, 1, 5))
    assert min(t.cols.own_end - t.cols.own_start for t in layout) == 1


def test_random_net_content_only_and_style_only(random_network):
    compare(random_network, 50, 70, 32, style=())
    compare(random_network, 50, 70, 32, content=())


def test_real_vgg16(real_network):
    compare(real_network, 81, 117, 32)


def test_real_vgg16_avg_pooling_deep_content(real_network):
    compare(
        real_network, 70, 95, 48, content=("relu5_3", "relu2_2"), style=("relu1_1", "relu3_1"), pooling="avg"
    )


@pytest.mark.parametrize("tile", [32, 48])
def test_style_targets_in_tiles_are_the_untiled_ones(random_network, tile):
    # The style passes that the memory plan tiles (an untiled stage with a large style) use these.
    choice = LayerChoice.of({"content": ("relu4_2",), "style": STYLE})
    style = np.random.default_rng(4).uniform(-110, 140, (1, 3, 101, 77)).astype(np.float32)
    untiled = random_network.compiled(choice).targets(style).by_term["style"]
    tiled = TiledEvaluator(random_network.tile_sessions(choice), TileScheme.whole(tile, choice))
    assert len(tiled.layout(style)) > 1
    targets = tiled.statistic_targets(style)
    assert set(targets) == {"style"} and set(targets["style"]) == set(STYLE)
    for layer, expected in untiled.items():
        error = np.linalg.norm(targets["style"][layer] - expected) / np.linalg.norm(expected)
        assert error < 1e-5, layer


# Per-segment tiling: each block (or the first few) tiled with its own small halo, the rest untiled.


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_random_net_segments_odd_shape(random_network, blocks, pooling):
    # 75 x 109: every pool output has an odd side somewhere, so the last row or column is dropped at
    # some pool and the segments' maps are not multiples of the tiles.
    assert compare(random_network, 75, 109, 32, pooling=pooling, blocks=blocks) == 3 * 4


@pytest.mark.parametrize(
    "deepest", ["relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_3", "relu4_1", "relu5_3"]
)
def test_random_net_segments_each_layer_as_the_deepest(random_network, deepest):
    # The last segment ends at the deepest layer, with no pool after it; a tiled one has no output.
    for blocks in (1, 5):
        compare(random_network, 61, 83, 16, content=(deepest,), style=("relu1_1",), blocks=blocks)


def test_random_net_segments_tiles_smaller_than_their_halos(random_network):
    # 8 px tiles: each segment's windows overlap their neighbours' by more than the owned parts.
    compare(random_network, 45, 38, 8, blocks=3)


def test_random_net_segments_one_tile(random_network):
    assert compare(random_network, 40, 56, 64, blocks=2) == 1


def test_real_vgg16_segments(real_network):
    compare(real_network, 81, 117, 32, blocks=3)
    compare(
        real_network,
        70,
        95,
        24,
        content=("relu5_3", "relu2_2"),
        style=("relu1_1", "relu3_1"),
        pooling="avg",
        blocks=2,
    )


def test_segment_halos_are_a_few_positions_and_cover_the_receptive_field():
    choice = LayerChoice.of({"content": ("relu4_2",), "style": STYLE})
    # Two or three 3x3 convolutions, rounded up to the trailing pool's grid of 2.
    assert [segment(choice, b, b).halo for b in (1, 2, 3, 4)] == [2, 2, 4, 4]
    assert segment(choice, 5, 5).halo == 1  # conv5_1 alone, no pool after it
    assert segment(choice, 1, 5).halo == halo("relu5_1")  # the whole network as one segment
    # Deeper segments' tiles are as large in memory: fewer positions where there are more channels.
    layouts = segment_layouts(768, 1024, TileScheme.by_block(256, 4), choice)
    assert [layout.tile for layout in layouts] == [256, 180, 128, 90]
    assert len(layouts[0]) == 12


@pytest.mark.parametrize("blocks", [None, 2])
def test_style_targets_in_segment_tiles_are_the_untiled_ones(random_network, blocks):
    choice = LayerChoice.of({"content": ("relu4_2",), "style": STYLE})
    style = np.random.default_rng(5).uniform(-110, 140, (1, 3, 101, 77)).astype(np.float32)
    untiled = random_network.compiled(choice).targets(style).by_term
    scheme = TileScheme.whole(24, choice) if blocks is None else TileScheme.by_block(24, blocks)
    tiled = TiledEvaluator(random_network.tile_sessions(choice), scheme)
    for term, targets in (
        ("style", tiled.statistic_targets(style)),
        ("content", tiled.separable_targets(style)),
    ):
        for layer, expected in untiled[term].items():
            got = targets[term][layer]
            assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5, (term, layer)
