"""The execution provider: --provider / STYLIZE_PROVIDER, its mapping to onnxruntime's providers, the
start-up checks of stylize-server, and a job on CUDA. Everything runs on the CPU; the CUDA checks skip,
saying why, where onnxruntime offers no CUDA provider or no GPU answers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stylize_service.models.paths import default_model_path
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server import main as server_main
from stylize_service.server.config import ConfigError, load_config
from stylize_service.server.engine import providers
from stylize_service.server.engine.engine import Engine
from stylize_service.server.engine.providers import CPU, CUDA, CUDA_OPTIONS
from stylize_service.server.engine.types import StyleSource, StylizeSettings
from stylize_service.server.readiness import wait_for_ready_file
from tests.fakes import LossRecorder, channel

CUDA_OFFERED = CUDA in ort.get_available_providers()
NO_CUDA_PROVIDER = (
    "onnxruntime offers no CUDAExecutionProvider here (the CPU package is installed; the gpu extra "
    "installs onnxruntime-gpu)"
)
LIVENESS = 60.0


# The setting


def test_provider_defaults_to_auto() -> None:
    assert load_config([], environ={}).provider == "auto"


def test_provider_from_the_variable_and_the_flag() -> None:
    assert load_config([], environ={"STYLIZE_PROVIDER": "CPU"}).provider == "cpu"
    assert load_config(["--provider", "cuda"], environ={"STYLIZE_PROVIDER": "cpu"}).provider == "cuda"


def test_unknown_provider_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=re.escape("--provider (STYLIZE_PROVIDER) must be auto, cpu, cuda")):
        load_config([], environ={"STYLIZE_PROVIDER": "gpu"})


# The choice as onnxruntime's provider list


@pytest.mark.parametrize(
    ("choice", "available", "expected"),
    [
        ("auto", [CPU], [CPU]),
        ("auto", ["TensorrtExecutionProvider", CUDA, CPU], [(CUDA, CUDA_OPTIONS), CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [(CUDA, CUDA_OPTIONS), CPU]),
    ],
)
def test_choice_to_providers(
    choice: str, available: list[str], expected: list[providers.ProviderSpec]
) -> None:
    assert providers.execution_providers(choice, available) == expected


def test_cuda_arena_grows_by_what_is_asked() -> None:
    # kSameAsRequested is what lets release_memory give the card's memory back after a job.
    (cuda, _) = providers.execution_providers("cuda", [CUDA, CPU])
    assert isinstance(cuda, tuple) and cuda[1]["arena_extend_strategy"] == "kSameAsRequested"


def test_cuda_without_the_provider_is_refused_naming_what_is_offered() -> None:
    with pytest.raises(providers.ProviderUnavailable, match=r"offers AzureExecutionProvider, CPU.*gpu extra"):
        providers.execution_providers("cuda", ["AzureExecutionProvider", CPU])


def test_not_started_lists_the_requested_providers_a_session_lacks() -> None:
    requested = providers.execution_providers("cuda", [CUDA, CPU])
    assert providers.not_started(requested, (CPU,)) == [CUDA]
    assert providers.not_started(requested, (CUDA, CPU)) == []


def test_the_cpu_engine_reports_the_cpu_provider(real_engine: Engine) -> None:
    assert real_engine.info.providers == (CPU,)


# stylize-server at start


def test_server_refuses_cuda_when_onnxruntime_lacks_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before listening or loading anything: exit 2, naming the setting and what onnxruntime offers."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setenv("STYLIZE_PROVIDER", "cuda")
    assert server_main.main(["--host", "127.0.0.1", "--port", "0"]) == server_main.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("stylize-server: error: --provider (STYLIZE_PROVIDER) is cuda"), err
    assert "offers CPUExecutionProvider" in err and "gpu extra" in err


def test_server_on_auto_serves_on_what_started_and_says_so(tmp_path: Path) -> None:
    """Without CUDA in onnxruntime (here): the CPU. With onnxruntime-gpu but no GPU answering: the CPU,
    after a warning. With a GPU: CUDA first. The log line and GetInfo name the same providers."""
    if not default_model_path().is_file():
        pytest.skip("the model is not built; run `bash scripts/setup.sh`")
    ready, log_path = tmp_path / "ready.json", tmp_path / "server.log"
    command = [sys.executable, "-m", "stylize_service.server.main", "--host", "127.0.0.1", "--port", "0"]
    env = {**_environ(), "STYLIZE_PROVIDER": "auto"}
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [*command, "--ready-file", str(ready), "--state-dir", str(tmp_path / "state")],
            stderr=log_file,
            text=True,
            env=env,
        )
    try:
        address = wait_for_ready_file(ready, process, timeout=LIVENESS * 4).address
        with channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
            in_use = list(
                pb_grpc.StyleTransferStub(ch).GetInfo(pb.GetInfoRequest(), timeout=LIVENESS).model.providers
            )
        process.send_signal(signal.SIGTERM)
        assert process.wait(LIVENESS) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert f"execution providers {', '.join(in_use)} (--provider auto)" in text, text
    if not CUDA_OFFERED:
        assert in_use == [CPU]
    elif CUDA not in in_use:
        assert in_use == [CPU] and "could not start CUDAExecutionProvider" in text, text
    else:
        assert in_use == [CUDA, CPU]


def _environ() -> dict[str, str]:
    """This process's environment without the server's settings, so that only the test's apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STYLIZE_")}


# A job on CUDA


def test_a_job_on_cuda_matches_the_cpu(real_engine: Engine) -> None:
    """A tiny job on the GPU: the sessions run on CUDA, the first loss is the CPU's (TF32 convolutions
    may differ in the third digit), the loss falls, and the job's memory release (which shrinks the
    card's arena too) goes through."""
    if not CUDA_OFFERED:
        pytest.skip(NO_CUDA_PROVIDER)
    cuda_engine = Engine(default_model_path(), providers=providers.execution_providers("cuda"))
    if CUDA not in cuda_engine.info.providers:
        pytest.skip("onnxruntime offers CUDA but could not start it: no GPU visible to this process")
    assert cuda_engine.info.providers[0] == CUDA
    rng = np.random.default_rng(0)
    content = rng.uniform(0, 1, (48, 64, 3)).astype(np.float32)
    style = [StyleSource(rng.uniform(0, 1, (40, 40, 3)).astype(np.float32), 1.0)]
    settings = StylizeSettings(max_size=64, iterations=6)
    on_cuda, on_cpu = LossRecorder(), LossRecorder()
    result = cuda_engine.stylize(content, style, settings, on_cuda)
    reference = real_engine.stylize(content, style, settings, on_cpu)
    assert result.image.shape == reference.image.shape == (48, 64, 3)
    assert on_cuda.totals[0] == pytest.approx(on_cpu.totals[0], rel=1e-2)
    assert on_cuda.totals[-1] < on_cuda.totals[0]
    # A second job on the same sessions after the release: the shrunk arenas are usable again.
    again = LossRecorder()
    cuda_engine.stylize(content, style, settings, again)
    assert again.totals[0] == pytest.approx(on_cuda.totals[0], rel=1e-3)
