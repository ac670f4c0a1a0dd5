"""Running the CLI's jobs over one client: one after another, or up to --parallel at a time (each job's
progress then goes to stderr in whole lines), with Ctrl-C cancelling every running call. Each job's
request is built from its files, its events drive the progress display and the frame outputs, and its
result is written where the job says."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

import grpc

from stylize_service.client.api import Event, StylizeCall, StylizeClient, StylizeError
from stylize_service.client.display import ProgressDisplay
from stylize_service.client.exit_status import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    report_error,
)
from stylize_service.client.job_plan import Job
from stylize_service.client.outputs import JobOutputs
from stylize_service.client.request import build_request
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

FRAMES_PER_JOB = 50  # with --frames-dir or --animation and no --frame-every: about this many frames
# Before a parallel batch, wait up to this long for the channel's connections, so that the first jobs are
# spread over the replicas rather than all sent to the first one to connect.
CONNECT_WAIT_SECONDS = 10.0


def run_jobs(
    client: StylizeClient,
    jobs: list[Job],
    styles: list[tuple[Path, float]],
    options: dict[str, Any],
    *,
    parallel: int,
    quiet: bool,
    frame_duration: int,
) -> int:
    """Run every job (up to `parallel` at a time); the exit status of the first that failed, else EXIT_OK.
    A job that finds the server unreachable, or Ctrl-C, ends the batch."""
    total = options.get("iterations")
    if total is None:  # the server's default sizes the progress bar and the implied --frame-every
        try:
            total = client.info().defaults.iterations  # 0 if the server does not say
        except StylizeError as err:
            return report_error(err, client.address)
    wants_frames = any(job.frames_dir is not None or job.animation is not None for job in jobs)
    if wants_frames and options.get("frame_every") is None:
        if not total:
            print(
                "stylize: error: the server reports no default iterations; give --frame-every",
                file=sys.stderr,
            )
            return EXIT_USAGE
        options = options | {"frame_every": max(1, total // FRAMES_PER_JOB)}
    runner = _JobRunner(client, styles, options, total, quiet=quiet, duration=frame_duration)
    if parallel > 1 and len(jobs) > 1:
        return runner.run_parallel(jobs, parallel)
    worst = EXIT_OK
    for job in jobs:
        code = runner.run(job)
        if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
            return code  # nothing more can succeed
        worst = worst or code
    return worst


class _LineStderr:
    """stderr while jobs run at once: each thread's text goes out in whole lines, and it is no terminal,
    so that every job reports in plain lines (a redrawn bar per job would overwrite the others')."""

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._pending = threading.local()  # this thread's text after its last newline

    def write(self, text: str) -> int:
        lines, newline, rest = (getattr(self._pending, "text", "") + text).rpartition("\n")
        if newline:
            with self._lock:
                self._target.write(lines + newline)
                self._target.flush()
        self._pending.text = rest
        return len(text)

    def flush(self) -> None:
        pass  # a partial line waits for its newline, so that lines never interleave

    def isatty(self) -> bool:
        return False


class _RunningCalls:
    """The calls in flight, so that Ctrl-C can cancel every one of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[StylizeCall] = set()
        self.cancelled = False

    @contextlib.contextmanager
    def track(self, call: StylizeCall) -> Iterator[None]:
        with self._lock:
            self._calls.add(call)
            if self.cancelled:  # started just after Ctrl-C
                call.cancel()
        try:
            yield
        finally:
            with self._lock:
                self._calls.discard(call)

    def cancel_all(self) -> None:
        with self._lock:
            self.cancelled = True
            for call in self._calls:
                call.cancel()


class _JobRunner:
    """Runs jobs over one client, one after another (run) or up to N at a time (run_parallel)."""

    def __init__(
        self,
        client: StylizeClient,
        styles: list[tuple[Path, float]],
        options: dict[str, Any],
        total_iterations: int,
        *,
        quiet: bool,
        duration: int,
    ) -> None:
        self.client = client
        self.styles = styles
        self.options = options
        self.total_iterations = total_iterations
        self.quiet = quiet
        self.duration = duration
        self.running = _RunningCalls()

    def run(self, job: Job) -> int:
        return run_job(
            self.client,
            job,
            self.styles,
            self.options,
            self.total_iterations,
            quiet=self.quiet,
            duration=self.duration,
            running=self.running,
        )

    def run_parallel(self, jobs: list[Job], parallel: int) -> int:
        """Up to `parallel` jobs at a time; the first failure's exit status in job order. A job that
        finds the server unreachable stops the jobs not yet started; Ctrl-C cancels every running one."""
        stop = threading.Event()
        codes: dict[int, int] = {}
        self.client.wait_ready(CONNECT_WAIT_SECONDS)  # unreachable: the jobs report it

        def one(index: int, job: Job) -> None:
            if stop.is_set():
                return
            codes[index] = code = self.run(job)
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                stop.set()

        with (
            contextlib.redirect_stderr(_LineStderr(sys.stderr)),
            ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="stylize-job") as pool,
        ):
            pending: set[Future[None]] = {pool.submit(one, index, job) for index, job in enumerate(jobs)}
            try:
                while pending:  # timed waits, so that Ctrl-C reaches this (the main) thread promptly
                    _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                stop.set()
                self.running.cancel_all()
                print("stylize: interrupted; the running jobs were cancelled", file=sys.stderr)
                return EXIT_INTERRUPTED
        for code in (codes[index] for index in sorted(codes)):
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                return code
        return next((code for _, code in sorted(codes.items()) if code), EXIT_OK)


def run_job(
    client: StylizeClient,
    job: Job,
    styles: list[tuple[Path, float]],
    options: dict[str, Any],
    total_iterations: int,
    *,
    quiet: bool,
    duration: int,
    running: _RunningCalls,
) -> int:
    label = job.content.name
    display = ProgressDisplay(label, total_iterations, enabled=not quiet)
    try:
        request = build_request(job.content, styles, **options)
    except OSError as err:
        print(f"stylize: error: {label}: cannot read an input: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # argparse checks the values already; this is a last guard
        print(f"stylize: error: {label}: invalid option: {err}", file=sys.stderr)
        return EXIT_USAGE
    outputs = JobOutputs(job.frames_dir, job.animation, duration)
    heard_from_server = False  # an event came: a later UNAVAILABLE means the connection was lost

    def on_event(event: Event) -> None:
        nonlocal heard_from_server
        heard_from_server = True
        display.on_event(event)
        if isinstance(event, pb.Frame):
            outputs.on_frame(event)

    def on_retry(error: StylizeError, retry: int, delay: float) -> None:
        if not quiet:
            display.abort()
            print(
                f"stylize: {label}: busy ({error.details}); retry {retry} of {client.retries} in {delay:.1f}s",
                file=sys.stderr,
            )

    call = client.stylize_request(request, on_retry=on_retry)
    try:
        with running.track(call):
            result = call.wait(on_event)
        output = job.output_path(result)
        outputs.write_result(result, output)
    except KeyboardInterrupt:
        call.cancel()
        display.abort()
        print(f"stylize: {label}: interrupted; the job was cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StylizeError as err:
        display.abort()
        if err.code is grpc.StatusCode.CANCELLED and running.cancelled:
            return EXIT_INTERRUPTED  # Ctrl-C during a parallel batch, already reported
        return report_error(err, client.address, label, mid_job=heard_from_server)
    except OSError as err:
        display.abort()
        print(f"stylize: error: {label}: cannot write the output: {err}", file=sys.stderr)
        return EXIT_FAILED
    display.finish(result, str(output))
    return EXIT_OK
