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

import torch

from ..grids.metrics import bit_cost
from ..grids.spec import QuantSpec
from ..methods import METHODS, quantize_layer
from . import evaluate

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


# ------------------------------------------------------------------------------------------------
# sensitivity (cached as extra tables of the analysis)
# ------------------------------------------------------------------------------------------------
PLAN_METHODS = ("awq", "gptq", "rtn")
SENS_VERSION = 2
DEFAULT_SENS_TOKENS = 512  # held-out tokens each sensitivity variant is scored on
SENS_COLUMNS = ["unit", "bits", "metric", "value", "n_tokens"]


def check_method(method: str) -> str:
    m = str(method).strip().lower()
    if m not in PLAN_METHODS:
        raise ValueError(f"unknown plan method {method!r}; pick from {', '.join(PLAN_METHODS)}")
    return m


def model_metric(analysis) -> str:
    """What model-level sensitivity measures: mean KL for causal LMs, hidden-state error for encoders."""
    return "kl" if analysis.manifest.get("is_causal", True) else "hidden_rel_error"


def layer_geometry(analysis) -> tuple[dict[str, int], dict[str, int]]:
    """``(weights per linear, group length per linear)``; the group length is the sweep's per-layer one."""
    lin = analysis.linears
    nw = {str(r.name): int(r.in_features) * int(r.out_features) for r in lin.itertuples(index=False)}
    g0 = int(analysis.settings.sweep.group_size)
    gs = {str(r.name): (g0 if g0 > 0 and int(r.in_features) % g0 == 0 else int(r.in_features))
          for r in lin.itertuples(index=False)}
    return nw, gs


def quantized_weight(analysis, name: str, method: str, spec: QuantSpec) -> torch.Tensor:
    """Linear ``name`` quantized by ``method`` (``core.methods.quantize_layer``, the one entry); ``[out, in]``.
    A method with an ``alpha`` option searches on the analysis' alpha grid and takes the sweep's best alpha when
    the sweep searched this layer on the same grid (same numbers, no search)."""
    m = METHODS[method]
    options = m.options()
    if "alpha" in options.as_dict():
        n_grid = int(analysis.settings.sweep.n_grid)
        options = options.replace(n_grid=n_grid, alpha=analysis.sweep_alpha(name, spec, n_grid))
    inputs = analysis.layer_inputs(name) if m.needs_data else None
    return quantize_layer(method, analysis.weight(name), inputs, spec, options).float()


def plan_weights(analysis, layers: Mapping[str, tuple[int, int]], method: str, zero_point: bool):
    """A ``score_variants`` variant: the callable returning every non-fp16 linear's quantized weight."""
    def make() -> dict:
        return {n: quantized_weight(analysis, n, method, QuantSpec(b, g, zero_point))
                for n, (b, g) in layers.items() if int(b) != 16}
    return make


def _sens_key(method: str, zero_point: bool, granularity: str, max_tokens: int | None) -> str:
    return f"plan_sens_v{SENS_VERSION}_{method}_{'zp' if zero_point else 'sym'}_{granularity}_t{max_tokens or 'all'}"


def layer_sensitivity(analysis, method: str, bits: Sequence[int], *, zero_point: bool = True,
                      progress=None) -> "pd.DataFrame":
    """Held-out relative output error of each linear at each bit-width for ``method``.

    Columns ``name, block, family, bits, rel_heldout``. RTN and AWQ come from the sweep's table where it
    has those bits (and the plan's zero point); anything else runs ``core.methods.quantize_layer`` on the
    layer and scores it on the kept held-out rows. Cached as an extra table of the analysis.
    """
    import pandas as pd

    method = check_method(method)
    bits = [int(b) for b in bits if int(b) != 16]
    key = f"plan_layer_v{SENS_VERSION}_{method}_{'zp' if zero_point else 'sym'}"
    old = analysis.read_extra(key)
    have = set() if old is None else set(zip(old["name"], old["bits"]))
    lin = analysis.linears
    _, gs = layer_geometry(analysis)
    sweep = analysis.layers
    col = {"rtn": "rtn_rel_heldout", "awq": "awq_rel_heldout"}.get(method)
    use_sweep = col is not None and analysis.settings.sweep.zero_point == zero_point
    rows = []
    todo = [(r, b) for r in lin.itertuples(index=False) for b in bits if (str(r.name), b) not in have]
    for i, (r, b) in enumerate(todo):
        name = str(r.name)
        hit = sweep[(sweep["name"] == name) & (sweep["bits"] == b)] if use_sweep else sweep.iloc[:0]
        if len(hit) and math.isfinite(float(hit[col].iloc[0])):
            rel = float(hit[col].iloc[0])
        else:
            w_hat = quantized_weight(analysis, name, method, QuantSpec(b, gs[name], zero_point))
            rel = analysis.layer_error(name, w_hat, "heldout")
        rows.append({"name": name, "block": int(r.block), "family": str(r.family), "bits": b, "rel_heldout": rel})
        if progress:
            progress((i + 1) / len(todo), f"layer sensitivity {name} w{b}")
    new = pd.DataFrame(rows, columns=["name", "block", "family", "bits", "rel_heldout"])
    df = new if old is None else pd.concat([old, new], ignore_index=True)
    if len(new):
        analysis.write_extra(key, df)
    return df[df["bits"].isin(bits)].reset_index(drop=True)


