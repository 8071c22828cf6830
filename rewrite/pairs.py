"""Graph surgery: each chosen target becomes a factor pair (DESIGN.md section 2).

    MatMul(X, B)          ->  MatMul(MatMul(X, A), C)
    Gemm(X, B, bias)      ->  Gemm(MatMul(X, A), alpha * C, bias)       (transB normalised away)
    Conv(X, W, bias)      ->  Conv1x1(Conv_k(X, A as [k, c, kh, kw]), C as [m, k, 1, 1], bias)

The first node is named ``<node>/lowrank_A``, the second keeps the original's output as
``<node>/lowrank_C``; their weights carry the same names. Inputs, outputs, opset and metadata
of the model are kept; unused originals are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from flarc.core.errors import ModelError
from flarc.core.external import split_large_initializers
from flarc.core.lazy import LazyMapping
from flarc.core.targets import Target, node_names
from flarc.rewrite.analysis import Analysis
from flarc.rewrite.ranks import RankChoice

# Where a factor's values go: None keeps them in the graph; a FactorFile writes them to disk.
Store = Callable[[str, np.ndarray], onnx.TensorProto] | None


def _factor_constant(name: str, value: np.ndarray, dtype: str, store: Store) -> gs.Constant:
    value = np.ascontiguousarray(value.astype(np.dtype(dtype), copy=False))
    if store is None:
        return gs.Constant(name, value)
    return gs.Constant(name, LazyValues(store(name, value)))  # exported as the stored reference


def _rewrite_matmul(
    graph: gs.Graph, node: gs.Node, t: Target, a: np.ndarray, c: np.ndarray, store: Store
) -> None:
    x = node.inputs[0]
    mid = gs.Variable(f"{t.name}/lowrank_mid", dtype=x.dtype)
    first = gs.Node(
        "MatMul",
        name=f"{t.name}/lowrank_A",
        inputs=[x, _factor_constant(f"{t.name}/lowrank_A", a, t.dtype, store)],
        outputs=[mid],
    )
    if t.op_type == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        c = c * alpha
        node.attrs["alpha"] = 1.0
        node.attrs["transB"] = 0
    node.inputs[0] = mid
    node.inputs[1] = _factor_constant(f"{t.name}/lowrank_C", c, t.dtype, store)
    node.name = f"{t.name}/lowrank_C"
    graph.nodes.append(first)


def _rewrite_conv(
    graph: gs.Graph, node: gs.Node, t: Target, a: np.ndarray, c: np.ndarray, store: Store
) -> None:
    g = t.conv
    k = a.shape[1]
    x = node.inputs[0]
    mid = gs.Variable(f"{t.name}/lowrank_mid", dtype=x.dtype)
    attrs = g.onnx_attrs()
    a_kernel = a.T.reshape(k, *t.weight_shape[1:])
    first = gs.Node(
        "Conv",
        name=f"{t.name}/lowrank_A",
        attrs=attrs,
        inputs=[x, _factor_constant(f"{t.name}/lowrank_A", a_kernel, t.dtype, store)],
        outputs=[mid],
    )
    nd = len(g.kernel_shape)
    c_kernel = c.T.reshape(t.m, k, *([1] * nd))
    node.attrs = {"kernel_shape": [1] * nd, "group": 1}
    node.inputs[0] = mid
    node.inputs[1] = _factor_constant(f"{t.name}/lowrank_C", c_kernel, t.dtype, store)
    node.name = f"{t.name}/lowrank_C"
    graph.nodes.append(first)


def factorize(
    model: onnx.ModelProto,
    targets: list[Target],
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    store: Store = None,
) -> onnx.ModelProto:
    """A new model in which each target named in ``factors`` is replaced by its factor pair.

    ``factors`` may make each pair when it is looked up; with ``store``, each factor goes to
    disk at once and the graph refers to it there (a large model's rewrite).
    """
    # Large weights travel as data-less stubs and only those still used are copied back at the end.
    named, originals = split_large_initializers(model)
    for node, name in zip(named.graph.node, node_names(named), strict=True):
        node.name = name
    graph = gs.import_onnx(named)
    by_name = {node.name: node for node in graph.nodes}
    for t in targets:
        if t.name not in factors:
            continue
        a, c = factors[t.name]
        node = by_name[t.name]
        if t.op_type == "Conv":
            _rewrite_conv(graph, node, t, a, c, store)
        else:
            _rewrite_matmul(graph, node, t, a, c, store)
        del a, c
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    for tensor in out.graph.initializer:
        if tensor.name in originals and not tensor.HasField("raw_data"):
            tensor.CopyFrom(originals[tensor.name])
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name
    out.producer_version = model.producer_version
    out.domain = model.domain
    out.model_version = model.model_version
    out.doc_string = model.doc_string
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    if not out.functions and model.functions:
        out.functions.extend(model.functions)
    return out


def chosen_factors(
    analysis: Analysis, ranks: Mapping[str, RankChoice]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The float64 factor pair of every target with a rank (small models, tests)."""
    return {
        name: analysis.entries[name].spectrum.factors(choice.rank)
        for name, choice in ranks.items()
        if choice.rank is not None
    }


def lazy_factors(analysis: Analysis, ranks: Mapping[str, RankChoice]) -> LazyMapping:
    """The factor pair of every target with a rank, in the model's dtype, made when looked up."""
    chosen = {name: c.rank for name, c in ranks.items() if c.rank is not None}
    dtype = {t.name: np.dtype(t.dtype) for t in analysis.targets}

    def pair(name: str) -> tuple[np.ndarray, np.ndarray]:
        a, c = analysis.entries[name].spectrum.factors(chosen[name])
        if not (np.isfinite(a).all() and np.isfinite(c).all()):
            raise ModelError(f"node '{name}': factors are not finite (degenerate statistics)")
        return a.astype(dtype[name]), c.astype(dtype[name])

    return LazyMapping(chosen, pair)
