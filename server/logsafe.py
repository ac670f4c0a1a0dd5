"""The server's log, safe from its clients: escaped, bounded, throttled and without secrets.

A client chooses some of the text that reaches the log: a method path, a layer name, an error message
that quotes it. Without care, a newline in it forges a log line and a long one writes megabytes per call.
- quote() renders a client's string for a message or a log line: escaped and cut to a short prefix with
  its length (the one rule, also used by validation's error messages);
- EscapingFormatter escapes control characters in every message and bounds its length, whoever logged it
  (the last line of defence: the call sites quote what they know to be the client's);
- LogThrottle keeps a greedy client's refusals from flooding the log: past a rate, lines of one kind are
  counted instead of written, and the count is logged with the next one that is;
- RedactInvalidEncoding: grpc's Python core logs a metadata value that is not UTF-8 in full, token and
  all ("Invalid encoding on b'Bearer ...'"); the filter removes the value before it is written.
"""

from __future__ import annotations

import logging
import threading
import time

from stylize_service.server.engine.validation import quote

__all__ = ["EscapingFormatter", "LogThrottle", "RedactInvalidEncoding", "install_grpc_redaction", "quote"]

MAX_MESSAGE_CHARS = 4096  # a job's line with 16 styles is about 600 characters
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
# The message of grpc's decoders (cygrpc's _decode, and _common.decode) for a metadata value that is not
# UTF-8; the value itself is its argument.
_INVALID_ENCODING = "Invalid encoding on %s"
GRPC_DECODING_LOGGERS = ("grpc._cython.cygrpc", "grpc._common")


def escape(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """text with control characters (newlines included) written as escapes, cut to `limit` characters."""
    escaped = text.translate(_CONTROL)
    if len(escaped) > limit:
        escaped = f"{escaped[:limit]}... ({len(escaped) - limit} more characters)"
    return escaped


class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages are one bounded line each; tracebacks (exc_info) keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class LogThrottle:
    """At most `per_interval` lines of one kind per `interval` seconds; the rest are counted."""

    def __init__(self, per_interval: int = 20, interval: float = 10.0) -> None:
        self._per_interval = per_interval
        self._interval = interval
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, written, held back)

    def admit(self, kind: str) -> int | None:
        """None: don't write this line. Else write it, noting the returned number of lines of its kind
        held back since the last one written (0 if none)."""
        now = time.monotonic()
        with self._lock:
            start, written, held_back = self._windows.get(kind, (now, 0, 0))
            if now - start >= self._interval:
                start, written = now, 0
            if written >= self._per_interval:
                self._windows[kind] = (start, written, held_back + 1)
                return None
            self._windows[kind] = (start, written + 1, 0)
            return held_back


class RedactInvalidEncoding(logging.Filter):
    """Replaces the value in grpc's "Invalid encoding on ..." records (metadata such as a token) by its
    length, and drops their traceback, which says nothing more."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _INVALID_ENCODING and record.args:
            value = record.args[0] if isinstance(record.args, tuple) else record.args
            size = len(value) if isinstance(value, bytes | str) else 0
            record.args = (f"a metadata value of {size} bytes that is not UTF-8 (not shown)",)
            record.exc_info = None
            record.exc_text = None
        return True


_redaction = RedactInvalidEncoding()


def install_grpc_redaction() -> None:
    """Attach RedactInvalidEncoding to grpc's loggers (once per process; safe to call again)."""
    for name in GRPC_DECODING_LOGGERS:
        grpc_logger = logging.getLogger(name)
        if _redaction not in grpc_logger.filters:
            grpc_logger.addFilter(_redaction)
