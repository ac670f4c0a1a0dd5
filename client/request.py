"""Python values -> a stylize.v1.StylizeRequest: image files or bytes, and options as keyword arguments.

Options take plain Python values ("avg", {"relu4_2": 1.0}, "webp", ...) or the proto's own values; None
means "unset" (the server's default). The names and types are those of stylize.v1.StylizeOptions, read
from its descriptor (client/options.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from stylize_service.client.options import (
    OPTIONS,
    Kind,
    Option,
    enum_prefix,
    enum_spellings,
    enum_values,
    short_name,
)
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

ImageInput = bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class Style:
    """A style image with its blend weight (relative; 0 = equal shares) and, optionally, its masks
    (docs/masks.md): `mask`, a greyscale image in the content's aspect ratio, white where this style
    paints; `style_mask`, in the style image's aspect ratio, white where its statistics come from."""

    image: ImageInput
    weight: float = 0.0
    mask: ImageInput | None = None
    style_mask: ImageInput | None = None


StyleInput = ImageInput | tuple[ImageInput, float] | Style
LayersInput = Mapping[str, float] | Iterable[str | tuple[str, float]]

OPTION_NAMES = frozenset(OPTIONS)


def read_image(image: ImageInput) -> bytes:
    """Bytes as they are; a path is read (the server decodes, so any format it reads will do)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    return Path(image).read_bytes()


def enum_choices(name: str) -> list[str]:
    """The lower-case names an enum option accepts, e.g. ["max", "avg"] for pooling."""
    return list(enum_values(_enum_type(name)))


def enum_name(name: str, value: int) -> str:
    """An enum option's value as build_options accepts it, e.g. enum_name("pooling", 1) == "max"."""
    known = _enum_type(name).values_by_number.get(value)
    return short_name(known) if known is not None else str(value)


def build_options(**options: Any) -> pb.StylizeOptions:
    """Keyword arguments named as in StylizeOptions -> the message; raises TypeError for an unknown name
    and ValueError (naming the option) for a value its field cannot take."""
    unknown = set(options) - OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    message = pb.StylizeOptions()
    for name, value in options.items():
        if value is None:
            continue
        option = OPTIONS[name]
        try:
            if option.kind is Kind.LAYERS:
                getattr(message, name).extend(_layer_weights(value))
            elif option.repeated:
                getattr(message, name).extend(_scalar(option, item) for item in value)
            else:
                setattr(message, name, _scalar(option, value))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err}") from None
    return message


def build_request(content: ImageInput, styles: Sequence[StyleInput], **options: Any) -> pb.StylizeRequest:
    """styles: images, (image, blend weight) pairs or Style (with masks); weights are relative (the
    server normalises)."""
    style_images = []
    for style in styles:
        if isinstance(style, Style):
            one = style
        elif isinstance(style, tuple):
            one = Style(*style)
        else:
            one = Style(style)
        message = pb.StyleImage(image=read_image(one.image), blend_weight=float(one.weight))
        if one.mask is not None:
            message.mask = read_image(one.mask)
        if one.style_mask is not None:
            message.style_mask = read_image(one.style_mask)
        style_images.append(message)
    return pb.StylizeRequest(
        content_image=read_image(content), styles=style_images, options=build_options(**options)
    )


def _enum_type(name: str) -> EnumDescriptor:
    enum_type = OPTIONS[name].enum
    if enum_type is None:
        raise KeyError(f"{name} is not an enum option")
    return enum_type


def _scalar(option: Option, value: Any) -> Any:
    """One value of an option, as its field's type takes it."""
    if option.kind is Kind.INT:
        return int(value)
    if option.kind is Kind.FLOAT:
        return float(value)
    if option.kind is Kind.BOOL:
        return bool(value)
    if option.kind is Kind.BYTES:
        return read_image(value)
    if option.kind is Kind.ENUM:
        return _enum_value(option, value)
    return str(value)


def _enum_value(option: Option, value: Any) -> int:
    assert option.enum is not None
    if isinstance(value, int):
        return value  # the proto's own constant, e.g. pb.POOLING_AVG
    spellings = enum_spellings(option.enum)
    key = str(value).strip().lower().replace("-", "_")
    key = key.removeprefix(enum_prefix(option.enum).lower())  # a full name: "POOLING_AVG"
    if key not in spellings:
        raise ValueError(f"must be one of {', '.join(enum_values(option.enum))}, got {value!r}")
    return spellings[key]


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
