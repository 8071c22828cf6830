"""Streamed second- and fourth-order moments of one target's input rows.

Everything the estimators of :mod:`flarc.calib.shrinkage` need is a sum over rows ``x_k``:

    gram   = sum_k x_k x_k^T          count = N
    sum4   = sum_k ||x_k||^4           (Ledoit-Wolf, uncentred)
    sum1   = sum_k x_k                 sum2x = sum_k ||x_k||^2 x_k   (centred variant)

so batches add up exactly and a statistic never holds an activation tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from flarc.core.executor import BlasThreads
from flarc.core.store import StoredArray, Value, as_array

# Rows of the upper triangle mirrored at a time (a panel that stays in cache while transposed).
MIRROR_BLOCK = 256
# Columns per panel of :func:`panel_product` (measured on 2 cores: as fast as multi-threaded
# ssyrk from 384 to 4864 inputs; 128 was slower at 1536, 512 at 4864).
PANEL = 256


def gram_upper(rows: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of ``rows^T rows`` for ``rows: [tokens, n]``, as a
    C-ordered float64 array whose strict lower triangle is zero: the symmetric rank-k update in
    BLAS, half the arithmetic of a general product. float32 rows are multiplied in float32
    (``ssyrk``), float64 ones in float64. :func:`mirror_upper` completes the matrix once the
    batches are added up."""
    rows = _blas_operand(rows)
    n = rows.shape[1]
    if rows.size == 0:
        return np.zeros((n, n))
    syrk = blas.dsyrk if rows.dtype == np.float64 else blas.ssyrk
    # BLAS reads a Fortran-ordered operand in place: rows itself, or rows.T when rows is
    # C-ordered. The lower triangle of the Fortran-ordered result is the upper one of its
    # C-ordered transpose.
    if rows.flags.f_contiguous:
        lower = syrk(1.0, rows, trans=1, lower=1)
    else:
        lower = syrk(1.0, np.asfortranarray(rows.T), trans=0, lower=1)
    return lower.T.astype(np.float64, copy=False)


def panel_product(
    rows: np.ndarray,
    partner: np.ndarray | None = None,
    workers: int = 1,
    blas: BlasThreads | None = None,
) -> np.ndarray:
    """``rows^T partner`` as float64, or without ``partner`` the upper triangle of ``rows^T
    rows`` (strict lower triangle zero, as :func:`gram_upper`), for ``rows: [tokens, n]``:
    one single-threaded BLAS product per panel of ``PANEL`` columns (of the upper triangle,
    only the rows above the panel's end), ``workers`` panels at a time. The bits depend on the
    panels alone, not on the thread count (OpenBLAS's own threading of ``ssyrk``/``sgemm``
    gives other bits with another one), so every executor adds the same products; float32
    rows are multiplied in float32, others in float64."""
    rows = _blas_operand(rows)
    upper = partner is None
    partner = rows if upper else _blas_operand(partner).astype(rows.dtype, copy=False)
    n, m = rows.shape[1], partner.shape[1]
    out = np.zeros((n, m))
    if rows.shape[0] == 0:
        return out

    def panel(start: int) -> None:
        end = min(m, start + PANEL)
        top = end if upper else n
        block = rows[:, :top].T @ partner[:, start:end]
        if upper:  # the panel's diagonal block: its upper triangle only
            block[start:end] = np.triu(block[start:end], 0)
        out[:top, start:end] = block

    starts = list(range(0, m, PANEL))[::-1]  # the upper triangle's widest panels first
    with (blas or BlasThreads()).limit(1):
        if workers <= 1 or len(starts) == 1:
            for start in starts:
                panel(start)
        else:
            with ThreadPoolExecutor(min(workers, len(starts))) as pool:
                list(pool.map(panel, starts))
    return out


def _blas_operand(rows: np.ndarray) -> np.ndarray:
    """``rows`` as float32 or float64 (other types as float64)."""
    rows = np.asarray(rows)
    return rows if rows.dtype in (np.float32, np.float64) else rows.astype(np.float64)


def mirror_upper(a: np.ndarray) -> np.ndarray:
    """Copy the upper triangle of the square C-ordered ``a`` onto its lower one, in place."""
    n = a.shape[0]
    for b in range(0, n, MIRROR_BLOCK):
        e = min(n, b + MIRROR_BLOCK)
        a[e:, b:e] = a[b:e, e:].T
        diagonal = a[b:e, b:e]
        diagonal[...] = np.triu(diagonal) + np.triu(diagonal, 1).T
    return a


def gram_of_rows(rows: np.ndarray) -> np.ndarray:
    """``rows^T rows`` (float64, both triangles) by :func:`gram_upper`."""
    return mirror_upper(np.ascontiguousarray(gram_upper(rows)))


