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

Every budget named must be one of the folder's buckets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from flarc.core.errors import FlarcError


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
    """A parsed schedule; ``budget(step, entropy)`` names the bucket of a step."""

    kind: str  # static | steps | entropy
    spec: str
    budgets: tuple[float, ...]  # the buckets available, largest first
    steps: tuple[tuple[int, float], ...] = ()  # (start step, budget), for steps/static
    low: float = 0.0
    high: float = 0.0

    def first(self) -> float:
        """The budget of step 0 (the prefill)."""
        return self.budget(0, None)

    def budget(self, step: int, previous_entropy: float | None) -> float:
        """Budget for ``step``; ``previous_entropy`` is H at step - 1 (None at step 0)."""
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
        return tuple(sorted({b for _, b in self.steps}, reverse=True))

    @property
    def needs_entropy(self) -> bool:
        return self.kind == "entropy"


def entropy_budget(h: float, low: float, high: float, budgets: tuple[float, ...]) -> float:
    """The ``entropy`` rule of the module docstring."""
    b_max, b_min = max(budgets), min(budgets)
    if h <= low:
        return b_min
    if h >= high:
        return b_max
    want = b_min + (h - low) / (high - low) * (b_max - b_min)
    return min(b for b in budgets if b >= want - 1e-9)


def parse_schedule(spec: str, available: list[float]) -> Schedule:
    """Parse ``spec`` against the folder's bucket budgets (module docstring for the grammar)."""
    budgets = tuple(sorted(available, reverse=True))
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not rest:
        raise FlarcError(f"schedule '{spec}': expected static:B, steps:B@T,... or entropy:LOW:HIGH")
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
            raise FlarcError(f"schedule '{spec}': expected entropy:LOW:HIGH (nats)")
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
