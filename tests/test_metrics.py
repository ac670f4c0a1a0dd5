"""Prometheus metrics: /metrics after a real job, every job outcome, the gRPC call counter, the gauges."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import StylizeServer
from stylize_service.server.config import ConfigError, load_config
from stylize_service.server.metrics import OUTCOMES, ServerMetrics
from stylize_service.server.servicer import EngineLike
from tests.fakes import LIVENESS, FakeEngine, channel, image_bytes, running_server, stylize_request
from tests.markdown import DOCS, section

STYLIZE = "/stylize.v1.StyleTransfer/Stylize"
GET_INFO = "/stylize.v1.StyleTransfer/GetInfo"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=LIVENESS) as response:
        assert response.status == 200
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(read: Callable[[], Samples], check: Callable[[Samples], bool]) -> Samples:
    """The metrics once check passes: a call's end is counted just after its last message is sent."""
    deadline = time.monotonic() + LIVENESS
    samples = read()
    while not check(samples) and time.monotonic() < deadline:
        time.sleep(0.02)
        samples = read()
    return samples


def request(**options: object) -> pb.StylizeRequest:
    return stylize_request(
        image_bytes(96, 64), [image_bytes(64, 64, seed=3)], **{"max_size": 64, "iterations": 4, **options}
    )


# --- the proof: one real job ----------------------------------------------------------------------


def test_metrics_endpoint_after_one_real_job(real_engine: EngineLike) -> None:
    with running_server(real_engine, metrics_port=0) as (server, address), channel(address) as ch:
        port = server.metrics_port
        assert port  # port 0 asked: the bound port is read back
        stub = pb_grpc.StyleTransferStub(ch)
        stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS)
        result = list(stub.Stylize(request(), timeout=LIVENESS * 4))[-1].result
        assert result.evaluations >= result.iterations == 4

        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(request(max_size=100_000), timeout=LIVENESS))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        samples = eventually(
            lambda: scrape(port),
            lambda s: (
                value(s, "stylize_grpc_requests_total", method=STYLIZE, code="INVALID_ARGUMENT") == 1
                and value(s, "stylize_jobs_total", outcome="invalid") == 1
            ),
        )
    assert value(samples, "stylize_jobs_total", outcome="ok") == 1
    assert value(samples, "stylize_jobs_total", outcome="invalid") == 1
    for outcome in ("cancelled", "deadline", "refused", "error"):
        assert ("stylize_jobs_total", frozenset({("outcome", outcome)})) in samples  # exported at 0
        assert value(samples, "stylize_jobs_total", outcome=outcome) == 0
    assert value(samples, "stylize_evaluation_seconds_count") >= result.evaluations
    assert value(samples, "stylize_evaluation_seconds_sum") > 0
    # The invalid request never started: only the real job has a run time and a queue wait.
    assert value(samples, "stylize_job_seconds_count") == 1
    assert value(samples, "stylize_queue_wait_seconds_count") == 1
    assert value(samples, "stylize_job_seconds_bucket", le="+Inf") == 1
    assert value(samples, "stylize_grpc_requests_total", method=STYLIZE, code="OK") == 1
    assert value(samples, "stylize_grpc_requests_total", method=GET_INFO, code="OK") == 1
    assert value(samples, "stylize_jobs_running") == 0 and value(samples, "stylize_queue_depth") == 0
    assert value(samples, "process_resident_memory_bytes") > 0  # the process collector
    assert value(samples, "stylize_memory_budget_bytes") == server.config.memory_budget_bytes > 0
    assert value(samples, "stylize_memory_reserved_bytes") == 0  # nothing runs now


# --- every outcome, with the fake engine ------------------------------------------------------------


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine) -> Iterator[tuple[StylizeServer, str]]:
    with running_server(engine, queue_size=1) as running:
        yield running


@pytest.fixture
def stub(server: tuple[StylizeServer, str]) -> Iterator[pb_grpc.StyleTransferStub]:
    with channel(server[1]) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def metrics_of(server: StylizeServer) -> Callable[[], Samples]:
    return lambda: parse(server.metrics.exposition().decode())


