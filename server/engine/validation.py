"""Every value rule of a stylization, and its limits: the one owner of both.

The engine checks a request with validate() before it runs it; the gRPC servicer calls the same function
before it queues a job (so bad requests fail fast) and only translates the field names of the
InvalidSettings it raises. Test doubles call it too, so they accept and refuse exactly what the engine does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .types import Init, InvalidSettings, Layers, StyleSource, StylizeSettings

MIN_SIZE = 16  # px; below this the stages would be smaller than VGG's receptive field is useful for
MAX_SIZE = 4096  # px; longest side of the output (and of the scaled style images)
MAX_ITERATIONS = 100_000
MAX_STYLES = 16
STYLE_SCALE_RANGE = (0.05, 8.0)
MAX_SEED = 2**63 - 1
# Largest content/style/tv weight and per-layer weight. The loss graph computes in float32 (largest
# 3.4e38) and a term's weight multiplies a layer's weight, so a loss stays finite while MAX_WEIGHT**2
# times the largest loss per unit weight is below that. Measured with `scripts/measure_bounds.py weights`
# (every layer of both terms over pairs of extreme images: black, white, noise, checkerboards, stripes):
# at most 3.9e7 per style layer and 1.6e6 per content layer, 1.0e8 over all 26, gradient elements up to
# 3.2e3, and a tv sum that grows with the pixels to about 3e12 at 4096 px. At 1e12 every layer of both
# terms gives 1.0e32, a margin of 3e6 below float32's largest value; tests/test_defects.py runs the
# engine at the bound. Weights further apart than this are beyond what float32 resolves anyway.
MAX_WEIGHT = 1e12
# A client's string quoted in an error message (and so in the log) is cut to this many characters, with
# its length: an 8 MB layer name must not make an 8 MB status message or log line.
MAX_QUOTED_CHARS = 64


def quote(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """A client's string for a message: repr-escaped (no newline gets through) and, when longer than
    `limit` characters, cut with its length, e.g. 'aaaa...' (8388608 characters)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def validate(
    settings: StylizeSettings,
    known_layers: Sequence[str],
    *,
    style_weights: Sequence[float],
    has_init_image: bool,
    style_masks: Sequence[tuple[bool, bool]] = (),
) -> None:
    """Raise InvalidSettings naming the first setting or input that cannot be honoured.

    style_weights: the blend weight of each style image (their number matters too); style_masks: whether
    each has a mask and a style mask (default none). What depends on the content image's shape (the
    stages' sizes) is checked by pyramid.plan once the image is known, the masks' pixels by check_masks."""
    s = settings
    _check_range("max_size", s.max_size, MIN_SIZE, MAX_SIZE)
    if s.min_size is not None and not MIN_SIZE <= s.min_size <= s.max_size:
        raise InvalidSettings(
            "min_size", f"must be between {MIN_SIZE} and {{max_size}} ({s.max_size}), got {s.min_size}"
        )
    _check_range("iterations", s.iterations, 1, MAX_ITERATIONS)
    for name, value in s.term_weights().items():
        _check_weight(f"{name}_weight", value)
    for name in ("content_layers", "style_layers"):
        _check_layers(name, getattr(s, name), known_layers)
    low, high = STYLE_SCALE_RANGE
    if not (math.isfinite(s.style_scale) and low <= s.style_scale <= high):
        raise InvalidSettings("style_scale", f"must be between {low} and {high}, got {s.style_scale}")
    if s.max_size * s.style_scale > MAX_SIZE:
        # Style images are resized to max_size * style_scale: bound their memory like the output's.
        raise InvalidSettings(
            "style_scale",
            f"times {{max_size}} must be at most {MAX_SIZE} px, "
            f"got {s.style_scale} * {s.max_size} = {s.max_size * s.style_scale:g}",
        )
    _check_range("seed", s.seed, 0, MAX_SEED)
    _check_range("frame_every", s.frame_every, 0, MAX_ITERATIONS)
    if not (math.isfinite(s.tolerance) and 0.0 <= s.tolerance < 1.0):
        raise InvalidSettings("tolerance", f"must be at least 0 and below 1, got {s.tolerance}")
    _check_styles(s, style_weights)
    _check_mask_use(s, len(style_weights), style_masks)
    if s.init is Init.IMAGE and not has_init_image:
        raise InvalidSettings("init_image", f"is required when {{init}} is {Init.IMAGE.name}")
    if s.init is not Init.IMAGE and has_init_image:
        raise InvalidSettings(
            "init_image", f"is given but {{init}} is {s.init.name}; use {Init.IMAGE.name} or leave init unset"
        )


def style_active(settings: StylizeSettings, styles: int) -> bool:
    """Whether the style term takes part: it needs style images, layers and a weight. Without style images
    and with style_weight 0 the request is a valid content-only reconstruction."""
    return styles > 0 and bool(settings.style_layers)


