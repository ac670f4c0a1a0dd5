#!/usr/bin/env python3
"""Hostile-client probe: start stylize-server on loopback, apply hostile-client patterns, report each as
held or NOT HELD.

    .venv/bin/python scripts/hostile.py                      # --profile short: small counts, < 90 s
    .venv/bin/python scripts/hostile.py --profile full       # the counts of the issue
    .venv/bin/python scripts/hostile.py --only watch,idle --json out/hostile.json

The patterns (--only takes their names):

  watch     N grpc.health.v1.Health/Watch streams, no deadline, left open; N is the server's handler
            threads (concurrency + queue size from GetInfo, + app.py's EXTRA_THREADS) plus two;
  unread    N Stylize calls, each on its own channel (BDP probing off: HTTP/2's 64 KB window), tiny
            jobs (32 px, 2 iterations) with a 4096 px JPEG frame every iteration, never read; checked
            once the jobs have ended;
  idle      silent TCP connections to the gRPC port and to the --metrics-port HTTP port;
  unknown   calls to random unknown method names without a token, against --auth-tokens-file; /metrics
            must stay bounded;
  strings   an 8 MB layer name (style_layers[0].layer, content_layers[0].layer) and a method path with
            an embedded newline: a short INVALID_ARGUMENT (or UNIMPLEMENTED/UNAUTHENTICATED for the
            path), no megabytes of log and no forged log line;
  memory    large-style jobs under --memory-limit-mb 2000: a 256 px content with style_scale 8 and a
            2048x2048 style, and (full profile only: it takes minutes) a 512x32 content at max_size
            4096; each completes or is refused with RESOURCE_EXHAUSTED naming memory (a job still
            running at the probe's deadline is cut short), and the server's peak RSS stays within
            the budget.

After each pattern, with its load still applied, health Check and GetInfo must answer within 2 s and the
server's RSS must be within its memory budget; then the load is released and a tiny Stylize must still
complete. A pattern that misses any of these is NOT HELD. The exit status is 0 only if every pattern
held. Everything goes to 127.0.0.1 only; the servers are stopped and every socket closed at the end, and
the whole run is bounded by --seconds (plus one server start); a pattern left without time is NOT HELD.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import procfs
from stylize_service.server.app import EXTRA_THREADS
from stylize_service.server.readiness import wait_for_ready_file

HOST = "127.0.0.1"  # the only address this probe ever talks to
PATTERNS = ("watch", "unread", "idle", "unknown", "strings", "memory")
TITLES = {
    "watch": "Watch flood",
    "unread": "Unread streams",
    "idle": "Idle connections",
    "unknown": "Unknown-method flood",
    "strings": "Oversized strings",
    "memory": "Large styles, tight budget",
}
ANSWER_SECONDS = 2.0  # Check and GetInfo must answer within this, under load
START_SECONDS = 180.0  # the server loads the model and compiles the default graphs
STOP_SECONDS = 8.0  # SIGTERM (drain), then SIGKILL after this: a probe needs no graceful end
MEMORY_LIMIT_MB = 2000
METRICS_GROWTH_LIMIT = 64 * 1024  # bytes /metrics may grow by during the unknown-method flood
LOG_GROWTH_PER_CALL = 1024  # bytes of log one refused unknown-method call may cost
LOG_GROWTH_LIMIT = 1024 * 1024  # bytes of log the oversized-strings pattern may cost in all
SHORT_MESSAGE = 1024  # characters of a status message that count as short
CONNECT_SECONDS = 10.0  # a SYN dropped by a full backlog is retried after 1 s, 3 s, ...
IDLE_THREAD_ALLOWANCE = 16  # server threads that hundreds of idle connections may cost
OVERSIZED_STRING = 8 * 1024 * 1024
FORGED = "HOSTILE-PROBE-FORGED"  # starts the forged log line of the newline method path
METRIC_SERIES = "stylize_grpc_requests_total{"
# A job that ran or waited (refused and invalid calls log a job line too, but never held a worker).
JOB_LINE = re.compile(r" job (\d+) .*outcome=(?!refused|invalid)")
STYLIZE_SERIES = 'stylize_grpc_requests_total{code="OK",'  # labels come sorted: code, method
STYLIZE_METHOD = 'method="/stylize.v1.StyleTransfer/Stylize"'
# grpcio's client grows an unread stream's HTTP/2 window by BDP probing to about 4 MB (grpcio 1.85 on
# loopback: six 4096 px JPEG frames of a 32 px job, 3.8 MB, pass; seven block). A client that turns the
# probe off keeps the 64 KB window, as any HTTP/2 client may, and then one 600 KB frame blocks the send.
UNREAD_CHANNEL_OPTIONS = (("grpc.http2.bdp_probe", 0),)
UNREAD_ITERATIONS = 2


# --- profiles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Counts and times of one run. The server's queue decides the watch/unread counts (via its handler
    threads), so the short profile asks for a smaller queue."""

    concurrency: int
    queue_size: int
    idle_connections: int  # per port
    idle_settle_seconds: float  # how long the server may take to drop idle connections
    unknown_methods: int
    unread_settle_seconds: float  # how long the unread jobs may take to end once submitted
    memory_job_seconds: float  # deadline of each large-style job
    cancel_over_budget: bool  # cancel a large-style job once the server's peak passes the budget
    memory_cases: tuple[str, ...]  # which of MEMORY_CASES
    seconds: float  # the whole run


