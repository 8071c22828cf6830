"""Ranks chosen for all targets together under one budget.

- ``fisher`` (FLRC): ranks proportional to the Fisher importance ``alpha_t``, clipped to
  ``[align, k_max]`` with the surplus redistributed, meeting the parameter budget exactly to
  alignment (largest-remainder rounding).
- ``global``: minimise ``sum_t w_t err_t(k_t)`` subject to ``sum_t cost_t(k_t) <= budget``,
  over each target's aligned ranks and "dense", where ``err_t`` is the whitened error curve
  and ``cost`` is any per-target cost (parameters by default, measured latency for the
  latency budget). Greedy on each curve's lower convex hull (the Lagrangian solution), then a
  fill pass spends what is left on the best remaining single upgrades.

A budget is a fraction of the targets' dense cost (``0.8``: keep 80% of their parameters).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Mapping

from flarc.core.errors import OptionError
from flarc.core.targets import Target
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.search import rank_grid
from flarc.rewrite.spectrum import Spectrum

log = logging.getLogger(__name__)

Cost = Callable[[Target, int | None], float]  # rank None = dense


def parameter_cost(target: Target, k: int | None) -> float:
    """The default :data:`Cost`: parameters of ``target`` at rank ``k`` (``k (n + m)``), or dense
    (``n m``) for None."""
    return float(target.params if k is None else target.rank_params(k))


def _check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise OptionError(
            f"--budget {budget} must be in (0, 1] (a fraction of the targets' dense cost)"
        )


def fisher_ranks(
    targets: list[Target], alpha: Mapping[str, float], budget: float, align: int
) -> dict[str, RankChoice]:
    """FLRC: ``k_t ~ alpha_t / sum(alpha)`` scaled so ``sum k_t (n_t + m_t) = budget * sum n_t m_t``."""
    _check_budget(budget)
    grids = {t.name: rank_grid(t, align) for t in targets}
    active = [t for t in targets if grids[t.name]]
    out = {
        t.name: RankChoice(None, "dense: k_equiv below --align")
        for t in targets
        if not grids[t.name]
    }
    if not active:
        return out
    weight = {t.name: max(float(alpha.get(t.name, 0.0)), 0.0) for t in active}
    if not any(weight.values()):
        weight = dict.fromkeys(weight, 1.0)  # no information: equal ranks
    total_alpha = sum(weight.values())
    share = {name: w / total_alpha for name, w in weight.items()}
    kmax = {t.name: grids[t.name][-1] for t in active}
    limit = budget * sum(t.params for t in targets) - sum(
        t.params for t in targets if not grids[t.name]
    )

    def clipped(t: Target, s: float) -> float:
        return min(max(s * share[t.name], align), kmax[t.name])

    def spent(s: float) -> float:
        return sum(clipped(t, s) * (t.n + t.m) for t in active)

    lo, hi = 0.0, 1.0
    while spent(hi) < limit and hi < 1e12:
        hi *= 2
    for _ in range(200):  # clipping makes spent(s) piecewise linear and monotone: bisect the scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < limit else (lo, mid)
    exact = {t.name: clipped(t, lo) for t in active}
    ranks = {name: max(align, math.floor(k / align) * align) for name, k in exact.items()}
    used = sum(ranks[t.name] * (t.n + t.m) for t in active)
    if used > limit:
        log.warning(
            "the budget is below the smallest ranks (%d per target): it cannot be met", align
        )
    # Largest remainder: spend what rounding down left on the targets that lost the most.
    order = sorted(active, key=lambda t: exact[t.name] - ranks[t.name], reverse=True)
    for t in order:
        step = align * (t.n + t.m)
        if (
            ranks[t.name] + align <= kmax[t.name]
            and used + step <= limit
            and exact[t.name] > ranks[t.name]
        ):
            ranks[t.name] += align
            used += step
    for t in active:
        out[t.name] = RankChoice(ranks[t.name], f"fisher budget {budget:g}", alpha.get(t.name))
    return out


def _lower_hull(
    points: list[tuple[float, float, int | None]],
) -> list[tuple[float, float, int | None]]:
    """Lower convex hull of (cost, err, rank) sorted by cost, keeping only decreasing error."""
    hull: list[tuple[float, float, int | None]] = []
    for p in sorted(points, key=lambda q: (q[0], q[1])):
        if hull and p[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or above the segment from hull[-2] to p.
            if (e2 - e1) * (p[0] - c1) >= (p[1] - e1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def global_ranks(
    targets: list[Target],
    spectra: Mapping[str, Spectrum],
    budget: float,
    align: int,
    cost: Cost = parameter_cost,
    weights: Mapping[str, float] | None = None,
    label: str = "params",
    allowed: Callable[[Target, int | None], bool] | None = None,
    penalty: Callable[[Target, int | None], float] | None = None,
) -> dict[str, RankChoice]:
    """Minimise the (weighted) total whitened error under ``budget`` x the dense cost.

    Each target chooses among its grid ranks and "dense" (None): those ``allowed`` says (rank
    buckets: nesting), each at its error plus ``penalty`` (rank buckets: a Lagrange price on
    weights stored twice); the choices report the error without the penalty."""
    _check_budget(budget)
    options: dict[str, list[tuple[float, float, int | None]]] = {}
    for t in targets:
        w = 1.0 if weights is None else float(weights[t.name])
        ks = [*rank_grid(t, align), None]
        if allowed is not None:
            ks = [k for k in ks if allowed(t, k)]
            if not ks:
                raise ValueError(f"{t.name}: no rank allowed")
        options[t.name] = [
            (
                cost(t, k),
                (0.0 if k is None else w * spectra[t.name].error(k))
                + (0.0 if penalty is None else penalty(t, k)),
                k,
            )
            for k in ks
        ]
    limit = budget * sum(cost(t, None) for t in targets)
    current = {name: min(pts, key=lambda p: (p[0], p[1])) for name, pts in options.items()}
    used = sum(p[0] for p in current.values())
    if used > limit:
        log.warning("the %s budget is below the cheapest ranks: using them anyway", label)
    hulls = {name: _lower_hull(pts) for name, pts in options.items()}
    position = {
        name: hulls[name].index(current[name]) if current[name] in hulls[name] else 0
        for name in hulls
    }
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i = position[name]
        if i + 1 < len(hulls[name]):
            (c0, e0, _), (c1, e1, _) = hulls[name][i], hulls[name][i + 1]
            heapq.heappush(heap, (-(e0 - e1) / max(c1 - c0, 1e-30), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        nxt = hulls[name][position[name] + 1]
        step = nxt[0] - current[name][0]
        if used + step > limit:
            continue  # this target's next hull step does not fit; the fill pass may take a smaller one
        used += step
        current[name] = nxt
        position[name] += 1
        push(name)
    while True:  # fill: the best single upgrade that still fits, until none does
        best = None
        for name, pts in options.items():
            c0, e0, _ = current[name]
            for p in pts:
                gain, step = e0 - p[1], p[0] - c0
                if gain > 0 and step > 0 and used + step <= limit:
                    score = gain / step
                    if best is None or score > best[0]:
                        best = (score, name, p, step)
        if best is None:
            break
        _, name, p, step = best
        current[name] = p
        used += step
    by_name = {t.name: t for t in targets}
    out = {}
    for name, (_, err, k) in current.items():
        if penalty is not None:
            err -= penalty(by_name[name], k)
        if k is None:
            out[name] = RankChoice(None, f"dense: kept by global {label} budget {budget:g}", 0.0)
        elif k >= by_name[name].k_equiv:
            out[name] = RankChoice(None, "dense: no saving", err)
        else:
            out[name] = RankChoice(k, f"global {label} budget {budget:g}", err)
    return out
