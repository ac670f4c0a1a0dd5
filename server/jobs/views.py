"""A job as the job manager shows it to callers: its record and what only the manager knows of it."""

from __future__ import annotations

from dataclasses import dataclass

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.jobs.records import JobRecord


@dataclass(frozen=True)
class JobView:
    """A job as GetJob answers it."""

    record: JobRecord
    queue_position: int = 0
    progress: pb.Progress | None = None
    result: pb.Result | None = None
    last_sequence: int = 0
