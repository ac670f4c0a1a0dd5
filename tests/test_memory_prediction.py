"""The memory model against the measured peak RSS of real jobs, each in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stylize_service.models.paths import default_model_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark_memory.py"
IMAGES = ROOT.parent / "shared" / "images"


@pytest.mark.parametrize("size", [512, 768, 1024])
def test_predicted_peak_is_within_15_percent_of_the_measured_one(size: int) -> None:
    if not default_model_path().is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    if not (IMAGES / "tubingen.jpg").is_file():
        pytest.skip(f"the benchmark images are not at {IMAGES}")
    # One untiled single-stage job of one iteration, as scripts/benchmark_memory.py runs it.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "job", str(size), "0"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["tiles"] == 0
    assert row["predicted"] == pytest.approx(row["peak"], rel=0.15)
    # Released: back within max(idle + 600 MB, 1.5 x idle) once the job is done.
    assert row["after"] <= max(row["idle"] + 600 * 2**20, 1.5 * row["idle"])
