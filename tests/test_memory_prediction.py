"""The memory model against the measured peak RSS of real jobs, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from stylize_service.models.paths import default_model_path
from tests.fakes import gradient

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark_memory.py"
IMAGES = ROOT.parent / "shared" / "images"


@pytest.fixture(scope="module")
def benchmark_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared benchmark pair where it is, else stand-ins of the same sizes (the memory depends on the
    images' sizes, not on what they show), so that the check runs everywhere, CI included."""
    if (IMAGES / "tubingen.jpg").is_file() and (IMAGES / "starry_night.jpg").is_file():
        return IMAGES
    folder = tmp_path_factory.mktemp("benchmark-images")
    for name, (width, height), seed in (
        ("tubingen.jpg", (1024, 768), 1),
        ("starry_night.jpg", (1024, 640), 2),
    ):
        pixels = gradient(width, height, seed=seed)
        Image.fromarray(pixels).save(folder / name, quality=90)
    return folder


@pytest.mark.parametrize("size", [512, 768, 1024])
def test_predicted_peak_is_within_15_percent_of_the_measured_one(size: int, benchmark_images: Path) -> None:
    if not default_model_path().is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    # One untiled single-stage job of one iteration, as scripts/benchmark_memory.py runs it.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "job", str(size), "0"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
        env={**os.environ, "STYLIZE_BENCHMARK_IMAGES": str(benchmark_images)},
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["tiles"] == 0
    assert row["predicted"] == pytest.approx(row["peak"], rel=0.15)
    # Released: back within max(idle + 600 MB, 1.5 x idle) once the job is done.
    assert row["after"] <= max(row["idle"] + 600 * 2**20, 1.5 * row["idle"])


@pytest.mark.parametrize("scheme", ["256:3", "128:5"])
def test_a_tiled_evaluation_s_predicted_peak_is_near_the_measured_one(
    scheme: str, benchmark_images: Path
) -> None:
    # One evaluation of 1024 px in a tile scheme, its sessions run for the first time, as a job's are.
    if not default_model_path().is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    from stylize_service.server.engine import memory
    from stylize_service.server.engine.plan import layer_choice
    from stylize_service.server.engine.tile_layout import TileScheme
    from stylize_service.server.engine.types import StylizeSettings

    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "scheme", "1024", scheme],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
        env={**os.environ, "STYLIZE_BENCHMARK_IMAGES": str(benchmark_images)},
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    tile, blocks = map(int, scheme.split(":"))
    choice = layer_choice(StylizeSettings(), 1)
    predicted = memory.scheme_cost(
        row["height"], row["width"], TileScheme.by_block(tile, blocks), choice
    ).evaluation
    measured = row["peak"] - row["idle"]
    # Never much under (admission relies on it); over by at most a third at this size, where the fixed
    # costs weigh most.
    assert 0.9 * measured <= predicted <= 1.33 * measured, (predicted / 2**20, measured / 2**20)
