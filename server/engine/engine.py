"""Engine.stylize: the Gatys et al. optimisation, coarse to fine, reporting through a StylizeObserver."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stylize_service.models.graphs import LayerChoice

from . import color
from .network import CompiledChoice, Evaluation, FeatureNetwork, Targets, loss_feeds
from .optimizer import Step, run_lbfgs
from .resize import resize, resize_longest, scaled_size
from .types import (
    Init,
    InvalidSettings,
    Losses,
    ModelInfo,
    Progress,
    StyleSource,
    StylizeCancelled,
    StylizeObserver,
    StylizeResult,
    StylizeSettings,
)

MIN_SIZE = 16  # px; four 2x2 pools before relu5_x
MAX_ITERATIONS = 100_000
STAGE_FACTOR = 2.0  # each multiscale stage's longest side is this times the previous one's
# When min_size is unset: one stage up to this size, coarse-to-fine from max_size / 4 above it. Measured
# (README, Benchmarks): at 512 px multiscale ended 2.6% higher in loss in equal time; at 1024 px it
# reached the same loss in equal time with visibly larger-scale structure (single-scale strokes stay
# VGG-sized, i.e. tiny at that resolution).
SINGLE_SCALE_UP_TO = 512
DEFAULT_STAGE_DIVISOR = 4


def default_min_size(max_size: int) -> int:
    """The first stage's longest side when the request leaves min_size unset."""
    if max_size <= SINGLE_SCALE_UP_TO:
        return max_size
    return max_size // DEFAULT_STAGE_DIVISOR


def stage_sizes(min_size: int, max_size: int) -> list[int]:
    """Longest sides of the stages: max_size, halved while at least min_size, smallest first."""
    sizes = [max_size]
    while sizes[0] / STAGE_FACTOR >= min_size:
        sizes.insert(0, round(sizes[0] / STAGE_FACTOR))
    return sizes


def stage_iterations(total: int, stages: int) -> list[int]:
    """Iterations per stage: the final, full-size stage gets half of them, the coarser stages share the
    other half equally (they are 4x cheaper per halving, and only need to set the large-scale structure)."""
    if stages == 1:
        return [total]
    final = max(1, math.ceil(total / 2))
    earlier = total - final
    base, extra = divmod(earlier, stages - 1)
    return [base + (1 if i < extra else 0) for i in range(stages - 1)] + [final]


def _pools_before(layer: str) -> int:
    return int(layer[len("relu")]) - 1


@dataclass
class _Run:
    """Book-keeping of one stylize() call across its stages."""

    observer: StylizeObserver
    settings: StylizeSettings
    started: float
    iterations_done: int = 0
    evaluations: int = 0
    stage_started: float = 0.0
    stage_iterations_done: int = 0


