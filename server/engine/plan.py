"""A job's plan: everything decided about a stylization before a pixel is decoded or a network runs.

plan() turns the sizes of a request's images and its settings into a JobPlan: the layer choice (the key
of the graphs), the pyramid's stages, the memory plan (each stage's tiles, style-pass tiles and L-BFGS-B
history, and the predicted peak that admission reserves), and the sizes the images are decoded and the
frames encoded at. The servicer plans a job once at admission, from the images' headers, and once more
in its worker, from the decoded images (a format may decode to another size than its header says); the
engine runs the plan it is given.

This module and those it uses (validation, pyramid, memory, tile_layout, lbfgs_workspace, models.layers
and models.vgg16) import neither onnxruntime nor scipy: planning, `stylize-server --help` and the tests'
fake engine stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stylize_service.models.layers import LayerChoice
from stylize_service.models.terms import TERMS
from stylize_service.models.vgg16 import downsampling

from . import memory, pyramid, validation
from .pyramid import Stage
from .resample import scaled_size, shrunk_size
from .types import StylizeSettings

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class JobPlan:
    settings: StylizeSettings
    choice: LayerChoice
    stages: tuple[Stage, ...]
    memory: memory.JobMemory
    content_size: Size  # the content image's size this plan was made for
    style_sizes: tuple[Size, ...]  # each style image's, likewise
    content_side: int  # the content and init images are decoded shrunk to this longest side
    style_side: int  # the style images likewise (the output's size times style_scale)
    frame_size: Size | None  # intermediate frames are encoded at this size (None: the content's size)

    @property
    def output_size(self) -> Size:
        final = self.stages[-1]
        return final.width, final.height


def check_settings(
    settings: StylizeSettings,
    known_layers: Sequence[str],
    *,
    style_weights: Sequence[float],
    has_init_image: bool,
    style_masks: Sequence[tuple[bool, bool]] = (),
) -> None:
    """Every value rule (validation.validate): raises InvalidSettings naming the first setting or input
    that cannot be honoured. plan() expects settings that passed it."""
    validation.validate(
        settings,
        known_layers,
        style_weights=style_weights,
        has_init_image=has_init_image,
        style_masks=style_masks,
    )


def plan(
    content_size: Size,
    style_sizes: Sequence[Size],
    settings: StylizeSettings,
    *,
    budget: int | None = None,
    forced_tile: int = 0,
    frame_max_size: int | None = None,
    schedule: Sequence[Stage] | None = None,
    guides: int = 0,
) -> JobPlan:
    """The plan of a job whose content image is content_size and whose style images are style_sizes, for
    settings that passed check_settings. budget: bytes above the idle server the job may use (None = no
    limit); forced_tile: tile every stage larger than this (the server's --tile-size); schedule: stages
    to run in place of the settings' pyramid (scripts/benchmark_schedules.py); guides: the masked
    styles' guides (guides.guide_count; 0 = no masks). Raises InvalidSettings when
    the image is too small for the layers at the stages' sizes, memory.MemoryExceeded when it fits the
    budget in no way."""
    choice = layer_choice(settings, len(style_sizes), guides)
    stages = tuple(schedule) if schedule else tuple(plan_stages(content_size, settings, choice))
    job_memory = memory.plan_job(
        list(stages),
        choice,
        budget,
        forced_tile,
        style_sizes=style_sizes,
        style_scale=settings.style_scale,
    )
    decoded = shrunk_size(content_size, settings.max_size)
    return JobPlan(
        settings=settings,
        choice=choice,
        stages=stages,
        memory=job_memory,
        content_size=content_size,
        style_sizes=tuple(style_sizes),
        content_side=settings.max_size,
        style_side=pyramid.style_longest(settings.max_size, settings.style_scale),
        frame_size=None if frame_max_size is None else scaled_size(*decoded, frame_max_size),
    )


def layer_choice(settings: StylizeSettings, styles: int, guides: int = 0) -> LayerChoice:
    """The graphs' key: each layered term's layers, and the number of guides of masked styles (0 = none).
    A term whose targets come from the style images (one that is not region-separable) has none without
    style images: a content-only request."""
    layers = {term: [layer for layer, _ in layered] for term, layered in settings.term_layers().items()}
    if not styles:
        for term in layers:
            if not TERMS[term].region_separable:
                layers[term] = []
    return LayerChoice.of(layers, settings.pooling.value, guides if styles else 0)


def plan_stages(content_size: Size, settings: StylizeSettings, choice: LayerChoice) -> list[Stage]:
    """The pyramid's stages for the content's size; raises InvalidSettings for an image too thin."""
    return pyramid.plan(
        content_size,
        settings.max_size,
        settings.min_size,
        settings.iterations,
        min_short_side=downsampling(choice.deepest),
        deepest_layer=choice.deepest,
    )
