"""Run an ONNX graph with torch ops so that autograd gives gradients w.r.t. its constant weights.

A deliberately small interpreter: nodes run one by one in topological order, each through an
entry of :data:`OPS` (``op_type -> fn(inputs, attrs, ctx) -> outputs``). Shape subgraphs run on
int64 tensors as they come, so dynamic batch and sequence axes need nothing special. Chosen
constant tensors (initializers or ``Constant`` outputs), or node outputs given a value (a weight
path's anchor), become ``torch.nn.Parameter``s; a weight used by several nodes is one Parameter,
so its gradient is the sum over its uses. Only the nodes the graph outputs need are run.

Every floating-point tensor (inputs, initializers, casts, constants) is computed in one dtype,
float64 by default, so that gradients can be compared with a double-precision reference.
Only the default ONNX domain is covered; anything else raises :class:`ModelError` naming the
node and the op.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import torch
from torch.nn import functional as F

from flarc.core.errors import DataError, ModelError
from flarc.core.external import external_dir, tensor_array
from flarc.core.targets import constant_tensors, node_names

log = logging.getLogger(__name__)

Tensor = torch.Tensor

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
_TORCH_DTYPES = {
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


@dataclass(frozen=True)
class Context:
    """What an op needs besides its inputs: the opset, the compute dtype, the node (for errors)."""

    opset: int
    dtype: torch.dtype
    node: str
    op_type: str
    n_outputs: int = 1

    def fail(self, why: str) -> ModelError:
        """A ModelError naming the node and its op, for the caller to raise."""
        return ModelError(f"node '{self.node}' (op {self.op_type}): {why}")

    def torch_dtype(self, onnx_type: int) -> torch.dtype:
        """The torch dtype of an ONNX element type: the compute dtype for any floating-point type;
        ModelError for a type the executor does not support."""
        if onnx_type in _FLOAT_TYPES:
            return self.dtype
        if onnx_type not in _TORCH_DTYPES:
            raise self.fail(f"type {onnx.TensorProto.DataType.Name(onnx_type)} not supported")
        return _TORCH_DTYPES[onnx_type]


_SAME_FLOAT = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A numpy array as a torch tensor, floating point in the compute dtype."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        if _SAME_FLOAT.get(array.dtype) == dtype and array.flags.c_contiguous:
            # Already the compute dtype (a float32 model in float32): shared, not copied, so a
            # lazily mapped weight stays in its file. Nothing writes to it in place.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                return torch.from_numpy(array)
        return torch.from_numpy(np.array(array, dtype=np.float64)).to(dtype)
    if array.dtype.kind in ("U", "S", "O"):
        raise DataError(f"string tensors are not supported (dtype {array.dtype})")
    return torch.from_numpy(np.array(array))


def tensor_from_proto(
    proto: onnx.TensorProto, dtype: torch.dtype, folder: Path | None = None
) -> Tensor:
    """``proto``'s values in ``dtype``; external data are read from ``folder`` (a lazy model's)."""
    raw = tensor_array(proto, folder)
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        # numpy has no bfloat16: go through the float32 bit pattern.
        return torch.from_numpy(np.asarray(raw, dtype=np.float32)).to(dtype)
    return _to_torch(raw, dtype)


# ----------------------------------------------------------------------------------------------
# helpers


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def _spatial_pads(x: Tensor, kernel: Sequence[int], attrs: dict, ctx: Context) -> list[int]:
    """ONNX pads ``[b1, b2, ..., e1, e2, ...]`` for the spatial axes, auto_pad resolved."""
    nd = len(kernel)
    strides = attrs.get("strides", [1] * nd)
    dilations = attrs.get("dilations", [1] * nd)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * nd)))
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad '{auto_pad}' not supported")
    begins, ends = [], []
    for i in range(nd):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _pad_spatial(x: Tensor, pads: list[int], value: float) -> Tensor:
    """Pad the spatial axes of ``x`` with ONNX-ordered pads (torch wants last axis first)."""
    nd = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for i in reversed(range(nd)):
        torch_pads += [pads[i], pads[i + nd]]
    return F.pad(x, torch_pads, value=value)


def _broadcast_variadic(fn: Callable[[Tensor, Tensor], Tensor], xs: list[Tensor]) -> Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


# ----------------------------------------------------------------------------------------------
# ops: fn(inputs, attrs, ctx) -> list of outputs

Op = Callable[[list, dict, Context], list]


def _unary(fn: Callable[[Tensor], Tensor]) -> Op:
    return lambda x, a, c: [fn(x[0])]


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Op:
    return lambda x, a, c: [fn(x[0], x[1])]


def _div(x: list, a: dict, c: Context) -> list:
    if _is_float(x[0]):
        return [x[0] / x[1]]
    # ONNX integer division truncates (C semantics).
    return [torch.div(x[0], x[1], rounding_mode="trunc")]


def _mod(x: list, a: dict, c: Context) -> list:
    if a.get("fmod", 0):
        return [torch.fmod(x[0], x[1])]
    return [torch.remainder(x[0], x[1])]


def _pow(x: list, a: dict, c: Context) -> list:
    base, exponent = x
    if not _is_float(base) and _is_float(exponent):
        return [torch.pow(base.to(exponent.dtype), exponent).to(base.dtype)]
    if _is_float(base) and not _is_float(exponent):
        exponent = exponent.to(base.dtype)
    return [torch.pow(base, exponent)]


def _gelu(x: list, a: dict, c: Context) -> list:
    return [F.gelu(x[0], approximate=a.get("approximate", "none"))]


def _softmax_like(fn: Callable[[Tensor, int], Tensor]) -> Op:
    def op(x: list, a: dict, c: Context) -> list:
        t = x[0]
        if c.opset >= 13:
            return [fn(t, a.get("axis", -1))]
        # Before opset 13 the input is coerced to 2-D at `axis` and normalised over the tail.
        axis = _axis(a.get("axis", 1), t.dim())
        flat = t.reshape(int(math.prod(t.shape[:axis])), -1)
        return [fn(flat, 1).reshape(t.shape)]

    return op


def _reduce(kind: str) -> Op:
    axes_as_input_from = 13 if kind == "ReduceSum" else 18

    def op(x: list, a: dict, c: Context) -> list:
        t = x[0]
        if c.opset >= axes_as_input_from:
            axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
        else:
            axes = a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                # A reduction over no axis still applies its elementwise part (as onnxruntime).
                if kind in ("ReduceL1", "ReduceL2"):
                    return [t.abs()]
                return [t * t if kind == "ReduceSumSquare" else t]
            axes = list(range(t.dim()))
        dims = sorted(_axis(int(d), t.dim()) for d in axes)
        if kind == "ReduceSum":
            out = t.sum(dim=dims, keepdim=keep)
        elif kind == "ReduceMean":
            out = t.mean(dim=dims, keepdim=keep)
        elif kind == "ReduceSumSquare":
            out = (t * t).sum(dim=dims, keepdim=keep)
        elif kind == "ReduceL2":
            out = (t * t).sum(dim=dims, keepdim=keep).sqrt()
        elif kind == "ReduceL1":
            out = t.abs().sum(dim=dims, keepdim=keep)
        elif kind == "ReduceLogSumExp":
            out = torch.logsumexp(t, dim=dims, keepdim=keep)
        elif kind == "ReduceProd":
            out = t
            for d in sorted(dims, reverse=True):
                out = out.prod(dim=d, keepdim=keep)
        elif kind == "ReduceMax":
            out = torch.amax(t, dim=dims, keepdim=keep)
        elif kind == "ReduceMin":
            out = torch.amin(t, dim=dims, keepdim=keep)
        else:  # pragma: no cover - the table below lists exactly the kinds above
            raise c.fail("unknown reduction")
        return [out]

    return op


def _arg_reduce(largest: bool) -> Op:
    def op(x: list, a: dict, c: Context) -> list:
        t = x[0]
        axis = a.get("axis", 0)
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            flipped = t.flip(axis)
            idx = (
                flipped.argmax(axis, keepdim=keep)
                if largest
                else flipped.argmin(axis, keepdim=keep)
            )
            return [t.shape[axis] - 1 - idx]
        return [t.argmax(axis, keepdim=keep) if largest else t.argmin(axis, keepdim=keep)]

    return op


def _layer_norm(x: list, a: dict, c: Context) -> list:
    t, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = _axis(a.get("axis", -1), t.dim())
    dims = list(range(axis, t.dim()))
    eps = a.get("epsilon", 1e-5)
    mean = t.mean(dim=dims, keepdim=True)
    centred = t - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    y = centred * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


def _batch_norm(x: list, a: dict, c: Context) -> list:
    t, scale, bias, mean, var = x[:5]
    if a.get("training_mode", 0):
        raise c.fail("training_mode=1 not supported (inference only)")
    shape = [1, -1] + [1] * (t.dim() - 2)
    eps = a.get("epsilon", 1e-5)
    inv = torch.rsqrt(var.reshape(shape) + eps)
    return [(t - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)]


def _instance_norm(x: list, a: dict, c: Context) -> list:
    t, scale, bias = x
    dims = list(range(2, t.dim()))
    shape = [1, -1] + [1] * (t.dim() - 2)
    mean = t.mean(dim=dims, keepdim=True)
    var = ((t - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (t - mean) * torch.rsqrt(var + a.get("epsilon", 1e-5))
    return [y * scale.reshape(shape) + bias.reshape(shape)]


def _reshape(x: list, a: dict, c: Context) -> list:
    t = x[0]
    shape = _ints(x[1]) or []
    if not a.get("allowzero", 0):
        # 0 copies the input's dimension at that position.
        shape = [t.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [t.reshape(shape)]


def _transpose(x: list, a: dict, c: Context) -> list:
    t = x[0]
    perm = a.get("perm") or list(reversed(range(t.dim())))
    return [t.permute(*perm)]


def _axes_arg(x: list, a: dict, c: Context, since: int) -> list[int] | None:
    if c.opset >= since:
        return _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    return a.get("axes")


def _unsqueeze(x: list, a: dict, c: Context) -> list:
    t = x[0]
    axes = _axes_arg(x, a, c, 13) or []
    rank = t.dim() + len(axes)
    for d in sorted(_axis(ax, rank) for ax in axes):
        t = t.unsqueeze(d)
    return [t]


def _squeeze(x: list, a: dict, c: Context) -> list:
    t = x[0]
    axes = _axes_arg(x, a, c, 13)
    if axes is None:
        return [t.squeeze()]
    for d in sorted((_axis(ax, t.dim()) for ax in axes), reverse=True):
        t = t.squeeze(d)
    return [t]


def _concat(x: list, a: dict, c: Context) -> list:
    parts = [t for t in x if t is not None]
    return [torch.cat(parts, dim=a["axis"])]


def _split(x: list, a: dict, c: Context) -> list:
    t = x[0]
    axis = _axis(a.get("axis", 0), t.dim())
    if c.opset >= 13:
        sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    else:
        sizes = a.get("split")
    if not sizes:
        size = t.shape[axis]
        # Even split; from opset 18 the last chunk may be smaller.
        chunk = -(-size // c.n_outputs)
        sizes = [min(chunk, size - i * chunk) for i in range(c.n_outputs)]
    return list(torch.split(t, sizes, dim=axis))


def _slice(x: list, a: dict, c: Context) -> list:
    t = x[0]
    if c.opset >= 10:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else None
    else:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, t.dim())
        size = t.shape[axis]
        if step == 0:
            raise c.fail("Slice step 0")
        start, end = _axis(start, size), _axis(end, size)
        # ONNX clamps to [0, size] going forward, start to [0, size-1], end to [-1, size-1]
        # going backward (unlike Python's slices, where a start below -size selects nothing).
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
        count = max(0, -((start - end) // step))
        if step == 1:
            t = t.narrow(axis, start, count)
        else:
            t = t.index_select(axis, start + step * torch.arange(count, dtype=torch.int64))
    return [t]


def _gather(x: list, a: dict, c: Context) -> list:
    t, idx = x
    axis = _axis(a.get("axis", 0), t.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + t.shape[axis], idx)
    out = t.index_select(axis, idx.reshape(-1))
    return [out.reshape((*t.shape[:axis], *idx.shape, *t.shape[axis + 1 :]))]


def _gather_elements(x: list, a: dict, c: Context) -> list:
    t, idx = x
    axis = _axis(a.get("axis", 0), t.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + t.shape[axis], idx)
    return [torch.gather(t, axis, idx)]


def _gather_nd(x: list, a: dict, c: Context) -> list:
    t, idx = x
    if a.get("batch_dims", 0):
        raise c.fail("batch_dims != 0 not supported")
    idx = idx.long()
    k = idx.shape[-1]
    sizes = torch.tensor(t.shape[:k], dtype=torch.int64)
    idx = torch.where(idx < 0, idx + sizes, idx)
    return [t[tuple(idx[..., i] for i in range(k))]]


def _scatter_nd(x: list, a: dict, c: Context) -> list:
    data, idx, updates = x
    reduction = a.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise c.fail(f"reduction '{reduction}' not supported")
    idx = idx.long()
    k = idx.shape[-1]
    sizes = torch.tensor(data.shape[:k], dtype=torch.int64)
    idx = torch.where(idx < 0, idx + sizes, idx)
    index = tuple(idx[..., i] for i in range(k))
    return [data.index_put(index, updates, accumulate=reduction == "add")]


def _scatter_elements(x: list, a: dict, c: Context) -> list:
    data, idx, updates = x
    axis = _axis(a.get("axis", 0), data.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    reduction = a.get("reduction", "none")
    if reduction == "none":
        return [data.scatter(axis, idx, updates)]
    if reduction == "add":
        return [data.scatter_add(axis, idx, updates)]
    raise c.fail(f"reduction '{reduction}' not supported")


def _shape(x: list, a: dict, c: Context) -> list:
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _constant_value(a: dict, c: Context) -> Tensor:
    if "value" in a:
        return tensor_from_proto(a["value"], c.dtype)
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=c.dtype)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=c.dtype)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    raise c.fail(f"constant attribute {sorted(a)} not supported")


def _constant_of_shape(x: list, a: dict, c: Context) -> list:
    shape = _ints(x[0]) or []
    if "value" in a:
        value = tensor_from_proto(a["value"], c.dtype).reshape(())
    else:
        value = torch.tensor(0.0, dtype=c.dtype)
    return [torch.full(shape, value.item(), dtype=value.dtype)]


def _cast(x: list, a: dict, c: Context) -> list:
    return [x[0].to(c.torch_dtype(a["to"]))]


# Integer grids of QuantizeLinear's output types (the zero point's type; uint8 without one).
_QUANT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}


def _channel(v: Tensor, axis: int, rank: int) -> Tensor:
    """A per-axis scale or zero point shaped to broadcast along ``axis`` of a rank-``rank`` input."""
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[_axis(axis, rank)] = -1
    return v.reshape(shape)


def _quantize(x: list, a: dict, c: Context) -> list:
    # Fake quantization in the compute dtype: the grid's values, with the straight-through
    # gradient (identity inside the range), so a QDQ graph can be differentiated.
    t, scale = x[0], x[1]
    zero = x[2] if len(x) > 2 and x[2] is not None else None
    lo, hi = _QUANT_RANGES.get(zero.dtype if zero is not None else torch.uint8, (0, 255))
    axis = a.get("axis", 1)
    s = _channel(scale.to(t.dtype), axis, t.dim())
    z = _channel(zero.to(t.dtype), axis, t.dim()) if zero is not None else 0.0
    y = t / s + z
    y = y + (torch.round(y) - y).detach()
    return [torch.clamp(y, lo, hi)]


def _dequantize(x: list, a: dict, c: Context) -> list:
    if a.get("block_size"):
        raise c.fail("blocked scales are not supported for gradients")
    q, scale = x[0], x[1]
    zero = x[2] if len(x) > 2 and x[2] is not None else None
    dtype = scale.dtype if scale.is_floating_point() else c.dtype
    q = q.to(dtype)
    axis = a.get("axis", 1)
    z = _channel(zero.to(dtype), axis, q.dim()) if zero is not None else 0.0
    return [(q - z) * _channel(scale.to(dtype), axis, q.dim())]


def _where(x: list, a: dict, c: Context) -> list:
    cond, p, q = x
    return [torch.where(cond.bool(), p, q)]


def _expand(x: list, a: dict, c: Context) -> list:
    t = x[0]
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps the input's dimension.
    shape = torch.broadcast_shapes(tuple(t.shape), tuple(_ints(x[1]) or []))
    return [t.expand(shape)]


def _range(x: list, a: dict, c: Context) -> list:
    start, limit, delta = x
    if delta.item() == 0:
        raise c.fail("Range delta 0")
    # max(ceil((limit - start) / delta), 0) elements start + i * delta: empty when the signs
    # disagree, and differentiable in start and delta.
    if _is_float(start):
        count = math.ceil((limit.item() - start.item()) / delta.item())
    else:
        count = -((int(start) - int(limit)) // int(delta))
    return [start + torch.arange(max(count, 0), dtype=start.dtype) * delta]


def _trilu(x: list, a: dict, c: Context) -> list:
    k = int(x[1]) if len(x) > 1 and x[1] is not None else 0
    return [x[0].triu(k) if a.get("upper", 1) else x[0].tril(k)]


def _clip(x: list, a: dict, c: Context) -> list:
    t = x[0]
    if c.opset >= 11:
        lo = x[1] if len(x) > 1 else None
        hi = x[2] if len(x) > 2 else None
    else:
        lo = torch.tensor(a["min"], dtype=t.dtype) if "min" in a else None
        hi = torch.tensor(a["max"], dtype=t.dtype) if "max" in a else None
    if lo is not None:
        t = torch.maximum(t, lo.to(t.dtype))
    if hi is not None:
        t = torch.minimum(t, hi.to(t.dtype))
    return [t]


def _flatten(x: list, a: dict, c: Context) -> list:
    t = x[0]
    axis = _axis(a.get("axis", 1), t.dim())
    return [t.reshape(int(math.prod(t.shape[:axis])), -1)]


def _dropout(x: list, a: dict, c: Context) -> list:
    # Inference: the identity, and a mask of all true.
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)]


def _matmul(x: list, a: dict, c: Context) -> list:
    return [torch.matmul(x[0], x[1])]


def _gemm(x: list, a: dict, c: Context) -> list:
    p, q = x[0], x[1]
    if a.get("transA", 0):
        p = p.transpose(0, 1)
    if a.get("transB", 0):
        q = q.transpose(0, 1)
    y = a.get("alpha", 1.0) * (p @ q)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return [y]


def _conv(x: list, a: dict, c: Context) -> list:
    t, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    nd = w.dim() - 2
    if nd not in (1, 2, 3):
        raise c.fail(f"{nd}-D convolution not supported")
    kernel = a.get("kernel_shape", list(w.shape[2:]))
    pads = _spatial_pads(t, kernel, a, c)
    t = _pad_spatial(t, pads, 0.0)
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return [
        fn(
            t,
            w,
            bias,
            stride=a.get("strides", [1] * nd),
            dilation=a.get("dilations", [1] * nd),
            groups=a.get("group", 1),
        )
    ]


# ONNX Resize (mode, coordinate transformation) -> torch interpolate mode and align_corners; the
# cubic coefficient -0.75 is torch's, and half_pixel is torch's align_corners=False.
_RESIZE_MODES = {
    ("nearest", "asymmetric"): ("nearest", None),
    ("linear", "half_pixel"): ("linear", False),
    ("linear", "pytorch_half_pixel"): ("linear", False),
    ("linear", "align_corners"): ("linear", True),
    ("cubic", "half_pixel"): ("bicubic", False),
    ("cubic", "pytorch_half_pixel"): ("bicubic", False),
    ("cubic", "align_corners"): ("bicubic", True),
}


def _resize(x: list, a: dict, c: Context) -> list:
    t = x[0]
    mode = a.get("mode", "nearest")
    coords = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    key = (mode, coords)
    if key not in _RESIZE_MODES or (mode == "nearest" and nearest != "floor"):
        raise c.fail(f"Resize mode {mode!r} with {coords!r} not supported")
    if mode == "cubic" and abs(a.get("cubic_coeff_a", -0.75) + 0.75) > 1e-9:
        raise c.fail("Resize cubic_coeff_a other than -0.75 not supported")
    if a.get("antialias", 0) or a.get("axes") is not None:
        raise c.fail("Resize with antialias or axes not supported")
    scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
    sizes = _ints(x[3]) if len(x) > 3 and x[3] is not None and x[3].numel() else None
    if sizes is None and scales is None:
        raise c.fail("Resize needs scales or sizes")
    if sizes is None:
        sizes = [int(d * float(s)) for d, s in zip(t.shape, scales.tolist(), strict=True)]
    if list(sizes[:2]) != list(t.shape[:2]) or t.dim() not in (3, 4, 5):
        raise c.fail("Resize of the batch or channel axis not supported")
    torch_mode, align = _RESIZE_MODES[key]
    nd = t.dim() - 2
    if torch_mode == "linear":
        torch_mode = ("linear", "bilinear", "trilinear")[nd - 1]
    elif torch_mode == "bicubic" and nd != 2:
        raise c.fail("Resize cubic is supported in 2-D only")
    factors = None if scales is None else [float(s) for s in scales.tolist()[2:]]
    if coords == "pytorch_half_pixel":
        # An output length of one samples the first element, where torch takes the centre:
        # resize that element alone.
        for i, size in enumerate(sizes[2:]):
            if size == 1:
                t = t.narrow(2 + i, 0, 1)
                if factors is not None:
                    factors[i] = 1.0
    if factors is None:
        return [F.interpolate(t, size=list(sizes[2:]), mode=torch_mode, align_corners=align)]
    # Given scales set the sampling positions, not out/in (they differ when in * scale is not
    # whole); torch then computes the same output sizes as above.
    return [
        F.interpolate(
            t,
            scale_factor=factors,
            mode=torch_mode,
            align_corners=align,
            recompute_scale_factor=False,
        )
    ]


def _conv_transpose(x: list, a: dict, c: Context) -> list:
    t, w = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    nd = w.dim() - 2
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "") or "output_shape" in a:
        raise c.fail("auto_pad / output_shape not supported")
    pads = a.get("pads", [0] * (2 * nd))
    if pads[:nd] != pads[nd:]:
        raise c.fail("asymmetric pads not supported")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return [
        fn(
            t,
            w,
            bias,
            stride=a.get("strides", [1] * nd),
            padding=pads[:nd],
            output_padding=a.get("output_padding", [0] * nd),
            groups=a.get("group", 1),
            dilation=a.get("dilations", [1] * nd),
        )
    ]


def _pool(kind: str) -> Op:
    def op(x: list, a: dict, c: Context) -> list:
        t = x[0]
        kernel = a["kernel_shape"]
        nd = len(kernel)
        if nd not in (1, 2, 3):
            raise c.fail(f"{nd}-D pooling not supported")
        strides = a.get("strides", [1] * nd)
        pads = _spatial_pads(t, kernel, a, c)
        ceil = bool(a.get("ceil_mode", 0))

        def windows(y: Tensor) -> Tensor:
            if not ceil:
                return y
            # ONNX ignores windows that would start in the end padding; torch, given the input
            # already padded, keeps them.
            for i in range(nd):
                inside = (pads[i] + t.shape[2 + i] - 1) // strides[i] + 1
                y = y.narrow(2 + i, 0, min(y.shape[2 + i], inside))
            return y

        if kind == "max":
            if a.get("storage_order", 0):
                raise c.fail("storage_order=1 not supported")
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            padded = _pad_spatial(t, pads, -math.inf)
            return [
                windows(
                    fn(
                        padded,
                        kernel,
                        strides,
                        dilation=a.get("dilations", [1] * nd),
                        ceil_mode=ceil,
                    )
                )
            ]
        if any(d != 1 for d in a.get("dilations", [1] * nd)):
            raise c.fail("dilated AveragePool not supported")
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        total = windows(fn(_pad_spatial(t, pads, 0.0), kernel, strides, ceil_mode=ceil))
        if a.get("count_include_pad", 0) or not any(pads):
            return [total]
        # Average over real elements only: divide by the pooled fraction of non-padding.
        ones = torch.ones((1, 1, *t.shape[2:]), dtype=t.dtype)
        frac = windows(fn(_pad_spatial(ones, pads, 0.0), kernel, strides, ceil_mode=ceil))
        return [total / frac]

    return op


def _global_pool(kind: str) -> Op:
    def op(x: list, a: dict, c: Context) -> list:
        t = x[0]
        dims = list(range(2, t.dim()))
        return [t.mean(dim=dims, keepdim=True) if kind == "avg" else torch.amax(t, dims, True)]

    return op


def _einsum(x: list, a: dict, c: Context) -> list:
    return [torch.einsum(a["equation"], *x)]


def _tile(x: list, a: dict, c: Context) -> list:
    return [x[0].repeat(*(_ints(x[1]) or []))]


def _pad(x: list, a: dict, c: Context) -> list:
    t = x[0]
    mode = a.get("mode", "constant")
    if c.opset >= 11:
        pads = _ints(x[1]) or []
        value = x[2] if len(x) > 2 and x[2] is not None else None
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
    else:
        pads, value, axes = list(a["pads"]), None, None
        if "value" in a:
            value = torch.tensor(a["value"])
    rank = t.dim()
    axes = [_axis(ax, rank) for ax in axes] if axes is not None else list(range(rank))
    n = len(axes)
    full = [0] * (2 * rank)
    for i, ax in enumerate(axes):
        full[ax], full[ax + rank] = pads[i], pads[i + n]
    torch_pads: list[int] = []
    for i in range(rank - 1, -1, -1):
        torch_pads += [full[i], full[i + rank]]
    if mode == "constant":
        fill = float(value.reshape(()).item()) if value is not None and value.numel() else 0.0
        return [F.pad(t, torch_pads, mode="constant", value=fill)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise c.fail(f"pad mode '{mode}' not supported")
    # torch pads only the trailing (spatial) axes in these modes.
    spatial = max(1, rank - 2)
    if any(full[i] or full[i + rank] for i in range(rank - spatial)):
        raise c.fail(f"pad mode '{mode}' on the batch/channel axes not supported")
    return [F.pad(t, torch_pads[: 2 * spatial], mode=torch_mode)]


def _cumsum(x: list, a: dict, c: Context) -> list:
    t = x[0]
    axis = _axis(int(x[1]), t.dim())
    if a.get("reverse", 0):
        t = t.flip(axis)
    out = t.cumsum(axis)
    if a.get("exclusive", 0):
        out = out - t
    return [out.flip(axis) if a.get("reverse", 0) else out]


def _topk(x: list, a: dict, c: Context) -> list:
    t = x[0]
    k = int(x[1]) if c.opset >= 10 else a["k"]
    axis = a.get("axis", -1)
    # ONNX puts the lower index first among equal values; a stable sort does, torch.topk may not.
    values, indices = torch.sort(t, dim=axis, descending=bool(a.get("largest", 1)), stable=True)
    return [values.narrow(axis, 0, k), indices.narrow(axis, 0, k)]


def _nonzero(x: list, a: dict, c: Context) -> list:
    return [torch.nonzero(x[0]).transpose(0, 1).contiguous()]


def _one_hot(x: list, a: dict, c: Context) -> list:
    idx, depth, values = x
    depth_v = int(depth)
    axis = a.get("axis", -1)
    idx = idx.long()
    idx = torch.where(idx < 0, idx + depth_v, idx)
    # An index outside [-depth, depth - 1] gives off values only.
    inside = (idx >= 0) & (idx < depth_v)
    hot = F.one_hot(torch.where(inside, idx, 0), depth_v).bool() & inside.unsqueeze(-1)
    rank = hot.dim()
    hot = hot.movedim(-1, _axis(axis, rank))
    off, on = values[0], values[1]
    return [torch.where(hot, on, off)]


def _softplus(t: Tensor) -> Tensor:
    return F.softplus(t)


OPS: dict[str, Op] = {
    # arithmetic
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Mod": _mod,
    "Pow": _pow,
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Softplus": _unary(_softplus),
    "LeakyRelu": lambda x, a, c: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "Elu": lambda x, a, c: [F.elu(x[0], a.get("alpha", 1.0))],
    "HardSigmoid": lambda x, a, c: [
        torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0.0, 1.0)
    ],
    "HardSwish": _unary(F.hardswish),
    "Gelu": _gelu,
    "Softmax": _softmax_like(lambda t, d: torch.softmax(t, d)),
    "LogSoftmax": _softmax_like(lambda t, d: torch.log_softmax(t, d)),
    "Sum": lambda x, a, c: [_broadcast_variadic(torch.add, x)],
    "Mean": lambda x, a, c: [_broadcast_variadic(torch.add, x) / len(x)],
    "Min": lambda x, a, c: [_broadcast_variadic(torch.minimum, x)],
    "Max": lambda x, a, c: [_broadcast_variadic(torch.maximum, x)],
    "Clip": _clip,
    # reductions
    **{
        k: _reduce(k)
        for k in (
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceSumSquare",
            "ReduceLogSumExp",
        )
    },
    "ArgMax": _arg_reduce(True),
    "ArgMin": _arg_reduce(False),
    "CumSum": _cumsum,
    "TopK": _topk,
    # normalisation
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    # linear algebra, convolution, pooling
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Einsum": _einsum,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Resize": _resize,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"),
    "GlobalMaxPool": _global_pool("max"),
    # shapes and indexing
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "ScatterElements": _scatter_elements,
    "Shape": _shape,
    "Size": lambda x, a, c: [torch.tensor(x[0].numel(), dtype=torch.int64)],
    "ConstantOfShape": _constant_of_shape,
    "Constant": lambda x, a, c: [_constant_value(a, c)],
    "Cast": _cast,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "CastLike": lambda x, a, c: [x[0].to(x[1].dtype)],
    "Expand": _expand,
    "Range": _range,
    "Trilu": _trilu,
    "Flatten": _flatten,
    "Tile": _tile,
    "Pad": _pad,
    "NonZero": _nonzero,
    "OneHot": _one_hot,
    "Identity": lambda x, a, c: [x[0]],
    "Dropout": _dropout,
    # logic
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Where": _where,
    "IsNaN": _unary(torch.isnan),
    "IsInf": lambda x, a, c: [
        (
            torch.isposinf(x[0])
            if a.get("detect_positive", 1)
            else torch.zeros_like(x[0], dtype=torch.bool)
        )
        | (
            torch.isneginf(x[0])
            if a.get("detect_negative", 1)
            else torch.zeros_like(x[0], dtype=torch.bool)
        )
    ],
}


def _attributes(node: onnx.NodeProto) -> dict:
    attrs = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    return attrs


def _topological(
    nodes: Sequence[onnx.NodeProto], available: set[str], roots: Sequence[int] | None = None
) -> list[int]:
    """Indices of ``roots`` (default: every node) and the nodes they depend on, in an order where
    every input not in ``available`` is produced first (stable for sorted graphs)."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 done
    for root in range(len(nodes)) if roots is None else roots:
        if state[root]:
            continue
        stack = [(root, False)]
        while stack:
            i, expanded = stack.pop()
            if expanded:
                state[i] = 2
                order.append(i)
                continue
            if state[i] == 2:
                continue
            state[i] = 1
            stack.append((i, True))
            for name in reversed(nodes[i].input):
                j = produced_by.get(name)
                if name and name not in available and j is not None and state[j] != 2:
                    if state[j] == 1:
                        raise ModelError(f"graph has a cycle through tensor '{name}'")
                    stack.append((j, False))
    return order


