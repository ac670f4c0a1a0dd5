"""The memory model, the budget, and admission by predicted peak (server.engine.memory, server.scheduler)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from stylize_service.models.layers import LayerChoice
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.engine import memory
from stylize_service.server.engine.memory import MemoryExceeded, plan_job, stage_bytes
from stylize_service.server.engine.plan import layer_choice, plan
from stylize_service.server.engine.pyramid import Stage
from stylize_service.server.engine.tile_layout import TileScheme
from stylize_service.server.engine.types import StylizeSettings
from stylize_service.server.scheduler import Scheduler
from tests.fakes import FakeEngine, channel, image_bytes, running_server

CHOICE = LayerChoice.of(
    {"content": ("relu4_2",), "style": ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")}
)
MB = 2**20


def plan_job_memory(
    content: tuple[int, int],
    settings: StylizeSettings,
    styles: list[tuple[int, int]],
    budget: int | None,
    forced_tile: int = 0,
) -> memory.JobMemory:
    """The memory part of the job's plan."""
    return plan(content, styles, settings, budget=budget, forced_tile=forced_tile).memory


def stage(width: int, height: int) -> Stage:
    return Stage(0, 1, width, height, iterations=10)


def plan_content(stages: list[Stage], budget: int | None, forced_tile: int = 0) -> memory.JobMemory:
    """The plan of the content's stages alone (no style image)."""
    return plan_job(stages, CHOICE, budget, forced_tile, style_sizes=(), style_scale=1.0)


def all_schemes(stage_: Stage) -> list[TileScheme]:
    return [s for t in memory.TILE_SIZES if t < stage_.longest for s in memory.tile_schemes(t, CHOICE)]


def test_untiled_where_it_fits_else_the_fastest_tiles_that_fit():
    big = stage(2048, 1536)
    untiled = stage_bytes(big, CHOICE, None)
    headroom = 1 - memory.PLAN_HEADROOM
    assert plan_content([big], None).tiles == (0,)
    assert plan_content([big], int(untiled / headroom) + 1).tiles == (0,)
    # Untiled would fill the budget, so tiles that leave the headroom free are taken: of the ways that
    # do, the one of least predicted time.
    tiled = plan_content([big], untiled)
    assert tiled.tiles[0] in memory.TILE_SIZES and tiled.peak_bytes <= untiled * headroom
    fitting = [s for s in all_schemes(big) if stage_bytes(big, CHOICE, s) <= untiled * headroom]
    fastest = min(fitting, key=lambda s: memory.predicted_seconds(big, CHOICE, s))
    assert memory.predicted_seconds(big, CHOICE, tiled.schemes[0]) == memory.predicted_seconds(
        big, CHOICE, fastest
    )
    # Tiling a block one at a time, with its own small halo, is predicted faster than the whole network
    # as one segment with the deepest layer's halo, and leaving the deep blocks untiled faster still.
    assert (
        memory.predicted_seconds(big, CHOICE, TileScheme.by_block(256, 1))
        < memory.predicted_seconds(big, CHOICE, TileScheme.by_block(256, 5))
        < memory.predicted_seconds(big, CHOICE, TileScheme.whole(256, CHOICE))
    )
    # A smaller budget, a slower way; the L-BFGS state itself is never tiled.
    smaller = plan_content([big], int(stage_bytes(big, CHOICE, TileScheme.by_block(256, 5)) / headroom))
    assert memory.predicted_seconds(big, CHOICE, smaller.schemes[0]) >= memory.predicted_seconds(
        big, CHOICE, tiled.schemes[0]
    )
    assert tiled.histories == smaller.histories == (memory.MAXCOR,)
    # Below what the least memory way needs with the full history, a shorter history; below the shortest
    # one's L-BFGS state alone, nothing fits.
    least = min(stage_bytes(big, CHOICE, s) for s in all_schemes(big))
    squeezed = plan_content([big], least - 1)
    assert squeezed.histories[0] < memory.MAXCOR and squeezed.histories[0] in memory.HISTORIES
    assert squeezed.peak_bytes == stage_bytes(big, CHOICE, squeezed.schemes[0], squeezed.histories[0])
    shortest = min(memory.HISTORIES)
    # Where nothing leaves the headroom free, the whole budget is used rather than the job refused.
    tightest = min(stage_bytes(big, CHOICE, s, shortest) for s in all_schemes(big))
    assert plan_content([big], tightest).peak_bytes == tightest
    with pytest.raises(MemoryExceeded, match="MB of memory"):
        plan_content([big], memory.lbfgs_bytes_per_variable(shortest) * 3 * 2048 * 1536)


