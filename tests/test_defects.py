"""The defects a probe with hostile but valid requests found (issue 11), each pinned by a test.

(The INTERNAL status for a content-only request is pinned in test_service_engine.py.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import StylizeServer
from stylize_service.server.engine import network as network_module
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.types import StyleSource, StylizeCancelled, StylizeSettings
from stylize_service.server.engine.validation import MAX_WEIGHT
from stylize_service.server.imageio import BadImage, decode_image, probe_image
from stylize_service.server.procfs import rss_bytes
from tests.fakes import LIVENESS, FakeEngine, channel, encode, running_server, stylize_request
from tests.test_service_imageio import png_header_only

LAYERS = ("relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu4_1")


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[StylizeServer, str]]:
    with running_server(FakeEngine()) as running:
        yield running


@pytest.fixture
def stub(fake_server: tuple[StylizeServer, str]) -> Iterator[pb_grpc.StyleTransferStub]:
    with channel(fake_server[1]) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def _request(content: bytes | None = None, **options: object) -> pb.StylizeRequest:
    return stylize_request(content, **{"max_size": 32, "iterations": 1, **options})


def _refusal(stub: pb_grpc.StyleTransferStub, req: pb.StylizeRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Stylize(req, timeout=LIVENESS))
    return caught.value


# --- style_weight 1e308 "succeeded" after 0 iterations with NaN losses -------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"style_weight": 1e308}, "options.style_weight"),
        ({"content_weight": MAX_WEIGHT * 1.01}, "options.content_weight"),
        ({"tv_weight": 3e38}, "options.tv_weight"),
        ({"style_layers": [pb.LayerWeight(layer="relu1_1", weight=3e38)]}, "options.style_layers[0].weight"),
        (
            {"content_layers": [pb.LayerWeight(layer="relu4_2", weight=2e12)]},
            "options.content_layers[0].weight",
        ),
    ],
)
def test_weights_beyond_the_float32_safe_bound_are_refused_naming_the_field(
    stub: pb_grpc.StyleTransferStub, options: dict[str, object], field: str
) -> None:
    error = _refusal(stub, _request(**options))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field} must be at most 1e+12")


def test_weights_at_the_bound_give_finite_losses_on_extreme_images(real_engine: Engine) -> None:
    """The bound's justification, end to end: every weight at MAX_WEIGHT, every style and content layer
    the 32 px image allows, a checkerboard against saturated noise (among the largest losses per unit
    weight measured by scripts/measure_bounds.py weights)."""
    rng = np.random.default_rng(0)
    checker = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, 2)
    noise = (rng.random((32, 32, 3)) > 0.5).astype(np.float32)
    settings = StylizeSettings(
        max_size=32,
        iterations=1,
        content_weight=MAX_WEIGHT,
        style_weight=MAX_WEIGHT,
        tv_weight=MAX_WEIGHT,
        content_layers=tuple((layer, MAX_WEIGHT) for layer in LAYERS),
        style_layers=tuple((layer, MAX_WEIGHT) for layer in LAYERS),
    )

    class Record:
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_progress(self, progress: object) -> None:
            self.losses.append(progress.losses.total)  # type: ignore[attr-defined]

        def on_frame(self, iteration: int, image: np.ndarray) -> None:
            pass

        def should_stop(self) -> bool:
            return False

    observer = Record()
    result = real_engine.stylize(checker, [StyleSource(noise)], settings, observer)
    assert result.iterations == 1 and observer.losses and all(map(math.isfinite, observer.losses))
    assert math.isfinite(result.losses.total) and result.losses.total > 0
    assert all(math.isfinite(v) for v in result.losses.terms.values())
    assert np.isfinite(result.image).all()


# --- headers over Pillow's ~89M pixels were refused in Pillow's words -------------------------


@pytest.mark.parametrize("side", [10_000, 100_000], ids=["over Pillow's warning", "over Pillow's error"])
def test_a_huge_header_is_refused_against_the_server_limit(
    stub: pb_grpc.StyleTransferStub, fake_server: tuple[StylizeServer, str], side: int
) -> None:
    limit = fake_server[0].config.max_pixels
    before = rss_bytes()
    error = _refusal(stub, _request(content=png_header_only(side, side)))  # the rule of every path
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("content_image is ")
    assert f"the server's limit of {limit}" in error.details()
    assert "decompression bomb" not in error.details().lower()
    assert rss_bytes() - before < 200 * 2**20


@pytest.mark.parametrize("pillow_warning", ["error", "ignore", "default"])
def test_decompression_bombs_are_refused_whatever_the_warning_filters(pillow_warning: str) -> None:
    """The rule is imageio's, not stylize-server's: an embedded server and the tests, whose warning
    filters differ, refuse a bomb's header as stylize-server does."""
    with warnings.catch_warnings():
        warnings.simplefilter(pillow_warning, Image.DecompressionBombWarning)  # type: ignore[arg-type]
        for side in (10_000, 100_000):  # Pillow warns, then Pillow fails
            with pytest.raises(BadImage, match="the server's limit of 1000000"):
                probe_image(png_header_only(side, side), 1_000_000)


