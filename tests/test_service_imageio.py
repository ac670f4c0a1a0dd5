"""Decoding untrusted image bytes and encoding results (stylize_service.server.imageio)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from stylize_service.server.imageio import (
    BadImage,
    Encoding,
    decode_image,
    encode_image,
)
from tests.fakes import encode, gradient

LIMIT = 1_000_000


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG announcing width x height whose pixel data is one compressed row: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", row) + _chunk(b"IEND", b"")


def test_rgb_png_round_trips_to_float_rgb() -> None:
    pixels = gradient(40, 30)
    decoded = decode_image(encode(pixels), LIMIT)
    assert decoded.dtype == np.float32 and decoded.shape == (30, 40, 3)
    np.testing.assert_allclose(decoded, pixels / 255.0, atol=1e-6)


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[0, 0, 3] = 0  # transparent
    rgba[1, 1, 3] = 255  # opaque
    rgba[2, 2, 3] = 128  # half
    decoded = decode_image(encode(rgba, mode="RGBA"), LIMIT)
    np.testing.assert_allclose(decoded[0, 0], [1, 1, 1])
    np.testing.assert_allclose(decoded[1, 1], [1, 0, 0])
    np.testing.assert_allclose(decoded[2, 2], [1, 127 / 255, 127 / 255], atol=0.01)


def test_palette_with_transparency_and_grey_alpha() -> None:
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=1)
    np.testing.assert_allclose(decode_image(buffer.getvalue(), LIMIT), np.ones((3, 3, 3)))

    la = Image.new("LA", (2, 2), (0, 0))  # black, fully transparent
    buffer = io.BytesIO()
    la.save(buffer, "PNG")
    np.testing.assert_allclose(decode_image(buffer.getvalue(), LIMIT), np.ones((2, 2, 3)))


def test_grey_and_cmyk_become_rgb() -> None:
    grey = decode_image(encode(np.full((5, 6), 51, np.uint8)), LIMIT)
    np.testing.assert_allclose(grey, np.full((5, 6, 3), 0.2), atol=1e-6)

    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(buffer, "JPEG")  # no ink = white
    cmyk = decode_image(buffer.getvalue(), LIMIT)
    assert cmyk.shape == (8, 8, 3) and cmyk.min() > 0.95


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], np.uint16)
    decoded = decode_image(encode(values), LIMIT)
    np.testing.assert_allclose(decoded[0, :, 0], [0.0, 0.5, 1.0], atol=1e-3)


def test_exif_orientation_is_applied() -> None:
    pixels = gradient(20, 10)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(pixels, "JPEG", exif=exif.tobytes())
    assert decode_image(data, LIMIT).shape == (20, 10, 3)  # portrait once oriented


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (b"definitely not an image", "not an image"),
        (encode(gradient(32, 32), "JPEG")[:200], "could not be decoded"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_bad_bytes_raise_bad_image(data: bytes, message: str) -> None:
    with pytest.raises(BadImage, match=message):
        decode_image(data, LIMIT)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The header announces 2000x1000 but no pixel data follows: only a header check can name the size.
    with pytest.raises(BadImage, match="2000x1000 = 2000000 pixels, more than the server's limit of 1000000"):
        decode_image(png_header_only(2000, 1000), LIMIT)


def test_decompression_bomb_is_refused() -> None:
    # Past Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) even when the server's limit is huge.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10
    with pytest.raises(BadImage, match=f"announces more than {Image.MAX_IMAGE_PIXELS} pixels in its header"):
        decode_image(png_header_only(side, side), max_pixels=10 * side * side)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_encode_formats_and_resize(encoding: Encoding) -> None:
    image = gradient(40, 20).astype(np.float32) / 255.0
    encoded = encode_image(image, encoding, size=(20, 10))
    assert (encoded.width, encoded.height) == (20, 10)
    assert encoded.mime_type == f"image/{encoding.pillow_format.lower()}"
    with Image.open(io.BytesIO(encoded.data)) as reopened:
        assert reopened.format == encoding.pillow_format and reopened.size == (20, 10)


def test_encode_png_is_lossless_and_tolerates_out_of_range() -> None:
    image = gradient(8, 8).astype(np.float32) / 255.0
    image[0, 0] = [np.nan, -1.0, 2.0]
    decoded = decode_image(encode_image(image, Encoding.PNG).data, LIMIT)
    np.testing.assert_allclose(decoded[0, 0], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(decoded[1:], image[1:], atol=1 / 255)


def test_scaled_size_keeps_aspect() -> None:
    from stylize_service.server.engine.resample import scaled_size

    assert scaled_size(48, 32, 64) == (64, 43)
    assert scaled_size(32, 48, 64) == (43, 64)
    assert scaled_size(1000, 1, 16) == (16, 1)


def test_max_side_shrinks_like_the_engine_and_never_enlarges() -> None:
    from stylize_service.server.engine.resample import resize_longest

    pixels = gradient(120, 80)
    full = decode_image(encode(pixels), LIMIT)
    shrunk = decode_image(encode(pixels), LIMIT, max_side=60)
    assert shrunk.shape == (40, 60, 3) and shrunk.dtype == np.float32
    np.testing.assert_array_equal(shrunk, resize_longest(full, 60))  # exactly what the engine would do
    assert decode_image(encode(pixels), LIMIT, max_side=500).shape == (80, 120, 3)
