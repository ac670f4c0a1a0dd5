#!/usr/bin/env python3
"""Load and chaos test: start stylize-server, run N concurrent clients for T seconds, report what happened.

    .venv/bin/python scripts/loadtest.py --clients 32 --seconds 300       # the README's figures
    .venv/bin/python scripts/loadtest.py --clients 8 --seconds 30 --json out/load.json
    .venv/bin/python scripts/loadtest.py --clients 8 --seconds 120 --kill-every 20   # server crashes
    .venv/bin/python scripts/loadtest.py --clients 8 --seconds 120 --replicas 2 --kill-every 20   # a fleet

The server runs as a subprocess (`stylize-server` on a free loopback port). Each client loops until the
time is up, each call picking one behaviour at random (weights: --mix):

  complete   reads the whole stream and expects the Result;
  cancel     cancels the call after a few events, or while it is queued;
  kill       a separate client process that starts a call and is killed with SIGKILL mid-stream;
  slow       asks for a PNG frame every iteration and reads one message every 0.1-0.4 s;
  deadline   gives the call a deadline of 0.2-1.5 s.

After a refused call (RESOURCE_EXHAUSTED: the queue or the client's bound is full) the client backs off
(exponentially, with jitter, up to 2 s) and goes on. Jobs are tiny (max_size 32-64, 2-5 iterations), so
the test measures the service, not the optimisation. Every client connects from 127.0.0.1, one address,
so by default the per-client bound is set to what the server can hold (--max-jobs-per-client) and the
queue's bound is what refuses.

It reports the calls submitted, completed, refused, cancelled (by the client, or by its deadline), killed,
and lost: a call the server accepted (it sent a Queued or Progress) that ended without a terminal status the
client can account for (a stream that ends without a Result, an INTERNAL or UNKNOWN status, or no end within
its deadline). It also reports p50/p95 of the queue wait (call start to first Progress) and the job time
(first Progress to Result) of completed calls, the server's peak RSS (VmHWM) and CPU time, and whether every
worker is free at the end (GetInfo's load, polled after the clients stop). The exit status is 1 when anything
was lost, a worker stayed busy, a call failed with an unexpected status or the server did not stop cleanly.

--kill-every SECONDS: the server crashes. It listens on one free port picked at the start and keeps its jobs
in one --state-dir, with --checkpoint-seconds 1; a chaos thread kills it with SIGKILL SECONDS after it
became SERVING, and starts it again at once on the same port and state directory, until the time is up
(the last one stays up). The clients' mix then includes a sixth behaviour (default mix: KILL_MIX):

  submit     SubmitJob (a larger job: max_size 96-128, 10-30 iterations, so that some of them are
             checkpointed and resumed), then follows it to its end with the client API's follow(), which
             reattaches after each restart and resumes the stream after the last sequence it saw.

A call the server had accepted that ends UNAVAILABLE while a kill happened is "interrupted by a kill": the
client got a status, so it is not lost; UNAVAILABLE before acceptance (the server is down) is a refusal. Every
job SubmitJob accepted is recorded by id; once the kills and the clients have stopped, with the server up,
GetJob is polled for each until every one is final (within JOB_SETTLE_TIMEOUT). A job is lost when it is
NOT_FOUND, still unfinished by then, SUCCEEDED without a Result, or FAILED or CANCELLED without an error
status. ListJobs then checks the whole store (the jobs of Stylize calls and of submissions whose answer a
kill cut off included) the same way. The report adds the kills done, the time back to SERVING, the calls
interrupted, the jobs resumed from a checkpoint (GetInfo's job_store.jobs_resumed read before each kill and
at the end, summed, beside the log's "resumed from its checkpoint" lines) and the jobs by final state; lost
jobs count as lost, and a server that does not come back counts as an error.

--replicas N: a fleet. N servers share one Redis job store (--store-url; by default a redis-server started
for the run) with --lease-seconds FLEET_LEASE_SECONDS, and the clients spread their calls over them round
robin. With --kill-every the replicas are killed in turn, each started again on its port: a killed
replica's jobs are taken over by another once their lease lapses, and resumed from their checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from stylize_service.client.api import StylizeClient, StylizeError
from stylize_service.client.reattach import FINAL_STATES
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import procfs
from stylize_service.server.readiness import wait_for_ready_file

BEHAVIOURS = ("complete", "cancel", "kill", "slow", "deadline", "submit")
DEFAULT_MIX = "complete=4,cancel=2,kill=1,slow=1,deadline=2"
KILL_MIX = "complete=2,cancel=1,kill=1,slow=1,deadline=1,submit=4"  # the default with --kill-every
CALL_TIMEOUT = 120.0  # a generous deadline for calls that should finish: missing it counts as lost
START_TIMEOUT = 180.0  # the server loads the model and compiles the default graphs
MAX_BACKOFF = 2.0  # seconds a refused client waits at most before it tries again
SETTLE_TIMEOUT = 30.0  # after the clients stop, how long the workers may take to become free
JOB_LINE = re.compile(r" job ([0-9a-f]{12}) .*outcome=(.*)$")  # a job id's first 12 hex digits
# A server on its own store says the first; a replica of a fleet that takes a job over, the second.
RESUMED_LINE = re.compile(
    r" job [0-9a-f]{12}: (resumed from its checkpoint$|taken over by replica .*, resumed from its checkpoint)"
)
QUEUED_AGAIN_LINE = re.compile(r" job [0-9a-f]{12}: (queued again$|taken over by replica .*, started again)")
FLEET_LEASE_SECONDS = 5.0  # the replicas' --lease-seconds with --replicas: a killed one's jobs resume soon
KILL_CHECKPOINT_SECONDS = 1  # the server's --checkpoint-seconds under --kill-every: most jobs get one
FOLLOW_RECONNECT_SECONDS = 60.0  # a follow gives up after this long without a new event
JOB_SETTLE_TIMEOUT = 90.0  # after the clients stop, how long the accepted jobs may take to end
# A channel that lost its server tries again within 1 s (gRPC's own backoff grows to 120 s), so that the
# clients find a restarted server at once.
KILL_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


# --- the server ------------------------------------------------------------------------------------


class ServerProcess:
    """stylize-server as a subprocess on 127.0.0.1 and a free port (or `port`); its log is kept (and
    optionally written, or appended, to a file) by a reader thread. Its job store is `state_dir`, by
    default a fresh directory."""

    def __init__(
        self,
        flags: Sequence[str],
        log_path: Path | None = None,
        *,
        port: int = 0,
        state_dir: Path | None = None,
        append_log: bool = False,
    ) -> None:
        executable = Path(sys.executable).with_name("stylize-server")
        command = (
            [str(executable)]
            if executable.is_file()
            else [sys.executable, "-m", "stylize_service.server.main"]
        )
        self._ready = Path(tempfile.mkdtemp(prefix="stylize-loadtest-")) / "ready.json"
        self.process = subprocess.Popen(
            [
                *command,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ready-file",
                str(self._ready),
                "--state-dir",
                str(state_dir or self._ready.parent / "state"),
                *flags,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "STYLIZE_LOG_LEVEL": "INFO"},
        )
        self.lines: list[str] = []
        self._log = log_path.open("a" if append_log else "w") if log_path else None
        self.address = ""
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if self._log:
                self._log.write(line)
                self._log.flush()

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Until the server has written its ready file (it does once SERVING)."""
        try:
            self.address = wait_for_ready_file(self._ready, self.process, timeout).address
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"{err}:\n" + "\n".join(self.lines[-20:])) from None

    def proc_status(self, key: str) -> int:
        """A figure of /proc/PID/status (the Vm* ones in bytes, e.g. VmHWM, the peak resident set)."""
        return procfs.status_value(self.process.pid, key)

    def cpu_seconds(self) -> float:
        return procfs.cpu_seconds(self.process.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (drain), then wait; the exit status, or None if it had to be killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        self._reader.join(10)
        if self._log:
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, with no drain and no last checkpoint."""
        self.process.kill()
        self.process.wait()
        self._reader.join(10)
        if self._log:
            self._log.close()


def free_port() -> int:
    """A loopback port nobody listens on now (the server reuses it after every restart)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerUnderKills:
    """--kill-every: one stylize-server at a time on a fixed port and state directory, or with --replicas
    N, N of them on their ports and one Redis store. A chaos thread (start_kills) kills one (in turn) with
    SIGKILL `every` seconds after it became SERVING and starts it again on its port, until `stop_at`; the
    figures of each killed process (CPU, peak RSS, jobs resumed) are read just before."""

    def __init__(self, flags: Sequence[str], log_path: Path | None, every: float, replicas: int = 1) -> None:
        self.flags = list(flags)
        self.log_path = log_path
        self.every = every
        self.ports = [free_port() for _ in range(replicas)]
        self.port = self.ports[0]
        self.state_dir = Path(tempfile.mkdtemp(prefix="stylize-loadtest-state-"))
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]
        # One replica: its address; several: the client spreads its calls over them (round robin).
        self.address = self.addresses[0] if replicas == 1 else "ipv4:" + ",".join(self.addresses)
        self.servers = [self._start(index, append_log=index > 0) for index in range(replicas)]
        self.killed: list[ServerProcess] = []
        self.kill_times: list[float] = []  # monotonic, taken just before each SIGKILL
        self.restart_seconds: list[float] = []  # from each SIGKILL to SERVING again
        self.jobs_resumed = 0  # GetInfo's job_store.jobs_resumed, summed over the killed processes
        self.cpu_seconds = 0.0  # ... their CPU time
        self.peak_rss = 0  # ... and the largest VmHWM
        self.failure = ""  # why the chaos thread stopped early (a server that did not come back)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def server(self) -> ServerProcess:
        return self.servers[0]

    def _start(self, index: int, *, append_log: bool) -> ServerProcess:
        return ServerProcess(
            self.flags, self.log_path, port=self.ports[index], state_dir=self.state_dir, append_log=append_log
        )

    def wait_serving(self) -> None:
        for server in self.servers:
            server.wait_serving()

    def start_kills(self, stop_at: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(stop_at,), name="chaos", daemon=True)
        self._thread.start()

    def stop_kills(self) -> None:
        """Stop killing; returns once the server is up again (or its restart failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(START_TIMEOUT + 30)

    def killed_during(self, started: float, ended: float) -> bool:
        return any(started <= t <= ended for t in list(self.kill_times))

    def lines(self) -> list[str]:
        """The log lines of every server process, in order."""
        return [line for server in [*self.killed, *self.servers] for line in server.lines]

    def _run(self, stop_at: float) -> None:
        try:
            while True:
                kill_at = time.monotonic() + self.every
                if kill_at >= stop_at or self._stop.wait(self.every):
                    return  # the last server stays up for the end of the run and the checks
                self._kill_and_restart()
        except Exception as err:  # a server that does not come back: reported, and the run goes on
            self.failure = f"{type(err).__name__}: {err}"

    def _kill_and_restart(self) -> None:
        index = len(self.kill_times) % len(self.servers)
        old = self.servers[index]
        self.jobs_resumed += jobs_resumed(self.addresses[index])  # per process: read it before it is gone
        self.cpu_seconds += old.cpu_seconds()
        self.peak_rss = max(self.peak_rss, old.proc_status("VmHWM"))
        self.kill_times.append(time.monotonic())
        old.kill()
        self.killed.append(old)
        self.servers[index] = self._start(index, append_log=True)
        self.servers[index].wait_serving()
        self.restart_seconds.append(time.monotonic() - self.kill_times[-1])


class RedisProcess:
    """--replicas without --store-url: a redis-server of the run's own, on a free port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                "loadtest: --replicas needs --store-url or redis-server (Debian package redis-server)"
            )
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="stylize-loadtest-redis-"))
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"loadtest: redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def jobs_resumed(address: str) -> int:
    """GetInfo's job_store.jobs_resumed: the jobs this server process resumed from a checkpoint."""
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.StyleTransferStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        return int(info.job_store.jobs_resumed)


