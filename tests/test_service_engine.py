"""The service over the real engine (ONNX VGG16): small images and few iterations, for 2-core CI.

Skipped only when the model has not been built (`bash scripts/setup.sh` builds it; CI always does).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stylize_service.models.paths import default_model_path
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import SERVICE_NAME, StylizeServer
from stylize_service.server.readiness import wait_for_ready_file
from stylize_service.server.servicer import EngineLike
from tests.fakes import LIVENESS, channel, decode_size, image_bytes, running_server, stylize_request


@pytest.fixture(scope="module")
def real_server(real_engine: EngineLike) -> Iterator[tuple[StylizeServer, str]]:
    with running_server(real_engine) as running:
        yield running


@pytest.fixture
def stub(real_server: tuple[StylizeServer, str]) -> Iterator[pb_grpc.StyleTransferStub]:
    with channel(real_server[1]) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def request(**options: object) -> pb.StylizeRequest:
    return stylize_request(image_bytes(96, 64), [image_bytes(64, 64, seed=3)], **{"max_size": 64, **options})


def test_get_info_describes_the_real_model(stub: pb_grpc.StyleTransferStub) -> None:
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS)
    assert info.model.name and info.model.weights_source
    assert {"relu1_1", "relu4_2", "relu5_1"} <= set(info.model.layers)
    assert info.model.providers


def test_stream_frames_in_order_result_of_the_requested_size_and_the_loss_falls(
    stub: pb_grpc.StyleTransferStub,
) -> None:
    responses = list(stub.Stylize(request(iterations=8, frame_every=2), timeout=LIVENESS * 4))
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    progress = [r.progress for r in responses if r.HasField("progress")]
    assert [p.iteration for p in progress] == list(range(len(progress)))
    assert progress[0].iteration == 0 and progress[-1].iteration == responses[-1].result.iterations
    assert progress[-1].losses.total < progress[0].losses.total
    frames = [r.frame for r in responses if r.HasField("frame")]
    iterations = [f.iteration for f in frames]
    assert iterations == sorted(iterations) and len(iterations) >= 3 and all(i % 2 == 0 for i in iterations)
    assert all(decode_size(f.image) == (64, 43) for f in frames)
    result = responses[-1].result
    assert (result.width, result.height) == (64, 43) and decode_size(result.image) == (64, 43)
    assert result.evaluations >= result.iterations


def test_frames_stream_while_the_job_runs_and_cancel_stops_it(
    real_server: tuple[StylizeServer, str], stub: pb_grpc.StyleTransferStub
) -> None:
    # Thousands of iterations would take minutes: a frame arriving at all means it was streamed live.
    call = stub.Stylize(request(iterations=5000, frame_every=2), timeout=LIVENESS * 4)
    started = time.monotonic()
    seen = []
    for response in call:
        seen.append(response.WhichOneof("event"))
        if response.HasField("frame"):
            break
    call.cancel()
    assert "frame" in seen and "result" not in seen
    assert time.monotonic() - started < LIVENESS
    scheduler = real_server[0].scheduler
    deadline = time.monotonic() + LIVENESS
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.running == 0, "the cancelled job kept its worker"


def test_deadline_stops_a_real_job(
    real_server: tuple[StylizeServer, str], stub: pb_grpc.StyleTransferStub
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(iterations=5000), timeout=1.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + LIVENESS
    while real_server[0].scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert real_server[0].scheduler.running == 0


def test_unknown_layer_is_refused_by_the_engine_check(stub: pb_grpc.StyleTransferStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(request(style_layers=[pb.LayerWeight(layer="conv9_9")]), timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.style_layers" in caught.value.details() and "conv9_9" in caught.value.details()


def test_content_only_request_without_styles_completes(stub: pb_grpc.StyleTransferStub) -> None:
    # No style images with style_weight 0 is a valid request (the proto allows it); it once failed INTERNAL.
    req = request(max_size=32, iterations=1, style_weight=0)
    del req.styles[:]
    responses = list(stub.Stylize(req, timeout=LIVENESS))
    result = responses[-1].result
    assert (result.width, result.height) == (32, 21)
    assert result.final_losses.terms["style"] == 0 and not result.final_losses.per_layer["style"].layers
    assert result.final_losses.terms["content"] == result.final_losses.content


def test_losses_report_every_term_by_name(stub: pb_grpc.StyleTransferStub) -> None:
    losses = list(stub.Stylize(request(iterations=1), timeout=LIVENESS))[-1].result.final_losses
    assert set(losses.terms) == {"content", "style", "tv"}
    assert losses.total == pytest.approx(sum(losses.terms.values()), rel=1e-5)
    assert dict(losses.per_layer["style"].layers) == dict(losses.style_per_layer)
    assert losses.terms["style"] == losses.style and losses.terms["tv"] == losses.tv


def test_server_process_serves_then_drains_on_sigterm(tmp_path: Path) -> None:
    """stylize-server end to end: health SERVING once loaded; SIGTERM drains, a second one cancels."""
    if not default_model_path().is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    ready, log_path = tmp_path / "ready.json", tmp_path / "server.log"
    command = [sys.executable, "-m", "stylize_service.server.main", "--host", "127.0.0.1", "--port", "0"]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *command,
                "--grace-seconds",
                "600",
                "--ready-file",
                str(ready),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            stderr=log,
            text=True,
        )
    try:
        info = wait_for_ready_file(ready, process, timeout=LIVENESS * 4)
        assert info.pid == process.pid
        with channel(info.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING  # the ready file comes once SERVING

            call = pb_grpc.StyleTransferStub(ch).Stylize(request(iterations=5000), timeout=LIVENESS * 4)
            assert next(call).HasField("progress")  # the job runs
            # Watched from before the signal: a call that starts once the drain has begun may be refused.
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=LIVENESS)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)  # drain: the job could run for the 600 s grace period...
            assert any(r.status == health_pb2.HealthCheckResponse.NOT_SERVING for r in watch)
            assert next(call).HasField("progress")  # ... and goes on while draining
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)  # ... but a second signal cancels it at once
            with pytest.raises(grpc.RpcError):
                for _ in call:
                    pass
        assert process.wait(LIVENESS) == 0
        rest = log_path.read_text()
        assert "outcome=cancelled" in rest and "stopped" in rest
        assert not ready.exists()  # removed at exit
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_tiles_are_planned_for_the_decoded_image(stub: pb_grpc.StyleTransferStub) -> None:
    # The header (601x31) gives one stage at max_size 600, the decoded image (600x31) two: the plan the
    # engine runs must be the decoded image's, whatever the header's was.
    req = request(max_size=600, iterations=2)
    req.content_image = image_bytes(601, 31)
    result = list(stub.Stylize(req, timeout=LIVENESS * 4))[-1].result
    assert (result.width, result.height) == (600, 31)
