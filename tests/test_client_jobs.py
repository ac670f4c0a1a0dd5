"""The client's side of the job RPCs (SubmitJob, WatchJob, GetJob, CancelJob, ListJobs): the API, the
reattaching watch and the CLI (a run on jobs, --detach, watch, jobs, cancel, info), against a fake servicer
that keeps its jobs in memory and can drop a watch, go down and come back on the same port, replay events
the client has seen, refuse as busy, or not implement the job RPCs at all (an older server)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from stylize_service.client import cli
from stylize_service.client.api import StylizeClient, StylizeError
from stylize_service.client.display import ProgressDisplay
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from tests.fakes import LIVENESS, encode, gradient, image_bytes, wait_until

FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
RESULT_SIZE = (64, 43)


@dataclass
class FakeJob:
    id: str
    iterations: int
    frame_every: int
    state: int = pb.RUNNING
    events: list[pb.StylizeResponse] = field(default_factory=list)
    error: pb.JobError | None = None
    create_seconds: int = 0
    resumes: int = 0


class JobServicer(pb_grpc.StyleTransferServicer):
    """The five job RPCs in memory (and Stylize and GetInfo). A job runs in a thread of its own: a Progress
    per iteration, a Frame every frame_every, then the Result; `hold_at` holds every job before that
    iteration until `release` is set. Scripting: drop_watches (for the next WatchJob calls, abort with
    UNAVAILABLE after sending that many events), overlap (a watch also sends again that many events at or
    before after_sequence, which the client must drop), busy_submits (refuse that many SubmitJob calls),
    has_jobs=False (the job RPCs answer UNIMPLEMENTED, as an older server's do)."""

    def __init__(self, *, has_jobs: bool = True, seconds_per_iteration: float = 0.0) -> None:
        self.has_jobs = has_jobs
        self.seconds_per_iteration = seconds_per_iteration
        self.cond = threading.Condition()
        self.jobs: dict[str, FakeJob] = {}
        self.submits = 0  # SubmitJob calls, refused ones included
        self.watch_calls: list[tuple[str, int]] = []  # (id, after_sequence)
        self.get_calls = 0
        self.cancels: list[str] = []
        self.stylize_calls = 0
        self.drop_watches: list[int] = []
        self.overlap = 0
        self.busy_submits = 0
        self.hold_at: int | None = None
        self.release = threading.Event()

    # --- the job's life ---

    def _run(self, job: FakeJob) -> None:
        for iteration in range(job.iterations + 1):
            if iteration == self.hold_at:
                self.release.wait(LIVENESS)
            with self.cond:
                if job.state in FINAL:
                    return
                self._record(job, progress(iteration))
                if job.frame_every and iteration and iteration % job.frame_every == 0:
                    self._record(job, frame(iteration))
            time.sleep(self.seconds_per_iteration)
        with self.cond:
            if job.state not in FINAL:
                self._record(job, pb.StylizeResponse(result=result(job.iterations)))
                job.state = pb.SUCCEEDED

    def _record(self, job: FakeJob, event: pb.StylizeResponse) -> None:
        """Store an event with the job's next sequence number (the caller holds cond)."""
        event.sequence = len(job.events) + 1
        job.events.append(event)
        self.cond.notify_all()

    def resume(self, job_id: str, from_iteration: int, to_iteration: int) -> None:
        """As a server restarted from a checkpoint: the iterations since it run again, and their events
        come again with new sequence numbers."""
        with self.cond:
            job = self.jobs[job_id]
            job.resumes += 1
            for iteration in range(from_iteration, to_iteration + 1):
                self._record(job, progress(iteration))
                if iteration % job.frame_every == 0:
                    self._record(job, frame(iteration))

    def as_message(self, job: FakeJob, *, with_image: bool = True) -> pb.Job:
        message = pb.Job(id=job.id, state=job.state, last_sequence=len(job.events), resumes=job.resumes)
        message.create_time.seconds = job.create_seconds
        for event in reversed(job.events):
            if event.HasField("progress"):
                message.progress.CopyFrom(event.progress)
                break
        if job.state == pb.SUCCEEDED:
            message.result.CopyFrom(job.events[-1].result)
            if not with_image:
                message.result.image = b""
        if job.error is not None:
            message.error.CopyFrom(job.error)
        return message

    def _find(self, job_id: str, context: grpc.ServicerContext) -> FakeJob:
        if not self.has_jobs:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        if len(job_id) != 32:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"id must be 32 hex digits, got {job_id!r}")
        with self.cond:
            if job_id not in self.jobs:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")
            return self.jobs[job_id]

    # --- the RPCs ---

    def SubmitJob(self, request: pb.StylizeRequest, context: grpc.ServicerContext) -> pb.Job:
        with self.cond:
            self.submits += 1
            if not self.has_jobs:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
            if self.busy_submits:
                self.busy_submits -= 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")
            job = FakeJob(
                secrets.token_hex(16),
                request.options.iterations or 6,
                request.options.frame_every,
                create_seconds=1_700_000_000 + len(self.jobs),
            )
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return self.as_message(job)

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        job = self._find(request.id, context)
        with self.cond:
            self.watch_calls.append((request.id, request.after_sequence))
            drop_after = self.drop_watches.pop(0) if self.drop_watches else None
        first = max(0, request.after_sequence - self.overlap)  # index of the first event to send
        sent = 0
        while context.is_active():
            with self.cond:
                self.cond.wait_for(lambda n=first: len(job.events) > n or job.state in FINAL, timeout=0.1)
                pending, first = job.events[first:], len(job.events)
                ended = job.state in FINAL and first == len(job.events)
            for event in pending:
                if drop_after is not None and sent >= drop_after:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "simulated: the connection dropped")
                yield event
                sent += 1
            if ended:
                if job.error is not None:
                    context.abort(_code(job.error.code), job.error.message)
                return

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        job = self._find(request.id, context)
        with self.cond:
            self.get_calls += 1
            return self.as_message(job, with_image=not request.omit_result_image)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        job = self._find(request.id, context)
        with self.cond:
            self.cancels.append(job.id)
            if job.state not in FINAL:
                job.state = pb.CANCELLED
                job.error = pb.JobError(code=1, code_name="CANCELLED", message="cancelled by CancelJob")
                self.cond.notify_all()
            return self.as_message(job, with_image=False)

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        if not self.has_jobs:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        with self.cond:
            newest_first = sorted(self.jobs.values(), key=lambda j: -j.create_seconds)
            start = int(request.page_token or 0)
            size = request.page_size or 20
            page = newest_first[start : start + size]
            token = str(start + size) if start + size < len(newest_first) else ""
            return pb.ListJobsResponse(
                jobs=[self.as_message(j, with_image=False) for j in page], next_page_token=token
            )

    def Stylize(
        self, request: pb.StylizeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StylizeResponse]:
        with self.cond:
            self.stylize_calls += 1
        iterations, frame_every = request.options.iterations or 6, request.options.frame_every
        for iteration in range(iterations + 1):
            yield progress(iteration)
            if frame_every and iteration and iteration % frame_every == 0:
                yield frame(iteration)
        yield pb.StylizeResponse(result=result(iterations))

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        info = pb.GetInfoResponse(server_version="fake")
        info.defaults.iterations = 6
        if self.has_jobs:
            store = info.job_store
            store.kind = "directory"
            store.jobs.update({"QUEUED": 2, "RUNNING": 1, "SUCCEEDED": 0})
            store.used_bytes, store.capacity_bytes = 3 * 2**20, 512 * 2**20
            store.result_ttl_seconds = 86400
            store.checkpoint_interval_seconds = 30
            store.checkpoints_written, store.jobs_resumed = 7, 1
            store.frames_retained_per_job, store.frame_bytes_retained_per_job = 200, 64 * 2**20
        return info