class Engine:
    """Stylizes images; thread-safe (each call keeps its own state; the sessions are shared)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self._network = FeatureNetwork(model_path, providers=providers, intra_op_threads=intra_op_threads)

    @property
    def info(self) -> ModelInfo:
        return self._network.info()

    def warm_up(self, settings: StylizeSettings | None = None) -> None:
        """Compile the default layer choice's graphs now rather than on the first request."""
        self._network.compiled(self._choice(settings or StylizeSettings()))

    def check(self, settings: StylizeSettings) -> None:
        """Raise InvalidSettings naming the first setting that cannot be honoured."""
        s = settings
        if not s.max_size >= MIN_SIZE:
            raise InvalidSettings("max_size", f"must be at least {MIN_SIZE} px, got {s.max_size}")
        if s.min_size is not None and not MIN_SIZE <= s.min_size <= s.max_size:
            raise InvalidSettings(
                "min_size", f"must be between {MIN_SIZE} and max_size ({s.max_size}), got {s.min_size}"
            )
        if not 1 <= s.iterations <= MAX_ITERATIONS:
            raise InvalidSettings("iterations", f"must be between 1 and {MAX_ITERATIONS}, got {s.iterations}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(s, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidSettings(name, f"must be a finite number >= 0, got {value}")
        if not (math.isfinite(s.style_scale) and 0.05 <= s.style_scale <= 8):
            raise InvalidSettings("style_scale", f"must be between 0.05 and 8, got {s.style_scale}")
        if s.frame_every < 0:
            raise InvalidSettings("frame_every", f"must be >= 0, got {s.frame_every}")
        for name in ("content_layers", "style_layers"):
            layers: dict[str, float] = getattr(s, name)
            for layer, weight in layers.items():
                if layer not in self._network.layers:
                    raise InvalidSettings(
                        name, f"unknown layer {layer!r}; known: {', '.join(self._network.layers)}"
                    )
                if not (math.isfinite(weight) and weight >= 0):
                    raise InvalidSettings(
                        name, f"weight of {layer} must be a finite number >= 0, got {weight}"
                    )
        if not s.content_layers and not s.style_layers:
            raise InvalidSettings("style_layers", "no content or style layer given")
        if s.init is Init.IMAGE and s.init_image is None:
            raise InvalidSettings("init_image", "init is IMAGE but no init image was given")

    def _choice(self, settings: StylizeSettings) -> LayerChoice:
        return LayerChoice(
            tuple(settings.content_layers), tuple(settings.style_layers), settings.pooling.value
        )

    def stylize(
        self,
        content: np.ndarray,
        styles: Sequence[StyleSource],
        settings: StylizeSettings,
        observer: StylizeObserver,
    ) -> StylizeResult:
        """Optimise an image whose content matches `content` and whose style matches the blended `styles`.

        Images are float32 (H, W, 3) RGB in [0, 1]. Blocks until done; raises StylizeCancelled when the
        observer asks to stop, InvalidSettings for settings or inputs that cannot be honoured.
        """
        self.check(settings)
        if settings.style_layers and settings.style_weight > 0 and not styles:
            raise InvalidSettings("styles", "at least one style image is needed")
        blend = np.array([max(0.0, s.blend_weight) for s in styles], np.float64)
        if any(not math.isfinite(s.blend_weight) or s.blend_weight < 0 for s in styles):
            raise InvalidSettings("styles", "blend weights must be finite numbers >= 0")
        blend = blend / blend.sum() if blend.sum() > 0 else np.full(len(styles), 1.0 / max(1, len(styles)))

        run = _Run(observer, settings, time.perf_counter())
        choice = self._choice(settings)
        compiled = self._network.compiled(choice)
        net_content, net_styles = color.prepare_inputs(
            settings.color_mode, content, [s.image for s in styles]
        )
        sizes = self._stage_sizes(content, settings, choice)
        plan = stage_iterations(settings.iterations, len(sizes))
        previous: np.ndarray | None = None  # RGB result of the previous stage
        x = None
        for stage, (size, iterations) in enumerate(zip(sizes, plan, strict=True)):
            height, width = _hw(content, size)
            stage_content = resize(net_content, width, height)
            targets = self._targets(compiled, stage_content, net_styles, blend, size, settings)
            start_rgb = self._start(settings, stage_content, previous, width, height)
            x = self._optimise(
                run, compiled, targets, start_rgb, stage, len(sizes), iterations, plan, sizes, content
            )
            previous = self._network.from_network(x.x)
        assert x is not None
        final = color.finish_output(settings.color_mode, self._network.from_network(x.x), content)
        return StylizeResult(
            image=final,
            iterations=run.iterations_done,
            evaluations=run.evaluations,
            losses=self._losses(x.evaluation, choice),
            elapsed_seconds=time.perf_counter() - run.started,
        )

    @staticmethod
    def _stage_sizes(content: np.ndarray, settings: StylizeSettings, choice: LayerChoice) -> list[int]:
        """The stages' longest sides, checked against the pooling depth of the deepest layer used."""
        need = 2 ** _pools_before(choice.deepest)

        def short_side(size: int) -> int:
            return min(_hw(content, size))

        if settings.min_size is None:
            sizes = stage_sizes(default_min_size(settings.max_size), settings.max_size)
            # The server's rule must not refuse an image that one stage accepts: it drops stages too small
            # for the deepest layer (a thin image).
            sizes = [size for size in sizes if short_side(size) >= need] or sizes[-1:]
            field = "max_size"
        else:
            sizes = stage_sizes(settings.min_size, settings.max_size)
            field = "min_size" if len(sizes) > 1 else "max_size"
        if short_side(sizes[0]) < need:
            raise InvalidSettings(
                field,
                f"the image's short side would be {short_side(sizes[0])} px, but layer {choice.deepest} needs "
                f"at least {need} px; raise the size or use shallower layers",
            )
        return sizes

    def _targets(
        self,
        compiled: CompiledChoice,
        stage_content: np.ndarray,
        styles: list[np.ndarray],
        blend: np.ndarray,
        size: int,
        settings: StylizeSettings,
    ) -> Targets:
        content_targets = compiled.targets(self._network.to_network(stage_content)).content
        grams: dict[str, np.ndarray] = {}
        style_size = max(MIN_SIZE, round(size * settings.style_scale))
        for weight, style in zip(blend, styles, strict=True):
            style_grams = compiled.targets(self._network.to_network(resize_longest(style, style_size))).grams
            for layer, gram in style_grams.items():
                grams[layer] = grams.get(layer, 0) + np.float32(weight) * gram
        return Targets(content_targets, grams)

    def _start(
        self,
        settings: StylizeSettings,
        content: np.ndarray,
        previous: np.ndarray | None,
        width: int,
        height: int,
    ) -> np.ndarray:
        if previous is not None:
            return resize(previous, width, height)
        if settings.init is Init.CONTENT:
            return content
        if settings.init is Init.IMAGE:
            assert settings.init_image is not None
            return resize(settings.init_image, width, height)
        rng = np.random.default_rng(settings.seed)
        return rng.uniform(0.0, 1.0, (height, width, 3)).astype(np.float32)

    def _optimise(
        self,
        run: _Run,
        compiled: CompiledChoice,
        targets: Targets,
        start_rgb: np.ndarray,
        stage: int,
        stages: int,
        iterations: int,
        plan: list[int],
        sizes: list[int],
        content: np.ndarray,
    ) -> Step:
        s = run.settings
        feeds = loss_feeds(
            targets,
            s.content_weight,
            s.style_weight,
            s.tv_weight,
            list(s.content_layers.values()),
            list(s.style_layers.values()),
        )
        x0 = self._network.to_network(start_rgb)
        height, width = x0.shape[-2:]
        run.stage_started = time.perf_counter()
        base_iterations = run.iterations_done

        def before_evaluation() -> None:
            if run.observer.should_stop():
                raise StylizeCancelled()

        def on_step(step: Step) -> None:
            run.iterations_done = base_iterations + step.iteration
            if step.iteration == 0 and stage > 0:
                return  # the first point of a later stage is the previous stage's result, already reported
            elapsed_stage = time.perf_counter() - run.stage_started
            per_iteration = elapsed_stage / max(1, step.iteration)
            remaining = (iterations - step.iteration) * per_iteration + sum(
                n * per_iteration * (size / sizes[stage]) ** 2
                for n, size in zip(plan[stage + 1 :], sizes[stage + 1 :], strict=True)
            )
            run.observer.on_progress(
                Progress(
                    iteration=run.iterations_done,
                    evaluations=run.evaluations,
                    losses=self._losses(step.evaluation, compiled.choice),
                    elapsed_seconds=time.perf_counter() - run.started,
                    eta_seconds=remaining if step.iteration > 0 else 0.0,
                    stage=stage,
                    stages=stages,
                    width=int(width),
                    height=int(height),
                )
            )
            if s.frame_every and step.iteration > 0 and run.iterations_done % s.frame_every == 0:
                rgb = self._network.from_network(step.x)
                run.observer.on_frame(run.iterations_done, color.finish_output(s.color_mode, rgb, content))

        def evaluate(x: np.ndarray) -> Evaluation:
            run.evaluations += 1
            return compiled.evaluate(x, feeds)

        last = run_lbfgs(
            evaluate,
            x0,
            self._network.pixel_bounds(int(height), int(width)),
            iterations,
            on_step,
            before_evaluation,
        )
        run.iterations_done = base_iterations + last.iteration
        return last

    @staticmethod
    def _losses(evaluation: Evaluation, choice: LayerChoice) -> Losses:
        return Losses(
            total=evaluation.loss,
            content=evaluation.content,
            style=evaluation.style,
            tv=evaluation.tv,
            content_per_layer={
                layer: float(v)
                for layer, v in zip(choice.content_layers, evaluation.content_per_layer, strict=True)
            },
            style_per_layer={
                layer: float(v)
                for layer, v in zip(choice.style_layers, evaluation.style_per_layer, strict=True)
            },
        )


def _hw(image: np.ndarray, longest: int) -> tuple[int, int]:
    width, height = scaled_size(image.shape[1], image.shape[0], longest)
    return height, width
