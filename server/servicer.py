"""stylize.v1.StyleTransfer over an engine: a thin shell that knows gRPC and images, never ONNX.

One Stylize call:
1. the cheap checks (INVALID_ARGUMENT naming the field): the options by the engine's own rules, and each
   image's header (format, pixel count, and the stages' sizes from the content's);
2. a ticket from the scheduler for the calling client (RESOURCE_EXHAUSTED past the queue's or the client's
   bound; Queued events while it waits). Until here a request holds only its encoded bytes;
3. a worker thread, holding the ticket's slot, decodes the images, runs the engine and encodes every frame
   and the result, so that all of the job's CPU and memory count against its slot;
4. the handler thread streams what the worker made. A slow client costs the worker nothing: past a memory
   budget, unsent frames are dropped (the newest is kept) instead of blocking it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.config import DEFAULT_STALL_SECONDS
from stylize_service.server.engine.memory import JobMemory, MemoryExceeded, megabytes
from stylize_service.server.engine.pyramid import style_longest
from stylize_service.server.engine.resample import scaled_size
from stylize_service.server.engine.types import (
    GraphCacheStats,
    InvalidSettings,
    Losses,
    ModelInfo,
    Progress,
    StyleSource,
    StylizeCancelled,
    StylizeObserver,
    StylizeResult,
    StylizeSettings,
)
from stylize_service.server.engine.validation import MAX_ITERATIONS, MAX_SIZE, MAX_STYLES, MAX_WEIGHT
from stylize_service.server.identity import context_identity
from stylize_service.server.imageio import BadImage, Encoding, decode_image, encode_image, probe_image
from stylize_service.server.logsafe import LogThrottle
from stylize_service.server.metrics import ServerMetrics, call_deadline_passed
from stylize_service.server.options import (
    InvalidOption,
    JobOptions,
    default_options,
    invalid_option,
    to_job_options,
)
from stylize_service.server.scheduler import ClientLimit, QueueFull, Scheduler, SchedulerClosed, Ticket
from stylize_service.server.stalls import StallWatch

logger = logging.getLogger("stylize.server")

POLL_SECONDS = 0.5  # how often waiting threads re-check the call's liveness (cancels also wake them)
# Unsent frames (encoded) kept for a client that reads slowly, and always the newest one; older ones are
# dropped beyond this rather than make the engine wait.
PENDING_FRAME_BYTES = 64 * 1024 * 1024
_refusal_log = LogThrottle()


class EngineLike(Protocol):
    """What the servicer needs of stylize_service.server.engine.Engine (tests pass a fake)."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def graph_cache(self) -> GraphCacheStats: ...

    def check(
        self,
        settings: StylizeSettings,
        *,
        style_weights: Sequence[float],
        has_init_image: bool,
        content_size: tuple[int, int] | None = None,
    ) -> None: ...

    def plan_memory(
        self, content_size: tuple[int, int], settings: StylizeSettings, styles: int, budget: int | None
    ) -> JobMemory: ...

    def stylize(
        self,
        content: np.ndarray,
        styles: Sequence[StyleSource],
        settings: StylizeSettings,
        observer: StylizeObserver,
        *,
        init_image: np.ndarray | None = None,
        memory_plan: JobMemory | None = None,
    ) -> StylizeResult: ...


@dataclass(frozen=True)
class ServiceLimits:
    max_pixels: int
    max_message_bytes: int
    memory_budget_bytes: int = 0  # 0 = not budgeted
    stall_seconds: float = DEFAULT_STALL_SECONDS  # a stream not read for this long is cancelled


class _Abort(Exception):
    """Ends a call with a status; raised inside the handler, turned into context.abort at its top."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.outcome = outcome


@dataclass(frozen=True)
class _Job:
    """An accepted request: its options checked and its images' headers read, nothing decoded yet."""

    id: str
    request: pb.StylizeRequest
    options: JobOptions
    memory: JobMemory


