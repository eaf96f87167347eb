"""``python -m core plan``: a mixed-precision plan under a bit budget, verified on the whole model, exported.

Runs (or reuses) the analysis, the sensitivity pass (cached), the exact solver, then scores the plan and the
uniform bit-widths on the held-out text. Progress on stderr; the verified quality on stdout. A budget outside
what the candidate bits can cost is refused with one sentence (exit 2).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from .common import add_common


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="mixed-precision plan under an average-bit budget: sensitivity, "
                                           "exact solver, whole-model verification, exports")
    add_common(p)
    p.set_defaults(bits="2,3,4,8,16")
    p._option_string_actions["--bits"].help = "candidate bit-widths of the plan (2..8, 16 = keep fp16)"
    p.add_argument("--budget", type=float, required=True,
                   help="average storage bits per quantizable weight, scales and zeros included (4-bit g128 = 4.25)")
    p.add_argument("--method", default="awq", help="awq, gptq or rtn")
    p.add_argument("--sweep-bits", default="2,3,4,6,8",
                   help="bit-widths of the layer-level analysis this runs on (the default reuses 'analyze')")
    p.add_argument("--granularity", default="block", choices=["block", "linear"],
                   help="model-level sensitivity unit: a whole block (cheap) or each linear")
    p.add_argument("--sens-tokens", type=int, default=512, help="held-out tokens per sensitivity variant")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens of the verification (0 = all)")
    p.add_argument("--no-baselines", action="store_true", help="verify the plan only, not the uniform widths")
    p.add_argument("--frontier", default="", help="more budgets to plan and verify in the same pass, e.g. 3,4,4.5")
    p.add_argument("--figure", default=None, help="write the frontier figure (mean KL vs bits) here (.png/.svg/.pdf)")
    p.add_argument("--export", default="json", help="comma-separated: json,llmcompressor,gptqmodel,llamacpp")
    p.add_argument("--out", default=None, help="folder for the exports (default: the analysis' cache entry)")
    p.set_defaults(func=cmd_plan)


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e5 else f"{v:.4e}"


def cmd_plan(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from .common import int_list, settings_from_args, stderr_progress
    from ..studies.plan import (PlanSettings, budget_range, check_budget, check_choices, check_method, layer_geometry, run)
    from ..studies.plan_export import check_formats, write_exports

    choices = check_choices(int_list(args.bits))
    method = check_method(args.method)
    formats = check_formats(args.export)
    ns = argparse.Namespace(**vars(args))
    ns.bits = args.sweep_bits
    settings = settings_from_args(ns)
    quiet = args.quiet
    t0 = time.time()
    a = analyze(settings, args.cache_dir, progress=None if quiet else stderr_progress("analysis "))
    nw, gs = layer_geometry(a)
    zp = not args.symmetric
    check_budget(args.budget, *budget_range(nw, gs, choices, zp))
    ps = PlanSettings(budget=float(args.budget), method=method, bits=choices, zero_point=zp,
                      granularity=args.granularity, sens_tokens=args.sens_tokens or None,
                      eval_tokens=args.eval_tokens or None)
    t1 = time.time()
    extra = []
    for t in (args.frontier or "").split(","):
        if t.strip():
            try:
                extra.append(check_budget(float(t), *budget_range(nw, gs, choices, zp)))
            except ValueError as e:
                raise ValueError(f"--frontier: {e}") from None
    rep = run(a, ps, baselines=not args.no_baselines, extra_budgets=extra,
              progress=None if quiet else stderr_progress("sensitivity + verification "))
    t2 = time.time()
    plan, df = rep.plan, rep.quality
    out = args.out or str(a.path / "plan")
    paths = write_exports(plan, out, formats, linears=a.linears.to_dict("records"),
                          module_names=list(a.lm.modules))
    counts = ", ".join(f"{'fp16' if b == 16 else f'w{b}'} x{n}" for b, n in plan.counts().items())
    print(f"model      {a.model_id}")
    print(f"method     {method}, group size {a.settings.sweep.group_size or 'per row'}, zero point "
          f"{'yes' if zp else 'no'}; candidates {','.join(str(c) for c in choices)}")
    print(f"budget     {plan.budget_bits:g} bits/weight -> plan {plan.avg_bits:.4f} "
          f"({'exact optimum' if plan.exact else f'within {plan.slack_bits:.4g} bits of the optimum'}); {counts}")
    print(f"time       analysis {t1 - t0:.1f}s, sensitivity + plan + verification {t2 - t1:.1f}s")
    metrics = list(dict.fromkeys(df["metric"]))
    head = ["variant", "avg_bits", *metrics]
    lines = [head]
    for v in dict.fromkeys(df["variant"]):
        sub = df[df["variant"] == v]
        vals = dict(zip(sub["metric"], sub["value"].astype(float)))
        lines.append([v, f"{float(sub['avg_bits'].iloc[0]):.4f}", *[_fmt(vals.get(m, float("nan"))) for m in metrics]])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for r in lines:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for note in rep.notes:
        print(f"note       {note}")
    for f, p in paths.items():
        print(f"export     {f}: {p}")
    if args.figure:
        from pathlib import Path

        from ..present.plan import plan_frontier

        fig = plan_frontier(df, "kl" if "kl" in metrics else metrics[0])
        dest = Path(args.figure).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        ext = dest.suffix.lower()
        data = fig.png() if ext == ".png" else fig.pdf() if ext == ".pdf" else fig.svg().encode()
        dest.write_bytes(data)
        print(f"figure     {dest}")
    sys.stdout.flush()
    return 0