# --- one call --------------------------------------------------------------------------------------


@dataclass
class Call:
    behaviour: str
    outcome: str = ""  # completed, refused, cancelled, deadline, killed, lost, error
    status: str = ""  # the gRPC status name, "OK", or what else ended it
    accepted: bool = False
    queue_wait: float | None = None
    job_time: float | None = None
    frames: int = 0
    started: float = 0.0  # monotonic
    ended: float = 0.0
    reattached: int = 0  # submit: the watches follow() opened again


def job_request(rng: random.Random, images: tuple[bytes, bytes], *, frames: bool) -> pb.StylizeRequest:
    options = pb.StylizeOptions(
        max_size=rng.choice((32, 48, 64)), iterations=rng.randint(2, 5), init=pb.INIT_CONTENT
    )
    if frames:
        options.frame_every = 1
        options.frame_format = pb.IMAGE_FORMAT_PNG
        options.frame_max_size = 256
    return pb.StylizeRequest(
        content_image=images[0], styles=[pb.StyleImage(image=images[1])], options=options
    )


def tiny_images(seed: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    encoded = []
    for width, height in ((48, 32), (32, 32)):
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded[0], encoded[1]


def run_call(
    stub: pb_grpc.StyleTransferStub,
    behaviour: str,
    rng: random.Random,
    images: tuple[bytes, bytes],
    chaos: ServerUnderKills | None = None,
) -> Call:
    """One in-process Stylize call with the given behaviour (all but kill and submit)."""
    call = Call(behaviour)
    timeout = rng.uniform(0.2, 1.5) if behaviour == "deadline" else CALL_TIMEOUT
    cancel_after = rng.randint(0, 3) if behaviour == "cancel" else None
    started = call.started = time.monotonic()
    first_progress: float | None = None
    stream = stub.Stylize(job_request(rng, images, frames=behaviour == "slow"), timeout=timeout)
    result = None
    events = 0
    try:
        for response in stream:
            call.accepted = True
            events += 1
            kind = response.WhichOneof("event")
            if kind == "progress" and first_progress is None:
                first_progress = time.monotonic()
            elif kind == "frame":
                call.frames += 1
            elif kind == "result":
                result = response.result
            if cancel_after is not None and events > cancel_after:
                stream.cancel()
            if behaviour == "slow":
                time.sleep(rng.uniform(0.1, 0.4))
        call.status = "OK"
    except grpc.RpcError as err:
        call.status = err.code().name
    ended = call.ended = time.monotonic()
    if result is not None:
        call.outcome = "completed"
        if first_progress is not None:
            call.queue_wait = first_progress - started
            call.job_time = ended - first_progress
    else:
        call.outcome = _classify(call, behaviour, chaos)
    return call


def _classify(call: Call, behaviour: str, chaos: ServerUnderKills | None = None) -> str:
    """The outcome of a call that brought no Result."""
    status = call.status
    if (
        chaos is not None
        and status == "UNAVAILABLE"
        and call.accepted
        and chaos.killed_during(call.started, call.ended)
    ):
        return "interrupted"  # by a kill: the dying server's connection ended it with a status
    if status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") and not call.accepted:
        return "refused"
    if status == "CANCELLED" and behaviour == "cancel":
        return "cancelled"
    if status == "DEADLINE_EXCEEDED" and behaviour == "deadline":
        return "deadline"
    if call.accepted:
        return "lost"  # accepted, and no status the client can account for
    return "error"


def run_killed_call(
    address: str, rng: random.Random, args: argparse.Namespace, chaos: ServerUnderKills | None = None
) -> Call:
    """A client process that starts a call and is killed with SIGKILL at a random moment of it."""
    call = Call("kill", started=time.monotonic())
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", address, "--seed", str(rng.randrange(2**31))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    stdout = child.stdout
    wanted = rng.randint(1, 4)  # events to see before the kill
    seen: list[str] = []

    def read() -> None:
        for line in stdout:
            seen.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + CALL_TIMEOUT
    while time.monotonic() < deadline and child.poll() is None:
        if len([s for s in seen if s.startswith("event")]) >= wanted:
            break
        time.sleep(0.01)
    alive = child.poll() is None
    if alive:
        child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(5)
    call.ended = time.monotonic()
    call.accepted = any(s.startswith("event") for s in seen)
    if any(s == "event result" for s in seen):
        call.outcome, call.status = "completed", "OK"
    elif alive:
        call.outcome, call.status = "killed", "SIGKILL"
    else:
        ended = [s for s in seen if s.startswith("status ")]
        call.status = ended[-1].removeprefix("status ") if ended else "child exited"
        call.outcome = "refused" if call.status == "RESOURCE_EXHAUSTED" and not call.accepted else "error"
        if chaos is not None and call.status == "UNAVAILABLE":  # the server was down, or killed mid-call
            call.outcome = _classify(call, "kill", chaos)
    return call


def submit_request(rng: random.Random, images: tuple[bytes, bytes]) -> pb.StylizeRequest:
    """A job of a few seconds, long enough to be checkpointed (--checkpoint-seconds 1) and resumed."""
    options = pb.StylizeOptions(
        max_size=rng.choice((96, 112, 128)), iterations=rng.randint(10, 30), init=pb.INIT_CONTENT
    )
    return pb.StylizeRequest(
        content_image=images[0], styles=[pb.StyleImage(image=images[1])], options=options
    )


def run_submitted_job(
    client: StylizeClient,
    rng: random.Random,
    images: tuple[bytes, bytes],
    accepted_jobs: list[str],
    lock: threading.Lock,
) -> Call:
    """submit: SubmitJob, then follow the job to its end across restarts. Its id is recorded as soon as
    SubmitJob answers, for the check at the end, which decides whether the job was lost."""
    call = Call("submit", started=time.monotonic())
    try:
        job = client.submit_request(submit_request(rng, images))
    except StylizeError as err:
        call.status, call.ended = err.code.name, time.monotonic()
        # UNAVAILABLE: the server is down (or died before it answered: the store check finds such a job).
        refused = err.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
        call.outcome = "refused" if refused else "error"
        return call
    call.accepted = True
    with lock:
        accepted_jobs.append(job.id)
    first_progress: float | None = None
    after = 0
    deadline = call.started + CALL_TIMEOUT
    while True:
        watch = client.follow(job.id, after, reconnect_seconds=FOLLOW_RECONNECT_SECONDS)
        try:
            for event in watch:
                if isinstance(event.event, pb.Progress) and first_progress is None:
                    first_progress = time.monotonic()
            call.status, call.outcome = "OK", "completed"
        except StylizeError as err:
            call.reattached += watch.reconnects
            after = watch.last_sequence
            if err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() + 1 < deadline:
                time.sleep(rng.uniform(0.2, 1.0))  # too many streams open at once: watch again later
                continue
            call.status = err.code.name
            # The job's own error status (it failed or was cancelled), or follow() gave up: either way the
            # check at the end looks at the job itself.
            call.outcome = "job ended" if err.code not in _GAVE_UP else "unfollowed"
        else:
            call.reattached += watch.reconnects
        break
    call.ended = time.monotonic()
    if call.outcome == "completed" and first_progress is not None:
        call.queue_wait = first_progress - call.started
        call.job_time = call.ended - first_progress
    return call


# A follow that raised one of these stopped watching; the job may still be running.
_GAVE_UP = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND)


