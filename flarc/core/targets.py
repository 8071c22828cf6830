"""Which nodes of a model can be factorized, their weights in the ``B: [n, m]`` orientation of
docs/design.md section 2, and why every other weight-bearing node was left alone."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from flarc.core.errors import ModelError
from flarc.core.external import external_dir, tensor_array


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
    transposed: bool  # stored as [m, n] (Gemm transB=1 or a Transpose in front of MatMul)
    dtype: str  # numpy dtype name of the stored weight
    conv: ConvGeometry | None = None

    @property
    def params(self) -> int:
        return self.n * self.m

    @property
    def k_equiv(self) -> float:
        """Ranks below this save parameters: ``k (n + m) < n m``."""
        return self.n * self.m / (self.n + self.m)

    @property
    def stat_key(self) -> str:
        """Targets with the same key share one input statistic (q, k and v share their input)."""
        return self.input if self.conv is None else f"{self.input}|{self.conv.key}"

    def rank_params(self, k: int) -> int:
        """Parameters of the rank-``k`` factor pair: ``k (n + m)``."""
        return k * (self.n + self.m)

    def to_dict(self) -> dict:
        """The target's fields as a dict (``asdict``), with ``k_equiv`` added."""
        d = asdict(self)
        d["k_equiv"] = self.k_equiv
        return d


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
    """Node names as flarc refers to them: the model's own, or ``<op>_<index>`` when empty."""
    seen: Counter[str] = Counter()
    names = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return names


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name: initializers and the outputs of Constant nodes with a tensor value."""
    consts = {t.name: t for t in model.graph.initializer}
    # From IR 4 an initializer that is also a graph input can be overridden at run time: not
    # constant. Before IR 4 every initializer had to be listed as an input (old exporters).
    graph_inputs = {i.name for i in model.graph.input} if model.ir_version >= 4 else set()
    for name in list(consts):
        if name in graph_inputs:
            del consts[name]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    consts[node.output[0]] = tensor
    return consts


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


FLOAT_WEIGHTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def find_targets(
    model: onnx.ModelProto, include: str | None = None, exclude: str | None = None
) -> TargetSet:
    """Find MatMul/Gemm/Conv nodes with constant weights; explain every node that is skipped."""
    graph = model.graph
    names = node_names(model)
    consts = constant_tensors(model)
    producers = {out: (i, node) for i, node in enumerate(graph.node) for out in node.output}
    uses: Counter[str] = Counter(inp for node in graph.node for inp in node.input if inp)
    graph_outputs = {o.name for o in graph.output}
    result = TargetSet()
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None

    def weight_source(tensor_name: str) -> tuple[str | None, bool]:
        """The constant behind a weight input, and whether a Transpose sits in between."""
        if tensor_name in consts:
            return tensor_name, False
        prod = producers.get(tensor_name)
        if prod and prod[1].op_type == "Transpose" and prod[1].input[0] in consts:
            perm = list(_attr(prod[1], "perm", []))
            if perm in ([1, 0], []) and len(consts[prod[1].input[0]].dims) == 2:
                return prod[1].input[0], True
        return None, False

    for i, node in enumerate(graph.node):
        name = names[i]
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue

        def skip(reason: str, node=node, name=name) -> None:
            result.skipped.append(Skipped(name, node.op_type, reason))

        if len(node.input) < 2:
            skip("fewer than two inputs")
            continue
        weight_name, via_transpose = weight_source(node.input[1])
        if weight_name is None:
            if node.input[0] in consts:
                skip("weight is the first input (Y = W X); not supported")
            else:
                skip("second input is not a constant (activation x activation)")
            continue
        tensor = consts[weight_name]
        dims = tuple(int(d) for d in tensor.dims)
        if tensor.data_type not in FLOAT_WEIGHTS:
            skip(
                f"weight '{weight_name}' has type {onnx.TensorProto.DataType.Name(tensor.data_type)}"
            )
            continue
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        n_uses = uses[weight_name]
        if via_transpose:
            n_uses += uses[node.input[1]] - 1
        if n_uses > 1 or weight_name in graph_outputs:
            skip(
                f"weight '{weight_name}' is shared by {n_uses} nodes (tied); left dense, not duplicated"
            )
            continue
        conv = None
        if node.op_type == "MatMul":
            if len(dims) != 2:
                skip(f"weight '{weight_name}' is {len(dims)}-D, not 2-D")
                continue
            n, m = (dims[1], dims[0]) if via_transpose else dims
            transposed = via_transpose
        elif node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                skip("Gemm with transA=1 is not supported")
                continue
            if via_transpose or len(dims) != 2:
                skip("Gemm weight is not a plain 2-D constant")
                continue
            transposed = bool(_attr(node, "transB", 0))
            n, m = (dims[1], dims[0]) if transposed else dims
        else:  # Conv
            group = int(_attr(node, "group", 1))
            if via_transpose or len(dims) < 3:
                skip("Conv weight is not a plain constant")
                continue
            if group != 1:
                kind = "depthwise" if group == dims[0] and dims[1] == 1 else "grouped"
                skip(f"{kind} convolution (group={group})")
                continue
            spatial = dims[2:]
            nd = len(spatial)
            kernel = tuple(int(v) for v in _attr(node, "kernel_shape", spatial))
            conv = ConvGeometry(
                kernel_shape=kernel,
                strides=tuple(int(v) for v in _attr(node, "strides", [1] * nd)),
                pads=tuple(int(v) for v in _attr(node, "pads", [0] * (2 * nd))),
                dilations=tuple(int(v) for v in _attr(node, "dilations", [1] * nd)),
                auto_pad=_text(_attr(node, "auto_pad", "NOTSET")),
            )
            m = dims[0]
            n = int(np.prod(dims[1:]))
            transposed = False
        if min(n, m) < 2:
            skip(f"weight '{weight_name}' has a dimension below 2 ({n}x{m})")
            continue
        if inc and not inc.search(name):
            skip(f"not matched by --include '{include}'")
            continue
        if exc and exc.search(name):
            skip(f"matched by --exclude '{exclude}'")
            continue
        result.targets.append(
            Target(
                name=name,
                op_type=node.op_type,
                input=node.input[0],
                output=node.output[0],
                weight=weight_name,
                weight_shape=dims,
                n=n,
                m=m,
                transposed=transposed,
                dtype=dtype,
                conv=conv,
            )
        )
    return result


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
    mapped read-only from its data files. The one place that asks where a weight's bytes are."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.tensors = constant_tensors(model)
        self.folder = external_dir(model)

    @property
    def lazy(self) -> bool:
        """Whether the weights stay in the model's data files (a large model)."""
        return self.folder is not None

    def array(self, name: str) -> np.ndarray:
        """The constant ``name`` as stored (a read-only map for a lazy model)."""
        return tensor_array(self.tensors[name], self.folder)

    def view(self, target: Target) -> np.ndarray:
        """``B: [n, m]`` of ``target`` in its stored dtype (a view where possible)."""
        return weight_view(target, self.array(target.weight))

    def matrix(self, target: Target) -> np.ndarray:
        """``B: [n, m]`` of ``target`` in float64."""
        return weight_matrix(target, self.array(target.weight))


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
