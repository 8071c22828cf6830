"""Tiny ONNX models of one layer: the dense node, or its rank-k factor pair written by the one
factor-pair writer (:mod:`flarc.rewrite.pairs`), so a latency curve times exactly the graph
that compress (or, with ``prefix_rows``, the rank buckets) ship.

Linear layers are ``MatMul(X [tokens, n], B [n, m])``; a Gemm's bias costs the same in both and
is left out. Conv layers copy the node's geometry (pads made explicit for the real input) and
carry a bias. Weights are random constants so runtimes prepack them as they would in a deployed
model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flarc.core.modelio import prepare_for_save
from flarc.core.targets import ConvGeometry, Target
from flarc.latency.spec import LayerSpec
from flarc.rewrite.pairs import factorize

OPSET = 17
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


def _random(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype: str):
    return (rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(NP_DTYPES[dtype])


def layer_target(spec: LayerSpec, dtype: str = "fp32") -> Target:
    """The target of the one-node layer model of ``spec``."""
    np_dtype = str(np.dtype(NP_DTYPES[dtype]))
    if spec.kind == "linear":
        return Target(
            "dense", "MatMul", "X", "Y", "B", (spec.n, spec.m), spec.n, spec.m, False, np_dtype
        )
    geo = spec.conv
    assert geo is not None
    explicit = ConvGeometry(geo.kernel_shape, geo.strides, spec.pads, geo.dilations)
    shape = (spec.m, spec.channels, *geo.kernel_shape)
    return Target("dense", "Conv", "X", "Y", "W", shape, spec.n, spec.m, False, np_dtype, explicit)


def dense_model(spec: LayerSpec, dtype: str = "fp32", seed: int = 0) -> onnx.ModelProto:
    """The dense layer: input ``X``, output ``Y``."""
    rng = np.random.default_rng(seed)
    t = layer_target(spec, dtype)
    weight = _random(rng, t.weight_shape, t.n, dtype)
    inits = [numpy_helper.from_array(weight, t.weight)]
    if spec.kind == "linear":
        node = helper.make_node("MatMul", ["X", "B"], ["Y"], name=t.name)
        out_shape = [spec.tokens, spec.m]
    else:
        inits.append(numpy_helper.from_array(np.zeros(spec.m, NP_DTYPES[dtype]), "bias"))
        node = helper.make_node(
            "Conv", ["X", "W", "bias"], ["Y"], name=t.name, **t.conv.onnx_attrs()
        )
        out_shape = [spec.input_shape[0], spec.m, *spec.out_spatial]
    elem = ONNX_DTYPES[dtype]
    graph = helper.make_graph(
        [node],
        "dense",
        [helper.make_tensor_value_info("X", elem, list(spec.input_shape))],
        [helper.make_tensor_value_info("Y", elem, out_shape)],
        initializer=inits,
    )
    return prepare_for_save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    )


def layer_model(
    spec: LayerSpec, k: int | None, dtype: str = "fp32", seed: int = 0, prefix_rows: bool = False
) -> onnx.ModelProto:
    """The dense layer (``k`` None) or its rank-``k`` pair as the writer writes it."""
    model = dense_model(spec, dtype, seed)
    if k is None:
        return model
    rng = np.random.default_rng(seed + 1)
    t = layer_target(spec, dtype)
    a, c = _random(rng, (t.n, k), t.n, dtype), _random(rng, (k, t.m), k, dtype)
    pair = factorize(model, [t], {t.name: (a, c)}, prefix_rows=prefix_rows)
    pair.graph.name = f"pair_k{k}"
    return prepare_for_save(pair)


def random_input(spec: LayerSpec, dtype: str = "fp32", seed: int = 1) -> np.ndarray:
    """A random input of the layer's real shape."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(spec.input_shape).astype(NP_DTYPES[dtype])
