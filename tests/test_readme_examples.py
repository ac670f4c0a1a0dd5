"""The README's Python API example runs as written, against an in-process server (fake engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fakes import FakeEngine, image_bytes, running_server
from tests.markdown import README, section


def python_api_example() -> str:
    match = re.search(r"```python\n(.*?)```", section(README, "## The Python API"), re.S)
    assert match, "the README's Python API section has no python code block"
    return match.group(1)


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = python_api_example()
    assert "localhost:50051" in code
    for name in ("photo.jpg", "painting.jpg", "a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(image_bytes(48, 32, fmt="JPEG", seed=len(name)))
    monkeypatch.chdir(tmp_path)
    with running_server(FakeEngine()) as (_, address):
        exec(compile(code.replace("localhost:50051", address), "README.md", "exec"), {})
    assert (tmp_path / "result.png").stat().st_size > 0
    assert (tmp_path / "blend.png").stat().st_size > 0
    assert list(tmp_path.glob("frame-*.jpg"))
