"""Resampling of float RGB images: the one place sizes are scaled and pixels resampled.

Bicubic, channel by channel in Pillow's 32-bit float mode, so there is no 8-bit rounding. The server's image
decoding (server.imageio), the engine's stages and the tests all use this module, so an image shrunk on
arrival is exactly what the engine would have made of it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def scaled_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is `longest`, keeping the aspect ratio."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrunk_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) as shrink_longest leaves it: scaled down to `longest`, never enlarged."""
    return size if max(size) <= longest else scaled_size(*size, longest)


def resize(image: np.ndarray, width: int, height: int, *, clip: bool = True) -> np.ndarray:
    """(H, W, 3) float32 -> (height, width, 3) float32, bicubic, clipped to [0, 1] (clip=False: for
    differences of images, which are signed)."""
    if image.shape[:2] == (height, width):
        return image.astype(np.float32, copy=False)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F").resize(
                (width, height), Image.Resampling.BICUBIC
            )
        )
        for c in range(image.shape[2])
    ]
    resized = np.stack(channels, axis=-1)
    return (np.clip(resized, 0.0, 1.0) if clip else resized).astype(np.float32)


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (H, W) mask in [0, 1] -> (height, width), as resize() does an image's channel."""
    return resize(mask[..., None], width, height)[..., 0]


def resize_longest(image: np.ndarray, longest: int) -> np.ndarray:
    """Resize so that the longer side is `longest` (up or down), keeping the aspect ratio."""
    height, width = image.shape[:2]
    return resize(image, *scaled_size(width, height, longest))


def shrink_longest(image: np.ndarray, longest: int) -> np.ndarray:
    """Like resize_longest, but never enlarges."""
    height, width = image.shape[:2]
    return image if max(width, height) <= longest else resize_longest(image, longest)
