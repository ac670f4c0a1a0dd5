"""Fairness and resource control in the service (fake engine): admission before decoding, the per-client
bound, frames and results encoded by the job's worker, GetInfo's load and limits, and client identity."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import admission, convert, imageio, job_worker
from stylize_service.server.config import load_config
from stylize_service.server.engine.validation import MAX_WEIGHT
from stylize_service.server.identity import client_identity, peer_host
from stylize_service.server.scheduler import ClientLimit, QueueFull, Scheduler
from tests.fakes import FakeEngine, channel, encode, gradient, image_bytes, running_server
from tests.test_service_server import LIVENESS, Collector, kinds, request, wait_until

WORKER_THREAD = "stylize-job-"


@pytest.fixture
def held() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    engine.gate = threading.Event()
    engine.started = [threading.Event() for _ in range(8)]
    yield engine
    engine.gate.set()


class _Spy:
    """Wraps an image function (server/imageio.py) wherever the service calls it from, recording the name
    of each calling thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.threads: list[str] = []
        original = getattr(imageio, name)

        def spy(*args: object, **kwargs: object) -> object:
            self.threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        for module in (admission, job_worker, convert):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy)


# --- the scheduler's per-client bound ------------------------------------------------------------


def test_scheduler_bounds_each_client_and_frees_its_place_on_release() -> None:
    scheduler = Scheduler(concurrency=1, queue_size=4, max_per_client=2)
    a1, a2 = scheduler.enqueue("a"), scheduler.enqueue("a")
    with pytest.raises(ClientLimit) as caught:
        scheduler.enqueue("a")
    assert caught.value.limit == 2
    b1 = scheduler.enqueue("b")  # another client is not affected
    assert [t.position for t in (a1, a2, b1)] == [0, 1, 2]
    assert (scheduler.jobs_of("a"), scheduler.jobs_of("b")) == (2, 1)

    a2.cancel()
    a2.release()  # a queued job leaving gives its place back
    a2.release()  # idempotent
    assert scheduler.jobs_of("a") == 1
    a3 = scheduler.enqueue("a")
    a1.release()  # a running job ending does too
    assert scheduler.jobs_of("a") == 1 and b1.admitted and a3.position == 1


def test_scheduler_client_bound_counts_refused_jobs_not_at_all() -> None:
    scheduler = Scheduler(concurrency=1, queue_size=0, max_per_client=1)
    scheduler.enqueue("a")
    with pytest.raises(QueueFull):
        scheduler.enqueue("b")
    assert scheduler.jobs_of("b") == 0


def test_default_jobs_per_client_is_half_the_queue_and_at_least_one() -> None:
    assert load_config([], environ={}).jobs_per_client == 4  # queue 8
    assert load_config(["--queue-size", "0"], environ={}).jobs_per_client == 1
    assert load_config(["--queue-size", "3"], environ={}).jobs_per_client == 1
    config = load_config([], environ={"STYLIZE_MAX_JOBS_PER_CLIENT": "6"})
    assert config.jobs_per_client == 6
    assert (
        load_config(
            ["--max-jobs-per-client", "2"], environ={"STYLIZE_MAX_JOBS_PER_CLIENT": "6"}
        ).jobs_per_client
        == 2
    )


def test_max_jobs_per_client_must_be_positive() -> None:
    from stylize_service.server.config import ConfigError

    with pytest.raises(ConfigError, match="max jobs per client must be >= 1, got 0"):
        load_config(["--max-jobs-per-client", "0"], environ={})


