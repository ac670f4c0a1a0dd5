"""stylize.v1.StyleTransfer over the job manager: a thin shell that converts messages and statuses.

The job manager (server/jobs/manager.py) owns every job: admission, the queue, running, events,
checkpoints and retention. Here each call names its caller (server/identity.py), turns the request into the
manager's terms and the answer into messages, and the manager's Outcome statuses into gRPC's.

Stylize is SubmitJob, then WatchJob, then CancelJob when the call goes away. Streams (Stylize, WatchJob)
hold a handler thread each, so they are bounded (server/streams.py); a client that takes no message for
--stall-seconds is cancelled (server/stalls.py). A slow watcher costs the job nothing: past a memory
budget, its unsent frames are dropped (the newest is kept) instead of blocking it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.admission import EngineLike, Refused
from stylize_service.server.call_metrics import call_deadline_passed
from stylize_service.server.config import DEFAULT_STALL_SECONDS
from stylize_service.server.convert import graph_cache_pb, job_pb
from stylize_service.server.engine.validation import MAX_ITERATIONS, MAX_SIZE, MAX_STYLES, MAX_WEIGHT
from stylize_service.server.identity import context_identity
from stylize_service.server.jobs.feed import JobEnd
from stylize_service.server.jobs.manager import LOADING, JobManager, JobNotFound
from stylize_service.server.options import default_options
from stylize_service.server.outcome import Outcome, Status
from stylize_service.server.scheduler import Scheduler
from stylize_service.server.stalls import StallWatch
from stylize_service.server.streams import StreamLimit, StreamSlots

__all__ = ["EngineLike", "ServiceLimits", "StyleTransferServicer"]

logger = logging.getLogger("stylize.server")


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
        manager: JobManager,
        limits: ServiceLimits,
        version: str = "unknown",
        *,
        trust_tokens: bool = False,
    ) -> None:
        """trust_tokens: the server refuses calls without a valid bearer token, so a call's token may
        identify its client (server.identity) for its jobs and bounds; else its address does."""
        self._scheduler = scheduler
        self._manager = manager
        self._limits = limits
        self._engine: EngineLike | None = None
        self._version = version
        self._trust_tokens = trust_tokens
        self._stalls = StallWatch(limits.stall_seconds)
        total = scheduler.concurrency + scheduler.queue_size
        self._streams = StreamSlots(total, min(total, scheduler.max_per_client or total))

    def set_engine(self, engine: EngineLike) -> None:
        """Called once the model has loaded; until then calls are answered UNAVAILABLE."""
        self._engine = engine
        self._manager.set_engine(engine)

    # --- GetInfo ---------------------------------------------------------------------------------

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        engine = self._engine
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, LOADING)
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
            load=pb.Load(running_jobs=self._scheduler.running, queued_jobs=self._manager.queued()),
            job_store=self._job_store_info(),
            features=pb.Features(style_masks=True),
        )

    def _job_store_info(self) -> pb.JobStoreInfo:
        manager, store = self._manager, self._manager.store
        return pb.JobStoreInfo(
            kind=store.kind,
            jobs=manager.counts(),
            used_bytes=store.used_bytes(),
            capacity_bytes=store.capacity_bytes,
            result_ttl_seconds=round(manager.settings.result_ttl_seconds),
            checkpoint_interval_seconds=manager.settings.checkpoint_seconds,
            checkpoints_written=manager.checkpoints_written,
            checkpoint_seconds=manager.checkpoint_seconds,
            jobs_resumed=manager.jobs_resumed,
            frames_retained_per_job=store.retention.count,
            frame_bytes_retained_per_job=store.retention.nbytes,
        )

    # --- Stylize: a job that ends with its call --------------------------------------------------------

    def Stylize(
        self, request: pb.StylizeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        owner = self._caller(context)
        with self._answering(context):
            # The job's bounds first (their refusals name the queue and the client's bound), then the
            # stream's: a stream refused takes its job with it.
            view = self._manager.submit(
                request,
                owner,
                bound_to_call=True,
                deadline_passed=lambda: call_deadline_passed(context),
            )
            job_id = view.record.id

            def on_termination(outcome: Outcome | None = None) -> None:
                # The call ended (cancelled, deadline passed, or finished): so does its job.
                with contextlib.suppress(JobNotFound):  # deleted already (a very short TTL)
                    self._manager.cancel(job_id, owner, outcome or Outcome.cancelled())

            if not context.add_callback(on_termination):
                on_termination()  # already terminated
            try:
                with self._stream(owner):
                    yield from self._events(job_id, owner, 0, context)
            except Refused as refused:
                on_termination(refused.outcome)
                raise
            finally:
                # However the stream ended (the client going away mid-yield included), stop the job.
                on_termination()

    # --- jobs -----------------------------------------------------------------------------------------

    def SubmitJob(self, request: pb.StylizeRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._answering(context):
            return job_pb(self._manager.submit(request, self._caller(context)))
        raise AssertionError("unreachable: _answering aborts")  # pragma: no cover

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        owner = self._caller(context)
        with self._answering(context), self._stream(owner):
            yield from self._events(request.id, owner, request.after_sequence, context)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._answering(context):
            view = self._manager.get(
                request.id, self._caller(context), include_image=not request.omit_result_image
            )
            return job_pb(view)
        raise AssertionError("unreachable: _answering aborts")  # pragma: no cover

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._answering(context):
            return job_pb(self._manager.cancel(request.id, self._caller(context)))
        raise AssertionError("unreachable: _answering aborts")  # pragma: no cover

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        with self._answering(context):
            views, token = self._manager.jobs(self._caller(context), request.page_size, request.page_token)
            return pb.ListJobsResponse(jobs=[job_pb(view) for view in views], next_page_token=token)
        raise AssertionError("unreachable: _answering aborts")  # pragma: no cover

    # --- the shell ------------------------------------------------------------------------------------

    def _caller(self, context: grpc.ServicerContext) -> str:
        return context_identity(context, trust_tokens=self._trust_tokens)

    def _events(
        self, job_id: str, owner: str, after: int, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        """The job's events as the manager gives them; its end as the stream's status."""
        what = f"job {job_id[:12]}"
        for item in self._manager.watch(job_id, owner, after, context.is_active):
            if isinstance(item, JobEnd):
                if item.outcome.label != "ok" and context.is_active():  # else nobody is listening
                    raise Refused(item.outcome)
                return
            with self._stalls.sending(context, what):
                yield item

    @contextlib.contextmanager
    def _stream(self, owner: str) -> Iterator[None]:
        try:
            with self._streams.held(owner):
                yield
        except StreamLimit as err:
            raise Refused(Outcome.refused(str(err))) from None

    @contextlib.contextmanager
    def _answering(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Every failure as a status: a refusal or a job's end with its own, a bad id INVALID_ARGUMENT,
        an unknown one NOT_FOUND, a bug of ours INTERNAL rather than UNKNOWN."""
        try:
            yield
        except Refused as refused:
            outcome = refused.outcome
            context.abort(_status(outcome.code), outcome.message or outcome.text)
        except JobNotFound as err:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {err} not found")
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except GeneratorExit:
            raise
        except Exception as err:
            if _is_abort(err):
                raise
            logger.exception("a job call failed")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")


def _status(code: Status) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def _is_abort(err: Exception) -> bool:
    """context.abort() raises a bare Exception after setting the status; let it through."""
    return type(err) is Exception
