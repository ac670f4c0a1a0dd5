"""Running the CLI's jobs over one client: one after another, or up to --parallel at a time (each job's
progress then goes to stderr in whole lines). Each job's request is built from its files and submitted
(SubmitJob), then followed (WatchJob) to its end, reattaching across dropped connections and server
restarts (client/reattach.py); its events drive the progress display and the frame outputs, and its result
is written where the job says. A server without jobs (UNIMPLEMENTED) gets the Stylize call instead, as
before jobs existed. Ctrl-C (or SIGTERM, which the CLI turns into one) cancels this run's unfinished jobs
on the server. `stylize watch` follows existing jobs the same way, and `--detach` only submits.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, TextIO

import grpc

from stylize_service.client.api import Event, RetryHook, StylizeClient, StylizeError
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
from stylize_service.client.reattach import DEFAULT_RECONNECT_SECONDS, JobEvent, JobWatch
from stylize_service.client.request import Style, build_request
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

FRAMES_PER_JOB = 50  # with --frames-dir or --animation and no --frame-every: about this many frames
# Before a parallel batch, wait up to this long for the channel's connections, so that the first jobs are
# spread over the replicas rather than all sent to the first one to connect.
CONNECT_WAIT_SECONDS = 10.0
CANCEL_SECONDS = 5.0  # the deadline of each CancelJob on the way out: an exit must not hang on it
# CancelJob tries for a job this run submitted: behind a balancer over replicas with job stores of their
# own, a NOT_FOUND may come from a replica that does not hold the job; the next try goes to the next one.
CANCEL_TRIES = 4


def run_jobs(
    client: StylizeClient,
    jobs: list[Job],
    styles: list[Style],
    options: dict[str, Any],
    *,
    parallel: int,
    quiet: bool,
    frame_duration: int,
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
) -> int:
    """Run every job (up to `parallel` at a time); the exit status of the first that failed, else EXIT_OK.
    A job that finds the server unreachable, or Ctrl-C, ends the batch."""
    options, total, code = _with_implied_frames(client, jobs, options)
    if code != EXIT_OK:
        return code
    runner = _JobRunner(
        client,
        styles,
        options,
        total,
        quiet=quiet,
        duration=frame_duration,
        reconnect_seconds=reconnect_seconds,
    )
    return runner.run_all(jobs, parallel)


def watch_jobs(
    client: StylizeClient,
    jobs: list[Job],
    *,
    parallel: int,
    quiet: bool,
    frame_duration: int,
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
) -> int:
    """`stylize watch`: follow existing jobs (Job.job_id) and save their outputs as run_jobs does. Ctrl-C
    stops following; the jobs go on."""
    runner = _JobRunner(
        client, [], {}, 0, quiet=quiet, duration=frame_duration, reconnect_seconds=reconnect_seconds
    )
    return runner.run_all(jobs, parallel)


def submit_jobs(
    client: StylizeClient,
    jobs: list[Job],
    styles: list[Style],
    options: dict[str, Any],
    *,
    quiet: bool,
) -> int:
    """`stylize --detach`: submit every job and print its id on stdout, one a line, as soon as it has one
    (so that an error half way leaves the ids of the jobs already submitted); the first error ends it."""
    for job in jobs:
        label = job.label
        display = ProgressDisplay(label, 0, enabled=not quiet)
        assert job.content is not None  # plan_jobs' jobs have their content
        try:
            request = build_request(job.content, styles, **options)
            submitted = client.submit_request(request, on_retry=_busy_reporter(client, display, quiet))
        except OSError as err:
            print(f"stylize: error: {label}: cannot read an input: {err}", file=sys.stderr)
            return EXIT_USAGE
        except ValueError as err:
            print(f"stylize: error: {label}: invalid option: {err}", file=sys.stderr)
            return EXIT_USAGE
        except StylizeError as err:
            return report_error(err, client.address, label)
        print(submitted.id, flush=True)
    return EXIT_OK


def _with_implied_frames(
    client: StylizeClient, jobs: list[Job], options: dict[str, Any]
) -> tuple[dict[str, Any], int, int]:
    """(options with --frame-every implied where frames are wanted, the iterations that size the progress
    bar, EXIT_OK or the status of the failure to find them)."""
    total = options.get("iterations")
    if total is None:  # the server's default sizes the progress bar and the implied --frame-every
        try:
            total = client.info().defaults.iterations  # 0 if the server does not say
        except StylizeError as err:
            return options, 0, report_error(err, client.address)
    wants_frames = any(job.frames_dir is not None or job.animation is not None for job in jobs)
    if wants_frames and options.get("frame_every") is None:
        if not total:
            print(
                "stylize: error: the server reports no default iterations; give --frame-every",
                file=sys.stderr,
            )
            return options, 0, EXIT_USAGE
        options = options | {"frame_every": max(1, total // FRAMES_PER_JOB)}
    return options, total, EXIT_OK


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


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class _Running:
    """What is in flight (Stylize calls, jobs), so that Ctrl-C can cancel every one of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: set[_Cancellable] = set()
        self.cancelled = False

    @contextlib.contextmanager
    def track(self, item: _Cancellable) -> Iterator[None]:
        with self._lock:
            self._items.add(item)
            cancel_now = self.cancelled  # started just after Ctrl-C
        if cancel_now:
            item.cancel()
        try:
            yield
        finally:
            with self._lock:
                self._items.discard(item)

    def cancel_all(self) -> None:
        with self._lock:
            self.cancelled = True
            items = list(self._items)
        for item in items:  # outside the lock: cancelling a job is a call to the server
            item.cancel()


