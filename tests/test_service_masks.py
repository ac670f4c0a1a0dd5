"""Masks through the service: GetInfo advertises them, bad masks are INVALID_ARGUMENT naming the field
before a job reaches the engine, and a masked request runs on the real engine."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.servicer import EngineLike
from tests.fakes import LIVENESS, FakeEngine, channel, decode_size, encode, image_bytes, running_server


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def stub(engine: FakeEngine) -> Iterator[pb_grpc.StyleTransferStub]:
    with running_server(engine) as (_, address), channel(address) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def mask_png(width: int, height: int, left: float = 0.5) -> bytes:
    """White on the left `left` share of the picture, black elsewhere."""
    pixels = np.zeros((height, width), np.uint8)
    pixels[:, : round(width * left)] = 255
    return encode(pixels)


def masked_request(**style: bytes) -> pb.StylizeRequest:
    """48x32 content, one 32x32 style with the given mask fields."""
    return pb.StylizeRequest(
        content_image=image_bytes(48, 32),
        styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1), **style)],  # type: ignore[arg-type]
        options=pb.StylizeOptions(max_size=64, iterations=2),
    )


def test_get_info_says_masks_are_supported(stub: pb_grpc.StyleTransferStub) -> None:
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS).features.style_masks


BAD_MASKS = {
    "not an image": (masked_request(mask=b"not a png"), "styles[0].mask is not an image"),
    "aspect ratio": (
        masked_request(mask=mask_png(48, 40)),
        "styles[0].mask is 48x40, an aspect ratio of 1.2",
    ),
    "all black": (masked_request(mask=mask_png(48, 32, left=0.0)), "styles[0].mask is all black"),
    "style mask all black": (
        masked_request(style_mask=mask_png(32, 32, left=0.0)),
        "styles[0].style_mask is all black",
    ),
    "style mask aspect ratio": (
        masked_request(style_mask=mask_png(64, 32)),
        "styles[0].style_mask is 64x32, an aspect ratio of 2",
    ),
}


@pytest.mark.parametrize(("req", "message"), list(BAD_MASKS.values()), ids=list(BAD_MASKS))
def test_bad_masks_are_invalid_argument_naming_the_field(
    stub: pb_grpc.StyleTransferStub, engine: FakeEngine, req: pb.StylizeRequest, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(req, timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert engine.stylize_calls == 0


def test_a_mask_without_a_style_term_is_refused(stub: pb_grpc.StyleTransferStub, engine: FakeEngine) -> None:
    req = masked_request(mask=mask_png(48, 32))
    req.options.style_weight = 0
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(req, timeout=LIVENESS))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "styles[0].mask is given but options.style_weight is 0" in caught.value.details()
    assert engine.stylize_calls == 0


def test_a_mask_turned_like_an_exif_rotated_content_passes_admission(stub: pb_grpc.StyleTransferStub) -> None:
    # Headers carry no orientation: a 32x48 mask for a 48x32 header may be for the content turned.
    assert list(stub.Stylize(masked_request(mask=mask_png(32, 48)), timeout=LIVENESS))[-1].HasField("result")


@pytest.fixture(scope="module")
def real_stub(real_engine: EngineLike) -> Iterator[pb_grpc.StyleTransferStub]:
    with running_server(real_engine) as (_, address), channel(address) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def test_a_masked_request_runs_on_the_real_engine(real_stub: pb_grpc.StyleTransferStub) -> None:
    req = pb.StylizeRequest(
        content_image=image_bytes(96, 64),
        styles=[
            pb.StyleImage(image=image_bytes(64, 64, seed=3), mask=mask_png(96, 64), blend_weight=1),
            pb.StyleImage(
                image=image_bytes(40, 64, seed=4),
                mask=mask_png(192, 128, left=0.6),
                style_mask=mask_png(40, 64),
            ),
        ],
        options=pb.StylizeOptions(max_size=64, iterations=3, style_layers=[pb.LayerWeight(layer="relu2_1")]),
    )
    responses = list(real_stub.Stylize(req, timeout=LIVENESS * 4))
    result = responses[-1].result
    assert (result.width, result.height) == (64, 43) and decode_size(result.image) == (64, 43)
    # The real engine checks the decoded images exactly: a mask off by more than 1% is refused there.
    req.styles[0].mask = mask_png(96, 60)
    with pytest.raises(grpc.RpcError) as caught:
        list(real_stub.Stylize(req, timeout=LIVENESS * 4))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "styles[0].mask" in caught.value.details()
