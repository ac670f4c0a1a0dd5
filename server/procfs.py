"""What Linux's /proc says of a process: resident memory (now and at its peak), threads, CPU time.

The one reader of /proc for the server (its idle size, against which the memory budget is split), the
scripts that measure it and the tests. pid "self" is this process. Outside Linux the readers raise
OSError, except rss_bytes(), which answers 0 where it cannot tell.
"""

from __future__ import annotations

import os
from pathlib import Path

Pid = int | str


def status_value(pid: Pid, key: str) -> int:
    """A figure of /proc/PID/status: the Vm* lines in bytes (they are given in kB), others as counts
    (Threads); raises OSError if the process or the line is not there."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            value = int(line.split()[1])
            return value * 1024 if key.startswith("Vm") else value
    raise OSError(f"/proc/{pid}/status has no {key}")


def rss_bytes(pid: Pid = "self") -> int:
    """Resident memory now; 0 where /proc cannot tell."""
    try:
        return status_value(pid, "VmRSS")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes(pid: Pid = "self") -> int:
    """The peak resident memory (VmHWM), since start or since reset_peak(). Not getrusage's ru_maxrss,
    which a child inherits across fork and exec."""
    return status_value(pid, "VmHWM")


def reset_peak(pid: Pid = "self") -> bool:
    """Reset VmHWM to the current RSS (clear_refs 5), so that a later peak is the next step's own; False
    where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: Pid = "self") -> float:
    """User + system CPU time of every thread of the process so far."""
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
