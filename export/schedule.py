"""Which bucket decodes each step: ``static``, ``steps`` and ``entropy`` schedules.

Step ``t`` is the forward pass that produces generated token ``t`` (step 0 is the prefill over
the prompt, which produces the first new token). Spellings:

- ``static:B``: bucket B for every step.
- ``steps:B0@0,B1@T1,B2@T2,...``: bucket Bi from step Ti on. The first entry starts at 0, the
  starts increase, and the budgets never increase (docs/design.md section 9: R(t) is
  non-increasing); anything else is refused with a one-line error.
- ``entropy:LOW:HIGH``: step 0 uses the largest bucket; step t+1 follows the entropy H (nats)
  of the full next-token distribution at step t (softmax of the logits at temperature 1):
  ``H <= LOW`` -> smallest bucket, ``H >= HIGH`` -> largest, in between the smallest bucket
  whose budget is at least ``b_min + (H - LOW) / (HIGH - LOW) * (b_max - b_min)``: more rank
  when the model is uncertain.
- ``entropy:MEAN``: the same idea at a mean budget the user fixes, with no thresholds to tune.
  It decodes with the two buckets around MEAN (those next to it when MEAN is a bucket): HI, LO,
  with HI's share of steps ``f = (MEAN - LO) / (HI - LO)``. Step 0 uses HI; step t+1 uses HI when
  step t's entropy ranks in the top ``f`` of the entropies of steps 0..t-1 (more rank where the
  model is least sure), LO otherwise, and then a budget account overrides the choice when the
  running mean would stray from MEAN by more than ``PACE_SLACK * (HI - LO)`` summed over the
  steps: after n steps the mean budget is within ``(PACE_SLACK + 1) * (HI - LO) / n`` of MEAN.

Every budget named must be one of the folder's buckets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flarc.core.errors import FlarcError

# How far (in HI - LO steps, summed) an entropy:MEAN schedule's spending may run ahead or behind.
PACE_SLACK = 2.0


def _match(budget: float, available: list[float], spec: str) -> float:
    for b in available:
        if abs(b - budget) < 1e-6:
            return b
    have = ", ".join(f"{b:g}" for b in sorted(available, reverse=True))
    raise FlarcError(f"schedule '{spec}': no bucket with budget {budget:g} (buckets: {have})")


def _number(text: str, spec: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise FlarcError(f"schedule '{spec}': '{text}' is not a number") from None


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; ``budget(step, entropy, history)`` names the bucket of a step."""

    kind: str  # static | steps | entropy | paced (entropy:MEAN)
    spec: str
    budgets: tuple[float, ...]  # the buckets available, largest first
    steps: tuple[tuple[int, float], ...] = ()  # (start step, budget), for steps/static
    low: float = 0.0
    high: float = 0.0
    mean: float = 0.0

    def first(self) -> float:
        """The budget of step 0 (the prefill)."""
        return self.budget(0, None)

    def budget(
        self,
        step: int,
        previous_entropy: float | None,
        history: Sequence[tuple[float, float]] = (),
    ) -> float:
        """Budget for ``step``; ``previous_entropy`` is H at step - 1 (None at step 0);
        ``history`` is (budget, entropy) of every earlier step, which ``entropy:MEAN`` reads."""
        if self.kind == "paced":
            return paced_budget(self.mean, self.budgets, history)
        if self.kind == "entropy":
            if previous_entropy is None:
                return self.budgets[0]
            return entropy_budget(previous_entropy, self.low, self.high, self.budgets)
        chosen = self.steps[0][1]
        for start, b in self.steps:
            if step >= start:
                chosen = b
        return chosen

    @property
    def used(self) -> tuple[float, ...]:
        """The buckets this schedule can pick, largest first (only these need a session)."""
        if self.kind == "entropy":
            return self.budgets
        if self.kind == "paced":
            return tuple(sorted(set(pace_pair(self.mean, self.budgets)[:2]), reverse=True))
        return tuple(sorted({b for _, b in self.steps}, reverse=True))

    @property
    def needs_entropy(self) -> bool:
        return self.kind in ("entropy", "paced")