def model_sensitivity(analysis, method: str, bits: Sequence[int], *, zero_point: bool = True,
                      granularity: str = "block", max_tokens: int | None = DEFAULT_SENS_TOKENS,
                      progress=None) -> "pd.DataFrame":
    """Whole-model damage when only one unit is quantized at each bit-width, everything else fp.

    ``granularity``: ``"block"`` (units: each block's linears together, and each family's linears in all
    blocks together, ``"family:<f>"``) or ``"linear"`` (unit = one linear).
    Scored by ``core.studies.evaluate.score_variants`` on ``max_tokens`` held-out tokens: mean KL for causal LMs,
    hidden-state relative error for encoders. Columns ``unit, bits, metric, value, n_tokens``; cached per
    (method, zero point, granularity, token budget), only missing (unit, bits) pairs are computed.
    """
    import pandas as pd


    method = check_method(method)
    if granularity not in ("block", "linear"):
        raise ValueError(f"granularity must be 'block' or 'linear', got {granularity!r}")
    bits = [int(b) for b in bits if int(b) != 16]
    metric = model_metric(analysis)
    key = _sens_key(method, zero_point, granularity, max_tokens)
    old = analysis.read_extra(key)
    have = set() if old is None else set(zip(old["unit"].astype(str), old["bits"]))
    _, gs = layer_geometry(analysis)
    lin = analysis.linears
    units: dict[str, list[str]] = {}
    for r in lin.itertuples(index=False):
        u = str(int(r.block)) if granularity == "block" else str(r.name)
        units.setdefault(u, []).append(str(r.name))
        if granularity == "block":  # and each family across all blocks: how hard the model feels that family
            units.setdefault(f"family:{r.family}", []).append(str(r.name))
    variants = {}
    for u, names in units.items():
        for b in bits:
            if (u, b) not in have:
                variants[f"{u}@{b}"] = plan_weights(analysis, {n: (b, gs[n]) for n in names}, method, zero_point)
    if variants:
        res = evaluate.score_variants(analysis, variants, max_tokens=max_tokens, progress=progress)
        res = res[(res["metric"] == metric) & res["variant"].isin(set(variants))]  # not the fp reference rows
        new = pd.DataFrame({"unit": [v.rsplit("@", 1)[0] for v in res["variant"]],
                            "bits": [int(v.rsplit("@", 1)[1]) for v in res["variant"]],
                            "metric": metric, "value": res["value"].astype(float).to_numpy(),
                            "n_tokens": res["n_tokens"].astype(int).to_numpy()})
        old = new if old is None else pd.concat([old, new], ignore_index=True)
        analysis.write_extra(key, old)
    out = old[old["bits"].isin(bits)].reset_index(drop=True)
    out["unit"] = out["unit"].astype(str)
    return out


