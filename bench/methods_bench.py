"""Speed of the methods beyond AWQ (issue 10), as ratios measured within one run.

    python bench/methods_bench.py --json                    # GPTQ on the down_proj shape only
    python bench/methods_bench.py --model <folder> --json   # plus whole-model sequential GPTQ on that model

- ``gptq_down_proj_ms`` / ``gptq_down_proj_ratio``: ``core.gptq.gptq_quantize`` of a Qwen2.5-0.5B-shaped
  down_proj (W 896 x 4864, Hessian X^T X of 2048 correlated rows), 4 bits, group 128, block 128, divided by one
  bare fp32 ``X @ W.T`` of that layer on 512 rows (``matmul_ms``, the shape bench/run.py uses), median of
  interleaved repeats.
- ``hessian_overhead``: ``core.collect.collect`` with ``hessians=True`` / without, on the model's calibration
  tokens (interleaved pairs).
- ``gptq_model_s`` / ``gptq_model_ratio``: ``core.methods.gptq.sequential_gptq`` of every block linear of the model
  (w4, group 64 where it divides every width, else 32 ...) on ``--tokens`` calibration tokens, divided by one
  forward pass of the model over the same tokens (``forward_s``).

``run(quick) -> dict`` is the self-contained entry bench/run.py registers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

TOKENS, IN, OUT = 512, 4864, 896


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gptq_down_proj(repeats: int = 3) -> dict:
    """GPTQ on the 4864-input down_proj shape vs one bare matmul of that layer (interleaved timings)."""
    from core.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g) * 0.02
    x = torch.randn(TOKENS, IN, generator=g)
    mix = torch.randn(2048, 64, generator=g) @ torch.randn(64, IN, generator=g) / 8 + torch.randn(2048, IN, generator=g)
    h = mix.T @ mix
    for _ in range(2):
        x @ w.T
    mm, gq = [], []
    for _ in range(repeats):
        mm += [_timed(lambda: x @ w.T) for _ in range(5)]
        gq.append(_timed(lambda: gptq_quantize(w, h, n_bit=4, group_size=128)))
        mm += [_timed(lambda: x @ w.T) for _ in range(5)]
    m, q = statistics.median(mm), statistics.median(gq)
    return {"matmul_ms": m * 1e3, "gptq_down_proj_ms": q * 1e3, "gptq_down_proj_ratio": q / m}


def gptq_model(model: str, tokens: int = 2048, seqlen: int = 256) -> dict:
    """Whole-model sequential GPTQ (w4) vs one forward pass over the same calibration tokens."""
    from core.grids.spec import QuantSpec
    from core.methods import gptq
    from core.model import blocks
    from core.model.calibration import CalibrationSpec, prepare
    from core.model.collect import collect
    from core.studies.evaluate import check_group_size
    from core.model.models import load_model

    lm = load_model(model)
    n = max(1, tokens // seqlen)
    data = prepare(CalibrationSpec(n_samples=n, seqlen=seqlen, heldout_samples=1), lm.tokenizer, lm.max_positions)
    widths = [li.in_features for li in lm.linears]
    g = next((c for c in (128, 64, 32) if not any(wd % c for wd in widths)), 0)
    check_group_size(widths, g)
    input_of = collect(lm, data.calib[:1], None, sample_rows=1).input_of
    with torch.no_grad():
        fwd = [_timed(lambda: blocks.forward(lm, data.calib)) for _ in range(2)]
        snap = blocks.snapshot(lm)
        t = _timed(lambda: gptq.sequential_gptq(lm, data.calib, snap, QuantSpec(4, g), input_of=input_of))
        fwd.append(_timed(lambda: blocks.forward(lm, data.calib)))
    f = statistics.median(fwd)
    return {"gptq_model": lm.model_id, "gptq_model_tokens": int(data.calib.numel()), "gptq_model_group": g,
            "forward_s": f, "gptq_model_s": t, "gptq_model_ratio": t / f}


def hessian_overhead(model: str, tokens: int = 2048, seqlen: int = 256, pairs: int = 2) -> dict:
    """Collection with Hessians (one float32 GEMM per batch and input into float64) / without, interleaved pairs."""
    from core.model.calibration import CalibrationSpec, prepare
    from core.model.collect import collect
    from core.model.models import load_model

    lm = load_model(model)
    data = prepare(CalibrationSpec(n_samples=max(1, tokens // seqlen), seqlen=seqlen, heldout_samples=1),
                   lm.tokenizer, lm.max_positions)
    off, on = [], []
    for _ in range(pairs):
        off.append(_timed(lambda: collect(lm, data.calib, None, sample_rows=512)))
        on.append(_timed(lambda: collect(lm, data.calib, None, sample_rows=512, hessians=True)))
    return {"collect_s": statistics.median(off), "collect_hessians_s": statistics.median(on),
            "hessian_overhead": statistics.median(on) / statistics.median(off),
            "hessian_overhead_pairs": [b / a for a, b in zip(off, on)]}


def run(quick: bool = True, model: str | None = None, workdir: Path | None = None) -> dict:
    """The figures; the whole-model ones on ``model``, or on the bundled LLM when ``workdir`` is given."""
    if model is None and workdir is not None:
        from quality_bench import _bundled_llm  # bench/ is on sys.path when bench/run.py runs
        model = _bundled_llm(Path(workdir))
    res = gptq_down_proj(3 if quick else 7)
    if model:
        res.update(hessian_overhead(model))
        res.update(gptq_model(model))
    res["threads"] = torch.get_num_threads()
    res["loadavg"] = os.getloadavg()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="a model folder for the whole-model figure")
    ap.add_argument("--full", action="store_true", help="more repeats")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(quick=not args.full, model=args.model or None)
    print(json.dumps(res) if args.json else "\n".join(f"{k:24s} {v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
