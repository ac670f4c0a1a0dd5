"""A small helper for writing ONNX graphs node by node: named ops, constants, and the Gram matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
from onnx import TensorProto, helper

from .vgg16 import CHANNELS


class GraphBuilder:
    """Collects nodes and initializers; every op gets a unique name unless `out` gives one."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def op(self, op: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        self._count += 1
        out = out or f"{op.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, name: str, values: Sequence[int] | float, dtype: int) -> str:
        dims = [] if isinstance(values, float | int) else [len(values)]
        vals = [values] if isinstance(values, float | int) else list(values)
        self.initializers.append(helper.make_tensor(name, dtype, dims, vals))
        return name

    def float_const(self, name: str, value: float) -> str:
        return self.const(name, value, TensorProto.FLOAT)

    def int64_const(self, name: str, values: Sequence[int]) -> str:
        return self.const(name, values, TensorProto.INT64)

    def zero(self) -> str:
        return self.const(f"zero_{len(self.initializers)}", 0.0, TensorProto.FLOAT)

    def gram_sum(self, features: str, layer: str) -> str:
        """F Fᵀ of a (1, C, H, W) feature map at `layer`, F reshaped to (C, H W)."""
        flat = self.op(
            "Reshape",
            [
                features,
                self.const(self.unique(f"{layer}/flat_shape"), [CHANNELS[layer], -1], TensorProto.INT64),
            ],
        )
        return self.op("MatMul", [flat, self.op("Transpose", [flat], perm=[1, 0])])

    def gram(self, features: str, layer: str, out: str | None = None) -> str:
        """G = F Fᵀ / (C H W) of a (1, C, H, W) feature map at `layer`."""
        product = self.gram_sum(features, layer)
        count = self.op("Cast", [self.op("Size", [features])], to=TensorProto.FLOAT)
        return self.op("Div", [product, count], out)

    def element_count(self, tensor: str) -> str:
        """The number of elements of a tensor, as a float scalar."""
        return self.op("Cast", [self.op("Size", [tensor])], to=TensorProto.FLOAT)

    def pick(self, stacked: str, index: int) -> str:
        """stacked[index] along the first axis: an element of a vector (a scalar) or a matrix of a stack
        (Gather, which has no gradient rule: only for tensors the image does not change)."""
        position = self.const(self.unique(f"{stacked}/pick{index}"), index, TensorProto.INT64)
        return self.op("Gather", [stacked, position], axis=0)

    def unique(self, name: str) -> str:
        """`name`, or `name` with a suffix when an initializer of that name exists already."""
        taken = {t.name for t in self.initializers}
        candidate, index = name, 1
        while candidate in taken:
            candidate, index = f"{name}_{index}", index + 1
        return candidate

    def mean_square(self, a: str, target: str) -> str:
        diff = self.op("Sub", [a, target])
        return self.op("ReduceMean", [self.op("Mul", [diff, diff])], keepdims=0)
