"""Shrinkage of the empirical second moment toward a scaled identity (docs/design.md section 4).

Every estimator returns ``H* = (1 - lam) S + lam mu I`` with ``mu = tr(S) / n`` and states
how it picks ``lam``; all of them work from :class:`Moments`, never from the rows.

- ``ledoit-wolf`` (Ledoit & Wolf 2004, as scikit-learn computes it):
      d2 = ||S - mu I||_F^2 / n
      b2 = (sum_k ||x_k||^4 / N - ||S||_F^2) / (n N)
      lam = min(b2, d2) / d2
  The often-quoted ``(tr S - tr T) / ||S - T||^2`` is identically zero and is not used.
- ``oas`` (Chen et al. 2010, scikit-learn's form):
      a = ||S||_F^2 / n^2,  lam = min((a + mu^2) / ((N + 1)(a - mu^2 / n)), 1)
- ``none``: lam = 0; ``fixed``: a lam the user chose (a robustness knob).

The same Ledoit-Wolf rule shrinks a vector of estimated means ``d`` (the loss gradient's second
moment per output channel, calib/sensitivity.py) toward their average ``dbar``:
      d2 = sum_j (d_j - dbar)^2,   b2 = sum_j var(d_j),   lam = min(b2, d2) / d2
with ``var(d_j)`` the variance of the estimate ``d_j`` itself (from independent samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flarc.calib.moments import Moments
from flarc.core.errors import OptionError

METHODS = ("ledoit-wolf", "oas", "none")


@dataclass(frozen=True)
class Shrunk:
    """A shrunk second moment ``H* = (1 - lam) S + lam mu I`` ``[n, n]``, with its intensity ``lam``
    and ``mu = tr(S) / n``."""

    covariance: np.ndarray  # [n, n] float64
    lam: float
    mu: float


def _fro2(s: np.ndarray) -> float:
    """``||s||_F^2`` as one BLAS dot over the contiguous elements (no squared temporary)."""
    flat = np.ascontiguousarray(s).ravel()
    return float(np.dot(flat, flat))


def ledoit_wolf_lambda(
    moments: Moments, centered: bool = False, s: np.ndarray | None = None
) -> float:
    """The Ledoit-Wolf intensity (module docstring), in [0, 1]; 0 when ``S`` is already a scaled
    identity. ``s``: ``moments.covariance(centered)`` when the caller has it."""
    s = moments.covariance(centered) if s is None else s
    n = s.shape[0]
    n_rows = moments.count
    mu = np.trace(s) / n
    s_fro2 = _fro2(s)
    d2 = (s_fro2 - 2 * mu * np.trace(s) + n * mu * mu) / n
    b2 = (moments.fourth_moment(centered) / n_rows - s_fro2) / (n * n_rows)
    if d2 <= 0:
        return 0.0
    return float(min(b2, d2) / d2) if b2 > 0 else 0.0


def oas_lambda(moments: Moments, centered: bool = False, s: np.ndarray | None = None) -> float:
    """The OAS intensity (module docstring), in [0, 1]; 1 when its denominator is zero. ``s``:
    ``moments.covariance(centered)`` when the caller has it."""
    s = moments.covariance(centered) if s is None else s
    n = s.shape[0]
    alpha = _fro2(s) / (n * n)
    mu = np.trace(s) / n
    num = alpha + mu * mu
    den = (moments.count + 1) * (alpha - mu * mu / n)
    return 1.0 if den == 0 else float(min(num / den, 1.0))


def shrink(
    moments: Moments,
    method: str = "ledoit-wolf",
    centered: bool = False,
    lam: float | None = None,
    floor: float = 0.0,
) -> Shrunk:
    """The shrunk second moment of ``moments`` (``lam`` given: fixed intensity, method ignored);
    an intensity that ``ledoit-wolf`` or ``oas`` estimates is at least ``floor``."""
    # A new array (the statistic divided by its count), shrunk in place: on a 4864^2 statistic
    # every extra temporary costs as much as the intensity's arithmetic.
    s = moments.covariance(centered)
    mu = float(np.trace(s) / s.shape[0])
    if lam is None:
        if method == "ledoit-wolf":
            lam = max(ledoit_wolf_lambda(moments, centered, s), floor)
        elif method == "oas":
            lam = max(oas_lambda(moments, centered, s), floor)
        elif method == "none":
            lam = 0.0
        else:
            raise OptionError(f"unknown shrinkage '{method}' (choose from {', '.join(METHODS)})")
    if not 0.0 <= lam <= 1.0:
        raise OptionError(f"shrinkage intensity {lam} is outside [0, 1]")
    s *= 1.0 - lam
    s[np.diag_indices_from(s)] += lam * mu
    return Shrunk(s, float(lam), mu)


def diagonal_lambda(d: np.ndarray, variance: np.ndarray) -> float:
    """Ledoit-Wolf's intensity for the estimated means ``d`` ``[m]`` shrunk toward their
    average, given each estimate's ``variance`` ``[m]`` (module docstring), in [0, 1]; 0 when
    ``d`` is flat (nothing to shrink)."""
    d = np.asarray(d, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    if d.shape != variance.shape:
        raise ValueError(f"diagonal_lambda: d {d.shape} and variance {variance.shape} differ")
    d2 = float(np.sum((d - d.mean()) ** 2))
    b2 = float(np.sum(variance))
    if not d2 > 0:
        return 0.0
    return min(max(b2, 0.0), d2) / d2


def shrink_diagonal(d: np.ndarray, lam: float) -> np.ndarray:
    """``(1 - lam) d + lam mean(d)`` in float64: the same mean, the spread scaled by
    ``1 - lam``."""
    d = np.asarray(d, dtype=np.float64)
    return (1.0 - lam) * d + lam * float(d.mean()) if lam else d
