"""Engine.stylize: the Gatys et al. optimisation, coarse to fine, reporting through a StylizeObserver."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stylize_service.models.terms import guide_input

from . import color, memory, pyramid
from .checkpoint import Checkpoint, CheckpointError, CheckpointSink, plan_key, plan_sizes
from .evaluators import StageEvaluator, TermTargets, WholeImageEvaluator, blend_targets
from .guides import Guide, blend_guided, guide_count, guide_maps, guide_weights, guides_of
from .lbfgs_workspace import OptimizerState
from .network import CompiledChoice, Evaluation, FeatureNetwork, Targets, TileSessions
from .optimizer import Convergence, Step, exact_resume_available, routine_id, run_lbfgs
from .plan import JobPlan, check_settings, layer_choice
from .plan import plan as plan_job
from .providers import ProviderSpec
from .pyramid import Stage
from .resample import resize, resize_longest, resize_mask
from .tile_layout import TileScheme, segment_layouts
from .tiling import TiledEvaluator
from .types import (
    GraphCacheStats,
    Init,
    Losses,
    ModelInfo,
    Progress,
    StyleSource,
    StylizeCancelled,
    StylizeObserver,
    StylizeResult,
    StylizeSettings,
)
from .validation import check_masks

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """Book-keeping of one stylize() call across its stages."""

    observer: StylizeObserver
    settings: StylizeSettings
    compiled: CompiledChoice
    stages: list[Stage]
    memory: memory.JobMemory  # each stage's tile size and L-BFGS-B history
    content: np.ndarray  # the request's content image (RGB), for the colour mode's finishing
    started: float  # perf_counter() when the job started (moved back by a resumed job's elapsed time)
    plan_key: str  # checkpoint.plan_key of the stages and histories
    checkpoints: CheckpointSink | None
    guides: list[Guide] = field(default_factory=list)  # masked styles' guides; none = unmasked job
    style_masks: list[np.ndarray | None] = field(default_factory=list)  # each style's, or None
    iterations_done: int = 0
    evaluations: int = 0
    evaluation_seconds: list[float] = field(default_factory=list)  # not yet reported in a Progress


class Engine:
    """Stylizes images; thread-safe (each call keeps its own state; the sessions are shared)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: list[ProviderSpec] | None = None,
        intra_op_threads: int | None = None,
        tile_size: int = 0,
    ) -> None:
        """providers: onnxruntime execution providers, most preferred first (providers.execution_providers;
        default the CPU). tile_size: evaluate every stage larger than this in tiles of about this many px
        (0 = only where the memory budget given to stylize() asks for it)."""
        self._network = FeatureNetwork(model_path, providers=providers, intra_op_threads=intra_op_threads)
        self.tile_size = tile_size

    @property
    def info(self) -> ModelInfo:
        return self._network.info()

    @property
    def graph_cache(self) -> GraphCacheStats:
        return self._network.cache_stats()

    def warm_up(self, settings: StylizeSettings | None = None) -> None:
        """Compile the default layer choice's graphs now rather than on the first request."""
        self._network.compiled(layer_choice(settings or StylizeSettings(), styles=1))

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers the model offers (the names the settings' layers must use)."""
        return tuple(self._network.layers)

    def plan(
        self,
        content_size: tuple[int, int],
        style_sizes: Sequence[tuple[int, int]],
        settings: StylizeSettings,
        *,
        style_weights: Sequence[float] | None = None,
        has_init_image: bool = False,
        budget: int | None = None,
        schedule: Sequence[Stage] | None = None,
        style_masks: Sequence[tuple[bool, bool]] = (),
    ) -> JobPlan:
        """check_settings, then plan() with this engine's --tile-size: for callers of the engine alone
        (the servicer plans with the plan module itself, once per job). style_weights default to 1 each;
        style_masks: whether each style has a mask and a style mask (default: neither)."""
        check_settings(
            settings,
            self.layers,
            style_weights=[1.0] * len(style_sizes) if style_weights is None else style_weights,
            has_init_image=has_init_image,
            style_masks=style_masks,
        )
        return plan_job(
            content_size,
            style_sizes,
            settings,
            budget=budget,
            forced_tile=self.tile_size,
            schedule=schedule,
            guides=guide_count(style_masks),
        )

    def stylize(
        self,
        content: np.ndarray,
        styles: Sequence[StyleSource],
        settings: StylizeSettings,
        observer: StylizeObserver,
        *,
        init_image: np.ndarray | None = None,
        plan: JobPlan | None = None,
        schedule: Sequence[Stage] | None = None,
        checkpoints: CheckpointSink | None = None,
        resume: Checkpoint | None = None,
    ) -> StylizeResult:
        """Optimise an image whose content matches `content` and whose style matches the blended `styles`.

        Images are float32 (H, W, 3) RGB in [0, 1]; init_image is the start for Init.IMAGE. plan: the job's
        plan for these images and settings (plan.plan; the servicer makes it from the decoded images);
        None = made here by Engine.plan, with no memory budget. schedule (without a plan): stages to run
        in place of the pyramid that the settings give (scripts/benchmark_schedules.py). Blocks until
        done; raises StylizeCancelled when the observer asks to stop, InvalidSettings for settings or
        inputs that cannot be honoured.

        checkpoints: after each accepted iteration that its stage goes on from, asked whether one is due,
        and handed a Checkpoint if so. resume: a checkpoint of this job (same inputs, settings and plan)
        to continue from: the stages before its stage are skipped, and its stage goes on exactly from the
        saved optimiser state, or, where there is none or it does not fit this plan's L-BFGS-B (another
        history or iteration count, another scipy), restarts L-BFGS-B from the saved iterate for the
        stage's remaining iterations. Counts, elapsed time and frames go on from the checkpoint's. Raises
        CheckpointError for a checkpoint of other stage sizes.
        """
        check_masks(content, styles)
        if plan is None:
            plan = self.plan(
                (content.shape[1], content.shape[0]),
                [(s.image.shape[1], s.image.shape[0]) for s in styles],
                settings,
                style_weights=[s.blend_weight for s in styles],
                has_init_image=init_image is not None,
                schedule=schedule,
                style_masks=[(s.mask is not None, s.style_mask is not None) for s in styles],
            )
        choice, stages, memory_plan = plan.choice, list(plan.stages), plan.memory
        key = plan_key(stages, memory_plan.histories)
        if resume is not None:
            _check_resume(resume, stages, key)
        run = _Run(
            observer,
            settings,
            self._network.compiled(choice),
            stages,
            memory_plan,
            content,
            time.perf_counter() - (resume.elapsed_seconds if resume else 0.0),
            key,
            checkpoints,
        )
        if choice.guides:
            run.guides = guides_of([s.mask for s in styles])
            run.style_masks = [s.style_mask for s in styles]
        if resume is not None:
            run.iterations_done, run.evaluations = resume.iterations_done, resume.evaluations
        net_content, net_styles = color.prepare_inputs(
            settings.color_mode, content, [s.image for s in styles]
        )
        blend = _blend_weights([s.blend_weight for s in styles])
        previous: tuple[np.ndarray, np.ndarray | None] | None = None  # the last stage's result and base
        last: Step | None = None
        # Built first, while the job holds little: compiling them takes a few hundred MB for a moment
        # (memory.TILE_SESSIONS_BUILD_BYTES); memory.plan_job counts them in every stage.
        uses_tiles = any(memory_plan.schemes) or any(memory_plan.style_schemes)
        tile_sessions = self._network.tile_sessions(choice) if uses_tiles else None
        if tile_sessions is not None:
            for scheme, style_scheme in zip(memory_plan.schemes, memory_plan.style_schemes, strict=True):
                for one, backward in ((scheme, True), (style_scheme, False)):
                    if one is not None:
                        tile_sessions.prepare(*one.cut(choice), backward=backward)
        try:
            for stage in stages:
                if resume is not None and stage.index < resume.stage:
                    continue  # done before the checkpoint
                stage_content = resize(net_content, stage.width, stage.height)
                scheme = memory_plan.schemes[stage.index]
                style_scheme = memory_plan.style_schemes[stage.index]
                evaluator = self._evaluator(run, tile_sessions, scheme)
                style_evaluator = (
                    evaluator if style_scheme == scheme else self._evaluator(run, tile_sessions, style_scheme)
                )
                targets = self._targets(
                    run, stage_content, net_styles, blend, stage, evaluator, style_evaluator
                )
                evaluate = evaluator.evaluator(targets, *_weights(settings))
                base = self._base(settings, stage, stage_content, init_image)
                if resume is not None and stage.index == resume.stage:
                    last = self._optimise(run, stage, evaluate, resume.image, resume)
                else:
                    start_rgb = self._start(settings, stage, base, previous)
                    last = self._optimise(run, stage, evaluate, self._network.to_network(start_rgb))
                previous = (self._network.from_network(last.x), base)
        finally:
            del tile_sessions  # built for this job alone: dropping them frees their memory
            self._network.release_memory(run.compiled)
        assert last is not None
        final = color.finish_output(settings.color_mode, self._network.from_network(last.x), content)
        return StylizeResult(
            image=final,
            iterations=run.iterations_done,
            evaluations=run.evaluations,
            losses=_losses(last.evaluation),
            elapsed_seconds=time.perf_counter() - run.started,
        )

    @staticmethod
    def _evaluator(run: _Run, sessions: TileSessions | None, scheme: TileScheme | None) -> StageEvaluator:
        """The stage's evaluator: the whole image, or exact tiles as the scheme cuts them."""
        if scheme is None:
            return WholeImageEvaluator(run.compiled)
        assert sessions is not None
        return TiledEvaluator(sessions, scheme, functools.partial(_stop_if_asked, run.observer))

    def _targets(
        self,
        run: _Run,
        stage_content: np.ndarray,
        styles: list[np.ndarray],
        blend: np.ndarray,
        stage: Stage,
        evaluator: StageEvaluator,
        style_evaluator: StageEvaluator,
    ) -> Targets:
        """The region-separable terms' targets from the stage's content image; the others blended over
        the style images, each scaled to the stage's longest side times style_scale, one at a time, and
        run whole or, where the memory plan says so, in tiles (exact: a Gram matrix is a sum over the
        tiles). Each pass is a whole network run (many seconds at 4096 px), so a cancelled job stops
        before each one rather than after them all."""
        _stop_if_asked(run.observer)
        content = self._network.to_network(stage_content)
        separable = evaluator.separable_targets(content)
        del content
        style_size = pyramid.style_longest(stage.longest, run.settings.style_scale)

        def style_passes() -> Iterator[tuple[float, TermTargets]]:
            for index, (weight, style) in enumerate(zip(blend, styles, strict=True)):
                _stop_if_asked(run.observer)
                scaled = resize_longest(style, style_size)
                guides = self._style_guides(run, index, scaled.shape[0], scaled.shape[1])
                image = self._network.to_network(scaled)
                del scaled
                one = style_evaluator.statistic_targets(image, guides)
                del image  # before the next style is scaled: one pass's input at a time
                yield float(weight), one

        if run.guides:
            targets = self._guided_targets(run, stage, separable, blend, style_passes())
        else:
            targets = blend_targets(run.compiled.choice, separable, style_passes())
        if isinstance(evaluator, TiledEvaluator) or isinstance(style_evaluator, TiledEvaluator):
            # The tile runs leave their windows' chunks in the arena (they run without shrinkage); an
            # untiled evaluation could not reuse them. Shrink it, as an untiled targets pass does.
            run.compiled.shrink_arenas()
        _stop_if_asked(run.observer)  # before the stage's first evaluation
        return targets

    @staticmethod
    def _style_guides(run: _Run, index: int, height: int, width: int) -> dict[str, np.ndarray] | None:
        """A style image's guide maps at its pass's size, from its style mask; None = all of it."""
        style_mask = run.style_masks[index] if run.style_masks else None
        if style_mask is None:
            return None
        return guide_maps([resize_mask(style_mask, width, height)], run.compiled.choice.layers_of("style"))

    @staticmethod
    def _guided_targets(
        run: _Run,
        stage: Stage,
        separable: TermTargets,
        blend: np.ndarray,
        style_passes: Iterator[tuple[float, TermTargets]],
    ) -> Targets:
        """A masked job's stage targets: the content's, each guide's blended style target, the guides'
        maps at every style layer (from the masks at the stage's size) and their weights (guides.py)."""
        layers = run.compiled.choice.layers_of("style")
        masks = [
            np.ones((stage.height, stage.width), np.float32)
            if guide.mask is None
            else resize_mask(guide.mask, stage.width, stage.height)
            for guide in run.guides
        ]
        spatial = guide_maps(masks, layers)
        vectors = guide_weights(masks, [float(sum(blend[i] for i in guide.styles)) for guide in run.guides])
        per_style = [one["style"] for _, one in style_passes]
        by_term = dict(separable)
        by_term["style"] = {
            layer: blend_guided(
                run.guides, blend, [one[layer] for one in per_style], spatial[guide_input(layer)]
            )
            for layer in layers
        }
        return Targets(by_term, spatial, vectors)

    @staticmethod
    def _base(
        settings: StylizeSettings, stage: Stage, content: np.ndarray, init_image: np.ndarray | None
    ) -> np.ndarray | None:
        """The image a stage would start from as the first one (RGB): the content or the init image at the
        stage's size; None for noise, which has no detail to keep."""
        if settings.init is Init.CONTENT:
            return content
        if settings.init is Init.IMAGE:
            assert init_image is not None  # validated
            return resize(init_image, stage.width, stage.height)
        return None

    @staticmethod
    def _start(
        settings: StylizeSettings,
        stage: Stage,
        base: np.ndarray | None,
        previous: tuple[np.ndarray, np.ndarray | None] | None,
    ) -> np.ndarray:
        """A stage's starting image. After the first stage: the previous result scaled up, or, with a base
        image, this stage's base plus what the previous stage changed in its own base, scaled up. The
        latter keeps the detail that the base has at this size and a scaled-up result lacks."""
        if previous is None:
            if base is not None:
                return base
            rng = np.random.default_rng(settings.seed)
            return rng.uniform(0.0, 1.0, (stage.height, stage.width, 3)).astype(np.float32)
        result, previous_base = previous
        if base is None or previous_base is None:
            return resize(result, stage.width, stage.height)
        change = resize(result - previous_base, stage.width, stage.height, clip=False)
        return np.clip(base + change, 0.0, 1.0).astype(np.float32)

    def _optimise(
        self,
        run: _Run,
        stage: Stage,
        loss: Callable[[np.ndarray], Evaluation],
        x0: np.ndarray,
        resume: Checkpoint | None = None,
    ) -> Step:
        """Run the stage's L-BFGS-B from x0 (network space), or go on from `resume`, a checkpoint taken
        in this stage (x0 is its image)."""
        s = run.settings
        stage_started = time.perf_counter()
        done_before = resume.stage_iteration if resume else 0  # the stage's iterations before this call
        base_iterations = run.iterations_done - done_before  # the job's iterations before the stage
        state = _exact_state(resume, run, stage)
        # Restarted from a checkpoint's iterate, run_lbfgs counts from 0 again; resumed exactly, it goes on
        # counting from the state's.
        offset = done_before if state is None else 0
        scheme = run.memory.schemes[stage.index]
        tile_size = scheme.tile if scheme else 0
        history = run.memory.histories[stage.index]
        tile_count = (
            len(segment_layouts(stage.height, stage.width, scheme, run.compiled.choice)[0]) if scheme else 0
        )

        def before_evaluation() -> None:
            if run.observer.should_stop():
                raise StylizeCancelled()

        convergence = Convergence(s.tolerance, recent=resume.recent_losses if resume else ())

        def on_step(step: Step) -> bool:
            """Report the step; True when the stage has converged (settings.tolerance)."""
            if resume is not None and step.iteration == 0:
                return False  # a restart's first point is the checkpoint's iterate: reported and counted
            iteration = offset + step.iteration  # within the stage
            run.iterations_done = base_iterations + iteration
            converged = convergence.converged(step.evaluation.loss)
            if iteration == 0 and not stage.is_first:
                return False  # a later stage's first point is the previous stage's result, reported
            per_iteration = (time.perf_counter() - stage_started) / max(1, iteration - done_before)
            run.observer.on_progress(
                Progress(
                    iteration=run.iterations_done,
                    evaluations=run.evaluations,
                    losses=_losses(step.evaluation),
                    elapsed_seconds=time.perf_counter() - run.started,
                    eta_seconds=(
                        pyramid.remaining_seconds(run.stages, stage, iteration, per_iteration)
                        if iteration > 0
                        else 0.0
                    ),
                    stage=stage.index,
                    stages=stage.count,
                    width=stage.width,
                    height=stage.height,
                    tile_size=tile_size,
                    tiles=tile_count,
                    correction_pairs=history,
                    evaluation_seconds=tuple(run.evaluation_seconds),
                )
            )
            run.evaluation_seconds.clear()
            if s.frame_every and iteration > 0 and run.iterations_done % s.frame_every == 0:
                rgb = self._network.from_network(step.x)
                run.observer.on_frame(
                    run.iterations_done, color.finish_output(s.color_mode, rgb, run.content)
                )
            return converged

        def on_continue(step: Step, optimizer_state: Callable[[], OptimizerState | None]) -> None:
            """Save a checkpoint here if one is due (the stage goes on from this step)."""
            assert run.checkpoints is not None
            if not run.checkpoints.due():
                return
            checkpoint = Checkpoint(
                stage=stage.index,
                stage_iteration=offset + step.iteration,
                iterations_done=run.iterations_done,
                evaluations=run.evaluations,
                elapsed_seconds=time.perf_counter() - run.started,
                recent_losses=convergence.recent_losses,
                image=step.x.copy(),
                optimizer=optimizer_state(),
                plan_key=run.plan_key,
            )
            run.checkpoints.save(checkpoint)

        def evaluate(x: np.ndarray) -> Evaluation:
            run.evaluations += 1
            started = time.perf_counter()
            evaluation = loss(x)
            run.evaluation_seconds.append(time.perf_counter() - started)
            return evaluation

        last = run_lbfgs(
            evaluate,
            x0,
            self._network.pixel_bounds(stage.height, stage.width),
            max(1, stage.iterations - offset),
            on_step,
            before_evaluation,
            history,
            on_continue=on_continue if run.checkpoints is not None else None,
            resume=state,
        )
        run.iterations_done = base_iterations + offset + last.iteration
        return last


def _check_resume(resume: Checkpoint, stages: Sequence[Stage], key: str) -> None:
    """Raises CheckpointError unless the checkpoint's stage sizes are the plan's (its image then fits)."""
    if plan_sizes(resume.plan_key) != plan_sizes(key):
        raise CheckpointError(
            f"the checkpoint was taken under other stages ({resume.plan_key}) than this job's plan ({key})"
        )
    if not 0 <= resume.stage < len(stages):  # pragma: no cover - the sizes agree, so it is in range
        raise CheckpointError(f"the checkpoint's stage {resume.stage} is not in the plan ({key})")
    stage = stages[resume.stage]
    if resume.image.shape != (1, 3, stage.height, stage.width):
        raise CheckpointError(
            f"the checkpoint's image {resume.image.shape} does not fit its stage, {stage.width}x{stage.height}"
        )


def _exact_state(resume: Checkpoint | None, run: _Run, stage: Stage) -> OptimizerState | None:
    """The checkpoint's optimiser state where it can go on exactly in this run, else None (a restart from
    the checkpoint's iterate, logged with the reason)."""
    if resume is None:
        return None
    state = resume.optimizer
    if state is None:
        reason = "it holds no L-BFGS-B state (taken with scipy.optimize.minimize)"
    elif resume.plan_key != run.plan_key:
        reason = f"its plan ({resume.plan_key}) differs from this job's ({run.plan_key})"
    elif not exact_resume_available():
        reason = "scipy's L-BFGS-B routine cannot be driven directly here"
    elif state.routine != routine_id():
        reason = f"its state is of {state.routine}, this engine runs {routine_id()}"
    elif state.iterations != resume.stage_iteration or state.history != run.memory.histories[stage.index]:
        # E.g. taken after a restart, whose L-BFGS-B counted (and was limited) from the restart.
        reason = "its state's counts are not its stage's"
    else:
        return state
    log.info("resuming stage %d from the checkpoint's image, not exactly: %s", stage.index, reason)
    return None


def _weights(settings: StylizeSettings) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each term's weight, and each layered term's weight per layer."""
    return settings.term_weights(), {term: dict(layers) for term, layers in settings.term_layers().items()}


def _stop_if_asked(observer: StylizeObserver) -> None:
    if observer.should_stop():
        raise StylizeCancelled()


def _blend_weights(weights: Sequence[float]) -> np.ndarray:
    """Normalised to sum to 1; all zero (or unset) = equal shares."""
    blend = np.array(weights, np.float64)
    return blend / blend.sum() if blend.sum() > 0 else np.full(len(weights), 1.0 / max(1, len(weights)))


def _losses(evaluation: Evaluation) -> Losses:
    return Losses(total=evaluation.loss, terms=dict(evaluation.terms), per_layer=evaluation.per_layer)
