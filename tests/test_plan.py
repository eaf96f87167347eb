"""Planner: bit cost, the budgeted solver, exporters, sensitivity and verification (issue 11)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.metrics import bit_cost
from core.plan import BitPlan, budget_range, solve_mck, solve_plan, uniform_plan


# ------------------------------------------------------------------------------------------------
# bit cost (interface 3), by hand
# ------------------------------------------------------------------------------------------------
def test_bit_cost_by_hand():
    assert bit_cost(4, 128) == 4.25  # 4 + 32/128
    assert bit_cost(3, 64) == 3.5  # 3 + 32/64
    assert bit_cost(4, 128, zero_point=False) == 4.125  # no zero: 4 + 16/128
    assert bit_cost(2, 32) == 3.0
    assert bit_cost(8, 576) == 8 + 32 / 576  # per row: the row length is the group
    assert bit_cost(16, 128) == 16.0 and bit_cost(16, 7, False) == 16.0


@pytest.mark.parametrize("args", [(1, 128), (9, 128), (4, 0), (4, -1), (3.5, 128), (True, 128)])
def test_bit_cost_rejects(args):
    with pytest.raises(ValueError):
        bit_cost(*args)


# ------------------------------------------------------------------------------------------------
# solver
# ------------------------------------------------------------------------------------------------
def brute(cost, value, cap):
    best = None
    for pick in itertools.product(*(range(c.size) for c in cost)):
        c = sum(cost[i][j] for i, j in enumerate(pick))
        if c <= cap + 1e-9:
            v = sum(value[i][j] for i, j in enumerate(pick))
            best = v if best is None else min(best, v)
    return best


def test_solver_hand_case():
    # two layers, choices (cheap, dear); budget fits one dear choice: give it to the layer that gains most
    cost = np.array([[2.0, 4.0], [2.0, 4.0]])
    value = np.array([[10.0, 1.0], [3.0, 0.0]])
    sol = solve_mck(cost, value, 6.0)
    assert sol.exact and sol.choice.tolist() == [1, 0] and sol.value == 4.0 and sol.cost == 6.0
    sol = solve_mck(cost, value, 8.0)
    assert sol.choice.tolist() == [1, 1] and sol.value == 1.0
    sol = solve_mck(cost, value, 4.0)
    assert sol.choice.tolist() == [0, 0] and sol.value == 13.0
    with pytest.raises(ValueError):
        solve_mck(cost, value, 3.9)


def test_solver_prefers_big_gain_per_bit():
    # a greedy by value-per-bit picks the small layer first and then cannot afford the big one; the exact
    # solver sees that spending the whole budget on the big layer is better
    cost = np.array([[1.0, 2.0], [1.0, 5.0]])
    value = np.array([[5.0, 0.0], [12.0, 0.0]])
    sol = solve_mck(cost, value, 6.0)
    assert sol.choice.tolist() == [0, 1] and sol.value == 5.0


def test_solver_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for trial in range(60):
        m, k = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        cost = rng.integers(1, 20, size=(m, k)).astype(float) * float(rng.choice([1, 3, 64]))
        value = rng.random((m, k)) * 10
        lo, hi = cost.min(1).sum(), cost.max(1).sum()
        cap = float(rng.uniform(lo, hi + 1))
        sol = solve_mck(cost, value, cap)
        assert sol.exact
        assert sol.cost <= cap + 1e-9
        assert sol.value == pytest.approx(brute(cost, value, cap), abs=1e-9), trial


def test_solver_coarse_fallback_is_feasible_and_within_its_bound():
    rng = np.random.default_rng(1)
    cost = rng.integers(1, 5000, size=(5, 3)).astype(float) + rng.random((5, 3))  # not integral: no exact grid
    value = rng.random((5, 3))
    cap = float(cost.min(1).sum() + 0.5 * (cost.max(1).sum() - cost.min(1).sum()))
    sol = solve_mck(cost, value, cap, max_cells=200)
    assert not sol.exact and sol.slack > 0
    assert sol.cost <= cap + 1e-9
    assert sol.value <= brute(cost, value, cap - sol.slack) + 1e-12  # the stated bound
    assert sol.value >= brute(cost, value, cap) - 1e-12


def toy_model(m=12, seed=0):
    rng = np.random.default_rng(seed)
    nw = {f"model.layers.{i // 4}.f{i % 4}": int(rng.choice([64 * 64, 64 * 128, 128 * 64])) for i in range(m)}
    gs = {n: 64 for n in nw}
    # sensitivity falls with bits, roughly 4x per bit, with a per-layer factor
    sens = {n: {b: float(rng.uniform(0.1, 10)) * 4.0 ** (-b) for b in (2, 3, 4, 8)} for n in nw}
    return nw, gs, sens


def test_plan_monotone_in_budget_and_within_budget():
    nw, gs, sens = toy_model()
    lo, hi = budget_range(nw, gs, (2, 3, 4, 8, 16))
    assert lo == pytest.approx(2.5) and hi == 16.0
    prev = None
    for budget in np.linspace(lo, hi, 25):
        p = solve_plan(sens, nw, gs, float(budget))
        assert p.exact and p.avg_bits <= budget + 1e-12
        if prev is not None:
            assert p.objective <= prev + 1e-15
        prev = p.objective
    assert prev == 0.0  # at the top everything is fp16


def test_plan_budget_refused_with_one_sentence():
    nw, gs, sens = toy_model()
    for bad in (2.4, 16.5, float("nan"), "x"):
        with pytest.raises(ValueError) as e:
            solve_plan(sens, nw, gs, bad)
        assert "\n" not in str(e.value) and str(e.value).endswith((")", "there is nothing to choose", "'x'", "nan"))
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_plan(sens, nw, gs, 3.0, choices=(4, 8))
    with pytest.raises(ValueError, match="above the most expensive"):
        solve_plan(sens, nw, gs, 8.6, choices=(2, 3, 4, 8))


def test_uniform_plan_cost():
    nw, gs, _ = toy_model()
    p = uniform_plan(nw, gs, 3)
    assert isinstance(p, BitPlan) and p.avg_bits == pytest.approx(3.5) and set(p.counts()) == {3}
