"""How a node's weight is reached from the bytes the file stores (docs/design.md section 2).

A weight path is a chain of constant-only nodes from stored tensors to the tensor a MatMul,
Gemm or Conv reads. Read from the node backwards it has two parts:

    stored tensor(s) --[storage]--> anchor --[layout]--> consumed tensor --> node

- *layout*: Identity, Transpose, Reshape, Squeeze, Unsqueeze, Flatten (their other inputs
  constant). They change where the numbers are, not what they are.
- *storage*: how the numbers are stored. ``float`` (the anchor is the stored tensor), ``cast``
  (fp16/bf16 behind a Cast), ``qdq`` (int8/uint8/int4/uint4 behind DequantizeLinear, per tensor,
  per axis or blocked, with or without zero point), ``scaled`` (the older integer ->
  Cast -> [Sub(zero point)] -> Mul(scale) pattern).

The anchor is the effective float weight. Several nodes that read the same anchor share one
weight; flarc factorizes it once. Paths are evaluated by onnxruntime, so every form means
exactly what the deployed model computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flarc.core.graphs import producer_map

LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
)
INT_TYPES = (
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
)


def np_name(data_type: int) -> str:
    """The numpy dtype name of an ONNX element type (``float32``, ``float16``, ``bfloat16``)."""
    return str(helper.tensor_dtype_to_np_dtype(data_type))


def type_name(data_type: int) -> str:
    """``float16``, ``int8``, ... for an ONNX element type (its TensorProto name, lower case)."""
    return onnx.TensorProto.DataType.Name(data_type).lower()


@dataclass(frozen=True)
class Storage:
    """How a weight's numbers are stored, and how they become floats."""

    kind: str = "float"  # float | cast | qdq | scaled
    dtype: str = ""  # stored element type (type_name); "" for float: the weight's own type
    axis: int | None = None  # the quantization axis (per axis or blocked)
    block_size: int = 0  # DequantizeLinear's blocked quantization
    zero_point: bool = False  # a zero point is stored
    per: str = "tensor"  # tensor | axis | block (quantized forms)

    @property
    def label(self) -> str:
        """One phrase for tables: ``float32``, ``float16 -> Cast``, ``int8 QDQ per axis``..."""
        if self.kind == "float":
            return self.dtype or "float"
        if self.kind == "cast":
            return f"{self.dtype} -> Cast"
        zp = " + zero point" if self.zero_point else ""
        if self.kind == "qdq":
            block = f" (block {self.block_size})" if self.per == "block" else ""
            return f"{self.dtype} QDQ per {self.per}{block}{zp}"
        return f"{self.dtype} -> Cast -> Mul(scale){zp}"


@dataclass(frozen=True)
class WeightPath:
    """The constant-only nodes between the stored tensors and the tensor a node reads."""

    source: str  # the stored weight (its bytes)
    anchor: str  # the effective float weight
    consumed: str  # what the node reads
    storage_nodes: tuple[str, ...]  # output names of the storage nodes, source side first
    layout_nodes: tuple[str, ...]  # output names of the layout nodes, anchor side first
    storage: Storage
    dtype: str  # numpy name of the float type the node reads

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node's output on the path, source side first."""
        return (*self.storage_nodes, *self.layout_nodes)


