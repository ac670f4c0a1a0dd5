"""Masked styles (guided Gram matrices, models.terms.GuidedStyleTerm; server.engine.guides): the loss
against an unmasked job and a float64 numpy reference, exact tiles, the engine end to end, bad masks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from stylize_service.models import export
from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.models.terms import GUIDE_WEIGHTS, guide_input
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.guides import (
    Guide,
    blend_guided,
    guide_count,
    guide_maps,
    guide_weights,
    guides_of,
    layer_map,
)
from stylize_service.server.engine.network import FeatureNetwork, Targets
from stylize_service.server.engine.tile_layout import TileScheme
from stylize_service.server.engine.tiling import TiledEvaluator
from stylize_service.server.engine.types import (
    InvalidSettings,
    Progress,
    SilentObserver,
    StyleSource,
    StylizeSettings,
)
from tests import numpy_reference as ref
from tests.test_gradients import random_weights

STYLE = ("relu1_1", "relu2_1", "relu3_1")
CONTENT = ("relu2_2",)
WEIGHTS = {"content": 5.0, "style": 100.0, "tv": 1e-3}
LAYER_WEIGHTS = {"content": {"relu2_2": 1.5}, "style": {"relu1_1": 1.0, "relu2_1": 0.7, "relu3_1": 1.3}}


@pytest.fixture(scope="module")
def random_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureNetwork, object]:
    weights = random_weights(5)
    path = tmp_path_factory.mktemp("masks") / "random_vgg16.onnx"
    onnx.save(export.export_features(weights), str(path))
    return FeatureNetwork(path, intra_op_threads=2), weights


@pytest.fixture(scope="module")
def real_network() -> FeatureNetwork:
    if not Path(default_model_path()).is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    return FeatureNetwork(default_model_path(), intra_op_threads=2)


def noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.uniform(-110, 140, (1, 3, height, width)).astype(np.float32)


def left_right(height: int, width: int) -> list[np.ndarray]:
    """A left mask with a soft (grey) seam and its complement."""
    left = np.zeros((height, width), np.float32)
    left[:, : width // 2] = 1.0
    left[:, width // 2 : width // 2 + 5] = 0.4
    return [left, 1.0 - left]


def guided_targets(
    network: FeatureNetwork,
    choice: LayerChoice,
    content: np.ndarray,
    styles: list[np.ndarray],
    masks: list[np.ndarray],
    blend: list[float],
) -> Targets:
    """What the engine feeds a masked stage: one style per guide, the masks' guides and weights."""
    compiled = network.compiled(choice)
    spatial = guide_maps(masks, STYLE)
    per_style = [compiled.targets(style).by_term["style"] for style in styles]
    guides = [Guide((index,), mask) for index, mask in enumerate(masks)]
    stacked = {
        layer: blend_guided(
            guides, np.asarray(blend), [one[layer] for one in per_style], spatial[guide_input(layer)]
        )
        for layer in STYLE
    }
    content_targets = compiled.targets(content).by_term["content"]
    return Targets({"content": content_targets, "style": stacked}, spatial, guide_weights(masks, blend))


# --- the guides ---


def test_layer_map_averages_the_blocks_each_pool_sees():
    mask = np.zeros((9, 11), np.float32)
    mask[:4, :3] = 1.0
    mask[8, :] = 1.0  # the odd last row: dropped by the first pool, as the network drops it
    assert layer_map(mask, 0).tolist() == mask.tolist()
    one = layer_map(mask, 1)
    assert one.shape == (4, 5)
    assert one[:2, 0].tolist() == [1.0, 1.0] and one[:2, 1].tolist() == [0.5, 0.5] and one[2:].sum() == 0
    assert layer_map(mask, 2).tolist() == [[0.75, 0.0], [0.0, 0.0]]


def test_guide_weights_give_every_covered_position_the_same_pull():
    # Two halves with equal blend weights: each guide weighs its share of the picture, so that lambda/mass
    # (the pull per position) is the same on both sides and equals a whole-picture style's 1/n.
    wide = np.zeros((8, 12), np.float32)
    wide[:, :9] = 1.0
    weights = guide_weights([wide, 1.0 - wide], [0.5, 0.5])[GUIDE_WEIGHTS]
    np.testing.assert_allclose(weights, [0.75, 0.25])
    # Blend weights share the pull where regions overlap; one white mask is an unmasked job's weight 1.
    ones = np.ones((8, 12), np.float32)
    np.testing.assert_allclose(guide_weights([ones, ones], [0.75, 0.25])[GUIDE_WEIGHTS], [0.75, 0.25])
    assert guide_weights([ones], [1.0])[GUIDE_WEIGHTS].tolist() == [1.0]