def _check_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidSettings(field, f"must be between {low} and {high}, got {value}")


def _check_weight(field: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidSettings(field, f"must be a finite number >= 0, got {value}")
    if value > MAX_WEIGHT:
        raise InvalidSettings(
            field, f"must be at most {MAX_WEIGHT:g} (larger weights overflow the float32 loss), got {value:g}"
        )


def _check_layers(field: str, layers: Layers, known_layers: Sequence[str]) -> None:
    seen: set[str] = set()
    for index, (layer, weight) in enumerate(layers):
        if not layer.strip():
            raise InvalidSettings(f"{field}[{index}].layer", "is empty")
        if layer not in known_layers:
            raise InvalidSettings(
                f"{field}[{index}].layer",
                f"names an unknown layer {quote(layer)}; known: {', '.join(known_layers)}",
            )
        if layer in seen:
            raise InvalidSettings(field, f"lists layer {quote(layer)} twice")
        seen.add(layer)
        _check_weight(f"{field}[{index}].weight", weight)


def _check_styles(settings: StylizeSettings, style_weights: Sequence[float]) -> None:
    if len(style_weights) > MAX_STYLES:
        raise InvalidSettings("styles", f"has {len(style_weights)} images, more than {MAX_STYLES}")
    for index, weight in enumerate(style_weights):
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidSettings(
                f"styles[{index}].blend_weight", f"must be a finite number >= 0, got {weight}"
            )
    if not style_weights and settings.style_weight > 0 and settings.style_layers:
        raise InvalidSettings(
            "styles", "is empty: at least one style image is needed (or set {style_weight} to 0)"
        )
    if not settings.content_layers and not style_active(settings, len(style_weights)):
        raise InvalidSettings("content_layers", "and the style term are both empty: nothing to optimise for")


# A mask's aspect ratio may differ from its image's by this fraction (rounding of a resized mask).
MASK_ASPECT_TOLERANCE = 0.01


def _check_mask_use(settings: StylizeSettings, styles: int, style_masks: Sequence[tuple[bool, bool]]) -> None:
    """A mask says where a style paints (or where its statistics come from): meaningless, and refused,
    where the style term takes no part."""
    for index, (mask, style_mask) in enumerate(style_masks):
        if not (mask or style_mask):
            continue
        field = f"styles[{index}].{'mask' if mask else 'style_mask'}"
        if not style_active(settings, styles):
            raise InvalidSettings(field, "is given but {style_layers} is empty: no style term to place")
        if settings.style_weight == 0:
            raise InvalidSettings(field, "is given but {style_weight} is 0: no style term to place")


def check_mask_aspect(field: str, mask_size: tuple[int, int], image_size: tuple[int, int], of: str) -> None:
    """Raise InvalidSettings unless a mask of mask_size (width, height) has the aspect ratio of an image
    of image_size within MASK_ASPECT_TOLERANCE; `of` names the image."""
    mask_ratio = mask_size[0] / mask_size[1]
    image_ratio = image_size[0] / image_size[1]
    if abs(mask_ratio / image_ratio - 1.0) > MASK_ASPECT_TOLERANCE:
        raise InvalidSettings(
            field,
            f"is {mask_size[0]}x{mask_size[1]}, an aspect ratio of {mask_ratio:.4g}; it must be that of "
            f"{of} ({image_size[0]}x{image_size[1]}, {image_ratio:.4g}) within "
            f"{MASK_ASPECT_TOLERANCE:.0%}",
        )


def check_mask_pixels(field: str, mask: np.ndarray) -> None:
    """Raise InvalidSettings for a mask that covers nothing (all black) or holds values outside [0, 1]."""
    if mask.ndim != 2 or not mask.size:
        raise InvalidSettings(field, f"must be a greyscale (H, W) map, got shape {mask.shape}")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise InvalidSettings(field, "must hold values in [0, 1]")
    if mask.max() <= 0:
        raise InvalidSettings(
            field, "is all black: it covers no part of the picture (leave it unset to paint everywhere)"
        )


def check_masks(content: np.ndarray, styles: Sequence[StyleSource]) -> None:
    """The styles' masks against the decoded images: each mask in the content's aspect ratio, each style
    mask in its style image's, neither all black."""
    content_size = (content.shape[1], content.shape[0])
    for index, style in enumerate(styles):
        if style.mask is not None:
            field = f"styles[{index}].mask"
            check_mask_pixels(field, style.mask)
            check_mask_aspect(field, (style.mask.shape[1], style.mask.shape[0]), content_size, "the content")
        if style.style_mask is not None:
            field = f"styles[{index}].style_mask"
            check_mask_pixels(field, style.style_mask)
            style_size = (style.image.shape[1], style.image.shape[0])
            check_mask_aspect(
                field, (style.style_mask.shape[1], style.style_mask.shape[0]), style_size, "its style image"
            )