def _code(number: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == number)


def progress(iteration: int) -> pb.StylizeResponse:
    return pb.StylizeResponse(
        progress=pb.Progress(iteration=iteration, losses=pb.Losses(total=1.0 / (1 + iteration)), stages=1)
    )


_RESULT = encode(gradient(*RESULT_SIZE, seed=1000))


@functools.cache
def _frame_image(iteration: int) -> bytes:
    """A picture of its own per iteration: GIF merges identical frames, which would hide a repeat."""
    return encode(gradient(*RESULT_SIZE, seed=iteration), "JPEG")


def frame(iteration: int) -> pb.StylizeResponse:
    width, height = RESULT_SIZE
    return pb.StylizeResponse(
        frame=pb.Frame(
            iteration=iteration,
            image=_frame_image(iteration),
            mime_type="image/jpeg",
            width=width,
            height=height,
        )
    )


def result(iterations: int) -> pb.Result:
    width, height = RESULT_SIZE
    return pb.Result(
        image=_RESULT,
        mime_type="image/png",
        width=width,
        height=height,
        iterations=iterations,
        evaluations=iterations,
    )


class Served:
    """The servicer on a loopback port that stays the same across stop() and start()."""

    def __init__(self, servicer: JobServicer) -> None:
        self.servicer = servicer
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_StyleTransferServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(LIVENESS)
            self._server = None


