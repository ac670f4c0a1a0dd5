"""Colour control of Gatys, Bethge, Hertzmann, Shechtman 2016, "Preserving Color in Neural Artistic
Style Transfer" (arXiv 1606.05897).

Two ways to keep the content image's colours:

* colour histogram matching (ColorMode.HISTOGRAM): before the optimisation, the style image's pixels are
  moved by a linear map x' = A x + b so that their RGB mean and covariance equal the content's;
* luminance-only transfer (ColorMode.LUMINANCE): the optimisation sees luminance images only (the style
  luminance's mean and std matched to the content's), and afterwards the result's luminance is joined to
  the content's chrominance (I and Q of YIQ).

Images are float32 (H, W, 3) RGB in [0, 1]; statistics are computed in float64.
"""

from __future__ import annotations

import numpy as np

from .resample import resize
from .types import ColorMode

# NTSC YIQ (FCC 1953 coefficients). The inverse is the exact matrix inverse rather than the rounded
# published one, so that rgb -> yiq -> rgb is the identity to float precision.
_RGB_TO_YIQ = np.array(
    [
        [0.299, 0.587, 0.114],
        [0.5959, -0.2746, -0.3213],
        [0.2115, -0.5227, 0.3112],
    ],
    dtype=np.float64,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _check_rgb(image: np.ndarray, name: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB array, got shape {image.shape}")


def _pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H*W, 3) float64."""
    return image.reshape(-1, 3).astype(np.float64)


def _mean_cov(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3,) and population covariance (3, 3) of (N, 3) pixels."""
    mean = pixels.mean(axis=0)
    centred = pixels - mean
    return mean, centred.T @ centred / max(1, len(pixels))


def _sym_power(matrix: np.ndarray, power: float) -> np.ndarray:
    """matrix**power for a symmetric positive (semi-)definite matrix, via eigendecomposition.

    Eigenvalues are clamped at 0 first: rounding can make those of a singular covariance (a grey
    image) slightly negative, and a negative base would give NaN.
    """
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    values = np.maximum(values, 0.0)
    return (vectors * values**power) @ vectors.T


# --- colour histogram matching -------------------------------------------------------------------


def histogram_transform(
    style: np.ndarray, content: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """(A, b), float64 (3, 3) and (3,), with A = S_c^{1/2} (S_s + eps*I)^{-1/2} and b = mu_c - A mu_s.

    Applied to the style's pixels, x' = A x + b has the content's mean and (up to eps) covariance. The
    symmetric square root (the "image analogies" variant of the paper) is used rather than Cholesky:
    unlike a Cholesky factor, it does not depend on the order of the channels. eps must be > 0 for a
    grey or flat style image.
    """
    _check_rgb(style, "style")
    _check_rgb(content, "content")
    mu_s, cov_s = _mean_cov(_pixels(style))
    mu_c, cov_c = _mean_cov(_pixels(content))
    # Only S_s is inverted, so only it is regularised: eps*I keeps a grey or flat style image (singular
    # S_s) finite, its pixels having no spread along the null directions to amplify.
    a = _sym_power(cov_c, 0.5) @ _sym_power(cov_s + eps * np.eye(3), -0.5)
    b = mu_c - a @ mu_s
    return a, b


def match_color_histogram(style: np.ndarray, content: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The style image recoloured so that its RGB mean and covariance match the content's, clipped to [0, 1]."""
    a, b = histogram_transform(style, content, eps)
    out = _pixels(style) @ a.T + b
    return np.clip(out, 0.0, 1.0).reshape(style.shape).astype(np.float32)


# --- luminance-only transfer ---------------------------------------------------------------------


def rgb_to_yiq(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W, 3) YIQ, float32. Y is in [0, 1] for RGB in [0, 1]; I and Q are signed."""
    _check_rgb(image, "image")
    return (image.astype(np.float64) @ _RGB_TO_YIQ.T).astype(np.float32)


def yiq_to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) YIQ -> (H, W, 3) RGB, float32, not clipped (so the round trip is exact)."""
    _check_rgb(image, "image")
    return (image.astype(np.float64) @ _YIQ_TO_RGB.T).astype(np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) luminance Y of YIQ, float32."""
    _check_rgb(image, "image")
    return (image.astype(np.float64) @ _RGB_TO_YIQ[0]).astype(np.float32)


def _y_as_rgb(y: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(y, 0.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)


def match_luminance(style_y: np.ndarray, content_y: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Style luminance with the content luminance's mean and std: sd_c/sd_s (Y_s - mu_s) + mu_c, clipped to [0, 1].

    The paper does this so that the style's luminance histogram does not drag the result's brightness
    and contrast away from the content's. eps keeps a flat style (sd_s = 0) finite: it becomes mu_c.
    """
    ys = style_y.astype(np.float64)
    yc = content_y.astype(np.float64)
    mu_s, sd_s = ys.mean(), ys.std()
    mu_c, sd_c = yc.mean(), yc.std()
    out = (ys - mu_s) * (sd_c / np.sqrt(sd_s**2 + eps)) + mu_c
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def combine_luminance_with_chroma(stylized: np.ndarray, content: np.ndarray) -> np.ndarray:
    """RGB from the stylized image's Y and the content's I and Q, clipped to [0, 1]; same sizes required."""
    _check_rgb(stylized, "stylized")
    _check_rgb(content, "content")
    if stylized.shape != content.shape:
        raise ValueError(f"stylized {stylized.shape} and content {content.shape} differ in size")
    yiq = rgb_to_yiq(content)
    yiq[..., 0] = luminance(stylized)
    return np.clip(yiq_to_rgb(yiq), 0.0, 1.0).astype(np.float32)


# --- the engine's entry points -------------------------------------------------------------------


def prepare_inputs(
    mode: ColorMode, content: np.ndarray, styles: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The content and style images the optimisation should see under `mode`.

    STYLE: unchanged. HISTOGRAM: each style's colours matched to the content's. LUMINANCE: content and
    styles as luminance-as-RGB, each style's luminance matched in mean and std to the content's.
    The statistics do not depend on resolution, so this runs once on the full-size images.
    """
    _check_rgb(content, "content")
    for i, style in enumerate(styles):
        _check_rgb(style, f"styles[{i}]")
    if mode is ColorMode.STYLE:
        return content, list(styles)
    if mode is ColorMode.HISTOGRAM:
        return content, [match_color_histogram(style, content) for style in styles]
    if mode is ColorMode.LUMINANCE:
        content_y = luminance(content)
        return _y_as_rgb(content_y), [_y_as_rgb(match_luminance(luminance(s), content_y)) for s in styles]
    raise ValueError(f"unknown colour mode {mode!r}")


def finish_output(mode: ColorMode, stylized: np.ndarray, content: np.ndarray) -> np.ndarray:
    """The image to hand out: for LUMINANCE, the stylized luminance with the original content's chroma.

    `content` is the original colour content image; it is resized (bicubic) to the stylized image's size
    when they differ, as they do at the earlier stages of a multiscale run. Other modes: unchanged.
    """
    if mode is not ColorMode.LUMINANCE:
        return stylized
    _check_rgb(stylized, "stylized")
    _check_rgb(content, "content")
    height, width = stylized.shape[:2]
    return combine_luminance_with_chroma(stylized, resize(content, width, height))