# --- client identity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:53211", "10.0.0.7"),
        ("ipv6:[::1]:50051", "::/64"),
        ("ipv6:[2001:db8:1:2:aaaa::5]:4000", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:bbbb::9]:4001", "2001:db8:1:2::/64"),  # same /64: the same client
        ("ipv6:[::ffff:192.0.2.1]:80", "192.0.2.1"),
        ("ipv6:[fe80::1%25eth0]:80", "fe80::/64"),
        ("unix:/run/stylize.sock", "unix:/run/stylize.sock"),
    ],
)
def test_peer_host_drops_the_port_and_groups_ipv6_by_64(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_identity_is_the_address_unless_tokens_are_verified() -> None:
    token = [("authorization", "Bearer s3cret")]
    assert client_identity("ipv4:10.0.0.7:1", token, trust_tokens=False) == "peer:10.0.0.7"
    trusted = client_identity("ipv4:10.0.0.7:1", token, trust_tokens=True)
    assert trusted.startswith("token:") and "s3cret" not in trusted and len(trusted) == len("token:") + 12
    other = client_identity("ipv4:10.0.0.8:1", [("authorization", "Bearer other")], trust_tokens=True)
    assert other != trusted
    # Same token from another address: the same client.
    assert client_identity("ipv4:10.9.9.9:2", token, trust_tokens=True) == trusted
    assert client_identity("ipv4:10.0.0.7:1", [("authorization", "Basic x")], trust_tokens=True) == (
        "peer:10.0.0.7"
    )


def test_identity_under_mutual_tls_is_the_certificate_unless_a_token_is_verified() -> None:
    cert = [b"client.example"]
    named = client_identity("ipv4:10.0.0.7:1", None, trust_tokens=False, certificate=cert)
    assert named.startswith("cert:") and len(named) == len("cert:") + 12
    # The same certificate from another address is the same client; another certificate is not.
    assert client_identity("ipv4:10.9.9.9:2", None, trust_tokens=False, certificate=cert) == named
    assert client_identity("ipv4:10.0.0.7:1", None, trust_tokens=False, certificate=[b"other"]) != named
    token = [("authorization", "Bearer s3cret")]
    assert client_identity("ipv4:10.0.0.7:1", token, trust_tokens=True, certificate=cert).startswith("token:")


# --- the per-client bound through the RPC ------------------------------------------------------


def test_a_client_over_its_bound_is_refused_naming_the_limit(held: FakeEngine) -> None:
    with running_server(held, queue_size=4, max_jobs_per_client=2) as (srv, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        running = Collector(stub, request())
        assert held.started[0].wait(LIVENESS)
        queued = Collector(stub, request())
        assert queued.wait_for(lambda rs: len(rs) >= 1)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(request(), timeout=LIVENESS))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_jobs_per_client = 2" in caught.value.details()
        assert srv.scheduler.waiting == 1  # the refused call never took a place

        queued.call.cancel()  # a place of the client's frees up: it may send another
        assert wait_until(lambda: srv.scheduler.jobs_of("peer:127.0.0.1") == 1)
        again = Collector(stub, request())
        assert again.wait_for(lambda rs: len(rs) >= 1)
        held.gate.set()  # type: ignore[union-attr]
        for collector in (running, again):
            collector.join()
            assert collector.error is None and kinds(collector.responses)[-1] == "result"
        assert wait_until(lambda: srv.scheduler.jobs_of("peer:127.0.0.1") == 0)


def test_get_info_reports_the_new_limits_the_cache_and_the_load(held: FakeEngine) -> None:
    with running_server(held, queue_size=4, max_jobs_per_client=3) as (_, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS)
        assert info.limits.max_weight == MAX_WEIGHT and info.limits.max_jobs_per_client == 3
        assert info.HasField("graph_cache") and (info.load.running_jobs, info.load.queued_jobs) == (0, 0)
        running = Collector(stub, request())
        assert held.started[0].wait(LIVENESS)
        queued = Collector(stub, request())
        assert queued.wait_for(lambda rs: len(rs) >= 1)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS)
        assert (info.load.running_jobs, info.load.queued_jobs) == (1, 1)
        held.gate.set()  # type: ignore[union-attr]
        running.join()
        queued.join()
        assert wait_until(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS).load.running_jobs == 0)


# --- admission before decoding; work in the worker ----------------------------------------------


