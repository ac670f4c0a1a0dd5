"""Following a job's events (rpc WatchJob), across dropped connections and server restarts.

A JobWatch iterates one job's events as JobEvent(sequence, event). Every event the server stores has a
sequence number, strictly increasing and never reused, also across a server restart, and WatchJob
(after_sequence = N) sends those after N. So when a watch breaks, the JobWatch opens a new one after the
last sequence it saw: nothing is lost and nothing is seen twice.

With reconnect_seconds > 0 it does so when a stream fails with UNAVAILABLE (the connection dropped, the
server is stopping or restarting) or ends without the job's Result or final status; each time it waits a
backoff that doubles from `backoff` (jittered, at most MAX_RECONNECT_BACKOFF), then asks GetJob whether the
job is still there and unfinished (a job that ended FAILED or CANCELLED raises its error at once), then
watches again. It gives up, raising the last error, once reconnect_seconds have passed without a new event.
An event whose sequence it has seen already is dropped, so none is yielded twice; it never submits anything.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from stylize_service.client.errors import StylizeError
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

# What a Stylize or WatchJob stream carries: the oneof of StylizeResponse, unwrapped.
Event: TypeAlias = pb.Queued | pb.Progress | pb.Frame | pb.Result

DEFAULT_RECONNECT_SECONDS = 120.0  # the CLI's default: about a server restart with a model to load
RECONNECT_BACKOFF = 0.5  # seconds before the first reconnection; it doubles for each further one ...
MAX_RECONNECT_BACKOFF = 8.0  # ... up to this, so that a server that is back is found within seconds

FINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})

# Opens one WatchJob stream: (after_sequence, seconds left until the deadline or None) -> the grpc call,
# an iterator of StylizeResponse with cancel().
OpenWatch = Callable[[int, float | None], Any]
# The job as GetJob returns it (without the result's image); raises StylizeError.
GetJob = Callable[[], pb.Job]
# on_reconnect(error, reconnect, delay): the watch broke with `error`; reconnection number `reconnect`
# (1 for the first since the last new event) follows in `delay` seconds.
ReconnectHook = Callable[[StylizeError, int, float], None]


@dataclass(frozen=True)
class JobEvent:
    """One event of a job: its sequence number (0 for a Queued event, which the server does not store)
    and the event, a pb.Queued, pb.Progress, pb.Frame or pb.Result."""

    sequence: int
    event: Event


def job_error(job: pb.Job) -> StylizeError:
    """The error a FAILED or CANCELLED job ended with, as the StylizeError its watch would raise."""
    if job.HasField("error"):
        return StylizeError.from_number(job.error.code, job.error.message)
    code = grpc.StatusCode.CANCELLED if job.state == pb.CANCELLED else grpc.StatusCode.UNKNOWN
    return StylizeError(code, f"the job ended {pb.JobState.Name(job.state)}")


class JobWatch:
    """Iterate it (once) for a job's events after `after`; the last is the Result, also kept in `result`.
    last_sequence is the newest sequence seen (pass it as `after` to pick up later); reconnects counts the
    watches opened again. cancel() may be called from any thread: the iteration then raises
    StylizeError(CANCELLED). Cancelling a watch cancels nothing on the server (CancelJob does).

    reconnect_seconds = 0: one stream, whose errors are raised as they are. not_found_reconnects: also
    take NOT_FOUND as a broken watch, for a job known to exist: behind a balancer over replicas with stores
    of their own, a call may reach a replica that does not hold the job."""

    def __init__(
        self,
        job_id: str,
        open_watch: OpenWatch,
        get_job: GetJob,
        *,
        after: int = 0,
        reconnect_seconds: float = 0.0,
        timeout: float | None = None,
        backoff: float = RECONNECT_BACKOFF,
        on_reconnect: ReconnectHook | None = None,
        not_found_reconnects: bool = False,
    ) -> None:
        if reconnect_seconds < 0 or backoff < 0:
            raise ValueError(
                f"reconnect_seconds and backoff must be >= 0, got {reconnect_seconds}, {backoff}"
            )
        self.job_id = job_id
        self._open_watch = open_watch
        self._get_job = get_job
        self._reconnect_seconds = reconnect_seconds
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._backoff = backoff
        self._on_reconnect = on_reconnect
        self._not_found_reconnects = not_found_reconnects
        self._lock = threading.Lock()  # orders cancel() against opening a stream
        self._cancelled = threading.Event()
        self._stream: Any = None
        self._failing_since: float | None = None  # the first failure since the last new event
        self._failures = 0  # ... and how many since
        self.last_sequence = after
        self.reconnects = 0
        self.result: pb.Result | None = None
        self._iterator = self._events()

    def __iter__(self) -> Iterator[JobEvent]:
        return self._iterator

    def __next__(self) -> JobEvent:
        return next(self._iterator)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            if self._stream is not None:
                self._stream.cancel()

    def wait(self, on_event: Callable[[JobEvent], None] | None = None) -> pb.Result:
        """Consume the remaining events (passing each to on_event) and return the Result."""
        for event in self:
            if on_event is not None:
                on_event(event)
        assert self.result is not None  # _events raises otherwise
        return self.result

    def _events(self) -> Iterator[JobEvent]:
        while True:
            error = yield from self._one_stream()
            if error is None:
                return  # the Result came
            self._reconnect_after(error)
            self.reconnects += 1

    def _one_stream(self) -> Generator[JobEvent, None, StylizeError | None]:
        """One WatchJob stream's new events; None once the Result came, else why the stream ended."""
        with self._lock:
            if self._cancelled.is_set():
                raise StylizeError(grpc.StatusCode.CANCELLED, "the watch was cancelled")
            self._stream = stream = self._open_watch(self.last_sequence, self._remaining())
        try:
            for response in stream:
                kind = response.WhichOneof("event")
                sequence = response.sequence
                if kind != "queued" and sequence and sequence <= self.last_sequence:
                    continue  # seen before this stream: a server that replays more than it was asked
                self.last_sequence = max(self.last_sequence, sequence)
                if kind is None:
                    continue  # an event type newer than this client
                self._failing_since, self._failures = None, 0  # progress: a fresh reconnection budget
                event = getattr(response, kind)
                if kind == "result":
                    self.result = event
                yield JobEvent(sequence, event)
                if kind == "result":
                    stream.cancel()  # nothing follows the Result; free the call now
                    return None
        except grpc.RpcError as err:
            if self._cancelled.is_set():
                raise StylizeError(grpc.StatusCode.CANCELLED, "the watch was cancelled") from None
            error = StylizeError.from_rpc(err)
            if not self._reconnects_on(error):
                raise error from None
            return error
        if self._reconnect_seconds <= 0:
            raise StylizeError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        # A clean end without the Result: a server going away gracefully, say. The job's own end would
        # have come as its Result or its error status, so watch again.
        return StylizeError(grpc.StatusCode.UNAVAILABLE, "the watch ended before the job did")

    def _reconnects_on(self, error: StylizeError) -> bool:
        if self._reconnect_seconds <= 0:
            return False
        if error.code is grpc.StatusCode.NOT_FOUND:
            return self._not_found_reconnects
        # CANCELLED that this watch did not ask for: the server cancelling its calls as it stops, or the
        # job's own end (cancelled); GetJob tells them apart before the next watch.
        return error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

    def _reconnect_after(self, error: StylizeError) -> None:
        """Wait out backoffs until GetJob finds the job there and unfinished (or succeeded: its Result is
        kept for the next watch); raise when the job ended in error, the budget or the deadline is spent,
        the watch is cancelled, or GetJob fails for a reason other than the watch's."""
        if error.code is grpc.StatusCode.CANCELLED:
            # Most likely the job's own end: ask at once, so that it is not reported as a lost connection.
            with contextlib.suppress(StylizeError):  # no answer: the backoffs below ask again
                job = self._get_job()
                if job.state in FINAL_STATES and job.state != pb.SUCCEEDED:
                    raise job_error(job)
        while True:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            self._failures += 1
            delay = min(MAX_RECONNECT_BACKOFF, self._backoff * 2 ** (self._failures - 1))
            delay *= random.uniform(0.5, 1.0)  # jittered, so that many clients do not return at once
            if now - self._failing_since + delay > self._reconnect_seconds:
                raise error
            if self._deadline is not None and now + delay >= self._deadline:
                raise error
            if self._on_reconnect is not None:
                self._on_reconnect(error, self._failures, delay)
            if self._cancelled.wait(delay):
                raise StylizeError(grpc.StatusCode.CANCELLED, "the watch was cancelled")
            if error.code is grpc.StatusCode.NOT_FOUND:
                # Most likely a replica without the job (round robin over stores of their own): watch
                # again at once. A GetJob first would take the next pick and, with two replicas, send
                # every watch back to the same wrong one.
                return
            try:
                job = self._get_job()
            except StylizeError as probe_error:
                if not self._reconnects_on(probe_error) or probe_error.code is grpc.StatusCode.CANCELLED:
                    raise
                error = probe_error  # still unreachable: back off further
                continue
            if job.state in FINAL_STATES and job.state != pb.SUCCEEDED:
                raise job_error(job)
            return

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
