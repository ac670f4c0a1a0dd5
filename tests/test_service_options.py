"""StylizeOptions -> engine settings (server.options), and the engine validator's refusals rendered in the
request's field names."""

from __future__ import annotations

import math

import pytest

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.engine.types import ColorMode, Init, InvalidSettings, Pooling, StylizeSettings
from stylize_service.server.engine.validation import validate
from stylize_service.server.imageio import Encoding
from stylize_service.server.options import (
    InvalidOption,
    default_options,
    invalid_option,
    request_field,
    to_job_options,
)
from tests.fakes import LAYERS


def test_unset_options_take_the_documented_defaults() -> None:
    job = to_job_options(pb.StylizeOptions())
    assert job.settings == StylizeSettings()
    assert job.output_encoding is Encoding.PNG and job.frame_encoding is Encoding.JPEG
    assert job.frame_max_size == 512  # = max_size


def test_get_info_defaults_are_what_unset_fields_become() -> None:
    defaults = default_options()
    assert not defaults.HasField("min_size") and not defaults.HasField("frame_max_size")
    job = to_job_options(defaults)
    assert job.settings == StylizeSettings()
    assert defaults.content_weight == 5 and defaults.style_weight == 100 and defaults.iterations == 500


def test_every_option_is_converted() -> None:
    options = pb.StylizeOptions(
        max_size=300,
        min_size=75,
        iterations=42,
        content_weight=2.5,
        style_weight=7,
        tv_weight=0,
        content_layers=[pb.LayerWeight(layer="relu3_2")],  # weight unset = 1
        style_layers=[pb.LayerWeight(layer="relu1_1", weight=0.5), pb.LayerWeight(layer="relu2_1", weight=2)],
        pooling=pb.POOLING_AVG,
        init_image=b"encoded bytes",
        seed=7,
        style_scale=0.5,
        color_mode=pb.COLOR_MODE_HISTOGRAM,
        frame_every=5,
        tolerance=0.0,
        frame_format=pb.IMAGE_FORMAT_PNG,
        frame_max_size=100,
        output_format=pb.IMAGE_FORMAT_JPEG,
    )
    job = to_job_options(options)
    s = job.settings
    assert (s.max_size, s.min_size, s.iterations) == (300, 75, 42)
    assert (s.content_weight, s.style_weight, s.tv_weight) == (2.5, 7.0, 0.0)
    assert s.content_layers == (("relu3_2", 1.0),)
    assert s.style_layers == (("relu1_1", 0.5), ("relu2_1", 2.0))
    assert s.pooling is Pooling.AVG and s.init is Init.IMAGE  # an init image and no init: IMAGE
    assert (s.seed, s.style_scale, s.color_mode, s.frame_every) == (7, 0.5, ColorMode.HISTOGRAM, 5)
    assert s.tolerance == 0.0 != StylizeSettings().tolerance  # 0 (every iteration) is not "unset"
    assert (job.frame_encoding, job.frame_max_size, job.output_encoding) == (Encoding.PNG, 100, Encoding.JPEG)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (pb.StylizeOptions(preserve_colors=True), ColorMode.LUMINANCE),
        (pb.StylizeOptions(preserve_colors=False), ColorMode.STYLE),
        (pb.StylizeOptions(preserve_colors=True, color_mode=pb.COLOR_MODE_HISTOGRAM), ColorMode.HISTOGRAM),
    ],
)
def test_preserve_colors_maps_to_luminance_unless_color_mode_is_set(
    options: pb.StylizeOptions, expected: ColorMode
) -> None:
    assert to_job_options(options).settings.color_mode is expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (pb.StylizeOptions(max_size=0), "options.max_size must be between 16 and 4096, got 0"),
        (pb.StylizeOptions(max_size=5000), "options.max_size must be between 16 and 4096, got 5000"),
        (
            pb.StylizeOptions(max_size=64, min_size=128),
            "options.min_size must be between 16 and options.max_size (64)",
        ),
        (pb.StylizeOptions(iterations=0), "options.iterations must be between 1 and 100000, got 0"),
        (
            pb.StylizeOptions(content_weight=math.nan),
            "options.content_weight must be a finite number >= 0, got nan",
        ),
        (
            pb.StylizeOptions(style_weight=math.inf),
            "options.style_weight must be a finite number >= 0, got inf",
        ),
        (pb.StylizeOptions(tv_weight=-1), "options.tv_weight must be a finite number >= 0, got -1"),
        (
            pb.StylizeOptions(style_layers=[pb.LayerWeight(layer="relu1_1", weight=math.nan)]),
            "options.style_layers[0].weight must be a finite number >= 0",
        ),
        (
            pb.StylizeOptions(content_layers=[pb.LayerWeight(layer=" ")]),
            "options.content_layers[0].layer is empty",
        ),
        (
            pb.StylizeOptions(
                style_layers=[pb.LayerWeight(layer="relu1_1"), pb.LayerWeight(layer="relu1_1")]
            ),
            "options.style_layers lists layer 'relu1_1' twice",
        ),
        (pb.StylizeOptions(pooling=7), "options.pooling has an unknown value 7"),
        (pb.StylizeOptions(seed=-1), "options.seed must be between 0 and 9223372036854775807, got -1"),
        (pb.StylizeOptions(style_scale=0), "options.style_scale must be between 0.05 and 8.0, got 0"),
        (pb.StylizeOptions(style_scale=math.nan), "options.style_scale must be between"),
        (
            pb.StylizeOptions(max_size=1024, style_scale=8),
            "options.style_scale times options.max_size must be at most 4096 px, got 8.0 * 1024 = 8192",
        ),
        (pb.StylizeOptions(frame_max_size=8), "options.frame_max_size must be between 16 and 4096, got 8"),
        (
            pb.StylizeOptions(init=pb.INIT_IMAGE),
            "options.init_image is required when options.init is IMAGE",
        ),
        (pb.StylizeOptions(output_format=9), "options.output_format has an unknown value 9"),
        (pb.StylizeOptions(tolerance=-0.01), "options.tolerance must be at least 0 and below 1, got -0.01"),
        (pb.StylizeOptions(tolerance=1), "options.tolerance must be at least 0 and below 1, got 1"),
        (pb.StylizeOptions(tolerance=math.nan), "options.tolerance must be at least 0 and below 1"),
    ],
)
def test_invalid_options_name_the_field(options: pb.StylizeOptions, message: str) -> None:
    assert message in _refusal(options)


