"""stylize.v1.StylizeOptions -> the engine's StylizeSettings plus the servicer's encoding choices.

Validation here names the proto field (e.g. "options.max_size must be between 16 and 4096, got 0") so that
a client can tell what to fix; the engine's own check (layer names and the like) runs afterwards, and
`proto_field` translates the field names of its InvalidSettings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.engine.types import ColorMode, Init, Pooling, StylizeSettings
from stylize_service.server.imageio import Encoding

MIN_SIZE = 16  # px; the network pools four times before relu5_x
MAX_SIZE = 4096  # px; longest side of the output and of frames
MAX_ITERATIONS = 100_000
MAX_STYLES = 16
STYLE_SCALE_RANGE = (0.05, 8.0)
DEFAULT_OUTPUT = Encoding.PNG
DEFAULT_FRAMES = Encoding.JPEG

_E = TypeVar("_E")

_POOLING = {pb.POOLING_MAX: Pooling.MAX, pb.POOLING_AVG: Pooling.AVG}
_INIT = {pb.INIT_NOISE: Init.NOISE, pb.INIT_CONTENT: Init.CONTENT, pb.INIT_IMAGE: Init.IMAGE}
_COLOR = {
    pb.COLOR_MODE_STYLE: ColorMode.STYLE,
    pb.COLOR_MODE_LUMINANCE: ColorMode.LUMINANCE,
    pb.COLOR_MODE_HISTOGRAM: ColorMode.HISTOGRAM,
}
_ENCODING = {
    pb.IMAGE_FORMAT_PNG: Encoding.PNG,
    pb.IMAGE_FORMAT_JPEG: Encoding.JPEG,
    pb.IMAGE_FORMAT_WEBP: Encoding.WEBP,
}
# Fields of StylizeSettings that are not under `options` in the request.
_TOP_LEVEL_FIELDS = {"styles": "styles", "content": "content_image"}


class InvalidOption(ValueError):
    """A request field the server cannot honour; str() is the full message for INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True)
class JobOptions:
    settings: StylizeSettings
    output_encoding: Encoding
    frame_encoding: Encoding
    frame_max_size: int  # longest side of frames, px


def proto_field(engine_field: str) -> str:
    """Name of the request field behind a StylizeSettings field (for the engine's InvalidSettings)."""
    if engine_field in _TOP_LEVEL_FIELDS:
        return _TOP_LEVEL_FIELDS[engine_field]
    return f"options.{engine_field}"


def to_job_options(options: pb.StylizeOptions) -> JobOptions:
    """Validate and convert. settings.init_image is left None: the caller decodes options.init_image
    (at most max_size px, which it learns from here) and adds it with with_init_image().

    Raises InvalidOption naming the first field at fault.
    """
    defaults = StylizeSettings()
    max_size = _size(options, "max_size", defaults.max_size, MAX_SIZE)
    min_size = _size(options, "min_size", None, max_size) if options.HasField("min_size") else None
    iterations = (
        _int_range(options.iterations, "iterations", 1, MAX_ITERATIONS)
        if options.HasField("iterations")
        else defaults.iterations
    )
    settings = StylizeSettings(
        max_size=max_size,
        min_size=min_size,
        iterations=iterations,
        content_weight=_weight(options, "content_weight", defaults.content_weight),
        style_weight=_weight(options, "style_weight", defaults.style_weight),
        tv_weight=_weight(options, "tv_weight", defaults.tv_weight),
        content_layers=_layers(options.content_layers, "content_layers", defaults.content_layers),
        style_layers=_layers(options.style_layers, "style_layers", defaults.style_layers),
        pooling=_enum(options.pooling, "pooling", _POOLING, defaults.pooling),
        init=_init(options, bool(options.init_image)),
        seed=_seed(options),
        style_scale=_style_scale(options, defaults.style_scale, max_size),
        color_mode=_color_mode(options, defaults.color_mode),
        frame_every=options.frame_every if options.HasField("frame_every") else defaults.frame_every,
    )
    return JobOptions(
        settings=settings,
        output_encoding=_encoding(options.output_format, "output_format", DEFAULT_OUTPUT),
        frame_encoding=_encoding(options.frame_format, "frame_format", DEFAULT_FRAMES),
        frame_max_size=_size(options, "frame_max_size", max_size, MAX_SIZE),
    )


def with_init_image(job: JobOptions, image: np.ndarray) -> JobOptions:
    return replace(job, settings=replace(job.settings, init_image=image))


