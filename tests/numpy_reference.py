"""An independent float64 numpy implementation of the VGG features and the Gatys loss, for tests.

It shares nothing with the ONNX graph builders but the formulas of the loss convention.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stylize_service.models.vgg16 import BLOCK_ENDS, CONVS, VGGWeights


def conv3x3(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (C, H, W), kernel (O, C, 3, 3): same-padded stride-1 cross-correlation."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (C, H, W, 3, 3)
    return np.einsum("chwij,ocij->ohw", windows, kernel, optimize=True) + bias[:, None, None]


def pool2x2(x: np.ndarray, mode: str) -> np.ndarray:
    c, h, w = x.shape
    blocks = x[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2)
    return blocks.max(axis=(2, 4)) if mode == "max" else blocks.mean(axis=(2, 4))


def features(weights: VGGWeights, image: np.ndarray, layers: set[str], pooling: str) -> dict[str, np.ndarray]:
    """image (3, H, W) in network space -> {relu layer: (C, h, w)} for the requested layers."""
    out: dict[str, np.ndarray] = {}
    x = image.astype(np.float64)
    for spec in CONVS:
        if not layers - out.keys():
            break
        x = np.maximum(
            conv3x3(x, weights.kernels[spec.name].astype(np.float64), weights.biases[spec.name]), 0
        )
        if spec.relu in layers:
            out[spec.relu] = x
        if spec.name in BLOCK_ENDS:
            x = pool2x2(x, pooling)
    return out


def gram(f: np.ndarray) -> np.ndarray:
    flat = f.reshape(f.shape[0], -1)
    return flat @ flat.T / f.size


def tv(x: np.ndarray) -> float:
    corner = x[:, :-1, :-1]
    return 0.5 * float(np.sum((corner - x[:, :-1, 1:]) ** 2 + (corner - x[:, 1:, :-1]) ** 2))


def loss_terms(
    weights: VGGWeights,
    image: np.ndarray,
    content_targets: dict[str, np.ndarray],
    gram_targets: dict[str, np.ndarray],
    content_layers: dict[str, float],
    style_layers: dict[str, float],
    content_weight: float,
    style_weight: float,
    tv_weight: float,
    pooling: str,
) -> dict[str, float]:
    feats = features(weights, image, set(content_layers) | set(style_layers), pooling)
    content = sum(
        content_weight * w * float(np.mean((feats[layer] - content_targets[layer]) ** 2))
        for layer, w in content_layers.items()
    )
    style = sum(
        style_weight * w * float(np.mean((gram(feats[layer]) - gram_targets[layer]) ** 2))
        for layer, w in style_layers.items()
    )
    tv_term = tv_weight * tv(image.astype(np.float64))
    return {"loss": content + style + tv_term, "content": content, "style": style, "tv": tv_term}
