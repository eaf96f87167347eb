"""``python -m core evaluate``: whole-model fake quantization and quality metrics, headless.

Runs (or reuses from the cache) the layer-level analysis, then the evaluation; prints a table on stdout
(progress on stderr). With ``--json`` the last stdout line is a JSON array of objects with keys
``mode, bits, group_size, protocol, type, metric, value`` (``type``: the llama.cpp type of ``--type`` runs, ``""``
on the integer grid). Rows already cached for the same analysis, bits, group size, zero point, type and search token
budgets are reused unless ``--force``.

``--type Q4_0[,Q5_0,...]``: every linear in that llama.cpp type (as llama-quantize writes it on the linear's width)
instead of the integer grid of ``--bits`` / ``--group-size``; modes rtn, awq, awq-grouped, awq-clip (others are
refused with one sentence).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from .common import add_common


def register(subparsers: Any) -> None:
    from ..studies.evaluate import CONST_ALPHA_TOKENS, DEFAULT_MODES, MODES, SEARCH_TOKENS

    p = subparsers.add_parser("evaluate", help="whole-model fake quantization: perplexity / embedding fidelity "
                                               "per mode (cached)")
    add_common(p)
    p.set_defaults(bits="3,4")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--sweep-bits", default="2,3,4,6,8",
                   help="bit-widths of the layer-level analysis this runs on (the default reuses 'analyze')")
    p.add_argument("--search-tokens", type=int, default=SEARCH_TOKENS,
                   help="calibration tokens (whole blocks) the awq-grouped / awq-clip searches run each scoring "
                        f"module on, once per alpha (default {SEARCH_TOKENS})")
    p.add_argument("--const-alpha-tokens", type=int, default=CONST_ALPHA_TOKENS,
                   help="calibration tokens (whole blocks) the const-alpha search runs the whole model on, once "
                        f"per alpha (default {CONST_ALPHA_TOKENS})")
    p.add_argument("--protocol", default="llama.cpp", choices=["llama.cpp", "all-positions"],
                   help="which held-out positions are scored: llama.cpp's (default: windows evaluated on their own, BOS "
                        "first when the tokenizer adds one, positions n_ctx/2 .. n_ctx-2 scored, as llama-perplexity "
                        "--kl-divergence) or every position from the first")
    p.add_argument("--type", default=None,
                   help="llama.cpp type(s) instead of the integer grid (comma-separated: Q4_0,Q4_1,Q5_0,...; a "
                        "k-quant on rows 256 does not divide is its block-32 fallback, as llama-quantize writes it); "
                        "--bits, --group-size and --symmetric are then the types' own; modes rtn, awq, awq-grouped, "
                        "awq-clip")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON array on the last line")
    p.add_argument("--force", action="store_true", help="re-run the evaluation even when its rows are cached")
    p.set_defaults(func=cmd_evaluate)


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "nan"
    if v == 0:
        return "0"
    return f"{v:.4f}" if 1e-3 <= abs(v) < 1e5 else f"{v:.4e}"


def table(df) -> str:
    """Rows (mode, bits[, type]) x metric columns, plus n_tokens and seconds (a ``type`` column when any row is in a
    llama.cpp type)."""
    metrics = list(dict.fromkeys(df["metric"]))
    fmt = df["format"].fillna("") if "format" in df else df["mode"].map(lambda _: "")
    typed = any(fmt)
    keys = list(dict.fromkeys(zip(df["mode"], df["bits"], fmt)))
    head = ["mode", "bits", *(["type"] if typed else []), *metrics, "n_tokens", "seconds"]
    lines = []
    for mode, bits, t in keys:
        sub = df[(df["mode"] == mode) & (df["bits"] == bits) & (fmt == t)]
        vals = {m: float(v) for m, v in zip(sub["metric"], sub["value"])}
        lines.append([mode, str(bits), *([t or "-"] if typed else []), *[_fmt(vals.get(m, float("nan"))) for m in metrics],
                      str(int(sub["n_tokens"].iloc[0])), f"{float(sub['seconds'].iloc[0]):.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from .common import UsageError, int_list, settings_from_args, stderr_progress
    import torch

    from ..grids import llamacpp
    from ..studies.evaluate import (FP_BITS, GRID, budget_tokens, cached_quality, check_format, check_modes,
                                    grouping_note, run_quality)
    from ..grids.quant import check_bits
    import pandas as pd

    modes = check_modes(args.modes)
    types = [check_format(t, modes) for t in dict.fromkeys(x.strip() for x in (args.type or "").split(",")) if t]
    for flag, v in (("--search-tokens", args.search_tokens), ("--const-alpha-tokens", args.const_alpha_tokens)):
        if v < 1:
            raise UsageError(f"{flag} must be a positive number of tokens, got {v}")
    bits = sorted({check_bits(b) for b in int_list(args.bits)})
    ns = argparse.Namespace(**vars(args))
    ns.bits = args.sweep_bits
    settings = settings_from_args(ns)
    t0 = time.time()
    a = analyze(settings, args.cache_dir, progress=None if args.quiet else stderr_progress("analysis "))
    t_an = time.time() - t0
    g0 = max(0, int(settings.sweep.group_size))  # 'auto' resolved by settings_from_args
    # one run per grid: the integer grid of --bits / --group-size, or each llama.cpp type (its own bits, block, minimum)
    runs = [(t, [llamacpp.nominal_bits(t)], llamacpp.block_size(t), llamacpp.has_min(t)) for t in types] or \
        [(GRID, bits, g0, not args.symmetric)]
    calib = torch.zeros(settings.calibration.n_samples, settings.calibration.seqlen)  # only its shape counts
    budget = {m: budget_tokens(m, calib, args.search_tokens, args.const_alpha_tokens) for m in modes}
    t1 = time.time()
    frames, sources = [], []
    for fmt, run_bits, g, zp in runs:
        df = None
        cached = cached_quality(a, fmt) if not args.force else None
        if cached is not None:
            sel = cached[(cached["group_size"] == g) & (cached["zero_point"] == zp)
                         & (cached["protocol"] == args.protocol)
                         & (cached["mode"].isin(modes) | (cached["mode"] == "fp"))
                         & (cached["bits"].isin(run_bits) | (cached["mode"] == "fp"))]
            sel = sel[[int(t) == budget.get(m, int(t)) for m, t in zip(sel["mode"], sel["search_tokens"])]]
            have = set(zip(sel["mode"], sel["bits"]))
            if all((m, b) in have for m in modes if m != "fp" for b in run_bits) and ("fp", FP_BITS) in have:
                df = sel.reset_index(drop=True)
        sources.append("cache" if df is not None else "computed")
        if df is None:
            df = run_quality(a, modes=modes, bits=run_bits, group_size=g, zero_point=zp,
                             search_tokens=args.search_tokens, const_alpha_tokens=args.const_alpha_tokens,
                             protocol=args.protocol, format=fmt or None,
                             progress=None if args.quiet else stderr_progress(f"evaluate {fmt} ".replace("  ", " ")))
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    source = ", ".join(dict.fromkeys(sources))
    t_ev = time.time() - t1
    print(f"model      {a.model_id}")
    print(f"cache      {a.path}")
    print(f"grouping   {grouping_note(a)}")
    if types:
        grid = ("llama.cpp types " + ", ".join(types) + " (each linear as llama-quantize writes it on its width: a "
                "k-quant on rows 256 does not divide is its block-32 fallback)")
    else:
        g, zp = runs[0][2], runs[0][3]
        grid = f"group size {g or 'per row'}, zero point {'yes' if zp else 'no (symmetric)'}"
    print(f"setting    {grid}, scored held-out tokens {int(df['n_tokens'].iloc[0])} (protocol {args.protocol}), "
          f"search tokens " + ", ".join(f"{m} {int(t)}" for m, t in dict(zip(df["mode"], df["search_tokens"])).items() if t))
    print(f"time       analysis {t_an:.1f}s, evaluation {t_ev:.1f}s ({source})")
    print(table(df))
    if args.json:
        recs = [{"mode": str(r.mode), "bits": int(r.bits), "group_size": int(r.group_size), "protocol": str(r.protocol),
                 "type": str(r.format), "metric": str(r.metric),
                 "value": float(r.value) if math.isfinite(float(r.value)) else None}
                for r in df.itertuples(index=False)]
        sys.stdout.flush()
        print(json.dumps(recs))
    return 0