def child_main(address: str, seed: int) -> int:
    """--child: one call, one line per event on stdout, until the parent kills this process."""
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StyleTransferStub(channel)
        try:
            for response in stub.Stylize(
                job_request(rng, tiny_images(seed), frames=True), timeout=CALL_TIMEOUT
            ):
                print(f"event {response.WhichOneof('event')}", flush=True)
        except grpc.RpcError as err:
            print(f"status {err.code().name}", flush=True)
    return 0


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class JobCheck:
    """The jobs SubmitJob accepted, looked up at the end (GetJob), and the whole store (ListJobs)."""

    accepted: int = 0
    final_states: dict[str, int] = field(default_factory=dict)  # by state, NOT_FOUND, or still unfinished
    lost: int = 0
    lost_jobs: list[str] = field(default_factory=list)  # "ID: why", the first 20
    reattached: int = 0  # watches that follow() opened again after a restart
    # The submit calls by how their follow() ended: completed, "job ended" (the job's error status) or
    # "unfollowed" (it gave up reattaching; the job itself is checked all the same).
    followed: dict[str, int] = field(default_factory=dict)
    store_jobs: dict[str, int] = field(default_factory=dict)  # the client's jobs in the store, by state
    store_lost: int = 0  # other jobs of the store (Stylize calls', cut submissions') not final with a status


