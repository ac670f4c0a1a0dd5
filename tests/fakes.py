"""Test doubles and helpers for the service tests: a fake engine, image bytes, an in-process server.

FakeEngine implements the interface of stylize_service.server.engine.engine.Engine without ONNX: it
"optimises" in a deterministic number of steps, reports falling losses, sends frames, returns an image
of the requested size and honours should_stop. Tests can hold it at an iteration (gate) to control the
timing of queue and cancellation scenarios without sleeping.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.app import StylizeServer
from stylize_service.server.config import ServerConfig
from stylize_service.server.engine.checkpoint import Checkpoint, CheckpointSink
from stylize_service.server.engine.plan import JobPlan, check_settings
from stylize_service.server.engine.plan import plan as plan_job
from stylize_service.server.engine.resample import scaled_size
from stylize_service.server.engine.types import (
    GraphCacheStats,
    Losses,
    ModelInfo,
    Progress,
    StyleSource,
    StylizeCancelled,
    StylizeObserver,
    StylizeResult,
    StylizeSettings,
)
from stylize_service.server.servicer import EngineLike

LAYERS = tuple(
    f"relu{block}_{index}"
    for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for index in range(1, count + 1)
)


class FakeEngine:
    """Engine-shaped and fast. Set `gate` (an unset Event) to hold every job before each iteration until
    the test sets it; `on_frame_sent` runs in the worker thread right after each on_frame call."""

    tile_size = 0  # like an engine without --tile-size

    def __init__(self, seconds_per_iteration: float = 0.0, fail_with: Exception | None = None) -> None:
        self.seconds_per_iteration = seconds_per_iteration
        self.fail_with = fail_with
        self.gate: threading.Event | None = None
        self.on_frame_sent: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.started: list[threading.Event] = []  # set when the n-th job starts (pre-created by tests)
        self.jobs_started = 0
        self.stylize_calls = 0
        self.last_styles: list[StyleSource] = []  # the styles (with masks) of the latest call
        self.cancelled = 0
        self.completed = 0
        self.resumed_from: list[int] = []  # the iteration of each checkpoint a job resumed from

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name="fake-vgg16",
            weights_source="fake weights for tests (sha256 0000)",
            layers=LAYERS,
            channel_order="RGB",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            input_scale=1.0,
            providers=("FakeExecutionProvider",),
        )

    @property
    def graph_cache(self) -> GraphCacheStats:
        return GraphCacheStats(budget_bytes=0, used_bytes=0, entries=0, evictions=0)  # it compiles nothing

    def stylize(
        self,
        content: np.ndarray,
        styles: Sequence[StyleSource],
        settings: StylizeSettings,
        observer: StylizeObserver,
        *,
        init_image: np.ndarray | None = None,
        plan: JobPlan | None = None,
        checkpoints: CheckpointSink | None = None,  # the fake keeps no state worth saving
        resume: Checkpoint | None = None,
    ) -> StylizeResult:
        with self._lock:
            self.stylize_calls += 1  # before any check: tests can tell that a request never got here
            self.last_styles = list(styles)
        if plan is None:  # the real planning, which needs no ONNX: the same rules and figures
            check_settings(
                settings,
                LAYERS,
                style_weights=[s.blend_weight for s in styles],
                has_init_image=init_image is not None,
            )
            plan = plan_job(
                (content.shape[1], content.shape[0]),
                [(s.image.shape[1], s.image.shape[0]) for s in styles],
                settings,
            )
        with self._lock:
            index = self.jobs_started
            self.jobs_started += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        if index < len(self.started):
            self.started[index].set()
        try:
            history = plan.memory.histories[-1]
            return self._run(content, styles, settings, observer, history, checkpoints, resume)
        except StylizeCancelled:
            with self._lock:
                self.cancelled += 1
            raise
        finally:
            with self._lock:
                self.running -= 1

    def _run(
        self,
        content: np.ndarray,
        styles: Sequence[StyleSource],
        settings: StylizeSettings,
        observer: StylizeObserver,
        history: int,
        checkpoints: CheckpointSink | None = None,
        resume: Checkpoint | None = None,
    ) -> StylizeResult:
        started = time.perf_counter()
        width, height = scaled_size(content.shape[1], content.shape[0], settings.max_size)
        colour = np.mean([s.image.mean(axis=(0, 1)) for s in styles], axis=0) if styles else np.zeros(3)
        evaluations = 0
        losses = _losses(0, settings)
        first = 0 if resume is None else resume.iterations_done + 1
        if resume is not None:
            evaluations = resume.evaluations
            with self._lock:
                self.resumed_from.append(resume.iterations_done)
        for iteration in range(first, settings.iterations + 1):
            self._hold(observer)
            if observer.should_stop():
                raise StylizeCancelled()
            if self.fail_with is not None and iteration == 1:
                raise self.fail_with
            evaluations += 1
            if self.seconds_per_iteration:
                time.sleep(self.seconds_per_iteration)
            losses = _losses(iteration, settings)
            observer.on_progress(
                Progress(
                    iteration=iteration,
                    evaluations=evaluations,
                    losses=losses,
                    elapsed_seconds=time.perf_counter() - started,
                    eta_seconds=(settings.iterations - iteration) * self.seconds_per_iteration,
                    stage=0,
                    stages=1,
                    width=width,
                    height=height,
                    correction_pairs=history,
                )
            )
            if settings.frame_every and iteration > 0 and iteration % settings.frame_every == 0:
                observer.on_frame(iteration, _image(width, height, colour, iteration / settings.iterations))
                if self.on_frame_sent is not None:
                    self.on_frame_sent(iteration)
            if checkpoints is not None and 0 < iteration < settings.iterations and checkpoints.due():
                # What the engine saves, in miniature: where it is, and an iterate.
                checkpoints.save(
                    Checkpoint(
                        stage=0,
                        stage_iteration=iteration,
                        iterations_done=iteration,
                        evaluations=evaluations,
                        elapsed_seconds=time.perf_counter() - started,
                        recent_losses=(),
                        image=np.zeros((1, 3, 2, 2), np.float32),
                        optimizer=None,
                        plan_key="fake",
                    )
                )
        with self._lock:
            self.completed += 1
        return StylizeResult(
            image=_image(width, height, colour, 1.0),
            iterations=settings.iterations,
            evaluations=evaluations,
            losses=losses,
            elapsed_seconds=time.perf_counter() - started,
        )

    def _hold(self, observer: StylizeObserver) -> None:
        while self.gate is not None and not self.gate.is_set():
            if observer.should_stop():
                raise StylizeCancelled()
            time.sleep(0.005)


def _losses(iteration: int, settings: StylizeSettings) -> Losses:
    falling = 1.0 / (1 + iteration)
    content = {layer: w * falling for layer, w in settings.content_layers}
    style = {layer: w * 10 * falling for layer, w in settings.style_layers}
    terms = {
        "content": sum(content.values()),
        "style": sum(style.values()),
        "tv": settings.tv_weight * falling,
    }
    return Losses(total=sum(terms.values()), terms=terms, per_layer={"content": content, "style": style})


def _image(width: int, height: int, colour: np.ndarray, progress: float) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(colour.astype(np.float32), (height, width, 3))
    return np.clip(base * progress + ramp * (1 - progress), 0, 1).astype(np.float32)


# --- images -------------------------------------------------------------------------------------


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A uint8 (H, W, 3) test picture with structure (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(1, width - 1), y / max(1, height - 1), (x + y) / max(1, width + height - 2)], -1)
    rgb = rgb + rng.normal(0, 0.05, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **params: object) -> bytes:
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def image_bytes(width: int = 48, height: int = 32, fmt: str = "PNG", seed: int = 0) -> bytes:
    return encode(gradient(width, height, seed), fmt)


def decode_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


# --- server -------------------------------------------------------------------------------------

TEST_CONFIG = ServerConfig(
    host="127.0.0.1",
    port=0,
    concurrency=1,
    queue_size=2,
    # Every test client is 127.0.0.1: one more than fits, so that one client can fill the server and see
    # the queue's own bound (the tests of the per-client bound set it lower).
    max_jobs_per_client=4,
    max_pixels=1_000_000,
    max_message_mb=4,
    grace_seconds=0,
)


@contextlib.contextmanager
def running_server(engine: EngineLike | None = None, **overrides: Any) -> Iterator[tuple[StylizeServer, str]]:
    """An in-process server on an ephemeral loopback port; yields (server, "127.0.0.1:PORT"). Its job
    store is a temporary directory of its own unless `state_dir` is given."""
    with tempfile.TemporaryDirectory(prefix="stylize-state-") as state_dir:
        overrides.setdefault("state_dir", Path(state_dir))
        server = StylizeServer(replace(TEST_CONFIG, **overrides))
        port = server.start()
        if engine is not None:
            server.set_engine(engine)
        try:
            yield server, f"127.0.0.1:{port}"
        finally:
            server.drain(0)


def channel(address: str, max_message_mb: float = 64) -> grpc.Channel:
    limit = int(max_message_mb * 1024 * 1024)
    return grpc.insecure_channel(
        address,
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )


# --- helpers every service test uses ----------------------------------------------------------------

# A generous bound for "happens promptly", never a performance assertion: the machine may be busy.
LIVENESS = 30.0


def stylize_request(
    content: bytes | None = None, styles: Sequence[bytes] | None = None, **options: object
) -> pb.StylizeRequest:
    """A small valid request: a 48x32 content, one 32x32 style (unless given), these options."""
    return pb.StylizeRequest(
        content_image=content if content is not None else image_bytes(48, 32),
        styles=[
            pb.StyleImage(image=s) for s in (styles if styles is not None else [image_bytes(32, 32, seed=1)])
        ],
        options=pb.StylizeOptions(**options),  # type: ignore[arg-type]
    )


def wait_until(predicate: Callable[[], bool], timeout: float = LIVENESS) -> bool:
    """Poll predicate until it is true (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class LossRecorder:
    """An engine observer that records the total loss of every Progress and never asks to stop."""

    def __init__(self) -> None:
        self.totals: list[float] = []

    def on_progress(self, progress: Progress) -> None:
        self.totals.append(progress.losses.total)

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        pass

    def should_stop(self) -> bool:
        return False
