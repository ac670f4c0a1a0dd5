"""The newcomer's scripts: shell syntax, the health check, and the bundled samples' licences."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = [
    ROOT / "scripts" / "setup.sh",
    ROOT / "scripts" / "demo.sh",
    ROOT / "scripts" / "test.sh",
    ROOT / ".ci" / "run",
]
SAMPLES = ROOT / "client" / "samples"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shell_script_syntax(script: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert script.is_file()
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in text
    assert "bash scripts/test.sh" in text
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in (ROOT / "README.md").read_text()


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_healthcheck_serving(health_server) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert load_script("healthcheck").main(["--address", address, "--quiet"]) == 0


def test_healthcheck_not_serving(health_server) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert load_script("healthcheck").main(["--address", address, "--quiet", "--timeout", "1"]) == 1


def test_healthcheck_nobody_listening() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Bound but not listening: the connection is refused.
    module = load_script("healthcheck")
    assert module.main(["--address", f"127.0.0.1:{port}", "--quiet", "--timeout", "1"]) == 1


def test_healthcheck_runs_as_a_script(health_server) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "healthcheck.py"), "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_every_sample_has_a_recorded_licence() -> None:
    licence = (SAMPLES / "LICENSE.md").read_text()
    images = [p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".webp")]
    assert len(images) >= 2, "expected a content and a style sample"
    for image in images:
        assert f"`{image.name}`" in licence, f"{image.name} has no entry in client/samples/LICENSE.md"
        assert image.stat().st_size < 400 * 1024, f"{image.name} is larger than 400 KiB"
        with Image.open(image) as im:
            assert im.mode == ("L" if "_mask_" in image.name else "RGB")  # masks are greyscale
            assert 256 <= max(im.size) <= 1024


def test_mosaic_sample_generator_is_deterministic() -> None:
    module = load_script("make_mosaic_sample")
    a = module.paint(size=96, seed=3)
    assert a.size == (96, 96) and a.tobytes() == module.paint(size=96, seed=3).tobytes()
    assert module.paint(size=96, seed=4).tobytes() != a.tobytes()


def test_bundled_masks_are_the_generators_and_cover_the_coffee_sample_once(tmp_path: Path) -> None:
    module = load_script("make_mask_samples")
    assert module.main(["--out", str(tmp_path)]) == 0
    with Image.open(SAMPLES / "coffee.png") as content:
        size = content.size
    total = np.zeros((size[1], size[0]))
    for name in ("coffee_mask_cup.png", "coffee_mask_table.png"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes()
        with Image.open(SAMPLES / name) as mask:
            assert mask.size == size
            values = np.asarray(mask, np.float64) / 255
        assert 0.2 < values.mean() < 0.8
        total += values
    np.testing.assert_allclose(total, 1.0, atol=1 / 255 + 1e-9)


def test_style_sample_generator_is_deterministic(tmp_path: Path) -> None:
    module = load_script("make_style_sample")
    a = module.paint(size=96, seed=3)
    b = module.paint(size=96, seed=3)
    assert a.size == (96, 96)
    assert a.tobytes() == b.tobytes()
    assert module.paint(size=96, seed=4).tobytes() != a.tobytes()


@pytest.mark.parametrize(
    "script",
    sorted(p for p in (ROOT / "scripts").glob("*.py") if "argparse" in p.read_text()),
    ids=lambda p: p.name,
)
def test_python_script_help(script: Path) -> None:
    """Every Python script imports (its imports of the package still resolve) and explains itself."""
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_readme_links_to_files_that_exist() -> None:
    text = (ROOT / "README.md").read_text()
    local = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    assert any(t.startswith("docs/images/") for t in local)
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_schedule_cost_weighs_evaluations_and_steps_by_their_stage_pixels() -> None:
    # scripts/benchmark_schedules.py: a 256 px stage's work counts a quarter of a 512 px one's; an
    # iteration's L-BFGS-B step adds step_cost evaluations of its stage.
    schedules = load_script("benchmark_schedules")

    def point(stage: int, side: int, iteration: int, evaluations: int) -> dict:
        return {
            "stage": stage,
            "width": side,
            "height": side,
            "iteration": iteration,
            "evaluations": evaluations,
        }

    points = [point(0, 256, 0, 1), point(0, 256, 4, 6), point(1, 512, 4, 7), point(1, 512, 6, 10)]
    without = [p["cost"] for p in schedules.with_cost(points)]
    assert without == pytest.approx([0.25, 1.5, 2.5, 5.5])
    steps = [p["cost"] for p in schedules.with_cost(points, step_cost=0.5)]
    assert steps == pytest.approx([0.25, 1.5 + 0.5 * 4 / 4, 3.0, 6.0 + 0.5 * 2])
    assert schedules.parse_step_costs(["10=0.121", "20=0.223"]) == {10: 0.121, 20: 0.223}
    assert schedules.Schedule.parse("512/m20").history == 20
