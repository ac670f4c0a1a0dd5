"""The CLI's progress display: the ETA and elapsed time it prints, the bar, and how often it writes."""

from __future__ import annotations

import io
import re

import pytest

from stylize_service.client.display import PLAIN_LINES, PLAIN_MIN_SECONDS, ProgressDisplay, format_duration
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(iteration: int, eta: float = 0.0, elapsed: float = 0.0, **fields: int) -> pb.Progress:
    return pb.Progress(
        iteration=iteration,
        eta_seconds=eta,
        elapsed_seconds=elapsed,
        losses=pb.Losses(total=1234.5),
        width=64,
        height=48,
        stages=fields.get("stages", 1),
        stage=fields.get("stage", 0),
    )


def printed_iterations(stream: io.StringIO) -> list[int]:
    """The iterations of the plain progress lines written so far."""
    return [int(match) for match in re.findall(r"^job: (\d+)", stream.getvalue(), flags=re.MULTILINE)]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00"),
        (0.4, "0:00"),
        (59.5, "1:00"),  # rounded, not truncated
        (61, "1:01"),
        (3599, "59:59"),
        (3600, "1:00:00"),
        (3725.2, "1:02:05"),
        (36000 + 61, "10:01:01"),
        (-5, "0:00"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_plain_line_shows_the_servers_eta_and_elapsed_time() -> None:
    stream = io.StringIO()
    display = ProgressDisplay("job", 200, stream, clock=Clock())
    display.on_event(progress(0, eta=0.0, elapsed=0.5))
    display.on_event(progress(10, eta=3725.2, elapsed=75.0))
    first, second = stream.getvalue().splitlines()
    assert first == "job: 0/200 loss 1234 64x48 elapsed 0:00 ETA ?"  # no estimate before the first step
    assert second == "job: 10/200 loss 1234 64x48 elapsed 1:15 ETA 1:02:05"


def test_terminal_bar_fills_with_the_iterations_and_shows_the_stage() -> None:
    stream = Terminal()
    display = ProgressDisplay("job", 40, stream)
    display.on_event(progress(10, eta=90, elapsed=30, stage=1, stages=3))
    line = stream.getvalue().split("\r\x1b[2K")[-1]
    assert line == "job [######------------------]  25% 10/40 loss 1234 stage 2/3 64x48 elapsed 0:30 ETA 1:30"
    display.on_event(progress(40, eta=0, elapsed=120))
    assert "[########################] 100% 40/40" in stream.getvalue().split("\r\x1b[2K")[-1]
    display.abort()  # ends the open bar line before an error message
    assert stream.getvalue().endswith("ETA 0:00\n")


def test_terminal_redraws_on_every_progress() -> None:
    stream = Terminal()
    display = ProgressDisplay("job", 1000, stream, clock=Clock())
    for iteration in range(7):
        display.on_event(progress(iteration, eta=10))
    assert stream.getvalue().count("\r\x1b[2K") == 7


def test_plain_lines_are_throttled_to_a_twentieth_of_the_iterations() -> None:
    stream, clock = io.StringIO(), Clock()
    display = ProgressDisplay("job", 100, stream, clock=clock)
    for iteration in range(101):
        display.on_event(progress(iteration, eta=100 - iteration))
    assert PLAIN_LINES == 20
    assert printed_iterations(stream) == list(range(0, 101, 5))  # 100 // 20 = every 5th


def test_plain_lines_without_a_total_come_every_tenth_iteration() -> None:
    stream = io.StringIO()
    display = ProgressDisplay("job", 0, stream, clock=Clock())
    for iteration in range(35):
        display.on_event(progress(iteration))
    assert printed_iterations(stream) == [0, 10, 20, 30]
    assert "job: 30 loss" in stream.getvalue()  # no "/total" when the total is unknown


def test_slow_iterations_still_get_a_line_every_few_seconds() -> None:
    stream, clock = io.StringIO(), Clock()
    display = ProgressDisplay("job", 1000, stream, clock=clock)  # a line per 50 iterations by count
    for iteration in range(11):
        display.on_event(progress(iteration))
        clock.now += PLAIN_MIN_SECONDS / 2
    # Iteration 0, then whenever PLAIN_MIN_SECONDS have passed since the last line (at 2, 4, ...).
    assert printed_iterations(stream) == [0, 2, 4, 6, 8, 10]
    clock.now += PLAIN_MIN_SECONDS / 2 - 0.1  # just under PLAIN_MIN_SECONDS after the line at 10
    display.on_event(progress(11))
    assert printed_iterations(stream)[-1] == 10
    clock.now += 0.1
    display.on_event(progress(12))
    assert printed_iterations(stream)[-1] == 12


def test_queued_finish_and_disabled() -> None:
    stream = io.StringIO()
    display = ProgressDisplay("job", 10, stream)
    display.on_event(pb.Queued(position=2))
    display.finish(
        pb.Result(
            elapsed_seconds=125,
            iterations=10,
            evaluations=12,
            final_losses=pb.Losses(total=99.5),
            width=64,
            height=48,
        ),
        "out.png",
    )
    assert stream.getvalue().splitlines() == [
        "job: queued, position 2",
        "job: done in 2:05: 10 iterations, 12 evaluations, loss 99.5, 64x48 -> out.png",
    ]
    quiet = io.StringIO()
    silent = ProgressDisplay("job", 10, quiet, enabled=False)
    silent.on_event(pb.Queued(position=1))
    silent.on_event(progress(0))
    silent.finish(pb.Result(), "out.png")
    assert quiet.getvalue() == ""
