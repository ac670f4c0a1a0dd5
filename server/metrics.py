"""The server's Prometheus metrics: their definitions, a gRPC interceptor that counts every call, and the
HTTP endpoint that serves them at /metrics (prometheus-client's exposition, not our own).

One ServerMetrics per StylizeServer, on its own CollectorRegistry rather than the process-wide one, so that
several servers in one process (the tests) keep separate counts. Every metric is documented in the README's
"Metrics" section; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

# The values of stylize_jobs_total's `outcome` label.
OUTCOMES = ("ok", "cancelled", "deadline", "invalid", "refused", "error")

# A job runs from seconds (small images) to an hour (large ones, many iterations), and may wait as long.
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# One evaluation: milliseconds at 64 px, about 1.5 s at 512 px and 5.5 s at 1024 px on two cores.
EVALUATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# A call that ended within this long of its deadline is taken to have ended by it: the cancellation comes
# from gRPC core's clock and time_remaining() from Python's, which may differ by a little.
DEADLINE_SLACK_SECONDS = 0.05


def call_deadline_passed(context: grpc.ServicerContext) -> bool:
    """True when the call had a deadline and it has passed (gRPC reports that as a cancellation)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


class ServerMetrics:
    """Every metric of one server. The servicer reports jobs and evaluations; the scheduler's gauges are
    read from it when scraped; the server sets the memory budget once it is known."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The defaults of prometheus-client's global registry: process_* (CPU, memory, file descriptors,
        # start time), python_info and python_gc_*.
        ProcessCollector(registry=self.registry)
        self.registry.register(PLATFORM_COLLECTOR)
        self.registry.register(GC_COLLECTOR)
        r = self.registry
        self.jobs = Counter("stylize_jobs", "Stylize calls by how they ended.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)  # every outcome is exported from the start, at 0
        self.jobs_running = Gauge("stylize_jobs_running", "Jobs running now.", registry=r)
        self.queue_depth = Gauge("stylize_queue_depth", "Jobs waiting for a worker now.", registry=r)
        self.job_seconds = Histogram(
            "stylize_job_seconds",
            "Time a job ran, from leaving the queue to its end (jobs that started).",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "stylize_queue_wait_seconds",
            "Time from a call's arrival to its job starting (jobs that started).",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.evaluation_seconds = Histogram(
            "stylize_evaluation_seconds",
            "Time of one loss-and-gradient evaluation.",
            buckets=EVALUATION_BUCKETS,
            registry=r,
        )
        self.memory_budget_bytes = Gauge(
            "stylize_memory_budget_bytes",
            "Memory the server may use: the idle server plus the jobs' reservations.",
            registry=r,
        )
        self.memory_reserved_bytes = Gauge(
            "stylize_memory_reserved_bytes",
            "Memory reserved by the running jobs (their predicted peaks).",
            registry=r,
        )
        self.grpc_requests = Counter(
            "stylize_grpc_requests",
            "gRPC calls by full method name and status code.",
            ["method", "code"],
            registry=r,
        )

    # --- what the server reports -------------------------------------------------------------------

    def track_scheduler(
        self,
        *,
        running: Callable[[], float],
        waiting: Callable[[], float],
        reserved_memory: Callable[[], float],
    ) -> None:
        """Read the running and waiting jobs and their reserved memory when scraped (nothing to drift)."""
        self.jobs_running.set_function(running)
        self.queue_depth.set_function(waiting)
        self.memory_reserved_bytes.set_function(reserved_memory)

    def job_finished(self, outcome: str, *, queue_wait: float | None, ran: float | None) -> None:
        """One call's end: outcome is one of OUTCOMES; the times are None for a job that never started."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown job outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
        self.jobs.labels(outcome).inc()
        if queue_wait is not None:
            self.queue_wait_seconds.observe(queue_wait)
        if ran is not None:
            self.job_seconds.observe(ran)

    def evaluations(self, seconds: Iterable[float]) -> None:
        """The durations of loss-and-gradient evaluations, one observation each."""
        for value in seconds:
            self.evaluation_seconds.observe(value)

    def set_memory_budget(self, nbytes: int) -> None:
        self.memory_budget_bytes.set(nbytes)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format, as /metrics serves them."""
        return generate_latest(self.registry)

    def interceptor(self) -> grpc.ServerInterceptor:
        """Counts every call in stylize_grpc_requests_total. Put it first in grpc.server's interceptors
        so that calls that later interceptors refuse are counted too."""
        return _CountingInterceptor(self.grpc_requests)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve /metrics over HTTP on host:port (0: any free port) in a daemon thread; raises OSError."""
        return MetricsEndpoint(self.registry, host, port)


class MetricsEndpoint:
    """prometheus-client's HTTP server for one registry; stop() closes it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _CountingInterceptor(grpc.ServerInterceptor):
    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED; not counted (unbounded names)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        return _counted_handler(handler, lambda code: self._counter.labels(method, code.name).inc())


def _final_code(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status a call that ended without an exception of ours will get."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code  # set_code() or abort()
    if not context.is_active():  # the client cancelled, its deadline passed, or the server stopped
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if call_deadline_passed(context) else grpc.StatusCode.CANCELLED
        )
    return default


def _counted_handler(
    handler: grpc.RpcMethodHandler, record: Callable[[grpc.StatusCode], None]
) -> grpc.RpcMethodHandler:
    """The same handler, calling record(code) once when its call ends."""

    def unary_response(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = behavior(request, context)
            except Exception:
                record(_final_code(context, grpc.StatusCode.UNKNOWN))
                raise
            record(_final_code(context, grpc.StatusCode.OK))
            return response

        return wrapped

    def stream_response(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # gRPC stopped reading and dropped the stream: cancelled or timed out
                record(_final_code(context, grpc.StatusCode.CANCELLED))
                raise
            except Exception:
                record(_final_code(context, grpc.StatusCode.UNKNOWN))
                raise
            record(_final_code(context, grpc.StatusCode.OK))

        return wrapped

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **serializers)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **serializers)