@dataclass
class KillReport:
    kill_every: float
    kills: int = 0
    restart_p50: float | None = None  # seconds from SIGKILL to SERVING again
    restart_max: float | None = None
    interrupted: int = 0  # accepted calls ended UNAVAILABLE by a kill
    refused_down: int = 0  # calls refused UNAVAILABLE: the server was down or still loading its model
    jobs_resumed: int = 0  # GetInfo's job_store.jobs_resumed, summed over the server processes
    resumed_log_lines: int = 0  # "resumed from its checkpoint"
    queued_again_log_lines: int = 0  # unfinished jobs that had no checkpoint yet
    failure: str = ""  # a server that did not come back


@dataclass
class Report:
    clients: int
    seconds: float
    server_flags: list[str]
    submitted: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    errors: int = 0
    queue_wait_p50: float | None = None
    queue_wait_p95: float | None = None
    job_time_p50: float | None = None
    job_time_p95: float | None = None
    peak_rss_mb: float = 0.0
    server_cpu_seconds: float = 0.0
    workers_free: bool = False
    server_jobs: dict[str, int] = field(default_factory=dict)  # outcomes in the server's job log
    server_exit: int | None = None
    frames_received: int = 0
    jobs: JobCheck | None = None  # when the mix has submit
    kills: KillReport | None = None  # with --kill-every

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.errors == 0 and self.workers_free and self.server_exit == 0


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in BEHAVIOURS:
            raise argparse.ArgumentTypeError(
                f"unknown behaviour {name.strip()!r}; known: {', '.join(BEHAVIOURS)}"
            )
        mix[name.strip()] = float(weight or 1)
    return mix


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=20, method="inclusive")  # cuts[9] = p50, cuts[18] = p95
    return cuts[9], cuts[18]


