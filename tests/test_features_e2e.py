"""Every stylization option through the RPC and the CLI, on the real engine (ONNX VGG16) at small sizes.

The checks use what each option must change observably: the stages and sizes that Progress reports, the
per-layer losses at iteration 0 (the initial image, before any optimisation), and the result's pixels.
Skipped only when the model has not been built (`bash scripts/setup.sh` builds it; CI always does).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from stylize_service.client import cli
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb
from stylize_service.protos.stylize.v1 import stylize_pb2_grpc as pb_grpc
from stylize_service.server.servicer import EngineLike
from tests.fakes import channel, encode, running_server

DEADLINE = 120.0


def coloured(width: int, height: int, tint: tuple[float, float, float], seed: int) -> np.ndarray:
    """A tinted image with structure at several scales, uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = 0.5 + 0.25 * np.sin(9 * x + 4 * y)[..., None] + 0.15 * rng.standard_normal((height, width, 1))
    return (np.clip(base * np.asarray(tint), 0, 1) * 255).astype(np.uint8)


CONTENT = encode(coloured(96, 64, (1.0, 0.55, 0.3), seed=1))  # warm, landscape
STYLE_A = encode(coloured(64, 64, (0.3, 0.5, 1.0), seed=2))  # cool
STYLE_B = encode(coloured(80, 48, (0.4, 1.0, 0.4), seed=3))  # green


@pytest.fixture(scope="module")
def address(real_engine: EngineLike) -> Iterator[str]:
    with running_server(real_engine) as (_, running_address):
        yield running_address


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.StyleTransferStub]:
    with channel(address) as ch:
        yield pb_grpc.StyleTransferStub(ch)


def run(
    stub: pb_grpc.StyleTransferStub, styles: list[pb.StyleImage] | None = None, **options: object
) -> tuple[list[pb.Progress], pb.Result]:
    request = pb.StylizeRequest(
        content_image=CONTENT,
        styles=styles if styles is not None else [pb.StyleImage(image=STYLE_A)],
        options=pb.StylizeOptions(**{"max_size": 48, "iterations": 4, **options}),  # type: ignore[arg-type]
    )
    events = [r for r in stub.Stylize(request, timeout=DEADLINE)]
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert events[-1].WhichOneof("event") == "result"
    return progress, events[-1].result


def first_losses(stub: pb_grpc.StyleTransferStub, **kwargs: object) -> pb.Losses:
    progress, _ = run(stub, iterations=1, **kwargs)
    assert progress[0].iteration == 0
    return progress[0].losses


def pixels(result: pb.Result) -> np.ndarray:
    with Image.open(io.BytesIO(result.image)) as image:
        return np.asarray(image.convert("RGB"), np.float64) / 255


def chroma(rgb: np.ndarray) -> np.ndarray:
    """The I and Q channels of YIQ: colour without luminance."""
    matrix = np.array([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    return rgb @ matrix.T


def content_at(size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(CONTENT)) as image:
        return np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), np.float64) / 255


# --- multiscale ------------------------------------------------------------------------------------


def test_multiscale_reports_each_stage_and_its_size(stub: pb_grpc.StyleTransferStub) -> None:
    progress, result = run(stub, min_size=24, iterations=6)
    assert {p.stages for p in progress} == {2}
    sizes = {p.stage: (p.width, p.height) for p in progress}
    assert sizes == {0: (24, 16), 1: (48, 32)}
    assert [p.stage for p in progress] == sorted(p.stage for p in progress)  # coarse to fine
    assert max(p.iteration for p in progress) == result.iterations == 6
    assert (result.width, result.height) == (48, 32)


def test_min_size_equal_to_max_size_is_a_single_stage(stub: pb_grpc.StyleTransferStub) -> None:
    progress, _ = run(stub, min_size=48)
    assert {(p.stage, p.stages, p.width) for p in progress} == {(0, 1, 48)}


# --- colour ----------------------------------------------------------------------------------------


