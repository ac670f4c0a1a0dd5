"""The server's Prometheus metrics: their definitions and the HTTP endpoint that serves them at /metrics
(prometheus-client's exposition, not our own). server/call_metrics.py counts the gRPC calls into them.

One ServerMetrics per StylizeServer, on its own CollectorRegistry rather than the process-wide one, so that
several servers in one process (the tests) keep separate counts. Every metric is documented in the README's
"Metrics" section; keep the two in step.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)

from stylize_service.server.outcome import LABELS

# The values of stylize_jobs_total's `outcome` label: server/outcome.py's.
OUTCOMES = LABELS

# A job runs from seconds (small images) to an hour (large ones, many iterations), and may wait as long.
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# One evaluation: milliseconds at 64 px, about 1.5 s at 512 px and 5.5 s at 1024 px on two cores.
# A checkpoint: milliseconds at 256 px, about a second at 2048 px (its file is written and synced).
CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
EVALUATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
        self.jobs_held = Gauge("stylize_jobs_held", "Jobs in the job store, by state.", ["state"], registry=r)
        self.store_bytes = Gauge("stylize_job_store_bytes", "Bytes the job store holds.", registry=r)
        self.store_capacity_bytes = Gauge(
            "stylize_job_store_capacity_bytes", "The most the job store may hold (--store-mb).", registry=r
        )
        self.result_ttl_seconds = Gauge(
            "stylize_job_result_ttl_seconds",
            "How long finished jobs are kept (--result-ttl-seconds).",
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "stylize_checkpoint_seconds",
            "Time to save one checkpoint of a running job (its _count: checkpoints written).",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.jobs_resumed = Counter(
            "stylize_jobs_resumed", "Jobs resumed from a checkpoint after a server stopped.", registry=r
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

    def track_jobs(
        self,
        *,
        counts: Callable[[], dict[str, int]],
        store_bytes: Callable[[], float],
        store_capacity: int,
        result_ttl_seconds: float,
    ) -> None:
        """Read the jobs held (by state) and the store's bytes when scraped."""
        for state in ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"):
            self.jobs_held.labels(state).set_function(functools.partial(_count_of, counts, state))
        self.store_bytes.set_function(store_bytes)
        self.store_capacity_bytes.set(store_capacity)
        self.result_ttl_seconds.set(result_ttl_seconds)

    def checkpoint_written(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)

    def job_resumed(self) -> None:
        self.jobs_resumed.inc()

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

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve /metrics over HTTP on host:port (0: any free port) in a daemon thread; raises OSError."""
        return MetricsEndpoint(self.registry, host, port)


def _count_of(counts: Callable[[], dict[str, int]], state: str) -> float:
    return counts().get(state, 0)


class MetricsEndpoint:
    """/metrics over HTTP for one registry (prometheus-client's WSGI app) on a server that bounds what a
    client can hold: at most MAX_CONNECTIONS connections at once (a new one past the bound ends the
    oldest) and SOCKET_TIMEOUT_SECONDS of silence before one is dropped. prometheus-client's own
    start_http_server keeps a thread and a descriptor per connection for as long as the client likes,
    so a thousand silent connections would take every file descriptor, the gRPC port's too. stop() closes
    it."""

    MAX_CONNECTIONS = 16  # a scrape is one short request; Prometheus makes one at a time per target
    SOCKET_TIMEOUT_SECONDS = 5.0

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server_class = _BoundedWSGIServer
        if ":" in host:  # an IPv6 address ("::", "::1")
            server_class = _BoundedWSGIServer6
        self._httpd = make_server(
            host.strip("[]"), port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self._httpd.max_connections = self.MAX_CONNECTIONS
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _QuietHandler(WSGIRequestHandler):
    timeout = MetricsEndpoint.SOCKET_TIMEOUT_SECONDS  # socketserver applies it to the connection

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """At most `max_connections` connections, each on a thread of its own; when a new one arrives at the
    bound, the oldest still open is shut down (its thread ends at once). A flood of silent connections
    thus holds a bounded number of threads and descriptors, and cannot keep a scrape out: the newest
    connection, the scraper's, is the last to go."""

    daemon_threads = True
    max_connections: int

    def server_activate(self) -> None:
        self._open: deque[Any] = deque()
        self._open_lock = threading.Lock()
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            while len(self._open) >= self.max_connections:
                _shut(self._open.popleft())
            self._open.append(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out, was reset or was shut down is the client's doing (or the bound's),
        not worth a traceback."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                if request in self._open:
                    self._open.remove(request)


def _shut(connection: socket.socket) -> None:
    """End a connection from another thread: shutdown() wakes the thread blocked reading it."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _BoundedWSGIServer6(_BoundedWSGIServer):
    address_family = socket.AF_INET6
