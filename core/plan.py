"""Mixed-precision plans: each linear's bit-width chosen under an average-bit budget.

The solver is a multiple-choice knapsack: every linear picks exactly one choice (a bit-width, or 16 = kept
fp16); choice ``k`` of linear ``i`` costs ``bit_cost(bits_k, g_i) * n_i`` storage bits (``n_i`` weights, fp16
scale and zero per group, ``core.metrics.bit_cost``) and is worth its sensitivity ``v_ik`` (fp16: 0); the
plan minimises ``sum_i v_i,k(i)`` subject to ``sum_i cost_i,k(i) <= budget * sum_i n_i``.

Method: dynamic programming over the cost axis. Costs are whole numbers of bits whenever the group size
divides the layer's width (``n*b + 32 n/g``), so after subtracting each item's cheapest choice and dividing
by the greatest common divisor of all cost steps the DP runs on exact integers: the result is the exact
optimum (``exact=True``). Only when that table would be too large (``max_cells``) are the costs rounded *up*
to a coarser unit ``u``: the plan is still within budget and its objective is no worse than the exact optimum
at the smaller budget ``budget - m u / N`` (``slack_bits``, stated on the result; ``exact=False``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Mapping, Sequence

import numpy as np

from .metrics import bit_cost

DEFAULT_CHOICES = (2, 3, 4, 8, 16)
MAX_CELLS = 1 << 25  # DP table entries (items x cost units), int8 back-pointers: 32 MiB


@dataclass(frozen=True)
class Solution:
    """The solver's answer. ``choice[i]`` indexes linear ``i``'s choices; costs in storage bits."""

    choice: np.ndarray  # [m] int
    cost: float  # total storage bits of the chosen plan
    value: float  # summed sensitivity of the chosen plan
    exact: bool  # True: the optimum of the stated problem; False: see slack
    slack: float  # total bits: the value is <= the exact optimum at capacity - slack (0 when exact)


def _integral(a: np.ndarray) -> bool:
    return bool(np.all(np.abs(a - np.round(a)) <= 1e-6 * np.maximum(1.0, np.abs(a))))


def solve_mck(cost: np.ndarray, value: np.ndarray, capacity: float, *, max_cells: int = MAX_CELLS) -> Solution:
    """Multiple-choice knapsack: one choice per row, minimise summed ``value`` with summed ``cost <= capacity``.

    ``cost``, ``value``: ``[m, k]`` (use ``inf`` cost for a choice a row does not have). Raises ``ValueError``
    when even the cheapest choices exceed ``capacity``. Ties go to the cheaper choice (lower index after
    sorting each row by cost).
    """
    cost = np.asarray(cost, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    if cost.shape != value.shape or cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError("cost and value must be non-empty [items, choices] arrays of one shape")
    if np.isnan(value).any() or np.isinf(value).any():
        raise ValueError("every choice needs a finite sensitivity")
    m, k = cost.shape
    order = np.argsort(cost, axis=1, kind="stable")
    c = np.take_along_axis(cost, order, 1)
    v = np.take_along_axis(value, order, 1)
    base = c[:, 0]
    if not np.isfinite(base).all():
        raise ValueError("every item needs at least one choice with a finite cost")
    free = capacity - base.sum()
    if free < -1e-9 * max(1.0, abs(capacity)):
        raise ValueError("the budget is below the cheapest plan")
    free = max(0.0, free)
    rel = c - base[:, None]  # [m, k] >= 0, inf where a choice is missing
    finite = np.isfinite(rel)
    steps = rel[finite & (rel > 0)]
    exact = _integral(steps)  # whole-number steps: floor(free / unit) loses nothing
    unit = float(reduce(math.gcd, (int(round(s)) for s in steps), 0)) if exact and steps.size else 1.0
    if exact:
        cap = int(math.floor(free / unit + 1e-9))
    if not exact or m * (cap + 1) > max_cells:
        exact = False
        unit = max(free / max(1, max_cells // m - 1), 1e-12)
        cap = int(math.floor(free / unit + 1e-9))
    units = np.where(finite, np.ceil(rel / unit - 1e-9), np.iinfo(np.int64).max).astype(np.int64)
    dp = np.zeros(cap + 1)  # dp[c]: least value of the items so far with relative cost <= c units
    back = np.zeros((m, cap + 1), dtype=np.int8 if k < 128 else np.int16)
    for i in range(m):
        best = np.full(cap + 1, np.inf)
        arg = back[i]
        for j in range(k):
            r = units[i, j]
            if r > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[r:] = dp[: cap + 1 - r] + v[i, j]
            better = cand < best
            best[better] = cand[better]
            arg[better] = j
        dp = best
    choice_sorted = np.zeros(m, dtype=np.int64)
    cc = cap
    for i in range(m - 1, -1, -1):
        j = int(back[i, cc])
        choice_sorted[i] = j
        cc -= int(units[i, j])
    choice = order[np.arange(m), choice_sorted]
    total_cost = float(cost[np.arange(m), choice].sum())
    total_value = float(value[np.arange(m), choice].sum())
    return Solution(choice=choice, cost=total_cost, value=total_value, exact=exact,
                    slack=0.0 if exact else float(m * unit))


# ------------------------------------------------------------------------------------------------
# plans over a model's linears
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitPlan:
    """Each linear's bits (16 = kept fp16) and group size under an average-bit budget.

    ``avg_bits``: storage bits per quantizable weight (``core.metrics.bit_cost``, weighted by weight counts);
    ``objective``: summed sensitivity of the chosen bits; ``exact``/``slack_bits``: see ``solve_mck``;
    ``measured``: whole-model metrics of the verified plan, filled in by verification.
    """

    model: str
    method: str
    budget_bits: float
    zero_point: bool
    layers: Mapping[str, tuple[int, int]]  # name -> (bits, group_size)
    avg_bits: float
    objective: float
    exact: bool
    slack_bits: float
    measured: Mapping[str, float] = field(default_factory=dict)

    def bits_of(self, name: str) -> int:
        return int(self.layers[name][0])

    def names_at(self, bits: int) -> list[str]:
        return [n for n, (b, _) in self.layers.items() if b == bits]

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b, _ in self.layers.values():
            out[int(b)] = out.get(int(b), 0) + 1
        return dict(sorted(out.items()))


def check_choices(bits: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct candidate bit-widths (2..8, or 16 for fp16); a readable ``ValueError`` otherwise."""
    out = set()
    for b in bits:
        if isinstance(b, bool) or int(b) != b or not (2 <= int(b) <= 8 or int(b) == 16):
            raise ValueError(f"candidate bits must be 2..8 or 16 (fp16), got {b!r}")
        out.add(int(b))
    if not out:
        raise ValueError("give at least one candidate bit-width")
    return tuple(sorted(out))


