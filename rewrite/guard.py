"""The output guard: the rewritten model against the original with each chosen weight replaced by
its dense product ``A C`` (the factors as stored: fp16 or int8 grids included). They compute the
same function, so their difference is rounding;
anything larger is a rewrite bug, not compression, and the model is not written."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from flarc.core.inputs import Feed
from flarc.core.lazy import LazyMapping
from flarc.core.memory import release_free_memory
from flarc.core.modelio import model_opset
from flarc.core.sessions import fed_session, lean_session_options
from flarc.core.sums import PairSums
from flarc.core.targets import Target
from flarc.rewrite.output_error import OutputErrorProbe
from flarc.rewrite.storage import effective_pair

# Largest relative difference between the factor pairs and their dense product that is rounding.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


def dense_products(
    targets: list[Target], factors: Mapping[str, tuple[np.ndarray, np.ndarray]], opset: int
) -> LazyMapping:
    """``name -> A C`` for factor pairs, each made when looked up, with ``A`` and ``C`` as the
    rewritten graph computes them from their stored form (an int8 factor's grid included)."""
    by_name = {t.name: t for t in targets}

    def product(name: str) -> np.ndarray:
        a, c = effective_pair(by_name[name], *factors[name], opset)
        return a @ c

    return LazyMapping(factors, product)


def without_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (itself when it has none) with every QuantizeLinear -> DequantizeLinear pair on
    an activation removed, so the guard compares the rewrite in float: a QDQ graph's uint8
    activations flip grid points on rounding-level differences, which compound over layers
    (measured: 11% between a quantize_static MiniLM's factor pairs and their dense products,
    every target alone within rounding). Weights' DequantizeLinear nodes stay."""
    graph = model.graph
    consts = {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    quant = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts
    }
    bypass = {
        n.output[0]: quant[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quant
    }
    if not bypass:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    kept = [n for n in g.node if not (n.output and n.output[0] in bypass)]
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = bypass.get(name, name)
    for o in g.output:
        if o.name in bypass:
            kept.append(onnx.helper.make_node("Identity", [bypass[o.name]], [o.name]))
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    quantizers = [n for n in g.node if n.op_type == "QuantizeLinear" and n.output[0] not in used]
    for n in quantizers:
        g.node.remove(n)
    return out


def output_guard(
    model: onnx.ModelProto,
    new_model: onnx.ModelProto,
    targets: list[Target],
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    feeds: list[Feed],
    large: bool = False,
) -> float:
    """``||y_new - y_dense|| / ||y_dense||`` over ``feeds`` (a large model: the first only)."""
    if not factors:
        return 0.0
    # A large model's outputs (a language model's logits) are large: one batch checks a rewrite.
    feeds = feeds[: 1 if large else 2]
    model, new_model = without_activation_qdq(model), without_activation_qdq(new_model)
    probe = OutputErrorProbe(model, targets, feeds)
    try:
        expected = probe.outputs(dense_products(targets, factors, model_opset(model)))
    finally:
        probe.close()
    if large:
        release_free_memory()  # the dense products, before the rewritten model's session
    sums = PairSums()
    # Large weights are fed, not serialised: no copy of the model, and no protobuf 2 GB limit.
    sess = fed_session(new_model, lean_session_options(new_model))
    for feed, ys in zip(feeds, expected, strict=True):
        for y, y_ref in zip(sess.run(probe.outputs_names, feed), ys, strict=True):
            sums.add(y_ref, y)
    del sess
    return sums.relative_l2()


def guard_tolerance(targets: list[Target]) -> float:
    """The rounding allowed for the targets' dtypes (the loosest of them)."""
    return max(TOLERANCE.get(t.dtype, 1e-3) for t in targets)
