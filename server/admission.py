"""Admission of a Stylize request: every check that needs no decoding, before the job waits for a worker.

The options by the engine's rules (INVALID_ARGUMENT naming the field), each image's header (its format
and pixel count), and the job's plan from the headers' sizes: its stages, and the memory it will reserve
(RESOURCE_EXHAUSTED naming memory when it fits in no way). Bad requests fail fast, and a waiting job holds
only its encoded bytes. The job's worker decodes the images with decode() and plans again with plan_for().
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.engine.checkpoint import Checkpoint, CheckpointSink
from stylize_service.server.engine.guides import guide_count
from stylize_service.server.engine.memory import MemoryExceeded
from stylize_service.server.engine.plan import JobPlan, check_settings
from stylize_service.server.engine.plan import plan as plan_job
from stylize_service.server.engine.types import (
    GraphCacheStats,
    InvalidSettings,
    ModelInfo,
    StyleSource,
    StylizeObserver,
    StylizeResult,
    StylizeSettings,
)
from stylize_service.server.engine.validation import check_mask_aspect, check_mask_pixels
from stylize_service.server.imageio import BadImage, decode_image, decode_mask, probe_image
from stylize_service.server.options import InvalidOption, JobOptions, invalid_option, to_job_options
from stylize_service.server.outcome import Outcome


class EngineLike(Protocol):
    """What the service needs of stylize_service.server.engine.Engine (tests pass a fake)."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def graph_cache(self) -> GraphCacheStats: ...

    # Evaluate every stage larger than this in tiles of this size (--tile-size); 0 = where memory needs.
    tile_size: int

    def stylize(
        self,
        content: np.ndarray,
        styles: Sequence[StyleSource],
        settings: StylizeSettings,
        observer: StylizeObserver,
        *,
        init_image: np.ndarray | None = None,
        plan: JobPlan | None = None,
        checkpoints: CheckpointSink | None = None,
        resume: Checkpoint | None = None,
    ) -> StylizeResult: ...


class Refused(Exception):
    """The request is not admitted; the outcome says why, with its status."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


@dataclass(frozen=True)
class AcceptedJob:
    """An admitted request: its options checked and its images' headers read, nothing decoded yet."""

    id: str
    request: pb.StylizeRequest
    options: JobOptions
    plan: JobPlan  # from the headers' sizes: what the job reserves while it waits and runs


def accept(
    request: pb.StylizeRequest,
    engine: EngineLike,
    job_id: str,
    *,
    max_pixels: int,
    memory_capacity: int | None,
) -> AcceptedJob:
    """The request as a job, or Refused (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED naming
    memory)."""
    try:
        if not request.content_image:
            raise InvalidOption("content_image", "is empty: the request needs a content image")
        job_options = to_job_options(request.options)
        settings = job_options.settings
        style_weights = [style.blend_weight for style in request.styles]
        has_init_image = bool(request.options.init_image)
        check_settings(
            settings,
            engine.info.layers,
            style_weights=style_weights,
            has_init_image=has_init_image,
            style_masks=style_masks_of(request),
        )
        content_size = probe(request.content_image, "content_image", max_pixels)
        if has_init_image:
            probe(request.options.init_image, "options.init_image", max_pixels)
        style_sizes = [
            probe(style.image, f"styles[{index}].image", max_pixels)
            for index, style in enumerate(request.styles)
        ]
        # The stages from the header's size, which has the image's true aspect ratio (once shrunk to
        # max_size a thin side is rounded up to 1 px, and the advice would be wrong); the EXIF
        # orientation may swap the sides, which changes no stage's short side. The memory the job will
        # reserve, from the same header sizes (style passes can be far larger than the stages).
        check_request_masks(request, content_size, style_sizes, max_pixels, job_options.settings.max_size)
        job_plan = plan_for(
            engine, content_size, style_sizes, job_options, memory_capacity, guides=guides_of_request(request)
        )
    except InvalidSettings as err:
        raise Refused(Outcome.invalid(str(invalid_option(err)))) from None
    except InvalidOption as err:
        raise Refused(Outcome.invalid(str(err))) from None
    except MemoryExceeded as err:
        raise Refused(Outcome.refused(f"memory: {err}")) from None
    return AcceptedJob(job_id, request, job_options, job_plan)


def plan_for(
    engine: EngineLike,
    content_size: tuple[int, int],
    style_sizes: Sequence[tuple[int, int]],
    options: JobOptions,
    memory_capacity: int | None,
    *,
    guides: int = 0,
) -> JobPlan:
    """The job's plan for these image sizes, within the memory the server has for jobs; guides: the
    masked styles' (guides_of_request)."""
    return plan_job(
        content_size,
        style_sizes,
        options.settings,
        budget=memory_capacity,
        forced_tile=engine.tile_size,
        frame_max_size=options.frame_max_size,
        guides=guides,
    )


def style_masks_of(request: pb.StylizeRequest) -> list[tuple[bool, bool]]:
    """Whether each style of the request has a mask and a style mask."""
    return [(bool(style.mask), bool(style.style_mask)) for style in request.styles]


def guides_of_request(request: pb.StylizeRequest) -> int:
    """The guides the request's masks make (0 = no masks: the unmasked graphs)."""
    return guide_count(style_masks_of(request))


def check_request_masks(
    request: pb.StylizeRequest,
    content_size: tuple[int, int],
    style_sizes: Sequence[tuple[int, int]],
    max_pixels: int,
    max_side: int,
) -> None:
    """Each mask an image (InvalidOption), in its image's aspect ratio and not all black (InvalidSettings),
    from its header and a decode at the size the job uses. The headers carry no EXIF orientation, so a
    mask may match the content turned by 90 degrees here; the engine checks the decoded images exactly."""
    for index, style in enumerate(request.styles):
        for name, data, of, size in (
            ("mask", style.mask, "the content", content_size),
            ("style_mask", style.style_mask, "its style image", style_sizes[index]),
        ):
            if not data:
                continue
            field = f"styles[{index}].{name}"
            mask_size = probe(data, field, max_pixels)
            try:
                check_mask_aspect(field, mask_size, size, of)
            except InvalidSettings:
                check_mask_aspect(field, mask_size, (size[1], size[0]), of)
            check_mask_pixels(field, decode_mask_field(data, field, max_pixels, max_side))


def decode_mask_field(data: bytes, field_name: str, max_pixels: int, max_side: int) -> np.ndarray:
    """A mask decoded (imageio.decode_mask) and shrunk to max_side; InvalidOption naming the field."""
    try:
        return decode_mask(data, max_pixels, max_side)
    except BadImage as err:
        raise InvalidOption(field_name, str(err)) from None


def probe(data: bytes, field_name: str, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) from its header; InvalidOption naming the field."""
    try:
        return probe_image(data, max_pixels)
    except BadImage as err:
        raise InvalidOption(field_name, str(err)) from None


def decode(data: bytes, field_name: str, max_pixels: int, max_side: int) -> np.ndarray:
    """The image decoded and shrunk to max_side; InvalidOption naming the field."""
    try:
        return decode_image(data, max_pixels, max_side)
    except BadImage as err:
        raise InvalidOption(field_name, str(err)) from None