PROFILES = {
    "short": Profile(
        concurrency=1,
        queue_size=2,  # fewer handler threads, so fewer watch and unread streams
        idle_connections=100,
        idle_settle_seconds=10.0,
        unknown_methods=800,
        unread_settle_seconds=30.0,
        memory_job_seconds=15.0,
        cancel_over_budget=True,  # the finding is made; the rest of the job would only cost time
        # The 4096 px output takes minutes on two cores, more than a short run has.
        memory_cases=("style",),
        seconds=80.0,
    ),
    "full": Profile(
        concurrency=1,
        queue_size=8,
        idle_connections=300,
        idle_settle_seconds=30.0,
        unknown_methods=2000,
        unread_settle_seconds=90.0,
        memory_job_seconds=240.0,
        cancel_over_budget=False,  # let it run, to report how far past the budget it goes
        memory_cases=("style", "wide"),
        seconds=900.0,
    ),
}


# --- pure helpers (unit-tested) --------------------------------------------------------------------


def parse_only(text: str) -> tuple[str, ...]:
    """--only's comma-separated pattern names, in the order of PATTERNS; raises ValueError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATTERNS]
    if unknown or not names:
        raise ValueError(f"unknown pattern(s) {', '.join(unknown) or '(none)'}; known: {', '.join(PATTERNS)}")
    return tuple(name for name in PATTERNS if name in names)


def handler_threads(concurrency: int, queue_size: int, extra: int = EXTRA_THREADS) -> int:
    """The server's gRPC handler threads (app.py sizes its pool so)."""
    return concurrency + queue_size + extra


def flood_count(concurrency: int, queue_size: int, extra: int = EXTRA_THREADS) -> int:
    """Streams that outnumber the handler threads, with a margin of two."""
    return handler_threads(concurrency, queue_size, extra) + 2


def job_lines(log: str) -> int:
    """Jobs that ended in this piece of the server's log (each writes one `job NNNNNN ... outcome=` line)."""
    return sum(1 for line in log.splitlines() if JOB_LINE.search(line))


def metric_series(exposition: str, prefix: str = METRIC_SERIES) -> int:
    """Samples of one metric in Prometheus' text format (lines starting with prefix)."""
    return sum(1 for line in exposition.splitlines() if line.startswith(prefix))


