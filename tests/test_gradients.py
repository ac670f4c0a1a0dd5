"""The generated loss+gradient graph against an independent float64 numpy reference and finite differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from stylize_service.models import export
from stylize_service.models.layers import LayerChoice
from stylize_service.models.paths import default_model_path
from stylize_service.models.vgg16 import CAFFE_PREPROCESSING, CONVS, VGGWeights
from stylize_service.server.engine.network import CompiledChoice, FeatureNetwork, Targets

from . import numpy_reference as ref

DEFAULT_STYLE = {"relu1_1": 1.0, "relu2_1": 1.0, "relu3_1": 1.0, "relu4_1": 1.0, "relu5_1": 1.0}


def random_weights(seed: int = 0) -> VGGWeights:
    """He-initialised VGG16-shaped weights, so activations neither vanish nor explode."""
    rng = np.random.default_rng(seed)
    kernels, biases = {}, {}
    for spec in CONVS:
        std = np.sqrt(2.0 / (spec.in_channels * 9))
        kernels[spec.name] = (rng.standard_normal((spec.out_channels, spec.in_channels, 3, 3)) * std).astype(
            np.float32
        )
        biases[spec.name] = (rng.standard_normal(spec.out_channels) * 0.05).astype(np.float32)
    return VGGWeights(kernels, biases, CAFFE_PREPROCESSING, "random test weights")


@pytest.fixture(scope="module")
def random_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureNetwork, VGGWeights]:
    weights = random_weights()
    path = tmp_path_factory.mktemp("model") / "random_vgg16.onnx"
    onnx.save(export.export_features(weights), str(path))
    return FeatureNetwork(path), weights


def real_weights(network: FeatureNetwork) -> VGGWeights:
    """The weights inside the built model, read back for the numpy reference."""
    model = onnx.load(str(default_model_path()))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return VGGWeights(
        {s.name: tensors[export.kernel_name(s.name)] for s in CONVS},
        {s.name: tensors[export.bias_name(s.name)] for s in CONVS},
        CAFFE_PREPROCESSING,
        network.weights_source,
    )


@pytest.fixture(scope="module")
def real_net() -> tuple[FeatureNetwork, VGGWeights]:
    if not Path(default_model_path()).exists():
        pytest.skip("model not built: run `bash scripts/setup.sh`")
    network = FeatureNetwork(default_model_path())
    return network, real_weights(network)


def image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish random image in caffe network space (BGR, 0..255 minus the mean)."""
    coarse = rng.uniform(0, 255, (3, height // 4 + 2, width // 4 + 2))
    up = np.kron(coarse, np.ones((4, 4)))[:, :height, :width]
    noisy = np.clip(up + rng.normal(0, 20, up.shape), 0, 255)
    return (noisy - np.array(CAFFE_PREPROCESSING.mean)[:, None, None]).astype(np.float32)


def choice_of(
    content_layers: dict[str, float], style_layers: dict[str, float], pooling: str = "max"
) -> LayerChoice:
    return LayerChoice.of({"content": tuple(content_layers), "style": tuple(style_layers)}, pooling)


def feeds_of(
    compiled: CompiledChoice,
    content_targets: dict[str, np.ndarray],
    grams: dict[str, np.ndarray],
    weights: tuple[float, float, float],
    content_layers: dict[str, float],
    style_layers: dict[str, float],
) -> dict[str, np.ndarray]:
    return compiled.feeds(
        Targets({"content": content_targets, "style": grams}),
        dict(zip(("content", "style", "tv"), weights, strict=True)),
        {"content": content_layers, "style": style_layers},
    )


def check_against_reference(
    network: FeatureNetwork,
    weights: VGGWeights,
    content_layers: dict[str, float],
    style_layers: dict[str, float],
    pooling: str,
    height: int,
    width: int,
    seed: int = 0,
    weights_cst: tuple[float, float, float] = (5.0, 100.0, 1e-3),
) -> None:
    rng = np.random.default_rng(seed)
    compiled = network.compiled(choice_of(content_layers, style_layers, pooling))
    content, style, x = (
        image(rng, height, width),
        image(rng, height + 6, width - 4),
        image(rng, height, width),
    )

    content_targets = compiled.targets(content[None]).by_term["content"]
    style_grams = compiled.targets(style[None]).by_term["style"]
    ref_content = ref.features(weights, content, set(content_layers), pooling)
    ref_style = ref.features(weights, style, set(style_layers), pooling)
    for layer in content_layers:
        np.testing.assert_allclose(content_targets[layer][0], ref_content[layer], rtol=1e-4, atol=1e-3)
    for layer in style_layers:
        expected = ref.gram(ref_style[layer])
        np.testing.assert_allclose(
            style_grams[layer], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
        )

    cw, sw, tw = weights_cst
    feeds = feeds_of(compiled, content_targets, style_grams, weights_cst, content_layers, style_layers)
    evaluation = compiled.evaluate(x[None], feeds)
    targets64 = {k: v[0].astype(np.float64) for k, v in content_targets.items()}
    grams64 = {k: v.astype(np.float64) for k, v in style_grams.items()}

    def reference(point: np.ndarray) -> dict[str, float]:
        return ref.loss_terms(
            weights, point, targets64, grams64, content_layers, style_layers, cw, sw, tw, pooling
        )

    expected = reference(x.astype(np.float64))
    terms = evaluation.terms
    assert evaluation.loss == pytest.approx(expected["loss"], rel=1e-4)
    assert terms["content"] == pytest.approx(expected["content"], rel=1e-4, abs=1e-6)
    assert terms["style"] == pytest.approx(expected["style"], rel=1e-4, abs=1e-6)
    assert terms["tv"] == pytest.approx(expected["tv"], rel=1e-4)
    assert evaluation.loss == pytest.approx(sum(terms.values()), rel=1e-5)
    for term, layers in (("content", content_layers), ("style", style_layers)):
        assert list(evaluation.per_layer[term]) == list(layers)
        assert sum(evaluation.per_layer[term].values()) == pytest.approx(terms[term], rel=1e-5, abs=1e-9)
    assert evaluation.grad.shape == x[None].shape

    # Central differences of the float64 reference along random directions against grad . v.
    grad = evaluation.grad[0].astype(np.float64)
    for _ in range(3):
        v = rng.standard_normal(x.shape)
        v /= np.linalg.norm(v)
        eps = 1e-3  # small: ReLU and max-pool kinks make larger steps inexact on real weights
        fd = (reference(x + eps * v)["loss"] - reference(x - eps * v)["loss"]) / (2 * eps)
        analytic = float(np.sum(grad * v))
        assert analytic == pytest.approx(fd, rel=2e-3, abs=1e-6 * np.linalg.norm(grad))


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_random_net_default_layers_odd_size(random_net, pooling):
    network, weights = random_net
    check_against_reference(network, weights, {"relu4_2": 1.0}, DEFAULT_STYLE, pooling, 45, 67)


@pytest.mark.parametrize(
    ("content_layers", "style_layers"),
    [
        ({"relu2_2": 1.0}, {"relu1_2": 0.5, "relu3_3": 2.0}),
        ({"relu1_1": 1.0, "relu3_2": 0.3}, {}),
        ({}, {"relu2_1": 1.0, "relu5_3": 0.7}),
    ],
)
def test_random_net_other_layer_sets(random_net, content_layers, style_layers):
    network, weights = random_net
    check_against_reference(network, weights, content_layers, style_layers, "max", 37, 50, seed=1)


def test_real_net_small(real_net):
    network, weights = real_net
    check_against_reference(network, weights, {"relu4_2": 1.0}, DEFAULT_STYLE, "max", 40, 53, seed=2)


def test_real_net_avg_pool_custom_weights(real_net):
    network, weights = real_net
    check_against_reference(
        network, weights, {"relu3_2": 2.0}, {"relu1_1": 0.2, "relu4_1": 3.0}, "avg", 33, 48, seed=3,
        weights_cst=(1.0, 1000.0, 0.5),
    )  # fmt: skip


def test_loss_graph_is_standard_onnx(real_net):
    """Only default-domain ops, so stock onnxruntime runs it on any provider."""
    from stylize_service.models.graphs import build_loss_model

    model = build_loss_model(onnx.load(str(default_model_path())), choice_of({"relu4_2": 1}, {"relu1_1": 1}))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {""}
    assert "Gradient" not in {n.op_type for n in model.graph.node}
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "loss" and outputs[-1] == "grad"
    assert {"term/content", "term/style", "term/tv", "layer_losses/content", "layer_losses/style"} <= set(
        outputs
    )


def test_against_torch_autograd(real_net):
    """The same loss written in PyTorch (an optional dependency) and differentiated by autograd."""
    torch = pytest.importorskip("torch")
    network, weights = real_net
    content_layers, style_layers = {"relu4_2": 1.0}, DEFAULT_STYLE
    rng = np.random.default_rng(4)
    content, style, x = image(rng, 36, 44), image(rng, 40, 40), image(rng, 36, 44)
    compiled = network.compiled(choice_of(content_layers, style_layers))
    content_targets = compiled.targets(content[None]).by_term["content"]
    grams = compiled.targets(style[None]).by_term["style"]
    feeds = feeds_of(compiled, content_targets, grams, (5.0, 100.0, 1e-3), content_layers, style_layers)
    evaluation = compiled.evaluate(x[None], feeds)

    xt = torch.tensor(x[None], dtype=torch.float64, requires_grad=True)
    h, feats = xt, {}
    for spec in CONVS:
        kernel = torch.tensor(weights.kernels[spec.name], dtype=torch.float64)
        bias = torch.tensor(weights.biases[spec.name], dtype=torch.float64)
        h = torch.relu(torch.nn.functional.conv2d(h, kernel, bias, padding=1))
        feats[spec.relu] = h
        if spec.relu == "relu5_1":
            break
        if spec.name in {"conv1_2", "conv2_2", "conv3_3", "conv4_3"}:
            h = torch.nn.functional.max_pool2d(h, 2)
    content_loss = 5.0 * torch.mean(
        (feats["relu4_2"] - torch.tensor(content_targets["relu4_2"]).double()) ** 2
    )
    style_loss = 0
    for layer in style_layers:
        f = feats[layer][0].reshape(feats[layer].shape[1], -1)
        g = f @ f.T / f.numel()
        style_loss = style_loss + 100.0 * torch.mean((g - torch.tensor(grams[layer]).double()) ** 2)
    corner = xt[..., :-1, :-1]
    tv = 1e-3 * 0.5 * torch.sum((corner - xt[..., :-1, 1:]) ** 2 + (corner - xt[..., 1:, :-1]) ** 2)
    total = content_loss + style_loss + tv
    total.backward()

    assert evaluation.terms["content"] == pytest.approx(content_loss.item(), rel=1e-4)
    assert evaluation.terms["style"] == pytest.approx(style_loss.item(), rel=1e-4)
    assert evaluation.terms["tv"] == pytest.approx(tv.item(), rel=1e-4)
    expected = xt.grad.numpy()
    error = np.linalg.norm(evaluation.grad - expected) / np.linalg.norm(expected)
    assert error < 1e-4
