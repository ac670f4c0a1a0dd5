"""One interface for a stage's targets and loss, with two implementations: the whole image at once
(WholeImageEvaluator, here) and exact tiles (tiling.TiledEvaluator). The engine computes targets, blends
the style images' and evaluates through it alone, whichever runs; models.terms says which terms take
their targets from the content (region-separable ones) and which from the style images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from stylize_service.models.layers import LayerChoice
from stylize_service.models.terms import TERMS

from .network import CompiledChoice, Evaluation, Targets

TermTargets = dict[str, dict[str, np.ndarray]]  # term -> layer -> target


class StageEvaluator(Protocol):
    def separable_targets(self, content: np.ndarray) -> TermTargets:
        """The region-separable layered terms' targets (content: feature maps) of a network input."""
        ...

    def statistic_targets(
        self, image: np.ndarray, guides: dict[str, np.ndarray] | None = None
    ) -> TermTargets:
        """The other layered terms' targets (style: Gram matrices) of one network input; guides: for a
        guided choice, the image's guide maps (its style mask), None = all ones."""
        ...

    def evaluator(
        self, targets: Targets, weights: dict[str, float], layer_weights: dict[str, dict[str, float]]
    ) -> Callable[[np.ndarray], Evaluation]:
        """The stage's loss function of the network input x (1, 3, H, W)."""
        ...


def blend_targets(
    choice: LayerChoice, separable: TermTargets, styles: Iterable[tuple[float, TermTargets]]
) -> Targets:
    """A stage's targets: the region-separable terms' as given (from the content), every other layered
    term's the sum of weight x target over the styles' statistic targets, in the styles' order. `styles`
    may be a generator: each style's pass then runs only when its turn comes."""
    by_term = dict(separable)
    for name, _ in choice.layers:
        if not TERMS[name].region_separable:
            by_term[name] = {}
    for weight, one in styles:
        for name, layers in one.items():
            for layer, target in layers.items():
                by_term[name][layer] = by_term[name].get(layer, 0) + np.float32(weight) * target
    return Targets(by_term)


class WholeImageEvaluator:
    """A stage evaluated on the whole image at once, through one choice's compiled graphs."""

    def __init__(self, compiled: CompiledChoice) -> None:
        self._compiled = compiled

    def _targets(
        self, image: np.ndarray, separable: bool, guides: dict[str, np.ndarray] | None = None
    ) -> TermTargets:
        by_term = self._compiled.targets(image, guides).by_term
        return {name: by_term[name] for name in by_term if TERMS[name].region_separable == separable}

    def separable_targets(self, content: np.ndarray) -> TermTargets:
        return self._targets(content, separable=True)

    def statistic_targets(
        self, image: np.ndarray, guides: dict[str, np.ndarray] | None = None
    ) -> TermTargets:
        return self._targets(image, separable=False, guides=guides)

    def evaluator(
        self, targets: Targets, weights: dict[str, float], layer_weights: dict[str, dict[str, float]]
    ) -> Callable[[np.ndarray], Evaluation]:
        feeds = self._compiled.feeds(targets, weights, layer_weights)
        return functools.partial(self._compiled.evaluate, feeds=feeds)