def test_images_are_decoded_by_the_worker_only_after_admission(
    held: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _Spy(monkeypatch, "decode_image")
    with running_server(held) as (_, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        running = Collector(stub, request())
        assert held.started[0].wait(LIVENESS)
        assert len(decodes.threads) == 2  # the running job's content and style
        queued = Collector(stub, request())
        assert queued.wait_for(lambda rs: len(rs) >= 1) and queued.positions == [1]
        assert len(decodes.threads) == 2  # the queued job holds its encoded bytes only
        held.gate.set()  # type: ignore[union-attr]
        running.join()
        queued.join()
        assert queued.error is None and kinds(queued.responses)[-1] == "result"
    assert len(decodes.threads) == 4 and all(name.startswith(WORKER_THREAD) for name in decodes.threads)


def test_frames_and_the_result_are_encoded_by_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    encodes = _Spy(monkeypatch, "encode_image")
    with running_server(FakeEngine()) as (_, address), channel(address) as ch:
        req = request(iterations=4, frame_every=1, frame_max_size=128, frame_format=pb.IMAGE_FORMAT_PNG)
        responses = list(pb_grpc.StyleTransferStub(ch).Stylize(req, timeout=LIVENESS))
    frames = [r.frame for r in responses if r.HasField("frame")]
    assert [f.iteration for f in frames] == [1, 2, 3, 4]
    assert all((f.width, f.height, f.mime_type) == (128, 85, "image/png") for f in frames)
    assert len(encodes.threads) == 5  # four frames and the result
    assert all(name.startswith(WORKER_THREAD) for name in encodes.threads)


def test_a_header_the_decoder_cannot_read_is_refused_before_queueing(held: FakeEngine) -> None:
    with running_server(held) as (srv, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        running = Collector(stub, request())
        assert held.started[0].wait(LIVENESS)
        bad = request()
        bad.styles[0].image = b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # a PNG signature and no header
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(bad, timeout=LIVENESS))  # answered at once, though the worker is busy
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("styles[0].image ")
        assert srv.scheduler.waiting == 0
        held.gate.set()  # type: ignore[union-attr]
        running.join()


def test_pixels_the_decoder_cannot_read_are_refused_by_the_worker_naming_the_field() -> None:
    # A sound header with corrupt pixel data passes the checks before queueing; the worker finds it.
    png = encode(gradient(48, 32))
    corrupt = png[:60] + bytes(b ^ 0xFF for b in png[60:-12]) + png[-12:]
    engine = FakeEngine()
    with running_server(engine) as (srv, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        req = request()
        req.content_image = corrupt
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(req, timeout=LIVENESS))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("content_image could not be decoded")
        assert engine.stylize_calls == 0 and wait_until(lambda: srv.scheduler.running == 0)
        assert kinds(list(stub.Stylize(request(iterations=2), timeout=LIVENESS)))[-1] == "result"


def test_a_thin_image_is_refused_from_its_header_before_queueing(held: FakeEngine) -> None:
    with running_server(held) as (srv, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        running = Collector(stub, request())
        assert held.started[0].wait(LIVENESS)
        req = request(max_size=64)
        req.content_image = image_bytes(400, 4)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Stylize(req, timeout=LIVENESS))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "options.max_size gives the image a short side of 1 px" in caught.value.details()
        assert srv.scheduler.waiting == 0
        held.gate.set()  # type: ignore[union-attr]
        running.join()


def test_a_call_cancelled_while_its_worker_decodes_stops_before_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEngine()
    decoding = threading.Event()
    release = threading.Event()
    original = admission.decode_image

    def slow_decode(data: bytes, max_pixels: int, max_side: int | None = None) -> np.ndarray:
        decoding.set()
        release.wait(LIVENESS)
        return original(data, max_pixels, max_side)

    monkeypatch.setattr(admission, "decode_image", slow_decode)
    with running_server(engine) as (srv, address), channel(address) as ch:
        collector = Collector(pb_grpc.StyleTransferStub(ch), request())
        assert decoding.wait(LIVENESS)
        collector.call.cancel()
        assert wait_until(lambda: not collector.thread.is_alive())
        release.set()
        assert wait_until(lambda: srv.scheduler.running == 0)
    assert engine.stylize_calls == 0
