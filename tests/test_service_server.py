"""The gRPC service in-process on a loopback port, over the fake engine (fast, and its timing is ours).

Covers health and reflection, GetInfo, the response stream, every kind of bad input, message limits,
cancellation, deadlines, the queue and draining. The real engine's stream is in test_service_engine.py.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import SERVICE_NAME, StylizeServer
from stylize_service.server.engine.types import Losses
from stylize_service.server.jobs.feed import Subscription
from tests.fakes import (
    LIVENESS,
    FakeEngine,
    channel,
    decode_size,
    encode,
    gradient,
    image_bytes,
    running_server,
    stylize_request,
    wait_until,
)
from tests.test_service_imageio import png_header_only

LOSSES = Losses(1.0, {"content": 0.5, "style": 0.5, "tv": 0.0}, {"content": {}, "style": {}})


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine) -> Iterator[tuple[StylizeServer, str]]:
    with running_server(engine) as running:
        yield running


@pytest.fixture
def stub(server: tuple[StylizeServer, str]) -> Iterator[pb_grpc.StyleTransferStub]:
    with channel(server[1]) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def request(**options: object) -> pb.StylizeRequest:
    return stylize_request(**{"max_size": 64, "iterations": 6, **options})


def kinds(responses: list[pb.StylizeResponse]) -> list[str]:
    return [str(r.WhichOneof("event")) for r in responses]


class Collector:
    """Reads one streaming call on a thread, recording events as they arrive."""

    def __init__(self, stub: pb_grpc.StyleTransferStub, req: pb.StylizeRequest, timeout: float | None = None):
        self.call = stub.Stylize(req, timeout=timeout)
        self.responses: list[pb.StylizeResponse] = []
        self.error: grpc.RpcError | None = None
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                with self.changed:
                    self.responses.append(response)
                    self.changed.notify_all()
        except grpc.RpcError as err:
            self.error = err
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate: object, timeout: float = LIVENESS) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.responses), timeout)  # type: ignore[operator]

    def join(self) -> None:
        self.thread.join(LIVENESS)
        assert not self.thread.is_alive(), "the stream did not end"

    @property
    def positions(self) -> list[int]:
        return [r.queued.position for r in self.responses if r.HasField("queued")]

    @property
    def progressed(self) -> bool:
        return any(r.HasField("progress") for r in self.responses)


# --- health, reflection, GetInfo ----------------------------------------------------------------


def test_health_is_serving_for_the_server_and_the_service(server: tuple[StylizeServer, str]) -> None:
    with channel(server[1]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=LIVENESS)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_not_serving_and_unavailable_until_the_model_is_loaded() -> None:
    with running_server(engine=None) as (srv, address), channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=LIVENESS)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.StyleTransferStub(ch).Stylize(request(), timeout=LIVENESS))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in caught.value.details()

        srv.set_engine(FakeEngine())
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=LIVENESS)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_service(server: tuple[StylizeServer, str]) -> None:
    with channel(server[1]) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        services = database.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        descriptor = database.FindFileContainingSymbol(SERVICE_NAME)
        assert descriptor.package == "stylize.v1"
        assert [m.name for m in descriptor.service[0].method] == [
            "Stylize",
            "GetInfo",
            "SubmitJob",
            "WatchJob",
            "GetJob",
            "CancelJob",
            "ListJobs",
        ]


def test_get_info_reports_model_defaults_and_limits(
    server: tuple[StylizeServer, str], stub: pb_grpc.StyleTransferStub
) -> None:
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS)
    assert info.model.name == "fake-vgg16" and "relu4_2" in info.model.layers
    assert info.model.preprocessing.channel_order == "RGB" and len(info.model.preprocessing.mean) == 3
    assert info.defaults.max_size == 512 and info.defaults.iterations == 500
    assert [lw.layer for lw in info.defaults.content_layers] == ["relu4_2"]
    config = server[0].config
    assert info.limits.max_pixels == config.max_pixels
    assert info.limits.max_message_bytes == config.max_message_bytes
    assert (info.limits.concurrency, info.limits.queue_size) == (config.concurrency, config.queue_size)
    assert info.server_version


# --- the stream ---------------------------------------------------------------------------------


def test_stream_reports_every_iteration_then_frames_then_the_result(stub: pb_grpc.StyleTransferStub) -> None:
    responses = list(stub.Stylize(request(iterations=6, frame_every=2), timeout=LIVENESS))
    assert kinds(responses)[-1] == "result" and kinds(responses).count("result") == 1
    progress = [r.progress for r in responses if r.HasField("progress")]
    assert [p.iteration for p in progress] == list(range(7))  # iteration 0 = the initial image
    assert progress[-1].losses.total < progress[0].losses.total
    assert set(progress[0].losses.style_per_layer) == {"relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"}
    frames = [r.frame for r in responses if r.HasField("frame")]
    assert [f.iteration for f in frames] == [2, 4, 6]
    for frame in frames:  # each frame follows the progress of its iteration
        index = next(i for i, r in enumerate(responses) if r.HasField("frame") and r.frame is frame)
        assert responses[index - 1].progress.iteration == frame.iteration
        assert frame.mime_type == "image/jpeg" and decode_size(frame.image) == (frame.width, frame.height)
    result = responses[-1].result
    assert (result.width, result.height) == (64, 43)  # 48x32 content, longest side 64
    assert decode_size(result.image) == (64, 43) and result.mime_type == "image/png"
    assert result.iterations == 6 and result.evaluations == 7
    assert result.final_losses.total == pytest.approx(progress[-1].losses.total)


def test_frames_arrive_while_the_job_runs(engine: FakeEngine, stub: pb_grpc.StyleTransferStub) -> None:
    # The engine waits after its first frame until the client has it: proof that frames are streamed
    # as they are made, not buffered until the end.
    received = threading.Event()
    engine.on_frame_sent = lambda iteration: (iteration == 2 and received.wait(LIVENESS)) or None
    collector = Collector(stub, request(iterations=4, frame_every=2), timeout=LIVENESS * 2)
    assert collector.wait_for(lambda rs: any(r.HasField("frame") for r in rs))
    assert not any(r.HasField("result") for r in collector.responses)
    received.set()
    collector.join()
    assert collector.error is None and kinds(collector.responses)[-1] == "result"


def test_frames_are_scaled_to_frame_max_size_and_format(stub: pb_grpc.StyleTransferStub) -> None:
    responses = list(
        stub.Stylize(
            request(
                frame_every=3,
                frame_max_size=32,
                frame_format=pb.IMAGE_FORMAT_PNG,
                output_format=pb.IMAGE_FORMAT_WEBP,
            ),
            timeout=LIVENESS,
        )
    )
    frames = [r.frame for r in responses if r.HasField("frame")]
    assert frames and all((f.width, f.height, f.mime_type) == (32, 21, "image/png") for f in frames)
    result = responses[-1].result
    assert result.mime_type == "image/webp"
    with Image.open(io.BytesIO(result.image)) as image:
        assert image.format == "WEBP" and image.size == (64, 43)


def test_unread_frames_are_coalesced_without_blocking_the_producer() -> None:
    def frame(iteration: int) -> pb.StylizeResponse:
        return pb.StylizeResponse(frame=pb.Frame(iteration=iteration, image=b"x" * 100))

    def progress(iteration: int) -> pb.StylizeResponse:
        return pb.StylizeResponse(progress=pb.Progress(iteration=iteration))

    events = Subscription(max_pending_frame_bytes=200)  # room for two unsent frames
    for iteration in (1, 2, 3, 4):
        events.put(frame(iteration))  # nobody reads: must not block
        events.put(progress(iteration))
    assert events.dropped_frames == 2
    drained = iter(lambda: events.get(0.0), None)
    kept = []
    for item in drained:
        assert isinstance(item, pb.StylizeResponse)
        kind = item.WhichOneof("event")
        kept.append((kind, getattr(item, kind).iteration))
    # Every progress event is kept, in order; the two oldest frames gave way to the newest two.
    assert kept == [
        ("progress", 1),
        ("progress", 2),
        ("frame", 3),
        ("progress", 3),
        ("frame", 4),
        ("progress", 4),
    ]


# --- bad input ----------------------------------------------------------------------------------


def _with(**changes: object) -> pb.StylizeRequest:
    req = request()
    for name, value in changes.items():
        if name == "styles":
            del req.styles[:]
            req.styles.extend(value)  # type: ignore[arg-type]
        elif name == "content_image":
            req.content_image = value  # type: ignore[assignment]
        else:
            setattr(req.options, name, value) if not isinstance(value, list) else getattr(
                req.options, name
            ).extend(value)
    return req


BAD_REQUESTS = {
    "empty content": (_with(content_image=b""), "content_image is empty"),
    "undecodable content": (_with(content_image=b"GIF89a not really"), "content_image "),
    "too many pixels": (_with(content_image=encode(gradient(1001, 1000))), "content_image is 1001x1000"),
    "decompression bomb": (
        _with(content_image=png_header_only(50_000, 50_000)),
        "content_image is larger than the server's limit of 1000000 pixels: its header announces more than",
    ),
    "no style": (_with(styles=[]), "styles is empty"),
    "undecodable style": (_with(styles=[pb.StyleImage(image=b"\x89PNG\r\n\x1a\n")]), "styles[0].image "),
    "style weight NaN": (
        _with(styles=[pb.StyleImage(image=image_bytes(), blend_weight=math.nan)]),
        "styles[0].blend_weight must be a finite number >= 0",
    ),
    "too many styles": (_with(styles=[pb.StyleImage(image=image_bytes())] * 17), "styles has 17 images"),
    "max_size 0": (_with(max_size=0), "options.max_size must be between 16 and 4096, got 0"),
    "iterations 0": (_with(iterations=0), "options.iterations must be between 1 and"),
    "content_weight NaN": (_with(content_weight=math.nan), "options.content_weight must be a finite number"),
    "style_weight inf": (_with(style_weight=math.inf), "options.style_weight must be a finite number"),
    "tv_weight negative": (_with(tv_weight=-1.0), "options.tv_weight must be a finite number >= 0"),
    "unknown layer": (
        _with(style_layers=[pb.LayerWeight(layer="relu9_9")]),
        "options.style_layers[0].layer names an unknown layer 'relu9_9'",
    ),
    "init image missing": (_with(init=pb.INIT_IMAGE), "options.init_image is required"),
    "undecodable init image": (_with(init_image=b"nope"), "options.init_image "),
    "negative seed": (_with(seed=-5), "options.seed must be between 0 and"),
    "min_size above max_size": (
        _with(max_size=64, min_size=128),
        "options.min_size must be between 16 and options.max_size (64), got 128",
    ),
    "too thin for the layers": (
        _with(content_image=image_bytes(400, 4), max_size=64),
        "options.max_size gives the image a short side of 1 px, but layer relu5_1 needs at least 16 px",
    ),
}


@pytest.mark.parametrize(("req", "message"), list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field_and_the_server_carries_on(
    stub: pb_grpc.StyleTransferStub, engine: FakeEngine, req: pb.StylizeRequest, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(req, timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert engine.stylize_calls == 0  # refused before reaching the engine (the servicer's own check)
    responses = list(stub.Stylize(request(iterations=2), timeout=LIVENESS))
    assert kinds(responses)[-1] == "result"


def test_engine_invalid_settings_at_run_time_is_invalid_argument(
    engine: FakeEngine, stub: pb_grpc.StyleTransferStub
) -> None:
    from stylize_service.server.engine.types import InvalidSettings

    engine.fail_with = InvalidSettings("min_size", "must be at most {max_size} here")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(), timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "options.min_size must be at most options.max_size here"


def test_engine_crash_is_internal_and_frees_the_worker(
    server: tuple[StylizeServer, str], engine: FakeEngine, stub: pb_grpc.StyleTransferStub
) -> None:
    engine.fail_with = RuntimeError("kaboom")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(), timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "kaboom" in caught.value.details()
    assert wait_until(lambda: server[0].scheduler.running == 0)
    engine.fail_with = None
    assert kinds(list(stub.Stylize(request(), timeout=LIVENESS)))[-1] == "result"


def test_oversize_message_is_resource_exhausted(server: tuple[StylizeServer, str]) -> None:
    limit = server[0].config.max_message_bytes
    req = request()
    req.content_image = b"\0" * (limit + 1)
    with channel(server[1], max_message_mb=limit * 4 / 2**20) as ch, pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.StyleTransferStub(ch).Stylize(req, timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()


# --- cancellation, deadlines, the queue ---------------------------------------------------------


@pytest.fixture
def held(engine: FakeEngine) -> Iterator[FakeEngine]:
    """The engine holds every job before each iteration until the test lets go."""
    engine.gate = threading.Event()
    engine.started = [threading.Event() for _ in range(8)]
    yield engine
    engine.gate.set()


def test_cancel_frees_the_worker_for_the_next_queued_job(
    held: FakeEngine, stub: pb_grpc.StyleTransferStub, server: tuple[StylizeServer, str]
) -> None:
    first = Collector(stub, request())
    assert held.started[0].wait(LIVENESS)
    second = Collector(stub, request())
    assert second.wait_for(lambda rs: any(r.HasField("queued") for r in rs))
    assert second.positions == [1] and not held.started[1].is_set()

    first.call.cancel()
    assert held.started[1].wait(LIVENESS), "the queued job did not start after the running one was cancelled"
    assert wait_until(lambda: held.cancelled == 1)
    first.join()
    assert first.error is not None and first.error.code() == grpc.StatusCode.CANCELLED

    held.gate.set()  # type: ignore[union-attr]
    second.join()
    assert second.error is None and kinds(second.responses)[-1] == "result"
    assert held.max_running == 1


def test_deadline_ends_the_job_and_frees_the_worker(
    held: FakeEngine, stub: pb_grpc.StyleTransferStub, server: tuple[StylizeServer, str]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: held.cancelled == 1 and server[0].scheduler.running == 0)


def test_queue_reports_positions_and_refuses_past_its_bound(
    held: FakeEngine, stub: pb_grpc.StyleTransferStub, server: tuple[StylizeServer, str]
) -> None:
    assert server[0].config.queue_size == 2
    running = Collector(stub, request())
    assert held.started[0].wait(LIVENESS)
    second = Collector(stub, request())
    assert second.wait_for(lambda rs: len(rs) >= 1)
    third = Collector(stub, request())
    assert third.wait_for(lambda rs: len(rs) >= 1)
    assert (second.positions, third.positions) == ([1], [2])

    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(), timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in caught.value.details()

    second.call.cancel()  # a cancelled waiter leaves the queue: the third moves up
    assert third.wait_for(lambda rs: [r.queued.position for r in rs if r.HasField("queued")] == [2, 1])
    held.gate.set()  # type: ignore[union-attr]
    for collector in (running, third):
        collector.join()
        assert collector.error is None and kinds(collector.responses)[-1] == "result"
    assert held.jobs_started == 2 and held.max_running == 1


def test_drain_refuses_new_and_queued_jobs_and_cancels_running_ones_after_the_grace(held: FakeEngine) -> None:
    with running_server(held) as (srv, address), channel(address) as ch:
        stub = pb_grpc.StyleTransferStub(ch)
        running = Collector(stub, request())
        assert held.started[0].wait(LIVENESS)
        queued = Collector(stub, request())
        assert queued.wait_for(lambda rs: len(rs) >= 1)

        drained = threading.Thread(target=srv.drain, args=(0.2,))
        drained.start()
        queued.join()
        running.join()
        drained.join(LIVENESS)
        assert not drained.is_alive()
        assert queued.error is not None and queued.error.code() == grpc.StatusCode.UNAVAILABLE
        assert running.error is not None  # cancelled by the server once the grace period passed
        assert held.cancelled == 1 and srv.scheduler.running == 0
