"""GGUF export benchmark (issue 19): the bundled LLM written as a GGUF and run in llama.cpp, as ratios within one run.

``bench_gguf(quick, log)`` -> dict (merged into bench/run.py's JSON), on the bundled SmolLM2 analysis at the app's
first-open settings (in ``$AWQ_EXPLORER_CACHE`` or the repository's cache, made once):

- ``gguf_export_s``: ``core.studies.export.export`` of ``rtn`` at Q4_0 without verification (the model half, the
  rounding of 210 linears in llama.cpp's type, the file written and read back); ``gguf_forward_s``: one forward pass
  of the explorer over the held-out windows (median of repeats); ``gguf_export_ratio`` = their ratio;
- ``gguf_llamacpp_eval_s`` / ``gguf_explorer_eval_s``: llama.cpp (the bindings, 2 threads) and the explorer
  (PyTorch, the fake-quantized weights) evaluating the same held-out windows of the exported file;
  ``gguf_eval_ratio`` = llama.cpp / explorer; ``gguf_agree_kl`` / ``gguf_agree_top``: the two runtimes against each
  other (mean KL, same top token) for the very same weights.

``measure(...)`` is the table of the note / BENCHMARKS: each configuration exported, verified in llama.cpp (the
bindings) and scored by ``llama-perplexity --kl-divergence`` against the explorer's fp reference on the explorer's
own held-out windows, beside the explorer's prediction for the same weights. ``python bench/gguf_bench.py
--measure OUT.json [--heldout-samples N]`` runs it. ``--plan-budget 4.5`` also plans the bundled LLM in llama.cpp
types (``core.studies.plan``, ``PlanSettings.types``, method ``--plan-method``) at that budget, writes the plan as a
GGUF (``plan_export.gguf_method``: awq -> awq-clip) and measures it like the other rows; the plan's own test-token
figures (explorer, all positions) go to the row's ``plan``.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = [  # (label, method, type, imatrix)
    ("Q4_0", "rtn", "Q4_0", False), ("Q4_0 + imatrix", "rtn", "Q4_0", True),
    ("awq-grouped Q4_0", "awq-grouped", "Q4_0", False), ("awq-clip Q4_0", "awq-clip", "Q4_0", False),
    ("awq-clip Q4_0 + imatrix", "awq-clip", "Q4_0", True),
    ("Q4_1", "rtn", "Q4_1", False), ("Q4_1 + imatrix", "rtn", "Q4_1", True), ("awq-clip Q4_1", "awq-clip", "Q4_1", False),
    ("Q5_0", "rtn", "Q5_0", False), ("Q5_0 + imatrix", "rtn", "Q5_0", True), ("awq-clip Q5_0", "awq-clip", "Q5_0", False),
    ("awq-grouped Q4_1", "awq-grouped", "Q4_1", False), ("awq-clip Q4_1 + imatrix", "awq-clip", "Q4_1", True),
    ("awq-grouped Q5_0", "awq-grouped", "Q5_0", False), ("awq-clip Q5_0 + imatrix", "awq-clip", "Q5_0", True),
]


def bundled_analysis(heldout_samples: int = 2, log=print):
    from core.analysis import analyze
    from core.cli import build_parser
    from core.cli.common import DEFAULT_CACHE, settings_from_args

    args = build_parser().parse_args(["evaluate", "--model", "bundled", "--quiet", "--bits", "2,3,4,6,8",
                                      "--heldout-samples", str(heldout_samples)])
    log(f"gguf bench: the bundled analysis ({heldout_samples} held-out blocks) in {DEFAULT_CACHE} ...")
    return analyze(settings_from_args(args), DEFAULT_CACHE)


def _forward_s(a, ids, repeats: int) -> float:
    import torch

    from core.model import score

    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(ids.shape[0]):
                score.output(a.lm, ids[i:i + 1])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_gguf(quick: bool = True, log=print) -> dict:
    from core.model import score
    from core.studies import evaluate, export as ex

    a = bundled_analysis(log=log)
    held = score.windows(a.lm, evaluate.eval_data(a, a.lm).heldout, evaluate.PROTOCOL)
    fwd = _forward_s(a, held, 3 if quick else 5)
    with tempfile.TemporaryDirectory(prefix="awq-gguf-bench-") as tmp:
        log("gguf bench: export rtn Q4_0 (no verification) ...")
        t0 = time.perf_counter()
        ex.export(a, format="gguf", out=Path(tmp) / "plain", method="rtn", spec=ex.type_spec("Q4_0"), verify=False)
        export_s = time.perf_counter() - t0
        log("gguf bench: export rtn Q4_0 and evaluate it in llama.cpp and in the explorer ...")
        s = ex.export(a, format="gguf", out=Path(tmp) / "verified", method="rtn", spec=ex.type_spec("Q4_0"))
    v = s["verify"]
    return {"gguf_export_s": export_s, "gguf_forward_s": fwd, "gguf_export_ratio": export_s / fwd,
            "gguf_llamacpp_eval_s": v["seconds_llamacpp"], "gguf_explorer_eval_s": v["seconds_explorer"],
            "gguf_eval_ratio": v["seconds_llamacpp"] / v["seconds_explorer"], "gguf_tokens": int(held.numel()),
            "gguf_agree_kl": v["agree"]["kl_mean"], "gguf_agree_top": v["agree"]["same_top"],
            "gguf_bytes": int(s["bytes"])}


def report_gguf(res: dict) -> list[str]:
    if "gguf_export_s" not in res:
        return []
    return [f"GGUF export (rtn Q4_0, bundled LLM): {res['gguf_export_s']:.1f} s = {res['gguf_export_ratio']:.1f}x "
            f"one forward pass over the {res['gguf_tokens']} held-out tokens ({res['gguf_forward_s']:.2f} s)",
            f"llama.cpp evaluating the exported file: {res['gguf_llamacpp_eval_s']:.2f} s vs the explorer "
            f"{res['gguf_explorer_eval_s']:.2f} s (ratio {res['gguf_eval_ratio']:.2f}); the two runtimes agree to "
            f"mean KL {res['gguf_agree_kl']:.4f}, same top token {res['gguf_agree_top']:.1%}"]


def measure(a, configs=CONFIGS, plan: dict | None = None, log=print, workdir: Path | None = None,
            partial: str | None = None, plan_methods: tuple[str, ...] = ()) -> list[dict]:
    """Each configuration (``CONFIGS``; and ``plan`` as a GGUF when given) exported, verified in llama.cpp and scored
    by llama-perplexity --kl-divergence against the explorer's fp reference on the explorer's held-out windows.
    ``partial``: a JSON file rewritten after every row. ``plan_methods``: the methods the plan's GGUF is written
    with (default: ``plan_export.gguf_method`` of the plan's method), one row each."""
    import torch

    from core.model import score
    from core.studies import evaluate, export as ex, gguf_export as ge

    held = score.windows(a.lm, evaluate.eval_data(a, a.lm).heldout, evaluate.PROTOCOL)
    rows = []
    with tempfile.TemporaryDirectory(prefix="awq-gguf-measure-", dir=workdir) as tmp:
        with torch.no_grad():
            fp = torch.cat([score.output(a.lm, held[i:i + 1]) for i in range(held.shape[0])])
        base = ge.write_kld_base(Path(tmp) / "base.kld", held, fp)
        del fp
        runs = [(label, m, t, imx, None) for label, m, t, imx in configs]
        if plan is not None:
            from core.studies.plan_export import gguf_method

            pm = str(plan.get("method", "rtn"))
            for wm in reversed(plan_methods or (gguf_method(pm),)):  # first: the rows a long run must not lose
                runs.insert(0, (f"plan {plan.get('budget_bits', '?')} bits ({pm} -> {wm})", wm, None, False, plan))
        for i, (label, method, t, imx, pl) in enumerate(runs):
            log(f"gguf measure {i + 1}/{len(runs)}: {label} ...")
            out = Path(tmp) / f"run{i}"
            t0 = time.perf_counter()
            try:
                s = ex.export(a, format="gguf", out=out, method=method, spec=ex.type_spec(t) if t else None,
                              plan=pl, imatrix=imx)
            except Exception as e:  # noqa: BLE001 - reported in the table, the other rows still run
                rows.append({"label": label, "error": str(e)})
                log(f"  failed: {e}")
                continue
            kld = ge.llama_perplexity_kld(out / ge.FILE_NAME, base, held.shape[1])
            v = s["verify"]
            row = {"label": label, "method": method, "type": t or "plan", "imatrix": imx, "bytes": s["bytes"],
                   "bits_per_weight": s["linear_bits_per_weight"], "seconds": time.perf_counter() - t0,
                   "llama_perplexity": kld, "bindings": {r["metric"]: r["llamacpp"] for r in v["rows"]},
                   "explorer": {r["metric"]: r["explorer"] for r in v["rows"]}, "agree": v["agree"],
                   "n_tokens": v["n_tokens"], "tensor_types": s["tensor_types"], "notes": s.get("notes", [])}
            if pl is not None:
                row["plan"] = {k: pl.get(k) for k in ("avg_bits", "source", "measured", "baseline", "method")}
            rows.append(row)
            log(f"  {json.dumps(row, default=str)}")
            if partial is not None:  # every finished row on disk at once (a long run may be stopped)
                Path(partial).write_text(json.dumps(rows, indent=1, default=str))
            import shutil
            shutil.rmtree(out, ignore_errors=True)
    return rows


def types_plan(a, budget: float, method: str = "awq", types: str = "all", log=print) -> dict:
    """The plan JSON (``plan_export.plan_dict``) of the bundled analysis planned in llama.cpp types at ``budget``."""
    from core.grids.llamacpp import TYPES
    from core.studies import plan as P
    from core.studies.plan_export import plan_dict

    ts = TYPES if types.strip().lower() == "all" else tuple(types.split(","))
    log(f"gguf measure: planning in llama.cpp types {','.join(ts)} at {budget:g} bits ({method}) ...")
    t0 = time.perf_counter()
    last = [-1.0]

    def progress(f: float, m: str) -> None:  # every 2% of the way (the sensitivity pass reports every linear)
        if f - last[0] >= 0.02:
            last[0] = f
            log(f"  plan {f:.0%} {time.perf_counter() - t0:.0f}s {m}")
    rep = P.run(a, P.PlanSettings(budget=budget, method=method, types=ts), progress=progress)
    log(f"  planned in {time.perf_counter() - t0:.0f} s: {rep.plan.summary()} ({rep.plan.avg_bits:.4f} bits, "
        f"{rep.plan.source}); test: plan kl {rep.plan.measured.get('kl')}, "
        f"{rep.baseline.source if rep.baseline else '-'} kl {rep.baseline.measured.get('kl') if rep.baseline else '-'}")
    return plan_dict(rep.plan, rep)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", default=None, help="write the measurement table as JSON here")
    ap.add_argument("--heldout-samples", type=int, default=2)
    ap.add_argument("--plan", default=None, help="a plan JSON to write as a GGUF too")
    ap.add_argument("--only", default=None, help="comma-separated labels of CONFIGS to run ('' = none)")
    ap.add_argument("--plan-budget", type=float, default=None,
                    help="plan the bundled LLM in llama.cpp types at this budget and measure its GGUF too")
    ap.add_argument("--plan-method", default="awq", help="the plan's method (awq or rtn)")
    ap.add_argument("--plan-types", default="all", help="the plan's candidate types (comma-separated, 'all')")
    ap.add_argument("--plan-gguf-methods", default="",
                    help="comma-separated methods the plan's GGUF is written with, one row each (default: awq -> "
                         "awq-clip, else the plan's method)")
    args = ap.parse_args(argv)
    if args.measure:
        a = bundled_analysis(args.heldout_samples)
        configs = [c for c in CONFIGS if args.only is None or c[0] in args.only.split(",")]
        plan = json.loads(Path(args.plan).read_text()) if args.plan else None
        if args.plan_budget is not None:
            plan = types_plan(a, args.plan_budget, args.plan_method, args.plan_types)
        rows = measure(a, configs, plan, partial=args.measure,
                       plan_methods=tuple(m for m in args.plan_gguf_methods.split(",") if m.strip()))
        Path(args.measure).write_text(json.dumps(rows, indent=1, default=str))
        return 0
    res = bench_gguf(True)
    print("\n".join(report_gguf(res)))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
