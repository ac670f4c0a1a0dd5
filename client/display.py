"""The CLI's progress report on stderr: a one-line bar on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

BAR_WIDTH = 24
PLAIN_LINES = 20  # about this many lines per job when stderr is not a terminal
PLAIN_MIN_SECONDS = 5.0  # ... but also one at least this often


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressDisplay:
    """Feed it every event of one job; total_iterations sizes the bar (0 = unknown). On a terminal every
    Progress redraws the bar; otherwise a line is written about every 1/PLAIN_LINES of the iterations, and
    at least every PLAIN_MIN_SECONDS (by `clock`) while iterations arrive."""

    def __init__(
        self,
        label: str,
        total_iterations: int,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total_iterations
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._clock = clock
        self._last_plain_iteration = -1
        self._last_plain_time = 0.0
        self._line_open = False

    def on_event(self, event: object) -> None:
        if not self.enabled:
            return
        if isinstance(event, pb.Queued):
            self._print(f"{self.label}: queued, position {event.position}")
        elif isinstance(event, pb.Progress):
            self._progress(event)

    def finish(self, result: pb.Result, destination: str) -> None:
        if not self.enabled:
            return
        self._print(
            f"{self.label}: done in {format_duration(result.elapsed_seconds)}: {result.iterations} iterations, "
            f"{result.evaluations} evaluations, loss {result.final_losses.total:.4g}, "
            f"{result.width}x{result.height} -> {destination}"
        )

    def note(self, text: str) -> None:
        """A line about the job (its id, a reconnection), after the label, unless disabled."""
        if self.enabled:
            self._print(f"{self.label}: {text}")

    def abort(self) -> None:
        """End an open bar line before an error message is printed."""
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def _progress(self, progress: pb.Progress) -> None:
        fraction = min(1.0, progress.iteration / self.total) if self.total else 0.0
        eta = format_duration(progress.eta_seconds) if progress.iteration else "?"
        stage = f" stage {progress.stage + 1}/{progress.stages}" if progress.stages > 1 else ""
        counts = f"{progress.iteration}/{self.total}" if self.total else str(progress.iteration)
        text = (
            f"{counts} loss {progress.losses.total:.4g}{stage} {progress.width}x{progress.height} "
            f"elapsed {format_duration(progress.elapsed_seconds)} ETA {eta}"
        )
        if self.tty:
            filled = round(fraction * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r\x1b[2K{self.label} [{bar}] {fraction:4.0%} {text}")
            self.stream.flush()
            self._line_open = True
            return
        step = max(1, self.total // PLAIN_LINES) if self.total else 10
        now = self._clock()
        due = progress.iteration - self._last_plain_iteration >= step
        if progress.iteration == 0 or due or now - self._last_plain_time >= PLAIN_MIN_SECONDS:
            self._last_plain_iteration = progress.iteration
            self._last_plain_time = now
            self._print(f"{self.label}: {text}")

    def _print(self, line: str) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(line + "\n")
        self.stream.flush()
