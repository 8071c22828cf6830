"""The onnxruntime form of a bucket graph: each row-prefix pair as two nodes.

On disk a MatMul target's row-prefix pair is portable ONNX (:mod:`flarc.rewrite.pairs`): Gemm
is 2-D only, so the activation is flattened, multiplied by ``A^T`` (``transB=1``) and ``C``, and
reshaped back to its leading dims, a Shape/Slice/Concat per activation. At batch 1 decode these
seven small nodes per target cost about as much as the arithmetic they wrap (measured on
Qwen2.5-0.5B: 6481 nodes against 5611 dense). onnxruntime's ``FusedMatMul`` (``com.microsoft``)
takes the activation as it is and ``A^T`` with ``transB=1``, so each pair becomes

    Reshape(MatMul(Gemm(Reshape(X, [-1, n]), A^T, transB=1), C), lead(X) + [m])
        ->  MatMul(FusedMatMul(X, A^T, transB=1), C)

with the same initializers (still views of the shared buffers) and the same outputs. The file is
not changed: this form is made in memory for an onnxruntime session only.

Sessions sharing their weights cannot prepack them, and unprepacked, onnxruntime's MatMul is
slow on a constant ``B [K, N]`` with a large ``K`` (Qwen2.5-0.5B's down projection, 4864 x 896:
3.9x slower at batch 1 than ``FusedMatMul`` over ``B^T`` with ``transB=1``; 24 such layers
streamed: 60.4 -> 49.4 ms). :func:`transpose_matmul_weights` turns such MatMuls into that form;
the caller supplies the transposed weights.
"""

from __future__ import annotations

import onnx
from onnx import helper

from flarc.core.graphs import prune_to_outputs, scopes

FUSED_DOMAIN = "com.microsoft"


def fuse_prefix_pairs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every flattened row-prefix pair as FusedMatMul -> MatMul, and the
    number of pairs fused."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(first node of a pair) -> its new nodes
    removed: set[int] = set()
    for flat in graph.node:
        pair = _pair(flat, consumers)
        if pair is None:
            continue
        gemm, matmul, unflat = pair
        fused = helper.make_node(
            "FusedMatMul",
            [flat.input[0], gemm.input[1]],
            [gemm.output[0]],
            name=gemm.name,
            domain=FUSED_DOMAIN,
            transB=1,
        )
        second = helper.make_node(
            "MatMul", [gemm.output[0], matmul.input[1]], [unflat.output[0]], name=matmul.name
        )
        replaced[id(flat)] = [fused, second]
        removed |= {id(gemm), id(matmul), id(unflat)}
    if not replaced:
        return out, 0
    nodes = []
    for n in graph.node:
        if id(n) in replaced:
            nodes.extend(replaced[id(n)])
        elif id(n) not in removed:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    prune_to_outputs(graph)  # the shape arithmetic of the removed reshapes
    if not any(o.domain == FUSED_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    return out, len(replaced)


def _pair(
    flat: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]
) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
    """``(Gemm, MatMul, Reshape)`` after the flattening Reshape ``flat`` of a pair written by the
    row-prefix writer, each the only reader of the one before; None for any other Reshape."""
    if flat.op_type != "Reshape" or not flat.name.endswith("/lowrank_flat"):
        return None
    chain = []
    current = flat
    for op in ("Gemm", "MatMul", "Reshape"):
        readers = consumers.get(current.output[0], [])
        if len(readers) != 1 or readers[0].op_type != op:
            return None
        current = readers[0]
        chain.append(current)
    gemm, matmul, unflat = chain
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if len(gemm.input) != 2 or attrs != {"transB": 1} or matmul.input[0] != gemm.output[0]:
        return None
    return gemm, matmul, unflat


def transposed_weight_candidates(
    model: onnx.ModelProto, names: set[str] | frozenset[str]
) -> set[str]:
    """The 2-D initializers among ``names`` that every reader, in any graph, uses as a main-graph
    MatMul's ``B`` (and no graph output exposes): those :func:`transpose_matmul_weights` may store transposed."""
    graph = model.graph
    dims = {t.name: len(t.dims) for t in graph.initializer if t.name in names}
    outputs = {o.name for o in graph.output}
    ok = {name for name, rank in dims.items() if rank == 2 and name not in outputs}
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in ok and not (
                n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and i == 1
            ):
                ok.discard(name)
    for scope in scopes(model)[1:]:  # a subgraph's reader is not rewritten: keep its layout
        ok.difference_update(i for n in scope.graph.node for i in n.input)
    return ok


def transpose_matmul_weights(model: onnx.ModelProto, names: set[str]) -> int:
    """In place: every MatMul reading one of ``names`` (see
    :func:`transposed_weight_candidates`) becomes ``FusedMatMul(A, B^T, transB=1)``, and those
    initializers are declared transposed (``[N, K]``; their data is the caller's). Returns the
    number of nodes changed."""
    graph = model.graph
    changed = 0
    for i, n in enumerate(graph.node):
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in names:
            graph.node[i].CopyFrom(
                helper.make_node(
                    "FusedMatMul", list(n.input), list(n.output), name=n.name,
                    domain=FUSED_DOMAIN, transB=1,
                )
            )  # fmt: skip
            changed += 1
    for t in graph.initializer:
        if t.name in names:
            t.dims[:] = [t.dims[1], t.dims[0]]
    if changed and not any(o.domain == FUSED_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    return changed
