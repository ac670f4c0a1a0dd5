"""`stylize-server`: configure, listen, load the model, serve until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from stylize_service.server import readiness
from stylize_service.server.app import SERVICE_NAME, StylizeServer
from stylize_service.server.config import ConfigError, ServerConfig, load_config, setting_name
from stylize_service.server.engine import providers
from stylize_service.server.logsafe import EscapingFormatter
from stylize_service.server.security import ServerSecurity

if TYPE_CHECKING:
    from stylize_service.server.engine.engine import Engine

logger = logging.getLogger("stylize.server")

EXIT_CONFIG = 2  # bad flags or environment, missing model, unusable TLS or tokens file, provider not offered
EXIT_START = 3  # cannot listen, the model failed to load, or the requested provider did not start


def log_handler() -> logging.Handler:
    """The server's log: stderr, one line per message whatever a client put in it (EscapingFormatter)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as err:
        print(f"stylize-server: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=config.log_level.upper(), handlers=[log_handler()])
    try:  # after logging is set up: reading the tokens file may warn about its lines
        security = ServerSecurity.from_config(config)
    except ConfigError as err:
        print(f"stylize-server: error: {err}", file=sys.stderr)
        return EXIT_CONFIG

    try:  # what the installed onnxruntime offers is known now; whether a GPU answers, only at load
        providers.execution_providers(config.provider)
    except providers.ProviderUnavailable as err:
        print(
            f"stylize-server: error: {setting_name('provider')} is {config.provider}: {err}", file=sys.stderr
        )
        return EXIT_CONFIG

    model_path = config.resolved_model_path
    if not model_path.is_file():
        print(
            f"stylize-server: error: the model file {model_path} does not exist.\n"
            "Build it with `bash scripts/setup.sh` (or `stylize-build-model`), "
            "or point --model / STYLIZE_MODEL at it.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return serve(config, security)


def serve(config: ServerConfig, security: ServerSecurity | None = None) -> int:
    try:
        server = StylizeServer(config, security)
    except ConfigError as err:  # only when security was not read yet
        print(f"stylize-server: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        port = server.start()
    except (OSError, RuntimeError) as err:
        logger.error("cannot start: %s", err)
        return EXIT_START
    logger.info(
        "listening on %s:%d (%s; health NOT_SERVING until the model is loaded); concurrency=%d queue=%d "
        "threads/job=%d max_pixels=%d max_message=%dB",
        config.host,
        port,
        server.security.describe(),
        config.concurrency,
        config.queue_size,
        config.intra_op_threads,
        config.max_pixels,
        config.max_message_bytes,
    )

    stop = threading.Event()  # the first SIGTERM/SIGINT: drain
    hurry = threading.Event()  # a second one: cancel the running jobs now

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only set flags here; the main thread acts on them (grpc calls are not signal-safe).
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.warning("%s again: cancelling the running jobs now", name)
            hurry.set()
        else:
            logger.info("%s: draining (send it again to cancel the running jobs at once)", name)
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        engine = _load_engine(config)
    except providers.ProviderUnavailable as err:
        logger.error("%s", err)
        server.drain(0)
        return EXIT_START
    except Exception as err:
        logger.error("cannot load the model %s: %s", config.resolved_model_path, err)
        server.drain(0)
        return EXIT_START
    if stop.is_set():  # a signal arrived while loading
        server.drain(0)
        return 0
    server.set_engine(engine)
    logger.info("model loaded; health SERVING for '' and %r", SERVICE_NAME)
    if config.ready_file is not None:
        try:
            readiness.write_ready_file(
                config.ready_file, readiness.ReadyInfo(config.host, port, os.getpid(), server.metrics_port)
            )
        except OSError as err:
            logger.error("cannot write %s %s: %s", setting_name("ready_file"), config.ready_file, err)
            server.drain(0)
            return EXIT_START
    try:
        _serve_until_signalled(server, stop, hurry)
    finally:
        if config.ready_file is not None:
            readiness.remove_ready_file(config.ready_file)
    logger.info("stopped")
    return 0


def _serve_until_signalled(server: StylizeServer, stop: threading.Event, hurry: threading.Event) -> None:
    """Serve until the first signal, then drain; a second signal cuts the drain's grace short."""
    while not stop.wait(1.0):  # a timed wait, so that the signal handler runs promptly
        pass
    drainer = threading.Thread(target=server.drain, name="drain")
    drainer.start()
    while drainer.is_alive():
        drainer.join(0.5)
        if hurry.is_set():
            server.cancel_all()
            hurry.clear()


def _load_engine(config: ServerConfig) -> Engine:
    # Imported here, not at the top: onnxruntime is slow to import, and --help should not wait for it.
    from stylize_service.server.engine.engine import Engine

    started = time.perf_counter()
    requested = providers.execution_providers(config.provider)
    engine = Engine(
        config.resolved_model_path,
        providers=requested,
        intra_op_threads=config.intra_op_threads,
        tile_size=config.tile_size,
    )
    info = engine.info
    if missing := providers.not_started(requested, info.providers):
        reason = (
            f"onnxruntime could not start {', '.join(missing)} (no GPU visible to this process, or the "
            "driver or the CUDA/cuDNN libraries missing: see onnxruntime's messages above)"
        )
        if config.provider != "auto":
            raise providers.ProviderUnavailable(
                f"{setting_name('provider')} is {config.provider}, but {reason}"
            )
        logger.warning("%s; running on %s instead", reason, ", ".join(info.providers))
    engine.warm_up()  # compile the default layer choice's graphs now, not on the first request
    logger.info(
        "loaded %s (%s) from %s in %.1fs; execution providers %s (--provider %s)",
        info.name,
        info.weights_source,
        config.resolved_model_path,
        time.perf_counter() - started,
        ", ".join(info.providers),
        config.provider,
    )
    return engine


if __name__ == "__main__":
    raise SystemExit(main())
