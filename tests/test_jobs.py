"""Jobs that outlive their call, through the service with a fake engine: SubmitJob, WatchJob, GetJob,
CancelJob and ListJobs; sequences; ownership; the store's bounds, retention and restarts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.app import StylizeServer
from stylize_service.server.config import ConfigError
from stylize_service.server.jobs.directory_store import DirectoryStore
from stylize_service.server.jobs.records import JobRecord, JobState, new_job_id
from stylize_service.server.jobs.store import FrameRetention, StoredEvent
from tests.fakes import (
    LIVENESS,
    FakeEngine,
    channel,
    running_server,
    stylize_request,
    wait_until,
)

TOKEN_A = "token-of-client-a-0123456789"
TOKEN_B = "token-of-client-b-0123456789"


@pytest.fixture
def stub() -> Iterator[tuple[pb_grpc.StyleTransferStub, StylizeServer, FakeEngine]]:
    engine = FakeEngine()
    with running_server(engine) as (server, address), channel(address) as ch:
        yield pb_grpc.StyleTransferStub(ch), server, engine


def watch_all(stub: pb_grpc.StyleTransferStub, job_id: str, after: int = 0) -> list[pb.StylizeResponse]:
    return list(stub.WatchJob(pb.WatchJobRequest(id=job_id, after_sequence=after), timeout=LIVENESS))


def wait_state(stub: pb_grpc.StyleTransferStub, job_id: str, *states: int) -> pb.Job:
    job = pb.Job()

    def reached() -> bool:
        job.CopyFrom(stub.GetJob(pb.GetJobRequest(id=job_id), timeout=LIVENESS))
        return job.state in states

    assert wait_until(reached), f"job stayed {pb.JobState.Name(job.state)}"
    return job


def test_a_submitted_job_runs_unwatched_and_a_later_watch_replays_it_to_its_result(stub) -> None:
    client, _, _ = stub
    job = client.SubmitJob(stylize_request(iterations=4), timeout=LIVENESS)
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert job.state in (pb.QUEUED, pb.RUNNING)
    assert job.create_time.seconds > 0

    done = wait_state(client, job.id, pb.SUCCEEDED)
    assert done.result.image and done.result.iterations == 4
    assert done.start_time.ToNanoseconds() >= done.create_time.ToNanoseconds()
    assert done.end_time.ToNanoseconds() >= done.start_time.ToNanoseconds()
    assert done.progress.iteration == 4
    assert done.last_sequence == 6  # five Progress (iterations 0..4) and the Result

    events = watch_all(client, job.id)
    assert [e.sequence for e in events] == list(range(1, 7))
    assert [e.WhichOneof("event") for e in events] == ["progress"] * 5 + ["result"]
    assert events[-1].result.image == done.result.image

    lean = client.GetJob(pb.GetJobRequest(id=job.id, omit_result_image=True), timeout=LIVENESS)
    assert not lean.result.image and lean.result.width == done.result.width


def test_a_watch_resumes_after_a_sequence_with_no_gap_and_no_repeat(stub) -> None:
    client, _, engine = stub
    engine.gate = threading.Event()
    job = client.SubmitJob(stylize_request(iterations=6), timeout=LIVENESS)
    first = client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS)
    engine.gate.set()
    seen = [next(first) for _ in range(3)]
    first.cancel()  # a dropped connection: the job goes on
    rest = watch_all(client, job.id, after=seen[-1].sequence)
    sequences = [e.sequence for e in seen + rest if e.sequence]
    assert sequences == list(range(1, len(sequences) + 1))
    assert rest[-1].HasField("result")
    assert wait_state(client, job.id, pb.SUCCEEDED).result.iterations == 6


def test_a_detached_job_is_watched_from_a_new_channel() -> None:
    engine = FakeEngine(seconds_per_iteration=0.02)
    with running_server(engine) as (_, address):
        with channel(address) as first:
            job = pb_grpc.StyleTransferStub(first).SubmitJob(stylize_request(iterations=10), timeout=LIVENESS)
        with channel(address) as second:
            events = watch_all(pb_grpc.StyleTransferStub(second), job.id)
    assert events[-1].HasField("result") and events[-1].result.iterations == 10
    assert [e.sequence for e in events if e.sequence] == list(range(1, 13))


def test_cancel_ends_a_running_job_and_its_watch_with_cancelled(stub) -> None:
    client, _, engine = stub
    engine.gate = threading.Event()  # holds the job before its first iteration
    job = client.SubmitJob(stylize_request(iterations=50), timeout=LIVENESS)
    wait_state(client, job.id, pb.RUNNING)
    watch = client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS)
    cancelled = client.CancelJob(pb.CancelJobRequest(id=job.id), timeout=LIVENESS)
    assert cancelled.id == job.id
    with pytest.raises(grpc.RpcError) as raised:
        list(watch)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    ended = wait_state(client, job.id, pb.CANCELLED)
    assert ended.error.code_name == "CANCELLED" and ended.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert ended.end_time.seconds > 0
    # A finished job is returned as it is.
    assert client.CancelJob(pb.CancelJobRequest(id=job.id), timeout=LIVENESS).state == pb.CANCELLED


def test_a_failed_job_keeps_its_status_for_get_and_watch() -> None:
    engine = FakeEngine(fail_with=RuntimeError("the accelerator fell over"))
    with running_server(engine) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        job = client.SubmitJob(stylize_request(iterations=3), timeout=LIVENESS)
        failed = wait_state(client, job.id, pb.FAILED)
        assert failed.error.code_name == "INTERNAL" and "accelerator" in failed.error.message
        with pytest.raises(grpc.RpcError) as raised:
            watch_all(client, job.id)
        assert raised.value.code() == grpc.StatusCode.INTERNAL


def test_submit_validates_as_stylize_does(stub) -> None:
    client, _, engine = stub
    for call in (client.SubmitJob, lambda r, timeout: list(client.Stylize(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as raised:
            call(stylize_request(max_size=5), timeout=LIVENESS)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "options.max_size" in (raised.value.details() or "")
    assert engine.stylize_calls == 0


def test_bad_and_unknown_ids(stub) -> None:
    client, _, _ = stub
    for bad in ("", "nope", "A" * 32, "0" * 31, "../" + "0" * 29):
        with pytest.raises(grpc.RpcError) as raised:
            client.GetJob(pb.GetJobRequest(id=bad), timeout=LIVENESS)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "id must be 32 lowercase hex digits" in (raised.value.details() or "")
    unknown = new_job_id()
    for call in (
        lambda: client.GetJob(pb.GetJobRequest(id=unknown), timeout=LIVENESS),
        lambda: client.CancelJob(pb.CancelJobRequest(id=unknown), timeout=LIVENESS),
        lambda: watch_all(client, unknown),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_job_belongs_to_the_token_that_submitted_it(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    with running_server(FakeEngine(), auth_tokens_file=tokens) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        a = (("authorization", f"Bearer {TOKEN_A}"),)
        b = (("authorization", f"Bearer {TOKEN_B}"),)
        job = client.SubmitJob(stylize_request(iterations=2), metadata=a, timeout=LIVENESS)
        assert wait_until(
            lambda: (
                client.GetJob(pb.GetJobRequest(id=job.id), metadata=a, timeout=LIVENESS).state == pb.SUCCEEDED
            )
        )
        for call in (
            lambda: client.GetJob(pb.GetJobRequest(id=job.id), metadata=b, timeout=LIVENESS),
            lambda: client.CancelJob(pb.CancelJobRequest(id=job.id), metadata=b, timeout=LIVENESS),
            lambda: list(client.WatchJob(pb.WatchJobRequest(id=job.id), metadata=b, timeout=LIVENESS)),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # not PERMISSION_DENIED: no leak
        assert [j.id for j in client.ListJobs(pb.ListJobsRequest(), metadata=a, timeout=LIVENESS).jobs] == [
            job.id
        ]
        assert not client.ListJobs(pb.ListJobsRequest(), metadata=b, timeout=LIVENESS).jobs


def test_list_jobs_pages_newest_first(stub) -> None:
    client, _, _ = stub
    ids = []
    for _ in range(5):
        job = client.SubmitJob(stylize_request(iterations=1), timeout=LIVENESS)
        ids.append(job.id)
        wait_state(client, job.id, pb.SUCCEEDED)
    pages, token = [], ""
    while True:
        page = client.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token), timeout=LIVENESS)
        pages.append([j.id for j in page.jobs])
        assert all(not j.result.image for j in page.jobs)
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == ids[::-1]
    for bad in (pb.ListJobsRequest(page_token="garbage!"), pb.ListJobsRequest(page_size=1000)):
        with pytest.raises(grpc.RpcError) as raised:
            client.ListJobs(bad, timeout=LIVENESS)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stylize_is_a_job_that_ends_with_its_call(stub) -> None:
    client, server, engine = stub
    responses = list(client.Stylize(stylize_request(iterations=3), timeout=LIVENESS))
    assert [r.sequence for r in responses if r.sequence] == [1, 2, 3, 4, 5]
    assert responses[-1].HasField("result")

    engine.gate = threading.Event()
    call = client.Stylize(stylize_request(iterations=50), timeout=LIVENESS)
    assert wait_until(lambda: server.scheduler.running == 1)
    call.cancel()
    assert wait_until(lambda: server.jobs.counts()["CANCELLED"] == 1)
    assert server.scheduler.running == 0


def test_getinfo_reports_the_store_and_its_bounds(stub) -> None:
    client, _, _ = stub
    job = client.SubmitJob(stylize_request(iterations=2), timeout=LIVENESS)
    wait_state(client, job.id, pb.SUCCEEDED)
    info = client.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS).job_store
    assert info.kind == "directory"
    assert info.jobs["SUCCEEDED"] == 1 and info.jobs["QUEUED"] == 0
    assert 0 < info.used_bytes < info.capacity_bytes
    assert info.result_ttl_seconds == 24 * 3600
    assert info.checkpoint_interval_seconds == 30
    assert info.frames_retained_per_job > 0 and info.frame_bytes_retained_per_job > 0


def test_a_full_store_evicts_the_oldest_finished_jobs_then_refuses_naming_the_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = DirectoryStore(state, 1 << 30)
    now = time.time()
    old = [JobRecord(new_job_id(), "x", JobState.SUCCEEDED, now - age, ended=now - age) for age in (60, 30)]
    for record in old:
        store.create(record, b"x" * (20 << 20))  # a finished job of 20 MB
    store.close()
    engine = FakeEngine()
    engine.gate = threading.Event()  # every job stays unfinished: its room stays reserved
    with running_server(engine, state_dir=state, store_mb=64) as (server, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        request = stylize_request(iterations=1, max_size=256)  # its checkpoint alone is about 28 MB
        client.SubmitJob(request, timeout=LIVENESS)  # 40 + 28 > 64: the oldest finished job goes
        assert not (state / "jobs" / old[0].id).exists() and (state / "jobs" / old[1].id).exists()
        client.SubmitJob(request, timeout=LIVENESS)  # 20 + 56 > 64: the other one goes
        assert not (state / "jobs" / old[1].id).exists()
        with pytest.raises(grpc.RpcError) as raised:
            client.SubmitJob(request, timeout=LIVENESS)  # 84 > 64 and nothing finished to evict
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = raised.value.details() or ""
        assert "job store is full" in details and "--store-mb" in details
        assert server.jobs.counts()["QUEUED"] + server.jobs.counts()["RUNNING"] == 2
        engine.gate.set()


def test_finished_jobs_are_deleted_after_their_ttl() -> None:
    with running_server(FakeEngine(), result_ttl_seconds=1.0) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        job = client.SubmitJob(stylize_request(iterations=1), timeout=LIVENESS)
        wait_state(client, job.id, pb.SUCCEEDED)

        def gone() -> bool:
            try:
                client.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
            except grpc.RpcError as err:
                return err.code() == grpc.StatusCode.NOT_FOUND
            return False

        assert wait_until(gone, timeout=10)


def test_a_drained_job_is_queued_again_by_the_next_server_and_its_sequence_goes_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    engine = FakeEngine(seconds_per_iteration=0.05)
    with running_server(engine, state_dir=state) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        job = client.SubmitJob(stylize_request(iterations=400), timeout=LIVENESS)
        watch = client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS)
        seen = [next(watch) for _ in range(3)]
    # drained (running_server's exit): the detached job is left unfinished for the next server
    record = json.loads((state / "jobs" / job.id / "record.json").read_text())
    assert record["state"] == "QUEUED"
    resumed = FakeEngine()
    with running_server(resumed, state_dir=state) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        rest = watch_all(client, job.id, after=seen[-1].sequence)
        assert rest[-1].HasField("result")
        sequences = [e.sequence for e in seen + rest if e.sequence]
        assert sequences == sorted(set(sequences)) and sequences[0] == 1
        done = client.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)
        assert done.state == pb.SUCCEEDED and done.resumes == 1
        # resumed from the drain's checkpoint, not started again
        assert len(resumed.resumed_from) == 1 and resumed.resumed_from[0] >= 2
        iterations = [e.progress.iteration for e in rest if e.HasField("progress")]
        assert iterations == list(range(seen[-1].progress.iteration + 1, 401))


def test_a_stylize_job_is_cancelled_not_resumed_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = DirectoryStore(state, 1 << 30)
    record = JobRecord(new_job_id(), "127.0.0.1", JobState.RUNNING, time.time(), bound_to_call=True)
    store.create(record, stylize_request(iterations=2).SerializeToString())
    store.close()
    with running_server(FakeEngine(), state_dir=state) as (server, _):
        assert wait_until(lambda: server.jobs.counts()["CANCELLED"] == 1)


def test_the_store_survives_a_corrupt_record_and_refuses_an_unknown_format(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = DirectoryStore(state, 1 << 30)
    good = JobRecord(new_job_id(), "x", JobState.SUCCEEDED, time.time(), ended=time.time())
    bad = JobRecord(new_job_id(), "x", JobState.SUCCEEDED, time.time(), ended=time.time())
    for record in (good, bad):
        store.create(record, b"")
    store.close()
    (state / "jobs" / bad.id / "record.json").write_text("{ torn")
    store = DirectoryStore(state, 1 << 30)
    assert [r.id for r in store.records()] == [good.id]
    store.close()

    (state / "FORMAT").write_text(json.dumps({"format": "stylize-job-store", "version": 99}))
    with pytest.raises(ConfigError) as raised, running_server(FakeEngine(), state_dir=state):
        pass
    assert "--state-dir" in str(raised.value) and "version 99" in str(raised.value)


def test_one_server_per_state_dir_and_an_unusable_one_names_the_flag(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running_server(FakeEngine(), state_dir=state):
        with pytest.raises(ConfigError) as raised, running_server(FakeEngine(), state_dir=state):
            pass
        assert "in use by another stylize server" in str(raised.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as raised, running_server(FakeEngine(), state_dir=blocker / "state"):
        pass
    assert str(raised.value).startswith("--state-dir (STYLIZE_STATE_DIR): cannot use")


def test_the_event_log_cuts_a_torn_entry_and_frames_stay_within_their_bound(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, 1 << 30, FrameRetention(count=2, nbytes=1 << 20))
    record = JobRecord(new_job_id(), "x", JobState.RUNNING, time.time())
    store.create(record, b"request")
    for sequence in range(1, 4):
        store.append(record.id, StoredEvent(sequence, b"progress-%d" % sequence))
    for sequence in range(4, 8):
        store.append(record.id, StoredEvent(sequence, b"frame-%d" % sequence, is_frame=True))
    assert [e.sequence for e in store.events(record.id)] == [1, 2, 3, 6, 7]
    assert [e.sequence for e in store.events(record.id, after=2)] == [3, 6, 7]
    assert [e.sequence for e in store.events(record.id, frames=False)] == [1, 2, 3]
    assert store.last_sequence(record.id) == 7  # a frame's: sequences go on after it
    store.close()
    log = tmp_path / "jobs" / record.id / "events.log"
    whole = log.read_bytes()
    log.write_bytes(whole + whole[:7])  # a crash in the middle of the next append
    store = DirectoryStore(tmp_path, 1 << 30, FrameRetention(count=2, nbytes=1 << 20))
    assert [r.id for r in store.records()] == [record.id]
    assert log.read_bytes() == whole
    assert [e.data for e in store.events(record.id)][:3] == [b"progress-1", b"progress-2", b"progress-3"]
    store.close()