def budget_range(n_weights: Mapping[str, int], group_sizes: Mapping[str, int], choices: Sequence[int],
                 zero_point: bool = True) -> tuple[float, float]:
    """``(lowest, highest)`` average bits a plan over these linears can cost with these choices."""
    total = sum(n_weights.values())
    lo = sum(min(bit_cost(b, group_sizes[n], zero_point) for b in choices) * w for n, w in n_weights.items())
    hi = sum(max(bit_cost(b, group_sizes[n], zero_point) for b in choices) * w for n, w in n_weights.items())
    return lo / total, hi / total


def check_budget(budget: float, lo: float, hi: float) -> float:
    """The budget as a float, or one sentence saying why it cannot be planned."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"the budget must be a number of bits per weight, got {budget!r}") from None
    if not math.isfinite(b):
        raise ValueError(f"the budget must be a finite number of bits per weight, got {budget!r}")
    eps = 1e-9
    if b < lo - eps:
        raise ValueError(f"a budget of {b:g} bits per weight is below the cheapest plan with these choices "
                         f"({lo:.4g} bits: every linear at the lowest bit-width, scales and zeros included)")
    if b > hi + eps:
        raise ValueError(f"a budget of {b:g} bits per weight is above the most expensive plan with these choices "
                         f"({hi:.4g} bits: every linear at the highest), so there is nothing to choose")
    return b


def solve_plan(sensitivity: Mapping[str, Mapping[int, float]], n_weights: Mapping[str, int],
               group_sizes: Mapping[str, int], budget: float, *, choices: Sequence[int] = DEFAULT_CHOICES,
               zero_point: bool = True, model: str = "", method: str = "",
               max_cells: int = MAX_CELLS) -> BitPlan:
    """Pick each linear's bits in ``choices`` minimising summed sensitivity under ``budget`` average bits.

    ``sensitivity[name][bits]``: the cost to quality of that linear at that width (16 = fp16 may be left
    out: it counts 0); ``n_weights[name]`` = out x in; ``group_sizes[name]``: the group length it uses.
    """
    choices = check_choices(choices)
    names = list(n_weights)
    if not names:
        raise ValueError("no linears to plan")
    lo, hi = budget_range(n_weights, group_sizes, choices, zero_point)
    budget = check_budget(budget, lo, hi)
    total = sum(n_weights.values())
    cost = np.empty((len(names), len(choices)))
    val = np.empty_like(cost)
    for i, n in enumerate(names):
        for j, b in enumerate(choices):
            # n * bit_cost is a whole number of bits when g divides the width: keep it exact
            cost[i, j] = n_weights[n] * b + (0 if b == 16 else n_weights[n] * (32 if zero_point else 16)
                                             / group_sizes[n])
            if b == 16:
                val[i, j] = float(sensitivity.get(n, {}).get(16, 0.0))
            else:
                s = sensitivity.get(n, {}).get(b)
                if s is None:
                    raise ValueError(f"no sensitivity for {n} at {b} bits")
                val[i, j] = float(s)
    sol = solve_mck(cost, val, budget * total, max_cells=max_cells)
    layers = {n: (int(choices[j]), int(group_sizes[n])) for n, j in zip(names, sol.choice)}
    return BitPlan(model=model, method=method, budget_bits=budget, zero_point=zero_point, layers=layers,
                   avg_bits=sol.cost / total, objective=sol.value, exact=sol.exact, slack_bits=sol.slack / total)


def uniform_plan(n_weights: Mapping[str, int], group_sizes: Mapping[str, int], bits: int, *,
                 zero_point: bool = True, model: str = "", method: str = "") -> BitPlan:
    """Every linear at ``bits``: the baseline a plan is compared with on the frontier."""
    total = sum(n_weights.values())
    avg = sum(bit_cost(bits, group_sizes[n], zero_point) * w for n, w in n_weights.items()) / total
    return BitPlan(model=model, method=method, budget_bits=avg, zero_point=zero_point,
                   layers={n: (int(bits), int(group_sizes[n])) for n in n_weights}, avg_bits=avg,
                   objective=float("nan"), exact=True, slack_bits=0.0)
