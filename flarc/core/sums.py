"""Sums over large arrays in float64 without a float64 copy of them: a language model's logits
for one batch are hundreds of MB in float32, and their float64 copy (or the concatenation of
every batch's) would dominate a large model's peak memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Elements per block of a blocked sum (8 MB of float64 temporaries).
BLOCK = 1 << 20


def blocks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Matching float64 blocks of two arrays of the same size (flattened)."""
    fa, fb = np.ravel(a), np.ravel(b)
    if fa.size != fb.size:
        raise ValueError(f"sizes differ: {fa.size} vs {fb.size}")
    for i in range(0, fa.size, BLOCK):
        yield fa[i : i + BLOCK].astype(np.float64), fb[i : i + BLOCK].astype(np.float64)


class PairSums:
    """Running sums of a reference ``a`` and a candidate ``b``, over any number of array pairs:
    ``a.a``, ``b.b``, ``a.b``, ``(a-b).(a-b)``, ``sum |a-b|``, ``max |a-b|``, ``max |a|``."""

    def __init__(self) -> None:
        self.aa = self.bb = self.ab = self.dd = self.abs_sum = 0.0
        self.abs_max = self.ref_max = 0.0
        self.count = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add one pair to the sums: ``a`` the reference, ``b`` the candidate, of the same size
        (ValueError otherwise)."""
        for x, y in blocks(a, b):
            d = x - y
            self.aa += float(x @ x)
            self.bb += float(y @ y)
            self.ab += float(x @ y)
            self.dd += float(d @ d)
            ad = np.abs(d)
            self.abs_sum += float(ad.sum())
            if ad.size:
                self.abs_max = max(self.abs_max, float(ad.max()))
                self.ref_max = max(self.ref_max, float(np.abs(x).max()))
            self.count += x.size

    def cosine(self) -> float:
        """Cosine similarity of everything added; when a side is all zeros, 1.0 if the two are equal
        and 0.0 if not."""
        denom = np.sqrt(self.aa) * np.sqrt(self.bb)
        return float(self.ab / denom) if denom > 0 else float(self.dd == 0.0)

    def relative_l2(self) -> float:
        """``||a - b|| / ||a||`` over everything added."""
        return float(np.sqrt(self.dd / self.aa)) if self.aa > 0 else 0.0