def read_in_background(call: grpc.Call) -> threading.Thread:
    def read() -> None:
        try:
            for _ in call:  # type: ignore[attr-defined]
                pass
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_refused_cancelled_and_the_gauges_while_one_job_runs_and_one_waits(
    engine: FakeEngine, server: tuple[StylizeServer, str], stub: pb_grpc.StyleTransferStub
) -> None:
    engine.gate = threading.Event()
    engine.started = [threading.Event()]
    running = stub.Stylize(request(), timeout=LIVENESS)
    running_reader = read_in_background(running)
    assert engine.started[0].wait(LIVENESS)
    queued = stub.Stylize(request(), timeout=LIVENESS)
    queued_reader = read_in_background(queued)
    read = metrics_of(server[0])
    samples = eventually(read, lambda s: value(s, "stylize_queue_depth") == 1)
    assert value(samples, "stylize_jobs_running") == 1 and value(samples, "stylize_queue_depth") == 1

    with pytest.raises(grpc.RpcError) as caught:  # one running, one waiting: the queue of one is full
        list(stub.Stylize(request(), timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    queued.cancel()
    running.cancel()
    for reader in (queued_reader, running_reader):
        reader.join(LIVENESS)
    samples = eventually(read, lambda s: value(s, "stylize_jobs_total", outcome="cancelled") == 2)
    assert value(samples, "stylize_jobs_total", outcome="cancelled") == 2
    assert value(samples, "stylize_jobs_total", outcome="refused") == 1
    assert value(samples, "stylize_jobs_total", outcome="ok") == 0
    # Only the job that ran has a run time; the one cancelled in the queue never started.
    assert value(samples, "stylize_job_seconds_count") == 1
    assert value(samples, "stylize_grpc_requests_total", method=STYLIZE, code="RESOURCE_EXHAUSTED") == 1
    samples = eventually(
        read, lambda s: value(s, "stylize_grpc_requests_total", method=STYLIZE, code="CANCELLED") == 2
    )
    assert value(samples, "stylize_grpc_requests_total", method=STYLIZE, code="CANCELLED") == 2
    assert value(samples, "stylize_jobs_running") == 0 and value(samples, "stylize_queue_depth") == 0


def test_a_passed_deadline_is_its_own_outcome(
    engine: FakeEngine, server: tuple[StylizeServer, str], stub: pb_grpc.StyleTransferStub
) -> None:
    engine.gate = threading.Event()  # held until the deadline passes
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    samples = eventually(
        metrics_of(server[0]),
        lambda s: (
            value(s, "stylize_jobs_total", outcome="deadline") == 1
            and value(s, "stylize_grpc_requests_total", method=STYLIZE, code="DEADLINE_EXCEEDED") == 1
        ),
    )
    assert value(samples, "stylize_jobs_total", outcome="deadline") == 1
    assert value(samples, "stylize_jobs_total", outcome="cancelled") == 0
    assert value(samples, "stylize_grpc_requests_total", method=STYLIZE, code="DEADLINE_EXCEEDED") == 1


def test_an_engine_failure_counts_as_error_and_internal() -> None:
    with (
        running_server(FakeEngine(fail_with=RuntimeError("boom"))) as (server, address),
        channel(address) as ch,
    ):
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.StyleTransferStub(ch).Stylize(request(), timeout=LIVENESS))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        samples = eventually(
            metrics_of(server),
            lambda s: value(s, "stylize_grpc_requests_total", method=STYLIZE, code="INTERNAL") == 1,
        )
    assert value(samples, "stylize_jobs_total", outcome="error") == 1
    assert value(samples, "stylize_grpc_requests_total", method=STYLIZE, code="INTERNAL") == 1


def test_a_call_before_the_model_loads_is_refused_and_counted_unavailable() -> None:
    with running_server(None) as (server, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        for call in (
            lambda: list(stub.Stylize(request(), timeout=LIVENESS)),
            lambda: stub.GetInfo(pb.GetInfoRequest()),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        samples = eventually(
            metrics_of(server),
            lambda s: (
                value(s, "stylize_grpc_requests_total", method=GET_INFO, code="UNAVAILABLE") == 1
                and value(s, "stylize_grpc_requests_total", method=STYLIZE, code="UNAVAILABLE") == 1
            ),
        )
    assert value(samples, "stylize_jobs_total", outcome="refused") == 1


# --- the module's own API and the flag -----------------------------------------------------------------


def test_memory_gauges_show_the_budget_and_the_running_jobs_reservation() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    engine.started = [threading.Event()]
    with running_server(engine, memory_limit_mb=4096) as (server, address), channel(address) as ch:
        read = metrics_of(server)
        assert value(read(), "stylize_memory_budget_bytes") == 4096 * 2**20
        assert value(read(), "stylize_memory_reserved_bytes") == 0
        call = pb_grpc.StyleTransferStub(ch).Stylize(request(), timeout=LIVENESS)
        reader = read_in_background(call)
        try:
            assert engine.started[0].wait(LIVENESS)
            reserved = server.scheduler.reserved_memory
            assert reserved > 0  # the job's predicted peak, as the scheduler admitted it
            assert value(read(), "stylize_memory_reserved_bytes") == reserved
        finally:
            engine.gate.set()
            reader.join(LIVENESS)
        samples = eventually(read, lambda s: value(s, "stylize_memory_reserved_bytes") == 0)
    assert value(samples, "stylize_memory_reserved_bytes") == 0


def test_an_unknown_outcome_is_a_programming_error() -> None:
    with running_server(FakeEngine()) as (server, _), pytest.raises(ValueError, match="unknown job outcome"):
        server.metrics.job_finished("maybe", queue_wait=None, ran=None)
    assert set(OUTCOMES) == {"ok", "cancelled", "deadline", "invalid", "refused", "error"}


def test_two_servers_in_one_process_count_separately() -> None:
    with running_server(FakeEngine()) as (one, address), running_server(FakeEngine()) as (two, _):
        with channel(address) as ch:
            list(pb_grpc.StyleTransferStub(ch).Stylize(request(), timeout=LIVENESS))
        samples = eventually(metrics_of(one), lambda s: value(s, "stylize_jobs_total", outcome="ok") == 1)
        assert value(samples, "stylize_jobs_total", outcome="ok") == 1
        assert value(metrics_of(two)(), "stylize_jobs_total", outcome="ok") == 0


def test_the_endpoint_is_off_unless_a_port_is_given_and_stops_with_the_server() -> None:
    assert load_config([], environ={}).metrics_port is None
    assert load_config([], environ={"STYLIZE_METRICS_PORT": "0"}).metrics_port is None
    assert load_config(["--metrics-port", "9464"], environ={}).metrics_port == 9464
    assert load_config([], environ={"STYLIZE_METRICS_PORT": "9464"}).metrics_port == 9464
    with pytest.raises(
        ConfigError, match=re.escape("--metrics-port (STYLIZE_METRICS_PORT) must be 0..65535, got 70000")
    ):
        load_config(["--metrics-port", "70000"], environ={})
    with running_server(FakeEngine()) as (server, _):
        assert server.metrics_port is None
    with running_server(FakeEngine(), metrics_port=0) as (server, _):
        port = server.metrics_port
        assert port and value(scrape(port), "stylize_jobs_running") == 0
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_every_metric_is_documented() -> None:
    text = section(DOCS / "deployment.md", "## Metrics")
    names = {
        family.name for family in ServerMetrics().registry.collect() if family.name.startswith("stylize_")
    }
    assert len(names) == 15
    undocumented = {name for name in names if f"`{name}`" not in text and f"`{name}_total`" not in text}
    assert not undocumented, f"docs/deployment.md's Metrics section lacks {sorted(undocumented)}"


def test_calls_refused_for_want_of_a_token_are_counted(tmp_path: Path) -> None:
    # The metrics interceptor comes before the token interceptor, so it sees its refusals too.
    tokens = tmp_path / "tokens"
    tokens.write_text("a-valid-token-of-some-length\n")
    with running_server(FakeEngine(), auth_tokens_file=tokens) as (server, address), channel(address) as ch:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.StyleTransferStub(ch).GetInfo(pb.GetInfoRequest(), timeout=LIVENESS)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        samples = eventually(
            metrics_of(server),
            lambda s: value(s, "stylize_grpc_requests_total", method=GET_INFO, code="UNAUTHENTICATED") == 1,
        )
    assert value(samples, "stylize_grpc_requests_total", method=GET_INFO, code="UNAUTHENTICATED") == 1
