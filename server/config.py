"""The server's settings: command-line flags over STYLIZE_* environment variables over defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylize_service.models.paths import default_model_path
from stylize_service.protos.stylize.v1.contract import DEFAULT_MAX_MESSAGE_MB
from stylize_service.server.engine.memory import default_budget_bytes
from stylize_service.server.engine.providers import PROVIDER_CHOICES

DEFAULT_PORT = 50051
DEFAULT_MAX_PIXELS = 25_000_000  # a 24-megapixel photo fits; decoded as float32 RGB that is 300 MB
DEFAULT_QUEUE_SIZE = 8
DEFAULT_GRACE_SECONDS = 30.0
# A 64 MiB message (the largest) at about 1 MB/s: a client slower than that is taken to have stopped reading.
DEFAULT_STALL_SECONDS = 60.0
# The job store (server/jobs): a checkpoint holds L-BFGS-B's state, about 200 bytes per pixel with 10
# correction pairs (130 MB at 512x384): room for a full queue of 512 px jobs and larger ones beside them.
DEFAULT_STORE_MB = 4096
DEFAULT_RESULT_TTL_SECONDS = 24 * 3600.0
DEFAULT_CHECKPOINT_SECONDS = 30.0
# The fleet store (server/jobs/redis_store.py): a replica that has not renewed its lease on a running job
# for this long is taken to be gone, and another replica resumes the job from its checkpoint.
DEFAULT_LEASE_SECONDS = 30.0


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. of a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_concurrency(cores: int | None = None) -> int:
    """One job per 4 cores (a job saturates a few cores by itself), and at least one."""
    cores = cores or available_cores()
    return 1 if cores <= 4 else cores // 4


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$XDG_STATE_HOME/stylize, else ~/.local/state/stylize: per user, kept across runs (the container
    image sets STYLIZE_STATE_DIR to its volume)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "stylize"


def default_jobs_per_client(queue_size: int) -> int:
    """Half the queue, and at least one: one client cannot fill the queue alone."""
    return max(1, queue_size // 2)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0 = pick a free port (tests)
    model_path: Path | None = None  # None = stylize_service.models.paths.default_model_path()
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    concurrency: int = 1
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_jobs_per_client: int | None = None  # None = default_jobs_per_client(queue_size)
    threads: int | None = None  # onnxruntime intra-op threads; None = cores // concurrency
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    # A stream whose client has not taken a message for this long is cancelled, freeing its thread.
    stall_seconds: float = DEFAULT_STALL_SECONDS
    log_level: str = "INFO"
    # Who may call (server/security.py reads and checks the files): TLS when tls_cert/tls_key are set,
    # mutual TLS with tls_client_ca, bearer tokens with auth_tokens_file.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None
    # Memory (server/engine/memory.py): None = the container's or machine's memory less a margin.
    memory_limit_mb: int | None = None
    tile_size: int = 0  # px; 0 = tiles only where the memory budget needs them
    # Port of the Prometheus /metrics endpoint, on `host`. None = no endpoint (the flag's 0 or unset);
    # 0 here = any free port (tests).
    metrics_port: int | None = None
    # onnxruntime execution provider (server/engine/providers.py): auto = CUDA when onnxruntime offers it.
    provider: str = "auto"
    # Where to write host, port and pid once SERVING (server/readiness.py), for tools that start a server.
    ready_file: Path | None = None
    # The job store (server/jobs/directory_store.py): its directory (None = default_state_dir()), its size,
    # how long finished jobs stay, and how often running jobs checkpoint (0 = never).
    state_dir: Path | None = None
    store_mb: int = DEFAULT_STORE_MB
    result_ttl_seconds: float = DEFAULT_RESULT_TTL_SECONDS
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    # The fleet store: a redis:// or rediss:// URL (None = the directory store above), and the lease a
    # replica holds on each job it runs.
    store_url: str | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    @property
    def memory_budget_bytes(self) -> int:
        if self.memory_limit_mb is not None:
            return self.memory_limit_mb * 1024 * 1024
        return default_budget_bytes()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else default_state_dir()

    @property
    def store_bytes(self) -> int:
        return self.store_mb * 1024 * 1024

    @property
    def resolved_model_path(self) -> Path:
        return self.model_path if self.model_path is not None else default_model_path()

    @property
    def jobs_per_client(self) -> int:
        if self.max_jobs_per_client is not None:
            return self.max_jobs_per_client
        return default_jobs_per_client(self.queue_size)

    @property
    def intra_op_threads(self) -> int:
        """Split the cores between the concurrent jobs so that they do not oversubscribe the CPU."""
        if self.threads:
            return self.threads
        return max(1, available_cores() // self.concurrency)


# (flag, environment variable, type, help); the dataclass field is the flag's name with _ for -.
_SETTINGS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "STYLIZE_HOST", str, "interface to listen on (default: 0.0.0.0)"),
    ("--port", "STYLIZE_PORT", int, f"port to listen on; 0 = any free port (default: {DEFAULT_PORT})"),
    (
        "--model",
        "STYLIZE_MODEL",
        Path,
        "the feature network .onnx (default: models/build/vgg16_features.onnx)",
    ),
    (
        "--max-message-mb",
        "STYLIZE_MAX_MESSAGE_MB",
        float,
        f"largest request or response message, MiB (default: {DEFAULT_MAX_MESSAGE_MB})",
    ),
    (
        "--max-pixels",
        "STYLIZE_MAX_PIXELS",
        int,
        f"largest accepted input image, width*height (default: {DEFAULT_MAX_PIXELS})",
    ),
    (
        "--concurrency",
        "STYLIZE_CONCURRENCY",
        int,
        "jobs that run at the same time (default: 1 on <= 4 cores, else cores // 4)",
    ),
    (
        "--queue-size",
        "STYLIZE_QUEUE_SIZE",
        int,
        f"jobs that may wait for a worker; more are refused (default: {DEFAULT_QUEUE_SIZE})",
    ),
    (
        "--max-jobs-per-client",
        "STYLIZE_MAX_JOBS_PER_CLIENT",
        int,
        "jobs one client (its token, else its address) may have running or queued; more are refused "
        "(default: half the queue size, at least 1)",
    ),
    (
        "--threads",
        "STYLIZE_THREADS",
        int,
        "onnxruntime intra-op threads per job (default: cores // concurrency)",
    ),
    (
        "--grace-seconds",
        "STYLIZE_GRACE_SECONDS",
        float,
        f"on SIGTERM/SIGINT, how long running jobs may finish before they are cancelled "
        f"(default: {DEFAULT_GRACE_SECONDS:g})",
    ),
    (
        "--stall-seconds",
        "STYLIZE_STALL_SECONDS",
        float,
        "cancel a stream whose client has not taken a message for this long, freeing its thread "
        f"(default: {DEFAULT_STALL_SECONDS:g})",
    ),
    ("--log-level", "STYLIZE_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR (default: INFO)"),
    (
        "--tls-cert",
        "STYLIZE_TLS_CERT",
        Path,
        "PEM certificate (chain) of the server; with --tls-key, serve TLS only (default: plaintext)",
    ),
    ("--tls-key", "STYLIZE_TLS_KEY", Path, "PEM private key of --tls-cert, unencrypted"),
    (
        "--tls-client-ca",
        "STYLIZE_TLS_CLIENT_CA",
        Path,
        "PEM CA certificate(s); require client certificates signed by them (mutual TLS)",
    ),
    (
        "--auth-tokens-file",
        "STYLIZE_AUTH_TOKENS_FILE",
        Path,
        "file of bearer tokens, one a line (# comments); every call but health must send "
        "'authorization: Bearer TOKEN'; re-read when it changes",
    ),
    (
        "--memory-limit-mb",
        "STYLIZE_MEMORY_LIMIT_MB",
        int,
        "memory the server may use, MiB: jobs are admitted, and tiled, so that the idle server and the "
        "running jobs' predicted peaks fit it (default: the container's memory.max, else physical memory, "
        "less 10%% and at least 512 MiB)",
    ),
    (
        "--tile-size",
        "STYLIZE_TILE_SIZE",
        int,
        "evaluate every stage larger than this many px in exact tiles of this size (the network's first "
        "blocks one segment at a time, as many as the memory budget needs); 0 = automatic, only where the "
        "memory budget needs it (default: 0)",
    ),
    (
        "--metrics-port",
        "STYLIZE_METRICS_PORT",
        int,
        "serve Prometheus metrics at http://HOST:PORT/metrics; 0 = off (default: 0)",
    ),
    (
        "--provider",
        "STYLIZE_PROVIDER",
        str,
        "onnxruntime execution provider: auto (CUDA when onnxruntime offers it, else the CPU), cpu, or "
        "cuda (refuse to start without it) (default: auto)",
    ),
    (
        "--ready-file",
        "STYLIZE_READY_FILE",
        Path,
        "once the model is loaded, write JSON with host, port, metrics_port and pid here (removed at "
        "exit), for tools that start a server on port 0 (default: none)",
    ),
    (
        "--state-dir",
        "STYLIZE_STATE_DIR",
        Path,
        "directory of the job store: jobs, their events, checkpoints and results, kept across restarts; "
        "one server per directory (default: $XDG_STATE_HOME/stylize, else ~/.local/state/stylize)",
    ),
    (
        "--store-mb",
        "STYLIZE_STORE_MB",
        int,
        "most the job store may hold, MiB; the oldest finished jobs are deleted first to make room, and a "
        f"job that still does not fit is refused (default: {DEFAULT_STORE_MB})",
    ),
    (
        "--result-ttl-seconds",
        "STYLIZE_RESULT_TTL_SECONDS",
        float,
        f"how long a finished job and its result are kept (default: {DEFAULT_RESULT_TTL_SECONDS:g})",
    ),
    (
        "--checkpoint-seconds",
        "STYLIZE_CHECKPOINT_SECONDS",
        float,
        "how often a running job saves a checkpoint to resume from after a restart; 0 = never "
        f"(default: {DEFAULT_CHECKPOINT_SECONDS:g})",
    ),
    (
        "--store-url",
        "STYLIZE_STORE_URL",
        str,
        "keep the jobs in Redis, shared by every replica, instead of --state-dir: redis://[USER:PASSWORD@]"
        "HOST:PORT/DB, or rediss:// for TLS; any replica then serves any job, from one queue for the fleet "
        "(default: none, the directory store)",
    ),
    (
        "--lease-seconds",
        "STYLIZE_LEASE_SECONDS",
        float,
        "with --store-url: a running job's lease; a replica that has not renewed it for this long is "
        "taken to be gone and another resumes the job from its last checkpoint "
        f"(default: {DEFAULT_LEASE_SECONDS:g})",
    ),
)


class ConfigError(ValueError):
    pass


def setting_name(field: str) -> str:
    """How errors name a setting: "--tls-cert (STYLIZE_TLS_CERT)" for the field tls_cert."""
    for flag, env, _, _ in _SETTINGS:
        if flag.removeprefix("--").replace("-", "_") == field:
            return f"{flag} ({env})"
    raise KeyError(field)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylize-server",
        description="Serve neural style transfer (stylize.v1.StyleTransfer) over gRPC.",
        epilog="Every flag can also be set by the environment variable shown; a flag wins over its variable. "
        "Without TLS or tokens, anyone who can reach the port can use the server: outside loopback, set "
        "--tls-cert/--tls-key and --auth-tokens-file or --tls-client-ca (see the README's Security section).",
    )
    for flag, env, kind, help_text in _SETTINGS:
        # type=str: conversion happens in load_config so that flags and env vars share one error path.
        parser.add_argument(flag, metavar=kind.__name__.upper(), help=f"{help_text} [env: {env}]")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags and the environment; raises ConfigError with the flag or variable at fault."""
    args = build_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for flag, env, kind, _ in _SETTINGS:
        name = flag.removeprefix("--").replace("-", "_")
        raw = getattr(args, name)
        source = flag
        if raw is None:
            raw = environ.get(env) or None
            source = env
        if raw is None:
            continue
        try:
            values[name] = kind(raw)
        except ValueError:
            raise ConfigError(f"{source}: expected {kind.__name__}, got {raw!r}") from None

    if "model" in values:
        values["model_path"] = values.pop("model")
    if "provider" in values:
        values["provider"] = values["provider"].lower()
    values.setdefault("concurrency", default_concurrency())
    if values.get("metrics_port") == 0:
        del values["metrics_port"]  # 0 = off
    config = ServerConfig(**values)
    _validate(config)
    return config


