"""The job store's interface: what must outlive the server process, per job.

A store keeps, for each job: its record (records.JobRecord), its request (the StylizeRequest's bytes, so
that a restarted server can run it again), its events (serialized StylizeResponses with their sequence:
every Progress and the Result, and the newest frames within FrameRetention), and its latest checkpoint
(opaque bytes from the engine). directory_store.DirectoryStore is the embedded default.

The operations are per job and per key, each one atomic on its own, with no transaction across them and no
scan of another job's data: the shape of a key-value store such as Redis (a hash per record, a list per
job's events, a string per checkpoint), so that a shared store can take the same place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from stylize_service.server.jobs.records import JobRecord

DEFAULT_FRAMES_RETAINED = 32
DEFAULT_FRAME_BYTES_RETAINED = 64 * 1024 * 1024


class StoreError(Exception):
    """The store cannot be used: its format, its place, its permissions (the message says which)."""


class StoreFull(Exception):
    """The store cannot take these bytes within its capacity."""


@dataclass(frozen=True)
class StoredEvent:
    sequence: int  # the event's number within its job (StylizeResponse.sequence)
    data: bytes  # the serialized StylizeResponse
    is_frame: bool = False  # frames are kept within FrameRetention; everything else always


@dataclass(frozen=True)
class FrameRetention:
    """The frames of one job kept for replay, at most; beyond either bound the oldest are dropped."""

    count: int = DEFAULT_FRAMES_RETAINED
    nbytes: int = DEFAULT_FRAME_BYTES_RETAINED


class JobStore(Protocol):
    kind: str  # what GetInfo reports, e.g. "directory"
    capacity_bytes: int  # the most the store may hold (--store-mb)
    retention: FrameRetention

    def records(self) -> Sequence[JobRecord]:
        """Every job's record; an entry that cannot be read is logged and skipped."""
        ...

    def create(self, record: JobRecord, request: bytes) -> None:
        """A new job with its request, all or nothing. Raises OSError."""
        ...

    def save(self, record: JobRecord) -> None:
        """Replace the job's record. Raises OSError."""
        ...

    def request(self, job_id: str) -> bytes:
        """The job's request bytes. Raises KeyError for an unknown job, OSError."""
        ...

    def append(self, job_id: str, event: StoredEvent, *, durable: bool = False) -> None:
        """Add an event (its sequence above every earlier one); durable: on disk before returning (the
        others reach it at the next durable write or checkpoint). Raises OSError."""
        ...

    def events(self, job_id: str, after: int = 0, *, frames: bool = True) -> list[StoredEvent]:
        """The job's retained events with a sequence greater than `after`, in order; frames=False leaves
        the frames out (and unread)."""
        ...

    def last_sequence(self, job_id: str) -> int:
        """The sequence of the job's newest retained event, frames included; 0 for none."""
        ...

    def put_checkpoint(self, job_id: str, write: Callable[[IO[bytes]], None]) -> None:
        """Replace the job's checkpoint, all or nothing, with its events made durable first; `write`
        streams it into the file it is given (a checkpoint is as large as L-BFGS-B's state: no copy of it
        is made in memory). Raises OSError (a full disk: the job goes on without it)."""
        ...

    def checkpoint(self, job_id: str) -> bytes | None: ...

    def drop_checkpoint(self, job_id: str) -> None: ...

    def delete(self, job_id: str) -> None:
        """Everything of the job; nothing when it is unknown."""
        ...

    def used_bytes(self) -> int: ...

    def job_bytes(self, job_id: str) -> int: ...

    def close(self) -> None: ...
