"""Admission of jobs: at most `concurrency` run at once, their predicted memory fits the budget's
`memory_capacity` together, and at most `queue_size` wait in FIFO order.

The scheduler only counts slots; it runs nothing. A caller enqueues a Ticket, waits on it (learning its
position as the queue moves) until it is admitted, runs its job, and releases it. A ticket that is
cancelled while it waits leaves the queue at once, so the jobs behind it move up.
"""

from __future__ import annotations

import threading
from collections import deque


class QueueFull(Exception):
    """Every worker is busy and the queue is at its bound."""


class SchedulerClosed(Exception):
    """The server is shutting down and admits no more jobs."""


class Ticket:
    """One job's place in the scheduler. position: 0 = admitted (running), n >= 1 = n-th in the queue."""

    def __init__(self, scheduler: Scheduler, memory: int = 0) -> None:
        self._scheduler = scheduler
        self.memory = memory  # bytes reserved while it runs
        self.position = 0
        self.cancelled = threading.Event()
        self.released = False

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

    def release(self) -> None:
        """Leave the queue or free the worker slot; idempotent."""
        self._scheduler._release(self)


class Scheduler:
    def __init__(self, concurrency: int, queue_size: int, memory_capacity: int | None = None) -> None:
        """memory_capacity: bytes the running jobs' reservations may add up to (None = not counted)."""
        if concurrency < 1 or queue_size < 0:
            raise ValueError(f"need concurrency >= 1 and queue_size >= 0, got {concurrency}, {queue_size}")
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.memory_capacity = memory_capacity
        self._cond = threading.Condition()
        self._running = 0
        self._reserved = 0
        self._waiting: deque[Ticket] = deque()
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

    def enqueue(self, memory: int = 0) -> Ticket:
        """A ticket that is admitted at once if a slot and its memory are free, else queued; raises
        QueueFull or SchedulerClosed. A job reserving more than memory_capacity must be refused by the
        caller beforehand (it could never start); it is admitted alone rather than left waiting."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed()
            ticket = Ticket(self, memory)
            if not self._waiting and self._fits(ticket):
                self._admit(ticket)
                return ticket
            if len(self._waiting) >= self.queue_size:
                raise QueueFull()
            self._waiting.append(ticket)
            ticket.position = len(self._waiting)
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

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            if ticket.position > 0:
                self._remove(ticket)
            else:
                ticket.released = True
                self._running -= 1
                self._reserved -= ticket.memory
                self._promote()

    def _remove(self, ticket: Ticket) -> None:
        """Take a queued ticket out of the queue (it never ran); the caller holds the lock."""
        if ticket in self._waiting:
            self._waiting.remove(ticket)
        ticket.released = True
        self._promote()

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
