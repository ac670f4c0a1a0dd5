"""The lease a replica holds on each job it runs, in the Redis of the job store.

    stylize:lease:ID   string "REPLICA:GENERATION" with a TTL of the lease (--lease-seconds)

The fleet queue sets it when a replica claims the job (fleet_queue.py), one generation higher than the
job's last; the replica renews it (a Lua check-and-extend on its own token) every third of the lease. A
replica that cannot renew it, or that finds another's token there, has lost the job: it stops it at once
and writes nothing more of it (every write of a fenced job checks the token in Redis: redis_store.py).

The replica also keeps, by its own monotonic clock, the time until which its lease surely holds: the start
of its last successful renewal plus the lease. Past that (a process paused by SIGSTOP, a Redis out of
reach) it counts the lease as lost before it even asks Redis.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import cast

from stylize_service.server.jobs.fleet_queue import Claim
from stylize_service.server.jobs.redis_store import RedisStore, key

# KEYS: lease. ARGV: token, lease ms. 1 when extended, 0 when the lease is not the token's.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def replica_id() -> str:
    """This process's name in the fleet: host, pid and a random part (a pid is reused across pods)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Lease:
    """This replica's lease on one claimed job."""

    def __init__(self, claim: Claim, seconds: float, taken_at: float) -> None:
        self.claim = claim
        self.seconds = seconds
        self._valid_until = taken_at + seconds
        self._lost = threading.Event()
        self.renewed_at = taken_at

    @property
    def job_id(self) -> str:
        return self.claim.job_id

    def holds(self) -> bool:
        """Whether the lease surely still holds, by this process's clock; False once lost."""
        if self._lost.is_set():
            return False
        if time.monotonic() >= self._valid_until:
            self._lost.set()
            return False
        return True

    def lose(self) -> None:
        self._lost.set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def renewed(self, sent_at: float) -> None:
        if not self._lost.is_set():
            self._valid_until = sent_at + self.seconds
            self.renewed_at = sent_at


class Leases:
    def __init__(self, store: RedisStore, seconds: float) -> None:
        self.store = store
        self.seconds = seconds
        self._renew = store.client.register_script(_RENEW)

    @property
    def milliseconds(self) -> int:
        return int(self.seconds * 1000)

    def renew(self, lease: Lease) -> bool:
        """Extend the lease if it is still ours; False (and the lease lost) when it is not. Raises
        StoreUnavailable: the lease then runs out by itself."""
        if not lease.holds():
            return False
        sent_at = time.monotonic()
        with self.store.reaching():
            ours = bool(
                cast(
                    int,
                    self._renew(
                        keys=[key("lease", lease.job_id)], args=[lease.claim.token, self.milliseconds]
                    ),
                )
            )
        if ours:
            lease.renewed(sent_at)
        else:
            lease.lose()
        return ours
