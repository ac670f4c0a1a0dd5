"""Masks in the bundled client: the CLI's --mask and --style-mask, the API's Style, and `stylize info`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stylize_service.client import cli
from stylize_service.client.api import StylizeClient
from stylize_service.client.request import Style, build_request
from stylize_service.server.app import StylizeServer
from tests.fakes import FakeEngine, encode, gradient, running_server


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine) -> Iterator[tuple[StylizeServer, str]]:
    with running_server(engine) as running:
        yield running


def half(width: int, height: int, left: bool) -> bytes:
    pixels = np.zeros((height, width), np.uint8)
    if left:
        pixels[:, : width // 2] = 255
    else:
        pixels[:, width // 2 :] = 255
    return encode(pixels)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.png" for name in ("content", "a", "b", "left", "right", "style_left")}
    paths["content"].write_bytes(encode(gradient(48, 32)))
    paths["a"].write_bytes(encode(gradient(32, 32, seed=1)))
    paths["b"].write_bytes(encode(gradient(40, 20, seed=2)))
    paths["left"].write_bytes(half(48, 32, left=True))
    paths["right"].write_bytes(half(96, 64, left=False))
    paths["style_left"].write_bytes(half(40, 20, left=True))
    return paths


def test_cli_sends_each_mask_with_the_style_it_follows(
    server: tuple[StylizeServer, str], engine: FakeEngine, files: dict[str, Path], tmp_path: Path
) -> None:
    argv = [
        str(files["content"]),
        *("--style", f"{files['a']}:2", "--mask", str(files["left"])),
        *(
            "--style",
            str(files["b"]),
            "--mask",
            str(files["right"]),
            "--style-mask",
            str(files["style_left"]),
        ),
        *("--server", server[1], "-o", str(tmp_path / "out.png"), "--max-size", "64", "--iterations", "2"),
    ]
    assert cli.main(argv) == cli.EXIT_OK
    first, second = engine.last_styles
    assert first.blend_weight == 2 and second.blend_weight == 0
    assert first.mask is not None and first.style_mask is None and second.style_mask is not None
    assert first.mask[:, :24].min() == 1 and first.mask[:, 24:].max() == 0  # left half white
    # A 96x64 mask, decoded shrunk to the job's max_size (64) like the content: right half white.
    assert second.mask is not None and second.mask.shape == (43, 64)
    assert second.mask[:, :30].max() < 0.01 and second.mask[:, 34:].min() > 0.99


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--mask", "{left}", "--style", "{a}"], "--mask must follow the --style"),
        (["--style", "{a}", "--mask", "{left}", "--mask", "{right}"], "has one already"),
        (["--style", "{a}", "--mask", "missing.png"], "no such file"),
    ],
)
def test_cli_refuses_a_mask_without_its_style(
    server: tuple[StylizeServer, str],
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    words: str,
) -> None:
    argv = [str(files["content"]), *(e.format(**{k: str(v) for k, v in files.items()}) for e in extra)]
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "--server", server[1]])
    assert caught.value.code == 2
    assert words in capsys.readouterr().err


def test_api_style_with_masks(
    server: tuple[StylizeServer, str], engine: FakeEngine, files: dict[str, Path]
) -> None:
    request = build_request(files["content"], [Style(files["a"], 1.0, mask=files["left"]), files["b"]])
    assert request.styles[0].mask == files["left"].read_bytes() and not request.styles[1].mask
    with StylizeClient(server[1]) as client:
        result = client.stylize(
            files["content"],
            [
                Style(files["a"], mask=files["left"]),
                Style(files["b"], mask=files["right"], style_mask=files["style_left"]),
            ],
            max_size=64,
            iterations=2,
        ).wait()
    assert result.width == 64
    assert all(style.mask is not None for style in engine.last_styles)


def test_cli_info_says_whether_masks_are_supported(
    server: tuple[StylizeServer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["info", "--server", server[1]]) == cli.EXIT_OK
    assert "style masks      yes" in capsys.readouterr().out
