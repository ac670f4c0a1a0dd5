"""Assembly of the gRPC server: the StyleTransfer servicer, grpc.health.v1, reflection, limits, draining.

Separate from main.py (process concerns: flags, logging, signals, loading the model) so that tests can run
the very same server in-process with a fake engine.
"""

from __future__ import annotations

import logging
from concurrent import futures
from importlib import metadata

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.protos.stylize.v1.contract import SERVICE_NAME
from stylize_service.server.config import ServerConfig
from stylize_service.server.engine.memory import megabytes
from stylize_service.server.imageio import allow_pixels
from stylize_service.server.logsafe import install_grpc_redaction
from stylize_service.server.metrics import MetricsEndpoint, ServerMetrics
from stylize_service.server.procfs import rss_bytes
from stylize_service.server.scheduler import Scheduler
from stylize_service.server.security import ServerSecurity
from stylize_service.server.servicer import EngineLike, ServiceLimits, StyleTransferServicer

logger = logging.getLogger("stylize.server")

OVERALL = ""  # grpc.health.v1's name for the server as a whole
EXTRA_THREADS = 8  # handler threads beyond running + queued jobs: health checks, GetInfo, refusals


def package_version() -> str:
    try:
        return metadata.version("stylize-service")
    except metadata.PackageNotFoundError:
        return "unknown"


class StylizeServer:
    """The server of one process. start() listens (health NOT_SERVING), set_engine() makes it SERVING,
    drain() stops it gracefully."""

    def __init__(self, config: ServerConfig, security: ServerSecurity | None = None) -> None:
        """security: what from_config(config) gives (read here when None; raises ConfigError)."""
        self.config = config
        self.security = security if security is not None else ServerSecurity.from_config(config)
        install_grpc_redaction()  # grpc's own log must not show a token that is not valid UTF-8
        allow_pixels(config.max_pixels)  # the limit GetInfo reports is the one in force
        # Memory for jobs is the budget less the idle server, known once the model is loaded (set_engine).
        self.scheduler = Scheduler(
            config.concurrency, config.queue_size, config.jobs_per_client, memory_capacity=None
        )
        self.metrics = ServerMetrics()
        self.metrics.track_scheduler(
            running=lambda: self.scheduler.running,
            waiting=lambda: self.scheduler.waiting,
            reserved_memory=lambda: self.scheduler.reserved_memory,
        )
        self.metrics.set_memory_budget(config.memory_budget_bytes)
        self.servicer = StyleTransferServicer(
            self.scheduler,
            ServiceLimits(
                max_pixels=config.max_pixels,
                max_message_bytes=config.max_message_bytes,
                memory_budget_bytes=config.memory_budget_bytes,
                stall_seconds=config.stall_seconds,
            ),
            version=package_version(),
            # With tokens checked, a call's token names its client for the per-client bound.
            trust_tokens=self.security.tokens is not None,
            metrics=self.metrics,
        )
        self.health = health.HealthServicer()
        # Every Stylize call holds a handler thread while it runs or waits, so size the pool to the
        # scheduler's bounds; the rest answer health checks and GetInfo while the workers are busy.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.concurrency + config.queue_size + EXTRA_THREADS,
                thread_name_prefix="grpc-handler",
            ),
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
            # The metrics first: they count the calls that the security interceptors refuse too.
            interceptors=[self.metrics.interceptor(), *self.security.interceptors()],
        )
        pb_grpc.add_StyleTransferServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self._metrics_endpoint: MetricsEndpoint | None = None

    @property
    def metrics_port(self) -> int | None:
        """The bound port of /metrics, None when it is off."""
        return self._metrics_endpoint.port if self._metrics_endpoint is not None else None

    def start(self) -> int:
        """Listen on config.host:config.port, and serve /metrics on config.metrics_port when it is set;
        returns the bound gRPC port (useful when port 0 was asked)."""
        credentials = self.security.credentials
        if credentials is None:
            self.port = self._server.add_insecure_port(self.config.address)
        else:
            self.port = self._server.add_secure_port(self.config.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.address} (in use, or not a local address?)")
        if self.config.metrics_port is not None:
            try:
                self._metrics_endpoint = self.metrics.serve(self.config.host, self.config.metrics_port)
            except OSError as err:
                raise OSError(f"cannot serve metrics on port {self.config.metrics_port}: {err}") from err
            logger.info("metrics at http://%s:%d/metrics", self.config.host, self._metrics_endpoint.port)
        self._server.start()
        self.security.watch()
        warning = self.security.exposure_warning(self.config.host)
        if warning is not None:
            logger.warning(warning)
        return self.port

    def set_engine(self, engine: EngineLike) -> None:
        idle = rss_bytes()
        self.scheduler.memory_capacity = max(0, self.config.memory_budget_bytes - idle)
        logger.info(
            "memory: budget %d MB, idle server %d MB, %d MB for jobs",
            megabytes(self.config.memory_budget_bytes),
            megabytes(idle),
            megabytes(self.scheduler.memory_capacity),
        )
        self.servicer.set_engine(engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace_seconds: float | None = None) -> None:
        """Stop gracefully: report NOT_SERVING, refuse new and queued jobs, let running jobs finish
        within the grace period, then cancel them (they stop within one evaluation)."""
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        self.scheduler.close()
        running = self.scheduler.running
        if running:
            logger.info("draining: waiting up to %.0fs for %d running job(s)", grace, running)
        self._server.stop(grace).wait()
        # server.stop cancelled what was left; give the workers a moment to see it and release.
        if not self.scheduler.wait_idle(timeout=10.0):
            logger.warning("draining: some job did not stop within 10s of being cancelled")
        self.security.close()
        if self._metrics_endpoint is not None:  # last, so that the drain itself can be watched
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None

    def cancel_all(self) -> None:
        """Cut a drain's grace period short: cancel every call now (jobs stop within one evaluation)."""
        self._server.stop(0)

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def _set_health(self, status: int) -> None:  # a health_pb2.HealthCheckResponse.ServingStatus value
        for name in (OVERALL, SERVICE_NAME):
            self.health.set(name, status)