def _validate(config: ServerConfig) -> None:
    checks = (
        (0 <= config.port <= 65535, f"port must be 0..65535, got {config.port}"),
        (
            config.metrics_port is None or 0 <= config.metrics_port <= 65535,
            f"{setting_name('metrics_port')} must be 0..65535, got {config.metrics_port}",
        ),
        (config.max_message_mb > 0, f"max message size must be > 0 MiB, got {config.max_message_mb}"),
        (config.max_pixels >= 256, f"max pixels must be >= 256, got {config.max_pixels}"),
        (config.concurrency >= 1, f"concurrency must be >= 1, got {config.concurrency}"),
        (config.queue_size >= 0, f"queue size must be >= 0, got {config.queue_size}"),
        (
            config.max_jobs_per_client is None or config.max_jobs_per_client >= 1,
            f"max jobs per client must be >= 1, got {config.max_jobs_per_client}",
        ),
        (config.threads is None or config.threads >= 1, f"threads must be >= 1, got {config.threads}"),
        (config.grace_seconds >= 0, f"grace seconds must be >= 0, got {config.grace_seconds}"),
        (
            config.stall_seconds > 0,
            f"{setting_name('stall_seconds')} must be > 0, got {config.stall_seconds}",
        ),
        (
            config.memory_limit_mb is None or config.memory_limit_mb >= 256,
            f"{setting_name('memory_limit_mb')} must be >= 256, got {config.memory_limit_mb}",
        ),
        (
            config.store_mb >= 64,
            f"{setting_name('store_mb')} must be >= 64, got {config.store_mb}",
        ),
        (
            config.result_ttl_seconds >= 0,
            f"{setting_name('result_ttl_seconds')} must be >= 0, got {config.result_ttl_seconds}",
        ),
        (
            config.checkpoint_seconds >= 0,
            f"{setting_name('checkpoint_seconds')} must be >= 0, got {config.checkpoint_seconds}",
        ),
        (
            config.lease_seconds >= 1,
            f"{setting_name('lease_seconds')} must be >= 1, got {config.lease_seconds}",
        ),
        (
            config.store_url is None or config.store_url.startswith(("redis://", "rediss://")),
            f"{setting_name('store_url')} must be a redis:// or rediss:// URL",
        ),
        (
            config.tile_size == 0 or config.tile_size >= 32,
            f"{setting_name('tile_size')} must be 0 or >= 32, got {config.tile_size}",
        ),
        (
            config.provider in PROVIDER_CHOICES,
            f"{setting_name('provider')} must be {', '.join(PROVIDER_CHOICES)}, got {config.provider!r}",
        ),
        (
            config.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            f"log level must be DEBUG, INFO, WARNING or ERROR, got {config.log_level!r}",
        ),
        (
            (config.tls_cert is None) == (config.tls_key is None),
            f"{setting_name('tls_cert')} and {setting_name('tls_key')} go together: give both or neither",
        ),
        (
            config.tls_client_ca is None or config.tls_cert is not None,
            f"{setting_name('tls_client_ca')} needs {setting_name('tls_cert')} and "
            f"{setting_name('tls_key')}: mutual TLS is TLS",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
