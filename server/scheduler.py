"""Admission of jobs: at most `concurrency` run at once and their predicted memory fits `memory_capacity`
together, at most `queue_size` wait in FIFO order, and at most `max_per_client` of one client's calls are
running, waiting or still sending their last messages at any time.

The scheduler only counts slots; it runs nothing. A caller enqueues a Ticket, waits on it (learning its
position as the queue moves) until it is admitted, runs its job and releases it. A streaming call splits
the release in two: finish() when its job ends (the worker slot and memory are free for the next job),
end_call() when the call ends (the place, once the job is finished too). A ticket that is cancelled while it
waits leaves the queue at once, so the jobs behind it move up. Between finish() and end_call() a ticket
still counts against its client and against concurrency + queue_size calls in all, because its call still
holds a handler thread (a client that stops reading holds it until the stall bound cancels the call).

Seams: `enqueue` decides whether a job may wait at all (closed, per-client bound, queue bound) and
`_fits` decides when a job may start (a free slot, and its memory beside the running jobs'). Every ticket
leaves through `_finish`, which gives back whatever the ticket held (its client's count, its memory).
"""

from __future__ import annotations

import threading
from collections import Counter, deque


class QueueFull(Exception):
    """Every worker is busy and the queue is at its bound."""


class SchedulerClosed(Exception):
    """The server is shutting down and admits no more jobs."""


class ClientLimit(Exception):
    """The client already has `limit` jobs running or waiting, the most one client may have."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} job(s) per client may be running or queued")
        self.limit = limit


class Ticket:
    """One job's place in the scheduler. position: 0 = admitted (running), n >= 1 = n-th in the queue."""

    def __init__(self, scheduler: Scheduler, client: str, memory: int = 0) -> None:
        self._scheduler = scheduler
        self.client = client
        self.memory = memory  # bytes reserved while it runs
        self.position = 0
        self.cancelled = threading.Event()
        self.finished = False  # the job ran and ended (its slot is free)
        self.call_ended = False  # the call is over (its place is free once the job is finished too)
        self.released = False  # both: the ticket has left the scheduler

    @property
    def admitted(self) -> bool:
        return self.position == 0 and not self.released

    def wait(self, seen_position: int, timeout: float | None = None) -> int:
        """Block until the position differs from seen_position, the ticket is cancelled or the scheduler
        closes (or the timeout passes); returns the current position. Raises SchedulerClosed."""
        return self._scheduler._wait(self, seen_position, timeout)

    def cancel(self) -> None:
        """Safe from any thread (e.g. a gRPC termination callback): wakes up wait() and frees the place."""
        self.cancelled.set()
        self._scheduler._wake()

    def finish(self) -> None:
        """The admitted job is over (or will never run): free the worker slot and the memory. Its call
        may still be sending its last messages, so the place that the client's bound and the stream
        bound count stays until release(); idempotent."""
        self._scheduler._finish_running(self)

    def end_call(self) -> None:
        """The call is over: leave the queue if still waiting; else free the place once the job is
        finished too (at once if it is); idempotent."""
        self._scheduler._end_call(self)

    def release(self) -> None:
        """Leave the scheduler now: the queue, or the worker slot and the place; idempotent."""
        self._scheduler._release(self)


