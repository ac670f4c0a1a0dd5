"""Two real replicas (server processes, real engine) on one real redis-server: a job submitted through one
is watched through the other; SIGKILL of the replica running it: the other resumes it from its checkpoint
within the lease and finishes it with all its iterations; SIGSTOP of the replica running it past its
lease: the other takes it over, and the paused one, resumed, stops it without writing anything more, so
the job never runs twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from stylize_service.models.paths import default_model_path
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.jobs.redis_store import RedisStore, key
from stylize_service.server.readiness import wait_for_ready_file
from tests.fakes import LIVENESS, channel, image_bytes, wait_until

pytestmark = pytest.mark.skipif(
    not default_model_path().is_file(), reason="the model is not built; run `bash scripts/setup.sh`"
)

LEASE_SECONDS = 2.0
CHECKPOINT_SECONDS = 0.2
ITERATIONS = 80


def request() -> pb.StylizeRequest:
    return pb.StylizeRequest(
        content_image=image_bytes(96, 64, seed=3),
        styles=[pb.StyleImage(image=image_bytes(64, 64, seed=4))],
        options=pb.StylizeOptions(
            max_size=96, iterations=ITERATIONS, tolerance=0, seed=7, init=pb.INIT_NOISE
        ),
    )


@contextmanager
def replica(url: str, directory: Path, name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    ready = directory / f"ready-{name}.json"
    ready.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stylize_service.server.main",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
            "--store-url",
            url,
            "--lease-seconds",
            str(LEASE_SECONDS),
            "--checkpoint-seconds",
            str(CHECKPOINT_SECONDS),
            "--ready-file",
            str(ready),
        ],
        stderr=(directory / f"{name}.log").open("ab"),
    )
    try:
        yield process, wait_for_ready_file(ready, process, timeout=LIVENESS * 4).address
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait(timeout=LIVENESS)


def _runner_pid(store: RedisStore, job_id: str) -> int:
    """The pid of the replica that claimed the job (its replica id is HOST-PID-RANDOM)."""
    assert wait_until(lambda: store.client.hget(key("job", job_id), "runner") is not None)
    runner = store.client.hget(key("job", job_id), "runner")
    assert isinstance(runner, bytes)
    return int(runner.decode().rsplit("-", 2)[1])


@contextmanager
def two_replicas(url: str, directory: Path) -> Iterator[dict[int, tuple[subprocess.Popen[bytes], str]]]:
    with ExitStack() as stack:
        replicas = [stack.enter_context(replica(url, directory, name)) for name in ("a", "b")]
        yield {process.pid: (process, address) for process, address in replicas}


def test_sigkill_of_the_running_replica_the_other_resumes_the_job_from_its_checkpoint(
    redis_url: str, tmp_path: Path
) -> None:
    store = RedisStore(redis_url, 1 << 30)
    with two_replicas(redis_url, tmp_path) as replicas:
        (_, first), *_ = replicas.values()
        with channel(first) as ch:
            job = pb_grpc.StyleTransferStub(ch).SubmitJob(request(), timeout=LIVENESS)
        runner = _runner_pid(store, job.id)
        other = next(address for pid, (_, address) in replicas.items() if pid != runner)
        seen: list[pb.StylizeResponse] = []
        killed_at = resumed_after = None
        with channel(other) as ch:  # watched through the replica that does not run it, to the end
            for event in pb_grpc.StyleTransferStub(ch).WatchJob(
                pb.WatchJobRequest(id=job.id), timeout=LIVENESS * 8
            ):
                seen.append(event)
                if (
                    killed_at is None
                    and event.HasField("progress")
                    and event.progress.iteration >= 20
                    and store.checkpoint(job.id) is not None
                ):
                    replicas[runner][0].send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                    killed_iteration = event.progress.iteration
                elif (
                    killed_at is not None
                    and resumed_after is None
                    and event.HasField("progress")
                    and store.client.hget(key("job", job.id), "gen") == b"2"
                ):
                    resumed_after = time.monotonic() - killed_at
        with channel(other) as ch:
            done = pb_grpc.StyleTransferStub(ch).GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
    assert killed_at is not None and resumed_after is not None
    print(f"resumed by the other replica {resumed_after:.2f} s after the SIGKILL (lease {LEASE_SECONDS:g} s)")
    assert done.state == pb.SUCCEEDED and done.resumes == 1
    assert seen[-1].HasField("result") and seen[-1].result.iterations == ITERATIONS
    sequences = [e.sequence for e in seen]
    assert sequences == list(range(1, len(sequences) + 1))  # one stream, no gap, no repeat
    first_of_new = next(sequence for sequence, generation in store.writers(job.id) if generation == 2)
    resumed = [e.progress.iteration for e in seen if e.HasField("progress") and e.sequence >= first_of_new]
    assert 0 < resumed[0] <= killed_iteration + 1  # from a checkpoint, not from the start
    assert resumed == list(range(resumed[0], ITERATIONS + 1))
    # Within the lease, the takeover scan's period and a claim; generous for a busy machine.
    assert resumed_after <= LEASE_SECONDS + LEASE_SECONDS / 10 + CHECKPOINT_SECONDS + 10


def test_sigstop_past_the_lease_the_job_never_runs_twice(redis_url: str, tmp_path: Path) -> None:
    store = RedisStore(redis_url, 1 << 30)
    with two_replicas(redis_url, tmp_path) as replicas:
        (_, first), *_ = replicas.values()
        with channel(first) as ch:
            job = pb_grpc.StyleTransferStub(ch).SubmitJob(request(), timeout=LIVENESS)
        runner = _runner_pid(store, job.id)
        other = next(address for pid, (_, address) in replicas.items() if pid != runner)
        assert wait_until(lambda: store.checkpoint(job.id) is not None and store.last_sequence(job.id) >= 10)
        os.kill(runner, signal.SIGSTOP)
        try:
            # Past the lease: the other replica takes the job over (generation 2) and runs it.
            assert wait_until(lambda: store.client.hget(key("job", job.id), "gen") == b"2", LIVENESS)
            taken_at = store.last_sequence(job.id)
            assert wait_until(lambda: store.last_sequence(job.id) > taken_at + 3, LIVENESS)
        finally:
            os.kill(runner, signal.SIGCONT)
        with channel(other) as ch:
            client = pb_grpc.StyleTransferStub(ch)
            events = list(client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS * 8))
            done = client.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
        assert events[-1].HasField("result") and events[-1].result.iterations == ITERATIONS
        assert done.state == pb.SUCCEEDED and done.resumes == 1
        # Nothing of the paused replica's landed after the new owner's first write, and it said why.
        writers = store.writers(job.id)
        first_of_new = next(sequence for sequence, generation in writers if generation == 2)
        assert all(generation == 2 for sequence, generation in writers if sequence >= first_of_new)
        assert wait_until(
            lambda: "lost its lease" in (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
        )
        log = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
        assert log.count("outcome=ok") == 1  # one end reported, by the replica that took it over