def test_guides_of_styles_with_and_without_masks():
    mask = np.ones((4, 4), np.float32)
    guides = guides_of([None, mask, None])
    assert [g.styles for g in guides] == [(1,), (0, 2)] and guides[1].mask is None
    assert guide_count([(False, False), (False, False)]) == 0  # the plain graphs
    assert guide_count([(True, False), (False, False)]) == 2
    assert guide_count([(True, False), (True, True)]) == 2
    assert guide_count([(False, True)]) == 1  # a style mask alone: one guide over the whole picture


# --- the loss ---


def test_only_a_choice_with_guides_builds_graphs_with_guide_inputs(random_net):
    from stylize_service.models import graphs
    from stylize_service.models.segments import deepest_block

    features = export.export_features(random_net[1])
    plain = LayerChoice.of({"content": CONTENT, "style": STYLE})
    guided = LayerChoice.of({"content": CONTENT, "style": STYLE}, guides=2)
    assert plain.term("style").name == guided.term("style").name == "style"
    builders = (
        graphs.build_targets_model,
        graphs.build_loss_model,
        lambda features, choice: graphs.build_segment_statistics_model(
            features, choice, 1, deepest_block(choice)
        ),
        lambda features, choice: graphs.build_segment_loss_model(features, choice, 1, deepest_block(choice)),
    )
    for build in builders:
        plain_inputs = {i.name for i in build(features, plain).graph.input}
        guided_inputs = {i.name for i in build(features, guided).graph.input}
        assert not any(name.startswith("guide") for name in plain_inputs), build.__name__
        assert {guide_input(layer) for layer in STYLE} <= guided_inputs, build.__name__
        assert guided_inputs - plain_inputs <= {*(guide_input(layer) for layer in STYLE), GUIDE_WEIGHTS}
    # A first segment of block 1 and the untiled tail after it: each takes the guides of its own layers.
    first = {i.name for i in graphs.build_segment_loss_model(features, guided, 1, 1).graph.input}
    tail = {i.name for i in graphs.build_tail_loss_model(features, guided, 2).graph.input}
    assert {name for name in first if name.startswith("guide")} == {guide_input("relu1_1")}
    assert {name for name in tail if name.startswith("guide")} == {
        guide_input("relu2_1"),
        guide_input("relu3_1"),
        GUIDE_WEIGHTS,
    }


def test_white_mask_gives_the_unmasked_loss_and_gradient(real_network):
    rng = np.random.default_rng(1)
    x, content, style = noise(rng, 40, 56), noise(rng, 40, 56), noise(rng, 45, 37)
    plain = LayerChoice.of({"content": CONTENT, "style": STYLE})
    compiled = real_network.compiled(plain)
    targets = Targets(
        {
            "content": compiled.targets(content).by_term["content"],
            "style": compiled.targets(style).by_term["style"],
        }
    )
    expected = compiled.evaluate(x, compiled.feeds(targets, WEIGHTS, LAYER_WEIGHTS))

    guided = LayerChoice.of({"content": CONTENT, "style": STYLE}, guides=1)
    white = [np.ones((40, 56), np.float32)]
    masked = real_network.compiled(guided)
    evaluation = masked.evaluate(
        x,
        masked.feeds(
            guided_targets(real_network, guided, content, [style], white, [1.0]), WEIGHTS, LAYER_WEIGHTS
        ),
    )
    assert evaluation.loss == pytest.approx(expected.loss, rel=1e-6)
    assert evaluation.terms == pytest.approx(expected.terms, rel=1e-6)
    error = np.linalg.norm(evaluation.grad - expected.grad) / np.linalg.norm(expected.grad)
    assert error < 1e-6


