"""What each target became: rank, parameters kept, the predicted whitened error, and the error
measured on held-out rows (exact, from their Gram)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from flarc.calib.moments import Moments
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target, Weights, weight_view
from flarc.rewrite.analysis import Analysis
from flarc.rewrite.ranks import RankChoice

# Output columns per block of the held-out error of one target.
HELDOUT_BLOCK = 2048


@dataclass
class TargetRow:
    """One target's line of the report."""

    name: str
    op_type: str
    n: int
    m: int
    k_equiv: float
    rank: int | None
    params: int
    kept_params: int
    predicted_error: float | None
    heldout_error: float | None
    shrinkage: float
    whitening: str
    rows: int
    reason: str
    criterion: float | None = None
    alpha: float | None = None
    stored_bytes: int = 0  # the weight as the file stores it (with its scales, zero points)
    kept_bytes: int = 0  # the factors as written (the weight's when dense)

    def to_dict(self) -> dict:
        """The row as plain JSON values."""
        return asdict(self)


def output_errors(
    grams: list[Moments | None],
    target: Target,
    a: np.ndarray,
    c: np.ndarray,
    weight: np.ndarray,
) -> list[float | None]:
    """Measured ``||X (B - A C)||^2 / ||X B||^2`` for the rows of each Gram in ``grams`` (None
    where there is none), exact from the Gram; one pass over ``B`` serves them all."""
    num, den = [0.0] * len(grams), [0.0] * len(grams)
    if any(g is not None for g in grams):
        view = weight_view(target, weight)
        # In blocks of output columns: a large target's float64 B and residual are never whole.
        for j in range(0, target.m, HELDOUT_BLOCK):
            b = np.asarray(view[:, j : j + HELDOUT_BLOCK], dtype=np.float64)
            d = b - a @ c[:, j : j + HELDOUT_BLOCK]
            for i, moments in enumerate(grams):
                if moments is not None:
                    num[i] += float(np.einsum("ij,ij->", d, moments.gram @ d))
                    den[i] += float(np.einsum("ij,ij->", b, moments.gram @ b))
    return [
        n / d if g is not None and d > 0 else None for n, d, g in zip(num, den, grams, strict=True)
    ]


def target_rows(
    analysis: Analysis,
    ranks: dict[str, RankChoice],
    weights: Weights,
    progress: Progress | None = None,
) -> list[TargetRow]:
    """A row per target, in graph order."""
    rows = []
    progress = progress or NoProgress()
    # Two-sided spectra measure loss, not the output error: predict that from the Gram.
    two_sided = analysis.options.two_sided and analysis.output_diag is not None
    targets = analysis.targets
    for t in progress.track(targets, total=len(targets), description="held-out errors"):
        e = analysis.entries[t.name]
        choice = ranks[t.name]
        k = choice.rank
        measured = None
        predicted = 0.0
        if k is not None:
            a, c = e.spectrum.factors(k)
            grams = [analysis.heldout_stats.get(t.stat_key)]
            if two_sided:
                grams.append(analysis.stats.get(t.stat_key))
            measured, *calibrated = output_errors(grams, t, a, c, weights.consumed(t))
            predicted = calibrated[0] if two_sided else e.spectrum.error(k)
        rows.append(
            TargetRow(
                name=t.name,
                op_type=t.op_type,
                n=t.n,
                m=t.m,
                k_equiv=t.k_equiv,
                rank=k,
                params=t.params,
                kept_params=t.rank_params(k) if k is not None else t.params,
                predicted_error=predicted,
                heldout_error=measured,
                shrinkage=e.lam,
                whitening=e.whitening,
                rows=e.rows,
                reason=choice.reason,
                criterion=choice.criterion,
                alpha=(analysis.fisher or {}).get(t.name),
            )
        )
    return rows
