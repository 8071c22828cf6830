"""The one factor-pair writer: each chosen target becomes a factor pair (docs/design.md section 2),
for ``flarc compress``, the rank buckets and the latency profiles alike.

    MatMul(X, B)          ->  MatMul(MatMul(X, A), C)
    Gemm(X, B, bias)      ->  Gemm(MatMul(X, A), C, bias, alpha, beta)  (transB normalised away;
                                                      transA=1: Gemm(X, A, transA=1) first)
    Conv(X, W, bias)      ->  Conv1x1(Conv_k(X, A as [k, c, kh, kw]), C as [m, k, 1, 1], bias)

With ``prefix_rows`` (rank buckets) the first factor is stored as ``A^T [k, n]``, so that a
smaller rank is a row prefix of both factors, and applied by a Gemm with ``transB=1`` (a
``Transpose`` in front of a MatMul would be constant-folded into a private copy per session):

    MatMul(X, B)          ->  Reshape(MatMul(Gemm(Reshape(X, [-1, n]), A^T, transB=1), C), X[:-1]+[m])
    Gemm(X, B, bias)      ->  Gemm(Gemm(X, A^T, transB=1), C, bias, alpha, beta)

The first node is named ``<node>/lowrank_A``, the second keeps the original's output as
``<node>/lowrank_C``; their weights are ``<node>/lowrank_A`` (``lowrank_At`` with prefix rows)
and ``<node>/lowrank_C``. A weight read by several nodes is one target: its two factors are
written once and every use reads them. Factors are stored in the form of the weight they replace
(:mod:`flarc.rewrite.storage`: fp16 behind a Cast, int8 behind DequantizeLinear, ...); the
row-prefix form stores floats (buckets share them across ranks). Inputs, outputs, opset, IR
version and metadata of the model are kept; unused originals (and their weight paths) are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from flarc.core.errors import ModelError
from flarc.core.external import declared_nbytes, split_large_initializers
from flarc.core.graphs import scopes
from flarc.core.lazy import LazyMapping
from flarc.core.modelio import model_opset, stored_tensors
from flarc.core.targets import Target, Use, node_names
from flarc.rewrite.analysis import Analysis
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.storage import Encoded, encode_pair

# Where a factor's values go: None keeps them in the graph; else a function that stores them and
# returns the tensor the graph refers to (a large model's spill file, a bucket's shared file).
Store = Callable[[str, np.ndarray], onnx.TensorProto] | None


class _Writer:
    """Rewrites targets of one imported graph (shared shape nodes are made once)."""

    def __init__(self, graph: gs.Graph, store: Store, prefix_rows: bool, opset: int) -> None:
        self.graph = graph
        self.store = store
        self.prefix_rows = prefix_rows
        self.opset = opset
        self.lead: dict[str, gs.Variable] = {}  # activation -> its leading dims

    def constant(self, name: str, value: np.ndarray, dtype: str) -> gs.Constant:
        value = np.ascontiguousarray(value.astype(np.dtype(dtype), copy=False))
        if self.store is None:
            return gs.Constant(name, value)
        return gs.Constant(name, LazyValues(self.store(name, value)))  # the stored reference

    def tensor(self, name: str, value: np.ndarray) -> gs.Constant:
        """A stored-form array as a constant (int4 and bf16 go through onnx's own packing)."""
        if self.store is not None and value.dtype.itemsize >= 1 and value.dtype.kind in "fiu":
            return gs.Constant(name, LazyValues(self.store(name, value)))
        return gs.Constant(name, LazyValues(numpy_helper.from_array(value, name)))

    def node(self, op: str, name: str, inputs: list, dtype=None, **attrs) -> gs.Variable:
        out = gs.Variable(f"{name}_out", dtype=dtype)
        self.graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    def stored(self, name: str, enc: Encoded, t: Target) -> gs.Tensor:
        """The factor's stored tensors and the nodes that turn them into the node's floats."""
        if enc.form.kind == "float":
            return self.constant(name, enc.data, t.dtype)
        data = self.tensor(name, enc.data)
        dtype = np.dtype(t.dtype)
        if enc.form.kind == "cast":
            return self.node("Cast", f"{name}/Cast", [data], dtype, to=t.elem_type)
        scale = self.tensor(f"{name}/scale", enc.scale)
        zero = enc.zero_point is not None and enc.form.zero_point
        if enc.form.kind == "qdq":
            inputs = [data, scale]
            if zero:
                inputs.append(self.tensor(f"{name}/zero_point", enc.zero_point))
            return self.node(
                "DequantizeLinear", f"{name}/DequantizeLinear", inputs, dtype, **enc.attrs
            )
        x = self.node("Cast", f"{name}/Cast", [data], dtype, to=t.elem_type)
        if zero:
            x = self.node(
                "Sub", f"{name}/Sub", [x, self.tensor(f"{name}/zero_point", enc.zero_point)], dtype
            )
        return self.node("Mul", f"{name}/Mul", [x, scale], dtype)

    def target(
        self, t: Target, a: np.ndarray, c: np.ndarray, nodes: Mapping[str, tuple[gs.Node, gs.Graph]]
    ) -> None:
        """Both factors once, then every node that read the weight reads them instead (new
        nodes go in the graph of the node they serve; shared ones where every use sees them)."""
        main = self.graph
        graphs = {id(nodes[u.node][1]): nodes[u.node][1] for u in t.all_uses}
        self.graph = next(iter(graphs.values())) if len(graphs) == 1 else main
        if self.prefix_rows:
            fa = self.constant(f"{t.name}/lowrank_At", a.T, t.dtype)
            fc = self.constant(f"{t.name}/lowrank_C", c, t.dtype)
        else:
            ea, ec = encode_pair(t, a, c, self.opset)
            fa = self.stored(f"{t.name}/lowrank_A", ea, t)
            fc = self.stored(f"{t.name}/lowrank_C", ec, t)
        for u in t.all_uses:
            node, self.graph = nodes[u.node]
            if self.prefix_rows:
                self._prefix_rows(node, t, u, fa, fc)
            elif t.op_type == "Conv":
                self.conv(node, t, u, fa, fc)
            else:
                self.linear(node, u, fa, fc)
        self.graph = main

    def linear(self, node: gs.Node, u: Use, fa: gs.Tensor, fc: gs.Tensor) -> None:
        x = node.inputs[0]
        mid = gs.Variable(f"{u.node}/lowrank_mid", dtype=x.dtype)
        first = gs.Node(
            "Gemm" if u.transposed_input else "MatMul",
            name=f"{u.node}/lowrank_A",
            attrs={"transA": 1} if u.transposed_input else {},
            inputs=[x, fa],
            outputs=[mid],
        )
        if u.op_type == "Gemm":  # alpha and beta stay: a shared C serves every use's alpha
            node.attrs["transA"] = 0
            node.attrs["transB"] = 0
        node.inputs[0] = mid
        node.inputs[1] = fc
        node.name = f"{u.node}/lowrank_C"
        self.graph.nodes.append(first)

    def _prefix_rows(self, node: gs.Node, t: Target, u: Use, at: gs.Tensor, cc: gs.Tensor) -> None:
        x = node.inputs[0]
        if u.op_type == "Gemm":  # 2-D already; alpha and beta stay on the second Gemm
            attrs = {"transA": 1, "transB": 1} if u.transposed_input else {"transB": 1}
            mid = self.node("Gemm", f"{u.node}/lowrank_A", [x, at], x.dtype, **attrs)
            node.attrs["transA"] = 0
            node.attrs["transB"] = 0
            node.inputs[0], node.inputs[1] = mid, cc
            node.name = f"{u.node}/lowrank_C"
            return
        flat = gs.Constant(f"{u.node}/lowrank_flat_shape", np.array([-1, t.n], np.int64))
        x2 = self.node("Reshape", f"{u.node}/lowrank_flat", [x, flat], x.dtype)
        mid = self.node("Gemm", f"{u.node}/lowrank_A", [x2, at], x.dtype, transB=1)
        y2 = self.node("MatMul", f"{u.node}/lowrank_C", [mid, cc], x.dtype)
        m = gs.Constant(f"{u.node}/lowrank_m", np.array([t.m], np.int64))
        shape = self.node("Concat", f"{u.node}/lowrank_yshape", [self.leading(x), m], axis=0)
        node.op = "Reshape"
        node.name = f"{u.node}/lowrank_unflat"
        node.attrs = {}
        node.inputs[0], node.inputs[1] = y2, shape

    def leading(self, x: gs.Variable) -> gs.Variable:
        """``Shape(x)[:-1]``, made once per activation (q, k and v share it)."""
        if x.name not in self.lead:
            full = self.node("Shape", f"{x.name}/lowrank_lead/Shape", [x])
            start = gs.Constant(f"{x.name}/lowrank_lead_start", np.array([0], np.int64))
            end = gs.Constant(f"{x.name}/lowrank_lead_end", np.array([-1], np.int64))
            self.lead[x.name] = self.node(
                "Slice", f"{x.name}/lowrank_lead/Slice", [full, start, end]
            )
        return self.lead[x.name]

    def conv(self, node: gs.Node, t: Target, u: Use, fa: gs.Tensor, fc: gs.Tensor) -> None:
        x = node.inputs[0]
        mid = gs.Variable(f"{u.node}/lowrank_mid", dtype=x.dtype)
        first = gs.Node(
            "Conv",
            name=f"{u.node}/lowrank_A",
            attrs=t.conv.onnx_attrs(),
            inputs=[x, fa],
            outputs=[mid],
        )
        nd = len(t.conv.kernel_shape)
        node.attrs = {"kernel_shape": [1] * nd, "group": 1}
        node.inputs[0] = mid
        node.inputs[1] = fc
        node.name = f"{u.node}/lowrank_C"
        self.graph.nodes.append(first)


def factorize(
    model: onnx.ModelProto,
    targets: list[Target],
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    store: Store = None,
    prefix_rows: bool = False,
    restore: bool = True,
) -> onnx.ModelProto:
    """A new model in which each target named in ``factors`` is replaced by its factor pair.

    ``factors`` may make each pair when it is looked up; with ``store``, each factor goes to
    disk at once and the graph refers to it there (a large model's rewrite). ``prefix_rows``
    stores the first factor transposed (module doc). Large initializers travel as data-less
    stubs; ``restore`` puts back the data of those still used (else they stay stubs, for a
    caller that writes them elsewhere).
    """
    if prefix_rows and any(t.op_type == "Conv" for t in targets if t.name in factors):
        raise ModelError("Conv targets have no row-prefix factor form (they stay dense)")
    named, originals = split_large_initializers(model)
    for node, name in zip(named.graph.node, node_names(named), strict=True):
        node.name = name
    # Subgraph nodes carry flarc's scoped names while rewriting; their own come back after.
    own_names = {}
    for scope in scopes(named)[1:]:
        for node, name in zip(scope.graph.node, scope.names, strict=True):
            own_names[name] = node.name
            node.name = name
    if model.ir_version < 4:  # inputs that only list initializers (IR 3) are put back below
        inits = {t.name for t in named.graph.initializer}
        keep = [i for i in named.graph.input if i.name not in inits]
        del named.graph.input[:]
        named.graph.input.extend(keep)
    graph = gs.import_onnx(named)
    writer = _Writer(graph, store, prefix_rows, model_opset(model))
    by_name = _nodes_by_name(graph)
    for t in targets:
        if t.name not in factors:
            continue
        a, c = factors[t.name]
        writer.target(t, a, c, by_name)
        del a, c
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _restore_subgraphs(out.graph, own_names, {t.name for t in model.graph.initializer})
    if restore:
        for tensor in out.graph.initializer:
            if tensor.name in originals and not tensor.HasField("raw_data"):
                tensor.CopyFrom(originals[tensor.name])
    out.ir_version = model.ir_version
    if model.ir_version < 4:  # IR 3 wants every initializer listed as a graph input
        out.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in out.graph.initializer
        )
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