def test_the_peak_is_the_largest_stage_and_forced_tiles_apply_above_their_size():
    stages = [Stage(0, 2, 256, 192, 10), Stage(1, 2, 512, 384, 10)]
    job = plan_content(stages, None, forced_tile=256)
    assert job.tiles == (0, 256)
    assert job.histories == (memory.MAXCOR, memory.MAXCOR)
    # Forced tiles without a budget: the fastest scheme, the first block tiled and the others not.
    assert job.schemes[1] == TileScheme.by_block(256, 1)
    assert job.peak_bytes == max(
        stage_bytes(stages[0], CHOICE, None), stage_bytes(stages[1], CHOICE, job.schemes[1])
    )


def test_budget_comes_from_the_cgroup_limit_less_a_margin(monkeypatch):
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/sys/fs/cgroup/memory.max":
            return "8589934592\n"
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert memory.default_budget_bytes() == 8 * 2**30 - int(0.1 * 8 * 2**30)


def test_unlimited_cgroup_falls_back_to_physical_memory(monkeypatch):
    real_read = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: "max\n" if "cgroup" in str(self) else real_read(self, *a, **k),
    )
    assert (
        0
        < memory.default_budget_bytes()
        < memory.os.sysconf("SC_PAGE_SIZE") * memory.os.sysconf("SC_PHYS_PAGES")
    )


def test_scheduler_admits_by_memory_beside_the_running_jobs():
    scheduler = Scheduler(concurrency=3, queue_size=4, memory_capacity=100)
    first = scheduler.enqueue(memory=60)
    assert first.position == 0
    second = scheduler.enqueue(memory=50)  # 60 + 50 > 100: waits although a slot is free
    assert second.position == 1
    third = scheduler.enqueue(memory=10)  # FIFO: not admitted past the waiting job
    assert third.position == 2 and scheduler.reserved_memory == 60
    first.release()
    assert second.position == 0 and third.position == 0 and scheduler.reserved_memory == 60
    second.release()
    third.release()
    assert scheduler.reserved_memory == 0 and scheduler.running == 0


def test_a_job_larger_than_the_capacity_still_runs_alone():
    # The servicer refuses jobs that can never fit; one that was planned to fit an idle server starts.
    scheduler = Scheduler(concurrency=2, queue_size=2, memory_capacity=100)
    alone = scheduler.enqueue(memory=150)
    assert alone.position == 0
    assert scheduler.enqueue(memory=1).position == 1
    alone.release()


def test_a_job_that_fits_at_no_tile_size_is_refused_at_once_naming_memory():
    engine = FakeEngine()
    engine.gate = threading.Event()  # would hold any job that started
    with running_server(engine, memory_limit_mb=256) as (server, address):
        capacity = server.scheduler.memory_capacity
        assert capacity is not None and capacity < 256 * MB
        with channel(address) as ch:
            stub = pb_grpc.StyleTransferStub(ch)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            assert (
                info.limits.memory_budget_bytes == 256 * MB and info.limits.memory_for_jobs_bytes == capacity
            )
            request = pb.StylizeRequest(
                content_image=image_bytes(48, 32),
                styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1))],
                # 1024x683: L-BFGS-B's state alone is about 500 MB, at any tile size.
                options=pb.StylizeOptions(max_size=1024, iterations=2),
            )
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Stylize(request, timeout=10))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details().startswith("memory: the job needs about")
    assert engine.stylize_calls == 0


