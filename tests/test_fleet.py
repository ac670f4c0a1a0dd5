"""A fleet on one real redis-server (--store-url), with fake engines in-process: any replica serves any
job, one queue for the fleet, the per-client bound across it, cancels that reach the running replica,
takeover of a job whose lease lapsed with no write from the replica that lost it, and a store out of
reach (UNAVAILABLE naming it, health NOT_SERVING, back when it is)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import StylizeServer
from stylize_service.server.jobs.fleet_jobs import FleetJobManager
from stylize_service.server.jobs.fleet_queue import ClientBound, FleetQueue
from stylize_service.server.jobs.records import JobRecord, JobState, new_job_id
from stylize_service.server.jobs.redis_store import RedisStore, key
from tests.fakes import LIVENESS, FakeEngine, channel, running_server, stylize_request, wait_until
from tests.redis_server import RedisServer, redis_binary

Replica = tuple[pb_grpc.StyleTransferStub, StylizeServer, FakeEngine]


@contextlib.contextmanager
def replica(url: str, engine: FakeEngine | None = None, **overrides: object) -> Iterator[Replica]:
    engine = engine or FakeEngine()
    overrides.setdefault("lease_seconds", 2.0)
    with running_server(engine, store_url=url, **overrides) as (server, address), channel(address) as ch:
        yield pb_grpc.StyleTransferStub(ch), server, engine


def _fleet(server: StylizeServer) -> FleetJobManager:
    assert isinstance(server.jobs, FleetJobManager)
    return server.jobs


def test_a_job_submitted_through_one_replica_is_watched_and_listed_through_the_other(redis_url: str) -> None:
    with replica(redis_url) as (a, _, engine_a), replica(redis_url) as (b, _, engine_b):
        job = a.SubmitJob(stylize_request(iterations=5, frame_every=2), timeout=LIVENESS)
        events = list(b.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))
        assert events[-1].HasField("result") and events[-1].result.iterations == 5
        sequences = [e.sequence for e in events if e.sequence]
        assert sequences == list(range(1, len(sequences) + 1))
        assert b.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS).state == pb.SUCCEEDED
        assert a.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS).state == pb.SUCCEEDED
        assert [j.id for j in b.ListJobs(pb.ListJobsRequest(), timeout=LIVENESS).jobs] == [job.id]
        assert engine_a.completed + engine_b.completed == 1
        info = b.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS).job_store
        assert info.kind == "redis" and info.jobs["SUCCEEDED"] == 1


def test_jobs_submitted_through_one_replica_run_on_both(redis_url: str) -> None:
    with (
        replica(redis_url, FakeEngine(0.05), queue_size=8, max_jobs_per_client=8) as (a, _, engine_a),
        replica(redis_url, FakeEngine(0.05)) as (b, _, engine_b),
    ):
        jobs = [a.SubmitJob(stylize_request(iterations=10), timeout=LIVENESS) for _ in range(6)]
        for job in jobs:
            assert list(b.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))[-1].HasField("result")
        assert engine_a.completed + engine_b.completed == 6
        assert engine_a.completed >= 1 and engine_b.completed >= 1


def test_the_per_client_bound_and_the_queue_are_the_fleets(redis_url: str) -> None:
    gate = threading.Event()
    engine_a, engine_b = FakeEngine(), FakeEngine()
    engine_a.gate = engine_b.gate = gate
    with (
        replica(redis_url, engine_a, max_jobs_per_client=2) as (a, server_a, _),
        replica(redis_url, engine_b, max_jobs_per_client=2) as (b, *_),
    ):
        a.SubmitJob(stylize_request(), timeout=LIVENESS)
        b.SubmitJob(stylize_request(), timeout=LIVENESS)
        with pytest.raises(grpc.RpcError) as refused:
            a.SubmitJob(stylize_request(), timeout=LIVENESS)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in the fleet" in (refused.value.details() or "")
        gate.set()
        assert wait_until(lambda: _fleet(server_a).queue.client_jobs("127.0.0.1") == 0)


def test_the_fleets_queue_depth_is_exported_by_every_replica(redis_url: str) -> None:
    gate = threading.Event()
    engine_a, engine_b = FakeEngine(), FakeEngine()
    engine_a.gate = engine_b.gate = gate
    with (
        replica(redis_url, engine_a, queue_size=6, max_jobs_per_client=8, metrics_port=0) as (a, server_a, _),
        replica(redis_url, engine_b, metrics_port=0) as (_, server_b, _),
    ):
        jobs = [a.SubmitJob(stylize_request(), timeout=LIVENESS) for _ in range(5)]
        assert wait_until(lambda: engine_a.running + engine_b.running == 2)
        for server in (server_a, server_b):
            assert server.metrics.queue_depth.collect()[0].samples[0].value == 3
        queued = a.GetJob(pb.GetJobRequest(id=jobs[-1].id), timeout=LIVENESS)
        assert queued.state == pb.QUEUED and queued.queue_position == 3
        gate.set()


def test_a_cancel_through_any_replica_reaches_the_running_one(redis_url: str) -> None:
    gate = threading.Event()
    engine_a = FakeEngine()
    engine_a.gate = gate
    engine_a.started = [threading.Event()]
    with replica(redis_url, engine_a) as (a, *_):
        job = a.SubmitJob(stylize_request(), timeout=LIVENESS)
        assert engine_a.started[0].wait(LIVENESS)
        with replica(redis_url) as (b, *_):
            queued = b.SubmitJob(stylize_request(), timeout=LIVENESS)
            watch = a.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS)
            b.CancelJob(pb.CancelJobRequest(id=job.id), timeout=LIVENESS)
            with pytest.raises(grpc.RpcError) as ended:
                list(watch)
            assert ended.value.code() == grpc.StatusCode.CANCELLED
            assert wait_until(lambda: engine_a.cancelled == 1, 2.0)  # within a few of the monitor's rounds
            assert b.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS).state == pb.CANCELLED
            gate.set()
            assert list(a.WatchJob(pb.WatchJobRequest(id=queued.id), timeout=LIVENESS))[-1].HasField("result")


def test_a_waiting_job_cancelled_through_another_replica_leaves_the_queue(redis_url: str) -> None:
    gate = threading.Event()
    engine = FakeEngine()
    engine.gate = gate
    engine.started = [threading.Event()]
    with replica(redis_url, engine) as (a, server_a, _):
        a.SubmitJob(stylize_request(), timeout=LIVENESS)
        assert engine.started[0].wait(LIVENESS)
        waiting = a.SubmitJob(stylize_request(), timeout=LIVENESS)
        # b has no engine yet, so it claims nothing: it only answers.
        with running_server(None, store_url=redis_url) as (_, address), channel(address) as ch:
            b = pb_grpc.StyleTransferStub(ch)
            assert b.GetJob(pb.GetJobRequest(id=waiting.id), timeout=LIVENESS).queue_position == 1
            cancelled = b.CancelJob(pb.CancelJobRequest(id=waiting.id), timeout=LIVENESS)
        assert cancelled.state == pb.CANCELLED
        assert _fleet(server_a).queue.depth() == 0
        with pytest.raises(grpc.RpcError) as ended:
            list(a.WatchJob(pb.WatchJobRequest(id=waiting.id), timeout=LIVENESS))
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        gate.set()


def test_stylize_works_wherever_its_job_runs(redis_url: str) -> None:
    gate = threading.Event()
    engine_a = FakeEngine()
    engine_a.gate = gate
    engine_a.started = [threading.Event()]
    with replica(redis_url, engine_a) as (a, *_):
        busy = a.SubmitJob(stylize_request(), timeout=LIVENESS)
        assert engine_a.started[0].wait(LIVENESS)  # a's one slot is taken: the next job runs on b
        with replica(redis_url) as (_, _, engine_b):
            events = list(a.Stylize(stylize_request(iterations=4), timeout=LIVENESS))
            assert events[-1].HasField("result") and engine_b.completed == 1
        gate.set()
        assert list(a.WatchJob(pb.WatchJobRequest(id=busy.id), timeout=LIVENESS))[-1].HasField("result")


def test_a_job_whose_lease_lapsed_is_taken_over_and_the_old_runner_writes_nothing_more(
    redis_url: str,
) -> None:
    gate = threading.Event()
    engine_a = FakeEngine(seconds_per_iteration=0.05)
    engine_a.gate = gate
    with replica(redis_url, engine_a, checkpoint_seconds=0.01) as (a, server_a, _):
        job = a.SubmitJob(stylize_request(iterations=40), timeout=LIVENESS)
        gate.set()
        store = _fleet(server_a).redis
        assert wait_until(lambda: store.checkpoint(job.id) is not None)
        gate.clear()  # a holds the job between two iterations, as a paused process would
        lease_key = key("lease", job.id)
        fleet_a = _fleet(server_a)
        with replica(redis_url, FakeEngine(), checkpoint_seconds=0.01) as (b, _, engine_b):
            # a's lease lapses (as if a had been paused past it): b takes the job over.
            fleet_a._draining.set()  # a claims nothing more (paused, it could not)
            for live in list(fleet_a._live.values()):  # a stops renewing, as a paused process does
                live.lease.renewed_at = float("inf")  # type: ignore[attr-defined]
            store.client.delete(lease_key)
            events = list(b.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))
            assert events[-1].HasField("result") and events[-1].result.iterations == 40
            assert engine_b.resumed_from and engine_b.completed == 1
            gate.set()  # a wakes up: its next write is refused, and it stops without reporting an end
            assert wait_until(lambda: not fleet_a._live)
            assert engine_a.completed == 0
        done = a.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
        assert done.state == pb.SUCCEEDED and done.resumes == 1
        writers = store.writers(job.id)
        first_of_b = next(sequence for sequence, generation in writers if generation == 2)
        assert all(generation == 2 for sequence, generation in writers if sequence >= first_of_b)


def test_a_store_out_of_reach_refuses_submits_naming_it_and_health_follows(tmp_path: Path) -> None:
    redis = RedisServer(redis_binary(), tmp_path)
    redis.start()
    try:
        with replica(redis.url) as (a, server_a, _):
            redis.stop()
            assert wait_until(lambda: not _fleet(server_a).store_reachable)
            assert server_a.health.Check(health_pb2.HealthCheckRequest(service=""), None).status == (
                health_pb2.HealthCheckResponse.NOT_SERVING
            )
            with pytest.raises(grpc.RpcError) as refused:
                a.SubmitJob(stylize_request(), timeout=LIVENESS)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"the job store redis://127.0.0.1:{redis.port}/0" in (refused.value.details() or "")
            redis.start()
            assert wait_until(lambda: _fleet(server_a).store_reachable)
            assert server_a.health.Check(health_pb2.HealthCheckRequest(service=""), None).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
            job = a.SubmitJob(stylize_request(iterations=3), timeout=LIVENESS)
            assert list(a.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))[-1].HasField("result")
    finally:
        redis.stop()


def test_the_store_kind_and_no_redis_for_the_default(tmp_path: Path) -> None:
    with running_server(FakeEngine()) as (server, _):
        assert not isinstance(server.jobs, FleetJobManager)
        assert not isinstance(server.store, RedisStore)


def test_a_store_paused_past_the_lease_stops_the_job_which_is_resumed_once_when_it_is_back(
    tmp_path: Path,
) -> None:
    redis = RedisServer(redis_binary(), tmp_path)
    redis.start()
    assert redis.process is not None
    engine = FakeEngine(seconds_per_iteration=0.05)
    try:
        with replica(redis.url, engine, checkpoint_seconds=0.01) as (a, server_a, _):
            job = a.SubmitJob(stylize_request(iterations=60), timeout=LIVENESS)
            store = _fleet(server_a).redis
            assert wait_until(lambda: store.checkpoint(job.id) is not None)
            redis.process.send_signal(signal.SIGSTOP)  # a store that answers nothing, past the lease
            try:
                assert wait_until(lambda: engine.cancelled == 1)  # the job stopped: its lease ran out
            finally:
                redis.process.send_signal(signal.SIGCONT)
            events = list(a.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))
            assert events[-1].HasField("result") and events[-1].result.iterations == 60
            assert engine.completed == 1 and len(engine.resumed_from) == 1
            done = a.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
            assert done.state == pb.SUCCEEDED and done.resumes == 1
    finally:
        redis.stop()


def test_a_draining_replica_checkpoints_its_job_and_another_resumes_it(redis_url: str) -> None:
    engine_a = FakeEngine(seconds_per_iteration=0.05)
    engine_a.started = [threading.Event()]
    with replica(redis_url, engine_a, checkpoint_seconds=0.01) as (a, server_a, _):
        job = a.SubmitJob(stylize_request(iterations=40), timeout=LIVENESS)
        assert engine_a.started[0].wait(LIVENESS)
        with replica(redis_url, FakeEngine(), checkpoint_seconds=0.01) as (b, _, engine_b):
            _fleet(server_a).drain()  # as on SIGTERM: checkpoint at the next iteration, back to the queue
            events = list(b.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))
            assert events[-1].HasField("result") and events[-1].result.iterations == 40
            assert engine_a.completed == 0 and engine_b.completed == 1 and engine_b.resumed_from
            assert b.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS).resumes == 1


def test_a_stylize_calls_job_taken_over_from_the_replica_that_held_the_call_is_cancelled(
    redis_url: str,
) -> None:
    engine_a = FakeEngine(seconds_per_iteration=0.05)
    engine_a.started = [threading.Event()]
    with replica(redis_url, engine_a) as (a, server_a, _):
        call = a.Stylize(stylize_request(iterations=200), timeout=LIVENESS)
        assert engine_a.started[0].wait(LIVENESS)
        fleet_a = _fleet(server_a)
        (live,) = list(fleet_a._live.values())
        job_id = live.record.id
        with replica(redis_url, FakeEngine()) as (b, _, engine_b):
            live.lease.renewed_at = float("inf")  # type: ignore[attr-defined]  # a stops renewing, as if gone
            fleet_a.redis.client.delete(key("lease", job_id))  # and its lease lapses
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            assert ended.value.code() == grpc.StatusCode.CANCELLED
            done = b.GetJob(pb.GetJobRequest(id=job_id), timeout=LIVENESS)
            assert done.state == pb.CANCELLED and "with its Stylize call" in done.error.message
            assert engine_b.stylize_calls == 0


def test_the_queue_claims_atomically_within_memory_and_takes_lapsed_jobs_back(redis_url: str) -> None:
    store = RedisStore(redis_url, 1 << 30)
    queue = FleetQueue(store, "replica-1")
    big, small = (JobRecord(id=new_job_id(), owner="c", state=JobState.QUEUED, created=1.0) for _ in range(2))
    store.create(big, b"r", peak_bytes=1000)
    store.create(small, b"r", peak_bytes=10)
    assert queue.enqueue(big.id, "c", 2, 5) == 1 and queue.enqueue(small.id, "c", 2, 5) == 2
    with pytest.raises(ClientBound):
        queue.enqueue(new_job_id(), "c", 2, 5)
    assert queue.claim(free_memory=500, lease_ms=60_000) is None  # the head does not fit: not overtaken
    assert queue.depth() == 2
    claim = queue.claim(free_memory=5000, lease_ms=60_000)
    assert claim is not None and (claim.job_id, claim.generation) == (big.id, 1)
    assert store.client.get(key("lease", big.id)) == b"replica-1:1"
    # Its replica dies: the lease lapses and any replica puts the job back at the front.
    store.client.delete(key("lease", big.id))
    assert queue.takeover() == [big.id] and queue.position(big.id) == 1
    again = queue.claim(free_memory=5000, lease_ms=60_000)
    assert again is not None and again.generation == 2
    # A job that ended but whose replica died before releasing it gives its client's place back.
    store.fence(big.id, again.token, again.generation)
    store.save(big.with_changes(state=JobState.SUCCEEDED))
    store.client.delete(key("lease", big.id))
    assert queue.takeover() == [] and queue.client_jobs("c") == 1
    assert not queue.release(again, "c", requeue=False)  # not ours any more


def test_a_job_that_ends_while_the_store_is_down_reports_its_end_when_it_is_back(tmp_path: Path) -> None:
    redis = RedisServer(redis_binary(), tmp_path, persistent=True)
    redis.start()
    gate = threading.Event()
    engine = FakeEngine(seconds_per_iteration=0.02)
    engine.gate = gate
    engine.started = [threading.Event()]
    try:
        with replica(redis.url, engine, lease_seconds=30.0) as (a, server_a, _):
            job = a.SubmitJob(stylize_request(iterations=10), timeout=LIVENESS)
            assert engine.started[0].wait(LIVENESS)
            redis.stop()  # Redis goes away (its data kept on disk) while the job runs to its end
            gate.set()
            assert wait_until(lambda: engine.completed == 1)
            time.sleep(1.5)  # the job's end is tried again meanwhile
            redis.start()
            assert wait_until(lambda: not _fleet(server_a)._live)
            done = a.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
            assert done.state == pb.SUCCEEDED and done.result.iterations == 10
            assert list(a.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS))[-1].HasField("result")
            assert engine.stylize_calls == 1  # reported once Redis was back, not run again
    finally:
        redis.stop()
