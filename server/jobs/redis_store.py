"""The fleet job store: every replica keeps its jobs in one Redis (--store-url redis://HOST:PORT/DB).

    stylize:jobs              sorted set: every job id, scored by its creation time
    stylize:job:ID            hash: record (records.JobRecord as JSON), state (the record's), request (the
                              StylizeRequest), peak (its planned memory, for the fleet queue), gen (its
                              lease generation), submitter, runner and previous (replica ids: who took the
                              call, who runs it, who ran it before) and b_* (the bytes of each part)
    stylize:events:ID         stream: every non-frame event, entry id SEQUENCE-1, fields d (the
                              serialized StylizeResponse) and g (the lease generation that wrote it)
    stylize:frames:ID         stream: the retained frames, the same way
    stylize:framesizes:ID     list: "SEQUENCE:BYTES" of the retained frames, oldest first
    stylize:checkpoint:ID     string: the latest checkpoint
    stylize:lease:ID          string with a TTL: the token of the replica that runs the job (leases.py)

Each operation is one round trip and atomic on its own (a MULTI/EXEC or a Lua script). A job that a
replica runs is fenced (fence()): its writes go through a script that first checks that the job's lease
still holds the replica's token, so a replica that lost its lease (paused past it, cut off from Redis)
cannot overwrite what the replica that took the job over writes; such a write raises LeaseLost.

A Redis that cannot be reached raises StoreUnavailable (an OSError) naming the store, its password never
shown (redacted_url).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, cast

import redis
import redis.exceptions

from stylize_service.server.jobs.records import JobRecord, is_job_id
from stylize_service.server.jobs.store import FrameRetention, StoredEvent, StoreError

logger = logging.getLogger("stylize.server")

PREFIX = "stylize:"
SOCKET_TIMEOUT_SECONDS = 5.0  # a Redis that answers nothing for this long counts as unreachable
_BYTE_FIELDS = ("b_record", "b_request", "b_events", "b_frames", "b_checkpoint")
_LEASE_LOST = "STYLIZE_LEASE_LOST"
_NO_JOB = "STYLIZE_NO_JOB"

# KEYS: lease, job hash. ARGV: token ("" = not fenced). Fails unless the lease holds the token.
_FENCE = f"""
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('{_LEASE_LOST}')
end
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('{_NO_JOB}') end
"""

# KEYS: lease, job, events, frames, framesizes. ARGV: token, sequence, data, is_frame, generation,
# frames retained, frame bytes retained.
_APPEND = (
    _FENCE
    + """
local size = string.len(ARGV[3])
if ARGV[4] == '1' then
  redis.call('XADD', KEYS[4], ARGV[2] .. '-1', 'd', ARGV[3], 'g', ARGV[5])
  redis.call('RPUSH', KEYS[5], ARGV[2] .. ':' .. size)
  local total = redis.call('HINCRBY', KEYS[2], 'b_frames', size)
  local count = redis.call('LLEN', KEYS[5])
  while count > 1 and (count > tonumber(ARGV[6]) or total > tonumber(ARGV[7])) do
    local entry = redis.call('LPOP', KEYS[5])
    local sep = string.find(entry, ':', 1, true)
    local dropped = tonumber(string.sub(entry, sep + 1))
    redis.call('XDEL', KEYS[4], string.sub(entry, 1, sep - 1) .. '-1')
    total = redis.call('HINCRBY', KEYS[2], 'b_frames', -dropped)
    count = count - 1
  end
else
  redis.call('XADD', KEYS[3], ARGV[2] .. '-1', 'd', ARGV[3], 'g', ARGV[5])
  redis.call('HINCRBY', KEYS[2], 'b_events', size)
end
return 1
"""
)

# KEYS: lease, job. ARGV: token, record JSON, its state.
_SAVE = (
    _FENCE
    + """