def _refusal(options: pb.StylizeOptions) -> str:
    """What the servicer answers: conversion, then the engine's validator in request field names."""
    with pytest.raises(InvalidOption) as caught:
        try:
            settings = to_job_options(options).settings
            validate(settings, LAYERS, style_weights=[1.0], has_init_image=bool(options.init_image))
        except InvalidSettings as err:
            raise invalid_option(err) from None
    assert str(caught.value).startswith(caught.value.field)
    return str(caught.value)


def test_init_image_with_another_init_is_refused() -> None:
    message = _refusal(pb.StylizeOptions(init=pb.INIT_NOISE, init_image=b"an image"))
    assert message.startswith("options.init_image is given but options.init is NOISE")


def test_engine_fields_map_to_request_fields() -> None:
    assert request_field("style_layers") == "options.style_layers"
    assert request_field("style_layers[2].weight") == "options.style_layers[2].weight"
    assert request_field("styles") == "styles"
    assert request_field("styles[1].blend_weight") == "styles[1].blend_weight"
    assert request_field("content") == "content_image"
    assert request_field("init_image") == "options.init_image"


def test_references_to_other_fields_are_rendered_in_request_names() -> None:
    error = InvalidSettings("min_size", "must be at most {max_size}, and {styles} too")
    assert str(invalid_option(error)) == "options.min_size must be at most options.max_size, and styles too"
    assert str(error) == "min_size must be at most max_size, and styles too"


def test_settings_compare_and_hash_whatever_form_their_layers_are_given_in() -> None:
    as_mapping = StylizeSettings(content_layers={"relu4_2": 1.0})
    assert as_mapping == StylizeSettings() and hash(as_mapping) == hash(StylizeSettings())
    assert StylizeSettings(style_layers={"relu1_1": 2.0}) != StylizeSettings()
