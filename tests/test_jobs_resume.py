"""A job survives its server: SIGKILL mid-job, start again on the same state dir, and the job carries on
from its checkpoint to the result that the same seeded job gets uninterrupted. Real engine, real
server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from stylize_service.models.paths import default_model_path
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.readiness import wait_for_ready_file
from tests.fakes import LIVENESS, channel, image_bytes, wait_until

pytestmark = pytest.mark.skipif(
    not default_model_path().is_file(), reason="the model is not built; run `bash scripts/setup.sh`"
)


def request() -> pb.StylizeRequest:
    """Seeded and long enough (no early stop) to be killed in the middle."""
    return pb.StylizeRequest(
        content_image=image_bytes(96, 64, seed=3),
        styles=[pb.StyleImage(image=image_bytes(64, 64, seed=4))],
        options=pb.StylizeOptions(max_size=96, iterations=60, tolerance=0, seed=7, init=pb.INIT_NOISE),
    )


@contextmanager
def server(state: Path, port: int = 0) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    ready = state.parent / f"ready-{os.getpid()}-{port}.json"
    ready.unlink(missing_ok=True)
    command = [sys.executable, "-m", "stylize_service.server.main", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [
            *command,
            "--port",
            str(port),
            "--state-dir",
            str(state),
            "--checkpoint-seconds",
            "0.2",
            "--ready-file",
            str(ready),
        ],
        stderr=(state.parent / "server.log").open("ab"),
    )
    try:
        yield process, wait_for_ready_file(ready, process, timeout=LIVENESS * 4).address
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=LIVENESS)


def test_a_job_killed_with_its_server_resumes_from_its_checkpoint_to_the_same_result(tmp_path: Path) -> None:
    with server(tmp_path / "reference") as (_, address), channel(address) as ch:
        reference = list(pb_grpc.StyleTransferStub(ch).Stylize(request(), timeout=LIVENESS * 4))[-1].result

    state = tmp_path / "state"
    with server(state) as (process, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        job = client.SubmitJob(request(), timeout=LIVENESS)
        seen: list[pb.StylizeResponse] = []
        for event in client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS * 4):
            seen.append(event)
            if event.HasField("progress") and event.progress.iteration >= 25:
                info = client.GetInfo(pb.GetInfoRequest(), timeout=LIVENESS).job_store
                if info.checkpoints_written:
                    break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=LIVENESS)
    killed_at = seen[-1].progress.iteration
    assert 25 <= killed_at < 60

    with server(state) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        rest = list(
            client.WatchJob(
                pb.WatchJobRequest(id=job.id, after_sequence=seen[-1].sequence), timeout=LIVENESS * 4
            )
        )
        done = client.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS)

    assert done.state == pb.SUCCEEDED and done.resumes == 1
    sequences = [e.sequence for e in seen + rest]
    assert sequences == list(range(1, len(sequences) + 1))  # no gap, no repeat across the restart
    resumed = [e.progress.iteration for e in rest if e.HasField("progress")]
    assert 0 < resumed[0] <= killed_at + 1  # carried on from a checkpoint, not from the start
    assert resumed == list(range(resumed[0], 61))
    result = rest[-1].result
    assert result.iterations == reference.iterations == 60
    assert (
        abs(result.final_losses.total - reference.final_losses.total) <= 0.01 * reference.final_losses.total
    )
    # With L-BFGS-B's own state in the checkpoint, the resumed run is the uninterrupted one, bit for bit.
    assert result.image == reference.image


def test_an_unwritable_state_dir_is_a_start_up_error_naming_the_flag(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    completed = subprocess.run(
        [sys.executable, "-m", "stylize_service.server.main", "--state-dir", str(blocker / "state")],
        capture_output=True,
        text=True,
        timeout=LIVENESS * 4,
    )
    assert completed.returncode == 2
    assert "--state-dir (STYLIZE_STATE_DIR)" in completed.stderr


def test_a_full_disk_leaves_the_job_running_without_checkpoints(tmp_path: Path) -> None:
    """Checkpoints that cannot be written are logged, and the job ends as it would have."""
    state = tmp_path / "state"
    with server(state) as (_, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        job = client.SubmitJob(request(), timeout=LIVENESS)
        job_dir = state / "jobs" / job.id
        # A directory where the checkpoint file goes: every checkpoint write fails, as on a full disk.
        while True:
            (job_dir / "checkpoint").unlink(missing_ok=True)  # one written already
            try:
                (job_dir / "checkpoint").mkdir()
                break
            except FileExistsError:
                continue
        events = list(client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS * 4))
        assert events[-1].HasField("result") and events[-1].result.iterations == 60
        assert client.GetJob(pb.GetJobRequest(id=job.id), timeout=LIVENESS).state == pb.SUCCEEDED
    log = (tmp_path / "server.log").read_text()
    assert "checkpoint not saved" in log and "the job goes on without it" in log


def test_grpc_status_of_a_dead_server_is_unavailable(tmp_path: Path) -> None:
    """What a watcher sees when its server is killed: UNAVAILABLE, the cue to reattach."""
    state = tmp_path / "state"
    with server(state) as (process, address), channel(address) as ch:
        client = pb_grpc.StyleTransferStub(ch)
        job = client.SubmitJob(request(), timeout=LIVENESS)
        watch = client.WatchJob(pb.WatchJobRequest(id=job.id), timeout=LIVENESS * 4)
        next(watch)
        process.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as raised:
            list(watch)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_cli_run_survives_a_server_restart(tmp_path: Path) -> None:
    """`stylize` reattaches to its job after its server was killed and started again on the same port
    and store, and writes the result of the job it submitted once."""
    content, style, out = tmp_path / "content.png", tmp_path / "style.png", tmp_path / "out.png"
    content.write_bytes(image_bytes(96, 64, seed=3))
    style.write_bytes(image_bytes(64, 64, seed=4))
    with socket.socket() as probe:  # a port for both servers: the CLI knows one address
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "state"
    with server(state, port) as (process, _):
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stylize_service.client.cli",
                str(content),
                "--style",
                str(style),
                "--server",
                f"127.0.0.1:{port}",
                "--max-size",
                "96",
                "-n",
                "60",
                "--tolerance",
                "0",
                "--seed",
                "7",
                "--reconnect-seconds",
                "120",
                "-o",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        jobs = state / "jobs"
        assert wait_until(lambda: any((d / "checkpoint").is_file() for d in jobs.iterdir()), LIVENESS * 4)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=LIVENESS)
    with server(state, port):
        _, stderr = cli.communicate(timeout=LIVENESS * 8)
        assert cli.returncode == 0, stderr
    assert out.is_file() and out.stat().st_size > 0
    assert len(list(jobs.iterdir())) == 1  # submitted once
    assert "reattaching" in stderr or "lost the job's stream" in stderr