@dataclass(frozen=True)
class _Inputs:
    """A job's images, decoded by its worker."""

    content: np.ndarray
    styles: list[StyleSource]
    init_image: np.ndarray | None
    # Each stage's tile size and L-BFGS-B history, planned for the decoded content: its stages can differ
    # from those of the header's size, which the job's reservation was planned from (a 601x31 header,
    # 600x31 decoded).
    memory_plan: JobMemory


# What the worker thread hands to the handler thread: messages ready to send.
@dataclass(frozen=True)
class _FrameEvent:
    frame: pb.Frame

    @property
    def nbytes(self) -> int:
        return len(self.frame.image)


@dataclass(frozen=True)
class _Done:
    result: pb.Result


@dataclass(frozen=True)
class _Failed:
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class _Stopped:
    pass


_Event = Progress | _FrameEvent | _Done | _Failed | _Stopped


class _Events:
    """Worker -> handler hand-off. Never blocks the producer. Unsent frames are kept up to a memory
    budget; past it the oldest unsent ones are dropped (the newest is always kept)."""

    def __init__(self, max_pending_frame_bytes: int = PENDING_FRAME_BYTES) -> None:
        self._cond = threading.Condition()
        self._items: deque[_Event] = deque()
        self._max_frame_bytes = max_pending_frame_bytes
        self._frame_bytes = 0
        self.dropped_frames = 0

    def put(self, event: _Event) -> None:
        with self._cond:
            if isinstance(event, _FrameEvent):
                self._frame_bytes += event.nbytes
                while self._frame_bytes > self._max_frame_bytes and self._drop_oldest_frame():
                    self.dropped_frames += 1
            self._items.append(event)
            self._cond.notify_all()

    def _drop_oldest_frame(self) -> bool:
        for index, pending in enumerate(self._items):
            if isinstance(pending, _FrameEvent):
                del self._items[index]
                self._frame_bytes -= pending.nbytes
                return True
        return False

    def get(self, timeout: float) -> _Event | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            event = self._items.popleft()
            if isinstance(event, _FrameEvent):
                self._frame_bytes -= event.nbytes
            return event

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _JobObserver:
    """The engine's view of one call: forwards events and answers should_stop (called per evaluation)."""

    def __init__(
        self, events: _Events, stop: threading.Event, context: grpc.ServicerContext, metrics: ServerMetrics
    ) -> None:
        self._events = events
        self._stop = stop
        self._context = context
        self._metrics = metrics
        self.last_progress: Progress | None = None
        self.frame_encoding = Encoding.JPEG
        self.frame_size: tuple[int, int] | None = None  # (width, height); set once the content is decoded

    def on_progress(self, progress: Progress) -> None:
        self.last_progress = progress
        self._metrics.evaluations(progress.evaluation_seconds)
        self._events.put(progress)

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        # Scaled and encoded here, in the worker thread between two iterations: the job's own slot pays
        # for it, however large or frequent its frames.
        encoded = encode_image(image, self.frame_encoding, self.frame_size)
        frame = pb.Frame(
            iteration=iteration,
            image=encoded.data,
            mime_type=encoded.mime_type,
            width=encoded.width,
            height=encoded.height,
        )
        self._events.put(_FrameEvent(frame))

    def should_stop(self) -> bool:
        return self._stop.is_set() or not self._context.is_active()

    def stop_if_asked(self) -> None:
        if self.should_stop():
            raise StylizeCancelled()


@dataclass
class _JobLog:
    """The one log line of a job, and its metrics, written once, by whoever sees its end."""

    id: str
    metrics: ServerMetrics
    deadline_passed: Callable[[], bool]  # the call's deadline has passed (gRPC reports it as a cancel)
    client: str = "-"  # identity.context_identity: the name the per-client bound counts by
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    sizes: str = "-"
    written: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, outcome: str, iterations: int = 0, evaluations: int = 0) -> None:
        with self.lock:
            if self.written:
                return
            self.written = True
        now = time.monotonic()
        ran = now - self.started_at if self.started_at is not None else 0.0
        waited = (self.started_at or now) - self.queued_at
        label = _outcome_label(outcome, self.deadline_passed())
        if label == "deadline":
            outcome = "deadline passed" + outcome.removeprefix("cancelled")
        started = self.started_at is not None
        self.metrics.job_finished(label, queue_wait=waited if started else None, ran=ran if started else None)
        held_back = 0
        if not started and label in ("invalid", "refused"):
            # A greedy client is refused many times a second: past a rate its refusals are only counted.
            admitted = _refusal_log.admit(label)
            if admitted is None:
                return
            held_back = admitted
        if held_back:
            outcome += f" ({held_back} more {label} calls not logged)"
        logger.info(
            "job %s client=%s %s iterations=%d evaluations=%d queued=%.2fs ran=%.2fs outcome=%s",
            self.id,
            self.client,
            self.sizes,
            iterations,
            evaluations,
            waited,
            ran,
            outcome,
        )