def client_loop(
    index: int,
    address: str,
    stop_at: float,
    args: argparse.Namespace,
    calls: list[Call],
    lock: threading.Lock,
    accepted_jobs: list[str],
    chaos: ServerUnderKills | None = None,
) -> None:
    rng = random.Random(args.seed * 1000 + index)
    images = tiny_images(args.seed + index)
    behaviours, weights = zip(*args.mix.items(), strict=True)
    options = KILL_CHANNEL_OPTIONS if chaos is not None else None
    with contextlib.ExitStack() as stack:
        channel = stack.enter_context(grpc.insecure_channel(address, options))
        stub = pb_grpc.StyleTransferStub(channel)
        # The client API for SubmitJob and follow(): its channel also comes back to a restarted server soon.
        client = (
            stack.enter_context(StylizeClient(address, timeout=CALL_TIMEOUT))
            if "submit" in args.mix
            else None
        )
        refusals = 0  # in a row
        while time.monotonic() < stop_at:
            behaviour = rng.choices(behaviours, weights)[0]
            if behaviour == "kill":
                call = run_killed_call(address, rng, args, chaos)
            elif behaviour == "submit":
                assert client is not None
                call = run_submitted_job(client, rng, images, accepted_jobs, lock)
            else:
                call = run_call(stub, behaviour, rng, images, chaos)
            with lock:
                calls.append(call)
            refusals = refusals + 1 if call.outcome == "refused" else 0
            if refusals:  # back off exponentially, with jitter, as a well-behaved client does
                time.sleep(rng.uniform(0, min(MAX_BACKOFF, 0.1 * 2**refusals)))