class PathError(Exception):
    """Why a tensor is not reached from stored bytes by constant-only nodes (a skip reason)."""


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class PathTracer:
    """Traces weight paths in one graph (its constants and node producers are indexed once)."""

    def __init__(
        self,
        nodes: Iterable[tuple[onnx.NodeProto, str]],
        consts: Mapping[str, onnx.TensorProto],
    ) -> None:
        """``nodes``: (node, flarc name) of the graph and of every graph enclosing it."""
        self.consts = consts
        self.producer = {o: (node, name) for node, name in nodes for o in node.output}

    def _node(self, tensor: str) -> onnx.NodeProto | None:
        found = self.producer.get(tensor)
        return None if found is None else found[0]

    def _name(self, tensor: str) -> str:
        return self.producer[tensor][1]

    def _constant_inputs(self, node: onnx.NodeProto, skip: int = 1) -> bool:
        return all(not i or i in self.consts for i in node.input[skip:])

    def _through_layout(self, tensor: str, nodes: list[str]) -> str:
        """Walk back through layout nodes (recording their outputs) while their extra inputs
        are constant; the first tensor that is not a layout node's output."""
        while tensor not in self.consts:
            node = self._node(tensor)
            if node is None or node.op_type not in LAYOUT_OPS or node.domain not in ("", "ai.onnx"):
                return tensor
            if not self._constant_inputs(node):
                raise PathError(
                    f"{node.op_type} node '{self._name(tensor)}' has a non-constant input"
                )
            nodes.append(tensor)
            tensor = node.input[0]
        return tensor

    def _constant(self, tensor: str, nodes: list[str], what: str) -> onnx.TensorProto:
        source = self._through_layout(tensor, nodes)
        if source not in self.consts:
            node = self._node(source)
            where = (
                f"{node.op_type} node '{self._name(source)}'" if node is not None else "an input"
            )
            raise PathError(f"{what} comes from {where}, not from stored constants")
        return self.consts[source]

    def trace(self, consumed: str) -> WeightPath:
        """The path to ``consumed``; PathError naming what breaks it."""
        layout: list[str] = []
        anchor = self._through_layout(consumed, layout)
        layout.reverse()
        if anchor in self.consts:
            t = self.consts[anchor]
            if t.data_type not in FLOAT_TYPES:
                raise PathError(
                    f"weight '{anchor}' has type {onnx.TensorProto.DataType.Name(t.data_type)} "
                    "and no dequantization"
                )
            storage = Storage("float", type_name(t.data_type))
            return WeightPath(
                anchor, anchor, consumed, (), tuple(layout), storage, np_name(t.data_type)
            )
        node = self._node(anchor)
        if node is None:
            raise PathError("second input is not a constant (activation x activation)")
        storage_nodes: list[str] = []
        if node.domain in ("", "ai.onnx") and node.op_type == "Cast":
            to = int(_attr(node, "to", 0))
            src = self._constant(node.input[0], storage_nodes, "Cast input")
            if to not in FLOAT_TYPES:
                raise PathError(
                    f"Cast node '{self._name(anchor)}' casts the weight to an integer type"
                )
            if src.data_type not in FLOAT_TYPES:
                raise PathError(
                    f"Cast node '{self._name(anchor)}' turns integer '{src.name}' into floats "
                    "with no scale"
                )
            storage = Storage("cast", type_name(src.data_type))
            dtype = np_name(to)
        elif node.domain in ("", "ai.onnx") and node.op_type == "DequantizeLinear":
            src = self._constant(node.input[0], storage_nodes, "DequantizeLinear input")
            scale = self._constant(node.input[1], storage_nodes, "DequantizeLinear scale")
            zp = len(node.input) > 2 and bool(node.input[2])
            if zp:
                self._constant(node.input[2], storage_nodes, "DequantizeLinear zero point")
            if src.data_type not in INT_TYPES:
                raise PathError(
                    f"DequantizeLinear node '{self._name(anchor)}' reads "
                    f"{onnx.TensorProto.DataType.Name(src.data_type)}, not 8- or 4-bit integers"
                )
            block = int(_attr(node, "block_size", 0))
            per = "block" if block else ("tensor" if int(np.prod(scale.dims)) == 1 else "axis")
            axis = int(_attr(node, "axis", 1)) if per != "tensor" else None
            storage = Storage("qdq", type_name(src.data_type), axis, block, zp, per)
            dtype = np_name(scale.data_type)
        elif node.domain in ("", "ai.onnx") and node.op_type == "Mul":
            storage, src, dtype = self._scaled(node, anchor, storage_nodes)
        else:
            raise PathError(
                f"weight comes from {node.op_type} node '{self._name(anchor)}' (not a "
                "constant-only weight path)"
            )
        storage_nodes.reverse()
        return WeightPath(
            src.name, anchor, consumed, (*storage_nodes, anchor), tuple(layout), storage, dtype
        )

    def _scaled(
        self, mul: onnx.NodeProto, anchor: str, nodes: list[str]
    ) -> tuple[Storage, onnx.TensorProto, str]:
        """The older pattern: integer -> Cast -> [Sub(zero point)] -> Mul(scale)."""
        for i in (0, 1):
            scale, other = mul.input[1 - i], mul.input[i]
            if scale not in self.consts:
                continue
            zero_point = False
            node = self._node(other)
            if node is not None and node.op_type == "Sub" and node.input[1] in self.consts:
                zero_point = True
                nodes.append(other)
                other = node.input[0]
                node = self._node(other)
            if node is None or node.op_type != "Cast":
                break
            nodes.append(other)
            src = self._constant(node.input[0], nodes, "Cast input")
            if src.data_type not in INT_TYPES:
                break
            per = "tensor" if int(np.prod(self.consts[scale].dims)) == 1 else "axis"
            storage = Storage("scaled", type_name(src.data_type), None, 0, zero_point, per)
            return storage, src, np_name(self.consts[scale].data_type)
        raise PathError(
            f"weight comes from Mul node '{self._name(anchor)}' (not a constant-only weight path)"
        )


