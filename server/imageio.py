"""Encoded image bytes <-> the engine's float32 (H, W, 3) RGB arrays in [0, 1], with Pillow.

Decoding is where untrusted bytes meet the server, so it refuses an image whose header announces more
pixels than the limit before any pixel is decoded, and turns every decoder failure into BadImage.
probe_image reads only the header, so that a request can be judged before it waits for a worker and
decoded (decode_image) only once it has one.
"""

from __future__ import annotations

import contextlib
import enum
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError, features

from stylize_service.server.engine.resample import shrink_longest


class BadImage(ValueError):
    """The bytes are not an image the server accepts; the message reads after the field's name."""


class Encoding(enum.Enum):
    """Output encodings: (Pillow format, MIME type)."""

    PNG = ("PNG", "image/png")
    JPEG = ("JPEG", "image/jpeg")
    WEBP = ("WEBP", "image/webp")

    @property
    def pillow_format(self) -> str:
        return self.value[0]

    @property
    def mime_type(self) -> str:
        return self.value[1]

    @property
    def available(self) -> bool:
        return self is not Encoding.WEBP or bool(features.check("webp"))  # None only for an unknown name


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime_type: str
    width: int
    height: int


QUALITY = 90  # JPEG and WebP
WHITE = 1.0  # transparent pixels are composited on white, what most viewers show
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def probe_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The (width, height) an image's header announces, checked against max_pixels, without decoding a
    pixel: cheap (it reads the header only) and bounded by the encoded bytes. The EXIF orientation is not
    applied, so width and height may be swapped; anything that depends only on the size up to a swap
    (the pixel count, the stages' short side) can be judged from it. Raises BadImage like decode_image."""
    with _reading(data, max_pixels) as image:
        return image.size


def decode_image(data: bytes, max_pixels: int, max_side: int | None = None) -> np.ndarray:
    """Encoded bytes -> float32 (H, W, 3) RGB in [0, 1], EXIF orientation applied, alpha on white.

    max_side: shrink (never enlarge) so that the longer side is at most this, with the engine's own
    resampling, so that a job waiting in the queue holds no more pixels than it will use.
    Raises BadImage (never anything else for bad input) for empty, undecodable or too large images.
    """
    with _reading(data, max_pixels) as image:
        image.load()
        _check_pixels(image.size, max_pixels)  # some formats pick their frame only on load
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    return rgb if max_side is None else shrink_longest(rgb, max_side)


def decode_mask(data: bytes, max_pixels: int, max_side: int | None = None) -> np.ndarray:
    """Encoded bytes of a mask -> float32 (H, W) in [0, 1]: decode_image's RGB as luma (ITU-R BT.601
    weights; transparency over white, so a transparent pixel paints). Raises BadImage like decode_image."""
    rgb = decode_image(data, max_pixels, max_side)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.ascontiguousarray(np.clip(luma, 0.0, 1.0), dtype=np.float32)


@contextlib.contextmanager
def _reading(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The opened image (header read, size checked); every failure inside, decoding included, becomes
    BadImage."""
    if not data:
        raise BadImage("is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The image-safety rule, the same on every path (the server, an embedded one, the tests) and
            # whatever the process's warning filters make of Pillow's own guard (which only warns below
            # twice its limit): Image.open reads only the header, and a decompression bomb is refused
            # here, against the server's limit, before a pixel is decoded.
            _check_pixels(image.size, max_pixels)
            yield image
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own global guard fires inside Image.open, before our check can see the size: its
        # header announces more than twice Pillow's limit.
        pillow_limit = pillow_pixel_limit()
        if max_pixels <= pillow_limit:
            raise BadImage(
                f"is larger than the server's limit of {max_pixels} pixels: its header announces more "
                f"than {pillow_limit}"
            ) from None
        raise BadImage(
            f"announces more than {pillow_limit} pixels in its header, more than the image decoder "
            "accepts (the server's own limit is higher; see allow_pixels)"
        ) from None
    except UnidentifiedImageError:
        raise BadImage("is not an image in a format the server reads (PNG, JPEG, WebP, GIF, ...)") from None
    except MemoryError:
        raise
    except Exception as err:
        if "MAX_TEXT_CHUNK" in str(err):  # Pillow's words for an iCCP, zTXt or iTXt chunk over its bound
            raise BadImage(
                "has an embedded chunk (an ICC colour profile or compressed text) larger than the "
                f"{PngImagePlugin.MAX_TEXT_CHUNK // 1024} KiB the decoder accepts"
            ) from None
        # Decoders of corrupt data raise all sorts (OSError, SyntaxError, struct.error, ...): all mean
        # "bad input", which must be answered, never crash the server.
        raise BadImage(f"could not be decoded ({type(err).__name__}: {err})") from None


def pillow_pixel_limit() -> int:
    """Pixels above which Pillow itself refuses an image (it warns above this, fails above twice this)."""
    return Image.MAX_IMAGE_PIXELS or 0


def allow_pixels(max_pixels: int) -> None:
    """Make Pillow's own guard no stricter than the server's limit, so that the limit GetInfo reports is
    the one in force (Pillow's default is about 89 million pixels). Only ever raises Pillow's limit."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadImage(f"has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"is {width}x{height} = {width * height} pixels, more than the server's limit of {max_pixels}"
        )


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Pillow's convert("RGB") would clip 16-bit values at 255; scale them instead.
        grey = np.asarray(image).astype(np.float32) / 65535.0
        return _grey_to_rgb(np.clip(grey, 0.0, 1.0))
    if mode == "F":
        return _grey_to_rgb(np.clip(np.nan_to_num(np.asarray(image, np.float32)), 0.0, 1.0))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), np.float32) / 255.0
        alpha = rgba[..., 3:]
        return np.ascontiguousarray(rgba[..., :3] * alpha + WHITE * (1.0 - alpha), dtype=np.float32)
    # P, 1, L, CMYK, YCbCr, LAB, HSV, RGB ...
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2), dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_image(image: np.ndarray, encoding: Encoding, size: tuple[int, int] | None = None) -> EncodedImage:
    """float32 (H, W, 3) RGB in [0, 1] -> encoded bytes, resized to size=(width, height) if given."""
    pil = Image.fromarray(to_uint8(image), mode="RGB")
    if size is not None and pil.size != size:
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if encoding is Encoding.PNG:
        pil.save(buffer, "PNG")
    else:
        pil.save(buffer, encoding.pillow_format, quality=QUALITY)
    return EncodedImage(buffer.getvalue(), encoding.mime_type, pil.width, pil.height)
