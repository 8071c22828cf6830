"""The output guard: the rewritten model against the original with each chosen weight replaced by
its dense product ``A C`` (the factors as stored: fp16 or int8 grids included). They compute the
same function, so their difference is rounding;
anything larger is a rewrite bug, not compression, and the model is not written."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flarc.core.inputs import Feed, batch_rows, batch_size, fixed_batch, model_inputs
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


# Integer range of a QuantizeLinear output by its zero point's element type (uint8 without one).
_Q_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
             TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767)}  # fmt: skip


def without_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (itself when it has none) with every per-tensor QuantizeLinear ->
    DequantizeLinear pair on an activation replaced by a Clip to the grid's range, so the guard
    compares the rewrite in float: a QDQ graph's uint8 activations flip grid points on
    rounding-level differences, which compound over layers (measured: 11% between a
    quantize_static MiniLM's factor pairs and their dense products, every target alone within
    rounding). The clip keeps what the grid's range does (quantize_static folds a Relu into
    it). Weights' DequantizeLinear nodes stay."""
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    quant = {}
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or n.domain not in ("", "ai.onnx") or n.input[0] in consts:
            continue
        scale = consts.get(n.input[1])
        zero = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None or (len(n.input) > 2 and n.input[2] and zero is None):
            continue
        s = numpy_helper.to_array(scale).astype(np.float64)
        z = numpy_helper.to_array(zero).astype(np.float64) if zero is not None else np.zeros(())
        lo, hi = _Q_RANGES.get(zero.data_type if zero is not None else TensorProto.UINT8, (0, 0))
        if s.size != 1 or z.size != 1 or lo == hi:
            continue  # per-axis or unknown grids stay as they are
        quant[n.output[0]] = (n.input[0], (lo - z.item()) * s.item(), (hi - z.item()) * s.item())
    pairs = {
        n.output[0]: quant[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quant
    }
    if not pairs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = model_opset(model)
    nodes = []
    for n in g.node:
        if not (n.output and n.output[0] in pairs):
            nodes.append(n)
            continue
        source, low, high = pairs[n.output[0]]
        name = n.output[0]
        if opset >= 11:
            bounds = [f"{name}/clip_min", f"{name}/clip_max"]
            for b, v in zip(bounds, (low, high), strict=True):
                g.initializer.append(numpy_helper.from_array(np.array(v, np.float32), b))
            nodes.append(helper.make_node("Clip", [source, *bounds], [name], name=f"{name}/clip"))
        else:
            nodes.append(
                helper.make_node("Clip", [source], [name], name=f"{name}/clip", min=low, max=high)
            )
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    nodes = [n for n in nodes if not (n.op_type == "QuantizeLinear" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(nodes)
    return out


def output_guard(
    model: onnx.ModelProto,
    new_model: onnx.ModelProto,
    targets: list[Target],
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    feeds: list[Feed],
    large: bool = False,
) -> float:
    """``||y_new - y_dense|| / ||y_dense||`` over ``feeds`` (a large model: the first sequence
    of the first, or the whole first batch when the model's batch is fixed)."""
    if not factors:
        return 0.0
    feeds = feeds[: 1 if large else 2]
    if large and fixed_batch(model_inputs(model)) is None:
        # A rewrite bug shows on any input: one sequence checks it at a fraction of a batch's
        # cost, and a language model's logits for a whole batch are large.
        feeds = [batch_rows(feeds[0], 0, 1, batch_size(feeds[0]))]
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