def test_colour_modes_style_luminance_histogram(stub: pb_grpc.StyleTransferStub) -> None:
    results = {
        mode: pixels(run(stub, color_mode=mode, iterations=15, init=pb.INIT_NOISE)[1])
        for mode in (pb.COLOR_MODE_STYLE, pb.COLOR_MODE_LUMINANCE, pb.COLOR_MODE_HISTOGRAM)
    }
    content = content_at((48, 32))
    chroma_error = {mode: np.abs(chroma(image) - chroma(content)).mean() for mode, image in results.items()}
    # Luminance-only transfer keeps the content's colours exactly (up to 8-bit rounding).
    assert chroma_error[pb.COLOR_MODE_LUMINANCE] < 0.01
    # The style's own (cool) colours pull the image away from the warm content ...
    assert chroma_error[pb.COLOR_MODE_STYLE] > 3 * chroma_error[pb.COLOR_MODE_LUMINANCE]
    # ... while a style recoloured to the content's histogram leaves the result's mean colour warm.
    mean_red_minus_blue = {mode: (img[..., 0] - img[..., 2]).mean() for mode, img in results.items()}
    assert mean_red_minus_blue[pb.COLOR_MODE_HISTOGRAM] > 0.1 > mean_red_minus_blue[pb.COLOR_MODE_STYLE]


def test_preserve_colors_is_luminance_transfer(stub: pb_grpc.StyleTransferStub) -> None:
    _, shorthand = run(stub, preserve_colors=True)
    _, explicit = run(stub, color_mode=pb.COLOR_MODE_LUMINANCE)
    assert shorthand.image == explicit.image


# --- styles: blending and scale ----------------------------------------------------------------------


def test_blend_weights_blend_the_style_grams(stub: pb_grpc.StyleTransferStub) -> None:
    only_a = first_losses(stub, init=pb.INIT_NOISE)
    only_b = first_losses(stub, styles=[pb.StyleImage(image=STYLE_B)], init=pb.INIT_NOISE)
    a_weighted_fully = first_losses(
        stub,
        styles=[pb.StyleImage(image=STYLE_A, blend_weight=2), pb.StyleImage(image=STYLE_B, blend_weight=0)],
        init=pb.INIT_NOISE,
    )
    assert a_weighted_fully.style == pytest.approx(only_a.style, rel=1e-4)
    half = first_losses(
        stub,
        styles=[pb.StyleImage(image=STYLE_A, blend_weight=1), pb.StyleImage(image=STYLE_B, blend_weight=1)],
        init=pb.INIT_NOISE,
    )
    # Blending Grams is not averaging losses: the blend differs from both styles.
    assert half.style != pytest.approx(only_a.style, rel=1e-3)
    assert half.style != pytest.approx(only_b.style, rel=1e-3)


def test_style_scale_resizes_the_style_images(stub: pb_grpc.StyleTransferStub) -> None:
    normal = first_losses(stub, init=pb.INIT_NOISE)
    small = first_losses(stub, init=pb.INIT_NOISE, style_scale=0.5)
    large = first_losses(stub, init=pb.INIT_NOISE, style_scale=2.0)
    assert len({round(normal.style, 6), round(small.style, 6), round(large.style, 6)}) == 3


# --- init and reproducibility ------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_output_through_the_rpc(stub: pb_grpc.StyleTransferStub) -> None:
    _, first = run(stub, init=pb.INIT_NOISE, seed=11, min_size=24, iterations=5)
    _, again = run(stub, init=pb.INIT_NOISE, seed=11, min_size=24, iterations=5)
    _, other = run(stub, init=pb.INIT_NOISE, seed=12, min_size=24, iterations=5)
    assert first.image == again.image
    assert first.image != other.image


def test_init_content_noise_and_image(stub: pb_grpc.StyleTransferStub) -> None:
    from_content = first_losses(stub, init=pb.INIT_CONTENT)
    from_noise = first_losses(stub, init=pb.INIT_NOISE)
    from_style = first_losses(stub, init=pb.INIT_IMAGE, init_image=STYLE_A)
    assert from_content.content == 0  # the initial image is the content image itself
    assert from_noise.content > 0 and from_style.content > 0
    assert from_style.content != pytest.approx(from_noise.content, rel=1e-3)


# --- layers and pooling -----------------------------------------------------------------------------


