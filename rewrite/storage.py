"""How a factor is stored: in the form of the weight it replaces (docs/design.md section 2).

A factor ``F`` (already in the layout its node reads) is encoded as

- ``float``: ``F`` in the node's float type;
- ``cast``: ``F`` rounded to the stored type (fp16/bf16), then ``Cast`` to the node's type;
- ``qdq``: ``q = clip(round(F / s) + z)`` in the stored integer type, read through
  ``DequantizeLinear``: ``(q - z) s``. One scale per output channel (the factor's own axis) from
  opset 13; per tensor before 13 (no ``axis`` attribute there); a blocked original (int4 from
  onnxruntime-genai style tools, opset 21) gets blocks of the same size along the input axis.
  Signed types are symmetric (``z = 0``, kept as a tensor when the original had one); unsigned
  types always carry a zero point (asymmetric min/max, zero exactly representable);
- ``scaled``: the older integer -> ``Cast`` -> [``Sub(z)``] -> ``Mul(s)`` pattern, per output
  channel through broadcasting (it works in every opset from 7).

Before encoding, each rank-one component is balanced (``A_j d_j``, ``C_j / d_j`` with equal
norms): the product is unchanged and neither factor carries a range that fp16 or an 8-bit grid
cannot hold. ``value`` is what the graph computes from the stored tensors, exactly as the runtime
does, so the output guard can still demand rounding-level agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from flarc.core.errors import ModelError
from flarc.core.targets import Target
from flarc.core.weightpath import Storage

# Stored integer types: (numpy type, lowest, highest).
INT_RANGES = {
    "int8": (np.int8, -128, 127),
    "uint8": (np.uint8, 0, 255),
    "int4": (ml_dtypes.int4, -8, 7),
    "uint4": (ml_dtypes.uint4, 0, 15),
}
FLOAT_STORES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@dataclass
class Encoded:
    """One factor as stored: ``data`` (and ``scale``/``zero_point`` for integer forms), the
    form's attributes, and the float ``value`` the graph computes from them."""

    form: Storage
    data: np.ndarray
    value: np.ndarray
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)  # DequantizeLinear's axis / block_size


def factor_form(storage: Storage, opset: int) -> Storage:
    """The form a factor is written in, given the original weight's form and the model's opset."""
    if storage.kind != "qdq":
        return storage
    unsigned = storage.dtype.startswith("u")
    if opset < 13:
        per = "tensor"
    else:
        per = "block" if storage.per == "block" else "axis"
    return Storage(
        "qdq",
        storage.dtype,
        None,
        storage.block_size if per == "block" else 0,
        storage.zero_point or unsigned,
        per,
    )


def balance(a: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A D, D^-1 C)`` with ``||A_j|| = ||C_j||`` for every component ``j`` (same product)."""
    na = np.linalg.norm(a, axis=0)
    nc = np.linalg.norm(c, axis=1)
    d = np.ones_like(na)
    ok = (na > 0) & (nc > 0)
    d[ok] = np.sqrt(nc[ok] / na[ok])
    return a * d, c / d[:, None]


def _per_channel(w: np.ndarray, axis: int, reduce) -> np.ndarray:
    """``reduce`` over every axis but ``axis``, kept broadcastable."""
    others = tuple(i for i in range(w.ndim) if i != axis)
    return reduce(w, axis=others, keepdims=True)


def _blocked(w: np.ndarray, axis: int, block: int, reduce) -> np.ndarray:
    """``reduce`` over blocks of ``block`` along ``axis``: shape of ``w`` with ``ceil(D/block)``."""
    d = w.shape[axis]
    pad = -d % block
    widths = [(0, 0)] * w.ndim
    widths[axis] = (0, pad)
    padded = np.pad(w, widths, mode="edge") if pad else w
    shape = list(padded.shape)
    shape[axis : axis + 1] = [shape[axis] // block, block]
    return reduce(padded.reshape(shape), axis=axis + 1)


def _expand(s: np.ndarray, axis: int, block: int, length: int) -> np.ndarray:
    """A blocked scale repeated back to the factor's length along ``axis``."""
    return np.repeat(s, block, axis=axis).take(np.arange(length), axis=axis)