def _nodes_by_name(graph: gs.Graph) -> dict[str, tuple[gs.Node, gs.Graph]]:
    """Every node of ``graph`` and its subgraphs by name, with the graph it is in."""
    found = {}
    for node in graph.nodes:
        found[node.name] = (node, graph)
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    found.update(_nodes_by_name(sub))
    return found


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every subgraph nested in ``graph``'s nodes."""
    found = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                found += [sub, *_subgraphs(sub)]
    return found


def _restore_subgraphs(graph: onnx.GraphProto, own_names: dict[str, str], outer: set[str]) -> None:
    """Undo what the round trip through graphsurgeon does to subgraphs: their nodes get their
    own names back, and a constant from an enclosing graph (an original weight, or a factor
    that nodes of several branches read) is stored once in the main graph instead of once per
    subgraph that reads it."""
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for sub in _subgraphs(graph):
        for node in sub.node:
            node.name = own_names.get(node.name, node.name)
        for t in sub.initializer:
            copies.setdefault(t.name, []).append((sub, t))
    main = {t.name for t in graph.initializer}
    for name, found in copies.items():
        same = all(t.SerializeToString() == found[0][1].SerializeToString() for _, t in found)
        if not same or (name not in outer and name not in main and len(found) == 1):
            continue  # a subgraph's own constant stays where it is
        if name not in main:
            graph.initializer.append(found[0][1])
        for sub, _ in found:
            kept = [t for t in sub.initializer if t.name != name]
            del sub.initializer[:]
            sub.initializer.extend(kept)


def factor_nbytes(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Bytes of the stored tensors the writer made for each target name (its factors with their
    scales and zero points), for targets that were factorized."""
    out: dict[str, int] = {}
    wanted = set(names)
    for t in stored_tensors(model):
        owner, sep, _ = t.name.rpartition("/lowrank_")
        if sep and owner in wanted:
            out[owner] = out.get(owner, 0) + (declared_nbytes(t, t.name) or 0)
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
