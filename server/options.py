"""stylize.v1.StylizeOptions <-> the engine's StylizeSettings, plus the servicer's own encoding choices.

This module converts; it does not judge values. The engine's validator (server.engine.validation) owns every
value rule and its limits; `request_field` renders the field names of its InvalidSettings as request field
names (e.g. "options.max_size must be between 16 and 4096, got 0"), so that a client can tell what to fix.
The only checks here are about the proto itself (unknown enum numbers) and the servicer's own options
(frames and encodings).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.engine.types import (
    ColorMode,
    Init,
    InvalidSettings,
    Layers,
    Pooling,
    StylizeSettings,
)
from stylize_service.server.engine.validation import MAX_SIZE, MIN_SIZE
from stylize_service.server.imageio import Encoding

DEFAULT_OUTPUT = Encoding.PNG
DEFAULT_FRAMES = Encoding.JPEG

_E = TypeVar("_E")
_K = TypeVar("_K", bound=int)  # a proto enum (an int subclass in the generated stubs)

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
# Engine fields that are not under `options` in the request, and their request names.
_TOP_LEVEL_FIELDS = {"content": "content_image"}
_TOP_LEVEL_PREFIXES = ("styles",)


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


def request_field(engine_field: str) -> str:
    """The request field behind a field name of the engine's InvalidSettings."""
    if engine_field in _TOP_LEVEL_FIELDS:
        return _TOP_LEVEL_FIELDS[engine_field]
    if engine_field.startswith(_TOP_LEVEL_PREFIXES):
        return engine_field
    return f"options.{engine_field}"


def invalid_option(error: InvalidSettings) -> InvalidOption:
    """The engine's refusal in the request's vocabulary."""
    rendered = error.render(request_field)
    field = request_field(error.field)
    return InvalidOption(field, rendered.removeprefix(field).lstrip())


def to_job_options(options: pb.StylizeOptions) -> JobOptions:
    """Convert; unset fields take the engine's defaults. Raises InvalidOption only for what the proto
    cannot mean (unknown enum numbers) and for the servicer's own options; values are judged by the engine."""
    defaults = StylizeSettings()

    def value(name: str, default: _E) -> _E:
        return getattr(options, name) if options.HasField(name) else default

    settings = StylizeSettings(
        max_size=value("max_size", defaults.max_size),
        min_size=value("min_size", None),
        iterations=value("iterations", defaults.iterations),
        content_weight=value("content_weight", defaults.content_weight),
        style_weight=value("style_weight", defaults.style_weight),
        tv_weight=value("tv_weight", defaults.tv_weight),
        content_layers=_layers(options.content_layers, defaults.content_layers),
        style_layers=_layers(options.style_layers, defaults.style_layers),
        pooling=_enum(options.pooling, "pooling", _POOLING, defaults.pooling),
        init=_init(options, defaults.init),
        seed=value("seed", defaults.seed),
        style_scale=value("style_scale", defaults.style_scale),
        color_mode=_color_mode(options, defaults.color_mode),
        frame_every=value("frame_every", defaults.frame_every),
        tolerance=value("tolerance", defaults.tolerance),
    )
    # Unset = the output's size, which the engine's validator judges as max_size.
    frame_max_size = value("frame_max_size", settings.max_size)
    if options.HasField("frame_max_size") and not MIN_SIZE <= frame_max_size <= MAX_SIZE:
        raise InvalidOption(
            "options.frame_max_size", f"must be between {MIN_SIZE} and {MAX_SIZE}, got {frame_max_size}"
        )
    return JobOptions(
        settings=settings,
        output_encoding=_encoding(options.output_format, "output_format", DEFAULT_OUTPUT),
        frame_encoding=_encoding(options.frame_format, "frame_format", DEFAULT_FRAMES),
        frame_max_size=frame_max_size,
    )


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
        content_layers=[pb.LayerWeight(layer=k, weight=v) for k, v in d.content_layers],
        style_layers=[pb.LayerWeight(layer=k, weight=v) for k, v in d.style_layers],
        pooling=_reverse(_POOLING)[d.pooling],
        init=_reverse(_INIT)[d.init],
        seed=d.seed,
        style_scale=d.style_scale,
        color_mode=_reverse(_COLOR)[d.color_mode],
        preserve_colors=False,
        frame_every=d.frame_every,
        tolerance=d.tolerance,
        frame_format=_reverse(_ENCODING)[DEFAULT_FRAMES],
        output_format=_reverse(_ENCODING)[DEFAULT_OUTPUT],
    )


def _reverse(mapping: dict[_K, _E]) -> dict[_E, _K]:
    return {v: k for k, v in mapping.items()}


def _layers(layers: Iterable[pb.LayerWeight], default: Layers) -> Layers:
    """Empty = the default; an unset weight = 1. Names are kept as given (stripped) for the validator."""
    items = list(layers)
    if not items:
        return default
    return tuple((item.layer.strip(), item.weight if item.HasField("weight") else 1.0) for item in items)


def _enum(value: _K, name: str, mapping: dict[_K, _E], default: _E) -> _E:
    """A proto enum value -> ours; 0 (unspecified) = default. Open proto3 enums may carry unknown numbers."""
    if value == 0:
        return default
    if value not in mapping:
        raise InvalidOption(f"options.{name}", f"has an unknown value {value}")
    return mapping[value]


def _init(options: pb.StylizeOptions, default: Init) -> Init:
    """Unspecified = IMAGE when an init image is given, else the default."""
    if options.init == pb.INIT_UNSPECIFIED:
        return Init.IMAGE if options.init_image else default
    return _enum(options.init, "init", _INIT, default)


def _color_mode(options: pb.StylizeOptions, default: ColorMode) -> ColorMode:
    if options.color_mode != pb.COLOR_MODE_UNSPECIFIED:
        return _enum(options.color_mode, "color_mode", _COLOR, default)
    return ColorMode.LUMINANCE if options.preserve_colors else default


def _encoding(value: pb.ImageFormat, name: str, default: Encoding) -> Encoding:
    encoding = _enum(value, name, _ENCODING, default)
    if not encoding.available:
        raise InvalidOption(f"options.{name}", f"{encoding.name} is not supported by this server's Pillow")
    return encoding