def test_a_job_too_large_for_the_full_history_runs_with_a_shorter_one_and_says_so():
    engine = FakeEngine()
    with running_server(engine, memory_limit_mb=3000) as (server, address):
        capacity = server.scheduler.memory_capacity
        assert capacity is not None
        # The smallest output of the 48x32 content image whose plan must shorten L-BFGS-B's history.
        for size in range(1024, 4097, 32):
            plan = plan_job_memory(
                (48, 32), StylizeSettings(max_size=size, iterations=1), [(32, 32)], capacity
            )
            if plan.histories[-1] < memory.MAXCOR:
                break
        else:
            pytest.fail(f"every size fits {capacity} bytes with the full history")
        request = pb.StylizeRequest(
            content_image=image_bytes(48, 32),
            styles=[pb.StyleImage(image=image_bytes(32, 32, seed=1))],
            options=pb.StylizeOptions(max_size=size, iterations=1),
        )
        with channel(address) as ch:
            events = list(pb_grpc.StyleTransferStub(ch).Stylize(request, timeout=60))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and all(p.correction_pairs == plan.histories[-1] for p in progress)
    assert events[-1].HasField("result")


def test_the_plan_counts_a_style_pass_larger_than_the_content_and_tiles_it():
    # Reported: a 256 px content at style_scale 8 takes its 2048x2048 style whole (about 4 GB), which a
    # plan of the content's pixels alone put at 169 MB.
    settings = StylizeSettings(max_size=256, style_scale=8, iterations=2)
    styles = [(2048, 2048)]
    untiled_pass = memory.style_pass_bytes((2048, 2048), (2048, 2048))
    assert plan_job_memory((1024, 768), settings, styles, None).peak_bytes >= untiled_pass > 4000 * MB
    # 2000 MB beside a 500 MB idle server: the style pass runs in tiles, within the budget.
    budget = 1500 * MB
    plan = plan_job_memory((1024, 768), settings, styles, budget)
    assert plan.tiles == (0,) and plan.style_tiles[0] in memory.TILE_SIZES
    assert plan.peak_bytes <= budget
    choice = layer_choice(settings, 1)
    assert plan.peak_bytes >= memory.style_pass_bytes(
        (2048, 2048), (2048, 2048), plan.style_schemes[0], choice
    )
    # Below what its smallest tiles need, refused naming the style image and its size.
    with pytest.raises(MemoryExceeded, match=r"the style image styles\[0\], scaled to 2048x2048 px"):
        plan_job_memory((1024, 768), settings, styles, 500 * MB)


def test_every_stage_counts_its_own_style_pass():
    # Reported: a 512x32 content at max_size 4096 peaked in its 2048x128 stage, whose style pass (the
    # style scaled to 2048 px) the plan did not count.
    settings = StylizeSettings(max_size=4096, iterations=3)
    budget = 1500 * MB
    plan = plan_job_memory((512, 32), settings, [(1024, 640)], budget)
    assert len(plan.tiles) == 3 and plan.peak_bytes <= budget
    assert plan.style_tiles[1] > 0  # the 2048x128 stage is untiled, its 2048x1280 style pass is not
    assert plan.tiles[1] == 0


def test_style_passes_that_fit_keep_the_stage_s_own_tiles():
    # Outputs stay those of before: untiled stages run their style passes whole, tiled ones in their tiles.
    settings = StylizeSettings(max_size=160, iterations=2)
    assert plan_job_memory((48, 32), settings, [(64, 64)], None).style_tiles == (0,)
    tiled = plan_job_memory((48, 32), settings, [(64, 64)], None, forced_tile=64)
    assert tiled.tiles == tiled.style_tiles == (64,)
    # The plan of the worker's decoded styles is the admission's for an image no larger than it uses.
    assert plan_job_memory((48, 32), settings, [(2000, 1000)], None) == plan_job_memory(
        (48, 32), settings, [(160, 80)], None
    )


def test_the_decoded_styles_are_held_for_the_whole_job():
    settings = StylizeSettings(max_size=256, iterations=2)
    small = plan_job_memory((256, 256), settings, [(64, 64)], None)
    two = plan_job_memory((256, 256), settings, [(64, 64), (256, 256)], None)
    # Both are scaled to 256 px for their pass; only the decoded arrays differ (64x64 is never enlarged).
    assert two.peak_bytes - small.peak_bytes == memory.STYLE_ARRAY_BYTES_PER_PIXEL * 256 * 256
