"""``python -m core plan``: a mixed-precision plan under a bit budget, chosen on one token set, reported on another.

Runs (or reuses) the analysis, the sensitivity pass (cached), the exact solver, scores the plan and every uniform
configuration within the budget on the selection tokens, keeps the best, and reports it beside the best uniform
configuration on the test tokens. Progress on stderr; the three token sets, the candidates and the test figures on
stdout. A budget outside what the candidate settings can cost is refused with one sentence (exit 2).

``--types Q4_0,Q4_1,...`` plans in llama.cpp types (each linear's type as llama-quantize writes it on its width,
costed by its block layout), so that ``--gguf FOLDER`` writes a file at the plan's budget and checks it in llama.cpp.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from .common import add_common

FRONTIER_DEFAULT = "3.25,3.5,3.75,4,4.25,4.5"  # core.studies.plan.FRONTIER_BUDGETS (literal: keeps --help fast)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="mixed-precision plan under an average-bit budget: Fisher sensitivity, "
                                           "exact solver, candidates checked on selection tokens, figures on test "
                                           "tokens, exports")
    add_common(p)
    p.set_defaults(bits="2,3,4,8,16")
    p._option_string_actions["--bits"].help = "candidate bit-widths of the plan (2..8, 16 = keep fp16)"
    p.add_argument("--budget", type=float, required=True,
                   help="average storage bits per quantizable weight, scales and zeros included (4-bit g128 = 4.25)")
    p.add_argument("--method", default="awq", help="awq, gptq or rtn")
    p.add_argument("--group-sizes", default="32,64,128,0",
                   help="candidate group sizes, each used where it divides a linear's width (0 = one group per row)")
    p.add_argument("--sweep-bits", default="2,3,4,6,8",
                   help="bit-widths of the layer-level analysis this runs on (the default reuses 'analyze')")
    p.add_argument("--fisher-samples", type=int, default=4,
                   help="sampled-label backward passes of the sensitivity (its noise falls as 1/sqrt(samples))")
    p.add_argument("--selection-tokens", type=int, default=0,
                   help="held-out tokens of the sensitivities and choices (0 = all of the analysis' held-out blocks)")
    p.add_argument("--test-tokens", type=int, default=2048,
                   help="held-out tokens after the selection ones, for every reported figure")
    p.add_argument("--frontier", nargs="?", const=FRONTIER_DEFAULT, default="",
                   help=f"more budgets planned and scored the same way, and every uniform configuration scored on "
                        f"the test tokens (no value: {FRONTIER_DEFAULT})")
    p.add_argument("--figure", default=None,
                   help="write the frontier figure (test KL, perplexity, same top-1 vs bits) here (.png/.svg/.pdf)")
    p.add_argument("--types", default="",
                   help="plan in llama.cpp types instead of bits x group sizes (comma-separated, e.g. "
                        "Q4_0,Q4_1,Q5_0,Q3_K,Q4_K; 'all' = every type): each linear takes one as llama-quantize writes "
                        "it on its width (a k-quant on rows 256 does not divide is its block-32 fallback), costed by "
                        "its block layout; --bits, --group-sizes and --symmetric are then not used")
    p.add_argument("--gguf", default=None,
                   help="also write the plan as a GGUF into this new folder and run it in llama.cpp")
    p.add_argument("--gguf-method", default=None,
                   help="the method the GGUF is written with (default: the plan's; a plan of method awq is written "
                        "with awq-clip, AWQ's folded form, whose scales and clip values are searched once at the "
                        "plan's most common type; rtn rounds each linear's own weights at its type)")
    p.add_argument("--export", default="json", help="comma-separated: json,llmcompressor,gptqmodel,llamacpp "
                                                    "(json,llamacpp with --types)")
    p.add_argument("--out", default=None, help="folder for the exports (default: the analysis' cache entry)")
    p.set_defaults(func=cmd_plan)


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e5 else f"{v:.4e}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _budgets(text: str) -> list[float]:
    out = []
    for t in text.split(","):
        if t.strip():
            try:
                out.append(float(t))
            except ValueError:
                raise ValueError(f"--frontier: expected comma-separated budgets in bits per weight, got {t.strip()!r}") from None
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from .common import int_list, settings_from_args, stderr_progress
    from ..grids.llamacpp import TYPES
    from ..studies import export as ex
    from ..studies.plan import PlanSettings, calibration_setting, check_settings, check_types, geometry, run
    from ..studies.plan_export import check_formats, gguf_method, plan_dict, write_exports

    types = TYPES if args.types.strip().lower() == "all" else args.types
    ps = PlanSettings(budget=args.budget, method=args.method, bits=int_list(args.bits),
                      group_sizes=int_list(args.group_sizes), zero_point=not args.symmetric,
                      fisher_samples=args.fisher_samples, selection_tokens=args.selection_tokens or None,
                      test_tokens=args.test_tokens, types=check_types(types))
    frontier = _budgets(args.frontier or "")
    formats = check_formats(args.export)
    if args.gguf:
        ex.check_out(args.gguf)  # an existing folder is refused before anything runs
    ns = argparse.Namespace(**vars(args))
    ns.bits = args.sweep_bits
    settings = settings_from_args(ns)
    quiet = args.quiet
    t0 = time.time()
    a = analyze(settings, args.cache_dir, progress=None if quiet else stderr_progress("analysis "))
    ps = check_settings(a, ps, frontier)  # one sentence before anything is measured
    t1 = time.time()
    rep = run(a, ps, frontier=frontier, progress=None if quiet else stderr_progress("plan "))
    t2 = time.time()
    plan, q = rep.plan, rep.quality
    out = args.out or str(a.path / "plan")
    paths = write_exports(plan, out, formats, linears=a.linears.to_dict("records"), module_names=list(a.lm.modules),
                          report=rep)
    print(f"model      {a.model_id}")
    if ps.types:
        print(f"method     {ps.method}; candidates: llama.cpp types {','.join(ps.types)}, each as llama-quantize writes "
              f"it on a linear's width (a k-quant on rows 256 does not divide: its block-32 fallback), costed by its "
              f"block layout")
    else:
        print(f"method     {ps.method}, zero point {'yes' if ps.zero_point else 'no'}; candidates: bits "
              f"{','.join(map(str, ps.bits))} x group sizes {','.join(map(str, ps.group_sizes))} (0 = one group per "
              f"row), each where it divides the width")
    for line in _table([[f"tokens     {r['set']}", f"{r['tokens']} tokens", f"{r['part']} [{r['span'][0]}, {r['span'][1]})",
                         r["used_for"]] for r in rep.tokens]):
        print(line)
    how = "the solver's plan" if plan.source == "solver" else f"{plan.source}, which verified better than the solver's plan"
    opt = "exact optimum" if plan.exact else f"within {plan.slack_bits:.4g} bits of the optimum"
    print(f"budget     {ps.budget:g} bits/weight -> {plan.avg_bits:.4f} bits: {how}"
          f"{f' ({opt})' if plan.source == 'solver' else ''}; {plan.summary()}")
    if rep.families is not None:
        f0 = rep.families.iloc[0]
        at = calibration_setting(ps, geometry(a)[1]).format or f"w{f0['bits']}g{f0['group_size']}"
        print(f"families   measured / predicted {rep.metric}, each family alone at {at}: "
              + ", ".join(f"{r.family} {r.factor:.2f}" for r in rep.families.itertuples(index=False)))
    cand = rep.candidates[rep.candidates["metric"] == rep.metric].sort_values("value")
    print(f"selection  {rep.metric} of every candidate on the selection tokens: " + " | ".join(
        f"{r.variant} {_fmt(r.value)}{' (kept)' if r.chosen else ''}" for r in cand.itertuples(index=False)))
    metrics = [m for m in ("kl", "kl_se", "kl_p99", "perplexity", "perplexity_se", "same_top", "rms_dp",
                           "hidden_rel_error", "cosine") if m in set(q["metric"])]
    rows = [["test", "avg_bits", *metrics]]
    for v in dict.fromkeys(q.sort_values(["kind", "avg_bits"], ascending=[True, True])["variant"]):
        vals = dict(zip(q.loc[q["variant"] == v, "metric"], q.loc[q["variant"] == v, "value"].astype(float)))
        bits = float(q.loc[q["variant"] == v, "avg_bits"].iloc[0])
        rows.append([v, f"{bits:.4f}", *[_fmt(vals.get(m, float("nan"))) for m in metrics]])
    for line in _table(rows):
        print(line)
    for note in rep.notes:
        print(f"note       {note}")
    print(f"time       analysis {t1 - t0:.1f}s, sensitivity + candidates + test {t2 - t1:.1f}s")
    for f, p in paths.items():
        print(f"export     {f}: {p}")
    if args.gguf:
        from .export import comparison_table

        method = args.gguf_method or gguf_method(plan.method)
        s = ex.export(a, format="gguf", out=args.gguf, method=method, plan=plan_dict(plan, rep),
                      progress=None if quiet else stderr_progress("gguf "))
        types_written = ", ".join(f"{t} x{n}" for t, n in s["tensor_types"].items())
        print(f"gguf       {s['folder']}/{s['file']} written with {method}: {s['linear_bits_per_weight']:.4f} bits per "
              f"weight of the linears, read from the tensors written (plan: {plan.avg_bits:.4f}); tensors "
              f"{types_written}")
        for n in s.get("notes", []):
            print(f"note       {n}")
        v = s.get("verify")
        if v:
            print(f"verified   {v['runtime']} on {v['n_tokens']} held-out tokens ({v['protocol']})")
            print(comparison_table(v["rows"], str(v.get("runtime", "llama.cpp"))))
            print(f"agreement  {v['agreement']}")
    if args.figure:
        from pathlib import Path

        from ..present.plan import plan_frontier

        fig = plan_frontier(q, rep.metric)
        dest = Path(args.figure).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        ext = dest.suffix.lower()
        data = fig.png() if ext == ".png" else fig.pdf() if ext == ".pdf" else fig.svg().encode()
        dest.write_bytes(data)
        print(f"figure     {dest}")
    sys.stdout.flush()
    return 0
