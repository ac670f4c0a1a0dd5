"""A bound on the streams that hold handler threads: Stylize and WatchJob calls.

gRPC's synchronous server gives each streaming call a handler thread for as long as it lasts. Jobs no
longer hold one (they run on threads of the job manager), but their watchers do, so watchers are counted:
at most `total` at once, and at most `per_client` of one client, so that threads stay free for health
checks, GetInfo and the unary job calls (server/app.py sizes the pool to `total` plus a margin).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class StreamLimit(Exception):
    """The client, or the server, has as many open streams as it may."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StreamSlots:
    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._lock = threading.Lock()
        self._open = 0
        self._by_client: Counter[str] = Counter()

    @property
    def open(self) -> int:
        with self._lock:
            return self._open

    @contextmanager
    def held(self, client: str) -> Iterator[None]:
        """One stream of `client` for the duration; raises StreamLimit past either bound."""
        with self._lock:
            if self._by_client[client] >= self.per_client:
                raise StreamLimit(
                    f"this client already has {self.per_client} open Stylize or WatchJob streams, the most "
                    "the server allows one client; close one or retry later"
                )
            if self._open >= self.total:
                raise StreamLimit(
                    f"the server has {self.total} open Stylize or WatchJob streams, the most it serves at "
                    "once; retry later"
                )
            self._open += 1
            self._by_client[client] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self._by_client[client] -= 1
                if not self._by_client[client]:
                    del self._by_client[client]
