"""Which nodes of a model can be factorized, their weights in the ``B: [n, m]`` orientation of
docs/design.md section 2, and why every other weight-bearing node was left alone."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flarc.core.errors import ModelError
from flarc.core.external import declared_nbytes, external_dir, tensor_array
from flarc.core.graphs import Scope, graph_node_names, producer_map, scopes
from flarc.core.weightpath import (
    PathError,
    PathTracer,
    Storage,
    WeightPath,
    consumed_shape,
    evaluate,
    path_model,
    path_nodes,
)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything of a Conv node that the patch extractor and the first factor must copy."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"

    def onnx_attrs(self) -> dict:
        """The Conv attributes that reproduce this geometry (pads, or auto_pad when set)."""
        attrs = {
            "kernel_shape": list(self.kernel_shape),
            "strides": list(self.strides),
            "dilations": list(self.dilations),
        }
        if self.auto_pad not in ("NOTSET", ""):
            attrs["auto_pad"] = self.auto_pad
        else:
            attrs["pads"] = list(self.pads)
        return attrs

    @property
    def key(self) -> str:
        return (
            f"k{'x'.join(map(str, self.kernel_shape))}_s{'x'.join(map(str, self.strides))}"
            f"_p{'x'.join(map(str, self.pads))}_d{'x'.join(map(str, self.dilations))}_{self.auto_pad}"
        )


@dataclass(frozen=True)
class Use:
    """One node that reads a target's weight."""

    node: str
    op_type: str  # MatMul | Gemm | Conv
    input: str  # the activation
    output: str
    consumed: str  # the weight tensor it reads
    transposed: bool  # reads the weight as [m, n] (Gemm transB=1)
    transposed_input: bool = False  # reads the activation as [n, tokens] (Gemm transA=1)
    graph: tuple[str, ...] = ()  # the If branch it is in (:class:`flarc.core.graphs.Scope`)


@dataclass(frozen=True)
class Target:
    """One factorizable node: ``Y = X B`` with ``B: [n, m]`` (Conv: over im2col patches)."""

    name: str  # the node's name (made unique when the model left it empty)
    op_type: str  # MatMul | Gemm | Conv
    input: str  # the activation tensor feeding the node
    output: str
    weight: str  # the constant tensor holding the weight (initializer or Constant output)
    weight_shape: tuple[int, ...]  # as stored
    n: int
    m: int
    transposed: bool  # read as [m, n] (Gemm transB=1)
    dtype: str  # numpy dtype name of the weight the node reads (its float type)
    conv: ConvGeometry | None = None
    consumed: str = ""  # the tensor the node reads (the weight itself when "")
    anchor: str = ""  # the effective float weight (docs/design.md section 2; weight when "")
    path: tuple[str, ...] = ()  # outputs of the constant-only nodes from weight to consumed
    path_ops: tuple[str, ...] = ()  # their op types (what inspect shows)
    storage: Storage = field(default_factory=Storage)
    uses: tuple[Use, ...] = ()  # every node that reads the weight (when more than this one)
    transposed_input: bool = False  # Gemm transA=1: the activation is read as [n, tokens]
    graph: tuple[str, ...] = ()  # the If branch the node is in (() is the main graph)

    @property
    def all_uses(self) -> tuple[Use, ...]:
        """Every node that reads the weight, this target's node first."""
        if self.uses:
            return self.uses
        return (Use(self.name, self.op_type, self.input, self.output, self.consumed or self.weight,
                    self.transposed, self.transposed_input, self.graph),)  # fmt: skip

    @property
    def elem_type(self) -> int:
        """The ONNX element type of the weight the node reads."""
        return helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))

    @property
    def params(self) -> int:
        return self.n * self.m

    @property
    def k_equiv(self) -> float:
        """Ranks below this save parameters: ``k (n + m) < n m``."""
        return self.n * self.m / (self.n + self.m)

    @property
    def stat_key(self) -> str:
        """Targets with the same key share one input statistic (q, k and v share their input;
        a weight read by several nodes sums the rows of all of them)."""
        inputs = "+".join(("T:" if u.transposed_input else "") + u.input for u in self.all_uses)
        return inputs if self.conv is None else f"{inputs}|{self.conv.key}"

    def rank_params(self, k: int) -> int:
        """Parameters of the rank-``k`` factor pair: ``k (n + m)``."""
        return k * (self.n + self.m)

    def to_dict(self) -> dict:
        """The target's fields as a dict (``asdict``), with ``k_equiv`` added."""
        d = asdict(self)
        d["k_equiv"] = self.k_equiv
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        """Inverse of :meth:`to_dict` (lists from JSON become tuples again)."""
        fields = {k: v for k, v in d.items() if k != "k_equiv"}
        fields["weight_shape"] = tuple(fields["weight_shape"])
        fields["path"] = tuple(fields.get("path", ()))
        fields["path_ops"] = tuple(fields.get("path_ops", ()))
        fields["graph"] = tuple(fields.get("graph", ()))
        if fields.get("conv"):
            fields["conv"] = ConvGeometry(
                **{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields["conv"].items()}
            )
        if isinstance(fields.get("storage"), dict):
            fields["storage"] = Storage(**fields["storage"])
        fields["uses"] = tuple(
            Use(**{**u, "graph": tuple(u.get("graph", ()))}) for u in fields.get("uses", ())
        )
        return cls(**fields)