redis.call('HSET', KEYS[2], 'record', ARGV[2], 'b_record', string.len(ARGV[2]), 'state', ARGV[3])
return 1
"""
)

# KEYS: lease, job, checkpoint. ARGV: token, checkpoint bytes ("" with ARGV[3] = "drop": delete it).
_CHECKPOINT = (
    _FENCE
    + """
if ARGV[3] == 'drop' then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[2], 'b_checkpoint', 0)
else
  redis.call('SET', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[2], 'b_checkpoint', string.len(ARGV[2]))
end
return 1
"""
)


class StoreUnavailable(OSError):
    """The store cannot be reached now (its message names it); the operation may succeed later."""


class LeaseLost(OSError):
    """A fenced write was refused: another replica holds the job's lease now."""


def redacted_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.unquote(parts.username or "")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str) -> redis.Redis:
    """A client for a redis:// or rediss:// (TLS) URL, with its user, password and database; raises
    StoreError naming the URL (redacted) when it is not one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise StoreError(f"{redacted_url(url)}: expected a redis:// or rediss:// URL")
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
    except ValueError as err:
        raise StoreError(f"{redacted_url(url)}: {err}") from None


def key(kind: str, job_id: str = "") -> str:
    return f"{PREFIX}{kind}:{job_id}" if job_id else f"{PREFIX}{kind}"


class RedisStore:
    kind = "redis"

    def __init__(
        self,
        url: str,
        capacity_bytes: int,
        retention: FrameRetention | None = None,
        *,
        client: redis.Redis | None = None,
    ) -> None:
        """Connect and check that the store answers; raises StoreError naming the store otherwise."""
        self.url = redacted_url(url)
        self.capacity_bytes = capacity_bytes
        self.retention = retention or FrameRetention()
        self.client = client if client is not None else connect(url)
        self._fences: dict[str, tuple[str, int]] = {}  # job -> (lease token, generation) of its writes
        self._lock = threading.Lock()
        self._append = self.client.register_script(_APPEND)
        self._save = self.client.register_script(_SAVE)
        self._checkpoint = self.client.register_script(_CHECKPOINT)
        try:
            with self.reaching():
                self.client.ping()
        except StoreUnavailable as err:
            raise StoreError(str(err)) from None

    # --- errors ------------------------------------------------------------------------------------

    @contextmanager
    def reaching(self) -> Iterator[None]:
        """Redis's errors as the store's: StoreUnavailable naming the store, LeaseLost, KeyError."""
        try:
            yield
        except redis.exceptions.ResponseError as err:
            text = str(err)
            if _LEASE_LOST in text:
                raise LeaseLost(f"the job's lease in {self.url} is held by another replica") from None
            if _NO_JOB in text:
                raise FileNotFoundError(f"no such job in {self.url}") from None
            raise StoreUnavailable(f"the job store {self.url} refused an operation: {text}") from None
        except redis.exceptions.AuthenticationError as err:
            raise StoreUnavailable(f"the job store {self.url} refused the credentials: {err}") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as err:
            raise StoreUnavailable(f"the job store {self.url} is unreachable: {err}") from None
        except redis.exceptions.RedisError as err:
            raise StoreUnavailable(f"the job store {self.url} failed: {err}") from None

    def ping(self) -> bool:
        try:
            with self.reaching():
                return bool(self.client.ping())
        except StoreUnavailable:
            return False

    # --- fencing -----------------------------------------------------------------------------------

    def fence(self, job_id: str, token: str, generation: int) -> None:
        """From now on this process writes the job only while its lease holds `token`."""
        with self._lock:
            self._fences[job_id] = (token, generation)

    def unfence(self, job_id: str) -> None:
        with self._lock:
            self._fences.pop(job_id, None)

    def _fence_of(self, job_id: str) -> tuple[str, int]:
        with self._lock:
            return self._fences.get(job_id, ("", 0))

    # --- the store as a whole ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the idle connections; one still in use (a watch's blocking read) ends with its call."""
        self.client.connection_pool.disconnect(inuse_connections=False)

    def used_bytes(self) -> int:
        with self.reaching():
            ids = [_text(i) for i in cast(list[bytes], self.client.zrange(key("jobs"), 0, -1))]
            return sum(self._bytes_of(ids))

    def job_bytes(self, job_id: str) -> int:
        with self.reaching():
            return sum(self._bytes_of([job_id]))

    def _bytes_of(self, ids: Sequence[str]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(key("job", job_id), list(_BYTE_FIELDS))
        return [sum(int(v or 0) for v in values) for values in pipe.execute()]

    def records(self) -> Sequence[JobRecord]:
        with self.reaching():
            ids = [_text(i) for i in cast(list[bytes], self.client.zrange(key("jobs"), 0, -1))]
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(key("job", job_id), "record")
            found = []
            for job_id, data in zip(ids, pipe.execute(), strict=True):
                record = self._parse(job_id, data)
                if record is not None:
                    found.append(record)
            return found

    def record(self, job_id: str) -> JobRecord | None:
        """The job's record; None for an unknown job."""
        if not is_job_id(job_id):
            return None
        with self.reaching():
            return self._parse(job_id, self.client.hget(key("job", job_id), "record"))

    def _parse(self, job_id: str, data: Any) -> JobRecord | None:
        if data is None:
            return None
        try:
            record = JobRecord.from_json(json.loads(data))
            if record.id != job_id:
                raise ValueError(f"its record names job {record.id}")
            return record
        except (ValueError, KeyError, TypeError) as err:
            logger.warning("job store %s: job %s cannot be read (%s); skipped", self.url, job_id, err)
            return None

    # --- one job -----------------------------------------------------------------------------------

    def create(self, record: JobRecord, request: bytes, *, peak_bytes: int = 0, submitter: str = "") -> None:
        """peak_bytes: the job's planned memory (what a replica needs free to claim it); submitter: the
        replica that took the call."""
        data = _record_bytes(record)
        with self.reaching():
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(
                key("job", record.id),
                mapping={
                    "record": data,
                    "state": record.state.value,
                    "request": request,
                    "peak": peak_bytes,
                    "submitter": submitter,
                    "owner": record.owner,
                    "gen": 0,
                    "b_record": len(data),
                    "b_request": len(request),
                },
            )
            pipe.zadd(key("jobs"), {record.id: record.created})
            pipe.execute()

    def save(self, record: JobRecord) -> None:
        token, _ = self._fence_of(record.id)
        with self.reaching():
            self._save(
                keys=[key("lease", record.id), key("job", record.id)],
                args=[token, _record_bytes(record), record.state.value],
            )

    def request(self, job_id: str) -> bytes:
        if not is_job_id(job_id):
            raise KeyError(job_id)
        with self.reaching():
            data = self.client.hget(key("job", job_id), "request")
        if data is None:
            raise KeyError(job_id)
        return cast(bytes, data)

    def fields(self, job_id: str, *names: str) -> list[str]:
        """Fields of the job's hash beside its record (e.g. runner, previous, submitter); "" when unset."""
        with self.reaching():
            values = cast(list[bytes | None], self.client.hmget(key("job", job_id), list(names)))
        return [_text(value) if value is not None else "" for value in values]

    def append(self, job_id: str, event: StoredEvent, *, durable: bool = False) -> None:
        """`durable` asks nothing more here: Redis's own persistence (AOF or RDB) decides."""
        token, generation = self._fence_of(job_id)
        with self.reaching():
            self._append(
                keys=[
                    key("lease", job_id),
                    key("job", job_id),
                    key("events", job_id),
                    key("frames", job_id),
                    key("framesizes", job_id),
                ],
                args=[
                    token,
                    event.sequence,
                    event.data,
                    "1" if event.is_frame else "0",
                    generation,
                    self.retention.count,
                    self.retention.nbytes,
                ],
            )

    def events(self, job_id: str, after: int = 0, *, frames: bool = True) -> list[StoredEvent]:
        start = f"({after}-1" if after else "-"
        with self.reaching():
            pipe = self.client.pipeline(transaction=False)
            pipe.xrange(key("events", job_id), start, "+")
            if frames:
                pipe.xrange(key("frames", job_id), start, "+")
            results = pipe.execute()
        found = [_event(entry) for entry in results[0]]
        if frames:
            found.extend(_event(entry, is_frame=True) for entry in results[1])
            found.sort(key=lambda event: event.sequence)
        return found

    def writers(self, job_id: str) -> list[tuple[int, int]]:
        """(sequence, lease generation) of each retained event, in order: which run wrote what."""
        with self.reaching():
            pipe = self.client.pipeline(transaction=False)
            pipe.xrange(key("events", job_id), "-", "+")
            pipe.xrange(key("frames", job_id), "-", "+")
            entries = [entry for result in pipe.execute() for entry in result]
        return sorted((_sequence(entry_id), int(fields[b"g"])) for entry_id, fields in entries)

    def wait_events(self, job_id: str, after: int, timeout: float) -> list[StoredEvent]:
        """The job's events after `after` (frames included); blocks up to `timeout` seconds while there
        are none (XREAD BLOCK)."""
        cursor = f"{after}-1" if after else "0-0"
        with self.reaching():
            result = self.client.xread(
                {key("events", job_id): cursor, key("frames", job_id): cursor},
                block=max(1, int(timeout * 1000)),
            )
        found: list[StoredEvent] = []
        for stream, entries in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], result or []):
            is_frame = _text(stream).startswith(key("frames"))
            found.extend(_event(entry, is_frame=is_frame) for entry in entries)
        found.sort(key=lambda event: event.sequence)
        return found

    def last_sequence(self, job_id: str) -> int:
        with self.reaching():
            pipe = self.client.pipeline(transaction=False)
            pipe.xrevrange(key("events", job_id), "+", "-", count=1)
            pipe.xrevrange(key("frames", job_id), "+", "-", count=1)
            newest = [entries[0][0] for entries in pipe.execute() if entries]
        return max((_sequence(entry_id) for entry_id in newest), default=0)

    def put_checkpoint(self, job_id: str, write: Callable[[IO[bytes]], None]) -> None:
        """A Redis value is sent whole: the checkpoint is serialized into memory first (one copy)."""
        buffer = io.BytesIO()
        write(buffer)
        token, _ = self._fence_of(job_id)
        with self.reaching():
            self._checkpoint(
                keys=[key("lease", job_id), key("job", job_id), key("checkpoint", job_id)],
                args=[token, buffer.getbuffer(), "put"],
            )

    def checkpoint(self, job_id: str) -> bytes | None:
        with self.reaching():
            return cast(bytes | None, self.client.get(key("checkpoint", job_id)))

    def drop_checkpoint(self, job_id: str) -> None:
        token, _ = self._fence_of(job_id)
        try:
            with self.reaching():
                self._checkpoint(
                    keys=[key("lease", job_id), key("job", job_id), key("checkpoint", job_id)],
                    args=[token, "", "drop"],
                )
        except FileNotFoundError:
            pass  # deleted already

    def delete(self, job_id: str) -> None:
        with self.reaching():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(
                *(
                    key(kind, job_id)
                    for kind in ("job", "events", "frames", "framesizes", "checkpoint", "cancel")
                )
            )
            pipe.zrem(key("jobs"), job_id)
            pipe.execute()


def _record_bytes(record: JobRecord) -> bytes:
    return json.dumps(record.to_json(), sort_keys=True).encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sequence(entry_id: bytes | str) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def _event(entry: tuple[bytes, dict[bytes, bytes]], *, is_frame: bool = False) -> StoredEvent:
    entry_id, fields = entry
    return StoredEvent(_sequence(entry_id), fields[b"d"], is_frame=is_frame)
