"""Tiny ONNX models of one layer: the dense node, or its rank-k factor pair (DESIGN.md section 2).

Linear layers are ``MatMul(X [tokens, n], B [n, m])`` and ``MatMul(MatMul(X, A), C)``; a Gemm's
bias costs the same in both and is left out. Conv layers copy the node's geometry; the pair is a
k-channel Conv with the original kernel and a 1x1 Conv to m channels carrying the bias. Weights
are random constants so runtimes prepack them as they would in a deployed model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flarc.core.modelio import prepare_for_save
from flarc.latency.spec import LayerSpec

OPSET = 17
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: str):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    values = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    return numpy_helper.from_array(values.astype(NP_DTYPES[dtype]), name)


def layer_model(
    spec: LayerSpec, k: int | None, dtype: str = "fp32", seed: int = 0
) -> onnx.ModelProto:
    """The dense layer (``k`` None) or its rank-``k`` pair, input ``X``, output ``Y``."""
    rng = np.random.default_rng(seed)
    elem = ONNX_DTYPES[dtype]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    if spec.kind == "linear":
        if k is None:
            inits.append(_weight(rng, "B", (spec.n, spec.m), dtype))
            nodes.append(helper.make_node("MatMul", ["X", "B"], ["Y"], name="dense"))
        else:
            inits += [
                _weight(rng, "A", (spec.n, k), dtype),
                _weight(rng, "C", (k, spec.m), dtype),
            ]
            nodes += [
                helper.make_node("MatMul", ["X", "A"], ["H"], name="first"),
                helper.make_node("MatMul", ["H", "C"], ["Y"], name="second"),
            ]
        out_shape = [spec.tokens, spec.m]
    else:
        geo = spec.conv
        assert geo is not None
        attrs = {
            "kernel_shape": list(geo.kernel_shape),
            "strides": list(geo.strides),
            "pads": list(spec.pads),
            "dilations": list(geo.dilations),
        }
        ones = [1] * len(geo.kernel_shape)
        bias = numpy_helper.from_array(np.zeros(spec.m, NP_DTYPES[dtype]), "bias")
        if k is None:
            inits += [_weight(rng, "W", (spec.m, spec.channels, *geo.kernel_shape), dtype), bias]
            nodes.append(helper.make_node("Conv", ["X", "W", "bias"], ["Y"], name="dense", **attrs))
        else:
            inits += [
                _weight(rng, "W1", (k, spec.channels, *geo.kernel_shape), dtype),
                _weight(rng, "W2", (spec.m, k, *ones), dtype),
                bias,
            ]
            nodes += [
                helper.make_node("Conv", ["X", "W1"], ["H"], name="first", **attrs),
                helper.make_node("Conv", ["H", "W2", "bias"], ["Y"], name="second"),
            ]
        out_shape = [spec.input_shape[0], spec.m, *spec.out_spatial]
    graph = helper.make_graph(
        nodes,
        "dense" if k is None else f"pair_k{k}",
        [helper.make_tensor_value_info("X", elem, list(spec.input_shape))],
        [helper.make_tensor_value_info("Y", elem, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return prepare_for_save(model)


def random_input(spec: LayerSpec, dtype: str = "fp32", seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(spec.input_shape).astype(NP_DTYPES[dtype])
