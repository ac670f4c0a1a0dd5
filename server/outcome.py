"""How a job ended: the status its client gets, the label its metric counts, and the words its log line
says, carried together so that none of them is parsed back from another.

The status is our own Status, numbered as gRPC's codes (google.rpc.Code), so that the job manager needs
no gRPC; the servicer turns it into a grpc.StatusCode by name."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

# The values of stylize_jobs_total's `outcome` label (server/metrics.py exports each from the start).
LABELS = ("ok", "cancelled", "deadline", "invalid", "refused", "error")


class Status(enum.Enum):
    """The statuses a job or a job call ends with; names and numbers as gRPC's status codes."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14


@dataclass(frozen=True)
class Outcome:
    label: str  # one of LABELS
    code: Status
    text: str  # the log line's outcome=, e.g. "ok", "cancelled while queued", "invalid: styles is empty"
    message: str = ""  # the status details a failed call ends with

    @classmethod
    def ok(cls) -> Outcome:
        return cls("ok", Status.OK, "ok")

    @classmethod
    def cancelled(cls, when: str = "") -> Outcome:
        """The client went away (or the server stopped it); when: e.g. "while queued"."""
        return cls("cancelled", Status.CANCELLED, f"cancelled {when}".strip())

    @classmethod
    def invalid(cls, message: str) -> Outcome:
        return cls("invalid", Status.INVALID_ARGUMENT, f"invalid: {message}", message)

    @classmethod
    def refused(cls, message: str, code: Status = Status.RESOURCE_EXHAUSTED, when: str = "") -> Outcome:
        """Not taken: a bound (RESOURCE_EXHAUSTED) or the server's state (UNAVAILABLE)."""
        return cls("refused", code, f"refused {when}".strip() + f": {message}", message)

    @classmethod
    def internal(cls, message: str, log_text: str | None = None) -> Outcome:
        """A failure of ours; log_text: what the log says after "internal error: " (default the message)."""
        return cls("error", Status.INTERNAL, f"internal error: {log_text or message}", message)

    def after_deadline(self, passed: bool) -> Outcome:
        """A cancellation by the call's deadline is counted and logged as such (gRPC reports it as a
        cancel)."""
        if not passed or self.label != "cancelled":
            return self
        return replace(
            self,
            label="deadline",
            code=Status.DEADLINE_EXCEEDED,
            text="deadline passed" + self.text.removeprefix("cancelled"),
        )

    def noting(self, note: str) -> Outcome:
        """The same outcome with a note for the log, e.g. "(3 frames skipped for a slow client)"."""
        return replace(self, text=f"{self.text} {note}")
