"""Masks to guides: what the guided style term (models.terms.GuidedStyleTerm) is fed for masked styles.

A request's styles fall into guides: each style with a mask is a guide of its own; the styles without
one share one more, which covers the whole picture and blends their targets as an unmasked job does.
For each stage and style layer (docs/masks.md):
- a mask (H, W, values in [0, 1] at the stage's size) is taken to the layer's grid by averaging 2x2
  blocks once per pooling layer before it, cropping an odd last row or column exactly as the network's
  pools do: a position's value is the share of its input block that the mask covers. Plain area
  resizing, not the eroded "inside" masks of Gatys et al. 2017: the mass of a region stays in proportion
  at every layer, so a narrow region keeps its statistics at the deep layers (erosion by a deep layer's
  receptive field, over a hundred pixels, would empty it), and a soft (grey) mask weighs softly;
- the guide map is T = sqrt(m * n / mass), n the layer's positions and mass the sum of m over them, so
  that the guided Gram (F T)(F T)ᵀ / (C n) is the mask-weighted mean of f fᵀ, normalised by the mask's
  mass; an all-white mask gives T = 1 and the plain Gram matrix;
- each guide's weight lambda_k (guide_weights) is its blend weight scaled by the share of the picture
  it covers, lambda_k = a_k w_k u / (sum_j a_j w_j), a the masks' mean values at the stage's size, u the
  mean of their union (the largest mask value at each pixel) and w the normalised blend weights (a
  shared guide's: the sum of its styles'). A guide's pull on one of its positions is lambda_k / mass_k,
  so: with equal blend weights every covered position is pulled as hard as in a job with one unmasked
  style, whatever the size of its region; where regions overlap their styles share that pull by their
  blend weights (identical masks give exactly an unmasked job's blend); one white mask has weight 1.
Positions that no mask covers have no style term: the content and total-variation terms alone keep them
close to the photograph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stylize_service.models.terms import GUIDE_WEIGHTS, guide_input
from stylize_service.models.vgg16 import POOLS_BEFORE


@dataclass(frozen=True)
class Guide:
    """One guide: the styles (indices into the request's) whose blended target it compares against, and
    its mask over the content, float32 (H, W) in [0, 1]; None = everywhere."""

    styles: tuple[int, ...]
    mask: np.ndarray | None


def guides_of(masks: Sequence[np.ndarray | None]) -> list[Guide]:
    """The guides of styles with these content masks (None = unmasked): one per masked style, in order,
    then one for all unmasked styles, if any."""
    guides = [Guide((index,), mask) for index, mask in enumerate(masks) if mask is not None]
    unmasked = tuple(index for index, mask in enumerate(masks) if mask is None)
    if unmasked:
        guides.append(Guide(unmasked, None))
    return guides


def guide_count(style_masks: Sequence[tuple[bool, bool]]) -> int:
    """How many guides the styles make, given whether each has a mask and a style mask: 0 (the plain
    style term) when none has either; else one per masked style and one for the unmasked ones, if any."""
    if not any(mask or style_mask for mask, style_mask in style_masks):
        return 0
    masked = sum(1 for mask, _ in style_masks if mask)
    return masked + (0 if masked == len(style_masks) else 1)


def layer_map(mask: np.ndarray, pools: int) -> np.ndarray:
    """A (H, W) mask at the grid after `pools` 2x2 pools: each position the mean of its 2x2 block, an odd
    last row or column dropped as the pools drop it. float64."""
    values = np.asarray(mask, np.float64)
    for _ in range(pools):
        height, width = values.shape[0] // 2, values.shape[1] // 2
        values = values[: 2 * height, : 2 * width].reshape(height, 2, width, 2).mean(axis=(1, 3))
    return values


def guide_map(mask: np.ndarray) -> np.ndarray:
    """T = sqrt(m n / mass) of a mask at a layer's grid (float64); all zero where the mask is empty."""
    mass = float(mask.sum())
    if mass <= 0.0:
        return np.zeros_like(mask)
    return np.sqrt(mask * (mask.size / mass))


def guide_maps(masks: Sequence[np.ndarray], layers: Sequence[str]) -> dict[str, np.ndarray]:
    """{guide_input(layer): (K, 1, h, w) float32} of K masks at an image's size, for each layer."""
    return {
        guide_input(layer): np.stack([guide_map(layer_map(mask, POOLS_BEFORE[layer])) for mask in masks])[
            :, None
        ].astype(np.float32)
        for layer in layers
    }


def ones_maps(height: int, width: int, layers: Sequence[str]) -> dict[str, np.ndarray]:
    """One all-ones guide per layer for an image of height x width (T = 1: the plain Gram matrix)."""
    return {
        guide_input(layer): np.ones(
            (1, 1, height // 2 ** POOLS_BEFORE[layer], width // 2 ** POOLS_BEFORE[layer]), np.float32
        )
        for layer in layers
    }


def guide_weights(masks: Sequence[np.ndarray], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """{GUIDE_WEIGHTS: lambda} for masks at the stage's size and the guides' normalised blend weights."""
    covered = np.array([float(np.mean(mask, dtype=np.float64)) for mask in masks], np.float64)
    union = float(np.mean(np.max(np.stack(masks), axis=0), dtype=np.float64))
    blend = np.asarray(weights, np.float64)
    pulled = float(np.sum(covered * blend))
    values = covered * blend * (union / pulled) if pulled > 0 else np.zeros_like(covered)
    return {GUIDE_WEIGHTS: values.astype(np.float32)}


def blend_guided(
    guides: Sequence[Guide], blend: np.ndarray, targets: Sequence[np.ndarray], maps: np.ndarray
) -> np.ndarray:
    """A layer's stacked guided target (K, C, C): each guide's blend-weighted mean of its styles' targets
    ((1, C, C) each, in the request's order), zero for a guide whose map is empty at this layer."""
    stacked = []
    for k, guide in enumerate(guides):
        weights = np.array([blend[index] for index in guide.styles], np.float64)
        if weights.sum() <= 0:
            weights = np.ones_like(weights)
        weights = weights / weights.sum()
        target = sum(
            np.float32(w) * targets[index][0] for w, index in zip(weights, guide.styles, strict=True)
        )
        stacked.append(np.asarray(target, np.float32) * np.float32(bool(np.any(maps[k]))))
    return np.stack(stacked).astype(np.float32)