def combine_sensitivity(layer_df, model_df, granularity: str = "block") -> dict[str, dict[int, float]]:
    """Per-linear solver values ``{name: {bits: value}}`` from the measurements.

    ``linear`` granularity: each linear's own measured model-level value. ``block``: a separable (block x
    family) model of two measured margins, ``v(i, f, b) = K_block(i, b) * K_family(f, b) / sum_f' K_family(f', b)``
    (divided by the number of linears of family ``f`` in block ``i``): ``K_block`` with only block ``i``
    quantized, ``K_family`` with family ``f`` quantized in every block. A block's values sum to its measured
    damage, shared by how much the model feels each family. On all-MiniLM-L6-v2 (36 linears, AWQ w2-w8, 256
    held-out tokens) this correlates 0.88-0.92 (log scale) with measuring every linear alone; splitting by the
    layer-level relative error instead correlated 0.71 and mis-ranked the last down projection (its 2-bit
    damage under-estimated 13x), so the layer-level table is shown, not used, here. Without family rows the
    split is even. Negative measurements (noise at high bits) count 0.
    """
    out: dict[str, dict[int, float]] = {}
    model = {(str(u), int(b)): max(0.0, float(v)) for u, b, v in zip(model_df["unit"], model_df["bits"],
                                                                     model_df["value"])}
    if granularity == "linear":
        for r in layer_df.itertuples(index=False):
            out.setdefault(str(r.name), {})[int(r.bits)] = model[(str(r.name), int(r.bits))]
        return out
    fams = sorted(set(layer_df["family"].astype(str)))
    count = layer_df.groupby(["block", "family", "bits"])["name"].transform("count").to_numpy()
    for r, c in zip(layer_df.itertuples(index=False), count):
        b = int(r.bits)
        ks = [model.get((f"family:{f}", b)) for f in fams]
        if any(k is None for k in ks):
            share = 1.0 / len(fams)
        else:
            tot = sum(ks)
            share = model[(f"family:{r.family}", b)] / tot if tot > 0 else 1.0 / len(fams)
        out.setdefault(str(r.name), {})[b] = model[(str(int(r.block)), b)] * share / int(c)
    return out


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is made of. ``bits``: candidate widths (16 = keep fp16); ``sens_tokens``: held-out tokens
    per sensitivity variant; ``eval_tokens``: held-out tokens of the verification (None = all)."""

    budget: float = 3.5
    method: str = "awq"
    bits: tuple[int, ...] = DEFAULT_CHOICES
    zero_point: bool = True
    granularity: str = "block"
    sens_tokens: int | None = DEFAULT_SENS_TOKENS
    eval_tokens: int | None = None


def sensitivities(analysis, s: PlanSettings, progress=None) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """``(layer-level table, model-level table)`` for the plan's method and candidate bits (cached)."""
    sub = _split_progress(progress, 0.2)
    lay = layer_sensitivity(analysis, s.method, s.bits, zero_point=s.zero_point, progress=sub[0])
    mod = model_sensitivity(analysis, s.method, s.bits, zero_point=s.zero_point, granularity=s.granularity,
                            max_tokens=s.sens_tokens, progress=sub[1])
    return lay, mod


def _split_progress(progress, first: float):
    if progress is None:
        return None, None
    return (lambda f, m: progress(first * f, m)), (lambda f, m: progress(first + (1 - first) * f, m))


def make_plan(analysis, s: PlanSettings, progress=None) -> BitPlan:
    """Sensitivity (cached) + the exact solver: the plan for ``s.budget`` (not yet verified)."""
    choices = check_choices(s.bits)
    method = check_method(s.method)
    nw, gs = layer_geometry(analysis)
    lo, hi = budget_range(nw, gs, choices, s.zero_point)
    check_budget(s.budget, lo, hi)  # refuse before any expensive measurement
    lay, mod = sensitivities(analysis, s, progress)
    sens = combine_sensitivity(lay, mod, s.granularity)
    return solve_plan(sens, nw, gs, s.budget, choices=choices, zero_point=s.zero_point,
                      model=analysis.model_id, method=method)


# ------------------------------------------------------------------------------------------------
# verification and the frontier (measured points only)
# ------------------------------------------------------------------------------------------------
def verify(analysis, plans: Mapping[str, BitPlan], *, max_tokens: int | None = None, progress=None) -> "pd.DataFrame":
    """Apply each plan to the whole model (fake quant, restored afterwards) and score it: the full quality report.

    Returns ``score_variants``' rows plus ``avg_bits`` and ``kind`` per variant ("uniform" for labels starting
    with "uniform", else "plan"); the fp reference's rows, if ``score_variants`` returns them, are dropped.
    """

    variants = {label: plan_weights(analysis, p.layers, p.method, p.zero_point) for label, p in plans.items()}
    df = evaluate.score_variants(analysis, variants, max_tokens=max_tokens, progress=progress)
    df = df[df["variant"].isin(set(plans))].reset_index(drop=True)
    df["avg_bits"] = [plans[v].avg_bits for v in df["variant"]]
    df["kind"] = ["uniform" if str(v).startswith("uniform") else "plan" for v in df["variant"]]
    return df