@dataclass(frozen=True)
class Skipped:
    """A weight-bearing node that is not a target, and why."""

    node: str
    op_type: str
    reason: str


@dataclass
class TargetSet:
    """A model's targets and the nodes skipped."""

    targets: list[Target] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def by_name(self) -> dict[str, Target]:
        """The targets by node name."""
        return {t.name: t for t in self.targets}


def node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's nodes as flarc refers to them: the model's own, or
    ``<op>_<index>`` when empty (made unique)."""
    return graph_node_names(model.graph)


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name: initializers and the outputs of Constant nodes with a tensor value."""
    consts = graph_constants(model.graph)
    # From IR 4 an initializer that is also a graph input can be overridden at run time: not
    # constant. Before IR 4 every initializer had to be listed as an input (old exporters).
    if model.ir_version >= 4:
        inits = {t.name for t in model.graph.initializer}
        for i in model.graph.input:
            if i.name in inits:
                del consts[i.name]
    return consts


def graph_constants(
    graph: onnx.GraphProto, outer: Mapping[str, onnx.TensorProto] | None = None
) -> dict[str, onnx.TensorProto]:
    """Constants a subgraph sees: those of its enclosing graphs, its own initializers and the
    outputs of its Constant nodes."""
    consts = dict(outer or {})
    consts.update((t.name, t) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    consts[node.output[0]] = tensor
    return consts


def all_constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constants of every graph of the model (subgraphs' own included), by name."""
    consts = constant_tensors(model)
    for scope in scopes(model)[1:]:
        consts.update(graph_constants(scope.graph))
    return consts


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Ops that carry weights flarc cannot factorize, and what to do instead (listed as skipped).
_DYNAMIC = (
    "dynamically quantized (integer weights and activations); compress the float model, then "
    "quantize it again (onnxruntime.quantization.quantize_dynamic)"
)
_QOPERATOR = (
    "a statically quantized operator (QOperator format); quantize to the QDQ format instead "
    "(quantize_static with quant_format=QuantFormat.QDQ), which flarc compresses, or compress "
    "the float model first"
)
UNSUPPORTED = {
    "MatMulInteger": _DYNAMIC,
    "ConvInteger": _DYNAMIC,
    "DynamicQuantizeMatMul": _DYNAMIC,
    "QLinearMatMul": _QOPERATOR,
    "QLinearConv": _QOPERATOR,
    "QGemm": _QOPERATOR,
    "MatMulNBits": (
        "4-bit block-quantized weights (onnxruntime-genai); compress the float model, then "
        "quantize it"
    ),
    "ConvTranspose": "a transposed convolution; not factorized",
}
TARGET_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class _Candidate:
    """One node that could be a target, before nodes reading the same weight are grouped."""

    use: Use
    path: WeightPath
    dims: tuple[int, ...]
    n: int
    m: int
    conv: ConvGeometry | None
    producers: tuple[str, ...]  # flarc names of the path's nodes


def _layout_signature(producer: Mapping[str, onnx.NodeProto], path: WeightPath) -> tuple:
    """What the layout nodes of a path do, Identity left out: equal signatures read the anchor
    in the same layout."""
    layout = dataclasses.replace(path, storage_nodes=())
    sig = []
    for node in path_nodes(layout, producer):
        if node.op_type != "Identity":
            attrs = tuple(
                sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
            )
            sig.append((node.op_type, attrs, tuple(node.input[1:])))
    return tuple(sig)


def _geometry(node: onnx.NodeProto, dims: tuple[int, ...]) -> ConvGeometry:
    spatial = dims[2:]
    nd = len(spatial)
    return ConvGeometry(
        kernel_shape=tuple(int(v) for v in _attr(node, "kernel_shape", spatial)),
        strides=tuple(int(v) for v in _attr(node, "strides", [1] * nd)),
        pads=tuple(int(v) for v in _attr(node, "pads", [0] * (2 * nd))),
        dilations=tuple(int(v) for v in _attr(node, "dilations", [1] * nd)),
        auto_pad=_text(_attr(node, "auto_pad", "NOTSET")),
    )


def find_targets(
    model: onnx.ModelProto, include: str | None = None, exclude: str | None = None
) -> TargetSet:
    """Find MatMul/Gemm/Conv nodes whose weight comes from stored constants through a weight
    path; nodes that read the same weight are one target; explain every node that is skipped."""
    consts_of: dict[tuple[str, ...], dict[str, onnx.TensorProto]] = {}
    nodes_of: dict[tuple[str, ...], list[tuple[onnx.NodeProto, str]]] = {}
    local_of: dict[tuple[str, ...], set[str]] = {}
    loop_of: dict[tuple[str, ...], str] = {}  # the Loop/Scan a graph is inside ("" if none)
    scope_of_node: dict[str, Scope] = {}
    readers: dict[str, list[str]] = defaultdict(list)
    graph_outputs: set[str] = set()
    by_node: dict[str, onnx.NodeProto] = {}
    producer = producer_map(model)  # the path nodes of every candidate, looked up once
    for sc in scopes(model):
        parent = sc.path[:-2]
        if not sc.path:
            consts_of[()] = constant_tensors(model)
            nodes_of[()] = []
            loop_of[()] = ""
        else:
            consts_of[sc.path] = graph_constants(sc.graph, consts_of[parent])
            nodes_of[sc.path] = list(nodes_of[parent])
            loop_of[sc.path] = loop_of[parent] or (sc.kind if sc.kind in ("Loop", "Scan") else "")
        nodes_of[sc.path] += list(zip(sc.graph.node, sc.names, strict=True))
        local_of[sc.path] = {t.name for t in sc.graph.initializer} | {
            o for n in sc.graph.node for o in n.output
        }
        graph_outputs |= {o.name for o in sc.graph.output}
        for node, name in zip(sc.graph.node, sc.names, strict=True):
            by_node[name] = node
            scope_of_node[name] = sc
            for i in dict.fromkeys(i for i in node.input if i):
                readers[i].append(name)
    names = list(by_node)
    tracers: dict[tuple[str, ...], PathTracer] = {}
    result = TargetSet()
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    groups: dict[tuple[str, tuple[str, ...]], list[_Candidate]] = {}

    def defined_in(anchor: str, path: tuple[str, ...]) -> tuple[str, ...]:
        """The innermost graph enclosing ``path`` that defines ``anchor``."""
        while path and anchor not in local_of[path]:
            path = path[:-2]
        return path

    for name, node in by_node.items():
        op = node.op_type
        scope = scope_of_node[name]

        def skip(reason: str, node=node, name=name) -> None:
            result.skipped.append(Skipped(name, node.op_type, reason))

        if op in UNSUPPORTED and node.domain in ("", "ai.onnx", "com.microsoft"):
            skip(UNSUPPORTED[op])
            continue
        if node.domain not in ("", "ai.onnx") or op not in TARGET_OPS:
            continue
        if loop_of[scope.path]:
            skip(
                f"inside a {loop_of[scope.path]} body (statistics over its iterations are not "
                "gathered); left dense"
            )
            continue
        if len(node.input) < 2:
            skip("fewer than two inputs")
            continue
        consts = consts_of[scope.path]
        if scope.path not in tracers:
            tracers[scope.path] = PathTracer(nodes_of[scope.path], consts)
        tracer = tracers[scope.path]
        try:
            path = tracer.trace(node.input[1])
        except PathError as why:
            if node.input[0] in consts:
                skip("weight is the first input (Y = W X); not supported")
            else:
                skip(str(why))
            continue
        dims = consumed_shape(model, path, consts, producer)
        if dims is None:
            skip(f"the shape of weight '{path.source}' after its path is unknown")
            continue
        conv, transposed, transposed_input = None, False, False
        if op == "MatMul":
            if len(dims) != 2:
                skip(f"weight '{path.source}' is {len(dims)}-D (a batched MatMul); not factorized")
                continue
            n, m = dims
        elif op == "Gemm":
            if len(dims) != 2:
                skip("Gemm weight is not 2-D")
                continue
            transposed = bool(_attr(node, "transB", 0))
            transposed_input = bool(_attr(node, "transA", 0))
            n, m = (dims[1], dims[0]) if transposed else dims
        else:  # Conv
            group = int(_attr(node, "group", 1))
            if len(dims) < 3:
                skip("Conv weight is not a kernel (fewer than 3 axes)")
                continue
            if group != 1:
                kind = "depthwise" if group == dims[0] and dims[1] == 1 else "grouped"
                skip(f"{kind} convolution (group={group})")
                continue
            conv = _geometry(node, dims)
            m, n = dims[0], int(np.prod(dims[1:]))
        if min(n, m) < 2:
            skip(f"weight '{path.source}' has a dimension below 2 ({n}x{m})")
            continue
        use = Use(
            name, op, node.input[0], node.output[0], node.input[1], transposed, transposed_input,
            scope.path,
        )  # fmt: skip
        producers = tuple(tracer.producer[o][1] for o in path.nodes)
        key = (path.anchor, defined_in(path.anchor, scope.path))
        groups.setdefault(key, []).append(_Candidate(use, path, dims, n, m, conv, producers))

    for (anchor, _), group in groups.items():
        first = group[0]
        uses = [c.use for c in group]
        node_names_ = {u.node for u in uses}

        def skip_all(reason: str, uses=uses) -> None:
            result.skipped.extend(Skipped(u.node, u.op_type, reason) for u in uses)

        # Every tensor from the anchor to a node may only be read by the path and that node.
        allowed = node_names_ | {
            c.producers[c.path.nodes.index(o)] for c in group for o in c.path.layout_nodes
        }
        tensors = {anchor} | {o for c in group for o in (*c.path.layout_nodes, c.use.consumed)}
        other = sorted({r for x in tensors for r in readers[x] if r not in allowed})
        if other:
            reader = by_node[other[0]]
            skip_all(
                f"weight '{first.path.source}' is also read by {reader.op_type} node '{other[0]}'; "
                "left dense, not duplicated"
            )
            continue
        if tensors & graph_outputs:
            skip_all(f"weight '{first.path.source}' is a graph output; left dense")
            continue
        key = (first.n, first.m, first.conv, first.use.op_type == "Conv", first.dims)
        layout = _layout_signature(producer, first.path)
        for c in group[1:]:
            same = (c.n, c.m, c.conv, c.use.op_type == "Conv", c.dims) == key
            if (
                not same
                or c.use.transposed != first.use.transposed
                or _layout_signature(producer, c.path) != layout
            ):
                skip_all(
                    f"nodes '{first.use.node}' and '{c.use.node}' read weight "
                    f"'{first.path.source}' in different layouts; left dense"
                )
                break
        else:
            if inc and not any(inc.search(u.node) for u in uses):
                skip_all(f"not matched by --include '{include}'")
                continue
            if exc and any(exc.search(u.node) for u in uses):
                skip_all(f"matched by --exclude '{exclude}'")
                continue
            path = first.path
            result.targets.append(
                Target(
                    name=first.use.node,
                    op_type=first.use.op_type,
                    input=first.use.input,
                    output=first.use.output,
                    weight=path.source,
                    weight_shape=first.dims,
                    n=first.n,
                    m=first.m,
                    transposed=first.use.transposed,
                    dtype=path.dtype,
                    conv=first.conv,
                    consumed=first.use.consumed if first.use.consumed != path.source else "",
                    anchor=path.anchor if path.anchor != path.source else "",
                    path=path.nodes,
                    path_ops=tuple(by_node[p].op_type for p in first.producers),
                    storage=path.storage,
                    uses=tuple(uses) if len(uses) > 1 else (),
                    transposed_input=first.use.transposed_input,
                    graph=first.use.graph,
                )
            )
    order = {name: i for i, name in enumerate(names)}
    result.targets.sort(key=lambda t: order[t.name])
    result.skipped.sort(key=lambda s: order.get(s.node, len(order)))
    return result


def stored_bytes(model: onnx.ModelProto, targets: list[Target]) -> dict[str, int]:
    """Bytes each target's weight takes in the file: its stored tensor and the constants its
    path reads (scales, zero points), by target name."""
    consts = all_constant_tensors(model)
    producer = producer_map(model)
    out = {}
    for t in targets:
        names = {t.weight}
        for o in t.path:
            node = producer.get(o)
            names.update(i for i in (node.input if node is not None else ()) if i in consts)
        out[t.name] = sum(declared_nbytes(consts[n], n) or 0 for n in names)
    return out


def require_targets(targets: TargetSet, path: str) -> None:
    """Raise ModelError (naming ``path`` and up to three skip reasons) when ``targets`` holds no
    target."""
    if not targets.targets:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in targets.skipped[:3])
        more = f" (skipped: {reasons})" if reasons else ""
        raise ModelError(
            f"{path}: no MatMul, Gemm or Conv node with a constant weight to factorize{more}"
        )


class Weights:
    """A model's constant tensors as arrays: read from the proto, or for a lazily loaded model
    mapped read-only from its data files; and each target's weight as its node reads it (its
    weight path evaluated). The one place that asks where a weight's bytes are."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.tensors = all_constant_tensors(model)
        self.folder = external_dir(model)
        self._producer: dict[str, onnx.NodeProto] | None = None

    @property
    def lazy(self) -> bool:
        """Whether the weights stay in the model's data files (a large model)."""
        return self.folder is not None

    def array(self, name: str) -> np.ndarray:
        """The constant ``name`` as stored (a read-only map for a lazy model)."""
        return tensor_array(self.tensors[name], self.folder)

    def _evaluated(self, target: Target, output: str) -> np.ndarray:
        path = WeightPath(
            target.weight,
            target.anchor or target.weight,
            target.consumed or target.weight,
            tuple(o for o in target.path if o not in self.layout(target)),
            self.layout(target),
            target.storage,
            target.dtype,
        )
        if self._producer is None:
            self._producer = producer_map(self.model)
        graph = path_model(self.model, path, self.tensors, output, self._producer)
        return evaluate(graph, LazyArrays(self))

    def layout(self, target: Target) -> tuple[str, ...]:
        """The layout part of the target's path (after its anchor)."""
        anchor = target.anchor or target.weight
        return (
            target.path[target.path.index(anchor) + 1 :] if anchor in target.path else target.path
        )

    def consumed(self, target: Target) -> np.ndarray:
        """The weight as the target's node reads it, in the node's float type."""
        if not target.path:
            return self.array(target.weight)
        return self._evaluated(target, target.consumed or target.weight)

    def anchor(self, target: Target) -> np.ndarray:
        """The effective float weight (before any layout node)."""
        if not target.anchor:
            return self.array(target.weight)
        return self._evaluated(target, target.anchor)

    def view(self, target: Target) -> np.ndarray:
        """``B: [n, m]`` of ``target`` in its float type (a view where possible)."""
        return weight_view(target, self.consumed(target))

    def matrix(self, target: Target) -> np.ndarray:
        """``B: [n, m]`` of ``target`` in float64."""
        return weight_matrix(target, self.consumed(target))


class LazyArrays(Mapping):
    """Constant arrays by name, each read when looked up (what a weight path reads)."""

    def __init__(self, weights: Weights) -> None:
        self.weights = weights

    def __getitem__(self, name: str) -> np.ndarray:
        return self.weights.array(name)

    def __iter__(self):
        return iter(self.weights.tensors)

    def __len__(self) -> int:
        return len(self.weights.tensors)


def weight_view(target: Target, tensor: onnx.TensorProto | np.ndarray) -> np.ndarray:
    """The target's weight as ``B: [n, m]`` in its stored dtype, a view where possible."""
    w = numpy_helper.to_array(tensor) if isinstance(tensor, onnx.TensorProto) else tensor
    if target.op_type == "Conv":
        return w.reshape(target.m, target.n).T
    return w.T if target.transposed else w


def weight_matrix(target: Target, tensor: onnx.TensorProto | np.ndarray) -> np.ndarray:
    """The target's weight as ``B: [n, m]`` in float64 (Conv: rows in (c, kh, kw) order)."""
    return np.asarray(weight_view(target, tensor), dtype=np.float64)


def stored_weight(target: Target, b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`weight_matrix`: ``B [n, m]`` back in the layout and dtype the model stores."""
    b = np.asarray(b)
    if target.op_type == "Conv":
        w = b.T.reshape(target.weight_shape)
    else:
        w = b.T if target.transposed else b
    return np.ascontiguousarray(w.astype(np.dtype(target.dtype)))