def _integer(w: np.ndarray, form: Storage, axis: int, block_axis: int, dtype) -> Encoded:
    """Round ``w`` to the form's integer grid, one scale per channel / block / tensor."""
    qtype, lo, hi = INT_RANGES[form.dtype]
    if form.per == "block":
        bmax = _blocked(w, block_axis, form.block_size, np.max)
        bmin = _blocked(w, block_axis, form.block_size, np.min)
    elif form.per == "axis":
        bmax = _per_channel(w, axis, np.max)
        bmin = _per_channel(w, axis, np.min)
    else:
        bmax, bmin = np.max(w, keepdims=True), np.min(w, keepdims=True)
    bmax, bmin = np.maximum(bmax, 0.0), np.minimum(bmin, 0.0)
    if lo < 0:  # symmetric
        scale = np.maximum(bmax, -bmin) / hi
        zero = np.zeros_like(scale)
    else:  # asymmetric, zero on the grid
        scale = (bmax - bmin) / (hi - lo)
        zero = np.zeros_like(scale)
        nz = scale > 0
        zero[nz] = np.clip(np.round(-bmin[nz] / scale[nz]), lo, hi)
    scale = np.where(scale > 0, scale, 1.0).astype(dtype)  # an all-zero channel: any scale
    if form.per == "block":
        full_s = _expand(scale, block_axis, form.block_size, w.shape[block_axis])
        full_z = _expand(zero, block_axis, form.block_size, w.shape[block_axis])
    else:
        full_s, full_z = scale, zero
    q = np.clip(np.round(w / full_s.astype(np.float64)) + full_z, lo, hi)
    # What DequantizeLinear / Cast-Sub-Mul compute: (q - z) in the float type, times s.
    value = (q - full_z).astype(dtype) * full_s
    if form.per == "axis" and form.kind == "qdq":
        scale, zero = scale.reshape(-1), zero.reshape(-1)
    elif form.per == "tensor":
        scale, zero = scale.reshape(()), zero.reshape(())
    return Encoded(form, q.astype(qtype), value.astype(dtype), scale, zero.astype(qtype))


def encode(
    w: np.ndarray, storage: Storage, opset: int, axis: int, block_axis: int, dtype: str
) -> Encoded:
    """``w`` (a factor in its node's layout) in the form of ``storage``: ``axis`` is its output
    channel axis, ``block_axis`` its input axis, ``dtype`` the float type its node reads."""
    dt = np.dtype(dtype)
    form = factor_form(storage, opset)
    if form.kind == "float":
        data = np.ascontiguousarray(w.astype(dt, copy=False))
        return Encoded(form, data, data)
    if form.kind == "cast":
        data = np.ascontiguousarray(w.astype(FLOAT_STORES[form.dtype]))
        value = data.astype(dt)
        if not np.isfinite(value).all():
            raise ModelError(
                f"a factor does not fit {form.dtype} (values up to {np.abs(w).max():.3g})"
            )
        return Encoded(form, data, value)
    if form.kind == "scaled":
        form = Storage(
            "scaled", form.dtype, None, 0, form.zero_point or form.dtype.startswith("u"), "axis"
        )
        enc = _integer(np.asarray(w, np.float64), form, axis, block_axis, dt)
        enc.zero_point = enc.zero_point.astype(dt)  # Sub reads the Cast's float output
        return enc
    enc = _integer(np.asarray(w, np.float64), form, axis, block_axis, dt)
    if form.per == "axis":
        enc.attrs["axis"] = axis
    elif form.per == "block":
        enc.attrs.update(axis=block_axis, block_size=form.block_size)
    if not form.zero_point:
        enc.zero_point = None
    return enc


def _layout(t: Target, a: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The factors in the layout their nodes read: ``A [n, k]``, ``C [k, m]``; Conv kernels
    ``[k, c, kh, kw]`` and ``[m, k, 1, 1]``."""
    if t.conv is None:
        return a, c
    k = a.shape[1]
    return a.T.reshape(k, *t.weight_shape[1:]), c.T.reshape(
        t.m, k, *([1] * (len(t.weight_shape) - 2))
    )


def encode_pair(t: Target, a: np.ndarray, c: np.ndarray, opset: int) -> tuple[Encoded, Encoded]:
    """Both factors of ``t`` in its weight's storage form, in the layout their nodes read."""
    if t.storage.kind != "float":
        a, c = balance(np.asarray(a, np.float64), np.asarray(c, np.float64))
    fa, fc = _layout(t, a, c)
    # Output channels: axis 1 of a MatMul/Gemm factor, axis 0 of a kernel; inputs the other.
    out, inp = (1, 0) if t.conv is None else (0, 1)
    return (
        encode(fa, t.storage, opset, out, inp, t.dtype),
        encode(fc, t.storage, opset, out, inp, t.dtype),
    )


def effective_pair(
    t: Target, a: np.ndarray, c: np.ndarray, opset: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, C)`` as the rewritten graph computes them after its storage nodes, in the
    ``[n, k]``, ``[k, m]`` orientation (what the output guard multiplies)."""
    ea, ec = encode_pair(t, a, c, opset)
    if t.conv is None:
        return ea.value, ec.value
    k = ea.value.shape[0]
    return ea.value.reshape(k, -1).T, ec.value.reshape(t.m, k).T