def wait_workers_free(addresses: Sequence[str], timeout: float) -> bool:
    """Until every server (each replica) has no job running and none queued."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.StyleTransferStub(channel)
            while True:
                load = stub.GetInfo(pb.GetInfoRequest(), timeout=10).load
                if load.running_jobs == 0 and load.queued_jobs == 0:
                    break
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
    return True


def server_job_outcomes(lines: list[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in lines:
        if match := JOB_LINE.search(line):
            outcome = match.group(2)
            counts[re.split(r"[:(]", outcome, maxsplit=1)[0].strip()] += 1
    return dict(counts)


def job_problem(job: pb.Job) -> str | None:
    """Why a job counts as lost at the end, or None: it must be final, a SUCCEEDED one with its Result, a
    FAILED or CANCELLED one with its error status."""
    state = pb.JobState.Name(job.state)
    if job.state not in FINAL_STATES:
        return f"still {state}"
    if job.state == pb.SUCCEEDED and not job.HasField("result"):
        return "SUCCEEDED without a Result"
    if job.state != pb.SUCCEEDED and not (job.HasField("error") and job.error.code_name):
        return f"{state} without an error status"
    return None


def check_jobs(address: str, accepted_jobs: list[str], timeout: float) -> JobCheck:
    """Poll GetJob for every accepted job until each is final (or NOT_FOUND), within `timeout`; then list
    the store's jobs and check those that no SubmitJob answer named."""
    check = JobCheck(accepted=len(accepted_jobs))
    final: dict[str, pb.Job | None] = {}  # None: NOT_FOUND
    last: dict[str, pb.Job] = {}
    deadline = time.monotonic() + timeout
    with StylizeClient(address, timeout=10) as client:
        while True:
            for job_id in accepted_jobs:
                if job_id in final:
                    continue
                try:
                    job = client.get(job_id, include_image=False)
                except StylizeError as err:
                    if err.code is grpc.StatusCode.NOT_FOUND:
                        final[job_id] = None
                    continue  # else ask again on the next round
                last[job_id] = job
                if job.state in FINAL_STATES:
                    final[job_id] = job
            if len(final) == len(accepted_jobs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        states: Counter[str] = Counter()
        for job_id in accepted_jobs:
            if job_id not in final:
                seen = last.get(job_id)
                why = f"still {pb.JobState.Name(seen.state)}" if seen else "no answer"
                states["unfinished"] += 1
            elif (ended := final[job_id]) is None:
                why = "NOT_FOUND"
                states["NOT_FOUND"] += 1
            else:
                states[pb.JobState.Name(ended.state)] += 1
                if (problem := job_problem(ended)) is None:
                    continue
                why = problem
            check.lost += 1
            if len(check.lost_jobs) < 20:
                check.lost_jobs.append(f"{job_id}: {why}")
        check.final_states = dict(states)
        # The store holds the Stylize calls' jobs too: one whose client process was just killed ends
        # when the server notices, so give the others the rest of the same time.
        while True:
            try:
                store = list(client.jobs(page_size=100))
            except StylizeError as err:
                check.store_lost = 1
                check.lost_jobs.append(f"ListJobs failed: {err}")
                return check
            if all(job.state in FINAL_STATES for job in store) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    check.store_jobs = dict(Counter(pb.JobState.Name(job.state) for job in store))
    ours = set(accepted_jobs)
    for job in store:
        if job.id not in ours and (problem := job_problem(job)) is not None:
            check.store_lost += 1
            if len(check.lost_jobs) < 20:
                check.lost_jobs.append(f"{job.id} (not submitted by a submit call): {problem}")
    return check


def run(args: argparse.Namespace) -> Report:
    flags = [
        "--concurrency",
        str(args.concurrency),
        "--queue-size",
        str(args.queue_size),
        "--max-jobs-per-client",
        str(args.max_jobs_per_client or args.concurrency + args.queue_size),
        "--grace-seconds",
        "10",
    ]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.kill_every or args.replicas > 1:
        flags += ["--checkpoint-seconds", str(KILL_CHECKPOINT_SECONDS)]
    redis = None
    if args.replicas > 1:
        if args.store_url is None:
            redis = RedisProcess()
            args.store_url = redis.url
        flags += ["--store-url", args.store_url, "--lease-seconds", f"{args.lease_seconds:g}"]
    report = Report(clients=args.clients, seconds=args.seconds, server_flags=flags)
    fleet = args.kill_every or args.replicas > 1
    chaos = ServerUnderKills(flags, args.server_log, args.kill_every, args.replicas) if fleet else None
    server = chaos.server if chaos else ServerProcess(flags, args.server_log)
    try:
        if chaos:
            chaos.wait_serving()
        else:
            server.wait_serving()
        address = chaos.address if chaos else server.address
        calls: list[Call] = []
        accepted_jobs: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client_loop,
                args=(i, address, stop_at, args, calls, lock, accepted_jobs, chaos),
                daemon=True,
            )
            for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        if chaos and args.kill_every:
            chaos.start_kills(stop_at)
            # The kills end with the clients' time; the clients' last calls then run on a server that stays.
            time.sleep(max(0.0, stop_at - time.monotonic()))
            chaos.stop_kills()
            server = chaos.server
        for thread in threads:
            thread.join(args.seconds + CALL_TIMEOUT + 60)
        stuck = sum(thread.is_alive() for thread in threads)

        if args.mix.get("submit") or chaos:
            report.jobs = check_jobs(address, list(accepted_jobs), JOB_SETTLE_TIMEOUT)
            report.jobs.reattached = sum(call.reattached for call in calls)
            report.jobs.followed = dict(
                Counter(c.outcome for c in calls if c.behaviour == "submit" and c.accepted)
            )
        try:
            report.workers_free = wait_workers_free(chaos.addresses if chaos else [address], SETTLE_TIMEOUT)
        except grpc.RpcError:
            if not chaos:
                raise
            report.workers_free = False  # the server did not come back: chaos.failure says why
        servers = chaos.servers if chaos else [server]
        report.peak_rss_mb = (
            max([s.proc_status("VmHWM") for s in servers] + [chaos.peak_rss if chaos else 0]) / 2**20
        )
        report.server_cpu_seconds = sum(s.cpu_seconds() for s in servers) + (
            chaos.cpu_seconds if chaos else 0.0
        )
        report.submitted = len(calls)
        report.outcomes = dict(Counter(call.outcome for call in calls))
        report.statuses = dict(Counter(call.status for call in calls))
        report.lost = report.outcomes.get("lost", 0) + stuck
        report.errors = report.outcomes.get("error", 0)
        if report.jobs:
            report.lost += report.jobs.lost + report.jobs.store_lost
        report.frames_received = sum(call.frames for call in calls)
        waits = [c.queue_wait for c in calls if c.queue_wait is not None]
        times = [c.job_time for c in calls if c.job_time is not None]
        report.queue_wait_p50, report.queue_wait_p95 = percentiles(waits)
        report.job_time_p50, report.job_time_p95 = percentiles(times)
        if chaos and args.kill_every:
            report.kills = kill_report(chaos, report.outcomes.get("interrupted", 0))
            report.kills.refused_down = sum(
                c.outcome == "refused" and c.status == "UNAVAILABLE" for c in calls
            )
            if report.kills.failure:
                report.errors += 1
    finally:
        if chaos:
            chaos.stop_kills()  # should anything above have failed while it was killing
            exits = [s.stop() for s in chaos.servers]
            report.server_exit = next((code for code in exits if code != 0), 0)
        else:
            report.server_exit = server.stop()
        if redis is not None:
            redis.stop()
    lines = chaos.lines() if chaos else server.lines
    report.server_jobs = server_job_outcomes(lines)
    if report.server_jobs.get("internal error"):
        report.errors += report.server_jobs["internal error"]
    if report.kills:
        report.kills.resumed_log_lines = sum(bool(RESUMED_LINE.search(line)) for line in lines)
        report.kills.queued_again_log_lines = sum(bool(QUEUED_AGAIN_LINE.search(line)) for line in lines)
    if chaos and report.ok:
        shutil.rmtree(chaos.state_dir, ignore_errors=True)
    elif chaos:  # for a look at what was lost
        print(f"loadtest: the job store is kept in {chaos.state_dir}", file=sys.stderr)
    return report


