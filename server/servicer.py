"""stylize.v1.StyleTransfer over an engine: a thin shell that converts messages, never touching ONNX.

One Stylize call:
1. admission (server/admission.py): the cheap checks, INVALID_ARGUMENT naming the field, and the job's
   plan from the images' headers;
2. a ticket from the scheduler for the calling client (RESOURCE_EXHAUSTED past the queue's or the client's
   bound; Queued events while it waits). Until here a request holds only its encoded bytes;
3. a worker thread (server/job_worker.py), holding the ticket's slot, decodes the images, runs the engine
   and encodes every frame and the result, so that all of the job's CPU and memory count against it;
4. the handler thread streams what the worker made. A slow client costs the worker nothing: past a memory
   budget, unsent frames are dropped (the newest is kept) instead of blocking it; a client that takes no
   message for --stall-seconds is cancelled (server/stalls.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.admission import AcceptedJob, EngineLike, Refused, accept
from stylize_service.server.config import DEFAULT_STALL_SECONDS
from stylize_service.server.convert import graph_cache_pb, progress_pb
from stylize_service.server.engine.types import Progress
from stylize_service.server.engine.validation import MAX_ITERATIONS, MAX_SIZE, MAX_STYLES, MAX_WEIGHT
from stylize_service.server.identity import context_identity
from stylize_service.server.job_worker import (
    Done,
    Failed,
    FrameEvent,
    JobEvents,
    JobLog,
    JobObserver,
    run_job,
)
from stylize_service.server.metrics import ServerMetrics, call_deadline_passed
from stylize_service.server.options import default_options
from stylize_service.server.outcome import Outcome
from stylize_service.server.scheduler import ClientLimit, QueueFull, Scheduler, SchedulerClosed, Ticket
from stylize_service.server.stalls import StallWatch

__all__ = ["EngineLike", "ServiceLimits", "StyleTransferServicer"]

logger = logging.getLogger("stylize.server")

POLL_SECONDS = 0.5  # how often waiting threads re-check the call's liveness (cancels also wake them)
_LOADING = "the model is still loading; retry shortly"


@dataclass(frozen=True)
class ServiceLimits:
    max_pixels: int
    max_message_bytes: int
    memory_budget_bytes: int = 0  # 0 = not budgeted
    stall_seconds: float = DEFAULT_STALL_SECONDS  # a stream not read for this long is cancelled


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
            context.abort(grpc.StatusCode.UNAVAILABLE, _LOADING)
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
            graph_cache=graph_cache_pb(engine.graph_cache),
            load=pb.Load(running_jobs=self._scheduler.running, queued_jobs=self._scheduler.waiting),
        )

    # --- Stylize ---------------------------------------------------------------------------------

    def Stylize(
        self, request: pb.StylizeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        log = JobLog(
            id=f"{next(self._ids):06d}",
            metrics=self._metrics,
            deadline_passed=lambda: call_deadline_passed(context),
            client=context_identity(context, trust_tokens=self._trust_tokens),
        )
        try:
            yield from self._stylize(request, context, log)
        except Refused as refused:
            log.finish(refused.outcome)
            context.abort(refused.outcome.code, refused.outcome.message)
        except Exception as err:
            # A bug of ours, not of the request: answer it rather than leave the client with UNKNOWN.
            logger.exception("job %s failed", log.id)
            outcome = Outcome.internal(
                f"internal error: {type(err).__name__}: {err}", f"{type(err).__name__}: {err}"
            )
            log.finish(outcome)
            context.abort(outcome.code, outcome.message)

    def _stylize(
        self, request: pb.StylizeRequest, context: grpc.ServicerContext, log: JobLog
    ) -> Iterator[pb.StylizeResponse]:
        engine = self._engine
        if engine is None:
            raise Refused(Outcome.refused(_LOADING, grpc.StatusCode.UNAVAILABLE))
        job = accept(
            request,
            engine,
            log.id,
            max_pixels=self._limits.max_pixels,
            memory_capacity=self._scheduler.memory_capacity,
        )
        ticket = self._enqueue(log.client, job)
        stop = threading.Event()
        events = JobEvents()

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
                log.finish(Outcome.cancelled("while queued"))
                return
            observer = JobObserver(events, stop, context.is_active, self._metrics)
            log.started_at = time.monotonic()
            worker = threading.Thread(
                target=run_job,
                args=(engine, job, observer, events, ticket, log),
                kwargs={
                    "max_pixels": self._limits.max_pixels,
                    "memory_capacity": self._scheduler.memory_capacity,
                },
                name=f"stylize-job-{job.id}",
                daemon=True,
            )
            worker.start()
            worker_started = True
            yield from self._stream(events, stop, context, job.id)
        except GeneratorExit:  # the client went away while we were yielding to it
            if not worker_started:
                log.finish(Outcome.cancelled("while queued"))
            raise
        finally:
            # Whatever ended the stream (including the client going away mid-yield), stop the engine.
            stop.set()
            if worker_started:
                ticket.end_call()  # the place goes once the worker has finished the job (at once if it has)
            else:
                ticket.release()

    def _enqueue(self, client: str, job: AcceptedJob) -> Ticket:
        try:
            return self._scheduler.enqueue(client, job.plan.memory.peak_bytes)
        except ClientLimit as err:
            raise Refused(
                Outcome.refused(
                    f"this client already has {err.limit} job(s) running or queued, the most the server "
                    f"allows one client (max_jobs_per_client = {err.limit}); retry when one has finished"
                )
            ) from None
        except QueueFull:
            raise Refused(
                Outcome.refused(
                    f"the server is busy: {self._scheduler.concurrency} job(s) running and "
                    f"{self._scheduler.queue_size} waiting, the most it queues; retry later"
                )
            ) from None
        except SchedulerClosed:
            raise Refused(
                Outcome.refused("the server is shutting down", grpc.StatusCode.UNAVAILABLE)
            ) from None

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
                raise Refused(
                    Outcome.refused(
                        "the server is shutting down", grpc.StatusCode.UNAVAILABLE, when="while queued"
                    )
                ) from None
            if not context.is_active():
                stop.set()

    def _stream(
        self, events: JobEvents, stop: threading.Event, context: grpc.ServicerContext, job_id: str
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
                    yield pb.StylizeResponse(progress=progress_pb(event))
            elif isinstance(event, FrameEvent):
                with self._stalls.sending(context, what):
                    yield pb.StylizeResponse(frame=event.frame)
            elif isinstance(event, Done):
                with self._stalls.sending(context, what):
                    yield pb.StylizeResponse(result=event.result)
                return
            elif isinstance(event, Failed):
                raise Refused(event.outcome)  # the worker has logged it; the client gets its status
            else:
                return  # Stopped: the call was cancelled; nobody is listening