def entropy_budget(h: float, low: float, high: float, budgets: tuple[float, ...]) -> float:
    """The ``entropy`` rule of the module docstring."""
    b_max, b_min = max(budgets), min(budgets)
    if h <= low:
        return b_min
    if h >= high:
        return b_max
    want = b_min + (h - low) / (high - low) * (b_max - b_min)
    return min(b for b in budgets if b >= want - 1e-9)


def pace_pair(mean: float, budgets: tuple[float, ...]) -> tuple[float, float, float]:
    """``(HI, LO, f)`` of an ``entropy:MEAN`` schedule: the buckets around ``mean`` (its
    neighbours when it is a bucket; both ``mean`` at either end) and HI's share of steps."""
    ordered = sorted(budgets)
    above = [b for b in ordered if b > mean + 1e-9]
    below = [b for b in ordered if b < mean - 1e-9]
    if not above or not below:
        b = min(ordered, key=lambda x: abs(x - mean))
        return b, b, 1.0
    hi, lo = above[0], below[-1]
    return hi, lo, (mean - lo) / (hi - lo)


def paced_budget(
    mean: float, budgets: tuple[float, ...], history: Sequence[tuple[float, float]]
) -> float:
    """The ``entropy:MEAN`` rule of the module docstring; ``history`` is (budget, entropy) of
    the steps before this one."""
    hi, lo, share = pace_pair(mean, budgets)
    if hi == lo or not history:
        return hi
    # What this step may use with the running mean at MEAN, and how far it may stray.
    credit = mean * (len(history) + 1) - sum(b for b, _ in history)
    slack = PACE_SLACK * (hi - lo)
    if credit < hi - slack:
        return lo
    if credit > lo + slack:
        return hi
    h, earlier = history[-1][1], [e for _, e in history[:-1]]
    if not earlier:
        return hi
    rank = sum(e < h for e in earlier) / len(earlier)  # the share of earlier steps below H
    return hi if rank >= 1 - share else lo


def parse_schedule(spec: str, available: list[float]) -> Schedule:
    """Parse ``spec`` against the folder's bucket budgets (module docstring for the grammar)."""
    budgets = tuple(sorted(available, reverse=True))
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not rest:
        raise FlarcError(
            f"schedule '{spec}': expected static:B, steps:B@T,..., entropy:LOW:HIGH or entropy:MEAN"
        )
    if kind == "static":
        b = _match(_number(rest, spec), budgets, spec)
        return Schedule("static", spec, budgets, ((0, b),))
    if kind == "steps":
        steps = []
        for item in rest.split(","):
            b_text, sep, t_text = item.partition("@")
            if not sep:
                raise FlarcError(f"schedule '{spec}': entry '{item}' is not BUDGET@STEP")
            steps.append((_number(t_text, spec, int), _match(_number(b_text, spec), budgets, spec)))
        if steps[0][0] != 0:
            raise FlarcError(f"schedule '{spec}': the first entry must start at step 0")
        for (t0, b0), (t1, b1) in itertools.pairwise(steps):
            if t1 <= t0:
                raise FlarcError(f"schedule '{spec}': steps must increase ({t0} then {t1})")
            if b1 > b0:
                raise FlarcError(
                    f"schedule '{spec}': budgets must be non-increasing ({b0:g} then {b1:g} at "
                    f"step {t1})"
                )
        return Schedule("steps", spec, budgets, tuple(steps))
    if kind == "entropy":
        low_text, sep, high_text = rest.partition(":")
        if not sep:
            mean = _number(rest, spec)
            if not min(budgets) - 1e-9 <= mean <= max(budgets) + 1e-9:
                raise FlarcError(
                    f"schedule '{spec}': mean budget {mean:g} is outside the buckets "
                    f"({min(budgets):g} to {max(budgets):g})"
                )
            return Schedule("paced", spec, budgets, mean=mean)
        low, high = _number(low_text, spec), _number(high_text, spec)
        if not 0 <= low < high:
            raise FlarcError(f"schedule '{spec}': need 0 <= LOW < HIGH, got {low:g}, {high:g}")
        return Schedule("entropy", spec, budgets, low=low, high=high)
    raise FlarcError(f"schedule '{spec}': unknown kind '{kind}' (static, steps, entropy)")


def entropy(logits: np.ndarray) -> float:
    """Entropy in nats of ``softmax(logits)`` (one vector), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    p = np.exp(z)
    total = p.sum()
    p /= total
    return float(-(p * (z - np.log(total))).sum())
