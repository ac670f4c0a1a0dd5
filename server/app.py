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
from stylize_service.server.call_metrics import counting_interceptor
from stylize_service.server.config import ConfigError, ServerConfig, setting_name
from stylize_service.server.engine.memory import megabytes
from stylize_service.server.imageio import allow_pixels
from stylize_service.server.jobs.directory_store import DirectoryStore
from stylize_service.server.jobs.fleet_jobs import FleetJobManager
from stylize_service.server.jobs.manager import JobManager, JobSettings
from stylize_service.server.jobs.redis_store import RedisStore
from stylize_service.server.jobs.store import JobStore, StoreError
from stylize_service.server.logsafe import install_grpc_redaction
from stylize_service.server.metrics import MetricsEndpoint, ServerMetrics
from stylize_service.server.procfs import rss_bytes
from stylize_service.server.scheduler import Scheduler
from stylize_service.server.security import ServerSecurity
from stylize_service.server.servicer import EngineLike, ServiceLimits, StyleTransferServicer

logger = logging.getLogger("stylize.server")

OVERALL = ""  # grpc.health.v1's name for the server as a whole
EXTRA_THREADS = 8  # handler threads beyond the streams' bound: health checks, GetInfo, job calls, refusals


def package_version() -> str:
    try:
        return metadata.version("stylize-service")
    except metadata.PackageNotFoundError:
        return "unknown"


class StylizeServer:
    """The server of one process. start() listens (health NOT_SERVING), set_engine() makes it SERVING,
    drain() stops it gracefully."""

    def __init__(
        self,
        config: ServerConfig,
        security: ServerSecurity | None = None,
        store: JobStore | None = None,
    ) -> None:
        """security: what from_config(config) gives (read here when None; raises ConfigError).
        store: the job store (default: a DirectoryStore on config's state dir; raises ConfigError naming
        --state-dir when it cannot be used)."""
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
        self.store = store if store is not None else open_store(config)
        settings = JobSettings(
            max_pixels=config.max_pixels,
            checkpoint_seconds=config.checkpoint_seconds,
            result_ttl_seconds=config.result_ttl_seconds,
        )
        self._serving = False  # the model is loaded (health follows the store's reachability from then)
        self.jobs: JobManager
        if isinstance(self.store, RedisStore):
            fleet = FleetJobManager(
                self.scheduler,
                self.store,
                settings,
                self.metrics,
                lease_seconds=config.lease_seconds,
                # The fleet's queue holds what one replica would run and queue: --queue-size is the fleet's.
                queue_bound=config.concurrency + config.queue_size,
            )
            fleet.on_store_health = self._store_health
            # The queue depth that the HPA scales on is the fleet's, the same from every replica.
            self.metrics.track_scheduler(
                running=lambda: self.scheduler.running,
                waiting=fleet.queue_depth,
                reserved_memory=lambda: self.scheduler.reserved_memory,
            )
            self.jobs = fleet
        else:
            self.jobs = JobManager(self.scheduler, self.store, settings, self.metrics)
        self.metrics.track_jobs(
            counts=self.jobs.counts,
            store_bytes=self.store.used_bytes,
            store_capacity=self.store.capacity_bytes,
            result_ttl_seconds=config.result_ttl_seconds,
        )
        self.servicer = StyleTransferServicer(
            self.scheduler,
            self.jobs,
            ServiceLimits(
                max_pixels=config.max_pixels,
                max_message_bytes=config.max_message_bytes,
                memory_budget_bytes=config.memory_budget_bytes,
                stall_seconds=config.stall_seconds,
            ),
            version=package_version(),
            # With tokens checked, a call's token names its client: its jobs and its bounds.
            trust_tokens=self.security.tokens is not None,
        )
        self.health = health.HealthServicer()
        # Every Stylize and WatchJob stream holds a handler thread, so size the pool to the streams'
        # bound (server/streams.py); the rest answer health checks, GetInfo and the job calls.
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
            interceptors=[counting_interceptor(self.metrics), *self.security.interceptors()],
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
        self._serving = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _store_health(self, reachable: bool) -> None:
        """A shared store out of reach: NOT_SERVING (submits are refused) until it is back."""
        if self._serving:
            self._set_health(
                health_pb2.HealthCheckResponse.SERVING
                if reachable
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )

    def drain(self, grace_seconds: float | None = None) -> None:
        """Stop gracefully: report NOT_SERVING and take no new jobs. Detached jobs (SubmitJob) checkpoint
        at their next iteration and stop, and queued ones stay queued, for the next server on the store
        to resume; Stylize calls' jobs may finish within the grace period, then are cancelled (they stop
        within one evaluation)."""
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        self.scheduler.close()
        self.jobs.drain()
        running = self.scheduler.running
        if running:
            logger.info("draining: waiting up to %.0fs for %d running job(s)", grace, running)
        self._server.stop(grace).wait()
        # server.stop cancelled what calls were left; stop their jobs and any detached job that has not
        # checkpointed yet, and give them a moment to see it.
        self.jobs.stop_all()
        if not self.jobs.wait_idle(timeout=10.0):
            logger.warning("draining: some job did not stop within 10s of being cancelled")
        self.jobs.close()
        self.store.close()
        self.security.close()
        if self._metrics_endpoint is not None:  # last, so that the drain itself can be watched
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None

    def cancel_all(self) -> None:
        """Cut a drain's grace period short: cancel every call now (jobs stop within one evaluation;
        detached ones stay unfinished, for the next server)."""
        self.jobs.drain()
        self._server.stop(0)

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def _set_health(self, status: int) -> None:  # a health_pb2.HealthCheckResponse.ServingStatus value
        for name in (OVERALL, SERVICE_NAME):
            self.health.set(name, status)


def open_store(config: ServerConfig) -> JobStore:
    """The Redis store of config's store URL, else the directory store of its state dir; ConfigError
    naming the flag when it cannot be used (a URL's password never shown)."""
    if config.store_url is not None:
        try:
            store = RedisStore(config.store_url, config.store_bytes)
        except StoreError as err:
            raise ConfigError(f"{setting_name('store_url')}: {err}") from None
        logger.info("job store: %s (shared by the fleet)", store.url)
        return store
    try:
        return DirectoryStore(config.resolved_state_dir, config.store_bytes)
    except StoreError as err:
        raise ConfigError(f"{setting_name('state_dir')}: {err}") from None