def with_measured(plan: BitPlan, rows) -> BitPlan:
    """The plan with its verified metrics (``rows``: verify()'s rows of this plan)."""
    from dataclasses import replace

    return replace(plan, measured={str(m): float(v) for m, v in zip(rows["metric"], rows["value"])})


def frontier_note(df, metric: str = "kl") -> list[str]:
    """Sentences comparing each plan with uniform quantization at the same or a higher budget, from measurements."""
    sub = df[df["metric"] == metric]
    uni = sub[sub["kind"] == "uniform"].sort_values("avg_bits")
    notes = []
    for r in sub[sub["kind"] == "plan"].sort_values("avg_bits").itertuples(index=False):
        cheaper = uni[uni["avg_bits"] <= r.avg_bits + 1e-9]
        dearer = uni[uni["avg_bits"] > r.avg_bits + 1e-9]
        parts = [f"{r.variant} ({r.avg_bits:.3f} bits): {metric} {r.value:.4g}"]
        if len(cheaper):
            c = cheaper.iloc[-1]
            verdict = "beats" if r.value < c["value"] else "does NOT beat"
            parts.append(f"{verdict} {c['variant']} ({c['avg_bits']:.3f} bits, {c['value']:.4g})")
        if len(dearer):
            d = dearer.iloc[0]
            rel = "below" if r.value < d["value"] else "above"
            parts.append(f"{rel} {d['variant']} ({d['avg_bits']:.3f} bits, {d['value']:.4g})")
        notes.append("; ".join(parts))
    return notes


@dataclass(frozen=True)
class PlanReport:
    """A plan with its measurements: ``plan`` (``measured`` filled in), ``quality`` (verify() rows of the plan
    and the uniform baselines), ``layer_sens`` / ``model_sens`` (the sensitivity tables), ``notes``."""

    plan: BitPlan
    quality: "pd.DataFrame"
    layer_sens: "pd.DataFrame"
    model_sens: "pd.DataFrame"
    notes: tuple[str, ...]


def run(analysis, s: PlanSettings, *, baselines: bool = True, extra_budgets: Sequence[float] = (),
        progress=None) -> PlanReport:
    """Sensitivity (cached) -> exact plan -> whole-model verification of the plan and uniform baselines.

    ``extra_budgets``: more plans (``"plan <budget>"``) verified in the same pass, for the frontier; every
    point of it is measured (one fp reference for all).
    """
    from dataclasses import replace

    nw, gs = layer_geometry(analysis)
    sub = _split_progress(progress, 0.5)
    plan = make_plan(analysis, s, sub[0])
    plans = {"plan": plan}
    for bud in extra_budgets:
        if abs(float(bud) - s.budget) > 1e-12:
            plans[f"plan {float(bud):g}"] = make_plan(analysis, replace(s, budget=float(bud)))
    if baselines:
        for b in check_choices(s.bits):
            if b != 16:
                plans[f"uniform w{b}"] = uniform_plan(nw, gs, b, zero_point=s.zero_point, model=analysis.model_id,
                                                      method=plan.method)
    df = verify(analysis, plans, max_tokens=s.eval_tokens, progress=sub[1])
    plan = with_measured(plan, df[df["variant"] == "plan"])
    lay, mod = sensitivities(analysis, s)  # cached by now
    metric = "kl" if "kl" in set(df["metric"]) else model_metric(analysis)
    return PlanReport(plan=plan, quality=df, layer_sens=lay, model_sens=mod, notes=tuple(frontier_note(df, metric)))


def standouts(values, groups=None, *, z: float = 3.5) -> "np.ndarray":
    """Boolean mask of values that stand out: robust z-score of log10(value) above ``z`` within their group.

    Robust z = 0.6745 (x - median) / MAD (Iglewicz-Hoaglin; 3.5 is their outlier threshold). Non-positive
    values never stand out. ``groups``: e.g. the family of each value (each family compared with itself).
    """
    v = np.asarray(values, dtype=float)
    g = np.zeros(len(v), dtype=int) if groups is None else np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    out = np.zeros(len(v), dtype=bool)
    pos = v > 0
    x = np.where(pos, np.log10(np.where(pos, v, 1.0)), np.nan)
    for k in np.unique(g):
        sel = (g == k) & pos
        if sel.sum() < 3:
            continue
        med = np.median(x[sel])
        mad = np.median(np.abs(x[sel] - med))
        if mad <= 0:
            continue
        out[sel] = 0.6745 * (x[sel] - med) / mad > z
    return out