class StyleTransferServicer(pb_grpc.StyleTransferServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        limits: ServiceLimits,
        engine: EngineLike | None = None,
        version: str = "unknown",
        *,
        trust_tokens: bool = False,
        metrics: ServerMetrics | None = None,
    ) -> None:
        """trust_tokens: the server refuses calls without a valid bearer token, so a call's token may
        identify its client for the per-client bound (server.identity); else its address does."""
        self._scheduler = scheduler
        self._limits = limits
        self._engine = engine
        self._version = version
        self._trust_tokens = trust_tokens
        self._metrics = metrics or ServerMetrics()
        self._ids = itertools.count(1)
        self._stalls = StallWatch(limits.stall_seconds)

    def set_engine(self, engine: EngineLike) -> None:
        """Called once the model has loaded; until then calls are answered UNAVAILABLE."""
        self._engine = engine

    # --- GetInfo ---------------------------------------------------------------------------------

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        engine = self._engine
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        info = engine.info
        return pb.GetInfoResponse(
            model=pb.ModelInfo(
                name=info.name,
                weights_source=info.weights_source,
                layers=list(info.layers),
                preprocessing=pb.Preprocessing(
                    channel_order=info.channel_order,
                    mean=list(info.mean),
                    std=list(info.std),
                    input_scale=info.input_scale,
                ),
                providers=list(info.providers),
            ),
            defaults=default_options(),
            limits=pb.Limits(
                max_pixels=self._limits.max_pixels,
                max_message_bytes=self._limits.max_message_bytes,
                concurrency=self._scheduler.concurrency,
                queue_size=self._scheduler.queue_size,
                max_size=MAX_SIZE,
                max_iterations=MAX_ITERATIONS,
                max_styles=MAX_STYLES,
                memory_budget_bytes=self._limits.memory_budget_bytes,
                memory_for_jobs_bytes=self._scheduler.memory_capacity or 0,
                max_weight=MAX_WEIGHT,
                # Without a bound of its own, a client is bound by the queue.
                max_jobs_per_client=self._scheduler.max_per_client
                or self._scheduler.concurrency + self._scheduler.queue_size,
            ),
            server_version=self._version,
            graph_cache=_graph_cache_pb(engine.graph_cache),
            load=pb.Load(running_jobs=self._scheduler.running, queued_jobs=self._scheduler.waiting),
        )

    # --- Stylize ---------------------------------------------------------------------------------

    def Stylize(
        self, request: pb.StylizeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        log = _JobLog(
            id=f"{next(self._ids):06d}",
            metrics=self._metrics,
            deadline_passed=lambda: call_deadline_passed(context),
            client=context_identity(context, trust_tokens=self._trust_tokens),
        )
        try:
            yield from self._stylize(request, context, log)
        except _Abort as abort:
            log.finish(f"{abort.outcome}: {abort.message}")
            context.abort(abort.code, abort.message)
        except Exception as err:
            # A bug of ours, not of the request: answer it rather than leave the client with UNKNOWN.
            logger.exception("job %s failed", log.id)
            log.finish(f"internal error: {type(err).__name__}: {err}")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    def _stylize(
        self, request: pb.StylizeRequest, context: grpc.ServicerContext, log: _JobLog
    ) -> Iterator[pb.StylizeResponse]:
        engine = self._engine
        if engine is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly", "refused")
        job = self._accept(request, engine, log.id)
        try:
            ticket = self._scheduler.enqueue(log.client, job.memory.peak_bytes)
        except ClientLimit as err:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client already has {err.limit} job(s) running or queued, the most the server allows "
                f"one client (max_jobs_per_client = {err.limit}); retry when one has finished",
                "refused",
            ) from None
        except QueueFull:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is busy: {self._scheduler.concurrency} job(s) running and "
                f"{self._scheduler.queue_size} waiting, the most it queues; retry later",
                "refused",
            ) from None
        except SchedulerClosed:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", "refused") from None

        stop = threading.Event()
        events = _Events()

        def on_termination() -> None:  # the call ended: cancelled, deadline passed, or finished
            stop.set()
            ticket.cancel()
            events.wake()

        if not context.add_callback(on_termination):
            on_termination()  # already terminated
        worker_started = False
        try:
            yield from self._wait_for_turn(ticket, stop, context)
            if stop.is_set():
                log.finish("cancelled while queued")
                return
            observer = _JobObserver(events, stop, context, self._metrics)
            log.started_at = time.monotonic()
            worker = threading.Thread(
                target=self._work,
                args=(engine, job, observer, events, ticket, log),
                name=f"stylize-job-{job.id}",
                daemon=True,
            )
            worker.start()
            worker_started = True
            yield from self._stream(events, stop, context, job.id)
        except GeneratorExit:  # the client went away while we were yielding to it
            if not worker_started:
                log.finish("cancelled while queued")
            raise
        finally:
            # Whatever ended the stream (including the client going away mid-yield), stop the engine.
            stop.set()
            if worker_started:
                ticket.end_call()  # the place goes once the worker has finished the job (at once if it has)
            else:
                ticket.release()

    def _accept(self, request: pb.StylizeRequest, engine: EngineLike, job_id: str) -> _Job:
        """Every check that needs no decoding, before the job waits for a worker: the options by the
        engine's rules, each image's header (its format and pixel count), and the stages' sizes from the
        content's header. Bad requests fail fast, and a waiting job holds only its encoded bytes."""
        try:
            if not request.content_image:
                raise InvalidOption("content_image", "is empty: the request needs a content image")
            job_options = to_job_options(request.options)
            settings = job_options.settings
            style_weights = [style.blend_weight for style in request.styles]
            has_init_image = bool(request.options.init_image)
            engine.check(settings, style_weights=style_weights, has_init_image=has_init_image)
            width, height = self._probe(request.content_image, "content_image")
            if has_init_image:
                self._probe(request.options.init_image, "options.init_image")
            for index, style in enumerate(request.styles):
                self._probe(style.image, f"styles[{index}].image")
            # The stages' sizes from the header's size, which has the image's true aspect ratio (once
            # shrunk to max_size a thin side is rounded up to 1 px, and the advice would be wrong).
            # The EXIF orientation may swap the sides, which changes no stage's short side.
            engine.check(
                settings,
                style_weights=style_weights,
                has_init_image=has_init_image,
                content_size=(width, height),
            )
            # The memory the job will reserve while it runs, from the same header size.
            job_memory = engine.plan_memory(
                (width, height), settings, len(request.styles), self._scheduler.memory_capacity
            )
        except InvalidSettings as err:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(invalid_option(err)), "invalid") from None
        except InvalidOption as err:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err), "invalid") from None
        except MemoryExceeded as err:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"memory: {err}", "refused") from None
        return _Job(job_id, request, job_options, job_memory)

    def _probe(self, data: bytes, field_name: str) -> tuple[int, int]:
        try:
            return probe_image(data, self._limits.max_pixels)
        except BadImage as err:
            raise InvalidOption(field_name, str(err)) from None

    def _decode_inputs(self, job: _Job, engine: EngineLike, observer: _JobObserver) -> _Inputs:
        """Decode in the worker (raises InvalidOption naming the image, StylizeCancelled if the call
        ended). Images are shrunk to the sizes the engine will use; the content's decoded size is checked
        against the stages again (a format may decode to another size than its header said)."""
        request, settings = job.request, job.options.settings
        observer.stop_if_asked()
        content = self._decode(request.content_image, "content_image", settings.max_size)
        init_image = None
        if request.options.init_image:
            observer.stop_if_asked()
            init_image = self._decode(request.options.init_image, "options.init_image", settings.max_size)
        style_side = style_longest(settings.max_size, settings.style_scale)
        styles = []
        for index, style in enumerate(request.styles):
            observer.stop_if_asked()
            styles.append(
                StyleSource(
                    self._decode(style.image, f"styles[{index}].image", style_side), style.blend_weight
                )
            )
        engine.check(
            settings,
            style_weights=[style.blend_weight for style in styles],
            has_init_image=init_image is not None,
            content_size=(content.shape[1], content.shape[0]),
        )
        memory_plan = engine.plan_memory(
            (content.shape[1], content.shape[0]), settings, len(styles), self._scheduler.memory_capacity
        )
        return _Inputs(content, styles, init_image, memory_plan)

    def _decode(self, data: bytes, field_name: str, max_side: int) -> np.ndarray:
        try:
            return decode_image(data, self._limits.max_pixels, max_side)
        except BadImage as err:
            raise InvalidOption(field_name, str(err)) from None

    def _wait_for_turn(
        self, ticket: Ticket, stop: threading.Event, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        """Yield Queued whenever the position changes, until the ticket is admitted or the call ends."""
        reported = 0
        while not stop.is_set():
            position = ticket.position
            if position == 0:
                return
            if position != reported:
                reported = position
                with self._stalls.sending(context, "a queued job"):
                    yield pb.StylizeResponse(queued=pb.Queued(position=position))
            try:
                ticket.wait(reported, timeout=POLL_SECONDS)
            except SchedulerClosed:
                raise _Abort(
                    grpc.StatusCode.UNAVAILABLE, "the server is shutting down", "refused while queued"
                ) from None
            if not context.is_active():
                stop.set()

    def _work(
        self,
        engine: EngineLike,
        job: _Job,
        observer: _JobObserver,
        events: _Events,
        ticket: Ticket,
        log: _JobLog,
    ) -> None:
        """The worker thread, holding the job's slot: decode the images, run the engine, encode the
        result, report how it ended, and always free the slot."""
        outcome = "ok"
        iterations = evaluations = 0
        try:
            inputs = self._decode_inputs(job, engine, observer)
            log.sizes = _describe_sizes(inputs, job)
            height, width = inputs.content.shape[:2]
            observer.frame_encoding = job.options.frame_encoding
            observer.frame_size = scaled_size(width, height, job.options.frame_max_size)
            result = engine.stylize(
                inputs.content,
                inputs.styles,
                job.options.settings,
                observer,
                init_image=inputs.init_image,
                memory_plan=inputs.memory_plan,
            )
            iterations, evaluations = result.iterations, result.evaluations
            events.put(_Done(_result_pb(result, job.options)))
        except StylizeCancelled:
            outcome = "cancelled"
            events.put(_Stopped())
        except (InvalidSettings, InvalidOption) as err:
            message = str(invalid_option(err) if isinstance(err, InvalidSettings) else err)
            outcome = f"invalid: {message}"
            events.put(_Failed(grpc.StatusCode.INVALID_ARGUMENT, message))
        except MemoryExceeded as err:  # the decoded image planned larger than its header did
            outcome = f"refused: memory: {err}"
            events.put(_Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"memory: {err}"))
        except Exception as err:
            logger.exception("job %s: the engine failed", job.id)
            outcome = f"internal error: {type(err).__name__}: {err}"
            events.put(_Failed(grpc.StatusCode.INTERNAL, f"the engine failed: {type(err).__name__}: {err}"))
        finally:
            ticket.finish()  # the slot and memory are free; the call keeps its place until it ends
            if observer.last_progress is not None and outcome != "ok":
                iterations = observer.last_progress.iteration
                evaluations = observer.last_progress.evaluations
            if events.dropped_frames:
                outcome += f" ({events.dropped_frames} frames skipped for a slow client)"
            log.finish(outcome, iterations, evaluations)

    def _stream(
        self, events: _Events, stop: threading.Event, context: grpc.ServicerContext, job_id: str
    ) -> Iterator[pb.StylizeResponse]:
        """Send the worker's messages as they come; everything was converted and encoded by the worker.
        A message that the client does not take within the stall bound cancels the call (StallWatch)."""
        what = f"job {job_id}"
        while True:
            event = events.get(POLL_SECONDS)
            if event is None:
                if stop.is_set() or not context.is_active():
                    return  # the call is over; the worker stops at its next evaluation
                continue
            if isinstance(event, Progress):
                with self._stalls.sending(context, what):
                    yield pb.StylizeResponse(progress=_progress_pb(event))
            elif isinstance(event, _FrameEvent):
                with self._stalls.sending(context, what):
                    yield pb.StylizeResponse(frame=event.frame)
            elif isinstance(event, _Done):
                with self._stalls.sending(context, what):
                    yield pb.StylizeResponse(result=event.result)
                return
            elif isinstance(event, _Failed):
                outcomes = {
                    grpc.StatusCode.INTERNAL: "internal error",
                    grpc.StatusCode.RESOURCE_EXHAUSTED: "refused",
                }
                raise _Abort(event.code, event.message, outcomes.get(event.code, "invalid"))
            else:
                return  # _Stopped: the call was cancelled; nobody is listening


