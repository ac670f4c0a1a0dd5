"""Engine.stylize end to end on the built model, at small sizes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.optimizer import CONVERGENCE_WINDOW
from stylize_service.server.engine.pyramid import (
    Stage,
    default_min_size,
    plan,
    remaining_seconds,
    stage_iterations,
    stage_sizes,
)
from stylize_service.server.engine.types import (
    ColorMode,
    Init,
    InvalidSettings,
    Pooling,
    Progress,
    StyleSource,
    StylizeCancelled,
    StylizeSettings,
)


class Recorder:
    """An observer that keeps every event; with cancel_at_iteration it asks to stop once it has seen the
    Progress of that iteration, and counts the polls that answered "stop"."""

    def __init__(self, cancel_at_iteration: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.frames: list[tuple[int, np.ndarray]] = []
        self.cancel_at = cancel_at_iteration
        self.cancelled = False
        self.stops_answered = 0

    def on_progress(self, progress: Progress) -> None:
        assert not self.cancelled, "no progress may follow a cancellation"
        self.progress.append(progress)
        if self.cancel_at is not None and progress.iteration >= self.cancel_at:
            self.cancelled = True

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        self.frames.append((iteration, image))

    def should_stop(self) -> bool:
        if self.cancelled:
            self.stops_answered += 1
        return self.cancelled


@pytest.fixture
def engine(real_engine: Engine) -> Engine:
    return real_engine


def gradient_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1)
    return np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32)


def stripes(height: int, width: int) -> np.ndarray:
    xx = np.arange(width)[None, :].repeat(height, 0)
    on = (xx // 4) % 2 == 0
    return np.stack([on * 0.9, 0.2 + 0 * xx, (~on) * 0.8], axis=-1).astype(np.float32)


CONTENT = gradient_image(48, 64, 0)
STYLE = [StyleSource(stripes(40, 40), 1.0)]
SMALL = StylizeSettings(max_size=64, iterations=8, frame_every=4)


def test_loss_falls_and_result_has_requested_size(engine):
    recorder = Recorder()
    result = engine.stylize(CONTENT, STYLE, SMALL, recorder)
    assert result.image.shape == (48, 64, 3)
    assert result.image.dtype == np.float32 and result.image.min() >= 0 and result.image.max() <= 1
    iterations = [p.iteration for p in recorder.progress]
    assert iterations == list(range(len(iterations))) and iterations[-1] == result.iterations
    assert recorder.progress[0].losses.total > result.losses.total
    assert result.evaluations >= result.iterations
    assert [i for i, _ in recorder.frames] == [4, 8]
    assert set(result.losses.per_layer["style"]) == {"relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"}
    assert result.losses.total == pytest.approx(sum(result.losses.terms.values()), rel=1e-4)


def test_same_seed_gives_identical_output(engine):
    settings = replace(SMALL, init=Init.NOISE, seed=7, iterations=4)
    first = engine.stylize(CONTENT, STYLE, settings, Recorder()).image
    second = engine.stylize(CONTENT, STYLE, settings, Recorder()).image
    other = engine.stylize(CONTENT, STYLE, replace(settings, seed=8), Recorder()).image
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


def test_cancel_stops_within_one_evaluation(engine):
    """Cancelled mid-stage (after iteration 3's evaluation), the engine stops at its very next check,
    before another evaluation: no Progress follows, and only one poll had to say "stop"."""
    recorder = Recorder(cancel_at_iteration=3)
    with pytest.raises(StylizeCancelled):
        engine.stylize(CONTENT, STYLE, replace(SMALL, iterations=50), recorder)
    assert recorder.progress[-1].iteration == 3
    assert recorder.stops_answered == 1


def test_multiscale_reports_stages(engine):
    recorder = Recorder()
    result = engine.stylize(CONTENT, STYLE, replace(SMALL, max_size=96, min_size=48, iterations=6), recorder)
    stages = {(p.stage, p.width, p.height) for p in recorder.progress}
    assert stages == {(0, 48, 36), (1, 96, 72)}
    assert result.image.shape == (72, 96, 3)
    assert [p.iteration for p in recorder.progress] == list(range(7))


def test_progress_times_every_evaluation_once(engine):
    # Two stages: the second stage's starting evaluation has no Progress of its own and joins the next.
    recorder = Recorder()
    result = engine.stylize(CONTENT, STYLE, replace(SMALL, max_size=96, min_size=48, iterations=6), recorder)
    reported = 0
    for progress in recorder.progress:
        reported += len(progress.evaluation_seconds)
        assert reported == progress.evaluations
        assert all(seconds > 0 for seconds in progress.evaluation_seconds)
    assert reported == result.evaluations


def test_tolerance_ends_a_stage_once_the_loss_stops_improving(engine):
    every = engine.stylize(CONTENT, STYLE, replace(SMALL, iterations=30, tolerance=0.0), Recorder())
    assert every.iterations == 30
    recorder = Recorder()
    early = engine.stylize(CONTENT, STYLE, replace(SMALL, iterations=30, tolerance=0.6), recorder)
    losses = [p.losses.total for p in recorder.progress]
    window = CONVERGENCE_WINDOW
    improvements = [(losses[i - window] - losses[i]) / losses[i - window] for i in range(window, len(losses))]
    # It ran until the first iteration whose improvement over the window fell below the tolerance.
    assert window <= early.iterations < 30
    assert improvements[-1] < 0.6 and all(change >= 0.6 for change in improvements[:-1])
    assert early.iterations == recorder.progress[-1].iteration


def test_a_later_stage_keeps_the_detail_of_its_own_starting_image(engine):
    # Content only, from the content: every stage's optimum is its own content image. The full-size stage
    # starts from the content at its size plus the coarse stage's (zero) change, so it is already there;
    # a scaled-up coarse result would have lost the detail and left a content loss to work off.
    settings = replace(
        SMALL, max_size=96, min_size=48, iterations=4, style_weight=0.0, tv_weight=0.0, frame_every=0
    )
    content = gradient_image(72, 96, 5)
    result = engine.stylize(content, [], settings, Recorder())
    assert result.losses.terms["content"] == pytest.approx(0.0, abs=1e-3)
    assert np.abs(result.image - content).max() < 1e-3


@pytest.mark.parametrize("mode", list(ColorMode))
def test_color_modes(engine, mode):
    result = engine.stylize(CONTENT, STYLE, replace(SMALL, color_mode=mode, iterations=3), Recorder())
    assert result.image.shape == (48, 64, 3)
    if mode is ColorMode.LUMINANCE:
        from stylize_service.server.engine.color import rgb_to_yiq

        # The content's chroma survives wherever recombining did not push a channel out of [0, 1].
        inside = np.all((result.image > 0.001) & (result.image < 0.999), axis=-1)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(
            rgb_to_yiq(result.image)[inside][:, 1:], rgb_to_yiq(CONTENT)[inside][:, 1:], atol=1e-4
        )


def _first_losses(engine, styles, settings, init_image=None):
    """The losses of the starting point (iteration 0)."""
    recorder = Recorder()
    engine.stylize(CONTENT, styles, replace(settings, iterations=1), recorder, init_image=init_image)
    return recorder.progress[0].losses


def test_blend_weights_are_relative_and_weigh_each_style(engine):
    a, b = stripes(40, 40), gradient_image(30, 50, 1)
    settings = replace(SMALL, pooling=Pooling.AVG)

    def style_loss(weights):
        return _first_losses(
            engine, [StyleSource(a, weights[0]), StyleSource(b, weights[1])], settings
        ).terms["style"]

    only_a = _first_losses(engine, [StyleSource(a, 1.0)], settings).terms["style"]
    assert style_loss((2.0, 0.0)) == pytest.approx(only_a, rel=1e-6)  # a zero weight drops a style
    assert style_loss((3.0, 1.0)) == pytest.approx(style_loss((6.0, 2.0)), rel=1e-6)  # only ratios count
    assert style_loss((3.0, 1.0)) != pytest.approx(style_loss((1.0, 3.0)), rel=1e-3)  # and they count
    assert style_loss((0.0, 0.0)) == pytest.approx(style_loss((1.0, 1.0)), rel=1e-6)  # all zero = equal


def test_init_image_is_where_the_optimisation_starts(engine):
    image_settings = replace(SMALL, init=Init.IMAGE)
    from_content = _first_losses(engine, STYLE, replace(SMALL, init=Init.CONTENT))
    # The content image given as init image starts at the same point as init=CONTENT ...
    assert _first_losses(engine, STYLE, image_settings, init_image=CONTENT).total == pytest.approx(
        from_content.total, rel=1e-6
    )
    # ... and another init image starts elsewhere, resized to the stage (here 20x20 -> 64x48).
    other = _first_losses(engine, STYLE, image_settings, init_image=gradient_image(20, 20, 2))
    assert other.terms["content"] > 0 and from_content.terms["content"] == pytest.approx(0.0, abs=1e-6)


def test_content_only_request_without_styles(engine):
    # style_weight 0 and no style images: a valid content reconstruction, whose style term is 0.
    settings = replace(SMALL, style_weight=0.0, init=Init.NOISE, iterations=3)
    recorder = Recorder()
    result = engine.stylize(CONTENT, [], settings, recorder)
    assert result.losses.terms["style"] == 0.0 and result.losses.per_layer["style"] == {}
    assert result.losses.total < recorder.progress[0].losses.total


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"content_layers": {"relu9_9": 1.0}}, "content_layers[0].layer"),
        ({"style_layers": {"relu1_1": float("nan")}}, "style_layers[0].weight"),
        ({"iterations": 0}, "iterations"),
        ({"max_size": 8}, "max_size"),
        ({"min_size": 1000}, "min_size"),
        ({"tv_weight": -1.0}, "tv_weight"),
        ({"style_scale": float("inf")}, "style_scale"),
        ({"init": Init.IMAGE}, "init_image"),
    ],
)
def test_invalid_settings_name_the_field(engine, change, field):
    with pytest.raises(InvalidSettings) as error:
        engine.stylize(CONTENT, STYLE, replace(SMALL, **change), Recorder())
    assert error.value.field == field


def test_no_style_image_is_invalid(engine):
    with pytest.raises(InvalidSettings) as error:
        engine.stylize(CONTENT, [], SMALL, Recorder())
    assert error.value.field == "styles"


def test_too_thin_image_is_invalid(engine):
    with pytest.raises(InvalidSettings) as error:
        engine.stylize(gradient_image(4, 200, 0), STYLE, SMALL, Recorder())
    assert error.value.field == "max_size"
    assert "raise the size" in str(error.value)  # 4x200 at 4096 px would be 82 px high: that helps


def test_image_too_thin_at_any_size_does_not_advise_a_larger_size(engine):
    with pytest.raises(InvalidSettings) as error:
        engine.plan((5000, 1), [(40, 40)], SMALL)
    assert error.value.field == "max_size"
    assert "too thin" in str(error.value) and "raise the size" not in str(error.value)


def test_default_multiscale_skips_stages_too_small_for_a_thin_image(engine):
    # 600 px > 512, so the rule starts at 150 px; a 600x20 image's short side would be 5 and 10 px there,
    # below relu5_1's 16, so only the full-size stage remains (the image a single stage accepts).
    recorder = Recorder()
    result = engine.stylize(
        gradient_image(20, 600, 0), STYLE, replace(SMALL, max_size=600, iterations=2), recorder
    )
    assert {(p.stage, p.stages, p.width) for p in recorder.progress} == {(0, 1, 600)}
    assert result.image.shape == (20, 600, 3)
    with pytest.raises(
        InvalidSettings
    ) as error:  # an explicit min_size is honoured, and named when too small
        engine.stylize(
            gradient_image(20, 600, 0), STYLE, replace(SMALL, max_size=600, min_size=150), recorder
        )
    assert error.value.field == "min_size"


def test_stage_rules():
    assert stage_sizes(512, 512) == [512]
    assert stage_sizes(128, 512) == [128, 256, 512]
    assert stage_sizes(200, 512) == [256, 512]
    assert stage_iterations(500, 1) == [500]
    assert stage_iterations(500, 3) == [125, 125, 250]
    assert sum(stage_iterations(7, 3)) == 7


def test_plan_sizes_and_iterations():
    stages = plan((640, 480), 1024, None, 100, min_short_side=16, deepest_layer="relu5_1")
    assert [(s.index, s.count, s.width, s.height, s.iterations) for s in stages] == [
        (0, 3, 256, 192, 25),
        (1, 3, 512, 384, 25),
        (2, 3, 1024, 768, 50),
    ]


def test_eta_weighs_later_stages_by_their_pixels():
    small = Stage(0, 2, 100, 50, iterations=10)
    large = Stage(1, 2, 200, 100, iterations=20)  # 4x the pixels
    # 4 of 10 done at 2 s each: 6 * 2 s left here, then 20 iterations at 4 * 2 s.
    assert remaining_seconds([small, large], small, 4, 2.0) == pytest.approx(6 * 2 + 20 * 8)
    assert remaining_seconds([small, large], large, 20, 8.0) == 0.0


def test_default_min_size_is_single_scale_up_to_512_then_a_quarter():
    assert default_min_size(64) == 64
    assert default_min_size(512) == 512
    assert default_min_size(1024) == 256
    assert stage_sizes(default_min_size(1024), 1024) == [256, 512, 1024]
    assert stage_sizes(default_min_size(768), 768) == [192, 384, 768]
