"""Mixed-precision plans: each linear's bit-width and group size chosen under an average-bit budget, on tokens the
reported figures never see, and never worse than uniform quantization on the tokens the choice was made on.

**Three token sets**, kept apart (``TokenSets``, ``token_sets``):

* calibration: the analysis' calibration blocks: statistics, AWQ's alpha searches, GPTQ's ``X^T X``;
* selection: the analysis' held-out blocks: the sensitivities and every choice the planner makes;
* test: the held-out text's next blocks (``core.model.calibration.test_blocks``), never used for a choice: every
  figure the page, the CLI and the exports report.

**Sensitivity** (``sensitivity``): each linear's predicted damage at each candidate setting (bits x group size), the
second-order estimate of the whole model's mean KL to fp when only that linear is quantized,
``0.5 * sum_{t,o} F[t,o] dY[t,o]^2 / n``: ``dY = X (W_hat - W)^T`` is the linear's output error on the ``n``
scored selection tokens (``X [tokens, in]``) and ``F[t,o] = E_y (d log q(y) / dY[t,o])^2`` the Fisher of the
next-token distribution w.r.t. that output, labels ``y`` sampled from the fp model (``fisher_samples`` backward
passes; the Fisher of KL(p || q) at q = p, kept diagonal per token and output channel). Encoders: Gaussian probes of
the last hidden state instead of labels, which predicts the hidden-state relative error. On the bundled LLM this
ranks linears as measuring each one alone does (README: Spearman 0.96 over 44 linears) for about ``1 + 2 *
samples`` forward passes instead of one per linear and setting. The diagonal drops the cross-token terms, which
matter where attention sums an error over tokens (v, o); ``family_factors`` measures each family as a whole once
(one whole-model pass per family) and scales that family's predictions by measured / predicted.

**Solver** (``solve_mck``): a multiple-choice knapsack. Every linear picks one setting (``(bits, group)``, or
``(16, 0)`` = kept fp16); setting ``k`` of linear ``i`` costs ``n_i * bits + 32 n_i / g`` storage bits (fp16 scale
and zero per group: ``core.grids.metrics.bit_cost``; 16 without a zero) and is worth its predicted damage; the plan
minimises the summed damage under ``budget * sum_i n_i`` bits. Dynamic programming over the cost axis: costs are
whole numbers of bits when the group divides the width, so after subtracting each item's cheapest setting and
dividing by the greatest common divisor of the cost steps the DP runs on exact integers (``exact=True``). Only when
that table would be too large (``max_cells``) are costs rounded *up* to a coarser unit ``u``: the plan is still
within budget and no worse than the exact optimum at ``budget - m u / N`` (``slack_bits``; ``exact=False``).

**Candidates** (``run``): the solver's plan and every uniform configuration within the budget (one width and one
group size for every linear) are applied to the whole model and scored on the selection tokens; the best is
returned (``BitPlan.source``), so a plan never loses to uniform quantization on the tokens it chose on. Its test
figures are reported beside those of the best uniform configuration within the budget.

**llama.cpp types** (``PlanSettings.types``): the settings are llama.cpp's types instead of (bits, group size), so
that a plan written as a GGUF is at its budget. Each linear's candidates are the types llama-quantize really writes
on its row width (``core.grids.llamacpp.fallback``: on a 576-wide row Q4_K is Q5_0, so it is costed, quantized and
named Q5_0; duplicates dropped); a type costs ``bits_per_weight`` of its block layout (Q4_0 4.5, Q4_1 5.0, Q3_K
3.4375, ...), a whole number of bits per linear. The sensitivities are the same Fisher estimate of the method's layer
half at that type (``QuantSpec.of_type``, the one door ``fake_quant``); the uniform candidates are the types
themselves (every linear at type t, with the fallback); the solver is unchanged. Methods that do not run on
llama.cpp types (gptq) are refused with one sentence.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..grids import llamacpp
from ..grids.metrics import bit_cost, rel_error
from ..grids.spec import QuantSpec
from ..methods import METHODS, awq_search, quantize_layer
from ..model.blocks import forward, restore, snapshot, token_batches
from ..model.calibration import CalibrationError, first_blocks, load_text, test_blocks
from ..model.collect import model_lock
from . import evaluate

Progress = Callable[[float, str], None]
# A linear's setting: (bits, group size) on the explorer's integer grid (group 0 = one group per row; (16, 0) = kept
# fp16), or the name of the llama.cpp type it is written in ("Q4_0", "Q4_K"; PlanSettings.types).
Choice = tuple[int, int] | str

FP16 = 16
FP16_CHOICE: Choice = (FP16, 0)
DEFAULT_CHOICES = (2, 3, 4, 8, 16)
DEFAULT_GROUP_SIZES = (32, 64, 128, 0)
FRONTIER_BUDGETS = (3.25, 3.5, 3.75, 4.0, 4.25, 4.5)
PLAN_METHODS = ("awq", "gptq", "rtn")
PLAN_VERSION = 3  # 3: three token sets, Fisher sensitivity, group size as a dimension, uniform candidates
MAX_CELLS = 1 << 25  # DP table entries (items x cost units), int8 back-pointers: 32 MiB
TOKEN_ROLES = {
    "calibration": "statistics and the methods' searches (AWQ's alpha, GPTQ's X^T X): the analysis' calibration blocks",
    "selection": "sensitivities and every choice of the planner: the analysis' held-out blocks",
    "test": "every reported figure, never used for a choice: the held-out text's next blocks",
}
# Selection and test blocks are scored on every position of each block (core.model.score.ALL_POSITIONS, the
# score_variants default): cached plan scores keep their meaning; Model quality defaults to llama.cpp's protocol.
PROTOCOL_NOTE = ("every position of each selection / test block is scored (protocol all-positions; Model quality "
                 "defaults to llama.cpp's, which scores the second half of each window)")
DEFINITIONS = {
    "predicted_kl": "second-order (Fisher) estimate of the model's mean KL to fp with only this linear quantized: "
                    "0.5 sum_{t,o} F[t,o] dY[t,o]^2 / n over the selection tokens, F = E (d log q(y) / dY)^2 with "
                    "labels y sampled from the fp model",
    "predicted_hidden_rel_error": "second-order estimate of the hidden-state relative error with only this linear "
                                  "quantized: sum_{t,o} F[t,o] dY[t,o]^2 / ||H_fp||^2, F from Gaussian probes",
    "protocol": PROTOCOL_NOTE,
    "kl_se": "standard error of the mean KL: sqrt((E[k^2] - E[k]^2) / (n - 1)) over the scored tokens (llama.cpp's ±)",
    **{k: evaluate.DEFINITIONS[k] for k in ("kl", "kl_p99", "perplexity", "perplexity_se", "same_top",
                                            "hidden_rel_error")},
}


# ------------------------------------------------------------------------------------------------
# the solver
# ------------------------------------------------------------------------------------------------
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

    ``cost``, ``value``: ``[m, k]`` (``inf`` cost for a choice a row does not have). Raises ``ValueError`` when
    even the cheapest choices exceed ``capacity``. Ties go to the cheaper choice (lower index after sorting each
    row by cost).
    """
    cost = np.asarray(cost, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    if cost.shape != value.shape or cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError("cost and value must be non-empty [items, choices] arrays of one shape")
    m, k = cost.shape
    finite = np.isfinite(cost)
    if np.isnan(value[finite]).any() or np.isinf(value[finite]).any():
        raise ValueError("every choice needs a finite sensitivity")
    order = np.argsort(cost, axis=1, kind="stable")
    c = np.take_along_axis(cost, order, 1)
    v = np.take_along_axis(np.where(finite, value, 0.0), order, 1)
    base = c[:, 0]
    if not np.isfinite(base).all():
        raise ValueError("every item needs at least one choice with a finite cost")
    free = capacity - base.sum()
    if free < -1e-9 * max(1.0, abs(capacity)):
        raise ValueError("the budget is below the cheapest plan")
    free = max(0.0, free)
    rel = c - base[:, None]  # [m, k] >= 0, inf where a choice is missing
    have = np.isfinite(rel)
    steps = rel[have & (rel > 0)]
    exact = _integral(steps)  # whole-number steps: floor(free / unit) loses nothing
    unit = float(reduce(math.gcd, (int(round(s)) for s in steps), 0)) if exact and steps.size else 1.0
    if exact:
        cap = int(math.floor(free / unit + 1e-9))
    if not exact or m * (cap + 1) > max_cells:
        exact = False
        unit = max(free / max(1, max_cells // m - 1), 1e-12)
        cap = int(math.floor(free / unit + 1e-9))
    # a missing choice costs more than the whole capacity (never taken); computed in float, then cast
    units = np.where(have, np.ceil(np.where(have, rel, 0.0) / unit - 1e-9), cap + 1).astype(np.int64)
    dp = np.zeros(cap + 1)  # dp[c]: least value of the items so far with relative cost <= c units
    back = np.zeros((m, cap + 1), dtype=np.int8 if k < 128 else np.int16)
    for i in range(m):
        best = np.full(cap + 1, np.inf)
        arg = back[i]
        for j in range(k):
            r = int(units[i, j])
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
# settings, choices and costs
# ------------------------------------------------------------------------------------------------
def check_choices(bits: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct candidate bit-widths (2..8, or 16 for fp16); a readable ``ValueError`` otherwise."""
    out = set()
    for b in bits:
        if isinstance(b, bool) or int(b) != b or not (2 <= int(b) <= 8 or int(b) == FP16):
            raise ValueError(f"candidate bits must be 2..8 or 16 (fp16), got {b!r}")
        out.add(int(b))
    if not out:
        raise ValueError("give at least one candidate bit-width")
    return tuple(sorted(out))


def check_group_sizes(group_sizes: Sequence[int]) -> tuple[int, ...]:
    """Distinct candidate group sizes (positive, or 0 = one group per row), largest first, 0 last."""
    out = set()
    for g in group_sizes:
        if isinstance(g, bool) or int(g) != g or int(g) < 0:
            raise ValueError(f"group sizes must be positive whole numbers or 0 (one group per row), got {g!r}")
        out.add(int(g))
    if not out:
        raise ValueError("give at least one candidate group size (0 = one group per row)")
    return tuple(sorted(out - {0}, reverse=True)) + ((0,) if 0 in out else ())


def check_types(types: Sequence[str] | str) -> tuple[str, ...]:
    """Distinct llama.cpp types (any case; a comma-separated string too) in ``llamacpp.TYPES`` order; empty = plan on
    the integer grid. An unknown name is one sentence naming the supported types."""
    items = types.split(",") if isinstance(types, str) else list(types)
    got = {llamacpp.check_type(t) for t in items if not (isinstance(t, str) and not t.strip())}
    return tuple(t for t in llamacpp.TYPES if t in got)


def check_method(method: str) -> str:
    m = str(method).strip().lower()
    if m not in PLAN_METHODS:
        raise ValueError(f"unknown plan method {method!r}; pick from {', '.join(PLAN_METHODS)}")
    return m


def check_tokens(n: int | None, label: str) -> int | None:
    return evaluate.check_tokens(n, label)


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is made of.

    ``bits``: candidate widths (16 = keep fp16); ``group_sizes``: candidate group sizes, each used where it divides
    a linear's width (0 = one group per row, always possible); ``fisher_samples``: sampled-label backward passes of
    the sensitivity; ``selection_tokens``: the analysis' held-out tokens the sensitivities and choices use (None =
    all); ``test_tokens``: held-out tokens after them that the reported figures use; ``seed``: of the label samples;
    ``family_calibration``: scale each family's predictions by its measured damage (``family_factors``).

    ``types``: plan in llama.cpp types (``core.grids.llamacpp.TYPES``, e.g. ``("Q4_0", "Q4_1", "Q5_0", "Q3_K")``)
    instead of ``bits`` x ``group_sizes``, which are then not used (nor ``zero_point``: each type fixes its grid);
    each linear takes one of them as llama-quantize writes it on its row width (module docstring). Empty: the
    explorer's integer grid.
    """

    budget: float = 3.5
    method: str = "awq"
    bits: tuple[int, ...] = DEFAULT_CHOICES
    group_sizes: tuple[int, ...] = DEFAULT_GROUP_SIZES
    zero_point: bool = True
    fisher_samples: int = 4
    selection_tokens: int | None = None
    test_tokens: int = 2048
    seed: int = 0
    family_calibration: bool = True
    types: tuple[str, ...] = ()

    @property
    def _measure_key(self) -> str:
        grid = "types" if self.types else "zp" if self.zero_point else "sym"  # one table per kind of setting
        return (f"v{PLAN_VERSION}_{self.method}_{grid}_f{self.fisher_samples}"
                f"_seed{self.seed}_sel{self.selection_tokens or 'all'}")

    @property
    def sensitivity_key(self) -> str:
        """Name of the cached sensitivity table: everything its numbers depend on besides the analysis (rows are
        per linear and setting, so other candidate bits / group sizes extend the same table)."""
        return f"plan_sens_{self._measure_key}"

    @property
    def family_key(self) -> str:
        """Name of the cached family measurements (``family_factors``; in llama.cpp types per measured type)."""
        key = f"plan_family_{self._measure_key}"
        return f"{key}_{calibration_setting(self, {}).format}" if self.types else key

    @property
    def scores_key(self) -> str:
        """Name of the cached whole-model scores (rows keyed by ``BitPlan.key`` and ``TokenSets.key``)."""
        return f"plan_scores_v{PLAN_VERSION}"


def linear_choices(in_features: int, bits: Sequence[int], group_sizes: Sequence[int]) -> list[Choice]:
    """The settings of a linear ``in_features`` wide: each width with each group size that divides it (a group of the
    whole row counts as 0, one group per row), and ``(16, 0)`` for fp16."""
    out: list[Choice] = []
    for b in bits:
        for g in ((0,) if b == FP16 else group_sizes):
            c = as_choice(b, g, in_features)
            if (c[1] == 0 or in_features % c[1] == 0) and c not in out:
                out.append(c)
    return out


def type_choices(in_features: int, types: Sequence[str]) -> list[str]:
    """The llama.cpp types a linear ``in_features`` wide can be written in: each of ``types`` as llama-quantize writes
    it on that width (``llamacpp.fallback``: Q4_K on a 576-wide row is Q5_0), duplicates dropped, cheapest first. A
    width no block divides (``F16``) gives none."""
    out = {llamacpp.fallback(t, in_features) for t in types} - {llamacpp.F16}
    return sorted(out, key=lambda t: (llamacpp.bits_per_weight(t), llamacpp.TYPES.index(t)))


def choice_spec(choice: Choice, zero_point: bool = True) -> QuantSpec | None:
    """The grid of a setting: ``QuantSpec.of_type`` of a llama.cpp type, ``QuantSpec(bits, group, zero_point)`` on the
    integer grid, None for kept fp16."""
    if isinstance(choice, str):
        return QuantSpec.of_type(choice)
    return None if int(choice[0]) == FP16 else QuantSpec(int(choice[0]), int(choice[1]), zero_point)


def setting_at(spec: QuantSpec, in_features: int) -> Choice:
    """The setting ``spec`` gives a linear ``in_features`` wide: the type llama-quantize writes there
    (``QuantSpec.stored_type``) or ``(bits, group)`` (``as_choice``)."""
    return spec.stored_type(in_features) if spec.format else as_choice(spec.bits, spec.group_size, in_features)


def as_choice(bits: int, group_size: int, in_features: int) -> Choice:
    """``(bits, group)`` with a group of the whole row written 0 (one group per row): one name per setting."""
    g = int(group_size)
    return int(bits), (0 if g <= 0 or g == in_features or bits == FP16 else g)


def choice_cost(choice: Choice, n_weights: int, in_features: int, zero_point: bool = True) -> float:
    """Storage bits of ``n_weights`` weights at ``choice`` (``bit_cost`` times ``n_weights``, kept a whole number:
    ``n * bits + 32 n / g``, which is exact whenever the group divides the width; a llama.cpp type: the bytes of its
    blocks, ``bits_per_weight`` times ``n_weights``, a whole number since a row holds whole blocks)."""
    if isinstance(choice, str):
        return float(8 * llamacpp.row_bytes(choice, in_features) * (n_weights // in_features))
    b, g = choice
    if b == FP16:
        return 16.0 * n_weights
    return float(n_weights * b + n_weights * (32 if zero_point else 16) // (g or in_features))


def label(choice: Choice) -> str:
    """``w3g64``, ``w4g0`` (one group per row) or ``fp16``: ``QuantSpec.key`` of the setting; a llama.cpp type's
    own name (``Q4_0``)."""
    if isinstance(choice, str):
        return choice
    return "fp16" if choice[0] == FP16 else QuantSpec(*choice).key


def geometry(analysis) -> tuple[dict[str, int], dict[str, int]]:
    """``(weights per linear, input width per linear)`` in the analysis' order."""
    lin = analysis.linears
    return ({str(r.name): int(r.in_features) * int(r.out_features) for r in lin.itertuples(index=False)},
            {str(r.name): int(r.in_features) for r in lin.itertuples(index=False)})


def budget_range(n_weights: Mapping[str, int], in_features: Mapping[str, int],
                 choices: Mapping[str, Sequence[Choice]], zero_point: bool = True) -> tuple[float, float]:
    """``(lowest, highest)`` average bits a plan over these linears can cost with these choices."""
    total = sum(n_weights.values())
    costs = {n: [choice_cost(c, n_weights[n], in_features[n], zero_point) for c in choices[n]] for n in n_weights}
    return sum(min(c) for c in costs.values()) / total, sum(max(c) for c in costs.values()) / total


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
                         f"({lo:.4g} bits: every linear at its cheapest setting, scales and zeros included)")
    if b > hi + eps:
        raise ValueError(f"a budget of {b:g} bits per weight is above the most expensive plan with these choices "
                         f"({hi:.4g} bits: every linear at the highest), so there is nothing to choose")
    return b


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitPlan:
    """Each linear's setting ``(bits, group size)`` (group 0: one group per row; ``(16, 0)``: kept fp16), or in a plan
    in llama.cpp types (``PlanSettings.types``) the type it is written in (``"Q4_0"``, ``"Q3_K"``; ``in_types``).

    ``avg_bits``: storage bits per quantizable weight (``bit_cost``, weighted by weight counts); ``objective``:
    summed predicted damage (NaN for a uniform configuration); ``exact``/``slack_bits``: see ``solve_mck``;
    ``source``: ``"solver"`` or the uniform configuration (``"uniform w3g64"``) that verified better;
    ``selection`` / ``measured``: whole-model figures on the selection / test tokens, filled in by ``run``.
    """

    model: str
    method: str
    budget_bits: float
    zero_point: bool
    layers: Mapping[str, Choice]
    avg_bits: float
    objective: float
    exact: bool
    slack_bits: float
    source: str = "solver"
    selection: Mapping[str, float] = field(default_factory=dict)
    measured: Mapping[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Content address of the plan (method, grid, every linear's setting): the key of its cached scores."""
        if self.in_types:
            body = json.dumps([self.method, "types", sorted(self.layers.items())])
        else:
            body = json.dumps([self.method, self.zero_point,
                               sorted((n, int(b), int(g)) for n, (b, g) in self.layers.items())])
        return "p" + hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def in_types(self) -> bool:
        """Whether the settings are llama.cpp types (a plan made with ``PlanSettings.types``)."""
        return any(isinstance(c, str) for c in self.layers.values())

    def bits_of(self, name: str) -> int:
        """The level bits of linear ``name``'s setting (a llama.cpp type's: 4 for Q4_0 and Q4_K)."""
        c = self.layers[name]
        return llamacpp.nominal_bits(c) if isinstance(c, str) else int(c[0])

    def names_at(self, bits: int) -> list[str]:
        """The linears at ``bits`` on the integer grid (16: kept fp16)."""
        return [n for n, c in self.layers.items() if not isinstance(c, str) and c[0] == bits]

    def counts(self) -> dict[Choice, int]:
        """How many linears take each setting, widest setting last (llama.cpp types by their bits per weight)."""
        out: dict[Choice, int] = {}
        for c in self.layers.values():
            c = c if isinstance(c, str) else (int(c[0]), int(c[1]))
            out[c] = out.get(c, 0) + 1

        def order(c: Choice) -> tuple:
            return (llamacpp.bits_per_weight(c), 0) if isinstance(c, str) else (c[0], -(c[1] or 1 << 30))
        return dict(sorted(out.items(), key=lambda kv: order(kv[0])))

    def summary(self) -> str:
        """``w3g64 x106, w4g0 x7, ...`` (``g0``: one group per row); ``Q4_0 x180, Q3_K x30`` in llama.cpp types."""
        return ", ".join(f"{label(c)} x{n}" for c, n in self.counts().items())


def solve_plan(values: Mapping[str, Mapping[Choice, float]], n_weights: Mapping[str, int],
               in_features: Mapping[str, int], choices: Mapping[str, Sequence[Choice]], budget: float, *,
               zero_point: bool = True, model: str = "", method: str = "", max_cells: int = MAX_CELLS) -> BitPlan:
    """Pick each linear's setting among ``choices[name]`` minimising the summed ``values`` under ``budget`` average
    bits. ``values[name][choice]``: the predicted damage (fp16 may be left out: it counts 0)."""
    names = list(n_weights)
    if not names:
        raise ValueError("no linears to plan")
    budget = check_budget(budget, *budget_range(n_weights, in_features, choices, zero_point))
    k = max(len(choices[n]) for n in names)
    cost = np.full((len(names), k), np.inf)
    val = np.zeros_like(cost)
    for i, n in enumerate(names):
        for j, c in enumerate(choices[n]):
            cost[i, j] = choice_cost(c, n_weights[n], in_features[n], zero_point)
            v = values.get(n, {}).get(c, 0.0 if c == FP16_CHOICE else None)
            if v is None:
                raise ValueError(f"no sensitivity for {n} at {label(c)}")
            val[i, j] = float(v)
    total = sum(n_weights.values())
    sol = solve_mck(cost, val, budget * total, max_cells=max_cells)
    picked = {n: choices[n][j] for n, j in zip(names, sol.choice)}
    layers = {n: c if isinstance(c, str) else tuple(c) for n, c in picked.items()}
    return BitPlan(model=model, method=method, budget_bits=budget, zero_point=zero_point, layers=layers,
                   avg_bits=sol.cost / total, objective=sol.value, exact=sol.exact, slack_bits=sol.slack / total)


def uniform_specs(in_features: Mapping[str, int], bits: Sequence[int], group_sizes: Sequence[int],
                  zero_point: bool = True) -> list[QuantSpec]:
    """Every uniform configuration: one width and one group size for every linear (a group size that does not
    divide every width is not one; 0, one group per row, always is)."""
    widths = set(in_features.values())
    return [QuantSpec(b, g, zero_point) for b in bits if b != FP16 for g in group_sizes
            if g == 0 or all(w % g == 0 for w in widths)]


def uniform_plan(n_weights: Mapping[str, int], in_features: Mapping[str, int], spec: QuantSpec, *,
                 model: str = "", method: str = "") -> BitPlan:
    """Every linear at ``spec``: a candidate of every budget it fits, and the baseline of the frontier."""
    total = sum(n_weights.values())
    layers = {n: as_choice(spec.bits, spec.group_size, in_features[n]) for n in n_weights}
    cost = sum(choice_cost(c, n_weights[n], in_features[n], spec.zero_point) for n, c in layers.items())
    return BitPlan(model=model, method=method, budget_bits=cost / total, zero_point=spec.zero_point, layers=layers,
                   avg_bits=cost / total, objective=float("nan"), exact=True, slack_bits=0.0,
                   source=f"uniform {spec.key}")


def uniform_type_plan(n_weights: Mapping[str, int], in_features: Mapping[str, int], type: str, *,
                      model: str = "", method: str = "") -> BitPlan:
    """Every linear at llama.cpp type ``type`` as llama-quantize writes it on its width (``llamacpp.fallback``: a
    k-quant on rows its 256-block does not divide is its block-32 fallback); ValueError when a row takes no block."""
    total = sum(n_weights.values())
    layers = {n: llamacpp.fallback(type, in_features[n]) for n in n_weights}
    if llamacpp.F16 in layers.values():
        n = next(n for n, t in layers.items() if t == llamacpp.F16)
        raise ValueError(f"{n} ({in_features[n]} wide) cannot be written in {type} or its fallback")
    cost = sum(choice_cost(c, n_weights[n], in_features[n]) for n, c in layers.items())
    return BitPlan(model=model, method=method, budget_bits=cost / total, zero_point=llamacpp.has_min(type),
                   layers=layers, avg_bits=cost / total, objective=float("nan"), exact=True, slack_bits=0.0,
                   source=f"uniform {type}")


def uniform_candidates(n_weights: Mapping[str, int], in_features: Mapping[str, int], s: PlanSettings, *,
                       model: str = "", method: str = "") -> dict[str, BitPlan]:
    """``{"uniform w3g64": plan, ...}``: every uniform configuration of ``s`` (``uniform_specs``), or in llama.cpp
    types every type of ``s.types`` for every linear (``uniform_type_plan``; two types that write the same tensors,
    e.g. Q2_K and Q3_K where no row takes a 256-block, are one candidate, named by the first)."""
    if not s.types:
        return {f"uniform {q.key}": uniform_plan(n_weights, in_features, q, model=model, method=method)
                for q in uniform_specs(in_features, s.bits, s.group_sizes, s.zero_point)}
    out: dict[str, BitPlan] = {}
    for t in check_types(s.types):
        try:
            p = uniform_type_plan(n_weights, in_features, t, model=model, method=method)
        except ValueError:
            continue
        if p.key not in {q.key for q in out.values()}:
            out[p.source] = p
    return out


# ------------------------------------------------------------------------------------------------
# the three token sets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSets:
    """The planner's token blocks ``[n, seqlen]``: ``calibration`` (the analysis' calibration part), ``selection``
    (the first held-out blocks) and ``test`` (the held-out part's tokens ``test_start ..`` onwards; the selection
    blocks end at or before ``test_start``). Disjoint by construction: the calibration part and the held-out part
    are different paragraphs, selection and test different stretches of the held-out part."""

    calibration: torch.Tensor
    selection: torch.Tensor
    test: torch.Tensor
    test_start: int

    def key(self, name: str) -> str:
        """Identifies one set in cached scores (``selection512``, ``test2048@512``)."""
        ids = getattr(self, name)
        return f"{name}{ids.numel()}" + (f"@{self.test_start}" if name == "test" else "")

    def spans(self) -> dict[str, tuple[str, int, int]]:
        """``{set: (part of the text, first token, end)}``: where each set lies in its part's token stream."""
        return {"calibration": ("calibration part", 0, int(self.calibration.numel())),
                "selection": ("held-out part", 0, int(self.selection.numel())),
                "test": ("held-out part", self.test_start, self.test_start + int(self.test.numel()))}

    def table(self) -> list[dict]:
        """One row per set: name, tokens, blocks, where it lies, what it is used for (page, CLI, JSON)."""
        return [{"set": name, "tokens": int(getattr(self, name).numel()), "blocks": int(getattr(self, name).shape[0]),
                 "part": part, "span": [start, end], "used_for": TOKEN_ROLES[name]}
                for name, (part, start, end) in self.spans().items()]


def token_sets(analysis, s: PlanSettings) -> TokenSets:
    """The analysis' calibration and held-out blocks (recreated from its settings, checked against its text hash),
    the first ``s.selection_tokens`` of the held-out ones, and ``s.test_tokens`` tokens after them."""
    lm = analysis.lm
    spec = analysis.settings.calibration
    try:
        text = load_text(spec.source)
        test, start = test_blocks(spec, lm.tokenizer, lm.max_positions, s.test_tokens, text=text)
    except CalibrationError as e:
        raise ValueError(f"no test set for this analysis: {e}") from e
    data = evaluate.eval_data(analysis, lm, text)
    if start < data.heldout.numel():
        raise ValueError("the analysis' held-out text is too short for separate selection and test sets")
    return TokenSets(calibration=data.calib, selection=first_blocks(data.heldout, s.selection_tokens), test=test,
                     test_start=start)


# ------------------------------------------------------------------------------------------------
# weights and whole-model scores
# ------------------------------------------------------------------------------------------------
def model_metric(analysis) -> str:
    """What a plan minimises: mean KL for causal LMs, the hidden-state relative error for encoders."""
    return "kl" if analysis.manifest.get("is_causal", True) else "hidden_rel_error"


def method_alpha(analysis, name: str, method: str, spec: QuantSpec) -> float | None:
    """AWQ's alpha for linear ``name`` at ``spec``: the sweep's when it searched this setting, else the same search
    (``Analysis.alpha_curve``); None for a method without one. A llama.cpp type (``spec.format``; the sweep never
    ran one): the same search on the type's quantizer, as AWQ's model half runs it there."""
    if "alpha" not in METHODS[method].options().as_dict():
        return None
    n_grid = int(analysis.settings.sweep.n_grid)
    if spec.format:
        c = awq_search.search_scale(analysis.weight(name), analysis.inputs(name), spec, n_grid=n_grid,
                                    x_mean=analysis.x_mean(name))
        return float(c.alphas[c.best_index])
    alpha = analysis.sweep_alpha(name, spec, n_grid)
    if alpha is None:
        alpha = analysis.alpha_curve(name, bits=spec.bits, group_size=spec.group_size, zero_point=spec.zero_point,
                                     n_grid=n_grid).best_alpha
    return float(alpha)


def quantized_weight(analysis, name: str, method: str, spec: QuantSpec, alpha: float | None = None) -> torch.Tensor:
    """Linear ``name`` quantized by ``method`` (``core.methods.quantize_layer``, the one entry); ``[out, in]``.
    A method with an ``alpha`` option uses ``alpha`` when given, else the sweep's best alpha when the sweep searched
    this layer on the same grid (same numbers), else it searches."""
    m = METHODS[method]
    options = m.options()
    if "alpha" in options.as_dict():
        n_grid = int(analysis.settings.sweep.n_grid)
        options = options.replace(n_grid=n_grid, alpha=alpha if alpha is not None else
                                  analysis.sweep_alpha(name, spec, n_grid))
    inputs = analysis.layer_inputs(name) if m.needs_data else None
    return quantize_layer(method, analysis.weight(name), inputs, spec, options).float()


def plan_weights(analysis, plan: BitPlan, alphas: Mapping[tuple[str, Choice], float] | None = None):
    """A ``score_variants`` variant: the callable returning every non-fp16 linear's quantized weight (``alphas``:
    ``(name, setting) -> alpha`` found by the sensitivity pass, so nothing is searched twice)."""
    alphas = alphas or {}

    def make() -> dict:
        return {n: quantized_weight(analysis, n, plan.method, choice_spec(c, plan.zero_point), alphas.get((n, c)))
                for n, c in plan.layers.items() if c != FP16_CHOICE}
    return make


def score_tokens(analysis, ids: torch.Tensor, variants: Mapping[str, Callable[[], Mapping[str, torch.Tensor]]], *,
                 progress: Progress | None = None) -> pd.DataFrame:
    """``core.studies.evaluate.score_variants`` on the token blocks ``ids [n, seqlen]`` instead of the analysis'
    held-out blocks: ``SCORE_COLUMNS`` rows per variant (the fp reference's left out), plus ``kl_se`` for causal LMs.
    The model is bit-identical afterwards, also when this raises."""
    lm = analysis.lm
    report = progress or (lambda f, m: None)
    done = [0.0]

    def step(units: float, msg: str) -> None:
        done[0] += units
        report(done[0] / (1 + len(variants)), msg)
    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            _, _, scores, seconds = evaluate._score_variants(lm, ids, dict(variants), snap,
                                                             batch_tokens=int(analysis.settings.batch_tokens), step=step)
        finally:
            restore(lm, snap)
    rows = []
    for name, sc in scores.items():
        values = sc.metrics()
        if lm.is_causal:
            kl = sc.kl_values().double()
            values["kl_se"] = float(kl.std(unbiased=False) / math.sqrt(max(1, kl.numel() - 1)))
        rows += [{"variant": name, "metric": m, "value": float(v), "n_tokens": sc.n_tok, "seconds": seconds[name]}
                 for m, v in values.items()]
    return pd.DataFrame(rows, columns=evaluate.SCORE_COLUMNS)


SCORE_CACHE_COLUMNS = ["plan", "token_set", "metric", "value", "n_tokens", "seconds"]


def cached_scores(analysis, s: PlanSettings, sets: TokenSets, which: str, plans: Mapping[str, BitPlan],
                  alphas: Mapping | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """Whole-model scores of ``plans`` (label -> plan) on token set ``which``: rows ``variant, metric, value,
    n_tokens, seconds``. A plan scored before on the same set (same ``BitPlan.key``) is read from the analysis'
    cache; the others are scored in one pass (one fp reference)."""
    old = analysis.read_extra(s.scores_key)
    tkey = sets.key(which)
    have = old[old["token_set"] == tkey] if old is not None else pd.DataFrame(columns=SCORE_CACHE_COLUMNS)
    known = set(have["plan"])
    todo = {}
    for lab, p in plans.items():
        if p.key not in known and p.key not in {q.key for q in todo.values()}:
            todo[lab] = p
    if todo:
        new = score_tokens(analysis, getattr(sets, which), {lab: plan_weights(analysis, p, alphas)
                                                             for lab, p in todo.items()}, progress=progress)
        new = new.assign(plan=[todo[v].key for v in new["variant"]], token_set=tkey)[SCORE_CACHE_COLUMNS]
        have = pd.concat([have, new], ignore_index=True)
        analysis.write_extra(s.scores_key, new if old is None else pd.concat([old, new], ignore_index=True))
    rows = []
    for lab, p in plans.items():
        sub = have[have["plan"] == p.key].drop_duplicates("metric", keep="last")
        rows.append(sub.assign(variant=lab))
    return pd.concat(rows, ignore_index=True)[evaluate.SCORE_COLUMNS] if rows else pd.DataFrame(
        columns=evaluate.SCORE_COLUMNS)


# ------------------------------------------------------------------------------------------------
# sensitivity: the second-order (Fisher) damage of each linear at each setting
# ------------------------------------------------------------------------------------------------
SENS_COLUMNS = ["name", "block", "family", "bits", "group_size", "bits_per_weight", "alpha", "fisher", "rel_error",
                "n_tokens"]
FAMILY_COLUMNS = ["family", "bits", "group_size", "measured", "predicted", "factor", "n_tokens"]
FACTOR_RANGE = (1 / 8, 8.0)  # a family's measured / predicted damage is trusted within this range


@dataclass
class OutputFisher:
    """Per batch of selection tokens: each linear's input ``x[name] [tokens, in]`` and the diagonal Fisher of the
    model's output w.r.t. the linear's output ``f[name] [tokens, out]``; ``scale``: what a summed ``F dY^2``
    is divided by (2 x scored tokens for causal LMs: mean KL; ``||H_fp||^2`` for encoders)."""

    batches: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    scale: float
    n_tokens: int

    def damage(self, name: str, dw: torch.Tensor) -> tuple[float, float]:
        """``(predicted damage, ||X dW^T||^2)`` of changing linear ``name``'s weight by ``dw [out, in]``."""
        num = err = 0.0
        for x, f in self.batches:
            dy2 = (x[name].float() @ dw.T).pow_(2)
            num += float((f[name] * dy2).sum())
            err += float(dy2.sum())
        return num / self.scale, err

    def ref_sq(self, name: str, w: torch.Tensor) -> float:
        return sum(float((x[name].float() @ w.T).pow_(2).sum()) for x, _ in self.batches)


def output_fisher(lm, ids: torch.Tensor, *, samples: int, batch_tokens: int, seed: int = 0,
                  progress: Progress | None = None) -> OutputFisher:
    """Forward ``ids [n, seqlen]`` with gradients, then ``samples`` backward passes of ``sum_t log q(y_t)`` with
    labels drawn from the fp model's own next-token distribution (encoders: ``<xi, H>`` with Gaussian ``xi``),
    accumulating each linear's squared output gradient. ``E[g g^T]`` is the Fisher of KL(p || q) at q = p (of
    ``||H - H_fp||^2``), so ``0.5 dY^T F dY`` is the second-order KL of an output change ``dY``; ``F`` is kept
    diagonal per token and channel. Parameters stay frozen; the graph flows from the embedding output."""
    if int(samples) < 1:
        raise ValueError(f"fisher_samples must be at least 1, got {samples!r}")
    gen = torch.Generator().manual_seed(int(seed))
    names = [li.name for li in lm.linears]
    batches = token_batches(ids, batch_tokens)
    out_batches, scale, n_tok = [], 0.0, 0
    report = progress or (lambda f, m: None)
    with model_lock(lm.model), torch.enable_grad():
        for bi, b in enumerate(batches):
            xs: dict[str, torch.Tensor] = {}
            fs: dict[str, torch.Tensor] = {}

            def grad_hook(name: str):
                def fn(g: torch.Tensor) -> None:
                    g2 = g.detach().float().reshape(-1, g.shape[-1]).pow(2) / samples
                    fs[name] = fs[name] + g2 if name in fs else g2
                return fn

            def forward_hook(name: str):
                def fn(mod, args, out) -> None:
                    xs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
                    out.register_hook(grad_hook(name))
                return fn
            handles = [lm.model.get_submodule(n).register_forward_hook(forward_hook(n)) for n in names]
            handles.append(lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_()))
            try:
                out = forward(lm, b)
                if lm.is_causal:
                    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
                    probs = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
                    scale += 2.0 * probs.shape[0]
                    n_tok += probs.shape[0]
                else:
                    h = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]
                    h = h.float()
                    scale += float(h.detach().double().pow(2).sum())
                    n_tok += int(b.numel())
                for k in range(int(samples)):
                    if lm.is_causal:
                        y = torch.multinomial(probs, 1, generator=gen).reshape(logp.shape[:2]).to(logp.device)
                        objective = logp.gather(-1, y.unsqueeze(-1)).sum()
                    else:
                        objective = (h * torch.randn(h.shape, generator=gen).to(h.device)).sum()
                    objective.backward(retain_graph=k < int(samples) - 1)
                    report((bi + (k + 1) / samples) / len(batches),
                           f"Fisher of the output: batch {bi + 1}/{len(batches)}, sample {k + 1}/{samples}")
            finally:
                for h_ in handles:
                    h_.remove()
            out_batches.append((xs, fs))
    return OutputFisher(out_batches, scale, n_tok)


def plan_choices(analysis, s: PlanSettings) -> dict[str, list[Choice]]:
    """Each linear's candidate settings under ``s`` (``linear_choices``; in llama.cpp types ``type_choices``)."""
    _, inf = geometry(analysis)
    types = check_types(s.types)
    if types:
        out = {n: type_choices(w, types) for n, w in inf.items()}
        for n, cs in out.items():
            if not cs:
                raise ValueError(f"{n} ({inf[n]} wide) can be written in none of these llama.cpp types (no block of "
                                 f"32 or 256 divides its rows)")
        return out
    bits, groups = check_choices(s.bits), check_group_sizes(s.group_sizes)
    out = {n: linear_choices(w, bits, groups) for n, w in inf.items()}
    for n, cs in out.items():
        if not cs:
            raise ValueError(f"no candidate group size divides the width of {n} ({inf[n]}); add 0 (one group per row)")
    return out


def choices_of(table: pd.DataFrame) -> list[Choice]:
    """Each sensitivity row's setting: its ``type`` (a table of llama.cpp types) or ``(bits, group_size)``."""
    if "type" in table.columns:
        return [str(t) for t in table["type"]]
    return [(int(b), int(g)) for b, g in zip(table["bits"], table["group_size"])]


def sensitivity_columns(s: PlanSettings) -> list[str]:
    """``SENS_COLUMNS``, and ``type`` for a plan in llama.cpp types (``bits`` / ``group_size`` are then the type's
    level bits and block)."""
    return SENS_COLUMNS + (["type"] if s.types else [])


def sensitivity(analysis, s: PlanSettings, sets: TokenSets, progress: Progress | None = None) -> pd.DataFrame:
    """Predicted whole-model damage of each linear at each candidate setting: ``SENS_COLUMNS`` plus ``factor`` (its
    family's, ``family_factors``; 1 without the calibration) and ``value = fisher * factor``, the predicted mean KL
    for causal LMs (hidden-state relative error for encoders); ``rel_error`` is the linear's own relative output
    error on the selection tokens, ``alpha`` AWQ's (NaN for other methods). Cached beside the analysis
    (``PlanSettings.sensitivity_key``); only missing (linear, setting) rows are computed."""
    method = check_method(s.method)
    choices = plan_choices(analysis, s)
    columns = sensitivity_columns(s)
    old = analysis.read_extra(s.sensitivity_key)
    have = set() if old is None else set(zip(old["name"], choices_of(old)))
    todo = [(n, c) for n, cs in choices.items() for c in cs if c != FP16_CHOICE and (n, c) not in have]
    report = progress or (lambda f, m: None)
    calibrate = 0.15 if s.family_calibration else 0.0  # share of the progress bar the family measurements take
    if todo:
        lm = analysis.lm
        fisher = output_fisher(lm, sets.selection, samples=s.fisher_samples, batch_tokens=analysis.settings.batch_tokens,
                               seed=s.seed, progress=lambda f, m: report(0.25 * f, m))
        info = analysis.linears.set_index("name")
        _, inf = geometry(analysis)
        rows, ref = [], {}
        for i, (n, c) in enumerate(todo):
            spec = choice_spec(c, s.zero_point)
            w = analysis.weight(n)
            alpha = method_alpha(analysis, n, method, spec)
            value, err = fisher.damage(n, quantized_weight(analysis, n, method, spec, alpha) - w)
            if n not in ref:
                ref[n] = fisher.ref_sq(n, w)
            b, g = spec.bits, spec.group_size
            row = {"name": n, "block": int(info.loc[n, "block"]), "family": str(info.loc[n, "family"]),
                   "bits": b, "group_size": g,
                   "bits_per_weight": llamacpp.bits_per_weight(c) if spec.format else bit_cost(b, g or inf[n], s.zero_point),
                   "alpha": float("nan") if alpha is None else alpha, "fisher": value,
                   "rel_error": rel_error(err, ref[n]), "n_tokens": fisher.n_tokens}
            if s.types:
                row["type"] = c
            rows.append(row)
            report(0.25 + (0.75 - calibrate) * (i + 1) / len(todo), f"sensitivity {n} {label(c)}")
        del fisher
        new = pd.DataFrame(rows, columns=columns)
        old = new if old is None else pd.concat([old[columns], new], ignore_index=True)
        analysis.write_extra(s.sensitivity_key, old)
    want = {(n, c) for n, cs in choices.items() for c in cs}
    table = old[[(n, c) in want for n, c in zip(old["name"], choices_of(old))]]
    table = table.reset_index(drop=True)
    factors = {}
    if s.family_calibration:
        fam = family_factors(analysis, s, sets, table, lambda f, m: report(1 - calibrate + calibrate * f, m))
        factors = dict(zip(fam["family"], fam["factor"]))
    table["factor"] = [float(factors.get(f, 1.0)) for f in table["family"]]
    table["value"] = table["fisher"] * table["factor"]
    return table


def calibration_setting(s: PlanSettings, in_features: Mapping[str, int]) -> QuantSpec:
    """The uniform configuration the family calibration measures: the fewest candidate bits of at least 3 (a damage
    well above the noise, still in the second-order regime) on the largest candidate group size that divides every
    width (one group per row when none does). On the bundled LLM: w3 g64. In llama.cpp types: the cheapest type of at
    least 3 level bits (Q3_K: written Q4_0 on SmolLM2's 576-wide rows)."""
    types = check_types(s.types)
    if types:
        return QuantSpec.of_type(min([t for t in types if llamacpp.nominal_bits(t) >= 3] or types,
                                     key=llamacpp.bits_per_weight))
    bits = [b for b in check_choices(s.bits) if b != FP16] or [4]
    b = min([x for x in bits if x >= 3] or bits)
    widths = set(in_features.values())
    g = next((g for g in check_group_sizes(s.group_sizes) if g > 0 and all(w % g == 0 for w in widths)), 0)
    return QuantSpec(b, g, s.zero_point)


def family_factors(analysis, s: PlanSettings, sets: TokenSets, table: pd.DataFrame,
                   progress: Progress | None = None) -> pd.DataFrame:
    """Each family's measured damage over its predicted one (``FAMILY_COLUMNS``): every linear of the family (q, k,
    ..., down in all blocks) quantized at ``calibration_setting``, the rest fp, scored on the selection tokens, over
    the summed Fisher predictions of those linears. The diagonal Fisher drops the cross-token terms of an output
    error, which matter most where attention mixes tokens (the bundled LLM: v and o under-predicted about 1.6x,
    the MLP families within 15%); the factor puts them back, per family, from one whole-model pass each. Clipped to
    ``FACTOR_RANGE``; 1 where either side is not positive. Cached (``PlanSettings.family_key``)."""
    _, inf = geometry(analysis)
    spec = calibration_setting(s, inf)
    old = analysis.read_extra(s.family_key)
    if old is not None and len(old) and int(old["bits"].iloc[0]) == spec.bits and \
            int(old["group_size"].iloc[0]) == spec.group_size and set(old["family"]) == set(table["family"]):
        return old
    fam = dict(zip(analysis.linears["name"], analysis.linears["family"]))
    at = {n: setting_at(spec, inf[n]) for n in inf}
    rows = table[[c == at[n] for n, c in zip(table["name"], choices_of(table))]]
    predicted = rows.groupby("family")["fisher"].sum()
    alphas = alphas_of(rows)
    variants = {}
    for f in predicted.index:
        members = BitPlan(model="", method=s.method, budget_bits=0.0, zero_point=s.zero_point,
                          layers={n: at[n] for n in inf if fam[n] == f}, avg_bits=0.0, objective=0.0, exact=True,
                          slack_bits=0.0)
        variants[f] = plan_weights(analysis, members, alphas)
    got = score_tokens(analysis, sets.selection, variants, progress=progress)
    measured = got[got["metric"] == model_metric(analysis)].set_index("variant")["value"]
    out = []
    for f, pred in predicted.items():
        m = float(measured[f])
        factor = float(np.clip(m / pred, *FACTOR_RANGE)) if m > 0 and pred > 0 else 1.0
        out.append({"family": f, "bits": spec.bits, "group_size": spec.group_size, "measured": m,
                    "predicted": float(pred), "factor": factor, "n_tokens": int(got["n_tokens"].iloc[0])})
    df = pd.DataFrame(out, columns=FAMILY_COLUMNS)
    analysis.write_extra(s.family_key, df)
    return df


def values_of(table: pd.DataFrame) -> dict[str, dict[Choice, float]]:
    """``{name: {setting: predicted damage}}`` from a sensitivity table (negative values count 0)."""
    out: dict[str, dict[Choice, float]] = {}
    for n, c, v in zip(table["name"], choices_of(table), table["value"]):
        out.setdefault(str(n), {})[c] = max(0.0, float(v))
    return out


def alphas_of(table: pd.DataFrame) -> dict[tuple[str, Choice], float]:
    """``{(name, setting): alpha}`` found by the sensitivity pass (AWQ)."""
    return {(str(n), c): float(a) for n, c, a in zip(table["name"], choices_of(table), table["alpha"])
            if math.isfinite(float(a))}


# ------------------------------------------------------------------------------------------------
# planning: solve, pick among verified candidates, report on the test tokens
# ------------------------------------------------------------------------------------------------
def check_settings(analysis, s: PlanSettings, budgets: Sequence[float] = ()) -> PlanSettings:
    """``s`` with its method, bits and group sizes checked and normalised; every budget (``s.budget`` and
    ``budgets``) checked against what these choices can cost. Raises one sentence before anything is measured."""
    s = replace(s, method=check_method(s.method), bits=check_choices(s.bits), group_sizes=check_group_sizes(s.group_sizes),
                types=check_types(s.types))
    if s.types and not METHODS[s.method].formats:
        raise ValueError(f"plan method {s.method!r} does not run on llama.cpp types; plan llama.cpp types with "
                         f"{' or '.join(m for m in PLAN_METHODS if METHODS[m].formats)}")
    if isinstance(s.fisher_samples, bool) or int(s.fisher_samples) != s.fisher_samples or int(s.fisher_samples) < 1:
        raise ValueError(f"fisher_samples must be a positive whole number, got {s.fisher_samples!r}")
    check_tokens(s.selection_tokens, "selection_tokens")
    check_tokens(s.test_tokens, "test_tokens")
    nw, inf = geometry(analysis)
    lo, hi = budget_range(nw, inf, plan_choices(analysis, s), s.zero_point)
    for b in (s.budget, *budgets):
        check_budget(b, lo, hi)
    return replace(s, budget=float(s.budget))


@dataclass(frozen=True)
class PlanReport:
    """A plan with its evidence.

    ``plan``: the chosen plan at ``settings.budget`` (``selection`` and ``measured`` = test figures filled in);
    ``baseline``: the best uniform configuration within that budget (by the selection tokens), with its test
    figures; ``candidates``: every candidate of that budget scored on the selection tokens (``variant, kind,
    avg_bits, metric, value, n_tokens, chosen``); ``quality``: test-token rows (``variant, kind, budget, avg_bits,
    metric, value, n_tokens``) of the chosen plan of every budget and the uniform configurations scored;
    ``plans``: the chosen plan per budget; ``sensitivity``: the table the solver used; ``families``: the family
    calibration (``FAMILY_COLUMNS``, None without it); ``tokens``: the three sets.
    """

    settings: PlanSettings
    plan: BitPlan
    baseline: BitPlan | None
    candidates: pd.DataFrame
    quality: pd.DataFrame
    plans: Mapping[float, BitPlan]
    sensitivity: pd.DataFrame
    families: pd.DataFrame | None
    tokens: tuple[dict, ...]
    notes: tuple[str, ...]
    metric: str


def plan_label(budget: float) -> str:
    return f"plan {budget:g}"


def _figures(df: pd.DataFrame, variant: str) -> dict[str, float]:
    sub = df[df["variant"] == variant]
    return {str(m): float(v) for m, v in zip(sub["metric"], sub["value"])}


def notes(quality: pd.DataFrame, metric: str = "kl") -> list[str]:
    """One sentence per plan: its test figure against the best uniform configuration scored at no more bits."""
    sub = quality[quality["metric"] == metric]
    se = quality[quality["metric"] == "kl_se"].set_index("variant")["value"] if metric == "kl" else pd.Series(dtype=float)
    uni = sub[sub["kind"] == "uniform"]

    def fmt(r) -> str:
        pm = f" ± {se[r.variant]:.3g}" if r.variant in se.index else ""
        return f"{r.value:.4g}{pm}"
    out = []
    for r in sub[sub["kind"] == "plan"].sort_values("budget").itertuples(index=False):
        ok = uni[uni["avg_bits"] <= r.budget + 1e-9]
        head = f"{r.variant} ({r.avg_bits:.3f} bits): {metric} {fmt(r)} on the test tokens"
        if not len(ok):
            out.append(head + "; no uniform configuration scored fits this budget")
            continue
        u = next(ok.sort_values("value").itertuples(index=False))
        if r.value < u.value:
            verdict = f"{100 * (1 - r.value / u.value):.0f}% below"
        elif r.value == u.value:
            verdict = "equal to"
        else:
            verdict = f"{100 * (r.value / u.value - 1):.0f}% ABOVE"
        out.append(f"{head}, {verdict} {u.variant} ({u.avg_bits:.3f} bits, {fmt(u)}), the best uniform "
                   f"configuration scored at no more bits")
    return out


def run(analysis, s: PlanSettings, *, frontier: Sequence[float] = (), progress: Progress | None = None) -> PlanReport:
    """Token sets -> sensitivity (cached) -> the solver's plan per budget -> every candidate of each budget (the
    plan, every uniform configuration within it) scored on the selection tokens, the best kept -> the kept plans
    and the best uniform configuration scored on the test tokens.

    ``frontier``: more budgets planned the same way; with any, every uniform configuration is scored on the test
    tokens too (the frontier: measured points only). Scores are cached per plan and token set.
    """
    s = check_settings(analysis, s, frontier)
    report = progress or (lambda f, m: None)
    report(0.0, "token sets")
    sets = token_sets(analysis, s)
    table = sensitivity(analysis, s, sets, progress=lambda f, m: report(0.02 + 0.48 * f, m))
    metric = model_metric(analysis)
    nw, inf = geometry(analysis)
    choices = plan_choices(analysis, s)
    values, alphas = values_of(table), alphas_of(table)
    budgets = list(dict.fromkeys([s.budget, *[float(b) for b in frontier]]))
    uniform = uniform_candidates(nw, inf, s, model=analysis.model_id, method=s.method)
    solved = {b: replace(solve_plan(values, nw, inf, choices, b, zero_point=s.zero_point, model=analysis.model_id,
                                    method=s.method), source="solver") for b in budgets}
    within = {b: {u: p for u, p in uniform.items() if p.avg_bits <= b + 1e-9} for b in budgets}
    cands = {plan_label(b): p for b, p in solved.items()}
    for b in budgets:
        cands.update(within[b])
    report(0.5, "scoring the candidates on the selection tokens")
    sel = cached_scores(analysis, s, sets, "selection", cands, alphas, lambda f, m: report(0.5 + 0.2 * f, m))
    score = sel[sel["metric"] == metric].set_index("variant")["value"]
    chosen: dict[float, BitPlan] = {}
    best_uniform: dict[float, str | None] = {}
    for b in budgets:
        ranked = sorted(within[b], key=lambda u: score[u])
        best_uniform[b] = ranked[0] if ranked else None
        pick = plan_label(b)
        if ranked and score[ranked[0]] <= score[pick]:  # ties go to the uniform configuration: simpler to deploy
            pick = ranked[0]
        p = cands[pick]
        chosen[b] = replace(p, budget_bits=b, selection=_figures(sel, pick), source=p.source,
                            objective=solved[b].objective if pick == plan_label(b) else p.objective)
    test_plans = {plan_label(b): p for b, p in chosen.items()}
    test_plans.update({u: uniform[u] for u in (uniform if frontier else
                                               [best_uniform[s.budget]] if best_uniform[s.budget] else [])})
    report(0.7, "scoring on the test tokens")
    test = cached_scores(analysis, s, sets, "test", test_plans, alphas, lambda f, m: report(0.7 + 0.3 * f, m))
    kind = {v: "plan" if v.startswith("plan") else "uniform" for v in test_plans}
    test = test.assign(kind=[kind[v] for v in test["variant"]],
                       budget=[float(v.split()[1]) if kind[v] == "plan" else test_plans[v].avg_bits
                               for v in test["variant"]],
                       avg_bits=[test_plans[v].avg_bits for v in test["variant"]])
    chosen = {b: replace(p, measured=_figures(test, plan_label(b))) for b, p in chosen.items()}
    base_label = best_uniform[s.budget]
    baseline = replace(uniform[base_label], budget_bits=s.budget, selection=_figures(sel, base_label),
                       measured=_figures(test, base_label)) if base_label else None
    main = [plan_label(s.budget), *within[s.budget]]
    cand = sel[sel["variant"].isin(main)].copy()
    cand["kind"] = ["plan" if v.startswith("plan") else "uniform" for v in cand["variant"]]
    cand["avg_bits"] = [cands[v].avg_bits for v in cand["variant"]]
    picked = plan_label(s.budget) if chosen[s.budget].source == "solver" else chosen[s.budget].source
    cand["chosen"] = cand["variant"] == picked
    report(1.0, "done")
    return PlanReport(settings=s, plan=chosen[s.budget], baseline=baseline, candidates=cand.reset_index(drop=True),
                      quality=test.reset_index(drop=True), plans=chosen, sensitivity=table,
                      families=analysis.read_extra(s.family_key) if s.family_calibration else None,
                      tokens=tuple(sets.table()), notes=tuple(notes(test, metric)), metric=metric)


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
