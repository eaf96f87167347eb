"""Outlier anatomy benchmark (issue 22): the anatomy of the bundled LLM as a ratio to one forward pass of the same model
over the same tokens.

``bench_anatomy(quick)`` -> dict (merged into bench/run.py's JSON). Self-contained: its own temporary cache, the bundled
model's default analysis (computed there, not timed), then

- ``anatomy_forward_s``: one plain forward pass over the tokens the anatomy scans (the analysis' calibration and
  held-out blocks), median of repeats;
- ``anatomy_s``: ``core.studies.anatomy.run_anatomy`` with the default thresholds: the residual-stream pass (block by
  block), the super-weight search on the prompt, the interventions (fp reference + one held-out scoring each), every
  method with a one-layer half on each super weight's layer at w3 and w4; ``anatomy_stage_s`` splits it;
- ``anatomy_ratio``: ``anatomy_s / anatomy_forward_s``;
- full runs only (not ``quick``): ``anatomy_readers_s`` (every method on q/k/v/gate/up of 3 blocks reading the
  massive tokens) and its ratio.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time


def bench_anatomy(quick: bool = True, log=print) -> dict:
    import torch

    from core.analysis import AnalysisSettings, analyze
    from core.model.blocks import forward, token_batches
    from core.studies import anatomy
    from core.studies.evaluate import eval_data

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="awq-anatomy-bench-") as cache:
        log("anatomy bench: analysing the bundled model (not timed) ...")
        a = analyze(AnalysisSettings(), cache)
        lm = a.lm
        data = eval_data(a, lm)
        ids = torch.cat([data.calib, data.heldout])
        batches = token_batches(ids, int(a.settings.batch_tokens))
        times = []
        with torch.no_grad():
            for _ in range(3 if quick else 5):
                t0 = time.perf_counter()
                for b in batches:
                    forward(lm, b)
                times.append(time.perf_counter() - t0)
        fwd = statistics.median(times)
        log(f"anatomy bench: the anatomy on {int(ids.numel())} tokens ...")
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        an = anatomy.run_anatomy(a)
        t_an = time.perf_counter() - t0
        out.update({"anatomy_model": a.model_id, "anatomy_tokens": int(ids.numel()),
                    "anatomy_heldout_tokens": int(data.heldout.numel()), "anatomy_forward_s": fwd,
                    "anatomy_s": t_an, "anatomy_ratio": t_an / fwd, "anatomy_stage_s": dict(an.meta["seconds"]),
                    "anatomy_super_weights": len(an.tables["super"]),
                    "anatomy_interventions": int(an.interventions["variant"].nunique()),
                    "anatomy_loadavg": [load0, os.getloadavg()[0]]})
        if not quick:
            log("anatomy bench: the massive tokens' readers (3 blocks) ...")
            t0 = time.perf_counter()
            anatomy.consumer_errors(a, an, n_blocks=3)
            t_r = time.perf_counter() - t0
            out.update({"anatomy_readers_s": t_r, "anatomy_readers_ratio": t_r / fwd})
    return out


def report_anatomy(res: dict, row) -> None:
    """Lines of bench/run.py's text report (none when the figure did not run)."""
    st = res.get("anatomy_stage_s")
    if st is None:
        return
    row("anatomy_forward_s (one forward pass)", f"{res['anatomy_forward_s']:.2f}",
        f"{res['anatomy_model']}, {res['anatomy_tokens']} tokens (calibration + held-out)")
    row("anatomy_ratio", f"{res['anatomy_ratio']:.1f}",
        f"{res['anatomy_s']:.0f} s: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in st.items())
        + f"; {res['anatomy_interventions']} interventions on {res['anatomy_heldout_tokens']} held-out tokens; "
          f"load {res['anatomy_loadavg'][0]:.1f} -> {res['anatomy_loadavg'][1]:.1f}")
    if "anatomy_readers_s" in res:
        row("anatomy_readers_ratio", f"{res['anatomy_readers_ratio']:.1f}",
            f"{res['anatomy_readers_s']:.0f} s (every method on q/k/v/gate/up of 3 reading blocks, w3 + w4)")


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    r = bench_anatomy(quick="--full" not in sys.argv, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r))
