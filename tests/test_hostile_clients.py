"""The defects of the second hostile probe, each as a test that failed before its fix.

Every one needs no token, or only what any client has: health Watch floods, streams nobody reads,
unknown method names, silent connections to /metrics, newlines and megabytes in client strings, and
metadata that is not UTF-8. (The tokens file's cases are in test_security.py; large styles under a tight
memory budget in test_memory.py.)
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import main as server_main
from stylize_service.server.app import EXTRA_THREADS, StylizeServer
from stylize_service.server.logsafe import EscapingFormatter, LogThrottle
from stylize_service.server.metrics import MetricsEndpoint
from tests.fakes import FakeEngine, channel, image_bytes, running_server, wait_until
from tests.raw_http2 import raw_call

TOKEN = secrets.token_urlsafe(24)
ANSWER_SECONDS = 2.0  # health and GetInfo must answer within this under every pattern


def _answers(address: str) -> None:
    """Health Check and GetInfo both answer within ANSWER_SECONDS on a fresh channel."""
    with channel(address) as ch:
        started = time.monotonic()
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_SECONDS)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        pb_grpc.StyleTransferStub(ch).GetInfo(pb.GetInfoRequest(), timeout=ANSWER_SECONDS)
        assert time.monotonic() - started < ANSWER_SECONDS


def _handler_threads(server: StylizeServer) -> int:
    config = server.config
    return config.concurrency + config.queue_size + EXTRA_THREADS


# --- 1. health Watch floods ------------------------------------------------------------------------


def test_health_watches_hold_no_handler_thread() -> None:
    """Defect: the metrics interceptor rewrapped every handler and so lost grpcio's non-blocking Watch:
    each Watch held a handler thread, and as many Watches as threads stopped every other call."""
    with running_server(FakeEngine(), queue_size=8) as (server, address):
        watchers = [channel(address) for _ in range(_handler_threads(server) + 3)]
        streams = []
        try:
            for ch in watchers:
                stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
                streams.append(stream)
            _answers(address)
            # The watches are counted when they end, by their status.
            for stream in streams:
                stream.cancel()
            counted = f'code="CANCELLED",method="/grpc.health.v1.Health/Watch"}} {len(streams)}.0'
            assert wait_until(lambda: counted in server.metrics.exposition().decode())
        finally:
            for ch in watchers:
                ch.close()


# --- 3. streams nobody reads -----------------------------------------------------------------------


def _frame_heavy_request() -> pb.StylizeRequest:
    """A quick job whose frames add up to far more than an HTTP/2 window."""
    return pb.StylizeRequest(
        content_image=image_bytes(384, 256),
        styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1))],
        options=pb.StylizeOptions(
            max_size=256, iterations=200, frame_every=1, frame_format=pb.IMAGE_FORMAT_PNG
        ),
    )


def test_streams_nobody_reads_neither_starve_the_server_nor_outlive_the_stall_bound() -> None:
    """Defect: a finished job's stream that the client never read kept its handler thread forever (the
    send blocked on a full HTTP/2 window), and the per-client bound did not count it: 17 such calls took
    every thread. Now a call holds its place until its stream ends, and a stream that takes no message
    for --stall-seconds is cancelled."""
    engine = FakeEngine()
    with running_server(engine, queue_size=8, max_jobs_per_client=4, stall_seconds=20.0) as (server, address):
        # Without BDP probing the stream's window stays at HTTP/2's 64 KiB, so that a few frames fill it.
        channels = [
            grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
            for _ in range(_handler_threads(server))
        ]
        calls = []
        try:
            for ch in channels:  # one after another, each on a new channel, never read
                calls.append(pb_grpc.StyleTransferStub(ch).Stylize(_frame_heavy_request()))
                # Its job ends (or the call is refused) before the next call: only the unread streams
                # are left holding the server, and the bound on running and queued jobs never applies.
                assert wait_until(
                    lambda: calls[-1].done() or engine.completed + engine.cancelled == len(calls)
                )
            _answers(address)
            refused = [c for c in calls if c.done() and c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(refused) == len(calls) - 4, "the per-client bound must count streams that still send"
            # Past the stall bound the unread streams are cancelled, and their places come back (the
            # clients learn it only once they read: their status is queued behind the messages).
            accepted = len(calls) - len(refused)
            assert wait_until(lambda: server.servicer._stalls.cancelled == accepted, timeout=60), (
                server.servicer._stalls.cancelled,
                accepted,
            )
            assert wait_until(lambda: server.scheduler.jobs_of("peer:127.0.0.1") == 0)
            with channel(address) as ch:  # and the server serves again
                responses = list(pb_grpc.StyleTransferStub(ch).Stylize(_frame_heavy_request(), timeout=30))
                assert responses[-1].HasField("result")
        finally:
            for ch in channels:
                ch.close()


# --- 4. unknown method names -----------------------------------------------------------------------


def test_unknown_methods_make_no_metric_series_and_no_log_lines_with_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: with --auth-tokens-file the token interceptor answered unknown methods itself, so every
    made-up name became a stylize_grpc_requests_total series and a log line (10,000 names: 83 MB)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    caplog.set_level(logging.INFO)
    with running_server(FakeEngine(), auth_tokens_file=tokens) as (server, address):
        before = len(server.metrics.exposition())
        with channel(address) as ch:
            for index in range(50):
                name = f"/x.Y/Z{secrets.token_hex(8)}{index}"
                with pytest.raises(grpc.RpcError) as raised:
                    ch.unary_unary(name)(b"", timeout=5)
                assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
        exposition = server.metrics.exposition().decode()
        assert "/x.Y/Z" not in exposition
        assert len(exposition) - before < 2048
        assert "/x.Y/Z" not in caplog.text


# --- 5. silent connections to /metrics -------------------------------------------------------------


def test_metrics_endpoint_bounds_and_times_out_silent_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect: prometheus-client's server kept a thread and a descriptor for every connection as long as
    the client liked; a thousand silent ones took every file descriptor, the gRPC port's too."""
    monkeypatch.setattr(MetricsEndpoint, "SOCKET_TIMEOUT_SECONDS", 1.0)
    with running_server(FakeEngine(), metrics_port=0) as (server, address):
        port = server.metrics_port
        assert port is not None
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
        try:

            def closed_by_server(sock: socket.socket) -> bool:
                sock.settimeout(0.05)
                try:
                    return sock.recv(1) == b""
                except TimeoutError:
                    return False
                except OSError:
                    return True

            # A scrape gets in while they are open: a new connection past the bound ends the oldest.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert b"stylize_jobs_total" in response.read()
            # Beyond the bound they are closed at once; within it, after the timeout.
            assert wait_until(
                lambda: sum(map(closed_by_server, silent)) >= 60 - MetricsEndpoint.MAX_CONNECTIONS
            )
            assert wait_until(lambda: all(map(closed_by_server, silent)), timeout=10)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert b"stylize_jobs_total" in response.read()
            _answers(address)
        finally:
            for sock in silent:
                sock.close()


