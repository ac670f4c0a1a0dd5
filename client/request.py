"""Python values -> a stylize.v1.StylizeRequest: image files or bytes, and options as keyword arguments.

Options take plain Python values ("avg", {"relu4_2": 1.0}, "webp", ...) or the proto's own values; None
means "unset" (the server's default). The names are those of stylize.v1.StylizeOptions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

ImageInput = bytes | str | os.PathLike[str]
StyleInput = ImageInput | tuple[ImageInput, float]
LayersInput = Mapping[str, float] | Iterable[str | tuple[str, float]]

# Option name -> (enum type, prefix of its value names), for values given as strings.
_ENUMS: dict[str, tuple[Any, str]] = {
    "pooling": (pb.Pooling, "POOLING_"),
    "init": (pb.Init, "INIT_"),
    "color_mode": (pb.ColorMode, "COLOR_MODE_"),
    "frame_format": (pb.ImageFormat, "IMAGE_FORMAT_"),
    "output_format": (pb.ImageFormat, "IMAGE_FORMAT_"),
}
_ALIASES = {"JPG": "JPEG"}
_INTS = ("max_size", "min_size", "iterations", "seed", "frame_every", "frame_max_size")
_FLOATS = ("content_weight", "style_weight", "tv_weight", "style_scale")
_LAYERS = ("content_layers", "style_layers")
OPTION_NAMES = frozenset((*_ENUMS, *_INTS, *_FLOATS, *_LAYERS, "init_image", "preserve_colors"))


def read_image(image: ImageInput) -> bytes:
    """Bytes as they are; a path is read (the server decodes, so any format it reads will do)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    return Path(image).read_bytes()


def enum_choices(name: str) -> list[str]:
    """The lower-case names an enum option accepts, e.g. ["max", "avg"] for pooling."""
    enum_type, prefix = _ENUMS[name]
    names: list[str] = list(enum_type.keys())  # an EnumTypeWrapper is not iterable itself
    return [n.removeprefix(prefix).lower() for n in names if not n.endswith("_UNSPECIFIED")]


def enum_name(name: str, value: int) -> str:
    """An enum option's value as build_options accepts it, e.g. enum_name("pooling", 1) == "max"."""
    enum_type, prefix = _ENUMS[name]
    return str(enum_type.Name(value)).removeprefix(prefix).lower()


def build_options(**options: Any) -> pb.StylizeOptions:
    """Keyword arguments named as in StylizeOptions -> the message; raises TypeError/ValueError."""
    unknown = set(options) - OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    message = pb.StylizeOptions()
    for name, value in options.items():
        if value is None:
            continue
        if name in _INTS:
            setattr(message, name, int(value))
        elif name in _FLOATS:
            setattr(message, name, float(value))
        elif name in _ENUMS:
            setattr(message, name, _enum_value(name, value))
        elif name in _LAYERS:
            getattr(message, name).extend(_layer_weights(value))
        elif name == "init_image":
            message.init_image = read_image(value)
        elif name == "preserve_colors":
            message.preserve_colors = bool(value)
    return message


def build_request(content: ImageInput, styles: Sequence[StyleInput], **options: Any) -> pb.StylizeRequest:
    """styles: images, or (image, blend weight) pairs; weights are relative (the server normalises)."""
    style_images = []
    for style in styles:
        image, weight = style if isinstance(style, tuple) else (style, 0.0)
        style_images.append(pb.StyleImage(image=read_image(image), blend_weight=float(weight)))
    return pb.StylizeRequest(
        content_image=read_image(content), styles=style_images, options=build_options(**options)
    )


def _enum_value(name: str, value: Any) -> int:
    if isinstance(value, int):
        return value
    enum_type, prefix = _ENUMS[name]
    key = str(value).strip().upper().replace("-", "_")
    key = _ALIASES.get(key, key)
    full = key if key.startswith(prefix) else prefix + key
    names: list[str] = list(enum_type.keys())
    if full not in names or full.endswith("_UNSPECIFIED"):
        raise ValueError(f"{name} must be one of {', '.join(enum_choices(name))}, got {value!r}")
    return int(enum_type.Value(full))


def _layer_weights(layers: LayersInput) -> list[pb.LayerWeight]:
    items = layers.items() if isinstance(layers, Mapping) else layers
    result = []
    for item in items:
        if isinstance(item, str):
            result.append(pb.LayerWeight(layer=item))  # weight unset = 1
        else:
            layer, weight = item
            result.append(pb.LayerWeight(layer=layer, weight=float(weight)))
    return result