def _outcome_label(outcome: str, deadline_passed: bool) -> str:
    """The stylize_jobs_total label of a job log's outcome ("ok", "cancelled while queued", "invalid: ...",
    "refused: ...", "internal error: ...")."""
    word = outcome.split(maxsplit=1)[0].rstrip(":")
    if word == "cancelled":
        return "deadline" if deadline_passed else "cancelled"
    return word if word in ("ok", "invalid", "refused") else "error"


def _describe_sizes(inputs: _Inputs, job: _Job) -> str:
    height, width = inputs.content.shape[:2]
    out_w, out_h = scaled_size(width, height, job.options.settings.max_size)
    styles = ",".join(f"{s.image.shape[1]}x{s.image.shape[0]}" for s in inputs.styles) or "none"
    tiles = ",".join(str(t) for t in inputs.memory_plan.tiles)
    histories = ",".join(str(h) for h in inputs.memory_plan.histories)
    return (
        f"content={width}x{height} styles={styles} output={out_w}x{out_h} "
        f"memory={megabytes(job.memory.peak_bytes)}MB tiles={tiles} correction_pairs={histories}"
    )


def _graph_cache_pb(stats: GraphCacheStats) -> pb.GraphCache:
    return pb.GraphCache(
        budget_bytes=stats.budget_bytes,
        used_bytes=stats.used_bytes,
        entries=stats.entries,
        evictions=stats.evictions,
    )