def kill_report(chaos: ServerUnderKills, interrupted: int) -> KillReport:
    """The kills' figures, with the server that is up now (the last one) counted in."""
    kills = KillReport(kill_every=chaos.every, kills=len(chaos.kill_times), interrupted=interrupted)
    kills.restart_p50, _ = percentiles(chaos.restart_seconds)
    kills.restart_max = max(chaos.restart_seconds, default=None)
    kills.failure = chaos.failure
    kills.jobs_resumed = chaos.jobs_resumed
    if not chaos.failure:
        try:
            kills.jobs_resumed += sum(jobs_resumed(address) for address in chaos.addresses)
        except grpc.RpcError as err:
            kills.failure = f"GetInfo failed at the end: {err.code().name}"
    return kills


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def print_report(report: Report) -> None:
    o = report.outcomes
    print(
        f"load test: {report.clients} clients for {report.seconds:g} s; server {' '.join(report.server_flags)}"
    )
    print(f"  submitted        {report.submitted}")
    print(f"  completed        {o.get('completed', 0)}")
    print(f"  refused          {o.get('refused', 0)}")
    print(
        f"  cancelled        {o.get('cancelled', 0)} by the client, {o.get('deadline', 0)} by their deadline"
    )
    print(f"  killed clients   {o.get('killed', 0)}")
    print(f"  lost             {report.lost}")
    print(f"  other errors     {report.errors}")
    print(f"  queue wait       p50 {_s(report.queue_wait_p50)}, p95 {_s(report.queue_wait_p95)}")
    print(f"  job time         p50 {_s(report.job_time_p50)}, p95 {_s(report.job_time_p95)}")
    print(f"  frames received  {report.frames_received}")
    print(f"  server peak RSS  {report.peak_rss_mb:.0f} MB, CPU {report.server_cpu_seconds:.1f} s")
    print(
        f"  workers free     {'yes' if report.workers_free else 'NO'} (GetInfo load after the clients stopped)"
    )
    if report.kills:
        print_kills(report.kills)
    if report.jobs:
        print_jobs(report.jobs)
    print(f"  server job log   {json.dumps(report.server_jobs, sort_keys=True)}")
    print(f"  server exit      {report.server_exit}")
    print(f"  statuses         {json.dumps(report.statuses, sort_keys=True)}")
    print("result: " + ("ok" if report.ok else "FAILED"))