# --- 7. forged log lines ---------------------------------------------------------------------------


def test_the_servers_log_has_one_line_per_message(capsys: pytest.CaptureFixture[str]) -> None:
    """Defect: a client string with a newline (a raw HTTP/2 :path) wrote a forged line into the log."""
    formatter = EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord(
        "stylize.server", logging.INFO, __file__, 1, "refused %s", ("/a/B\n2026-01-01 INFO FAKE LINE",), None
    )
    line = formatter.format(record)
    assert "\n" not in line and "\\n2026-01-01 INFO FAKE LINE" in line
    long = logging.LogRecord("stylize.server", logging.INFO, __file__, 1, "%s", ("x" * 100_000,), None)
    assert len(formatter.format(long)) < 5000
    # stylize-server logs through it.
    handler = server_main.log_handler()
    assert isinstance(handler.formatter, EscapingFormatter)


# --- 8. megabytes in client strings ----------------------------------------------------------------


def test_a_huge_layer_name_is_quoted_short_in_the_status_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect: an 8 MB layer name was copied whole into the status message (the client saw
    RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of INVALID_ARGUMENT) and the log."""
    caplog.set_level(logging.INFO)
    name = "relu" + "9" * (3 * 1024 * 1024)
    request = pb.StylizeRequest(
        content_image=image_bytes(48, 32),
        styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1))],
        options=pb.StylizeOptions(max_size=32, iterations=1, style_layers=[pb.LayerWeight(layer=name)]),
    )
    with (
        running_server(FakeEngine()) as (_, address),
        channel(address, max_message_mb=8) as ch,
        pytest.raises(grpc.RpcError) as raised,
    ):
        list(pb_grpc.StyleTransferStub(ch).Stylize(request, timeout=30))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details()
    assert details.startswith("options.style_layers[0].layer") and len(details) < 600
    assert f"({len(name)} characters)" in details
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


# --- 9. a token in grpc's own log ------------------------------------------------------------------


def _quiet_http2_client(caplog: pytest.LogCaptureFixture) -> None:
    for name in ("hpack", "h2"):
        caplog.set_level(logging.WARNING, logger=name)


def test_metadata_that_is_not_utf8_never_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: an authorization value with invalid UTF-8 made grpc log it whole ("Invalid encoding on
    b'Bearer tok...\\xff'"), though tokens are never to be logged. grpc's client refuses to send such a
    value, so the call is made as raw HTTP/2."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    caplog.set_level(logging.DEBUG)
    _quiet_http2_client(caplog)  # it logs the headers it sends, in this process: not the server's log
    secret = TOKEN[:12]
    with running_server(FakeEngine(), auth_tokens_file=tokens) as (_, address):
        host, _, port = address.rpartition(":")
        answer = raw_call(
            host,
            int(port),
            b"/stylize.v1.StyleTransfer/GetInfo",
            headers=[(b"authorization", f"Bearer {secret}".encode() + b"\xff\xfe")],
        )
    assert answer.get(b"grpc-status") == str(grpc.StatusCode.UNAUTHENTICATED.value[0]).encode()
    assert secret not in caplog.text
    if "Invalid encoding" in caplog.text:  # grpc logged the value's decoding failure ...
        assert "not shown" in caplog.text  # ... without the value


def test_a_newline_in_the_method_path_forges_no_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: a :path of "/stylize.v1.StyleTransfer/GetInfo\\n2026-01-01 ... FAKE LINE" wrote a forged
    line into the log (the token interceptor logged the method it refused)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    caplog.set_level(logging.DEBUG)
    _quiet_http2_client(caplog)
    forged = b"/stylize.v1.StyleTransfer/GetInfo\n2026-01-01 00:00:00,000 INFO stylize.server: FAKE LINE"
    with running_server(FakeEngine(), auth_tokens_file=tokens) as (_, address):
        host, _, port = address.rpartition(":")
        answer = raw_call(host, int(port), forged)
        # No such method: gRPC's own answer, never the token check's, which logged the path it refused.
        assert answer.get(b"grpc-status") == str(grpc.StatusCode.UNIMPLEMENTED.value[0]).encode()
        with channel(address) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert "FAKE LINE" not in caplog.text


# --- the log's throttle ----------------------------------------------------------------------------


def test_log_throttle_writes_a_rate_and_counts_the_rest() -> None:
    throttle = LogThrottle(per_interval=3, interval=0.5)
    admitted = [throttle.admit("refused") for _ in range(10)]
    assert admitted[:3] == [0, 0, 0] and admitted[3:] == [None] * 7
    assert throttle.admit("invalid") == 0  # another kind has its own rate
    time.sleep(0.6)
    assert throttle.admit("refused") == 7  # the next line written says how many were held back
