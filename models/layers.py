"""The choice of layers and pooling of one request: which VGG16 layers each layered loss term reads.

Pure data (no onnx), so that planning can reason about a choice without building its graphs;
models/graphs.py builds the graphs of a choice, and caches are keyed by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .terms import LAYERED_TERMS, LossTerm, term_of
from .vgg16 import POOLS_BEFORE, RELU_LAYERS

POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class LayerChoice:
    """The layers of each layered term and the pooling one request uses; the key its graphs are cached by.

    `layers` pairs every layered term (models.terms.LAYERED_TERMS, in that order) with its layers; a term
    may have none (it then contributes 0).

    `guides`: 0 for the plain style term; K > 0 for the guided style term with K guides (masked styles,
    docs/masks.md), whose graphs take the guides' maps and weights as inputs."""

    layers: tuple[tuple[str, tuple[str, ...]], ...]
    pooling: str = "max"
    guides: int = 0

    @classmethod
    def of(cls, layers: Mapping[str, Sequence[str]], pooling: str = "max", guides: int = 0) -> LayerChoice:
        unknown = set(layers) - set(LAYERED_TERMS)
        if unknown:
            raise ValueError(f"unknown layered term(s) {', '.join(sorted(unknown))}; known: {LAYERED_TERMS}")
        return cls(tuple((term, tuple(layers.get(term, ()))) for term in LAYERED_TERMS), pooling, guides)

    def __post_init__(self) -> None:
        if tuple(term for term, _ in self.layers) != LAYERED_TERMS:
            raise ValueError(f"layers must name the layered terms {LAYERED_TERMS} in order")
        for term, layers in self.layers:
            for layer in layers:
                if layer not in POOLS_BEFORE:
                    raise ValueError(f"unknown layer {layer!r}; known layers: {', '.join(RELU_LAYERS)}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{term} layers repeat: {', '.join(layers)}")
        if not self.used:
            raise ValueError("at least one layer is needed")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.guides < 0:
            raise ValueError(f"guides must be >= 0, got {self.guides}")

    def term(self, name: str) -> LossTerm:
        """The loss term `name` as this choice's graphs compute it (models.terms.term_of)."""
        return term_of(name, self.guides)

    def layers_of(self, term: str) -> tuple[str, ...]:
        return dict(self.layers)[term]

    @property
    def used(self) -> set[str]:
        return {layer for _, layers in self.layers for layer in layers}

    @property
    def deepest(self) -> str:
        return max(self.used, key=RELU_LAYERS.index)