OPTIONAL = ("jobs", "kills")  # parts of the report left out of its JSON when they do not apply


def print_kills(kills: KillReport) -> None:
    print(
        f"  kills            {kills.kills} (SIGKILL {kills.kill_every:g} s after SERVING; back to SERVING in "
        f"p50 {_s(kills.restart_p50)}, at most {_s(kills.restart_max)})"
    )
    if kills.failure:
        print(f"  kill FAILURE     {kills.failure}")
    print(f"  interrupted      {kills.interrupted} calls ended UNAVAILABLE by a kill")
    print(f"  refused as down  {kills.refused_down} of the refused: UNAVAILABLE, the server down or starting")
    print(
        f"  jobs resumed     {kills.jobs_resumed} from a checkpoint (GetInfo; the log: "
        f"{kills.resumed_log_lines}), {kills.queued_again_log_lines} queued again without one"
    )


def print_jobs(jobs: JobCheck) -> None:
    print(
        f"  jobs submitted   {jobs.accepted} accepted by SubmitJob, followed with "
        f"{jobs.reattached} reattachments"
    )
    print(f"  jobs followed    {json.dumps(jobs.followed, sort_keys=True)}")
    print(f"  jobs at the end  {json.dumps(jobs.final_states, sort_keys=True)}")
    print(f"  jobs lost        {jobs.lost}")
    print(
        f"  job store        {json.dumps(jobs.store_jobs, sort_keys=True)}; "
        f"{jobs.store_lost} other jobs not final with a status"
    )
    for line in jobs.lost_jobs:
        print(f"    {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="how long they run (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of every random choice (default: %(default)s)"
    )
    parser.add_argument(
        "--mix",
        type=parse_mix,
        help=f"behaviour weights (default: {DEFAULT_MIX}; with --kill-every: {KILL_MIX})",
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="kill the server with SIGKILL this many seconds after it became SERVING and start it again on "
        "the same port and state directory, over and over (default: never)",
    )
    parser.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency (default: 1)")
    parser.add_argument("--queue-size", type=int, default=8, help="the server's --queue-size (default: 8)")
    parser.add_argument(
        "--max-jobs-per-client",
        type=int,
        default=0,
        help="the server's --max-jobs-per-client (default: concurrency + queue size, as every client here "
        "shares one address)",
    )
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads (default: its own)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="servers sharing one Redis job store (--store-url), the clients spread over them round robin; "
        "with --kill-every they are killed in turn (default: 1, on its own --state-dir)",
    )
    parser.add_argument(
        "--store-url",
        help="with --replicas: the replicas' Redis (default: a redis-server started for the run)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=FLEET_LEASE_SECONDS,
        help="with --replicas: the replicas' --lease-seconds (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--server-log", type=Path, help="write the server's log here")
    parser.add_argument("--child", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.seed)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be >= 1 and --seconds > 0")
    if args.kill_every < 0:
        parser.error("--kill-every must be >= 0")
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")
    if args.mix is None:
        args.mix = parse_mix(KILL_MIX if args.kill_every or args.replicas > 1 else DEFAULT_MIX)

    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {
            key: value for key, value in asdict(report).items() if value is not None or key not in OPTIONAL
        }
        args.json.write_text(json.dumps({**data, "ok": report.ok}, indent=2, sort_keys=True) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
