"""Colour control (Gatys et al. 2016, "Preserving Color in Neural Artistic Style Transfer")."""

from __future__ import annotations

import numpy as np
import pytest

from stylize_service.server.engine import color
from stylize_service.server.engine.types import ColorMode


def _random_rgb(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    return rng.random((h, w, 3), dtype=np.float32)


def _correlated(
    rng: np.random.Generator, mean: list[float], mix: list[list[float]], n: int = 64
) -> np.ndarray:
    """A (n, n, 3) image of Gaussian pixels with a given mean and correlation, small enough not to clip."""
    z = rng.standard_normal((n * n, 3))
    pixels = z @ np.asarray(mix).T + np.asarray(mean)
    assert pixels.min() > 0.0 and pixels.max() < 1.0  # the test relies on no clipping
    return pixels.reshape(n, n, 3).astype(np.float32)


def _stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = image.reshape(-1, 3).astype(np.float64)
    return p.mean(axis=0), np.cov(p, rowvar=False, bias=True)


def test_yiq_round_trip() -> None:
    image = _random_rgb(np.random.default_rng(0))
    yiq = color.rgb_to_yiq(image)
    np.testing.assert_allclose(color.yiq_to_rgb(yiq), image, atol=1e-6)
    np.testing.assert_allclose(yiq[..., 0], color.luminance(image), atol=1e-7)
    # Grey has no chroma, and white has Y = 1.
    grey = np.full((2, 2, 3), 0.4, np.float32)
    np.testing.assert_allclose(color.rgb_to_yiq(grey)[..., 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(color.luminance(np.ones((1, 1, 3), np.float32)), 1.0, atol=1e-6)


def test_histogram_matching_gives_content_mean_and_covariance() -> None:
    rng = np.random.default_rng(1)
    # Photo-like spreads (std ~0.1), with 4096 pixels still far enough from 0 and 1 not to clip.
    content = _correlated(rng, [0.55, 0.5, 0.45], [[0.08, 0.02, 0.0], [0.03, 0.07, 0.0], [0.0, 0.02, 0.06]])
    style = _correlated(rng, [0.4, 0.5, 0.6], [[0.05, 0.0, 0.03], [0.0, 0.09, -0.01], [0.01, 0.02, 0.07]])
    a, b = color.histogram_transform(style, content)
    unclipped = style.reshape(-1, 3).astype(np.float64) @ a.T + b
    assert unclipped.min() > 0.0 and unclipped.max() < 1.0  # so clipping changes nothing below

    matched = color.match_color_histogram(style, content)
    assert matched.shape == style.shape and matched.dtype == np.float32
    mu_m, cov_m = _stats(matched)
    mu_c, cov_c = _stats(content)
    scale = np.abs(cov_c).max()
    np.testing.assert_allclose(mu_m, mu_c, atol=1e-5)
    # The default eps shrinks the result's variance along each eigenvector of S_s by a factor
    # lambda / (lambda + eps): under 1 % here, a few 1e-5 absolute.
    np.testing.assert_allclose(cov_m, cov_c, atol=1e-4)
    np.testing.assert_allclose(cov_m, cov_c, atol=1e-2 * scale)

    # Without regularisation, A S_s A^T = S_c exactly, and A is S_c^(1/2) S_s^(-1/2), not Cholesky.
    a0, b0 = color.histogram_transform(style, content, eps=0.0)
    _, cov_s = _stats(style)
    np.testing.assert_allclose(a0 @ cov_s @ a0.T, cov_c, atol=1e-9 * scale)
    vals_c, vecs_c = np.linalg.eigh(cov_c)
    vals_s, vecs_s = np.linalg.eigh(cov_s)
    expected = (vecs_c * np.sqrt(vals_c)) @ vecs_c.T @ (vecs_s / np.sqrt(vals_s)) @ vecs_s.T
    np.testing.assert_allclose(a0, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b0, mu_c - a0 @ _stats(style)[0], atol=1e-9)


def test_histogram_matching_to_itself_is_identity() -> None:
    image = _correlated(
        np.random.default_rng(2), [0.5, 0.5, 0.5], [[0.05, 0.01, 0], [0, 0.04, 0.01], [0, 0, 0.06]]
    )
    np.testing.assert_allclose(color.match_color_histogram(image, image), image, atol=2e-3)


def test_luminance_only_output_keeps_content_chroma_and_stylized_luminance() -> None:
    rng = np.random.default_rng(3)
    # Mid-range values so that the recombined RGB does not clip.
    content = (0.3 + 0.4 * _random_rgb(rng)).astype(np.float32)
    stylized = (0.35 + 0.3 * _random_rgb(rng)).astype(np.float32)
    out = color.combine_luminance_with_chroma(stylized, content)
    assert out.min() > 0.0 and out.max() < 1.0
    yiq_out, yiq_content = color.rgb_to_yiq(out), color.rgb_to_yiq(content)
    np.testing.assert_allclose(yiq_out[..., 0], color.luminance(stylized), atol=1e-5)
    np.testing.assert_allclose(yiq_out[..., 1:], yiq_content[..., 1:], atol=1e-5)


def test_match_luminance_gives_content_mean_and_std() -> None:
    rng = np.random.default_rng(4)
    content_y = (0.3 + 0.4 * rng.random((40, 30))).astype(np.float32)
    style_y = (0.45 + 0.1 * rng.random((20, 50))).astype(np.float32)
    matched = color.match_luminance(style_y, content_y)
    assert matched.shape == style_y.shape
    assert matched.mean() == pytest.approx(content_y.mean(), abs=1e-4)
    assert matched.std() == pytest.approx(content_y.std(), rel=1e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: np.full((8, 8, 3), 0.5, np.float32),  # constant
        lambda rng: np.zeros((8, 8, 3), np.float32),  # black
        lambda rng: np.repeat(rng.random((8, 8, 1), dtype=np.float32), 3, axis=-1),  # grey
    ],
    ids=["constant", "black", "grey"],
)
def test_degenerate_images_give_finite_output(make) -> None:
    rng = np.random.default_rng(5)
    degenerate, colourful = make(rng), _random_rgb(rng, 8, 8)
    for style, content in [(degenerate, colourful), (colourful, degenerate), (degenerate, degenerate)]:
        matched = color.match_color_histogram(style, content)
        assert np.isfinite(matched).all() and matched.min() >= 0.0 and matched.max() <= 1.0
        y = color.match_luminance(color.luminance(style), color.luminance(content))
        assert np.isfinite(y).all()
        for mode in ColorMode:
            net_content, net_styles = color.prepare_inputs(mode, content, [style])
            assert np.isfinite(net_content).all() and all(np.isfinite(s).all() for s in net_styles)
            out = color.finish_output(mode, net_content, content)
            assert np.isfinite(out).all()
    # A constant style matched to a colourful content becomes the content's mean colour.
    if np.ptp(degenerate) == 0:
        matched = color.match_color_histogram(degenerate, colourful)
        np.testing.assert_allclose(
            matched, np.broadcast_to(colourful.mean(axis=(0, 1)), matched.shape), atol=1e-4
        )


def test_prepare_and_finish_style_mode_is_identity() -> None:
    rng = np.random.default_rng(6)
    content, styles = _random_rgb(rng), [_random_rgb(rng, 10, 12), _random_rgb(rng, 16, 16)]
    net_content, net_styles = color.prepare_inputs(ColorMode.STYLE, content, styles)
    assert net_content is content and len(net_styles) == 2
    assert all(a is b for a, b in zip(net_styles, styles, strict=True))
    stylized = _random_rgb(rng, 12, 16)
    assert color.finish_output(ColorMode.STYLE, stylized, content) is stylized


def test_prepare_and_finish_histogram_mode() -> None:
    rng = np.random.default_rng(7)
    content = _random_rgb(rng)
    styles = [(0.2 * _random_rgb(rng, 10, 12)).astype(np.float32), _random_rgb(rng, 16, 16)[..., ::-1]]
    net_content, net_styles = color.prepare_inputs(ColorMode.HISTOGRAM, content, styles)
    np.testing.assert_array_equal(net_content, content)
    for style, net_style in zip(styles, net_styles, strict=True):
        assert net_style.shape == style.shape and net_style.dtype == np.float32
        np.testing.assert_allclose(net_style, color.match_color_histogram(style, content))
        np.testing.assert_allclose(_stats(net_style)[0], _stats(content)[0], atol=0.02)
    stylized = _random_rgb(rng, 12, 16)
    assert color.finish_output(ColorMode.HISTOGRAM, stylized, content) is stylized


def test_prepare_and_finish_luminance_mode() -> None:
    rng = np.random.default_rng(8)
    content = (0.25 + 0.5 * _random_rgb(rng)).astype(np.float32)
    styles = [(0.1 + 0.2 * _random_rgb(rng, 10, 12)).astype(np.float32)]
    net_content, net_styles = color.prepare_inputs(ColorMode.LUMINANCE, content, styles)
    # The network sees grey images: R = G = B = Y.
    for image in [net_content, *net_styles]:
        assert image.dtype == np.float32 and image.shape[2] == 3
        np.testing.assert_array_equal(image[..., 0], image[..., 1])
        np.testing.assert_array_equal(image[..., 0], image[..., 2])
    np.testing.assert_allclose(net_content[..., 0], color.luminance(content), atol=1e-6)
    content_y = color.luminance(content)
    assert net_styles[0][..., 0].mean() == pytest.approx(content_y.mean(), abs=1e-3)
    assert net_styles[0][..., 0].std() == pytest.approx(content_y.std(), rel=1e-2)

    # Same size: the output carries the stylized luminance and the content's chroma.
    stylized = np.repeat((0.4 + 0.2 * rng.random((24, 32, 1))).astype(np.float32), 3, axis=-1)
    out = color.finish_output(ColorMode.LUMINANCE, stylized, content)
    assert out.shape == content.shape and out.dtype == np.float32
    np.testing.assert_allclose(color.luminance(out), stylized[..., 0], atol=1e-5)
    np.testing.assert_allclose(color.rgb_to_yiq(out)[..., 1:], color.rgb_to_yiq(content)[..., 1:], atol=1e-5)

    # A smaller stylized image (an early multiscale stage): the content is resized to it.
    small = stylized[:12, :16]
    out_small = color.finish_output(ColorMode.LUMINANCE, small, content)
    assert out_small.shape == (12, 16, 3)
    assert np.isfinite(out_small).all() and out_small.min() >= 0.0 and out_small.max() <= 1.0
    np.testing.assert_allclose(color.luminance(out_small), small[..., 0], atol=1e-2)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError):
        color.match_color_histogram(np.zeros((4, 4)), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError):
        color.combine_luminance_with_chroma(np.zeros((4, 4, 3)), np.zeros((5, 4, 3)))
