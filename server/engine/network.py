"""The ONNX side of the engine: the exported feature network, its preprocessing, and onnxruntime sessions
for the targets and loss graphs of each layer choice (generated on first use, then cached).

The cache is bounded by memory, not by a count: a choice's sessions hold the convolution weights up to
its deepest layer (the loss graph twice: forward and backward), from a few MB (relu2_1) to about 650 MB
(relu5_3). Each entry's size is estimated from its graphs' initializer bytes (`estimated_session_bytes`),
and the least recently used choices are dropped beyond the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import onnx
import onnxruntime as ort

from stylize_service.models import export, graphs
from stylize_service.models.layers import LayerChoice
from stylize_service.models.segments import Segment
from stylize_service.models.terms import GUIDE_WEIGHTS, TERMS

from .guides import ones_maps
from .providers import CPU, CUDA, ProviderSpec, load_cuda_libraries, provider_name
from .types import GraphCacheStats, ModelInfo

GRAPH_CACHE_BYTES = 1 << 30  # default budget: the default choice (about 0.5 GB) and one or two others
# A compiled pair of sessions holds its initializers several times over (onnxruntime's own copy, and
# pre-packed convolution weights). Measured with `scripts/measure_bounds.py cache` on the bundled VGG16,
# each choice in a fresh process, after a compile and one 32 px evaluation: resident memory grew by 3.0x
# to 3.9x the graphs' initializer bytes (relu5_3: 689 MB for 177 MB of weights), and by 16 MB for the
# smallest choice (1.4 MB of weights). The estimate, 4x plus 16 MB, covers every measured choice.
SESSION_BYTES_PER_INITIALIZER_BYTE = 4
SESSION_OVERHEAD_BYTES = 16 << 20


def initializer_bytes(model: onnx.ModelProto) -> int:
    """The bytes of a graph's constant tensors (its weights), from their shapes; nothing is copied."""
    total = 0
    for tensor in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def estimated_session_bytes(*models: onnx.ModelProto) -> int:
    """Resident memory of onnxruntime sessions of these graphs, as measured (see the constants above).
    Not included: the arena of intermediate tensors, which grows with the images a session runs."""
    return SESSION_OVERHEAD_BYTES + SESSION_BYTES_PER_INITIALIZER_BYTE * sum(map(initializer_bytes, models))


@dataclass(frozen=True)
class Targets:
    """What the loss graph compares against: each layered term's targets by layer (content features,
    blended style Grams); with guides (masked styles), the terms' spatial inputs as whole maps by input
    name (LossTerm.spatial_inputs: the guides at each layer) and their vector inputs (the guides'
    weights)."""

    by_term: dict[str, dict[str, np.ndarray]]
    spatial: dict[str, np.ndarray] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """One run of the loss graph: the loss, each term (weights applied), per-layer values, and dL/dx."""

    loss: float
    terms: dict[str, float]
    per_layer: dict[str, dict[str, float]]  # layered term -> layer -> value
    grad: np.ndarray  # float32, shaped like the image


SHRINK_IMAGE_SIDE = 32  # px: deep enough for relu5_x (four pools), tiny enough to cost nothing


def _shrink_options(providers: tuple[str, ...]) -> ort.RunOptions:
    """Run options that shrink the arenas of the sessions' devices: the CPU's, and the card's where the
    sessions run on CUDA (naming a device a session has no arena on fails the run)."""
    options = ort.RunOptions()
    devices = "cpu:0;gpu:0" if CUDA in providers else "cpu:0"
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", devices)
    return options


# onnxruntime's default (128 MB) hands a 96 MB request a whole free 192 MB chunk; an evaluation's tensors
# come in a few large sizes, so at 1024x768 the arena grew 300 MB beyond what was live (a one-off probe of
# one evaluation after a targets pass: 2162 MB at its peak, 1865 MB with 1 MB). 0 crashes onnxruntime 1.32.
ARENA_MAX_DEAD_BYTES = 1 << 20
_ARENA_LOCK = threading.Lock()
_arena_registered = False