def test_our_limit_is_checked_first_when_pillow_only_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(BadImage, match="is 10000x10000 = 100000000 pixels, more than the server's limit"):
            probe_image(png_header_only(10_000, 10_000), 1_000_000)
        with pytest.raises(BadImage, match="more than the server's limit of 1000000"):
            decode_image(png_header_only(10_000, 10_000), 1_000_000)


def test_a_server_limit_above_pillows_is_the_one_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # a stand-in for Pillow's ~89M pixels
    with running_server(FakeEngine(), max_pixels=3_000_000) as (_, address), channel(address) as ch:
        assert Image.MAX_IMAGE_PIXELS == 3_000_000
        stub = pb_grpc.StyleTransferStub(ch)
        # 2.25M pixels: over the old Pillow limit, within the server's; its header is read, not refused.
        assert probe_image(png_header_only(1500, 1500), 3_000_000) == (1500, 1500)
        error = _refusal(stub, _request(content=png_header_only(2000, 2000)))
    assert error.details().startswith("content_image is ")
    assert "the server's limit of 3000000" in error.details()


# --- a 1x5000 image was told to "raise the size" ------------------------------------------------


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1)])
def test_an_image_too_thin_at_any_size_is_not_told_to_raise_the_size(
    stub: pb_grpc.StyleTransferStub, size: tuple[int, int]
) -> None:
    width, height = size
    thin = encode(np.full((height, width, 3), 128, np.uint8))
    for max_size in (64, 4096):
        error = _refusal(stub, _request(content=thin, max_size=max_size))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details()
        assert details.startswith("options.max_size gives the image a short side of 1 px")
        assert f"the image ({width}x{height}) is too thin for that at any size" in details
        assert "raise the size" not in details


# --- cancellation did not stop the target passes ------------------------------------------------


class _StopAfter:
    """An observer whose call ends (should_stop turns true) after a number of target passes."""

    def __init__(self) -> None:
        self.stopped = False
        self.evaluations = 0

    def on_progress(self, progress: object) -> None:
        self.evaluations += 1

    def on_frame(self, iteration: int, image: np.ndarray) -> None:
        pass

    def should_stop(self) -> bool:
        return self.stopped


@pytest.mark.parametrize("passes_before_cancel", [1, 2, 3])
def test_cancelling_during_the_target_passes_stops_before_the_next_pass(
    real_engine: Engine, monkeypatch: pytest.MonkeyPatch, passes_before_cancel: int
) -> None:
    observer = _StopAfter()
    passes: list[int] = []
    original = network_module.CompiledChoice.targets

    def counting(
        self: network_module.CompiledChoice, image: np.ndarray, guides: dict[str, np.ndarray] | None = None
    ) -> network_module.Targets:
        passes.append(image.shape[-1])
        if len(passes) == passes_before_cancel:
            observer.stopped = True  # the client cancels while this pass runs
        return original(self, image, guides)

    monkeypatch.setattr(network_module.CompiledChoice, "targets", counting)
    content = np.random.default_rng(1).random((24, 32, 3)).astype(np.float32)
    styles = [StyleSource(np.full((16, 16, 3), v, np.float32)) for v in (0.2, 0.5, 0.8)]
    with pytest.raises(StylizeCancelled):
        real_engine.stylize(content, styles, StylizeSettings(max_size=32, iterations=5), observer)
    # One content pass and three style passes were due; none ran after the cancel, nor any evaluation.
    assert len(passes) == passes_before_cancel and observer.evaluations == 0


def test_a_call_cancelled_before_it_starts_runs_no_pass(
    real_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    observer = _StopAfter()
    observer.stopped = True
    calls: list[int] = []
    monkeypatch.setattr(network_module.CompiledChoice, "targets", lambda self, image: calls.append(1))
    with pytest.raises(StylizeCancelled):
        real_engine.stylize(
            np.zeros((16, 16, 3), np.float32),
            [StyleSource(np.zeros((16, 16, 3), np.float32))],
            StylizeSettings(max_size=16, iterations=1),
            observer,
        )
    assert calls == []
