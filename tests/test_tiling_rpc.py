"""Through the RPC: a server that tiles (--tile-size 256) gives the untiled server's result."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylize_service.models.paths import default_model_path
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from tests.fakes import channel, running_server

SAMPLES = Path(__file__).resolve().parents[1] / "client" / "samples"
TIMEOUT = 900.0


def run(engine, request: pb.StylizeRequest) -> tuple[list[pb.Progress], pb.Result]:
    with running_server(engine) as (_, address), channel(address) as ch:
        responses = list(pb_grpc.StyleTransferStub(ch).Stylize(request, timeout=TIMEOUT))
    progress = [r.progress for r in responses if r.WhichOneof("event") == "progress"]
    return progress, responses[-1].result


def test_tiled_server_matches_the_untiled_one_at_512_px(real_engine):
    from stylize_service.server.engine.engine import Engine

    request = pb.StylizeRequest(
        content_image=(SAMPLES / "coffee.png").read_bytes(),
        styles=[pb.StyleImage(image=(SAMPLES / "style_swirls.jpg").read_bytes())],
        options=pb.StylizeOptions(max_size=512, iterations=5, init=pb.INIT_NOISE, seed=11),
    )
    if not default_model_path().is_file():
        pytest.skip("the model is not built")
    tiled_engine = Engine(default_model_path(), intra_op_threads=2, tile_size=256)

    untiled_progress, untiled = run(real_engine, request)
    tiled_progress, tiled = run(tiled_engine, request)

    assert (
        untiled_progress[0].tiles == 0 and tiled_progress[0].tile_size == 256 and tiled_progress[0].tiles > 1
    )
    first_untiled, first_tiled = untiled_progress[0].losses.total, tiled_progress[0].losses.total
    assert first_tiled == pytest.approx(first_untiled, rel=1e-5)

    def pixels(result: pb.Result) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(result.image)).convert("RGB"), np.float64) / 255.0

    mse = float(np.mean((pixels(tiled) - pixels(untiled)) ** 2))
    psnr = 10 * np.log10(1.0 / mse) if mse else float("inf")
    assert psnr >= 50.0