class TorchGraph:
    """An ONNX model as a torch computation whose chosen weights are Parameters.

    ``params`` names initializers or ``Constant`` outputs, or node outputs whose values ``values``
    gives (a weight path's anchor); each becomes a ``torch.nn.Parameter`` in ``dtype``. Nodes
    whose outputs are all params are not run; only the nodes the graph outputs need, with params
    as sources, must be supported ops. :meth:`run` evaluates the graph on numpy or torch feeds.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        params: Sequence[str] = (),
        dtype: torch.dtype | str = torch.float64,
        values: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if isinstance(dtype, str):
            dtype = {"float64": torch.float64, "float32": torch.float32}.get(dtype)
            if dtype is None:
                raise ValueError("dtype must be float64 or float32")
        self.dtype = dtype
        if model.functions:
            # Local functions (some exporters emit them) become plain nodes.
            model = onnx.inliner.inline_local_functions(model)
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        inits = {t.name for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in inits]
        self.optional_inputs = {i.name for i in graph.input if i.name in inits}
        self.outputs = [o.name for o in graph.output]
        self.names = node_names(model)
        self.nodes = list(graph.node)
        consts = constant_tensors(model)
        folder = external_dir(model)
        values = values or {}
        produced = {out: i for i, n in enumerate(self.nodes) for out in n.output if out}
        params = list(dict.fromkeys(params))
        missing = [p for p in params if p not in consts and not (p in values and p in produced)]
        if missing:
            raise ModelError(
                f"weight '{missing[0]}' is not a constant tensor of the model "
                "(initializer or Constant output) nor a node output given a value"
            )
        available = set(self.inputs) | inits | set(params)
        self.order = self._reachable(self.outputs, produced, available)
        # Only initializers that a node to run (or the caller) reads are converted.
        read = {n for i in self.order for n in self.nodes[i].input if n}
        read |= set(self.outputs) | self.optional_inputs | set(params)
        with torch.no_grad():
            self.constants: dict[str, Tensor] = {
                t.name: tensor_from_proto(t, dtype, folder)
                for t in graph.initializer
                if t.name in read
            }
        self.params: dict[str, torch.nn.Parameter] = {}
        for name in params:
            if name in self.constants:
                value = self.constants[name]
            elif name in consts:
                value = tensor_from_proto(consts[name], dtype, folder)
            else:
                value = _to_torch(values[name], dtype)
            if not value.is_floating_point():
                raise ModelError(f"weight '{name}' is not floating point; no gradient")
            # Shares the constant's storage: nothing updates it in place, and no copy is made.
            self.params[name] = torch.nn.Parameter(value)
        self._producer = {out: i for i in self.order for out in self.nodes[i].output if out}
        for i in self.order:
            node = self.nodes[i]
            if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
                op = (
                    node.op_type
                    if node.domain in ("", "ai.onnx")
                    else f"{node.domain}.{node.op_type}"
                )
                raise ModelError(f"node '{self.names[i]}' (op {op}): not supported for gradients")
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            ):
                raise ModelError(
                    f"node '{self.names[i]}' (op {node.op_type}): subgraphs not supported for gradients"
                )
        self._attrs = {i: _attributes(self.nodes[i]) for i in self.order}
        # The last node that reads each tensor, so intermediates can be dropped early.
        self._last_use: dict[str, int] = {}
        for pos, i in enumerate(self.order):
            for name in self.nodes[i].input:
                self._last_use[name] = pos

    def _reachable(
        self, wanted: Sequence[str], produced: Mapping[str, int], available: set[str]
    ) -> list[int]:
        """The nodes ``wanted`` depend on (none past a name in ``available``), in a topological
        order; ModelError for an input that nothing provides."""
        needed: set[int] = set()
        stack = [produced[w] for w in wanted if w not in available and w in produced]
        while stack:
            i = stack.pop()
            if i in needed:
                continue
            needed.add(i)
            for name in self.nodes[i].input:
                if not name or name in available:
                    continue
                if name not in produced:
                    raise ModelError(
                        f"node '{self.names[i]}' (op {self.nodes[i].op_type}): input '{name}' is "
                        "neither a graph input, an initializer nor a node output"
                    )
                stack.append(produced[name])
        return _topological(self.nodes, available, sorted(needed))

    def _needed(self, wanted: Sequence[str]) -> list[int]:
        """Positions in ``self.order`` of the nodes that the wanted tensors depend on."""
        needed, stack = set(), [w for w in wanted if w not in self.params]
        while stack:
            i = self._producer.get(stack.pop())
            if i is not None and i not in needed:
                needed.add(i)
                stack.extend(n for n in self.nodes[i].input if n and n not in self.params)
        return [pos for pos, i in enumerate(self.order) if i in needed]

    def _feed(self, value: np.ndarray | Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value.to(self.dtype) if value.is_floating_point() else value
        return _to_torch(value, self.dtype)

    def run(
        self, feeds: Mapping[str, np.ndarray | Tensor], outputs: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Evaluate the nodes the requested outputs need (default: all the graph's outputs)."""
        wanted = list(outputs) if outputs is not None else self.outputs
        known = self._producer.keys() | self.constants.keys() | self.params.keys()
        known |= set(self.inputs)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ModelError(f"output '{unknown[0]}' is not computed by the graph")
        env: dict[str, Tensor | None] = dict(self.constants)
        env.update(self.params)
        positions = self._needed(wanted)
        used = {n for pos in positions for n in self.nodes[self.order[pos]].input} | set(wanted)
        for name in self.inputs:
            if name in used and name not in feeds:
                raise DataError(f"model input '{name}' is missing from the batch")
        for name, value in feeds.items():
            if name in self.params:
                raise DataError(f"input '{name}' is a weight being differentiated; not a feed")
            if name in self.inputs or name in self.optional_inputs:
                env[name] = self._feed(value)
        keep = set(wanted) | set(self.params)
        for pos in positions:
            i = self.order[pos]
            node = self.nodes[i]
            args = [env[name] if name else None for name in node.input]
            ctx = Context(self.opset, self.dtype, self.names[i], node.op_type, len(node.output))
            try:
                results = OPS[node.op_type](args, self._attrs[i], ctx)
            except ModelError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
                shapes = [None if a is None else tuple(a.shape) for a in args]
                raise ModelError(
                    f"node '{self.names[i]}' (op {node.op_type}) failed on input shapes {shapes}: "
                    f"{exc}"
                ) from exc
            for k, name in enumerate(node.output):
                if not name or name in self.params:
                    continue  # a param keeps its own value (the node has other outputs)
                if k >= len(results):
                    raise ctx.fail(f"output {k} ('{name}') not supported for gradients")
                env[name] = results[k]
            for name in node.input:
                if self._last_use.get(name) == pos and name not in keep:
                    env.pop(name, None)
        return {name: env[name] for name in wanted}