@dataclass
class Moments:
    """The streamed sums of one statistic's input rows (module docstring), which add up over
    batches."""

    gram: np.ndarray  # [n, n] float64
    count: int
    sum4: float
    sum1: np.ndarray  # [n]
    sum2x: np.ndarray  # [n]
    # sum_k x_k p_k^T with a partner tensor (closed loop): [n, n] with the original's input,
    # [n, m] (m != n) with its output for a tall target
    cross: np.ndarray | None = None

    @classmethod
    def zeros(cls, n: int) -> Moments:
        """Empty sums for rows of width ``n``."""
        return cls(np.zeros((n, n)), 0, 0.0, np.zeros(n), np.zeros(n))

    @classmethod
    def from_rows(cls, x: np.ndarray) -> Moments:
        """Reference computation from explicit rows (tests, small data)."""
        x = np.asarray(x, dtype=np.float64)
        r2 = np.einsum("ij,ij->i", x, x)
        return cls(x.T @ x, x.shape[0], float(r2 @ r2), x.sum(0), r2 @ x)

    @property
    def n(self) -> int:
        return self.gram.shape[0]

    def loaded(self) -> Moments:
        """These sums with a stored Gram read into memory (themselves when it is in memory)."""
        if isinstance(self.gram, StoredArray):
            return dataclasses.replace(self, gram=self.gram.load())
        return self

    def add(self, other: Moments) -> None:
        """Add ``other``'s sums to these, in place (``cross`` too, when ``other`` has one)."""
        self.gram += other.gram
        self.count += other.count
        self.sum4 += other.sum4
        self.sum1 += other.sum1
        self.sum2x += other.sum2x
        if other.cross is not None:
            if self.cross is None:
                self.cross = other.cross.copy()
            else:
                self.cross += other.cross

    def covariance(self, centered: bool = False) -> np.ndarray:
        """The empirical ``S = gram / N`` (minus ``mean mean^T`` when centred)."""
        if self.count == 0:
            raise ValueError("no rows")
        s = self.gram / self.count
        if centered:
            mean = self.sum1 / self.count
            s -= np.outer(mean, mean)
        return s

    def fourth_moment(self, centered: bool = False) -> float:
        """``sum_k ||x_k - c||^4`` with ``c`` the mean (centred) or 0, from the streamed sums."""
        if not centered:
            return self.sum4
        n_rows = self.count
        mean = self.sum1 / n_rows
        c = float(mean @ mean)  # ||m||^2
        # ||x - m||^2 = a - 2b + c with a = ||x||^2, b = x.m; expand (a - 2b + c)^2 and sum over rows.
        sum_a = float(np.trace(self.gram))
        sum_b = float(self.sum1 @ mean)
        sum_a2 = self.sum4
        sum_b2 = float(mean @ self.gram @ mean)
        sum_ab = float(self.sum2x @ mean)
        return sum_a2 + 4 * sum_b2 + n_rows * c * c - 4 * sum_ab + 2 * c * sum_a - 4 * c * sum_b

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The sums as named arrays (``cross`` only when there is one)."""
        out = {
            f"{prefix}gram": self.gram,
            f"{prefix}count": np.array(self.count, dtype=np.int64),
            f"{prefix}sum4": np.array(self.sum4),
            f"{prefix}sum1": self.sum1,
            f"{prefix}sum2x": self.sum2x,
        }
        if self.cross is not None:
            out[f"{prefix}cross"] = self.cross
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Value], prefix: str, lazy: bool = False) -> Moments:
        """Inverse of :meth:`to_arrays`; with ``lazy`` a stored Gram stays in its file."""
        gram = arrays[f"{prefix}gram"]
        cross = arrays.get(f"{prefix}cross")
        return cls(
            gram if lazy else _float64(gram),
            int(as_array(arrays[f"{prefix}count"])),
            float(as_array(arrays[f"{prefix}sum4"])),
            _float64(arrays[f"{prefix}sum1"]),
            _float64(arrays[f"{prefix}sum2x"]),
            None if cross is None else _float64(cross),
        )


def _float64(value: Value) -> np.ndarray:
    return np.array(as_array(value), dtype=np.float64)


def moments_arrays(stats: Mapping[str, Moments]) -> dict[str, np.ndarray]:
    """Every statistic's sums as arrays named ``s<index>_<field>`` (keys are listed apart)."""
    out: dict[str, np.ndarray] = {}
    for j, moments in enumerate(stats.values()):
        out.update(moments.to_arrays(f"s{j}_"))
    return out


def moments_from_arrays(
    arrays: Mapping[str, Value], keys: list[str], lazy: bool = False
) -> dict[str, Moments]:
    """Inverse of :func:`moments_arrays` for the statistic ``keys`` in order."""
    return {key: Moments.from_arrays(arrays, f"s{j}_", lazy) for j, key in enumerate(keys)}


class LazyMoments(Mapping[str, Moments]):
    """Moments by key whose Gram matrices may be stored: each lookup reads one Gram, so a large
    model's statistics are in memory one at a time."""

    def __init__(self, items: dict[str, Moments]) -> None:
        self._items = items  # their ``gram`` is an array or a StoredArray

    def __getitem__(self, key: str) -> Moments:
        return self._items[key].loaded()

    def raw(self) -> dict[str, Moments]:
        """The moments as held: stored Grams stay stored (for copying them file to file)."""
        return dict(self._items)

    def need(self, keys: Iterable[str]) -> None:
        """Make the moments of ``keys`` ready in one go, where they are computed on demand
        (:class:`flarc.calib.statistics.OnDemandMoments`); here they all are already."""

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