class _JobHandle:
    """One job on the server as this run knows it, for Ctrl-C: cancel() stops following it and, when this
    run submitted it (own), cancels it on the server, once. The id and the watch come as they exist."""

    def __init__(self, client: StylizeClient, display: ProgressDisplay, *, own: bool) -> None:
        self._client = client
        self._display = display
        self.own = own
        self._lock = threading.Lock()
        self._cancelled = False
        self._job_cancelled = False
        self.job_id: str | None = None
        self.watch: JobWatch | None = None

    def attach(self, job_id: str, watch: JobWatch) -> bool:
        """Record the job and its watch; False when cancel() came first (the caller cancels then)."""
        with self._lock:
            self.job_id, self.watch = job_id, watch
            return not self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            watch, job_id = self.watch, self.job_id
            cancel_job = self.own and job_id is not None and not self._job_cancelled
            self._job_cancelled = self._job_cancelled or cancel_job
        if watch is not None:
            watch.cancel()
        if cancel_job:
            assert job_id is not None
            self._cancel_job(job_id)

    def _cancel_job(self, job_id: str) -> None:
        error: StylizeError | None = None
        for _ in range(CANCEL_TRIES):
            try:
                self._client.cancel(job_id, timeout=CANCEL_SECONDS)
                return
            except StylizeError as err:
                error = err
                if err.code is not grpc.StatusCode.NOT_FOUND:
                    break
        assert error is not None
        self._display.abort()
        print(
            f"stylize: {self._display.label}: could not cancel job {job_id} ({error.code.name}: "
            f"{error.details}); `stylize cancel {job_id}` stops it",
            file=sys.stderr,
        )


