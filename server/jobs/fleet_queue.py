"""One queue for the fleet, in the Redis of the job store (redis_store.py):

    stylize:queue        list: the waiting job ids, the next to start first
    stylize:running      set: the ids of the jobs that a replica has claimed and not released
    stylize:clients      hash: client -> its unfinished jobs (queued or running), across the fleet
    stylize:cancel:ID    string: a cancel asked of the job, from any replica (the outcome as JSON)

Every move is one Lua script, so atomic: enqueue checks the client's bound and the queue's and appends;
claim takes the head of the queue when it fits the claiming replica's free memory and, in the same step,
sets the job's lease (leases.py) with the next generation of the job; release gives a job back (to the
front of the queue, or for good with its client's count) only while the lease is the releaser's. A job
whose lease lapsed (its replica stopped, was killed or cut off) is put back at the front by takeover(),
which any replica runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import redis

from stylize_service.server.jobs.redis_store import PREFIX, RedisStore, key

FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
CANCEL_TTL_SECONDS = 24 * 3600

# KEYS: queue, clients, job. ARGV: id, client, client bound, queue bound. -1: the client's bound, -2:
# the queue's; else the job's position.
_ENQUEUE = """
if tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') >= tonumber(ARGV[3]) then return -1 end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -2 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('HSET', KEYS[3], 'counted', 1)
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""

# KEYS: queue, running. ARGV: replica, free memory (bytes), lease ms, prefix. {} when empty; {id, -1}
# when the head does not fit here; {id, 0} for a deleted job; else {id, generation}.
_CLAIM = """
local id = redis.call('LINDEX', KEYS[1], 0)
if not id then return {} end
local job = ARGV[4] .. 'job:' .. id
local peak = tonumber(redis.call('HGET', job, 'peak') or '0')
if peak > tonumber(ARGV[2]) then return {id, -1} end
redis.call('LPOP', KEYS[1])
if redis.call('EXISTS', job) == 0 then return {id, 0} end
local generation = redis.call('HINCRBY', job, 'gen', 1)
redis.call('SET', ARGV[4] .. 'lease:' .. id, ARGV[1] .. ':' .. generation, 'PX', ARGV[3])
redis.call('HSET', job, 'previous', redis.call('HGET', job, 'runner') or '', 'runner', ARGV[1])
redis.call('SADD', KEYS[2], id)
return {id, generation}
"""

# KEYS: lease, running, queue, clients, job. ARGV: token, id, client, mode ("requeue" or "final").
# 0 when the lease is not the caller's (another replica runs the job now).
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
if ARGV[4] == 'requeue' then
  redis.call('LPUSH', KEYS[3], ARGV[2])
elseif redis.call('HGET', KEYS[5], 'counted') == '1' then
  redis.call('HSET', KEYS[5], 'counted', 0)
  if redis.call('HINCRBY', KEYS[4], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[4], ARGV[3]) end
end
return 1
"""

# KEYS: queue, clients, job. ARGV: id, client. Takes a waiting job out of the queue for good: 1 if it
# was there (the caller ends it), else 0 (a replica claimed it: it sees the cancel flag).
_UNQUEUE = """
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[3], 'counted') == '1' then
  redis.call('HSET', KEYS[3], 'counted', 0)
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
return 1
"""

# KEYS: running, queue, clients. ARGV: prefix. Every claimed job whose lease has lapsed goes back to the
# front of the queue (a finished or deleted one just leaves the running set, its client's count released
# if its replica could not); returns the ids queued again.
_TAKEOVER = """
local again = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
    local job = ARGV[1] .. 'job:' .. id
    local state = redis.call('HGET', job, 'state')
    if redis.call('EXISTS', job) == 1 and state ~= 'SUCCEEDED' and state ~= 'FAILED' and state ~= 'CANCELLED' then
      redis.call('LPUSH', KEYS[2], id)
      table.insert(again, id)
    elseif redis.call('HGET', job, 'counted') == '1' then
      -- it ended but its replica could not release it: its client's count goes down here
      redis.call('HSET', job, 'counted', 0)
      local client = redis.call('HGET', job, 'owner')
      if redis.call('HINCRBY', KEYS[3], client, -1) <= 0 then redis.call('HDEL', KEYS[3], client) end
    end
  end
