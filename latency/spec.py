"""One layer to time: the dense node at its real input shape, and what its factor pairs look like.

A ``LayerSpec`` is backend-neutral and hashable; its ``key`` names the shape in caches and in
latency.json. MatMul and Gemm share the ``linear`` kind: ``X [tokens, n] @ B [n, m]``. Conv
keeps the real input ``[N, C, *spatial]`` and the node's geometry; its ``tokens`` are the output
positions ``N * prod(out spatial)``, so ``tokens x n x m`` is the GEMM the convolution performs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flarc.core.errors import ModelError
from flarc.core.targets import ConvGeometry, Target

KINDS = ("linear", "conv")


@dataclass(frozen=True)
class LayerSpec:
    """One layer shape to time: ``linear`` (``X [tokens, n] @ B [n, m]``) or ``conv`` (the real
    input ``[N, C, *spatial]`` and the node's geometry)."""

    kind: str  # linear | conv
    n: int
    m: int
    input_shape: tuple[int, ...]  # linear: (tokens, n); conv: (N, C, *spatial)
    conv: ConvGeometry | None = None

    @property
    def tokens(self) -> int:
        if self.kind == "linear":
            return int(self.input_shape[0])
        return int(self.input_shape[0]) * math.prod(self.out_spatial)

    @property
    def k_equiv(self) -> float:
        return self.n * self.m / (self.n + self.m)

    @property
    def key(self) -> str:
        if self.kind == "linear":
            return f"linear:{self.tokens}x{self.n}->{self.m}"
        shape = "x".join(map(str, self.input_shape))
        return f"conv:{shape}->{self.m}:{self.conv.key}"  # type: ignore[union-attr]

    @property
    def channels(self) -> int:
        return int(self.input_shape[1])

    @property
    def pads(self) -> tuple[int, ...]:
        """Explicit ``[begin..., end...]`` pads (auto_pad resolved against the real input)."""
        assert self.conv is not None
        return explicit_pads(self.conv, self.input_shape[2:])

    @property
    def out_spatial(self) -> tuple[int, ...]:
        assert self.conv is not None
        geo, spatial = self.conv, self.input_shape[2:]
        pads = self.pads
        nd = len(spatial)
        return tuple(
            (spatial[i] + pads[i] + pads[nd + i] - geo.dilations[i] * (geo.kernel_shape[i] - 1) - 1)
            // geo.strides[i]
            + 1
            for i in range(nd)
        )

    def grid(self, align: int) -> list[int]:
        """Aligned ranks ``align, 2*align, ...`` that still save parameters (``k <= k_equiv``)."""
        if align < 1:
            raise ValueError(f"align must be positive, got {align}")
        return list(range(align, math.floor(self.k_equiv) + 1, align))

    def flops(self, k: int | None) -> float:
        """Multiply-adds x 2 of the dense layer (k None) or of its rank-k pair."""
        if k is None:
            return 2.0 * self.tokens * self.n * self.m
        return 2.0 * self.tokens * k * (self.n + self.m)

    def to_dict(self) -> dict:
        """The spec as plain JSON values (``tokens`` included, for readers)."""
        d: dict = {
            "kind": self.kind,
            "n": self.n,
            "m": self.m,
            "input_shape": list(self.input_shape),
            "tokens": self.tokens,
        }
        if self.conv is not None:
            d["conv"] = {
                "kernel_shape": list(self.conv.kernel_shape),
                "strides": list(self.conv.strides),
                "pads": list(self.conv.pads),
                "dilations": list(self.conv.dilations),
                "auto_pad": self.conv.auto_pad,
            }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        """Inverse of :meth:`to_dict`; ValueError for an unknown kind, KeyError for a missing
        field."""
        conv = None
        if d.get("conv") is not None:
            c = d["conv"]
            conv = ConvGeometry(
                kernel_shape=tuple(int(v) for v in c["kernel_shape"]),
                strides=tuple(int(v) for v in c["strides"]),
                pads=tuple(int(v) for v in c["pads"]),
                dilations=tuple(int(v) for v in c["dilations"]),
                auto_pad=str(c.get("auto_pad", "NOTSET")),
            )
        kind = str(d["kind"])
        if kind not in KINDS:
            raise ValueError(f"unknown layer kind '{kind}'")
        return cls(kind, int(d["n"]), int(d["m"]), tuple(int(v) for v in d["input_shape"]), conv)


def explicit_pads(geo: ConvGeometry, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """A Conv's pads as ``[begin..., end...]`` over input spatial dims ``spatial``, with
    ``auto_pad`` (VALID, SAME_UPPER, SAME_LOWER) resolved as the ONNX spec defines it."""
    nd = len(spatial)
    if geo.auto_pad in ("NOTSET", ""):
        return tuple(geo.pads) if geo.pads else (0,) * (2 * nd)
    if geo.auto_pad == "VALID":
        return (0,) * (2 * nd)
    begin, end = [], []
    for i in range(nd):
        out = -(-spatial[i] // geo.strides[i])
        total = max(
            (out - 1) * geo.strides[i]
            + geo.dilations[i] * (geo.kernel_shape[i] - 1)
            + 1
            - spatial[i],
            0,
        )
        small, big = total // 2, total - total // 2
        # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning.
        b, e = (small, big) if geo.auto_pad == "SAME_UPPER" else (big, small)
        begin.append(b)
        end.append(e)
    return tuple(begin + end)


def spec_for_target(target: Target, input_shape: tuple[int, ...] | list[int]) -> LayerSpec:
    """The spec of ``target`` given the real shape of its activation input."""
    shape = tuple(int(d) for d in input_shape)
    if any(d <= 0 for d in shape):
        raise ModelError(f"target '{target.name}': input '{target.input}' has shape {list(shape)}")
    if target.conv is None:
        if not shape or shape[-1] != target.n:
            raise ModelError(
                f"target '{target.name}': input '{target.input}' has shape {list(shape)}, "
                f"expected [..., {target.n}]"
            )
        return LayerSpec("linear", target.n, target.m, (math.prod(shape[:-1]), target.n))
    nd = len(target.conv.kernel_shape)
    if len(shape) != nd + 2:
        raise ModelError(
            f"target '{target.name}': input '{target.input}' has shape {list(shape)}, "
            f"expected {nd + 2}-D [N, C, ...]"
        )
    spec = LayerSpec("conv", target.n, target.m, shape, target.conv)
    if any(d <= 0 for d in spec.out_spatial):
        raise ModelError(f"target '{target.name}': empty convolution output at input {list(shape)}")
    return spec