class _JobRunner:
    """Runs jobs over one client, one after another or up to N at a time (run_all)."""

    def __init__(
        self,
        client: StylizeClient,
        styles: list[Style],
        options: dict[str, Any],
        total_iterations: int,
        *,
        quiet: bool,
        duration: int,
        reconnect_seconds: float,
    ) -> None:
        self.client = client
        self.styles = styles
        self.options = options
        self.total_iterations = total_iterations
        self.quiet = quiet
        self.duration = duration
        self.reconnect_seconds = reconnect_seconds
        self.running = _Running()
        # Whether the server has the job RPCs: None until a SubmitJob says; False after UNIMPLEMENTED,
        # so that the other jobs go straight to the Stylize call.
        self.has_jobs: bool | None = None

    def run_all(self, jobs: list[Job], parallel: int) -> int:
        if parallel > 1 and len(jobs) > 1:
            return self.run_parallel(jobs, parallel)
        worst = EXIT_OK
        for job in jobs:
            code = self.run(job)
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                return code  # nothing more can succeed
            worst = worst or code
        return worst

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
                if all(job.job_id is not None for job in jobs):
                    print("stylize: interrupted; the jobs go on on the server", file=sys.stderr)
                else:
                    print("stylize: interrupted; the running jobs were cancelled", file=sys.stderr)
                return EXIT_INTERRUPTED
        for code in (codes[index] for index in sorted(codes)):
            if code in (EXIT_INTERRUPTED, EXIT_UNAVAILABLE):
                return code
        return next((code for _, code in sorted(codes.items()) if code), EXIT_OK)

    def run(self, job: Job) -> int:
        """One job: follow it (stylize watch), or submit and follow it, or, on a server without jobs, run
        it as one Stylize call."""
        display = ProgressDisplay(job.label, self.total_iterations, enabled=not self.quiet)
        if job.job_id is not None:
            return self._follow(job, job.job_id, display, _JobHandle(self.client, display, own=False))
        assert job.content is not None
        try:
            request = build_request(job.content, self.styles, **self.options)
        except OSError as err:
            print(f"stylize: error: {job.label}: cannot read an input: {err}", file=sys.stderr)
            return EXIT_USAGE
        except ValueError as err:  # argparse checks the values already; this is a last guard
            print(f"stylize: error: {job.label}: invalid option: {err}", file=sys.stderr)
            return EXIT_USAGE
        if self.has_jobs is False:
            return self._stylize_call(job, request, display)
        try:
            submitted = self.client.submit_request(
                request, on_retry=_busy_reporter(self.client, display, self.quiet)
            )
        except KeyboardInterrupt:  # the job was refused, or never reached the server
            display.abort()
            print(f"stylize: {job.label}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except StylizeError as err:
            if err.code is not grpc.StatusCode.UNIMPLEMENTED:
                display.abort()
                return report_error(err, self.client.address, job.label)
            self.has_jobs = False  # an older server: the Stylize call, as before jobs
            return self._stylize_call(job, request, display)
        self.has_jobs = True
        display.note(f"job {submitted.id}")  # for `stylize watch` or `stylize cancel`
        # A Ctrl-C of a parallel batch from here on finds the job: _follow tracks it at once, and one
        # that came before cancels it there (running.cancelled).
        return self._follow(job, submitted.id, display, _JobHandle(self.client, display, own=True))

    def _follow(self, job: Job, job_id: str, display: ProgressDisplay, handle: _JobHandle) -> int:
        """Follow a job to its end and save its outputs; reattaches for up to --reconnect-seconds."""
        label = job.label
        outputs = JobOutputs(job.frames_dir, job.animation, self.duration)
        heard_from_server = False  # an event came: a later UNAVAILABLE means the connection was lost

        def on_event(item: JobEvent) -> None:
            nonlocal heard_from_server
            heard_from_server = True
            display.on_event(item.event)
            if isinstance(item.event, pb.Frame):
                outputs.on_frame(item.event)

        def on_reconnect(error: StylizeError, reconnect: int, delay: float) -> None:
            display.abort()
            display.note(
                f"lost the job's stream ({error.code.name}: {error.details}); reattaching in {delay:.1f}s "
                f"after event {watch.last_sequence} (try {reconnect})"
            )

        watch = self.client.follow(
            job_id,
            reconnect_seconds=self.reconnect_seconds,
            on_reconnect=on_reconnect,
            not_found_reconnects=handle.own,  # it exists: a NOT_FOUND is another replica's
        )
        with self.running.track(handle):
            if not handle.attach(job_id, watch):  # Ctrl-C came during the submission
                handle.cancel()
                return EXIT_INTERRUPTED
            try:
                result = watch.wait(on_event)
                output = job.output_path(result)
                outputs.write_result(result, output)
            except KeyboardInterrupt:
                handle.cancel()
                display.abort()
                if handle.own:
                    print(f"stylize: {label}: interrupted; the job was cancelled", file=sys.stderr)
                else:
                    print(f"stylize: {label}: interrupted; the job goes on on the server", file=sys.stderr)
                return EXIT_INTERRUPTED
            except StylizeError as err:
                display.abort()
                return self._job_failed(err, job_id, label, handle, mid_job=heard_from_server)
            except OSError as err:
                display.abort()
                print(f"stylize: error: {label}: cannot write the output: {err}", file=sys.stderr)
                return EXIT_FAILED
        display.finish(result, str(output))
        return EXIT_OK

    def _job_failed(
        self, err: StylizeError, job_id: str, label: str, handle: _JobHandle, *, mid_job: bool
    ) -> int:
        if err.code is grpc.StatusCode.CANCELLED and self.running.cancelled:
            return EXIT_INTERRUPTED  # Ctrl-C during a parallel batch, already reported
        if err.code is grpc.StatusCode.CANCELLED:  # by `stylize cancel`, or by the server
            print(f"stylize: error: {label}: the job was cancelled: {err.details}", file=sys.stderr)
            return EXIT_FAILED
        if err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
            handle.cancel()  # --timeout ends the job, as it ended a Stylize call
        code = report_error(err, self.client.address, label, mid_job=mid_job)
        if err.code is grpc.StatusCode.UNAVAILABLE:
            print(
                f"stylize: {label}: job {job_id} may go on on the server; `stylize watch {job_id}` "
                "picks it up (--reconnect-seconds sets how long to keep trying)",
                file=sys.stderr,
            )
        return code

    def _stylize_call(self, job: Job, request: pb.StylizeRequest, display: ProgressDisplay) -> int:
        """The job as one Stylize call: for a server without the job RPCs. Its end ends the job, so a
        broken connection cannot be reattached."""
        label = job.label
        outputs = JobOutputs(job.frames_dir, job.animation, self.duration)
        heard_from_server = False

        def on_event(event: Event) -> None:
            nonlocal heard_from_server
            heard_from_server = True
            display.on_event(event)
            if isinstance(event, pb.Frame):
                outputs.on_frame(event)

        call = self.client.stylize_request(request, on_retry=_busy_reporter(self.client, display, self.quiet))
        try:
            with self.running.track(call):
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
            if err.code is grpc.StatusCode.CANCELLED and self.running.cancelled:
                return EXIT_INTERRUPTED  # Ctrl-C during a parallel batch, already reported
            return report_error(err, self.client.address, label, mid_job=heard_from_server)
        except OSError as err:
            display.abort()
            print(f"stylize: error: {label}: cannot write the output: {err}", file=sys.stderr)
            return EXIT_FAILED
        display.finish(result, str(output))
        return EXIT_OK


def _busy_reporter(client: StylizeClient, display: ProgressDisplay, quiet: bool) -> RetryHook:
    """on_retry for a call refused as busy: say so, and when the next try comes."""

    def on_retry(error: StylizeError, retry: int, delay: float) -> None:
        if not quiet:
            display.abort()
            print(
                f"stylize: {display.label}: busy ({error.details}); retry {retry} of {client.retries} "
                f"in {delay:.1f}s",
                file=sys.stderr,
            )

    return on_retry
