"""Export VGGWeights as the ONNX VGG16 feature network the server loads.

The graph takes `image` (1x3xHxW, H and W dynamic, already preprocessed) and outputs every ReLU by its
neural-style name (relu1_1 ... relu5_3). Pooling is MaxPool 2x2/2; the graph builders swap in AveragePool
when a request asks for it. How to preprocess is recorded in metadata_props, so the server reads it from the
model rather than from constants.
"""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper, numpy_helper

from .vgg16 import BLOCK_ENDS, CONVS, RELU_LAYERS, VGGWeights

# Every graph (this one and those models/graphs.py derives from it) is written with the IR version that
# its opset needs (make_model_gen_version: 8 for opset 17), not the newest the onnx package knows:
# onnxruntime refuses IR versions newer than its own, and onnxruntime-gpu trails the CPU package (1.31
# reads up to IR 13; onnx 1.23 writes 14 by default).
OPSET = 17
INPUT_NAME = "image"
MODEL_NAME = "vgg16"

# metadata_props keys
META_NAME = "stylize.model_name"
META_SOURCE = "stylize.weights_source"
META_CHANNEL_ORDER = "stylize.channel_order"
META_INPUT_SCALE = "stylize.input_scale"
META_MEAN = "stylize.mean"
META_STD = "stylize.std"
META_LAYERS = "stylize.layers"


def kernel_name(conv: str) -> str:
    return f"{conv}.weight"


def bias_name(conv: str) -> str:
    return f"{conv}.bias"


def export_features(weights: VGGWeights) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    current = INPUT_NAME
    for spec in CONVS:
        initializers.append(numpy_helper.from_array(weights.kernels[spec.name], kernel_name(spec.name)))
        initializers.append(numpy_helper.from_array(weights.biases[spec.name], bias_name(spec.name)))
        conv_out = f"{spec.name}.out"
        nodes.append(
            helper.make_node(
                "Conv",
                [current, kernel_name(spec.name), bias_name(spec.name)],
                [conv_out],
                name=spec.name,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [conv_out], [spec.relu], name=spec.relu))
        current = spec.relu
        if spec.name in BLOCK_ENDS:
            pool = f"pool{spec.block}"
            nodes.append(
                helper.make_node("MaxPool", [current], [pool], name=pool, kernel_shape=[2, 2], strides=[2, 2])
            )
            current = pool
    channels = {spec.relu: spec.out_channels for spec in CONVS}
    graph = helper.make_graph(
        nodes,
        "vgg16_features",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, "height", "width"])],
        [
            helper.make_tensor_value_info(r, TensorProto.FLOAT, [1, channels[r], None, None])
            for r in RELU_LAYERS
        ],
        initializers,
    )
    model = helper.make_model_gen_version(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="stylize"
    )
    pre = weights.preprocessing
    helper.set_model_props(
        model,
        {
            META_NAME: MODEL_NAME,
            META_SOURCE: weights.source,
            META_CHANNEL_ORDER: pre.channel_order,
            META_INPUT_SCALE: repr(pre.input_scale),
            META_MEAN: json.dumps(list(pre.mean)),
            META_STD: json.dumps(list(pre.std)),
            META_LAYERS: json.dumps(list(RELU_LAYERS)),
        },
    )
    onnx.checker.check_model(model)
    return model
