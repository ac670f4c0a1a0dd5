"""The engine's vocabulary: what a stylization is asked to do and what it reports.

Nothing here knows of gRPC or of ONNX. Images cross this boundary as float32 RGB
arrays of shape (H, W, 3) with values in [0, 1]; the engine converts them to and
from the network's own input space (read from the model's metadata).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stylize_service.models.terms import LAYERED_TERMS, TERMS

from .lbfgs_workspace import MAXCOR

# A term's layers and their weights, in order. A tuple (not a dict) so that settings compare and hash, and
# so that a layer listed twice reaches the validator instead of vanishing in a dict.
Layers = tuple[tuple[str, float], ...]

DEFAULT_CONTENT_LAYERS: Layers = (("relu4_2", 1.0),)
DEFAULT_STYLE_LAYERS: Layers = (
    ("relu1_1", 1.0),
    ("relu2_1", 1.0),
    ("relu3_1", 1.0),
    ("relu4_1", 1.0),
    ("relu5_1", 1.0),
)


class Init(enum.Enum):
    """Where the optimisation starts."""

    NOISE = "noise"
    CONTENT = "content"
    IMAGE = "image"


class Pooling(enum.Enum):
    MAX = "max"
    AVG = "avg"


class ColorMode(enum.Enum):
    """How colour is treated (Gatys et al. 2016, "Preserving Color in Neural Artistic Style Transfer")."""

    STYLE = "style"  # the paper's default: the result takes the style image's colours
    LUMINANCE = "luminance"  # transfer on luminance only, keep the content's chrominance
    HISTOGRAM = "histogram"  # match the style image's colour statistics to the content's first


@dataclass(frozen=True)
class StyleSource:
    image: np.ndarray  # float32 (H, W, 3) RGB in [0, 1]
    blend_weight: float = 1.0
    # Where in the picture this style paints: float32 (H, W) in [0, 1] in the content's aspect ratio
    # (1 = paints, grey = softly); None = everywhere. docs/masks.md.
    mask: np.ndarray | None = None
    # Where in the style image its statistics are taken from: float32 (H, W) in [0, 1] in the style
    # image's aspect ratio; None = all of it.
    style_mask: np.ndarray | None = None


@dataclass(frozen=True)
class StylizeSettings:
    """Every knob of one stylization, with the documented defaults. Values are checked by
    engine.validation, not here, so that every rule has one owner."""

    max_size: int = 512  # longest side of the output, px
    # First stage's longest side; None = pyramid.default_min_size (single scale up to 512 px, from
    # max_size / 4 above); == max_size = single scale.
    min_size: int | None = None
    iterations: int = 500  # L-BFGS iterations in all (split over the stages)
    content_weight: float = 5.0
    style_weight: float = 100.0
    tv_weight: float = 1e-3
    # Mappings are accepted too and stored as Layers.
    content_layers: Layers = DEFAULT_CONTENT_LAYERS
    style_layers: Layers = DEFAULT_STYLE_LAYERS
    pooling: Pooling = Pooling.MAX
    init: Init = Init.CONTENT  # Init.IMAGE needs the init_image argument of Engine.stylize
    seed: int = 0
    style_scale: float = 1.0  # style images are scaled to max_size * style_scale
    color_mode: ColorMode = ColorMode.STYLE
    frame_every: int = 0  # 0 = no intermediate frames
    # Stop a stage once its loss improved by less than this fraction over the last
    # optimizer.CONVERGENCE_WINDOW iterations; 0 = run every iteration. The default is measured (README,
    # Time to an image).
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("content_layers", "style_layers"):
            layers = getattr(self, name)
            items = layers.items() if isinstance(layers, Mapping) else layers
            object.__setattr__(self, name, tuple((str(layer), float(weight)) for layer, weight in items))

    def term_weights(self) -> dict[str, float]:
        """Each loss term's overall weight, by models.terms name (each term names its setting)."""
        return {name: float(getattr(self, term.weight_setting)) for name, term in TERMS.items()}

    def term_layers(self) -> dict[str, Layers]:
        """Each layered term's layers and weights, by models.terms name."""
        return {name: getattr(self, TERMS[name].layers_setting) for name in LAYERED_TERMS}


