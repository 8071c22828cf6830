"""Predict layer latency at any rank: a monotone curve through one shape's measured grid, and a
regressor over (tokens, n, m, k) for shapes that were never measured.

Curve: pool-adjacent-violators (least-squares isotonic regression) over the measured grid, then
piecewise-linear interpolation. Monotone data pass through unchanged, so the curve hits every
measured point exactly; noisy dips are averaged with their neighbours rather than lifted to a
running maximum (which would bias the curve upward). Below the first grid rank the curve holds
its first value; above the last it continues with the last non-negative slope.

Regressor: ``log t = b0 + b1 log(flops) + b2 log(bytes) + b3 (nodes - 1)`` by bounded least
squares with ``b1, b2, b3 >= 0``. Why not a random forest (FLAR-SVD's choice): a profile holds a
handful of shapes, a forest cannot extrapolate past them, is piecewise constant in k and needs
scikit-learn; this model is monotone in k by construction (flops and bytes both grow with k),
extrapolates along the roofline terms that actually govern a GEMM, and needs only scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy.optimize import lsq_linear

from flarc.latency.spec import LayerSpec

BYTES = {"fp32": 4, "fp16": 2}


def isotonic(values: Iterable[float]) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks]) if blocks else np.array([])


class MonotoneCurve:
    """t(k) through measured ``(k, t)`` points, non-decreasing in k."""

    def __init__(self, ks: Iterable[int], ts: Iterable[float]) -> None:
        pairs = sorted(zip(ks, ts, strict=True))
        if not pairs:
            raise ValueError("a curve needs at least one measured rank")
        self.ks = np.array([p[0] for p in pairs], dtype=np.float64)
        self.raw = np.array([p[1] for p in pairs], dtype=np.float64)
        self.ts = isotonic(self.raw)
        self.slope = (
            max((self.ts[-1] - self.ts[-2]) / (self.ks[-1] - self.ks[-2]), 0.0)
            if len(self.ks) > 1
            else 0.0
        )

    def __call__(self, k: float) -> float:
        if k <= self.ks[0]:
            return float(self.ts[0])
        if k >= self.ks[-1]:
            return float(self.ts[-1] + self.slope * (k - self.ks[-1]))
        return float(np.interp(k, self.ks, self.ts))


def features(spec: LayerSpec, k: int | None, dtype: str = "fp32") -> np.ndarray:
    """[1, log flops, log bytes moved, extra nodes] of the dense layer (k None) or rank-k pair."""
    t, n, m = spec.tokens, spec.n, spec.m
    # Conv reads its input once, however the kernel overlaps; count the real input, not patches.
    x_elems = math.prod(spec.input_shape)
    if k is None:
        elems, nodes = x_elems + n * m + t * m, 1
    else:
        elems, nodes = x_elems + n * k + 2 * t * k + k * m + t * m, 2
    return np.array(
        [1.0, math.log(spec.flops(k)), math.log(elems * BYTES.get(dtype, 4)), nodes - 1.0]
    )


class LatencyRegressor:
    """Log-linear latency model fitted on every measured (spec, rank) timing."""

    def __init__(self, dtype: str = "fp32") -> None:
        self.dtype = dtype
        self.coef: np.ndarray | None = None

    def fit(self, samples: list[tuple[LayerSpec, int | None, float]]) -> LatencyRegressor:
        """Fit on ``(spec, rank or None for dense, seconds per call)`` samples; returns itself.
        ValueError when there are none."""
        if not samples:
            raise ValueError("no timings to fit")
        X = np.stack([features(s, k, self.dtype) for s, k, _ in samples])
        y = np.log([t for _, _, t in samples])
        lower = [-np.inf, 0.0, 0.0, 0.0]
        upper = [np.inf] * 4
        # Unidentified columns (one shape, dense only) make the problem rank-deficient; lsq_linear copes.
        self.coef = lsq_linear(X, y, bounds=(lower, upper), method="bvls").x
        return self

    def predict(self, spec: LayerSpec, k: int | None) -> float:
        """Predicted seconds per call of the dense layer (``k`` None) or the rank-``k`` pair;
        RuntimeError before :meth:`fit`."""
        if self.coef is None:
            raise RuntimeError("regressor is not fitted")
        return float(math.exp(features(spec, k, self.dtype) @ self.coef))