def reference_guided_gram(features: np.ndarray, mask: np.ndarray, pools: int) -> np.ndarray:
    """sum_p m(p) f(p) f(p)ᵀ / (C sum_p m(p)), m the mask averaged over each position's input block,
    written out independently of server.engine.guides (loops over the blocks, float64)."""
    channels, height, width = features.shape
    block = 2**pools
    weights = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            weights[i, j] = (
                mask[i * block : (i + 1) * block, j * block : (j + 1) * block].astype(np.float64).mean()
            )
    flat = features.reshape(channels, -1)
    return (flat * weights.reshape(-1)) @ flat.T / (channels * weights.sum())


def test_guided_gram_and_loss_match_a_float64_numpy_reference(random_net):
    network, weights = random_net
    rng = np.random.default_rng(2)
    height, width = 37, 52
    x, content = noise(rng, height, width), noise(rng, height, width)
    styles = [noise(rng, 44, 30), noise(rng, 33, 41)]
    style_mask = np.clip(rng.uniform(-0.5, 1.5, (44, 30)), 0, 1).astype(np.float32)  # soft, ragged
    choice = LayerChoice.of({"content": CONTENT, "style": STYLE}, guides=2)
    compiled = network.compiled(choice)

    # The targets graph: a style image's guided Gram from its style mask.
    got = compiled.targets(styles[0], guide_maps([style_mask], STYLE)).by_term["style"]
    feats = ref.features(weights, styles[0][0], set(STYLE), "max")
    for layer, pools in zip(STYLE, (0, 1, 2), strict=True):
        expected = reference_guided_gram(feats[layer], style_mask, pools)
        np.testing.assert_allclose(got[layer][0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

    # The loss graph with two overlapping soft masks and unequal blend weights.
    masks = left_right(height, width)
    masks[1][:10] = 1.0  # overlaps the left mask at the top
    blend = [0.7, 0.3]
    targets = guided_targets(network, choice, content, styles, masks, blend)
    evaluation = compiled.evaluate(x, compiled.feeds(targets, WEIGHTS, LAYER_WEIGHTS))
    grams64 = {layer: targets.by_term["style"][layer].astype(np.float64) for layer in STYLE}
    content64 = {layer: v[0].astype(np.float64) for layer, v in targets.by_term["content"].items()}
    covered = np.array([m.mean() for m in masks], np.float64)
    union = np.maximum(masks[0], masks[1]).astype(np.float64).mean()
    lambdas = covered * np.asarray(blend) * union / np.sum(covered * np.asarray(blend))

    def reference(point: np.ndarray) -> dict[str, float]:
        feats = ref.features(weights, point, set(STYLE) | set(CONTENT), "max")
        style = 0.0
        for layer, pools in zip(STYLE, (0, 1, 2), strict=True):
            for k, mask in enumerate(masks):
                gram = reference_guided_gram(feats[layer], mask, pools)
                style += (
                    WEIGHTS["style"]
                    * LAYER_WEIGHTS["style"][layer]
                    * lambdas[k]
                    * np.mean((gram - grams64[layer][k]) ** 2)
                )
        others = ref.loss_terms(
            weights,
            point,
            content64,
            {},
            LAYER_WEIGHTS["content"],
            {},
            WEIGHTS["content"],
            0.0,
            WEIGHTS["tv"],
            "max",
        )
        return {"loss": others["loss"] + style, "style": style}

    expected = reference(x[0].astype(np.float64))
    np.testing.assert_allclose(targets.vectors[GUIDE_WEIGHTS], lambdas, rtol=1e-6)
    assert evaluation.terms["style"] == pytest.approx(expected["style"], rel=1e-4)
    assert evaluation.loss == pytest.approx(expected["loss"], rel=1e-4)
    grad = evaluation.grad[0].astype(np.float64)
    for _ in range(2):
        v = rng.standard_normal(x[0].shape)
        v /= np.linalg.norm(v)
        eps = 1e-3
        fd = (reference(x[0] + eps * v)["loss"] - reference(x[0] - eps * v)["loss"]) / (2 * eps)
        assert float(np.sum(grad * v)) == pytest.approx(fd, rel=2e-3, abs=1e-6 * np.linalg.norm(grad))


@pytest.mark.parametrize(("tile", "blocks"), [(16, None), (32, None), (16, 1), (16, 3), (24, 5)])
def test_masked_job_in_tiles_matches_untiled(random_net, tile, blocks):
    # blocks None: the whole network as one tiled segment; else the first `blocks` blocks tiled one at a
    # time, the guides cut per segment's tiles, and the rest untiled, the guides whole.
    network, _ = random_net
    rng = np.random.default_rng(3)
    height, width = 61, 83
    x, content = noise(rng, height, width), noise(rng, height, width)
    styles = [noise(rng, 50, 47), noise(rng, 39, 60), noise(rng, 48, 48)]
    masks = [*left_right(height, width), np.ones((height, width), np.float32)]  # the last: unmasked styles
    choice = LayerChoice.of({"content": CONTENT, "style": STYLE}, guides=3)
    targets = guided_targets(network, choice, content, styles, masks, [0.5, 0.3, 0.2])
    compiled = network.compiled(choice)
    untiled = compiled.evaluate(x, compiled.feeds(targets, WEIGHTS, LAYER_WEIGHTS))

    scheme = TileScheme.whole(tile, choice) if blocks is None else TileScheme.by_block(tile, blocks)
    tiled = TiledEvaluator(network.tile_sessions(choice), scheme)
    assert len(tiled.layout(x)) > 4
    result = tiled.evaluator(targets, WEIGHTS, LAYER_WEIGHTS)(x)
    assert result.loss == pytest.approx(untiled.loss, rel=1e-5)
    for layer, value in untiled.per_layer["style"].items():
        assert result.per_layer["style"][layer] == pytest.approx(value, rel=5e-5, abs=1e-6 * untiled.loss)
    error = np.linalg.norm(result.grad - untiled.grad) / np.linalg.norm(untiled.grad)
    assert error < 1e-4

    # A style pass in tiles with a style mask: the untiled guided Grams.
    style_mask = left_right(50, 47)[1]
    guides = guide_maps([style_mask], STYLE)
    expected = compiled.targets(styles[0], guides).by_term["style"]
    got = tiled.statistic_targets(styles[0], guides)["style"]
    for layer in STYLE:
        assert np.linalg.norm(got[layer] - expected[layer]) / np.linalg.norm(expected[layer]) < 1e-5


# --- the engine ---


def gradient_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1)
    return np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32)