def _register_shared_cpu_arena() -> None:
    """One CPU arena for every session of the process, extended by exactly what is requested
    (kSameAsRequested), so that arena shrinkage can return whole regions; registered once."""
    global _arena_registered
    with _ARENA_LOCK:
        if _arena_registered:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0 = no cap, extend strategy 1 = kSameAsRequested, initial chunk default (-1), and free
        # chunks split for any request that would leave more than ARENA_MAX_DEAD_BYTES of them unused.
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 1, -1, ARENA_MAX_DEAD_BYTES))
        _arena_registered = True


def _trim_heap() -> None:
    """glibc keeps freed memory in its heap; malloc_trim returns it. Elsewhere this is a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class CompiledChoice:
    """The two onnxruntime sessions of one LayerChoice."""

    def __init__(
        self,
        choice: LayerChoice,
        targets: ort.InferenceSession,
        loss: ort.InferenceSession,
        shrink: ort.RunOptions,
        nbytes: int = 0,
    ) -> None:
        """shrink: run options that shrink the arenas (_shrink_options); targets passes and
        shrink_arenas run with them."""
        self.choice = choice
        self.nbytes = nbytes  # estimated resident memory of the two sessions
        self._targets = targets
        self._loss = loss
        self._shrink = shrink
        self._target_outputs = [o.name for o in targets.get_outputs()]
        self._loss_outputs = [o.name for o in loss.get_outputs()]

    def targets(self, image: np.ndarray, guides: dict[str, np.ndarray] | None = None) -> Targets:
        """Every layered term's targets computed from one image (content image or style image); for a
        guided choice, guides are the image's guide maps by input name (a style image's style mask,
        guides.guide_maps), None = all ones, the plain Gram matrices.

        The pass ends by shrinking the arenas: its tensors are freed then, and left in the arena they
        would be carved up by the evaluations' differently sized ones (at 1024x768 one evaluation after a
        targets pass peaked at 1865 MB with them kept, 1661 MB without: scripts/benchmark_memory.py
        --child evaluation 1024 ours)."""
        return self._run_targets(image, self._shrink, guides)

    def _run_targets(
        self, image: np.ndarray, run_options: ort.RunOptions, guides: dict[str, np.ndarray] | None = None
    ) -> Targets:
        feeds = {export.INPUT_NAME: image}
        if self.choice.guides:
            style_layers = self.choice.layers_of("style")
            feeds.update(guides or ones_maps(image.shape[-2], image.shape[-1], style_layers))
        outputs = dict(zip(self._target_outputs, self._targets.run(None, feeds, run_options), strict=True))
        return Targets(
            {
                term: {layer: outputs[graphs.target_input(term, layer)] for layer in layers}
                for term, layers in self.choice.layers
            }
        )

    def evaluate(self, image: np.ndarray, feeds: dict[str, np.ndarray]) -> Evaluation:
        out = dict(
            zip(self._loss_outputs, self._loss.run(None, {**feeds, export.INPUT_NAME: image}), strict=True)
        )
        return Evaluation(
            loss=float(out[graphs.LOSS]),
            terms={term: float(out[graphs.term_output(term)]) for term in TERMS},
            per_layer={
                term: {
                    layer: float(value)
                    for layer, value in zip(layers, out[graphs.layer_losses_output(term)], strict=True)
                }
                for term, layers in self.choice.layers
            },
            grad=out[graphs.GRAD],
        )

    def shrink_arenas(self) -> None:
        """Run both sessions once on a tiny image with arena shrinkage, so that their memory arenas give
        back what the last large image made them hold (onnxruntime shrinks only at the end of a run)."""
        tiny = np.zeros((1, 3, SHRINK_IMAGE_SIDE, SHRINK_IMAGE_SIDE), np.float32)
        targets = self._run_targets(tiny, self._shrink)
        if self.choice.guides:
            targets = _tiny_guided(targets, self.choice)
        ones = {term: 1.0 for term in TERMS}
        layer_ones = {term: dict.fromkeys(layers, 1.0) for term, layers in self.choice.layers}
        self._loss.run(None, {**self.feeds(targets, ones, layer_ones), export.INPUT_NAME: tiny}, self._shrink)

    def feeds(
        self, targets: Targets, weights: dict[str, float], layer_weights: dict[str, dict[str, float]]
    ) -> dict[str, np.ndarray]:
        """The loss graph's inputs other than the image, fixed for one optimisation stage.

        weights: every term's overall weight; layer_weights: each layered term's weight per layer of
        the choice."""
        feeds = {graphs.term_weight(term): np.asarray(weights[term], np.float32) for term in TERMS}
        for term, layers in self.choice.layers:
            feeds[graphs.layer_weights(term)] = np.asarray(
                [layer_weights[term][layer] for layer in layers], np.float32
            )
            for layer in layers:
                feeds[graphs.target_input(term, layer)] = targets.by_term[term][layer]
        feeds.update(targets.spatial)
        feeds.update(targets.vectors)
        return feeds


def _tiny_guided(targets: Targets, choice: LayerChoice) -> Targets:
    """The targets of shrink_arenas' tiny run for a guided choice: each style target repeated for every
    guide, all-ones guides and weights."""
    k = choice.guides
    layers = choice.layers_of("style")
    side = SHRINK_IMAGE_SIDE
    spatial = {name: np.repeat(value, k, axis=0) for name, value in ones_maps(side, side, layers).items()}
    by_term = dict(targets.by_term)
    by_term["style"] = {layer: np.repeat(target, k, axis=0) for layer, target in by_term["style"].items()}
    return Targets(by_term, spatial, {GUIDE_WEIGHTS: np.ones(k, np.float32)})


class TileSessions:
    """The onnxruntime sessions of one LayerChoice's tiled evaluation (server.engine.tiling), built when
    first asked for (or by prepare): a statistics and a loss session per tiled segment, a targets and a
    loss session per untiled tail. Not cached beyond the job that holds them."""

    def __init__(
        self,
        choice: LayerChoice,
        features: onnx.ModelProto,
        build: Callable[[onnx.ModelProto], ort.InferenceSession],
        shrink: ort.RunOptions | None = None,
    ) -> None:
        """shrink: run options that shrink the arenas (_shrink_options), for the runs that end a step
        (`last=True`)."""
        self.choice = choice
        self._features = features
        self._build = build
        self._shrink = shrink
        self._sessions: dict[tuple[str, int, int], ort.InferenceSession] = {}

    def _session(self, kind: str, first: int, last: int = 0) -> ort.InferenceSession:
        key = (kind, first, last)
        if key not in self._sessions:
            builders = {
                "statistics": lambda: graphs.build_segment_statistics_model(
                    self._features, self.choice, first, last
                ),
                "loss": lambda: graphs.build_segment_loss_model(self._features, self.choice, first, last),
                "tail_targets": lambda: graphs.build_tail_targets_model(self._features, self.choice, first),
                "tail_loss": lambda: graphs.build_tail_loss_model(self._features, self.choice, first),
            }
            self._sessions[key] = self._build(builders[kind]())
            _trim_heap()  # as after compiling a choice
        return self._sessions[key]

    def prepare(self, segments: Sequence[Segment], tail: int | None, *, backward: bool) -> None:
        """Build the sessions that tiles of these segments and this tail need, now: forward passes only
        (targets), or evaluations too (backward)."""
        for seg in segments:
            self._session("statistics", seg.first, seg.last)
            if backward:
                self._session("loss", seg.first, seg.last)
        if tail is not None:
            self._session("tail_targets", tail)
            if backward:
                self._session("tail_loss", tail)

    # A targets pass's steps (a segment's tiles, the tail) end with `last=True`: the arena is shrunk then,
    # so that the next step's tensors, of other shapes, do not come on top of the chunks this one left
    # free (a targets pass through three steps peaked at their sum, not their largest). Evaluations run
    # without: the allocations after each shrink cost them time.

    def statistics(
        self,
        seg: Segment,
        tile: np.ndarray,
        masks: dict[str, np.ndarray],
        outputs: list[str],
        *,
        last: bool = False,
    ) -> dict[str, np.ndarray]:
        session = self._session("statistics", seg.first, seg.last)
        names = {i.name for i in session.get_inputs()}
        feeds = {name: value for name, value in masks.items() if name in names}
        feeds[graphs.segment_input(seg)] = tile
        return dict(zip(outputs, session.run(outputs, feeds, self._options(last)), strict=True))

    def loss(
        self, seg: Segment, tile: np.ndarray, feeds: dict[str, np.ndarray], *, last: bool = False
    ) -> dict[str, np.ndarray]:
        session = self._session("loss", seg.first, seg.last)
        return self._run(session, graphs.segment_input(seg), tile, feeds, self._options(last))

    def tail_targets(
        self, first: int, image: np.ndarray, feeds: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        session = self._session("tail_targets", first)
        return self._run(session, session.get_inputs()[0].name, image, feeds or {}, self._options(True))

    def tail_loss(self, first: int, image: np.ndarray, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session("tail_loss", first)
        return self._run(session, session.get_inputs()[0].name, image, feeds, None)

    def _options(self, last: bool) -> ort.RunOptions | None:
        return self._shrink if last else None

    @staticmethod
    def _run(
        session: ort.InferenceSession,
        input_name: str,
        image: np.ndarray,
        feeds: dict[str, np.ndarray],
        options: ort.RunOptions | None,
    ) -> dict[str, np.ndarray]:
        names = {i.name for i in session.get_inputs()}
        used = {name: value for name, value in feeds.items() if name in names}
        used[input_name] = image
        outputs = session.run(None, used, options)
        return dict(zip((o.name for o in session.get_outputs()), outputs, strict=True))


class FeatureNetwork:
    """Loads the exported VGG16 feature network and compiles graphs for layer choices on demand."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: list[ProviderSpec] | None = None,
        intra_op_threads: int | None = None,
        cache_bytes: int = GRAPH_CACHE_BYTES,
    ) -> None:
        """providers: onnxruntime's provider list, names or (name, options), most preferred first
        (server.engine.providers.execution_providers); default the CPU. Those this onnxruntime does not
        offer are left out; `self.providers` says which ones the sessions really got.
        cache_bytes: memory budget of the compiled-graph cache (estimated, see the module docstring);
        the most recently used choice is always kept, even alone over the budget."""
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found: build it with `bash scripts/setup.sh`")
        self._features = onnx.load(str(path))
        meta = {p.key: p.value for p in self._features.metadata_props}
        try:
            self.channel_order = meta[export.META_CHANNEL_ORDER]
            self.input_scale = float(meta[export.META_INPUT_SCALE])
            self.mean = np.asarray(json.loads(meta[export.META_MEAN]), np.float32)
            self.std = np.asarray(json.loads(meta[export.META_STD]), np.float32)
            self.layers = tuple(json.loads(meta[export.META_LAYERS]))
            self.name = meta[export.META_NAME]
            self.weights_source = meta[export.META_SOURCE]
        except KeyError as missing:
            raise ValueError(
                f"{path} lacks the metadata {missing}: rebuild it with stylize-build-model"
            ) from None
        available = ort.get_available_providers()
        self._requested_providers = [p for p in (providers or [CPU]) if provider_name(p) in available]
        if not self._requested_providers:
            raise ValueError(
                f"none of the providers {providers} is available; onnxruntime offers {available}"
            )
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory (README, Memory; scripts/benchmark_memory.py). onnxruntime's memory patterns pre-plan one
        # block per input shape for every intermediate: at 768x576 they took a job's peak from 2.1 to
        # 3.6 GB. Without them, and with one process-wide arena that grows by exactly what is asked
        # (rather than doubling), a job's memory can be given back in full afterwards (release_memory).
        self._options.enable_mem_pattern = False
        if CPU in (provider_name(p) for p in self._requested_providers):
            _register_shared_cpu_arena()
            self._options.add_session_config_entry("session.use_env_allocators", "1")
        if intra_op_threads:
            self._options.intra_op_num_threads = intra_op_threads
        if CUDA in (provider_name(p) for p in self._requested_providers):
            load_cuda_libraries()
        # What onnxruntime really registers (a provider can fail to load and fall back), asked of a
        # one-node session rather than assumed from the request. A provider that failed here is not
        # tried again for every later session (onnxruntime itself falls back to the CPU).
        self.providers = tuple(self._session(_probe_model()).get_providers())
        self._requested_providers = [
            p for p in self._requested_providers if provider_name(p) in self.providers
        ] or list(self.providers)
        self._shrink = _shrink_options(self.providers)
        self._cache: OrderedDict[LayerChoice, CompiledChoice] = OrderedDict()
        self._cache_budget = cache_bytes
        self._cache_used = 0
        self._evictions = 0
        self._lock = threading.Lock()
        self._building: dict[LayerChoice, threading.Lock] = {}

    def info(self) -> ModelInfo:
        # The model's metadata holds a mean and a std per input channel: three (models/export.py).
        return ModelInfo(
            name=self.name,
            weights_source=self.weights_source,
            layers=self.layers,
            channel_order=self.channel_order,
            mean=cast(tuple[float, float, float], tuple(float(v) for v in self.mean)),
            std=cast(tuple[float, float, float], tuple(float(v) for v in self.std)),
            input_scale=self.input_scale,
            providers=self.providers,
        )

    def compiled(self, choice: LayerChoice) -> CompiledChoice:
        with self._lock:
            if choice in self._cache:
                self._cache.move_to_end(choice)
                return self._cache[choice]
            building = self._building.setdefault(choice, threading.Lock())
        with building:  # one build per choice, while other choices stay usable
            with self._lock:
                if choice in self._cache:
                    return self._cache[choice]
            targets = graphs.build_targets_model(self._features, choice)
            loss = graphs.build_loss_model(self._features, choice)
            nbytes = estimated_session_bytes(targets, loss)
            with self._lock:
                self._evict(keep=0, reserve=nbytes)  # make room first: the new sessions are the peak
            compiled = CompiledChoice(
                choice, self._session(targets), self._session(loss), self._shrink, nbytes=nbytes
            )
            del targets, loss  # the graphs' own copy of the weights
            # Building and serialising the graphs leaves a few hundred MB free in the C heap, where
            # onnxruntime's large tensors (mapped separately) cannot reuse it: give it back now.
            _trim_heap()
            with self._lock:
                self._cache[choice] = compiled
                self._cache_used += compiled.nbytes
                self._building.pop(choice, None)
                self._evict(keep=1)  # other choices may have come in meanwhile
            return compiled

    def tile_sessions(self, choice: LayerChoice) -> TileSessions:
        """Fresh sessions for the tiled evaluation of a choice, built as they are first needed. Not cached:
        only large jobs use them, and a job that drops them gives their memory back at once."""
        return TileSessions(choice, self._features, self._session, self._shrink)

    def release_memory(self, compiled: CompiledChoice) -> None:
        """Give the memory a job's evaluations used back to the operating system: shrink the arenas
        (a tiny run of the job's sessions with arena shrinkage, on the card too where they run on CUDA)
        and trim the C heap."""
        compiled.shrink_arenas()
        _trim_heap()

    def _evict(self, keep: int, reserve: int = 0) -> None:
        """Drop least recently used choices until `reserve` more bytes fit the budget, keeping at least
        the `keep` most recent; lock held. A running job keeps its own reference to its choice, so its
        sessions live on until it ends."""
        while self._cache_used + reserve > self._cache_budget and len(self._cache) > keep:
            _, dropped = self._cache.popitem(last=False)
            self._cache_used -= dropped.nbytes
            self._evictions += 1

    def cache_stats(self) -> GraphCacheStats:
        with self._lock:
            return GraphCacheStats(
                budget_bytes=self._cache_budget,
                used_bytes=self._cache_used,
                entries=len(self._cache),
                evictions=self._evictions,
            )

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(
            model.SerializeToString(), self._options, providers=self._requested_providers
        )

    # Preprocessing, read from the model: x = (rgb * scale - mean) / std in the network's channel order.
    def _order(self, channels: np.ndarray) -> np.ndarray:
        return channels[..., ::-1] if self.channel_order == "BGR" else channels

    def to_network(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB in [0, 1] -> (1, 3, H, W) float32 network input."""
        x = (self._order(rgb.astype(np.float32)) * self.input_scale - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)

    def from_network(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) network input -> (H, W, 3) RGB in [0, 1]."""
        hwc = x.reshape(3, *x.shape[-2:]).transpose(1, 2, 0)
        rgb = self._order((hwc * self.std + self.mean) / self.input_scale)
        return np.clip(rgb, 0.0, 1.0).astype(np.float32)

    def pixel_bounds(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-element lower and upper bounds of the network input for pixels in [0, 1], flattened."""
        low = np.broadcast_to(((0.0 - self.mean) / self.std)[:, None, None], (3, height, width))
        high = np.broadcast_to(((self.input_scale - self.mean) / self.std)[:, None, None], (3, height, width))
        return low.astype(np.float64).ravel(), high.astype(np.float64).ravel()


def _probe_model() -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    return onnx.helper.make_model_gen_version(
        graph, opset_imports=[onnx.helper.make_opsetid("", export.OPSET)]
    )