def metric_total(exposition: str, prefix: str, contains: str = "") -> float:
    """The sum of the samples whose line starts with prefix and contains the given text."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(prefix) and contains in line:
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(maxsplit=1)[1])
    return total


def forged_lines(log: str, marker: str = FORGED) -> int:
    """Log lines that start with marker: a line a client forged through a newline it sent."""
    return sum(1 for line in log.splitlines() if line.startswith(marker))


def megabytes(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MB"


def kilobytes(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f} KB"


# --- the server ------------------------------------------------------------------------------------


def free_port() -> int:
    """A port free on HOST now (the server binds it a moment later; loopback makes a race unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """stylize-server on HOST, a free port and a free metrics port, logging at INFO to a file (so that the
    probe can measure the log's growth without holding it)."""

    def __init__(self, flags: Sequence[str], workdir: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        self.metrics_port = free_port()
        executable = Path(sys.executable).with_name("stylize-server")
        command = (
            [str(executable)]
            if executable.is_file()
            else [sys.executable, "-m", "stylize_service.server.main"]
        )
        self._log = self.log_path.open("wb")
        self.ready_path = self.log_path.with_suffix(".ready.json")
        self.process = subprocess.Popen(
            [
                *command,
                "--host",
                HOST,
                "--port",
                "0",
                "--metrics-port",
                str(self.metrics_port),
                "--log-level",
                "INFO",
                "--ready-file",
                str(self.ready_path),
                "--state-dir",
                str(workdir / f"{name}.state"),
                *flags,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.address = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int, limit: int = 64 * 2**20) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read(limit).decode("utf-8", errors="replace")

    def wait_serving(self, deadline: float) -> None:
        if not self.address:
            try:
                self.address = wait_for_ready_file(
                    self.ready_path, self.process, max(0.0, deadline - time.monotonic())
                ).address
            except (RuntimeError, TimeoutError):
                raise RuntimeError("the server did not start:\n" + self.log_since(0)[-3000:]) from None
        while time.monotonic() < deadline and self.alive():
            if check_health(self.address).ok:
                return
            time.sleep(0.2)
        raise RuntimeError("the server never became SERVING:\n" + self.log_since(0)[-3000:])

    def status(self, key: str) -> int:
        """A figure of /proc/PID/status: Threads as a count, Vm* in bytes; -1 if unreadable."""
        try:
            return procfs.status_value(self.pid, key)
        except (OSError, ValueError):
            return -1

    def reset_peak(self) -> bool:
        """Reset VmHWM, so that each pattern's peak is its own."""
        return procfs.reset_peak(self.pid)

    def stop(self) -> int | None:
        """SIGTERM (the server drains), then SIGKILL; the exit status, None if it had to be killed."""
        code: int | None = None
        try:
            if self.alive():
                self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        finally:
            self._log.close()
        return code


# --- the checks ------------------------------------------------------------------------------------


@dataclass
class Answer:
    ok: bool
    seconds: float
    detail: str

    def __str__(self) -> str:
        return f"{self.seconds:.2f} s" if self.ok else f"{self.detail} after {self.seconds:.2f} s"


def _timed(call: Callable[[], object], accept: Callable[[object], str | None]) -> Answer:
    started = time.monotonic()
    try:
        problem = accept(call())
    except grpc.RpcError as err:
        return Answer(False, time.monotonic() - started, err.code().name)  # type: ignore[attr-defined]
    except (OSError, ValueError) as err:
        return Answer(False, time.monotonic() - started, f"{type(err).__name__}: {err}")
    elapsed = time.monotonic() - started
    if problem is None and elapsed > ANSWER_SECONDS:
        problem = "slow"
    return Answer(problem is None, elapsed, problem or "")


def check_health(address: str, timeout: float = ANSWER_SECONDS) -> Answer:
    """health Check on a fresh channel (a hostile client's channel must not carry it)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving(response: object) -> str | None:
            status = response.status  # type: ignore[attr-defined]
            return None if status == health_pb2.HealthCheckResponse.SERVING else f"status {status}"

        return _timed(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout), serving)


def check_info(address: str, metadata: Sequence[tuple[str, str]]) -> tuple[Answer, pb.GetInfoResponse | None]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StyleTransferStub(channel)
        box: list[pb.GetInfoResponse] = []

        def keep(response: object) -> str | None:
            box.append(response)  # type: ignore[arg-type]
            return None

        answer = _timed(
            lambda: stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=ANSWER_SECONDS), keep
        )
        return answer, (box[0] if box else None)


def scrape(port: int, timeout: float = ANSWER_SECONDS) -> tuple[Answer, bytes]:
    body: list[bytes] = []

    def fetch() -> bytes:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout) as response:
            return response.read()

    answer = _timed(fetch, lambda data: body.append(data) or None)  # type: ignore[func-returns-value]
    return answer, (body[0] if body else b"")


def noise_png(width: int, height: int, seed: int) -> bytes:
    """Random pixels as PNG, in memory (the probe never writes images to disk)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def tiny_request(**options: object) -> pb.StylizeRequest:
    return pb.StylizeRequest(
        content_image=noise_png(48, 32, 1),
        styles=[pb.StyleImage(image=noise_png(32, 32, 2))],
        options=pb.StylizeOptions(**{"max_size": 32, "iterations": 2, **options}),  # type: ignore[arg-type]
    )


def read_stream(call: Iterable[pb.StylizeResponse]) -> tuple[str, str, bool]:
    """Read a Stylize stream to its end: (status name, status details, whether a Result came)."""
    result = False
    try:
        for response in call:
            result = result or response.WhichOneof("event") == "result"
    except grpc.RpcError as err:
        return err.code().name, err.details() or "", result  # type: ignore[attr-defined]
    return "OK", "", result


def tiny_stylize(address: str, metadata: Sequence[tuple[str, str]], timeout: float) -> Answer:
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.StyleTransferStub(channel).Stylize(tiny_request(), metadata=metadata, timeout=timeout)
        code, details, result = read_stream(call)
    elapsed = time.monotonic() - started
    if result:
        return Answer(True, elapsed, "")
    return Answer(False, elapsed, f"{code} {details[:120]}".strip())


# --- one pattern's run -----------------------------------------------------------------------------


@dataclass
class PatternResult:
    name: str
    title: str
    load: str = ""
    check: str = "-"
    info: str = "-"
    threads: str = "-"  # before -> under load -> after release
    peak_rss: str = "-"
    log_growth: str = "-"
    after_release: str = "-"
    figures: dict[str, str] = field(default_factory=dict)
    key: str = ""  # the pattern's own figures in a few words, for the summary table
    serves_after_release: bool = False
    peak_seen: int = 0  # peak RSS a pattern measured itself (it may reset VmHWM between its steps)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def held(self) -> bool:
        return not self.failures

    def fail(self, why: str) -> None:
        self.failures.append(why)


@dataclass
class Context:
    servers: Servers
    profile: Profile
    token: str
    deadline: float  # of the whole run
    limits: pb.Limits

    @property
    def server(self) -> ServerProcess:
        assert self.servers.current is not None
        return self.servers.current

    def restart(self, why: str, result: PatternResult) -> None:
        """A fresh server for the rest of the pattern (e.g. after a job that broke the budget or was cut
        short, so that the next step measures itself, not its remains)."""
        self.servers.fresh()
        result.notes.append(f"server restarted: {why}")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def until(self, seconds: float) -> float:
        """A deadline seconds from now, within the run's."""
        return min(time.monotonic() + seconds, self.deadline)


Pattern = Callable[[Context, PatternResult, contextlib.ExitStack], None]


def under_load(ctx: Context, result: PatternResult) -> None:
    """The checks every pattern ends with while its load is still applied."""
    server = ctx.server
    health = check_health(server.address)
    info, _ = check_info(server.address, ctx.metadata)
    result.check, result.info = str(health), str(info)
    if not health.ok:
        result.fail(f"health Check under load: {health}")
    if not info.ok:
        result.fail(f"GetInfo under load: {info}")
    rss = server.status("VmRSS")
    budget = ctx.limits.memory_budget_bytes
    result.figures["RSS under load"] = megabytes(rss)
    if budget and rss > budget:
        result.fail(f"RSS under load {megabytes(rss)} over the budget {megabytes(budget)}")


def after_release(ctx: Context, result: PatternResult) -> None:
    """Once the load is gone: health answers again (the server may take a moment to notice the closed
    streams), then a tiny Stylize completes."""
    address = ctx.server.address
    deadline = ctx.until(15.0)
    health = check_health(address)
    while not health.ok and time.monotonic() < deadline and ctx.server.alive():
        time.sleep(0.5)
        health = check_health(address)
    if not health.ok:
        result.after_release = f"Check {health}"
        result.fail(f"after release: health Check {health}")
        return
    # At least 10 s even past the run's deadline: a tiny job takes well under a second.
    stylize = tiny_stylize(address, ctx.metadata, timeout=max(10.0, min(60.0, ctx.remaining())))
    result.after_release = f"Stylize {stylize}"
    result.serves_after_release = stylize.ok
    if not stylize.ok:
        result.fail(f"after release: tiny Stylize {stylize}")


def run_pattern(ctx: Context, name: str, pattern: Pattern) -> PatternResult:
    first = ctx.server
    result = PatternResult(name, TITLES[name])
    started = time.monotonic()
    threads_before = first.status("Threads")
    log_before = first.log_size()
    peak_reset = first.reset_peak()
    threads_load = -1
    try:
        with contextlib.ExitStack() as load:  # closing it releases the load
            pattern(ctx, result, load)
            threads_load = ctx.server.status("Threads")
            under_load(ctx, result)
        after_release(ctx, result)
    except Exception as err:  # the probe's own failure is a finding too, never a silent pass
        result.fail(f"the probe failed: {type(err).__name__}: {err}")
    server = ctx.server
    if not server.alive():
        result.fail(f"the server exited with status {server.process.returncode}")
    result.threads = f"{threads_before} → {threads_load} → {server.status('Threads')}"
    peak = max(server.status("VmHWM"), result.peak_seen)
    budget = ctx.limits.memory_budget_bytes
    result.peak_rss = f"{megabytes(peak)} / {megabytes(budget)}" + ("" if peak_reset else " (process peak)")
    if budget and peak > budget:
        result.fail(f"peak RSS {megabytes(peak)} over the budget {megabytes(budget)}")
    result.log_growth = kilobytes(ctx.servers.log_growth(first, log_before))
    result.seconds = time.monotonic() - started
    return result


# --- the patterns ----------------------------------------------------------------------------------


def pattern_watch(ctx: Context, result: PatternResult, load: contextlib.ExitStack) -> None:
    count = flood_count(ctx.limits.concurrency, ctx.limits.queue_size)
    result.load = f"{count} Watch streams, no deadline"
    for _ in range(count):
        channel = load.enter_context(grpc.insecure_channel(ctx.server.address))
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        load.callback(call.cancel)
    time.sleep(1.5)  # let the server take them all up before the checks
    threads = handler_threads(ctx.limits.concurrency, ctx.limits.queue_size)
    result.figures["handler threads"] = str(threads)
    result.key = f"{count} streams, {threads} handler threads"


def pattern_unread(ctx: Context, result: PatternResult, load: contextlib.ExitStack) -> None:
    """Tiny jobs whose frames (4096 px JPEG, every iteration) outgrow the HTTP/2 window when nobody
    reads them: once the jobs end, each stream is left with frames it cannot send."""
    count = flood_count(ctx.limits.concurrency, ctx.limits.queue_size)
    result.load = f"{count} Stylize calls, each on its own channel, never read ({UNREAD_ITERATIONS} 4096 px JPEG frames, 64 KB window)"
    request = tiny_request(
        iterations=UNREAD_ITERATIONS,
        tolerance=0.0,
        frame_every=1,
        frame_max_size=4096,
        frame_format=pb.IMAGE_FORMAT_JPEG,
    )
    _, exposition = scrape(ctx.server.metrics_port)
    handlers_before = metric_total(exposition.decode(errors="replace"), STYLIZE_SERIES, STYLIZE_METHOD)
    log_start = ctx.server.log_size()
    started = time.monotonic()
    live: list[tuple[grpc.Channel, grpc.Future, float]] = []
    ended: Counter[str] = Counter()
    submit_until = ctx.until(ctx.profile.unread_settle_seconds)
    call_timeout = max(10.0, ctx.remaining() + 30.0)  # a safety net if the probe itself dies
    last_refusal = 0.0
    while time.monotonic() < submit_until:
        for entry in list(live):
            channel, call, _ = entry
            if call.done():
                live.remove(entry)
                code = call.code().name  # type: ignore[attr-defined]
                ended[code] += 1
                channel.close()
                if code == "RESOURCE_EXHAUSTED":
                    last_refusal = time.monotonic()
        settled = [entry for entry in live if time.monotonic() - entry[2] >= 1.0]
        if len(settled) >= count:
            break
        if len(live) < count and time.monotonic() - last_refusal > 0.5:
            channel = grpc.insecure_channel(ctx.server.address, options=UNREAD_CHANNEL_OPTIONS)
            call = pb_grpc.StyleTransferStub(channel).Stylize(
                request, metadata=ctx.metadata, timeout=call_timeout
            )
            live.append((channel, call, time.monotonic()))
            load.callback(channel.close)
            load.callback(call.cancel)
        time.sleep(0.1)
    result.figures["submitted in"] = f"{time.monotonic() - started:.1f} s"
    # Wait for the jobs to end (their log lines), or for no job to end in 3 s: stuck streams stop them.
    finished, last_change = 0, time.monotonic()
    while time.monotonic() < submit_until:
        now_finished = job_lines(ctx.server.log_since(log_start))
        if now_finished != finished:
            finished, last_change = now_finished, time.monotonic()
        if finished >= count or time.monotonic() - last_change > 3.0:
            break
        time.sleep(0.5)
    result.figures["waited for the jobs"] = f"{time.monotonic() - started:.1f} s in all"
    result.figures["calls open, unread"] = str(sum(not call.done() for _, call, _ in live))
    finished = job_lines(ctx.server.log_since(log_start))
    result.figures["jobs ended (log)"] = str(finished)
    # The scheduler's bounds keep EXTRA_THREADS handler threads for the rest while jobs run or wait;
    # only streams left over from ended jobs can take those. Fewer ended jobs prove nothing either way,
    # unless the server refused the rest: then it bounds the streams it holds, and the checks decide.
    needed = EXTRA_THREADS + 1
    refused = ended.get("RESOURCE_EXHAUSTED", 0)
    if finished < needed and not refused:
        result.fail(
            f"the load was not reached: {finished} job(s) ended, {needed} needed (a slow machine? "
            "give the run more --seconds)"
        )
    answer, exposition = scrape(ctx.server.metrics_port)
    if answer.ok:  # a handler counts its call when it returns: a stuck one never does
        ended_handlers = metric_total(exposition.decode(errors="replace"), STYLIZE_SERIES, STYLIZE_METHOD)
        result.figures["Stylize handlers returned (metrics)"] = f"{ended_handlers - handlers_before:.0f}"
    result.figures["refused and retried"] = str(ended.pop("RESOURCE_EXHAUSTED", 0))
    if ended:
        result.figures["calls that ended unread"] = json.dumps(dict(ended), sort_keys=True)
    result.figures["handler threads"] = str(handler_threads(ctx.limits.concurrency, ctx.limits.queue_size))
    returned = result.figures.get("Stylize handlers returned (metrics)", "?")
    result.key = f"{finished} jobs ended, {returned} of their handlers returned"


def _closed_by_server(sockets: Sequence[socket.socket]) -> int:
    """How many of these connections the server has closed (a non-blocking peek sees EOF or a reset;
    data, such as gRPC's SETTINGS frame, or nothing yet, means open)."""
    closed = 0
    for sock in sockets:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
    return closed


def _open_silent(port: int, count: int, load: contextlib.ExitStack) -> list[socket.socket]:
    """count connections to HOST:port that never send a byte, opened in parallel: a small listen backlog
    (socketserver's is 5) drops SYNs, and each retry waits a second."""

    def connect(_: int) -> socket.socket | None:
        try:
            sock = socket.create_connection((HOST, port), timeout=CONNECT_SECONDS)
        except OSError:
            return None
        sock.setblocking(False)  # silent from here on; peeks must never wait
        return sock

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        sockets = [sock for sock in pool.map(connect, range(count)) if sock is not None]
    for sock in sockets:
        load.enter_context(sock)
    return sockets


def pattern_idle(ctx: Context, result: PatternResult, load: contextlib.ExitStack) -> None:
    server, count = ctx.server, ctx.profile.idle_connections
    grpc_port = int(server.address.rsplit(":", 1)[1])
    result.load = f"{count} silent TCP connections to each of the gRPC and metrics ports"
    threads_before = server.status("Threads")
    by_port: dict[str, list[socket.socket]] = {"gRPC": [], "metrics": []}
    for label, port in (("gRPC", grpc_port), ("metrics", server.metrics_port)):
        started = time.monotonic()
        opened = _open_silent(port, count, load)
        by_port[label] = opened
        result.figures[f"{label} connections opened"] = (
            f"{len(opened)}/{count} in {time.monotonic() - started:.1f} s"
        )
    time.sleep(1.0)
    grown = server.status("Threads") - threads_before
    result.figures["threads grown at once"] = str(grown)
    metrics, _ = scrape(server.metrics_port)
    result.figures["/metrics scrape under load"] = str(metrics)
    if not metrics.ok:
        result.fail(f"/metrics scrape under load: {metrics}")
    # The server may drop idle connections after a timeout of its own: give it the settle time.
    settle_until = ctx.until(ctx.profile.idle_settle_seconds)
    least = most = grown
    while least > IDLE_THREAD_ALLOWANCE and time.monotonic() < settle_until:
        time.sleep(0.5)
        now = server.status("Threads") - threads_before
        least, most = min(least, now), max(most, now)
    result.figures["threads grown at most"] = str(most)
    result.figures["threads grown after settling"] = f"{least} (allowed {IDLE_THREAD_ALLOWANCE})"
    result.key = f"+{least} server threads after {ctx.profile.idle_settle_seconds:g} s (at most +{most})"
    for label, sockets in by_port.items():
        result.figures[f"{label} connections closed by the server"] = f"{_closed_by_server(sockets)}/{count}"
    if least > IDLE_THREAD_ALLOWANCE:
        result.fail(
            f"idle connections hold {least} server threads after {ctx.profile.idle_settle_seconds:g} s "
            f"(allowed {IDLE_THREAD_ALLOWANCE})"
        )


def pattern_unknown(ctx: Context, result: PatternResult, load: contextlib.ExitStack) -> None:
    server, count = ctx.server, ctx.profile.unknown_methods
    result.load = f"{count} calls to random unknown methods, no token"
    before_answer, before = scrape(server.metrics_port)
    if not before_answer.ok:
        result.fail(f"/metrics before the flood: {before_answer}")
    log_before = server.log_size()
    codes: Counter[str] = Counter()
    started = time.monotonic()
    channel = load.enter_context(grpc.insecure_channel(server.address))
    batch = 50
    for first in range(0, count, batch):
        if ctx.remaining() < 5.0:
            result.notes.append(f"stopped after {first} calls: the time budget")
            break
        futures = [
            channel.unary_unary(
                f"/x.Y/Z{secrets.token_hex(8)}",
                request_serializer=lambda data: data,
                response_deserializer=lambda data: data,
            ).future(b"", timeout=10.0)
            for _ in range(min(batch, count - first))
        ]
        for future in futures:
            try:
                future.result()
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1  # type: ignore[attr-defined]
    result.figures["calls/s"] = f"{sum(codes.values()) / max(1e-3, time.monotonic() - started):.0f}"
    result.figures["statuses"] = json.dumps(dict(codes), sort_keys=True)
    after_answer, after = scrape(server.metrics_port)
    if not after_answer.ok:
        result.fail(f"/metrics after the flood: {after_answer}")
    growth = len(after) - len(before)
    series = metric_series(after.decode(errors="replace")) - metric_series(before.decode(errors="replace"))
    result.figures["/metrics"] = f"{len(before)} → {len(after)} bytes (+{kilobytes(growth)})"
    result.figures["new stylize_grpc_requests_total series"] = str(series)
    result.key = f"/metrics +{kilobytes(growth)}, {series} new series"
    if growth >= METRICS_GROWTH_LIMIT:
        result.fail(f"/metrics grew by {kilobytes(growth)} (limit {kilobytes(METRICS_GROWTH_LIMIT)})")
    if set(codes) - {"UNAUTHENTICATED", "UNIMPLEMENTED"}:
        result.fail(f"unexpected statuses {json.dumps(dict(codes), sort_keys=True)}")
    time.sleep(0.3)  # the server's log lines of the last calls
    log_growth = server.log_size() - log_before
    sent = max(1, sum(codes.values()))
    result.figures["log per call"] = f"{log_growth / sent:.0f} bytes"
    if log_growth > LOG_GROWTH_PER_CALL * sent:
        result.fail(f"the log grew by {log_growth / sent:.0f} bytes a call (limit {LOG_GROWTH_PER_CALL})")


def pattern_strings(ctx: Context, result: PatternResult, load: contextlib.ExitStack) -> None:
    server = ctx.server
    result.load = f"{megabytes(OVERSIZED_STRING)} layer names; a method path with a newline"
    log_before = server.log_size()
    channel = load.enter_context(grpc.insecure_channel(server.address))
    stub = pb_grpc.StyleTransferStub(channel)
    keys: list[str] = []
    for name in ("style_layers", "content_layers"):
        request = tiny_request()
        getattr(request.options, name).add(layer="A" * OVERSIZED_STRING)
        code, details, _ = read_stream(
            stub.Stylize(request, metadata=ctx.metadata, timeout=max(1.0, min(60.0, ctx.remaining())))
        )
        result.figures[f"{name}[0].layer"] = f"{code}, message {len(details)} chars: {details[:80]!r}"
        keys.append(f"{name}: {code}")
        if code != "INVALID_ARGUMENT" or len(details) > SHORT_MESSAGE:
            result.fail(
                f"{name}[0].layer of {megabytes(OVERSIZED_STRING)}: {code}, {len(details)} chars "
                f"(want INVALID_ARGUMENT, at most {SHORT_MESSAGE} chars)"
            )
    # A method path with a newline: gRPC's Python client sends it as it is. The server must neither fail
    # badly nor write it into its log raw, where the text after the newline reads as a line of its own.
    path = f"/stylize.v1.StyleTransfer/GetInfo\n{FORGED} 2026-01-01 00:00:00,000 INFO stylize.server: forged"
    for label, metadata in (("no token", ()), ("with token", ctx.metadata)):
        try:
            channel.unary_unary(
                path, request_serializer=lambda data: data, response_deserializer=lambda data: data
            )(b"", metadata=metadata, timeout=ANSWER_SECONDS * 5)
            code, details = "OK", ""
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""  # type: ignore[attr-defined]
        except ValueError as err:  # refused by the client library itself
            result.notes.append(f"method path with a newline ({label}) not sent: {err}")
            continue
        result.figures[f"newline path, {label}"] = f"{code}, message {len(details)} chars"
        if (
            code not in ("INVALID_ARGUMENT", "UNIMPLEMENTED", "UNAUTHENTICATED")
            or len(details) > SHORT_MESSAGE
        ):
            result.fail(f"method path with a newline ({label}): {code} {details[:80]!r}")
    time.sleep(0.3)  # the server's log lines of the last calls
    forged = forged_lines(server.log_since(log_before))
    result.figures["forged log lines"] = str(forged)
    result.key = "; ".join([*keys, f"{forged} forged log line(s)"])
    if forged:
        result.fail(f"{forged} forged log line(s): the server logged the method path's newline raw")
    growth = server.log_size() - log_before
    if growth > LOG_GROWTH_LIMIT:
        result.fail(f"the log grew by {megabytes(growth)} (limit {megabytes(LOG_GROWTH_LIMIT)})")


MEMORY_CASES = {
    "style": "256 px content, style_scale 8, 2048x2048 style",
    "wide": "512x32 content at max_size 4096",
}


def memory_request(name: str) -> pb.StylizeRequest:
    """The large-style job of a MEMORY_CASES name (its images made here, in memory)."""
    if name == "style":
        return pb.StylizeRequest(
            content_image=noise_png(256, 256, 3),
            styles=[pb.StyleImage(image=noise_png(2048, 2048, 4))],
            options=pb.StylizeOptions(max_size=256, style_scale=8.0, iterations=2),
        )
    return pb.StylizeRequest(
        content_image=noise_png(512, 32, 5),
        styles=[pb.StyleImage(image=noise_png(256, 256, 6))],
        options=pb.StylizeOptions(max_size=4096, iterations=1),
    )


def _watch_memory(ctx: Context, call: grpc.Future, reader: threading.Thread, budget: int) -> tuple[int, bool]:
    """Poll the server's peak RSS while the call runs; with the profile's cancel_over_budget, cancel the
    call once the peak passes the budget. (peak, whether cancelled)."""
    peak, cancelled = 0, False
    while reader.is_alive():
        peak = max(peak, ctx.server.status("VmHWM"))
        if ctx.profile.cancel_over_budget and budget and peak > budget and not cancelled:
            call.cancel()
            cancelled = True
        reader.join(0.2)
    return max(peak, ctx.server.status("VmHWM")), cancelled


def pattern_memory(ctx: Context, result: PatternResult, load: contextlib.ExitStack) -> None:
    server = ctx.server
    budget = ctx.limits.memory_budget_bytes
    cases = {MEMORY_CASES[name]: memory_request(name) for name in ctx.profile.memory_cases}
    result.load = "; ".join(cases)
    channel = load.enter_context(grpc.insecure_channel(server.address))
    stub = pb_grpc.StyleTransferStub(channel)
    for index, (label, request) in enumerate(cases.items()):
        # Each case gets its share of what is left, kept for the checks after the pattern.
        share = (ctx.remaining() - 12.0) / (len(cases) - index)
        if share < 3.0:
            result.fail(f"{label}: not run, the time budget is spent")
            continue
        timeout = min(ctx.profile.memory_job_seconds, share)
        server.reset_peak()
        started = time.monotonic()
        call = stub.Stylize(request, metadata=ctx.metadata, timeout=timeout)
        ended: list[tuple[str, str, bool]] = []
        reader = threading.Thread(target=lambda c=call, out=ended: out.append(read_stream(c)), daemon=True)
        reader.start()
        peak, cancelled = _watch_memory(ctx, call, reader, budget)
        code, details, completed = ended[0] if ended else ("?", "the reader did not finish", False)
        elapsed = time.monotonic() - started
        result.peak_seen = max(result.peak_seen, peak)
        refused = code == "RESOURCE_EXHAUSTED" and "memory" in details.lower()
        if completed:
            outcome = "completed"
        elif cancelled:
            outcome = "cancelled by the probe once the peak RSS passed the budget"
        elif code == "DEADLINE_EXCEEDED":
            # Slow is not a memory fault: what counts is whether the budget held while it was watched.
            outcome = "still running at the probe's deadline"
            result.notes.append(f"{label}: cut short after {elapsed:.0f} s")
        else:
            outcome = f"{code} {details[:100]!r}"
        result.figures[label] = f"{outcome} after {elapsed:.1f} s, peak RSS {megabytes(peak)}"
        cut = cancelled or code == "DEADLINE_EXCEEDED"
        brief = "completed" if completed else "cut short" if cut else code
        result.key += ("; " if result.key else "") + f"{label}: {brief}, peak {megabytes(peak)}"
        if cancelled or code == "DEADLINE_EXCEEDED":
            # The job runs on until its next check for cancellation (one network pass, perhaps long):
            # the next case and the checks after the pattern get a server of their own.
            channel.close()
            ctx.restart(f"after {label}, which the probe cut short", result)
            channel = load.enter_context(grpc.insecure_channel(ctx.server.address))
            stub = pb_grpc.StyleTransferStub(channel)
        if not (completed or refused or code == "DEADLINE_EXCEEDED" or cancelled):
            result.fail(f"{label}: {outcome} (want a Result, or RESOURCE_EXHAUSTED naming memory)")
        if budget and peak > budget:
            result.fail(f"{label}: peak RSS {megabytes(peak)} over the budget {megabytes(budget)}")


PATTERN_FUNCTIONS: dict[str, Pattern] = {
    "watch": pattern_watch,
    "unread": pattern_unread,
    "idle": pattern_idle,
    "unknown": pattern_unknown,
    "strings": pattern_strings,
    "memory": pattern_memory,
}


# --- the run ---------------------------------------------------------------------------------------


def server_flags(profile: Profile, tokens_file: Path) -> list[str]:
    queue = profile.queue_size
    return [
        "--concurrency",
        str(profile.concurrency),
        "--queue-size",
        str(queue),
        # Every call here comes from one address and one token: let the queue be what refuses.
        "--max-jobs-per-client",
        str(profile.concurrency + queue),
        "--memory-limit-mb",
        str(MEMORY_LIMIT_MB),
        "--auth-tokens-file",
        str(tokens_file),
        "--grace-seconds",
        "5",
    ]


class Servers:
    """Every server of the run, all of the same flags: the current one, and those stopped before it (each
    stopped again at the end, which is harmless)."""

    def __init__(self, flags: Sequence[str], workdir: Path) -> None:
        self._flags = list(flags)
        self._workdir = workdir
        self.started: list[ServerProcess] = []
        self._startup_log: dict[int, int] = {}  # pid -> log bytes written while starting
        self.current: ServerProcess | None = None

    def fresh(self) -> ServerProcess:
        """Stop the current server and start another. Not bound by the run's deadline: a pattern that
        needs a server gets one (the run is bounded by --seconds plus one start)."""
        if self.current is not None:
            self.current.stop()
        server = ServerProcess(self._flags, self._workdir, f"server-{len(self.started) + 1}")
        self.started.append(server)
        self.current = server
        server.wait_serving(time.monotonic() + START_SECONDS)
        self._startup_log[server.pid] = server.log_size()
        print(f"started stylize-server {server.address} (log {server.log_path.name})", flush=True)
        return server

    def log_growth(self, since: ServerProcess, offset: int) -> int:
        """Log bytes written since offset of server since, and by every server started after it (less
        their start-up lines)."""
        index = self.started.index(since)
        growth = since.log_size() - offset
        for server in self.started[index + 1 :]:
            growth += server.log_size() - self._startup_log.get(server.pid, 0)
        return growth

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
        self.current = None


def run(
    patterns: Sequence[str], profile: Profile, seconds: float, keep_logs: Path | None
) -> list[PatternResult]:
    deadline = time.monotonic() + seconds
    results: list[PatternResult] = []
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="stylize-hostile-") as tmp:
        workdir = Path(tmp)
        tokens_file = workdir / "tokens"
        tokens_file.write_text(token + "\n")
        tokens_file.chmod(0o600)
        servers = Servers(server_flags(profile, tokens_file), workdir)
        try:
            for name in patterns:
                title = TITLES[name]
                if time.monotonic() > deadline - 10.0:
                    skipped = PatternResult(name, title, load="not run")
                    skipped.fail("not run: the time budget (--seconds) was spent")
                    results.append(skipped)
                    continue
                server = servers.current
                info, response = Answer(False, 0.0, "no server"), None
                try:
                    if server is None or not server.alive():
                        server = servers.fresh()
                    info, response = check_info(server.address, (("authorization", f"Bearer {token}"),))
                except RuntimeError as err:
                    info.detail = str(err)
                if response is None:
                    broken = PatternResult(name, title, load="not run")
                    broken.fail(f"not run: no server to probe: {info.detail[-2000:]}")
                    results.append(broken)
                    print_result(broken)
                    continue
                ctx = Context(servers, profile, token, deadline, response.limits)
                print(f"pattern {name}: {title} ...", flush=True)
                result = run_pattern(ctx, name, PATTERN_FUNCTIONS[name])
                results.append(result)
                print_result(result)
                if not result.serves_after_release and servers.current is not None:
                    # A fresh server for the next pattern, so that this one's damage stays here.
                    servers.current.stop()
        finally:
            servers.stop_all()
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("server-*.log"):
                    (keep_logs / log.name).write_bytes(log.read_bytes()[-4 * 2**20 :])
    return results


# --- the report ------------------------------------------------------------------------------------


def print_result(result: PatternResult) -> None:
    print(
        f"  {'held' if result.held else 'NOT HELD'}: {result.title} ({result.load}) in {result.seconds:.1f} s"
    )
    print(f"    health Check under load {result.check}; GetInfo under load {result.info}")
    print(f"    threads {result.threads}; peak RSS {result.peak_rss}; log +{result.log_growth}")
    for key, value in result.figures.items():
        print(f"    {key}: {value}")
    print(f"    after release: {result.after_release}")
    for note in result.notes:
        print(f"    note: {note}")
    for failure in result.failures:
        print(f"    NOT HELD: {failure}")
    sys.stdout.flush()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_table(results: Sequence[PatternResult]) -> str:
    """The results as a markdown table, for the docs."""
    rows = [
        "| Pattern | Result | Load | Figures | Check / GetInfo under load | Threads (before → load → after) "
        "| Peak RSS / budget | Log growth | After release |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "held" if r.held else "**NOT HELD**: " + "; ".join(r.failures)
        cells = (
            r.title,
            verdict,
            r.load,
            r.key or "-",
            f"{r.check} / {r.info}",
            r.threads,
            r.peak_rss,
            r.log_growth,
        )
        rows.append("| " + " | ".join(_cell(c) for c in (*cells, r.after_release)) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short", help="(default: %(default)s)")
    parser.add_argument(
        "--only",
        type=parse_only,
        default=PATTERNS,
        metavar="PATTERN,...",
        help=f"run only these patterns ({', '.join(PATTERNS)})",
    )
    parser.add_argument("--seconds", type=float, help="bound on the whole run (default: the profile's)")
    parser.add_argument(
        "--idle-connections", type=int, help="silent connections per port (default: the profile's)"
    )
    parser.add_argument("--unknown-methods", type=int, help="unknown-method calls (default: the profile's)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--keep-logs", type=Path, help="copy the servers' logs (their last 4 MB) into this folder"
    )
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    overrides = {
        key: value
        for key, value in (
            ("idle_connections", args.idle_connections),
            ("unknown_methods", args.unknown_methods),
        )
        if value is not None
    }
    if any(value < 1 or value > 5000 for value in overrides.values()):
        parser.error("--idle-connections and --unknown-methods must be between 1 and 5000")
    profile = Profile(**{**asdict(profile), **overrides})
    seconds = args.seconds if args.seconds is not None else profile.seconds
    if seconds <= 0:
        parser.error("--seconds must be > 0")

    started = time.monotonic()
    results = run(args.only, profile, seconds, args.keep_logs)
    took = time.monotonic() - started
    held = all(r.held for r in results)
    print()
    print(f"hostile-client probe, profile {args.profile}, {took:.0f} s")
    print()
    print(summary_table(results))
    print()
    print(
        "result: "
        + ("every pattern held" if held else "NOT HELD: " + ", ".join(r.name for r in results if not r.held))
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "profile": args.profile,
            "seconds": took,
            "held": held,
            "patterns": [{**asdict(r), "held": r.held} for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
