"""Planner benchmark (issue 11): the sensitivity pass and a plan's verification on the bundled LLM, as ratios to
one forward pass of the same model over the same held-out tokens.

``bench_plan(quick)`` -> dict (merged into bench/run.py's JSON). Self-contained: its own temporary cache, the
bundled model's default analysis (computed there, not timed), then

- ``plan_forward_s``: one forward pass over the ``tokens`` held-out tokens (median of repeats);
- ``plan_sensitivity_s``: ``core.plan.layer_sensitivity`` + ``model_sensitivity`` (block granularity, AWQ, widths
  ``bits``) from a cold sensitivity cache: one whole-model run per unit (each block alone, each family in
  every block) and width plus the fp reference, plus quantizing;
- ``plan_verify_s``: ``core.plan.verify`` of the resulting plan alone (reference + one variant + quantizing);
- ``plan_sensitivity_ratio`` / ``plan_verify_ratio``: each divided by ``plan_forward_s``; the lower bound of
  the sensitivity ratio is ``1 + units x widths`` forward passes.
"""
from __future__ import annotations

import statistics
import tempfile
import time


def bench_plan(quick: bool = True, log=print) -> dict:
    import torch

    from core.studies import plan as P
    from core.analysis import AnalysisSettings, analyze
    from core.model.calibration import first_blocks
    from core.studies.evaluate import eval_data

    bits = (3, 4) if quick else (2, 3, 4, 8)
    tokens = 256 if quick else 512
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="awq-plan-bench-") as cache:
        log("plan bench: analysing the bundled model (not timed) ...")
        a = analyze(AnalysisSettings(), cache)
        lm = a.lm
        held = first_blocks(eval_data(a, lm).heldout, tokens)
        times = []
        with torch.no_grad():
            for _ in range(3 if quick else 5):
                t0 = time.perf_counter()
                lm.model(input_ids=held.to(lm.device))
                times.append(time.perf_counter() - t0)
        fwd = statistics.median(times)
        n_blocks = int(a.linears["block"].nunique())
        n_units = n_blocks + int(a.linears["family"].nunique())  # each block alone, each family in every block
        log(f"plan bench: sensitivity, {n_units} units x {len(bits)} widths on {int(held.numel())} tokens ...")
        t0 = time.perf_counter()
        lay = P.layer_sensitivity(a, "awq", bits)
        mod = P.model_sensitivity(a, "awq", bits, granularity="block", max_tokens=tokens)
        t_sens = time.perf_counter() - t0
        nw, gs = P.layer_geometry(a)
        choices = (*bits, 16)
        lo, hi = P.budget_range(nw, gs, choices)
        budget = min(max(3.5, lo), hi)
        plan = P.solve_plan(P.combine_sensitivity(lay, mod), nw, gs, budget, choices=choices, method="awq")
        log("plan bench: verification ...")
        t0 = time.perf_counter()
        P.verify(a, {"plan": plan}, max_tokens=tokens)
        t_ver = time.perf_counter() - t0
    out.update({
        "plan_model": a.model_id, "plan_tokens": int(held.numel()), "plan_bits": list(bits), "plan_blocks": n_blocks,
        "plan_forward_s": fwd, "plan_sensitivity_s": t_sens, "plan_verify_s": t_ver,
        "plan_units": n_units,
        "plan_sensitivity_ratio": t_sens / fwd, "plan_sensitivity_floor": 1 + n_units * len(bits),
        "plan_verify_ratio": t_ver / fwd,
    })
    return out


def report_plan(res: dict, row) -> None:
    """Lines of bench/run.py's text report."""
    if "plan_forward_s" not in res:
        return
    row("plan_forward_s (one forward pass)", f"{res['plan_forward_s']:.2f}",
        f"{res['plan_model']}, {res['plan_tokens']} held-out tokens")
    row("plan_sensitivity_ratio", f"{res['plan_sensitivity_ratio']:.1f}",
        f"{res['plan_sensitivity_s']:.0f} s; floor {res['plan_sensitivity_floor']} forward passes "
        f"({res['plan_units']} units x {len(res['plan_bits'])} widths + the reference)")
    row("plan_verify_ratio", f"{res['plan_verify_ratio']:.1f}", f"{res['plan_verify_s']:.0f} s (reference + plan)")


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    r = bench_plan(quick="--full" not in sys.argv, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
