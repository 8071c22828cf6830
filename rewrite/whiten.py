"""Whitening factors ``H = L L^T`` and their transposed solves (docs/design.md section 3).

Cholesky is the default: ``L`` lower triangular, ``L^{-T} Y`` by a triangular solve and never
an explicit inverse. When Cholesky fails (a numerically indefinite ``H``), the eigen variant
``L = Q diag(sqrt(e))`` with clamped eigenvalues is used, and the caller is told.

Two baselines share the interface: ``diag`` (ASVD-style activation scaling, ``L = diag(sqrt(H_ii))``,
the input channels' RMS) and ``none`` (``L = I``: plain SVD of the weight, no data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

from flarc.core.errors import OptionError

log = logging.getLogger(__name__)

# Eigenvalues below this fraction of the largest are clamped (dead channels, rank deficiency).
EIG_FLOOR = 1e-12


@dataclass
class Whitener:
    """``L`` with ``L L^T = H``; ``kind`` is 'cholesky' (triangular L) or 'eig' (L = Q sqrt(E))."""

    kind: str
    factor: np.ndarray | None  # cholesky: L (lower); eig: Q; diag and none: None (Q = I)
    scale: np.ndarray | None = None  # eig: sqrt(E); diag: sqrt(H_ii); none: ones

    def _qt(self, y: np.ndarray) -> np.ndarray:
        return y if self.factor is None else self.factor.T @ y

    def _q(self, y: np.ndarray) -> np.ndarray:
        return y if self.factor is None else self.factor @ y

    def apply_t(self, b: np.ndarray) -> np.ndarray:
        """``L^T B``."""
        if self.kind == "cholesky":
            return triangular_product_t(self.factor, b)
        return self.scale[:, None] * self._qt(b)

    def solve(self, y: np.ndarray) -> np.ndarray:
        """``L^{-1} Y``."""
        if self.kind == "cholesky":
            return scipy.linalg.solve_triangular(self.factor, y, lower=True, check_finite=False)
        return self._qt(y) / self.scale[:, None]

    def solve_t(self, y: np.ndarray) -> np.ndarray:
        """``L^{-T} Y``."""
        if self.kind == "cholesky":
            return scipy.linalg.solve_triangular(
                self.factor, y, trans="T", lower=True, check_finite=False
            )
        return self._q(y / self.scale[:, None])


def triangular_product_t(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``L^T B`` for lower-triangular ``L`` by BLAS's triangular product (half a general
    product's arithmetic), as the transpose of ``B^T L`` so that C-ordered operands are read in
    place; float64."""
    lower = np.asarray(lower, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return lower.T @ b
    # C-ordered L is its transpose in Fortran order (upper): B^T L = B^T (L^T)^T.
    out = scipy.linalg.blas.dtrmm(1.0, lower.T, b.T, side=1, lower=0, trans_a=1)
    return out.T


def cholesky_whitener(h: np.ndarray) -> Whitener | None:
    """The Cholesky whitener of ``h`` (``L`` lower triangular, ``L L^T = h``); None when ``h`` is
    not numerically positive definite."""
    h = np.asarray(h, dtype=np.float64)
    # A symmetric C-ordered matrix read in Fortran order is itself: LAPACK's potrf takes it as
    # is (numpy's cholesky copies it in and out, about half its time on a 4864^2 statistic).
    upper, info = scipy.linalg.lapack.dpotrf(h.T, lower=0, clean=1, overwrite_a=0)
    if info != 0:
        return None
    return Whitener("cholesky", upper.T)


def eig_whitener(h: np.ndarray) -> Whitener:
    """The eigen whitener of ``h`` (symmetrised): ``L = Q diag(sqrt(e))`` with eigenvalues clamped
    to at least ``EIG_FLOOR`` times the largest; the identity when no eigenvalue is positive."""
    e, q = np.linalg.eigh((h + h.T) / 2)
    if not float(e.max()) > 0:
        # No energy at all (an input that is zero on every calibration row): any L would be
        # arbitrary and a floor of ~1e-300 makes L^{-T} overflow, so whiten with the identity
        # (plain SVD of the weight).
        return Whitener("eig", np.eye(len(e)), np.ones(len(e)))
    floor = float(e.max()) * EIG_FLOOR
    return Whitener("eig", q, np.sqrt(np.maximum(e, floor)))


def whitener(h: np.ndarray, method: str = "cholesky", name: str = "") -> tuple[Whitener, bool]:
    """A whitening factor of ``h`` by ``method``; the flag says Cholesky failed and eig was used."""
    if method == "eig":
        return eig_whitener(h), False
    if method == "diag":
        d = np.sqrt(np.maximum(np.diag(h), max(float(np.diag(h).max()), 1e-300) * EIG_FLOOR))
        return Whitener("diag", None, d), False
    if method == "none":
        return Whitener("none", None, np.ones(h.shape[0])), False
    if method != "cholesky":
        raise OptionError(f"unknown whitening '{method}' (choose cholesky, eig, diag or none)")
    w = cholesky_whitener(h)
    if w is not None:
        return w, False
    log.warning(
        "%s: Cholesky of the shrunk statistic failed; using eigendecomposition whitening", name
    )
    return eig_whitener(h), True