def path_nodes(path: WeightPath, producer: Mapping[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes of ``path``, source side first (the order data flows in), from ``producer``
    (:func:`flarc.core.graphs.producer_map`)."""
    out: dict[int, onnx.NodeProto] = {}
    for o in path.nodes:
        node = producer.get(o)
        if node is not None:
            out.setdefault(id(node), node)
    return list(out.values())


def path_model(
    model: onnx.ModelProto,
    path: WeightPath,
    consts: Mapping[str, onnx.TensorProto],
    output: str | None = None,
    producer: Mapping[str, onnx.NodeProto] | None = None,
) -> onnx.ModelProto:
    """The path as a model of its own: its nodes, the constants they read as typed graph inputs
    (fed by :func:`evaluate`, never copied into the proto), and ``output`` (the consumed tensor
    by default) as the only output. ``producer``: the model's, when the caller has it."""
    nodes = path_nodes(path, producer if producer is not None else producer_map(model))
    reads = sorted({i for n in nodes for i in n.input if i} | {path.source})
    inputs = [
        helper.make_tensor_value_info(r, consts[r].data_type, list(consts[r].dims))
        for r in reads
        if r in consts
    ]
    out = output or path.consumed
    graph = helper.make_graph(
        nodes, "weight_path", inputs, [helper.make_empty_tensor_value_info(out)]
    )
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return helper.make_model(graph, opset_imports=opsets, ir_version=max(model.ir_version, 7))


def evaluate(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The only output of a path model, computed by onnxruntime (every opset from 7; onnx's
    reference evaluator lacks DequantizeLinear before 19) with its inputs fed from ``arrays``."""
    import onnxruntime as ort

    values = {i.name: np.asarray(arrays[i.name]) for i in model.graph.input}
    # onnxruntime cannot be fed ml_dtypes arrays (bfloat16, int4): those travel as initializers.
    packed = {name for name, v in values.items() if v.dtype.kind == "V"}
    if packed:
        inline = onnx.ModelProto()
        inline.CopyFrom(model)
        kept = [i for i in inline.graph.input if i.name not in packed]
        del inline.graph.input[:]
        inline.graph.input.extend(kept)
        inline.graph.initializer.extend(
            numpy_helper.from_array(values[name], name) for name in sorted(packed)
        )
        model = inline
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {name: v for name, v in values.items() if name not in packed}
    (value,) = session.run([model.graph.output[0].name], feeds)
    return np.asarray(value)


def consumed_shape(
    model: onnx.ModelProto,
    path: WeightPath,
    consts: Mapping[str, onnx.TensorProto],
    producer: Mapping[str, onnx.NodeProto] | None = None,
) -> tuple[int, ...] | None:
    """The shape of the tensor the node reads: the stored shape when no layout node is on the
    path, else onnx shape inference over the path (no weight data read). ``producer``: the
    model's (:func:`flarc.core.graphs.producer_map`), when the caller has it."""
    source = consts[path.source]
    if not path.nodes:
        return tuple(int(d) for d in source.dims)
    nodes = path_nodes(path, producer if producer is not None else producer_map(model))
    if not any(n.op_type in LAYOUT_OPS for n in nodes):
        return tuple(int(d) for d in source.dims)
    reads = sorted({i for n in nodes for i in n.input if i and i in consts})
    # Small integer constants (shapes, axes) go in as values; the rest only as types and dims.
    small = [
        consts[r] for r in reads
        if consts[r].data_type == onnx.TensorProto.INT64 and int(np.prod(consts[r].dims)) <= 64
    ]  # fmt: skip
    inputs = [
        helper.make_tensor_value_info(r, consts[r].data_type, list(consts[r].dims))
        for r in reads
        if r not in {s.name for s in small}
    ]
    out = helper.make_empty_tensor_value_info(path.consumed)
    graph = helper.make_graph(nodes, "weight_path", inputs, [out], small)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    probe = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # onnx raises several types on graphs it cannot infer
        return None
    tt = inferred.graph.output[0].type.tensor_type
    dims = tt.shape.dim if tt.HasField("shape") else []
    if not dims or not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)
