"""A running job's live events, fanned out to its watchers without ever blocking the job.

Each watcher holds a Subscription: a queue that never blocks the producer. Unsent frames are kept up to a
memory budget; past it the oldest unsent ones are dropped (the newest is always kept), so a slow watcher
loses old frames and never stalls the job. Everything else (Queued, Progress, the end) is always kept.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.outcome import Outcome

# Unsent frames (encoded) kept for one watcher that reads slowly, and always the newest one.
PENDING_FRAME_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class JobEnd:
    """The job is over: its outcome (Outcome.ok() for a job that succeeded; its Result was the last
    event before this)."""

    outcome: Outcome


FeedItem = pb.StylizeResponse | JobEnd


class Subscription:
    def __init__(self, max_pending_frame_bytes: int = PENDING_FRAME_BYTES) -> None:
        self._cond = threading.Condition()
        self._items: deque[FeedItem] = deque()
        self._max_frame_bytes = max_pending_frame_bytes
        self._frame_bytes = 0
        self.dropped_frames = 0

    def put(self, item: FeedItem) -> None:
        with self._cond:
            size = _frame_bytes(item)
            if size:
                self._frame_bytes += size
                while self._frame_bytes > self._max_frame_bytes and self._drop_oldest_frame():
                    self.dropped_frames += 1
            self._items.append(item)
            self._cond.notify_all()

    def _drop_oldest_frame(self) -> bool:
        for index, pending in enumerate(self._items):
            size = _frame_bytes(pending)
            if size:
                del self._items[index]
                self._frame_bytes -= size
                return True
        return False

    def get(self, timeout: float) -> FeedItem | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._frame_bytes -= _frame_bytes(item)
            return item

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _frame_bytes(item: FeedItem) -> int:
    if isinstance(item, pb.StylizeResponse) and item.WhichOneof("event") == "frame":
        return len(item.frame.image)
    return 0
