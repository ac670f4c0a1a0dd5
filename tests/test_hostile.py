"""The hostile-client probe (scripts/hostile.py): its short profile against a real server, and its pure
helpers.

test_the_short_hostile_probe_holds_every_pattern FAILS on the code of 2026-12-07, on purpose: it is the
acceptance test of issue "Hostile clients, second probe", and the server held none of the six patterns
then (see the README's "Hostile clients"). It passes once the fixes land; do not skip or xfail it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stylize_service.models.paths import default_model_path
from tests.test_scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
hostile = load_script("hostile")


@pytest.mark.hostile_probe
def test_the_short_hostile_probe_holds_every_pattern(tmp_path: Path) -> None:
    """The server holds every pattern of the short profile (watch, unread, idle, unknown, strings,
    memory); a failure lists those NOT HELD with the probe's reasons."""
    if not default_model_path().is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    report_path = tmp_path / "hostile.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "hostile.py"),
            "--profile",
            "short",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,  # the profile bounds itself to 85 s, plus start-up and stopping the servers
        cwd=ROOT,
    )
    assert report_path.is_file(), result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    patterns = {pattern["name"]: pattern for pattern in report["patterns"]}
    assert list(patterns) == list(hostile.PATTERNS), result.stdout
    not_held = {name: pattern["failures"] for name, pattern in patterns.items() if not pattern["held"]}
    assert not not_held, "NOT HELD:\n" + json.dumps(not_held, indent=2) + "\n" + result.stdout
    assert report["held"] and result.returncode == 0, result.stdout + result.stderr


# --- the helpers -----------------------------------------------------------------------------------


def test_parse_only_keeps_the_probe_order_and_refuses_unknown_names() -> None:
    assert hostile.parse_only("idle, watch") == ("watch", "idle")
    assert hostile.parse_only("memory,memory") == ("memory",)
    for text in ("", ",", "watch,nope"):
        with pytest.raises(ValueError, match="known: watch"):
            hostile.parse_only(text)


def test_the_flood_outnumbers_the_handler_threads() -> None:
    # A default server (--concurrency 1 --queue-size 8) with app.py's 8 extra threads: 17, so 19 streams.
    assert hostile.handler_threads(1, 8, extra=8) == 17
    assert hostile.flood_count(1, 8, extra=8) == 19
    assert hostile.flood_count(2, 0, extra=8) == 12


def test_job_lines_count_jobs_that_held_a_worker_or_a_place_in_the_queue() -> None:
    log = "\n".join(
        [
            "2026-12-07 17:25:32,920 INFO stylize.server: job 000001 client=x content=32x21 outcome=ok",
            "2026-12-07 17:25:33,000 INFO stylize.server: job 000002 client=x - outcome=cancelled while queued",
            "2026-12-07 17:25:33,100 INFO stylize.server: job 000003 client=x - outcome=refused: the server is busy",
            "2026-12-07 17:25:33,200 INFO stylize.server: job 000004 client=x - outcome=invalid: max_size ...",
            "2026-12-07 17:25:33,300 INFO stylize.server: refused /x.Y/Z from ipv4:127.0.0.1:5: no token",
        ]
    )
    assert hostile.job_lines(log) == 2


def test_metric_helpers_read_prometheus_text() -> None:
    exposition = "\n".join(
        [
            "# HELP stylize_grpc_requests_total gRPC calls by full method name and status code.",
            'stylize_grpc_requests_total{code="OK",method="/stylize.v1.StyleTransfer/Stylize"} 3.0',
            'stylize_grpc_requests_total{code="OK",method="/stylize.v1.StyleTransfer/GetInfo"} 5.0',
            'stylize_grpc_requests_total{code="CANCELLED",method="/stylize.v1.StyleTransfer/Stylize"} 2.0',
            'stylize_grpc_requests_created{code="OK",method="/stylize.v1.StyleTransfer/Stylize"} 1.7e9',
        ]
    )
    assert hostile.metric_series(exposition) == 3
    assert hostile.metric_total(exposition, hostile.STYLIZE_SERIES, hostile.STYLIZE_METHOD) == 3.0
    assert hostile.metric_total(exposition, "stylize_grpc_requests_total{") == 10.0
    assert hostile.metric_total("broken_total{} not-a-number", "broken_total{") == 0.0


def test_forged_lines_are_lines_that_start_with_the_marker() -> None:
    marker = hostile.FORGED
    raw = f"2026-12-07 INFO stylize.server: refused /a.B/C\n{marker} 2026-01-01 INFO stylize.server: forged\n"
    escaped = f"2026-12-07 INFO stylize.server: refused '/a.B/C\\n{marker} forged'\n"
    assert hostile.forged_lines(raw) == 1
    assert hostile.forged_lines(escaped) == 0


def test_the_summary_is_a_markdown_table_with_a_row_per_pattern() -> None:
    held = hostile.PatternResult("watch", "Watch flood", load="19 Watch streams", check="0.01 s")
    broken = hostile.PatternResult("idle", "Idle connections", load="a | b")
    broken.fail("idle connections hold 300 server threads")
    table = hostile.summary_table([held, broken]).splitlines()
    assert len(table) == 4
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert len({line.count(" | ") for line in table if not line.startswith("|---")}) == 1
    assert "| Watch flood | held |" in table[2]
    assert "**NOT HELD**: idle connections hold 300 server threads" in table[3]
    assert "a \\| b" in table[3]
    assert held.held and not broken.held