def test_per_layer_weights_scale_their_terms(stub: pb_grpc.StyleTransferStub) -> None:
    def layers(**weights: float) -> list[pb.LayerWeight]:
        return [pb.LayerWeight(layer=name, weight=weight) for name, weight in weights.items()]

    plain = first_losses(stub, init=pb.INIT_NOISE, style_layers=layers(relu1_1=1, relu3_1=1))
    weighted = first_losses(
        stub,
        init=pb.INIT_NOISE,
        style_layers=layers(relu1_1=1, relu3_1=3),
        content_layers=layers(relu2_2=1, relu5_2=0.5),
    )
    assert set(weighted.style_per_layer) == {"relu1_1", "relu3_1"}
    assert set(weighted.content_per_layer) == {"relu2_2", "relu5_2"}
    assert weighted.style_per_layer["relu1_1"] == pytest.approx(plain.style_per_layer["relu1_1"], rel=1e-5)
    assert weighted.style_per_layer["relu3_1"] == pytest.approx(
        3 * plain.style_per_layer["relu3_1"], rel=1e-5
    )
    assert weighted.style == pytest.approx(sum(weighted.style_per_layer.values()), rel=1e-5)


def test_average_pooling_changes_only_layers_after_a_pool(stub: pb_grpc.StyleTransferStub) -> None:
    max_pool = first_losses(stub, init=pb.INIT_NOISE, pooling=pb.POOLING_MAX)
    avg_pool = first_losses(stub, init=pb.INIT_NOISE, pooling=pb.POOLING_AVG)
    # relu1_1 comes before the first pooling layer, so its term cannot depend on the pooling.
    assert avg_pool.style_per_layer["relu1_1"] == pytest.approx(max_pool.style_per_layer["relu1_1"], rel=1e-5)
    for layer in ("relu2_1", "relu3_1", "relu4_1", "relu5_1"):
        assert avg_pool.style_per_layer[layer] != pytest.approx(max_pool.style_per_layer[layer], rel=1e-3)


def test_unknown_layer_names_the_field(stub: pb_grpc.StyleTransferStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        run(stub, style_layers=[pb.LayerWeight(layer="relu9_9")])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "style_layers" in caught.value.details()


# --- the CLI over the real engine --------------------------------------------------------------------


def test_cli_options_reach_the_engine(address: str, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    for name in ("a", "b"):
        (tmp_path / "photos" / f"{name}.png").write_bytes(CONTENT)
    (tmp_path / "s1.png").write_bytes(STYLE_A)
    (tmp_path / "s2.png").write_bytes(STYLE_B)
    flags = [
        *("--server", address, "-q", "--max-size", "40", "--min-size", "20", "-n", "4"),
        *("-s", f"{tmp_path / 's1.png'}:0.7", "-s", f"{tmp_path / 's2.png'}:0.3", "--style-scale", "1.5"),
        *("--init", "noise", "--seed", "5", "--pooling", "avg", "--color-mode", "histogram"),
        *("--style-layers", "relu1_1,relu2_1:0.5", "--content-layers", "relu4_2"),
    ]
    assert cli.main([str(tmp_path / "photos"), *flags, "--output-dir", str(tmp_path / "run1")]) == 0
    assert cli.main([str(tmp_path / "photos"), *flags, "--output-dir", str(tmp_path / "run2")]) == 0
    names = sorted(p.name for p in (tmp_path / "run1").iterdir())
    assert names == ["a-stylized.png", "b-stylized.png"]
    for name in names:
        first, second = (tmp_path / "run1" / name).read_bytes(), (tmp_path / "run2" / name).read_bytes()
        assert first == second  # the same seed: byte-identical
        with Image.open(io.BytesIO(first)) as image:
            assert image.size == (40, 27)
    other_seed = tmp_path / "other.png"
    assert cli.main([str(tmp_path / "photos" / "a.png"), *flags, "--seed", "6", "-o", str(other_seed)]) == 0
    assert other_seed.read_bytes() != (tmp_path / "run1" / "a-stylized.png").read_bytes()


def test_cli_batch_uses_one_connection(address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_channel = grpc.insecure_channel

    def counting_channel(target: str, *args: object, **kwargs: object) -> grpc.Channel:
        opened.append(target)
        return real_channel(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(grpc, "insecure_channel", counting_channel)
    inputs = []
    for name in ("one", "two", "three"):
        inputs.append(tmp_path / f"{name}.png")
        inputs[-1].write_bytes(CONTENT)
    (tmp_path / "style.png").write_bytes(STYLE_A)
    code = cli.main(
        [
            *map(str, inputs),
            *("-s", str(tmp_path / "style.png"), "--server", address, "-q", "--max-size", "32", "-n", "2"),
            *("--output-dir", str(tmp_path / "out")),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "one-stylized.png",
        "three-stylized.png",
        "two-stylized.png",
    ]
    assert opened == [address]
