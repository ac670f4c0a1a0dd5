"""Streams whose client stopped reading: found and cancelled, so that they give back their thread.

gRPC's synchronous server sends a streamed message from the call's handler thread and blocks that thread
until the client's HTTP/2 window takes it. A client that never reads therefore holds a handler thread for
as long as its connection lives; enough of them and no thread is left for health checks or GetInfo.
StallWatch cancels a call (the client sees CANCELLED) once one message has waited `seconds` to be taken.
The handler marks each message with `sending()` before it yields it; one daemon thread checks the marks.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

logger = logging.getLogger("stylize.server")


class Cancellable(Protocol):
    """What StallWatch needs of a call: grpc.ServicerContext has both (its cancel() returns a bool, unused)."""

    def cancel(self) -> object: ...

    def peer(self) -> str: ...


class StallWatch:
    def __init__(self, seconds: float, *, check_every: float | None = None) -> None:
        self.seconds = seconds
        self._check_every = check_every if check_every is not None else min(1.0, seconds / 4)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[float, Cancellable, str]] = {}  # mark -> (since, call, what)
        self._marks = itertools.count()
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # calls cancelled so far (for tests and the log)

    @contextmanager
    def sending(self, call: Cancellable, what: str) -> Iterator[None]:
        """Around the yield of one message: the call is cancelled if the yield has not returned within
        `seconds` (gRPC resumes the generator once the message has been taken)."""
        mark = next(self._marks)
        with self._lock:
            self._pending[mark] = (time.monotonic(), call, what)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._pending.pop(mark, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self._check_every)
            now = time.monotonic()
            with self._lock:
                stalled = [
                    (mark, call, what)
                    for mark, (since, call, what) in self._pending.items()
                    if now - since >= self.seconds
                ]
                for mark, _, _ in stalled:
                    del self._pending[mark]
                self.cancelled += len(stalled)
            for _, call, what in stalled:
                logger.warning(
                    "%s: cancelled the stream to %s: it took no message for %gs (--stall-seconds)",
                    what,
                    call.peer(),
                    self.seconds,
                )
                call.cancel()
