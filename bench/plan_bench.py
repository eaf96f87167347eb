"""Planner benchmark (issue 21): the default ``plan`` command on the bundled LLM, end to end on an empty cache, as a
ratio to one forward pass of the same model over the same tokens.

``bench_plan(quick)`` -> dict (merged into bench/run.py's JSON). Self-contained: a temporary, empty cache, then

- ``plan_command_s``: wall time of ``python -m core plan --model bundled --budget 3.5 --method awq`` in a fresh
  process (what a new user runs: the GGUF's conversion, the analysis, the sensitivity pass, the candidates on the
  selection tokens, the plan and the best uniform configuration on the test tokens, the JSON export);
  ``plan_analysis_s`` / ``plan_planning_s``: its two parts as the command reports them;
- ``plan_forward_s``: one forward pass of the model over the tokens the command reads, its three token sets
  together (calibration + selection + test blocks; median of repeats, in the analysis' batches);
- ``plan_command_ratio`` = ``plan_command_s / plan_forward_s``; ``plan_planning_ratio`` the same for the planning
  part alone. Quality figures of the run (``plan_kl``, ``plan_baseline_kl``) come from its plan.json.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["-m", "core", "plan", "--model", "bundled", "--budget", "3.5", "--method", "awq"]


def bench_plan(quick: bool = True, log=print) -> dict:
    import torch

    from core.analysis import list_cached, open_entry
    from core.studies import plan as P

    with tempfile.TemporaryDirectory(prefix="awq-plan-bench-") as cache:
        out_dir = Path(cache) / "out"
        cmd = [sys.executable, *COMMAND, "--cache-dir", cache, "--out", str(out_dir), "--quiet"]
        log("plan bench: " + " ".join(["python", *COMMAND]) + " on an empty cache ...")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"the plan command failed: {r.stderr.strip().splitlines()[-1:]}")
        parts = re.search(r"^time\s+analysis ([\d.]+)s, sensitivity \+ candidates \+ test ([\d.]+)s", r.stdout, re.M)
        plan = json.loads((out_dir / "plan.json").read_text())
        a = open_entry(list_cached(cache)[0]["path"])
        sets = P.token_sets(a, P.PlanSettings())
        ids = torch.cat([sets.calibration, sets.selection, sets.test])
        per = max(1, int(a.settings.batch_tokens) // ids.shape[1])
        log(f"plan bench: one forward pass over its {ids.numel()} tokens ...")
        times = []
        with torch.no_grad():
            for _ in range(3 if quick else 5):
                t1 = time.perf_counter()
                for i in range(0, ids.shape[0], per):
                    a.lm.model(input_ids=ids[i:i + per].to(a.lm.device), use_cache=False)
                times.append(time.perf_counter() - t1)
        fwd = statistics.median(times)
    out = {"plan_model": plan["model"], "plan_tokens": {t["set"]: t["tokens"] for t in plan["token_sets"]},
           "plan_command_s": wall, "plan_forward_s": fwd, "plan_command_ratio": wall / fwd,
           "plan_kl": plan["measured"]["kl"], "plan_source": plan["source"], "plan_avg_bits": plan["avg_bits"],
           "plan_baseline": plan["baseline"]["variant"], "plan_baseline_kl": plan["baseline"]["measured"]["kl"]}
    if parts:
        out.update(plan_analysis_s=float(parts.group(1)), plan_planning_s=float(parts.group(2)),
                   plan_planning_ratio=float(parts.group(2)) / fwd)
    return out


def report_plan(res: dict, row) -> None:
    """Lines of bench/run.py's text report."""
    if "plan_command_s" not in res:
        return
    tok = res["plan_tokens"]
    row("plan_forward_s (one forward pass)", f"{res['plan_forward_s']:.2f}",
        f"{res['plan_model']}, {sum(tok.values())} tokens: calibration {tok['calibration']} + selection "
        f"{tok['selection']} + test {tok['test']}")
    row("plan_command_ratio", f"{res['plan_command_ratio']:.0f}",
        f"{res['plan_command_s']:.0f} s: the default plan command on an empty cache"
        + (f" (analysis {res['plan_analysis_s']:.0f} s, planning {res['plan_planning_s']:.0f} s = "
           f"{res['plan_planning_ratio']:.0f} forward passes)" if "plan_planning_s" in res else ""))
    row("plan_kl (test tokens)", f"{res['plan_kl']:.4f}",
        f"{res['plan_avg_bits']:.3f} bits ({res['plan_source']}); {res['plan_baseline']} {res['plan_baseline_kl']:.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    r = bench_plan(quick="--full" not in sys.argv, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