@dataclass(frozen=True)
class Losses:
    """The loss and its terms (weights applied), by models.terms name; layered terms also by layer."""

    total: float
    terms: dict[str, float]
    per_layer: dict[str, dict[str, float]]  # term -> layer -> value


@dataclass(frozen=True)
class Progress:
    iteration: int  # global L-BFGS iteration, 0 = the initial image
    evaluations: int  # loss+gradient evaluations so far
    losses: Losses
    elapsed_seconds: float
    eta_seconds: float
    stage: int  # 0-based multiscale stage
    stages: int
    width: int  # size of the stage's image
    height: int
    # When the stage is evaluated in tiles (exactly, to bound memory): their size, px, and number; 0 = untiled.
    tile_size: int = 0
    tiles: int = 0
    # L-BFGS-B correction pairs kept in this stage: lbfgs_workspace.MAXCOR, fewer where memory is short.
    correction_pairs: int = MAXCOR
    # How long each loss+gradient evaluation since the previous Progress took, seconds (for metrics).
    # Evaluations that no accepted step follows (a line search that gave up) join the next Progress.
    evaluation_seconds: tuple[float, ...] = ()


@dataclass(frozen=True)
class StylizeResult:
    image: np.ndarray  # float32 (H, W, 3) RGB in [0, 1]
    iterations: int
    evaluations: int
    losses: Losses
    elapsed_seconds: float


class StylizeCancelled(Exception):
    """Raised by the engine when the observer asked it to stop."""


class StylizeObserver(Protocol):
    """The engine's only channel to the outside: a thin shell (gRPC, CLI, tests) implements it."""

    def on_progress(self, progress: Progress) -> None: ...

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        """image: float32 (H, W, 3) RGB in [0, 1]; called every frame_every iterations."""

    def should_stop(self) -> bool:
        """Polled before every evaluation; True makes the engine raise StylizeCancelled."""


class SilentObserver:
    """An observer for callers that want only the result (scripts, benchmarks): it ignores every report
    and never asks to stop."""

    def on_progress(self, progress: Progress) -> None:
        pass

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class InvalidSettings(ValueError):
    """A setting or input the engine cannot honour.

    `field` names it in the engine's vocabulary: a StylizeSettings field ("max_size", "style_layers[1].weight"),
    or an input of Engine.stylize ("content", "styles", "styles[0].blend_weight", "init_image"). `message`
    reads after the field's name and may name other fields as {field} placeholders, so that a shell (the
    gRPC servicer) can render every name in its own vocabulary with render()."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        return f"{name_of(self.field)} {_FIELD_REFERENCE.sub(lambda m: name_of(m.group(1)), self.message)}"


_FIELD_REFERENCE = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. "vgg16"
    weights_source: str  # where the weights came from, with their checksum
    layers: tuple[str, ...]  # addressable layers, relu1_1 ... relu5_3
    channel_order: str  # "RGB" or "BGR", the network's input channel order
    mean: tuple[float, float, float]  # subtracted after scaling, in the network's channel order
    std: tuple[float, float, float]
    input_scale: float  # pixel values in [0, 1] are multiplied by this first (255 for caffe-style weights)
    providers: tuple[str, ...]  # onnxruntime execution providers the sessions really use


@dataclass(frozen=True)
class GraphCacheStats:
    """The compiled-graph cache: its memory budget, what it holds (estimated) and what it gave up."""

    budget_bytes: int
    used_bytes: int  # estimated resident memory of the cached sessions
    entries: int  # layer choices compiled and kept
    evictions: int  # choices dropped to stay within the budget, since the start