@contextlib.contextmanager
def serving(servicer: JobServicer) -> Iterator[Served]:
    served = Served(servicer)
    served.start()
    try:
        yield served
    finally:
        servicer.release.set()
        served.stop()


@pytest.fixture
def servicer() -> JobServicer:
    return JobServicer()


@pytest.fixture
def served(servicer: JobServicer) -> Iterator[Served]:
    with serving(servicer) as running:
        yield running


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    paths = {"content": tmp_path / "in" / "photo.png", "other": tmp_path / "in" / "street.png"}
    paths["content"].parent.mkdir()
    paths["content"].write_bytes(image_bytes(48, 32))
    paths["other"].write_bytes(image_bytes(30, 40, seed=2))
    paths["style"] = tmp_path / "style.png"
    paths["style"].write_bytes(image_bytes(32, 32, seed=1))
    return paths


@pytest.fixture
def frame_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every frame file written, repeats included (a second write would overwrite the first
    and leave no other trace)."""
    written: list[str] = []
    real = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if self.name.startswith("frame-"):
            written.append(self.name)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return written


def run_argv(images: dict[str, Path], address: str, *extra: str) -> list[str]:
    return [str(images["content"]), "-s", str(images["style"]), "--server", address, *extra]


def frames_of(iterations: int, every: int) -> list[str]:
    return [f"frame-{i:06d}.jpg" for i in range(every, iterations + 1, every)]


# --- the API ------------------------------------------------------------------------------------


def test_api_submit_watch_get_cancel_and_list(
    served: Served, servicer: JobServicer, images: dict[str, Path]
) -> None:
    with StylizeClient(served.address, timeout=LIVENESS) as client:
        job = client.submit(images["content"], [images["style"]], iterations=4, frame_every=2)
        assert len(job.id) == 32 and job.state == pb.RUNNING
        events = list(client.watch(job.id))
        assert [e.sequence for e in events] == list(range(1, 9))  # 5 Progress, 2 Frames, the Result
        assert isinstance(events[-1].event, pb.Result) and events[-1].event.image == _RESULT
        assert [e.event.iteration for e in events if isinstance(e.event, pb.Frame)] == [2, 4]
        later = client.watch(job.id, after=6)
        assert [e.sequence for e in later] == [7, 8] and later.result is not None
        assert client.get(job.id).result.image == _RESULT
        assert client.get(job.id, include_image=False).result.image == b""
        assert client.cancel(job.id).state == pb.SUCCEEDED  # an ended job stays as it is
        others = [client.submit(images["other"], [images["style"]], iterations=2).id for _ in range(4)]
        listed = [j.id for j in client.jobs(page_size=2)]  # three pages
        assert listed == [*reversed(others), job.id]
        with pytest.raises(StylizeError) as caught:
            client.get("0" * 32)
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(StylizeError) as caught:
            list(client.watch("f" * 32))
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert servicer.submits == 5


def test_api_cancelled_job_ends_its_watch_with_cancelled(
    served: Served, servicer: JobServicer, images: dict[str, Path]
) -> None:
    servicer.hold_at = 2
    with StylizeClient(served.address, timeout=LIVENESS) as client:
        job = client.submit(images["content"], [images["style"]], iterations=10)
        watch = client.follow(job.id, reconnect_seconds=10)
        assert isinstance(next(watch).event, pb.Progress)
        assert client.cancel(job.id).state == pb.CANCELLED
        with pytest.raises(StylizeError) as caught:
            list(watch)
        assert caught.value.code is grpc.StatusCode.CANCELLED and watch.reconnects == 0


def test_follow_reattaches_after_the_last_sequence_and_yields_nothing_twice(
    served: Served, servicer: JobServicer, images: dict[str, Path]
) -> None:
    servicer.overlap = 2  # each new watch sends 2 seen events again ...
    servicer.drop_watches = [3, 4]  # ... the first breaks after 3 events, the second after 2 seen, 2 new
    reconnects: list[tuple[grpc.StatusCode, int]] = []
    with StylizeClient(served.address, timeout=LIVENESS) as client:
        job = client.submit(images["content"], [images["style"]], iterations=6, frame_every=2)
        assert wait_until(lambda: servicer.jobs[job.id].state == pb.SUCCEEDED)
        watch = client.follow(
            job.id, reconnect_seconds=10, on_reconnect=lambda e, n, _: reconnects.append((e.code, n))
        )
        sequences = [e.sequence for e in watch]
    assert sequences == list(range(1, len(servicer.jobs[job.id].events) + 1))
    assert servicer.watch_calls == [(job.id, 0), (job.id, 3), (job.id, 5)]
    assert reconnects == [
        (grpc.StatusCode.UNAVAILABLE, 1),
        (grpc.StatusCode.UNAVAILABLE, 1),
    ]  # progress between
    assert watch.reconnects == 2 and watch.result is not None and servicer.submits == 1


def test_a_single_watch_raises_unavailable_and_follow_gives_up_after_its_budget(
    served: Served, servicer: JobServicer, images: dict[str, Path]
) -> None:
    with StylizeClient(served.address, timeout=LIVENESS) as client:
        job = client.submit(images["content"], [images["style"]], iterations=2)
        servicer.drop_watches = [1]
        with pytest.raises(StylizeError) as caught:
            list(client.watch(job.id))  # reconnect_seconds=0: one stream
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        served.stop()
        started = time.monotonic()
        with pytest.raises(StylizeError) as caught:
            list(client.follow(job.id, after=1, reconnect_seconds=1.5))
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < LIVENESS


# --- the CLI: a run on jobs -----------------------------------------------------------------------


def test_cli_run_submits_once_and_saves_what_stylize_saved(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    frame_writes: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, frames, anim = tmp_path / "out.png", tmp_path / "frames", tmp_path / "anim.gif"
    argv = run_argv(
        images, served.address, "-o", str(out), "--frames-dir", str(frames), "--animation", str(anim)
    )
    assert cli.main([*argv, "-n", "6", "--frame-every", "2"]) == cli.EXIT_OK
    assert out.read_bytes() == _RESULT
    assert sorted(p.name for p in frames.iterdir()) == frames_of(6, 2) == sorted(frame_writes)
    with Image.open(anim) as animation:
        assert animation.n_frames == 4  # three frames and the result
    assert servicer.submits == 1 and servicer.stylize_calls == 0
    job_id = next(iter(servicer.jobs))
    assert f"photo.png: job {job_id}" in capsys.readouterr().err


def test_cli_reattaches_a_dropped_stream_at_the_right_sequence_without_duplicate_frames(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    frame_writes: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer.drop_watches = [4]  # Progress 0, 1, 2, Frame 2, then the connection drops
    servicer.overlap = 3  # the new watch sends Progress 1, 2 and Frame 2 again
    frames, anim = tmp_path / "frames", tmp_path / "anim.gif"
    argv = run_argv(images, served.address, "-o", str(tmp_path / "out.png"), "--frames-dir", str(frames))
    assert cli.main([*argv, "--animation", str(anim), "-n", "8", "--frame-every", "2"]) == cli.EXIT_OK
    job_id = next(iter(servicer.jobs))
    assert servicer.watch_calls == [(job_id, 0), (job_id, 4)]
    assert sorted(frame_writes) == frames_of(8, 2)  # each once
    with Image.open(anim) as animation:
        assert animation.n_frames == 5
    assert servicer.submits == 1
    assert "reattaching" in capsys.readouterr().err


def test_cli_survives_the_server_going_down_and_a_resume_from_a_checkpoint(
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    frame_writes: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer.hold_at = 11  # the job waits after iteration 10 until the server has restarted
    frames, anim, out = tmp_path / "frames", tmp_path / "anim.gif", tmp_path / "out.png"
    with serving(servicer) as served:

        def restart() -> None:
            # Once the client has saved frame 10 (so it has seen everything so far), the server goes away
            # for 1.5 s; it comes back having resumed the job from its checkpoint at iteration 6, so the
            # iterations 7 to 10 and the frames 8 and 10 come again, with new sequence numbers.
            assert wait_until(lambda: (frames / "frame-000010.jpg").exists())
            served.stop()
            servicer.resume(next(iter(servicer.jobs)), 7, 10)
            time.sleep(1.5)
            served.start()
            servicer.release.set()

        controller = threading.Thread(target=restart, daemon=True)
        controller.start()
        argv = run_argv(images, served.address, "-o", str(out), "--frames-dir", str(frames))
        code = cli.main([*argv, "--animation", str(anim), "-n", "16", "--frame-every", "2"])
        controller.join(LIVENESS)
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK, err
    assert out.read_bytes() == _RESULT
    assert sorted(frame_writes) == frames_of(16, 2)  # 8 and 10 not written again
    with Image.open(anim) as animation:
        assert animation.n_frames == 9
    afters = [after for _, after in servicer.watch_calls]
    assert afters[0] == 0 and afters[1] > 0 and afters == sorted(afters)  # each from where the last stopped
    assert servicer.submits == 1 and "reattaching" in err


def test_cli_without_reconnection_reports_the_lost_job_and_how_to_pick_it_up(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer.drop_watches = [2]
    argv = run_argv(
        images, served.address, "-o", str(tmp_path / "out.png"), "-n", "4", "--reconnect-seconds", "0"
    )
    assert cli.main(argv) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    job_id = next(iter(servicer.jobs))
    assert "lost the connection" in err and f"stylize watch {job_id}" in err
    assert not (tmp_path / "out.png").exists() and servicer.cancels == []


def test_cli_falls_back_to_stylize_on_a_server_without_jobs(
    images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer = JobServicer(has_jobs=False)
    with serving(servicer) as served:
        out_dir = tmp_path / "out"
        argv = [str(images["content"].parent), "-s", str(images["style"]), "--server", served.address, "-q"]
        assert (
            cli.main([*argv, "--output-dir", str(out_dir), "-n", "4", "--frames-dir", str(tmp_path / "f")])
            == 0
        )
        assert sorted(p.name for p in out_dir.iterdir()) == ["photo-stylized.png", "street-stylized.png"]
        assert sorted(p.name for p in (tmp_path / "f" / "photo").iterdir()) == frames_of(4, 1)
        assert servicer.submits == 1 and servicer.stylize_calls == 2  # asked once, then Stylize for both
        assert cli.main([*argv, "--detach"]) == cli.EXIT_FAILED
        assert "does not support" in capsys.readouterr().err
        assert cli.main(["jobs", "--server", served.address]) == cli.EXIT_FAILED


def test_cli_retries_a_busy_submission(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer.busy_submits = 1
    argv = run_argv(images, served.address, "-o", str(tmp_path / "out.png"), "-n", "2", "--retries", "1")
    assert cli.main(argv) == cli.EXIT_OK
    assert servicer.submits == 2 and len(servicer.jobs) == 1  # the refusal created no job
    assert "retry 1 of 1" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_cli_interrupt_cancels_the_job_on_the_server(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    servicer.hold_at = 3

    def interrupt(self: ProgressDisplay, event: object) -> None:
        if isinstance(event, pb.Progress) and event.iteration == 1:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises KeyboardInterrupt
            time.sleep(LIVENESS)

    monkeypatch.setattr(ProgressDisplay, "on_event", interrupt)
    out = tmp_path / "never.png"
    previous = signal.getsignal(signal.SIGTERM)
    assert cli.main(run_argv(images, served.address, "-o", str(out), "-n", "100")) == cli.EXIT_INTERRUPTED
    job_id = next(iter(servicer.jobs))
    assert servicer.cancels == [job_id] and servicer.jobs[job_id].state == pb.CANCELLED
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) == previous  # the CLI put SIGTERM's handler back


def test_cli_interrupt_of_a_parallel_batch_cancels_every_running_job(
    served: Served, servicer: JobServicer, images: dict[str, Path], tmp_path: Path
) -> None:
    servicer.hold_at = 2
    folder = str(images["content"].parent)

    def interrupt_once_both_run() -> None:
        if wait_until(lambda: len(servicer.watch_calls) == 2):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in the main thread

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    argv = [folder, "-s", str(images["style"]), "--server", served.address, "-q", "--parallel", "2"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out"), "-n", "50"]) == cli.EXIT_INTERRUPTED
    assert sorted(servicer.cancels) == sorted(servicer.jobs) and len(servicer.jobs) == 2
    assert all(job.state == pb.CANCELLED for job in servicer.jobs.values())


# --- the CLI: detach, watch, jobs, cancel, info ------------------------------------------------------


def test_cli_detach_then_watch_jobs_and_cancel(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    frame_writes: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = str(images["content"].parent)
    argv = [folder, "-s", str(images["style"]), "--server", served.address, "--detach", "-n", "4"]
    assert cli.main([*argv, "--frame-every", "2"]) == cli.EXIT_OK
    ids = capsys.readouterr().out.split()
    assert len(ids) == 2 and set(ids) == set(servicer.jobs) and servicer.watch_calls == []
    assert wait_until(lambda: all(j.state == pb.SUCCEEDED for j in servicer.jobs.values()))

    out_dir, frames = tmp_path / "results", tmp_path / "frames"
    watch = ["watch", *ids, "--server", served.address, "-q", "--output-dir", str(out_dir)]
    assert cli.main([*watch, "--frames-dir", str(frames), "--animation", str(tmp_path / "{name}.gif")]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{i}-stylized.png" for i in ids)
    assert sorted(p.name for p in frames.iterdir()) == sorted(ids)
    assert sorted(frame_writes) == sorted(frames_of(4, 2) * 2)
    with Image.open(tmp_path / f"{ids[0]}.gif") as animation:
        assert animation.n_frames == 3
    assert servicer.submits == 2  # watching submits nothing

    assert cli.main(["jobs", "--server", served.address]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "ITERATION"]
    assert [line.split()[:3] for line in lines[1:]] == [[i, "SUCCEEDED", "4"] for i in reversed(ids)]
    assert "2023-11-14" in lines[1]  # the fake's creation times, in UTC
    assert cli.main(["jobs", "--server", served.address, "--json"]) == cli.EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in listed] == list(reversed(ids)) and listed[0]["state"] == "SUCCEEDED"

    assert cli.main(["cancel", ids[0], "--server", served.address]) == cli.EXIT_OK
    assert capsys.readouterr().out.split() == [ids[0], "SUCCEEDED"]


def test_cli_watch_and_cancel_of_unknown_or_malformed_ids(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unknown = "0123456789abcdef" * 2
    assert (
        cli.main(["watch", unknown, "--server", served.address, "-o", str(tmp_path / "x.png")])
        == cli.EXIT_USAGE
    )
    assert "no such job" in capsys.readouterr().err
    servicer.hold_at = 2
    assert cli.main([*run_argv(images, served.address, "--detach", "-n", "9")]) == 0
    known = capsys.readouterr().out.strip()
    assert cli.main(["cancel", unknown, known, "--server", served.address]) == cli.EXIT_USAGE
    assert capsys.readouterr().out.split() == [known, "CANCELLED"]  # past the unknown one
    assert servicer.jobs[known].state == pb.CANCELLED
    assert cli.main(["watch", known, "--server", served.address, "-q"]) == cli.EXIT_FAILED
    assert "the job was cancelled" in capsys.readouterr().err
    for argv in (["watch", "NOT-AN-ID"], ["cancel", unknown.upper()], ["watch"]):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as caught:  # --detach saves nothing
        cli.main(run_argv(images, served.address, "--detach", "-o", "x.png"))
    assert caught.value.code == cli.EXIT_USAGE and "stylize watch" in capsys.readouterr().err


def test_cli_watch_interrupt_leaves_the_job_running(
    served: Served,
    servicer: JobServicer,
    images: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer.hold_at = 3
    assert cli.main([*run_argv(images, served.address, "--detach", "-n", "9")]) == 0
    job_id = capsys.readouterr().out.strip()

    def interrupt(self: ProgressDisplay, event: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ProgressDisplay, "on_event", interrupt)
    assert cli.main(["watch", job_id, "--server", served.address]) == cli.EXIT_INTERRUPTED
    assert servicer.cancels == [] and servicer.jobs[job_id].state == pb.RUNNING


def test_cli_info_shows_the_job_store(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--server", served.address]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert "job store        directory" in text
    assert "2 queued, 1 running" in text and "3 of 512 MiB" in text
    assert "86400 s after a job ends" in text and "every 30 s; 7 written" in text
    assert "1 job(s) resumed" in text and "200 per job" in text
