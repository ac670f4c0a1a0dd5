"""Server configuration from flags and STYLIZE_* variables, and the start-up checks of stylize-server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stylize_service.server import main as server_main
from stylize_service.server.config import ConfigError, default_concurrency, load_config


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 1), (5, 1), (8, 2), (16, 4), (64, 16)])
def test_default_concurrency_is_one_job_per_four_cores(cores: int, expected: int) -> None:
    assert default_concurrency(cores) == expected


def test_defaults() -> None:
    config = load_config([], environ={})
    assert (config.host, config.port, config.max_message_mb, config.queue_size) == ("0.0.0.0", 50051, 64, 8)
    assert config.max_message_bytes == 64 * 1024 * 1024
    assert config.concurrency == default_concurrency()
    assert config.model_path is None and config.threads is None


def test_environment_and_flags() -> None:
    env = {
        "STYLIZE_HOST": "127.0.0.1",
        "STYLIZE_PORT": "6000",
        "STYLIZE_MODEL": "/models/x.onnx",
        "STYLIZE_MAX_MESSAGE_MB": "8",
        "STYLIZE_MAX_PIXELS": "1000000",
        "STYLIZE_CONCURRENCY": "3",
        "STYLIZE_QUEUE_SIZE": "0",
        "STYLIZE_THREADS": "2",
        "STYLIZE_GRACE_SECONDS": "1.5",
    }
    config = load_config([], environ=env)
    assert config.address == "127.0.0.1:6000"
    assert config.resolved_model_path == Path("/models/x.onnx")
    assert (config.max_message_bytes, config.max_pixels) == (8 * 1024 * 1024, 1_000_000)
    assert (config.concurrency, config.queue_size, config.intra_op_threads, config.grace_seconds) == (
        3,
        0,
        2,
        1.5,
    )
    assert load_config(["--port", "7000", "--concurrency", "1"], environ=env).port == 7000  # flags win


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"STYLIZE_PORT": "http"}, "STYLIZE_PORT: expected int, got 'http'"),
        (["--port", "70000"], {}, "port must be 0..65535"),
        (["--concurrency", "0"], {}, "concurrency must be >= 1"),
        (["--max-message-mb", "0"], {}, "max message size must be > 0"),
    ],
)
def test_bad_settings_are_reported(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(argv, environ=env)


def test_missing_model_exits_with_set_up_instructions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = server_main.main(["--model", str(tmp_path / "missing.onnx"), "--port", "0"])
    assert code == server_main.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "missing.onnx does not exist" in err and "bash scripts/setup.sh" in err


def test_bad_flag_value_exits_with_usage_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_main.main(["--queue-size", "-1"]) == server_main.EXIT_CONFIG
    assert "queue size must be >= 0" in capsys.readouterr().err