class Scheduler:
    def __init__(
        self,
        concurrency: int,
        queue_size: int,
        max_per_client: int | None = None,
        memory_capacity: int | None = None,
    ) -> None:
        """max_per_client: jobs one client may have running or waiting; None = no bound of its own.
        memory_capacity: bytes the running jobs' reservations may add up to; None = not counted."""
        if concurrency < 1 or queue_size < 0 or (max_per_client is not None and max_per_client < 1):
            raise ValueError(
                "need concurrency >= 1, queue_size >= 0 and max_per_client >= 1, "
                f"got {concurrency}, {queue_size}, {max_per_client}"
            )
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.max_per_client = max_per_client
        self.memory_capacity = memory_capacity
        self._cond = threading.Condition()
        self._running = 0
        self._delivering = 0  # finished jobs whose calls are still sending (a slow or stopped reader)
        self._reserved = 0
        self._waiting: deque[Ticket] = deque()
        self._per_client: Counter[str] = Counter()  # running + waiting tickets by client
        self._closed = False

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    @property
    def reserved_memory(self) -> int:
        """Bytes reserved by the running jobs."""
        with self._cond:
            return self._reserved

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def jobs_of(self, client: str) -> int:
        """The client's jobs that are running or waiting."""
        with self._cond:
            return self._per_client[client]

    def enqueue(self, client: str = "", memory: int = 0, *, admitted_before: bool = False) -> Ticket:
        """A ticket that is admitted at once if a slot and its memory are free, else queued; raises
        SchedulerClosed, ClientLimit (the client has max_per_client jobs already) or QueueFull, checked in
        that order.

        client: who asks (any string; one bound is kept per distinct value). memory: bytes the job
        reserves while it runs; one larger than memory_capacity must be refused by the caller
        beforehand (it could never start beside another), and is admitted alone.

        admitted_before: a job that a server accepted before it stopped, queued again at the start:
        neither the client's bound nor the queue's may refuse it now (it waits like any other)."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed()
            ticket = Ticket(self, client, memory)
            if admitted_before:
                if not self._waiting and self._fits(ticket):
                    self._admit(ticket)
                else:
                    self._waiting.append(ticket)
                    ticket.position = len(self._waiting)
                self._per_client[client] += 1
                return ticket
            if self.max_per_client is not None and self._per_client[client] >= self.max_per_client:
                raise ClientLimit(self.max_per_client)
            if self._running + len(self._waiting) + self._delivering >= self.concurrency + self.queue_size:
                # Every call holds a handler thread until its stream ends, its job's or not: past this
                # bound the threads kept for health checks and GetInfo would be taken too.
                raise QueueFull()
            if not self._waiting and self._fits(ticket):
                self._admit(ticket)
            elif len(self._waiting) >= self.queue_size:
                raise QueueFull()
            else:
                self._waiting.append(ticket)
                ticket.position = len(self._waiting)
            self._per_client[client] += 1
            return ticket

    def close(self) -> None:
        """Admit nothing more: enqueue raises SchedulerClosed and so does wait() of queued tickets."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs or waits; False if the timeout passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0 and not self._waiting, timeout)

    def _wait(self, ticket: Ticket, seen_position: int, timeout: float | None) -> int:
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    ticket.position != seen_position
                    or ticket.cancelled.is_set()
                    or (self._closed and ticket.position > 0)
                ),
                timeout,
            )
            if self._closed and ticket.position > 0:
                self._remove(ticket)
                raise SchedulerClosed()
            return ticket.position

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _finish_running(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released or ticket.finished or ticket.position > 0:
                return
            ticket.finished = True
            self._running -= 1
            self._reserved -= ticket.memory
            if ticket.call_ended:
                self._finish(ticket)
            else:
                self._delivering += 1
            self._promote()

    def _end_call(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released or ticket.call_ended:
                return
            ticket.call_ended = True
            if ticket.position > 0:
                self._remove(ticket)
            elif ticket.finished:
                self._delivering -= 1
                self._finish(ticket)
            # else its job still runs (a cancelled call's worker stops within one evaluation): its slot
            # and place stay taken until the worker finishes it.
            self._cond.notify_all()

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            if ticket.position > 0:
                self._remove(ticket)
                return
            if ticket.finished:
                self._delivering -= 1
            else:
                self._running -= 1
                self._reserved -= ticket.memory
            self._finish(ticket)
            self._promote()

    def _remove(self, ticket: Ticket) -> None:
        """Take a queued ticket out of the queue (it never ran); the caller holds the lock."""
        if ticket.released:
            return
        if ticket in self._waiting:
            self._waiting.remove(ticket)
        self._finish(ticket)
        self._promote()

    def _finish(self, ticket: Ticket) -> None:
        """The ticket leaves the scheduler for good; lock held, called once per ticket."""
        ticket.released = True
        self._per_client[ticket.client] -= 1
        if not self._per_client[ticket.client]:
            del self._per_client[ticket.client]

    def _fits(self, ticket: Ticket) -> bool:
        """A free slot, and the memory beside the running jobs' (or an idle server); lock held."""
        if self._running >= self.concurrency:
            return False
        capacity = self.memory_capacity
        return capacity is None or self._running == 0 or self._reserved + ticket.memory <= capacity

    def _admit(self, ticket: Ticket) -> None:
        ticket.position = 0
        self._running += 1
        self._reserved += ticket.memory

    def _promote(self) -> None:
        """Admit the head of the queue (FIFO: a large job is not overtaken) while it fits, and renumber
        the rest; lock held."""
        while self._waiting and not self._closed and self._fits(self._waiting[0]):
            self._admit(self._waiting.popleft())
        for index, waiting in enumerate(self._waiting, start=1):
            waiting.position = index
        self._cond.notify_all()