def _losses_pb(losses: Losses) -> pb.Losses:
    return pb.Losses(
        total=losses.total,
        terms=losses.terms,
        per_layer={term: pb.LayerLosses(layers=layers) for term, layers in losses.per_layer.items()},
        # The original three terms' own fields, for clients written before `terms`.
        content=losses.content,
        style=losses.style,
        tv=losses.tv,
        content_per_layer=losses.content_per_layer,
        style_per_layer=losses.style_per_layer,
    )


def _progress_pb(progress: Progress) -> pb.Progress:
    return pb.Progress(
        iteration=progress.iteration,
        evaluations=progress.evaluations,
        losses=_losses_pb(progress.losses),
        elapsed_seconds=progress.elapsed_seconds,
        eta_seconds=progress.eta_seconds,
        stage=progress.stage,
        stages=progress.stages,
        width=progress.width,
        height=progress.height,
        tile_size=progress.tile_size,
        tiles=progress.tiles,
        correction_pairs=progress.correction_pairs,
    )


def _result_pb(result: StylizeResult, options: JobOptions) -> pb.Result:
    encoded = encode_image(result.image, options.output_encoding)
    return pb.Result(
        image=encoded.data,
        mime_type=encoded.mime_type,
        width=encoded.width,
        height=encoded.height,
        iterations=result.iterations,
        evaluations=result.evaluations,
        final_losses=_losses_pb(result.losses),
        elapsed_seconds=result.elapsed_seconds,
    )
