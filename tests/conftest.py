"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from stylize_service.models.paths import default_model_path

if TYPE_CHECKING:
    from stylize_service.server.engine.engine import Engine


@pytest.fixture(scope="session")
def real_engine() -> Engine:
    """One engine over the built ONNX VGG16 for the whole run (its compiled sessions are reused).
    Skips only when the model has not been built (`bash scripts/setup.sh` builds it; CI always does)."""
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"the model is not built ({path}); run `bash scripts/setup.sh`")
    from stylize_service.server.engine.engine import Engine

    return Engine(path, intra_op_threads=2)


def pytest_configure(config: pytest.Config) -> None:
    # Not a skip: `-m "not hostile_probe"` deselects it locally, CI runs it.
    config.addinivalue_line(
        "markers",
        "hostile_probe: scripts/hostile.py's short profile against a real server; fails if the server "
        "does not hold every hostile-client pattern",
    )


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real, empty redis-server of the test's own (tests/redis_server.py); skips with what to install
    where it is absent, fails under CI."""
    from tests.redis_server import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url
