#!/usr/bin/env python3
"""Load and chaos test: start stylize-server, run N concurrent clients for T seconds, report what happened.

    .venv/bin/python scripts/loadtest.py --clients 32 --seconds 300       # the README's figures
    .venv/bin/python scripts/loadtest.py --clients 8 --seconds 30 --json out/load.json

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
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import signal
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

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import procfs
from stylize_service.server.readiness import wait_for_ready_file

BEHAVIOURS = ("complete", "cancel", "kill", "slow", "deadline")
DEFAULT_MIX = "complete=4,cancel=2,kill=1,slow=1,deadline=2"
CALL_TIMEOUT = 120.0  # a generous deadline for calls that should finish: missing it counts as lost
START_TIMEOUT = 180.0  # the server loads the model and compiles the default graphs
MAX_BACKOFF = 2.0  # seconds a refused client waits at most before it tries again
SETTLE_TIMEOUT = 30.0  # after the clients stop, how long the workers may take to become free
JOB_LINE = re.compile(r" job (\d+) .*outcome=(.*)$")


# --- the server ------------------------------------------------------------------------------------


class ServerProcess:
    """stylize-server as a subprocess on 127.0.0.1 and a free port; its log is kept (and optionally
    written to a file) by a reader thread."""

    def __init__(self, flags: Sequence[str], log_path: Path | None = None) -> None:
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
                "0",
                "--ready-file",
                str(self._ready),
                "--state-dir",
                str(self._ready.parent / "state"),
                *flags,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "STYLIZE_LOG_LEVEL": "INFO"},
        )
        self.lines: list[str] = []
        self._log = log_path.open("w") if log_path else None
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
    stub: pb_grpc.StyleTransferStub, behaviour: str, rng: random.Random, images: tuple[bytes, bytes]
) -> Call:
    """One in-process call with the given behaviour (all but kill)."""
    call = Call(behaviour)
    timeout = rng.uniform(0.2, 1.5) if behaviour == "deadline" else CALL_TIMEOUT
    cancel_after = rng.randint(0, 3) if behaviour == "cancel" else None
    started = time.monotonic()
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
    ended = time.monotonic()
    if result is not None:
        call.outcome = "completed"
        if first_progress is not None:
            call.queue_wait = first_progress - started
            call.job_time = ended - first_progress
    else:
        call.outcome = _classify(call, behaviour)
    return call


def _classify(call: Call, behaviour: str) -> str:
    """The outcome of a call that brought no Result."""
    status = call.status
    if status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") and not call.accepted:
        return "refused"
    if status == "CANCELLED" and behaviour == "cancel":
        return "cancelled"
    if status == "DEADLINE_EXCEEDED" and behaviour == "deadline":
        return "deadline"
    if call.accepted:
        return "lost"  # accepted, and no status the client can account for
    return "error"


def run_killed_call(address: str, rng: random.Random, args: argparse.Namespace) -> Call:
    """A client process that starts a call and is killed with SIGKILL at a random moment of it."""
    call = Call("kill")
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
    call.accepted = any(s.startswith("event") for s in seen)
    if any(s == "event result" for s in seen):
        call.outcome, call.status = "completed", "OK"
    elif alive:
        call.outcome, call.status = "killed", "SIGKILL"
    else:
        ended = [s for s in seen if s.startswith("status ")]
        call.status = ended[-1].removeprefix("status ") if ended else "child exited"
        call.outcome = "refused" if call.status == "RESOURCE_EXHAUSTED" and not call.accepted else "error"
    return call


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
) -> None:
    rng = random.Random(args.seed * 1000 + index)
    images = tiny_images(args.seed + index)
    behaviours, weights = zip(*args.mix.items(), strict=True)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StyleTransferStub(channel)
        refusals = 0  # in a row
        while time.monotonic() < stop_at:
            behaviour = rng.choices(behaviours, weights)[0]
            if behaviour == "kill":
                call = run_killed_call(address, rng, args)
            else:
                call = run_call(stub, behaviour, rng, images)
            with lock:
                calls.append(call)
            refusals = refusals + 1 if call.outcome == "refused" else 0
            if refusals:  # back off exponentially, with jitter, as a well-behaved client does
                time.sleep(rng.uniform(0, min(MAX_BACKOFF, 0.1 * 2**refusals)))


def wait_workers_free(address: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StyleTransferStub(channel)
        while time.monotonic() < deadline:
            load = stub.GetInfo(pb.GetInfoRequest(), timeout=10).load
            if load.running_jobs == 0 and load.queued_jobs == 0:
                return True
            time.sleep(0.2)
    return False


def server_job_outcomes(lines: list[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in lines:
        if match := JOB_LINE.search(line):
            outcome = match.group(2)
            counts[re.split(r"[:(]", outcome, maxsplit=1)[0].strip()] += 1
    return dict(counts)


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
    report = Report(clients=args.clients, seconds=args.seconds, server_flags=flags)
    server = ServerProcess(flags, args.server_log)
    try:
        server.wait_serving()
        calls: list[Call] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client_loop, args=(i, server.address, stop_at, args, calls, lock), daemon=True
            )
            for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.seconds + CALL_TIMEOUT + 60)
        stuck = sum(thread.is_alive() for thread in threads)

        report.workers_free = wait_workers_free(server.address, SETTLE_TIMEOUT)
        report.peak_rss_mb = server.proc_status("VmHWM") / 2**20
        report.server_cpu_seconds = server.cpu_seconds()
        report.submitted = len(calls)
        report.outcomes = dict(Counter(call.outcome for call in calls))
        report.statuses = dict(Counter(call.status for call in calls))
        report.lost = report.outcomes.get("lost", 0) + stuck
        report.errors = report.outcomes.get("error", 0)
        report.frames_received = sum(call.frames for call in calls)
        waits = [c.queue_wait for c in calls if c.queue_wait is not None]
        times = [c.job_time for c in calls if c.job_time is not None]
        report.queue_wait_p50, report.queue_wait_p95 = percentiles(waits)
        report.job_time_p50, report.job_time_p95 = percentiles(times)
    finally:
        report.server_exit = server.stop()
    report.server_jobs = server_job_outcomes(server.lines)
    if report.server_jobs.get("internal error"):
        report.errors += report.server_jobs["internal error"]
    return report


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
    print(f"  server job log   {json.dumps(report.server_jobs, sort_keys=True)}")
    print(f"  server exit      {report.server_exit}")
    print(f"  statuses         {json.dumps(report.statuses, sort_keys=True)}")
    print("result: " + ("ok" if report.ok else "FAILED"))


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
        default=parse_mix(DEFAULT_MIX),
        help=f"behaviour weights (default: {DEFAULT_MIX})",
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
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--server-log", type=Path, help="write the server's log here")
    parser.add_argument("--child", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.seed)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be >= 1 and --seconds > 0")

    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2, sort_keys=True) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