def default_options() -> pb.StylizeOptions:
    """Every option as an unset field is filled in (GetInfo's `defaults`). min_size and frame_max_size
    stay unset: their defaults depend on other options (the engine's rule, and max_size)."""
    d = StylizeSettings()
    return pb.StylizeOptions(
        max_size=d.max_size,
        iterations=d.iterations,
        content_weight=d.content_weight,
        style_weight=d.style_weight,
        tv_weight=d.tv_weight,
        content_layers=[pb.LayerWeight(layer=k, weight=v) for k, v in d.content_layers.items()],
        style_layers=[pb.LayerWeight(layer=k, weight=v) for k, v in d.style_layers.items()],
        pooling=_reverse(_POOLING)[d.pooling],
        init=_reverse(_INIT)[d.init],
        seed=d.seed,
        style_scale=d.style_scale,
        color_mode=_reverse(_COLOR)[d.color_mode],
        preserve_colors=False,
        frame_every=d.frame_every,
        frame_format=_reverse(_ENCODING)[DEFAULT_FRAMES],
        output_format=_reverse(_ENCODING)[DEFAULT_OUTPUT],
    )


def _reverse(mapping: dict[int, _E]) -> dict[_E, int]:
    return {v: k for k, v in mapping.items()}


def _int_range(value: int, name: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidOption(f"options.{name}", f"must be between {low} and {high}, got {value}")
    return int(value)


def _size(options: pb.StylizeOptions, name: str, default: int | None, high: int) -> int:
    if not options.HasField(name):
        assert default is not None
        return default
    value = getattr(options, name)
    if name == "min_size" and value > high:
        raise InvalidOption(
            f"options.{name}", f"must be between {MIN_SIZE} and options.max_size ({high}), got {value}"
        )
    return _int_range(value, name, MIN_SIZE, high)


def _finite_non_negative(value: float, field: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidOption(field, f"must be a finite number >= 0, got {value}")
    return float(value)


def _weight(options: pb.StylizeOptions, name: str, default: float) -> float:
    if not options.HasField(name):
        return default
    return _finite_non_negative(getattr(options, name), f"options.{name}")


def _layers(layers: Iterable[pb.LayerWeight], name: str, default: dict[str, float]) -> dict[str, float]:
    items = list(layers)
    if not items:
        return dict(default)
    result: dict[str, float] = {}
    for index, item in enumerate(items):
        field = f"options.{name}[{index}]"
        layer = item.layer.strip()
        if not layer:
            raise InvalidOption(f"{field}.layer", "is empty")
        if layer in result:
            raise InvalidOption(f"options.{name}", f"lists layer {layer!r} twice")
        weight = item.weight if item.HasField("weight") else 1.0
        result[layer] = _finite_non_negative(weight, f"{field}.weight")
    return result


def _enum(value: int, name: str, mapping: dict[int, _E], default: _E) -> _E:
    """A proto enum value -> ours; 0 (unspecified) = default. Open proto3 enums may carry unknown numbers."""
    if value == 0:
        return default
    if value not in mapping:
        raise InvalidOption(f"options.{name}", f"has an unknown value {value}")
    return mapping[value]


def _init(options: pb.StylizeOptions, has_image: bool) -> Init:
    if options.init == pb.INIT_UNSPECIFIED:
        return Init.IMAGE if has_image else Init.CONTENT
    init = _enum(options.init, "init", _INIT, Init.CONTENT)
    if init is Init.IMAGE and not has_image:
        raise InvalidOption("options.init_image", "is required when options.init is INIT_IMAGE")
    if init is not Init.IMAGE and has_image:
        raise InvalidOption(
            "options.init_image",
            f"is given but options.init is {pb.Init.Name(options.init)}; use INIT_IMAGE or leave init unset",
        )
    return init


def _seed(options: pb.StylizeOptions) -> int:
    if not options.HasField("seed"):
        return StylizeSettings().seed
    if options.seed < 0:
        raise InvalidOption("options.seed", f"must be >= 0, got {options.seed}")
    return int(options.seed)


def _style_scale(options: pb.StylizeOptions, default: float, max_size: int) -> float:
    if not options.HasField("style_scale"):
        return default
    low, high = STYLE_SCALE_RANGE
    value = options.style_scale
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidOption("options.style_scale", f"must be between {low} and {high}, got {value}")
    if max_size * value > MAX_SIZE:
        # The style images are resized to max_size * style_scale: bound their memory like the output's.
        raise InvalidOption(
            "options.style_scale",
            f"times options.max_size must be at most {MAX_SIZE} px, got {value} * {max_size} = {max_size * value:g}",
        )
    return float(value)


def _color_mode(options: pb.StylizeOptions, default: ColorMode) -> ColorMode:
    if options.color_mode != pb.COLOR_MODE_UNSPECIFIED:
        return _enum(options.color_mode, "color_mode", _COLOR, default)
    return ColorMode.LUMINANCE if options.preserve_colors else default


def _encoding(value: int, name: str, default: Encoding) -> Encoding:
    encoding = _enum(value, name, _ENCODING, default)
    if not encoding.available:
        raise InvalidOption(f"options.{name}", f"{encoding.name} is not supported by this server's Pillow")
    return encoding