end
return again
"""


class ClientBound(Exception):
    pass


class FleetQueueFull(Exception):
    pass


@dataclass(frozen=True)
class Claim:
    job_id: str
    generation: int
    token: str


@dataclass(frozen=True)
class CancelRequest:
    """Why a job was asked to stop: an outcome.Outcome's fields, the code by its name."""

    label: str
    code: str
    text: str
    message: str


class FleetQueue:
    def __init__(self, store: RedisStore, replica: str) -> None:
        self.store = store
        self.replica = replica
        client: redis.Redis = store.client
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._unqueue = client.register_script(_UNQUEUE)
        self._takeover = client.register_script(_TAKEOVER)

    def enqueue(self, job_id: str, client: str, client_bound: int, queue_bound: int) -> int:
        """Append the job; returns its position. Raises ClientBound, FleetQueueFull, StoreUnavailable."""
        with self.store.reaching():
            answer = int(
                cast(
                    int,
                    self._enqueue(
                        keys=[key("queue"), key("clients"), key("job", job_id)],
                        args=[job_id, client, client_bound, queue_bound],
                    ),
                )
            )
        if answer == -1:
            raise ClientBound()
        if answer == -2:
            raise FleetQueueFull()
        return answer

    def claim(self, free_memory: int, lease_ms: int) -> Claim | None:
        """The head of the queue with its lease, if it fits `free_memory`; None when the queue is empty or
        its head does not fit here."""
        with self.store.reaching():
            answer = cast(
                list[bytes | int],
                self._claim(
                    keys=[key("queue"), key("running")], args=[self.replica, free_memory, lease_ms, PREFIX]
                ),
            )
        if not answer:
            return None
        job_id = _text(answer[0])
        generation = int(answer[1])
        if generation <= 0:
            return None
        return Claim(job_id, generation, f"{self.replica}:{generation}")

    def release(self, claim: Claim, client: str, *, requeue: bool) -> bool:
        """Give the job back: to the front of the queue (requeue), or for good (it ended). False when the
        lease was not ours any more."""
        with self.store.reaching():
            return bool(
                self._release(
                    keys=[
                        key("lease", claim.job_id),
                        key("running"),
                        key("queue"),
                        key("clients"),
                        key("job", claim.job_id),
                    ],
                    args=[claim.token, claim.job_id, client, "requeue" if requeue else "final"],
                )
            )

    def unqueue(self, job_id: str, client: str) -> bool:
        with self.store.reaching():
            return bool(
                self._unqueue(keys=[key("queue"), key("clients"), key("job", job_id)], args=[job_id, client])
            )

    def takeover(self) -> list[str]:
        """Queue again, at the front, every claimed job whose lease lapsed; returns their ids."""
        with self.store.reaching():
            answer = cast(
                list[bytes],
                self._takeover(keys=[key("running"), key("queue"), key("clients")], args=[PREFIX]),
            )
        return [_text(job_id) for job_id in answer]

    def depth(self) -> int:
        with self.store.reaching():
            return int(self.store.client.llen(key("queue")))

    def position(self, job_id: str) -> int:
        """1 = next to start; 0 when not queued."""
        with self.store.reaching():
            index = self.store.client.lpos(key("queue"), job_id)
        return 0 if index is None else int(cast(int, index)) + 1

    def client_jobs(self, client: str) -> int:
        with self.store.reaching():
            return int(cast(bytes | None, self.store.client.hget(key("clients"), client)) or 0)

    def ask_cancel(self, job_id: str, request: CancelRequest) -> None:
        data = json.dumps(
            {"label": request.label, "code": request.code, "text": request.text, "message": request.message}
        )
        with self.store.reaching():
            self.store.client.set(key("cancel", job_id), data, nx=True, ex=CANCEL_TTL_SECONDS)

    def cancels(self, job_ids: list[str]) -> dict[str, CancelRequest]:
        """The cancels asked of these jobs."""
        if not job_ids:
            return {}
        with self.store.reaching():
            values = cast(list[bytes | None], self.store.client.mget([key("cancel", j) for j in job_ids]))
        found = {}
        for job_id, value in zip(job_ids, values, strict=True):
            if value is not None:
                data = json.loads(value)
                found[job_id] = CancelRequest(
                    str(data["label"]), str(data["code"]), str(data["text"]), str(data["message"])
                )
        return found


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
