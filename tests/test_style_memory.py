"""Style target passes within the memory budget: tiled where the plan says so, with the untiled targets,
and through a real server whose resident memory stays within its --memory-limit-mb."""

from __future__ import annotations

import dataclasses
import math

import grpc
import numpy as np
import pytest

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.engine.lbfgs_workspace import MAXCOR
from stylize_service.server.engine.memory import JobMemory
from stylize_service.server.engine.tile_layout import TileScheme
from stylize_service.server.engine.types import (
    Init,
    StyleSource,
    StylizeSettings,
)
from stylize_service.server.procfs import peak_rss_bytes, reset_peak, rss_bytes
from tests.fakes import LossRecorder, channel, gradient, image_bytes, running_server

MB = 2**20


def test_a_tiled_style_pass_gives_the_untiled_job_s_losses(real_engine):
    # An untiled 64 px stage whose 192 px style pass (style_scale 3) runs in 64 px tiles, as the plan
    # chooses where the whole pass would not fit: the same loss at every iteration, up to float rounding.
    content = gradient(64, 48, seed=1).astype(np.float32) / 255.0
    style = gradient(192, 160, seed=2).astype(np.float32) / 255.0
    settings = StylizeSettings(max_size=64, style_scale=3, iterations=3, init=Init.CONTENT)

    def run(style_tile: int) -> list[float]:
        planned = real_engine.plan((64, 48), [(192, 160)], settings)
        style_scheme = TileScheme.whole(style_tile, planned.choice) if style_tile else None
        memory = JobMemory(schemes=(None,), histories=(MAXCOR,), peak_bytes=0, style_schemes=(style_scheme,))
        observer = LossRecorder()
        real_engine.stylize(
            content,
            [StyleSource(style)],
            settings,
            observer,
            plan=dataclasses.replace(planned, memory=memory),
        )
        return observer.totals

    untiled, tiled = run(0), run(64)
    assert len(untiled) == len(tiled) == settings.iterations + 1
    assert tiled == pytest.approx(untiled, rel=1e-5)


def test_a_large_style_under_a_tight_budget_stays_within_it_or_is_refused_naming_memory(real_engine):
    # A 128 px output at style_scale 8 takes its 1024x1024 style whole: about 1 GB untiled, beside 600 MB
    # for jobs. The server runs the style pass in tiles (or refuses the job); its resident memory, this
    # process's, stays within --memory-limit-mb.
    if not reset_peak():
        pytest.skip("this kernel does not let a process reset its VmHWM (/proc/self/clear_refs)")
    limit_mb = math.ceil(rss_bytes() / MB) + 600
    request = pb.StylizeRequest(
        content_image=image_bytes(128, 96),
        styles=[pb.StyleImage(image=image_bytes(1024, 1024, fmt="JPEG", seed=3))],
        options=pb.StylizeOptions(max_size=128, style_scale=8, iterations=2, seed=1),
    )
    with (
        running_server(real_engine, memory_limit_mb=limit_mb, max_pixels=2_000_000) as (_, address),
        channel(address) as ch,
    ):
        reset_peak()
        try:
            responses = list(pb_grpc.StyleTransferStub(ch).Stylize(request, timeout=600))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert err.details().startswith("memory: "), err.details()
            return
        peak = peak_rss_bytes()
    assert responses[-1].HasField("result") and responses[-1].result.width == 128
    assert peak <= limit_mb * MB, f"peak {peak / MB:.0f} MB over the {limit_mb} MB budget"
