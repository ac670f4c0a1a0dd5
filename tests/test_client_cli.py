"""The bundled client: the `stylize` CLI and the StylizeClient API, against an in-process server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from stylize_service.client import cli
from stylize_service.client.api import StylizeClient, StylizeError
from stylize_service.client.display import ProgressDisplay
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.server.app import StylizeServer
from tests.fakes import FakeEngine, encode, gradient, running_server


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine) -> Iterator[tuple[StylizeServer, str]]:
    with running_server(engine) as running:
        yield running


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "content": tmp_path / "in" / "photo.png",
        "other": tmp_path / "in" / "street.jpg",
        "style": tmp_path / "style.png",
    }
    paths["content"].parent.mkdir()
    paths["content"].write_bytes(encode(gradient(48, 32)))
    paths["other"].write_bytes(encode(gradient(30, 40, seed=2), "JPEG"))
    paths["style"].write_bytes(encode(gradient(32, 32, seed=1)))
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SMALL = ["--max-size", "64", "--iterations", "6"]


def test_cli_writes_the_result_frames_and_animation(
    server: tuple[StylizeServer, str],
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, frames, anim = tmp_path / "out" / "result.png", tmp_path / "frames", tmp_path / "anim.gif"
    code = cli.main(
        [
            *(
                str(images["content"]),
                "--style",
                f"{images['style']}:2",
                "--server",
                server[1],
                "-o",
                str(out),
            ),
            *("--frames-dir", str(frames), "--animation", str(anim), "--frame-every", "2", *SMALL),
        ]
    )
    assert code == cli.EXIT_OK, capsys.readouterr().err
    with Image.open(out) as result:
        assert (result.format, result.size) == ("PNG", (64, 43))
    assert sorted(p.name for p in frames.iterdir()) == [
        "frame-000002.jpg",
        "frame-000004.jpg",
        "frame-000006.jpg",
    ]
    with Image.open(anim) as animation:
        assert animation.format == "GIF" and animation.n_frames == 4  # three frames and the result
    err = capsys.readouterr().err
    assert "loss" in err and "done" in err  # plain progress lines: stderr is not a terminal here


def test_cli_output_format_follows_the_suffix_and_webp_animation(
    server: tuple[StylizeServer, str], images: dict[str, Path], tmp_path: Path
) -> None:
    out, anim = tmp_path / "result.jpg", tmp_path / "anim.webp"
    code = cli.main(
        [
            str(images["content"]),
            "-s",
            str(images["style"]),
            "--server",
            server[1],
            "-o",
            str(out),
            "-q",
            "--animation",
            str(anim),
            *SMALL,
        ]
    )
    assert code == cli.EXIT_OK
    with Image.open(out) as result:
        assert result.format == "JPEG"
    with Image.open(anim) as animation:
        assert animation.format == "WEBP" and animation.n_frames >= 2  # --frame-every was implied


def test_cli_batch_over_a_folder(
    server: tuple[StylizeServer, str], images: dict[str, Path], tmp_path: Path
) -> None:
    out_dir = tmp_path / "results"
    code = cli.main(
        [
            *(str(images["content"].parent), "-s", str(images["style"]), "--server", server[1], "-q"),
            *("--output-dir", str(out_dir), "--frames-dir", str(tmp_path / "frames"), *SMALL),
        ]
    )
    assert code == cli.EXIT_OK
    assert sorted(p.name for p in out_dir.iterdir()) == ["photo-stylized.png", "street-stylized.png"]
    with Image.open(out_dir / "street-stylized.png") as street:
        assert street.size == (48, 64)  # portrait 30x40, longest side 64
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["photo", "street"]


def test_cli_unreachable_server_exit_code(images: dict[str, Path]) -> None:
    completed = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "stylize_service.client.cli",
                str(images["content"]),
                "-s",
                str(images["style"]),
            ),
            *("--server", f"127.0.0.1:{free_port()}", "-q", "-o", str(images["content"].with_name("x.png"))),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == cli.EXIT_UNAVAILABLE, completed.stderr
    assert "cannot reach the stylize server" in completed.stderr


def test_cli_server_refusal_is_a_usage_error(
    server: tuple[StylizeServer, str], images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [str(images["content"]), "-s", str(images["style"]), "--server", server[1], "--max-size", "0"]
    )
    assert code == cli.EXIT_USAGE
    assert "options.max_size must be between 16 and 4096, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{content}"], "at least one --style is required"),
        (["{content}", "-s", "{style}:heavy"], "WEIGHT must be a number"),
        (["missing.png", "-s", "{style}"], "no such file or folder"),
        (["{content}", "-s", "{style}", "--style-layers", "relu1_1:x"], "must be a number"),
        (["{content}", "-s", "{style}", "-o", "out.tiff"], "cannot tell the format"),
        (["{content}", "{content}", "-s", "{style}", "-o", "a.png"], "use --output-dir"),
        (["{content}", "-s", "{style}", "--iterations", "many"], "invalid int value"),
        (["{content}", "-s", "{style}", "--pooling", "median"], "invalid choice"),
    ],
)
def test_cli_bad_arguments_exit_2(
    images: dict[str, Path], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(content=images["content"], style=images["style"]) for a in args]
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cli_interrupt_cancels_the_job_and_exits_130(
    server: tuple[StylizeServer, str],
    engine: FakeEngine,
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine.seconds_per_iteration = 0.05  # 1000 iterations: nearly a minute unless cancelled

    def interrupt(self: ProgressDisplay, event: object) -> None:
        if isinstance(event, pb.Progress):
            raise KeyboardInterrupt  # as Ctrl-C would, in the main thread, mid-stream

    monkeypatch.setattr(ProgressDisplay, "on_event", interrupt)
    out = tmp_path / "never.png"
    argv = [str(images["content"]), "-s", str(images["style"]), "--server", server[1], "-o", str(out)]
    code = cli.main([*argv, "--iterations", "1000"])
    assert code == cli.EXIT_INTERRUPTED and not out.exists()
    assert server[0].scheduler.wait_idle(timeout=10)
    assert engine.cancelled == 1


def test_cli_info(server: tuple[StylizeServer, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--server", server[1]]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert "fake-vgg16" in text and "relu4_2:1" in text and "1 at a time, 2 queued" in text
    limits = server[0].scheduler
    assert f"{limits.max_per_client} per client" in text
    assert f"{(limits.memory_capacity or 0) / 2**20:.0f} MiB for jobs" in text
    assert "0 running, 0 queued" in text and "layer choice(s)" in text
    assert cli.main(["info", "--server", server[1], "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "fake-vgg16"
    assert cli.main(["--info", "--server", server[1]]) == cli.EXIT_OK


def test_api_events_result_and_options(server: tuple[StylizeServer, str], images: dict[str, Path]) -> None:
    events: list[object] = []
    with StylizeClient(server[1], timeout=30) as client:
        result = client.run(
            images["content"],
            [(images["style"], 1.0), images["style"].read_bytes()],
            on_event=events.append,
            max_size=32,
            iterations=3,
            frame_every=1,
            pooling="avg",
            style_layers={"relu1_1": 1.0, "relu2_1": 0.5},
            output_format="jpg",
        )
        assert isinstance(events[-1], pb.Result) and events[-1] is result
        assert [e.iteration for e in events if isinstance(e, pb.Frame)] == [1, 2, 3]
        assert (result.width, result.mime_type) == (32, "image/jpeg")
        assert set(next(e for e in events if isinstance(e, pb.Progress)).losses.style_per_layer) == {
            "relu1_1",
            "relu2_1",
        }
        with pytest.raises(StylizeError) as caught:
            client.run(images["content"], [images["style"]], max_size=1)
        assert caught.value.code.name == "INVALID_ARGUMENT" and "options.max_size" in caught.value.details
        with pytest.raises(TypeError, match="unknown option"):
            client.stylize(images["content"], [images["style"]], max_sise=3)


def test_cli_implied_frame_every_and_bar_follow_the_servers_default_iterations(
    server: tuple[StylizeServer, str],
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_info = StylizeClient.info

    def info(self: StylizeClient) -> pb.GetInfoResponse:
        response = real_info(self)
        response.defaults.iterations = 1000  # what the CLI believes; the server still runs its own 500
        return response

    monkeypatch.setattr(StylizeClient, "info", info)
    frames = tmp_path / "frames"
    argv = [str(images["content"]), "-s", str(images["style"]), "--server", server[1], "--max-size", "32"]
    assert cli.main([*argv, "-o", str(tmp_path / "out.png"), "--frames-dir", str(frames)]) == cli.EXIT_OK
    # 1000 // 50 = a frame every 20 iterations of the 500 run: 25 frames (a fixed 500 would give 50).
    assert len(list(frames.iterdir())) == 25
    assert "500/1000" in capsys.readouterr().err  # the bar is sized by GetInfo too

    def no_info(self: StylizeClient) -> pb.GetInfoResponse:
        raise AssertionError("GetInfo is not needed when --iterations is given")

    monkeypatch.setattr(StylizeClient, "info", no_info)
    out = tmp_path / "given.png"
    assert cli.main([*argv, "-n", "100", "-q", "-o", str(out), "--frames-dir", str(tmp_path / "f2")]) == 0
    assert len(list((tmp_path / "f2").iterdir())) == 50  # every 100 // 50 = 2 iterations


def test_cli_names_results_by_their_format(
    server: tuple[StylizeServer, str], images: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = [str(images["content"]), "-s", str(images["style"]), "--server", server[1], "-q", *SMALL]
    for output_format in ("jpeg", "webp", "png"):
        assert cli.main([*argv, "--output-dir", str(out), "--output-format", output_format]) == cli.EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [
        "photo-stylized.jpg",
        "photo-stylized.png",
        "photo-stylized.webp",
    ]
    with Image.open(out / "photo-stylized.jpg") as result:
        assert result.format == "JPEG"
