"""A job's record: who owns it, where it is in its life and how it ended; what every store keeps per job.

Plain values (strings, numbers), so that a store writes it as JSON, a Redis hash or anything else without
knowing more of it.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


class JobState(enum.Enum):
    """Named as stylize.v1.JobState's values."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def new_job_id() -> str:
    """32 lowercase hex digits: a random UUID's 122 random bits, so that ids cannot be guessed."""
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str  # identity.Identity's name of the client that submitted it; only it may see the job
    state: JobState
    created: float  # Unix times, seconds
    started: float | None = None
    ended: float | None = None
    # How a FAILED or CANCELLED job ended: the status name (outcome.Status) and its message.
    error_code: str = ""
    error_message: str = ""
    # The job ends with its Stylize call: a server that restarts cancels it rather than resume it.
    bound_to_call: bool = False
    resumes: int = 0  # times resumed from a checkpoint after its server stopped
    reserved_bytes: int = 0  # what the store set aside for it at submission (its predicted use)
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer minor version, kept as read

    def with_changes(self, **changes: Any) -> JobRecord:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        extra = data.pop("extra")
        return {**extra, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        """Raises ValueError (or KeyError, TypeError) for a record that is not one."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {name: data[name] for name in known if name in data}
        if not is_job_id(str(values.get("id", ""))):
            raise ValueError(f"not a job id: {values.get('id')!r}")
        values["state"] = JobState(values["state"])
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})
