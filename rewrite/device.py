"""The whitened SVD of one target through torch, on a GPU (``--device cuda``), for the heavy math:
the whitening factor (Cholesky, or the eigen fallback), ``L^T B``, the Gram of the whitened
weight and its eigendecomposition (or an SVD), and the triangular solve back. Everything in
float64, as on the CPU path (:mod:`flarc.rewrite.whiten`, :mod:`flarc.rewrite.spectrum`), whose
algorithm this follows step for step: the spectra agree with it to rounding (the singular values
to ``1e-10`` relative, the rank-k weights to ``1e-8`` relative to the weight; tests/
test_executor.py checks both on torch's CPU device, and on CUDA when present).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from flarc.core.errors import OptionError
from flarc.rewrite.spectrum import GRAM_ROUTE_MIN_RATIO, Spectrum
from flarc.rewrite.whiten import EIG_FLOOR

log = logging.getLogger(__name__)


def _whitening(h, method: str, name: str):
    """``(kind, apply_t, solve_t, fell_back)`` for ``h`` (a float64 tensor): ``L^T B`` and
    ``L^{-T} Y`` as functions of tensors, by the rules of :func:`flarc.rewrite.whiten.whitener`."""
    import torch

    n = h.shape[0]
    if method == "cholesky":
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return (
                "cholesky",
                lambda b: factor.T @ b,
                lambda y: torch.linalg.solve_triangular(factor.T, y, upper=True),
                False,
            )
        log.warning(
            "%s: Cholesky of the shrunk statistic failed; using eigendecomposition whitening", name
        )
        kind, apply_t, solve_t, _ = _whitening(h, "eig", name)
        return kind, apply_t, solve_t, True
    if method == "eig":
        e, q = torch.linalg.eigh((h + h.T) / 2)
        if not float(e.max()) > 0:  # no energy at all: the identity (see eig_whitener)
            q, scale = torch.eye(n, dtype=h.dtype, device=h.device), torch.ones_like(e)
        else:
            scale = torch.sqrt(torch.clamp(e, min=float(e.max()) * EIG_FLOOR))
        return (
            "eig",
            lambda b: scale[:, None] * (q.T @ b),
            lambda y: q @ (y / scale[:, None]),
            False,
        )
    if method == "diag":
        d = torch.diagonal(h)
        root = torch.sqrt(torch.clamp(d, min=max(float(d.max()), 1e-300) * EIG_FLOOR))
        return "diag", lambda b: root[:, None] * b, lambda y: y / root[:, None], False
    if method == "none":
        return "none", lambda b: b, lambda y: y, False
    raise OptionError(f"unknown whitening '{method}' (choose cholesky, eig, diag or none)")


def _leading_svd(a, rank: int):
    """:func:`flarc.rewrite.spectrum.leading_svd` on a tensor: the Gram route unless a kept
    singular value is too small for it, then a full SVD."""
    import torch

    n, m = a.shape
    r = min(rank, n, m)
    tall = n >= m
    e, q = torch.linalg.eigh(a.T @ a if tall else a @ a.T)
    s = torch.sqrt(torch.clamp(torch.flip(e, [0]), min=0.0))
    if r and float(s[r - 1]) > GRAM_ROUTE_MIN_RATIO * float(s[0]):
        keep = torch.flip(q, [1])[:, :r]
        if tall:
            return (a @ keep) / s[:r], s, keep.T
        return keep, s, (keep.T @ a) / s[:r, None]
    u, s, vt = torch.linalg.svd(a, full_matrices=False)
    return u[:, :r], s, vt[:r]


def whitened_spectrum_torch(
    b: np.ndarray,
    h: np.ndarray,
    method: str = "cholesky",
    name: str = "",
    max_rank: int | None = None,
    device: str = "cuda",
) -> tuple[Spectrum, str, bool]:
    """``(spectrum, whitening kind, Cholesky fell back)`` of weight ``b`` ``[n, m]`` whitened by
    the shrunk statistic ``h`` ``[n, n]``, computed by torch on ``device`` in float64."""
    import torch

    dev = torch.device(device)
    as_tensor: Callable[[np.ndarray], torch.Tensor] = lambda x: torch.as_tensor(  # noqa: E731
        np.asarray(x, dtype=np.float64), device=dev
    )
    kind, apply_t, solve_t, fell_back = _whitening(as_tensor(h), method, name)
    a = apply_t(as_tensor(b))
    u, s, vt = _leading_svd(a, min(a.shape) if max_rank is None else max_rank)
    del a
    basis = solve_t(u)
    spectrum = Spectrum(
        sigma=s.cpu().numpy(), basis=basis.cpu().numpy(), vt=vt.contiguous().cpu().numpy()
    )
    return spectrum, kind, fell_back