def stripes(height: int, width: int) -> np.ndarray:
    xx = np.arange(width)[None, :].repeat(height, 0)
    on = (xx // 4) % 2 == 0
    return np.stack([on * 0.9, 0.2 + 0 * xx, (~on) * 0.8], axis=-1).astype(np.float32)


PICTURE = gradient_image(48, 64, 0)
SETTINGS = StylizeSettings(
    max_size=64, iterations=4, style_layers={"relu1_1": 1.0, "relu2_1": 1.0, "relu3_1": 1.0}
)


def test_engine_with_a_white_mask_runs_the_unmasked_job(real_engine: Engine):
    style = stripes(40, 40)
    plain = real_engine.stylize(PICTURE, [StyleSource(style)], SETTINGS, SilentObserver())
    white = np.ones((24, 32), np.float32)  # any size in the content's aspect ratio
    masked = real_engine.stylize(PICTURE, [StyleSource(style, mask=white)], SETTINGS, SilentObserver())
    assert masked.losses.total == pytest.approx(plain.losses.total, rel=1e-6)
    assert masked.iterations == plain.iterations
    assert np.abs(masked.image - plain.image).max() < 1e-4


def test_engine_masked_job_in_forced_tiles_matches_untiled(real_engine: Engine):
    styles = [
        StyleSource(stripes(40, 40), 1.0, mask=left_right(48, 64)[0]),
        StyleSource(
            gradient_image(30, 50, 1), 1.0, mask=left_right(48, 64)[1], style_mask=left_right(30, 50)[0]
        ),
    ]
    settings = replace(SETTINGS, iterations=2)
    untiled = real_engine.stylize(PICTURE, styles, settings, SilentObserver())
    tiled_engine = Engine(default_model_path(), intra_op_threads=2, tile_size=16)
    tiled = tiled_engine.stylize(PICTURE, styles, settings, SilentObserver())
    assert tiled.losses.total == pytest.approx(untiled.losses.total, rel=1e-4)
    assert np.abs(tiled.image - untiled.image).max() < 2e-3


def test_masks_keep_each_style_in_its_region(real_engine: Engine):
    # Style A on the left only: the right half stays nearer the photograph than the left half does.
    left = np.zeros((48, 64), np.float32)
    left[:, :32] = 1.0
    result = real_engine.stylize(
        PICTURE, [StyleSource(stripes(40, 40), mask=left)], replace(SETTINGS, iterations=12), SilentObserver()
    )
    change = np.abs(result.image - PICTURE).mean(axis=-1)
    assert change[:, :28].mean() > 2 * change[:, 36:].mean()


@pytest.mark.parametrize(
    ("style", "field", "words"),
    [
        (StyleSource(stripes(40, 40), mask=np.zeros((48, 64), np.float32)), "styles[0].mask", "all black"),
        (StyleSource(stripes(40, 40), mask=np.ones((48, 70), np.float32)), "styles[0].mask", "aspect ratio"),
        (
            StyleSource(stripes(40, 40), style_mask=np.ones((40, 30), np.float32)),
            "styles[0].style_mask",
            "aspect",
        ),
        (
            StyleSource(stripes(40, 40), style_mask=np.zeros((40, 40), np.float32)),
            "styles[0].style_mask",
            "black",
        ),
        (StyleSource(stripes(40, 40), mask=np.full((48, 64), 2.0, np.float32)), "styles[0].mask", "[0, 1]"),
    ],
)
def test_bad_masks_are_refused_naming_the_field(real_engine: Engine, style, field, words):
    with pytest.raises(InvalidSettings) as caught:
        real_engine.stylize(PICTURE, [style], SETTINGS, SilentObserver())
    assert caught.value.field == field and words in caught.value.message


@pytest.mark.parametrize(
    "settings", [replace(SETTINGS, style_weight=0.0), replace(SETTINGS, style_layers=())]
)
def test_a_mask_without_a_style_term_is_refused(real_engine: Engine, settings):
    style = StyleSource(stripes(40, 40), mask=np.ones((48, 64), np.float32))
    with pytest.raises(InvalidSettings) as caught:
        real_engine.stylize(PICTURE, [style], settings, SilentObserver())
    assert caught.value.field == "styles[0].mask"


def test_a_masked_job_plans_more_memory_than_the_unmasked_one():
    from stylize_service.server.engine.memory import guide_bytes_per_pixel, stage_bytes
    from stylize_service.server.engine.pyramid import Stage

    layers = {"content": CONTENT, "style": STYLE}
    plain, masked = LayerChoice.of(layers), LayerChoice.of(layers, guides=2)
    assert guide_bytes_per_pixel(plain) == 0
    # Two guides: the guided features and their gradients at relu1_1, relu2_1, relu3_1.
    assert guide_bytes_per_pixel(masked) == 2 * 2 * 4 * (64 + 128 // 4 + 256 // 16)
    stage = Stage(index=0, count=1, width=512, height=384, iterations=10)
    for scheme in (None, TileScheme.by_block(128, 3), TileScheme.whole(128, plain)):
        assert stage_bytes(stage, masked, scheme) > stage_bytes(stage, plain, scheme)


def test_masks_travel_through_the_pyramid_with_style_scale_colour_modes_and_blending(real_engine: Engine):
    from stylize_service.server.engine.types import ColorMode

    left, right = left_right(48, 64)
    styles = [
        StyleSource(stripes(40, 40), 2.0, mask=left),
        StyleSource(gradient_image(30, 50, 1), 1.0, mask=right[::2, ::2]),  # half size, same aspect ratio
        StyleSource(gradient_image(50, 30, 2), 1.0),  # unmasked: paints everywhere
    ]
    for mode in (ColorMode.LUMINANCE, ColorMode.HISTOGRAM):
        settings = replace(SETTINGS, min_size=32, iterations=6, style_scale=1.5, color_mode=mode)
        observer = StageRecorder()
        result = real_engine.stylize(PICTURE, styles, settings, observer)
        assert result.image.shape == (48, 64, 3) and sorted(set(observer.stages)) == [0, 1]
        assert np.isfinite(result.losses.total) and result.losses.terms["style"] > 0


class StageRecorder(SilentObserver):
    def __init__(self) -> None:
        self.stages: list[int] = []

    def on_progress(self, progress: Progress) -> None:
        self.stages.append(progress.stage)
