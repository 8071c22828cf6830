"""What each target became: rank, parameters kept, the predicted whitened error, and the error
measured on held-out rows (exact, from their Gram)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from flarc.calib.moments import LazyMoments, Moments, gram_upper
from flarc.core.executor import JobHints, LocalExecutor
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
    """Measured ``||X (B - A C)||^2 / ||X B||^2`` for the rows of each Gram ``G = X^T X`` in
    ``grams`` (None where there is none), exact from the Gram; one pass over ``B`` serves them
    all. ``tr(D^T G D) = <G, D D^T>``: the ``n x n`` products ``D D^T`` and ``B B^T`` (symmetric
    updates, ``n^2 m`` multiply-adds for both) serve every Gram, where ``G D`` and ``G B`` would
    take twice that per Gram. The products are in the weight's precision, float32 unless it is
    float64 (half the time of float64 products on Qwen2.5-0.5B: 6 s against 12 s): a reported error
    is then exact to about ``1e-7 ||B|| / ||D||`` relative, far below its printed digits."""
    num, den = [0.0] * len(grams), [0.0] * len(grams)
    present = [(i, g) for i, g in enumerate(grams) if g is not None]
    if present:
        view = weight_view(target, weight)
        dtype = np.result_type(view.dtype, np.float32)
        a = np.asarray(a, dtype=dtype)
        dd, bb = 0.0, 0.0
        # In blocks of output columns: a large target's B and residual are never whole.
        for j in range(0, target.m, HELDOUT_BLOCK):
            b = np.asarray(view[:, j : j + HELDOUT_BLOCK], dtype=dtype)
            d = b - a @ np.asarray(c[:, j : j + HELDOUT_BLOCK], dtype=dtype)
            dd = dd + gram_upper(d.T)
            bb = bb + gram_upper(b.T)
        for i, moments in present:
            num[i], den[i] = _with_upper(moments.gram, dd), _with_upper(moments.gram, bb)
    return [
        n / d if g is not None and d > 0 else None for n, d, g in zip(num, den, grams, strict=True)
    ]


def _with_upper(g: np.ndarray, upper: np.ndarray) -> float:
    """``<G, S>`` for symmetric ``G`` and ``S`` given by its upper triangle: twice that
    triangle's inner product with ``G`` less the diagonal's."""
    g = np.ascontiguousarray(g)
    return 2 * float(np.vdot(g, upper)) - float(np.diagonal(g) @ np.diagonal(upper))


def _hints(t: Target, k: int) -> JobHints:
    """Cost ~ ``A C`` and the two ``n x n`` products (``D D^T``, ``B B^T``); memory ~ the
    factors, the blocks of ``B`` and its residual, and the Grams and products."""
    block = min(t.m, HELDOUT_BLOCK)
    cost = 2.0 * t.n * t.m * (k + t.n)
    return JobHints(cost, 8 * (k * (t.n + t.m) + 3 * t.n * block + 4 * t.n * t.n))


def target_rows(
    analysis: Analysis,
    ranks: dict[str, RankChoice],
    weights: Weights,
    progress: Progress | None = None,
) -> list[TargetRow]:
    """A row per target, in graph order. The factorized targets' errors are jobs of a
    :class:`LocalExecutor` (two at a time on two cores, each reading its own factors, weight
    and Grams while the other multiplies)."""
    progress = progress or NoProgress()
    # Two-sided spectra measure loss, not the output error: predict that from the Gram.
    two_sided = analysis.options.two_sided and analysis.output_diag is not None
    targets = analysis.targets
    chosen = [t for t in targets if ranks[t.name].rank is not None]
    if isinstance(analysis.heldout_stats, LazyMoments):  # those computed on demand, in one go
        analysis.heldout_stats.need(t.stat_key for t in chosen)

    def errors(t: Target) -> tuple[float | None, float]:
        """``(measured on held-out rows, predicted)`` at the target's rank."""
        e = analysis.entries[t.name]
        k = ranks[t.name].rank
        a, c = e.spectrum.factors(k)
        grams = [analysis.heldout_stats.get(t.stat_key)]
        if two_sided:
            grams.append(analysis.stats.get(t.stat_key))
        measured, *calibrated = output_errors(grams, t, a, c, weights.consumed(t))
        return measured, calibrated[0] if two_sided else e.spectrum.error(k)

    hints = [_hints(t, ranks[t.name].rank) for t in chosen]
    results = LocalExecutor().map(errors, [(t,) for t in chosen], hints)
    found = dict(progress.track(results, total=len(chosen), description="held-out errors"))
    measured = {t.name: found[i] for i, t in enumerate(chosen)}
    rows = []
    for t in targets:
        e = analysis.entries[t.name]
        choice = ranks[t.name]
        k = choice.rank
        heldout, predicted = measured.get(t.name, (None, 0.0))
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
                heldout_error=heldout,
                shrinkage=e.lam,
                whitening=e.whitening,
                rows=e.rows,
                reason=choice.reason,
                criterion=choice.criterion,
                alpha=(analysis.fisher or {}).get(t.name),
            )
        )
    return rows
