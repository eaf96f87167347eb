"""``python -m core export``: a method's quantized model written as a file a runtime loads.

``--type Q4_0`` (a llama.cpp type; implies ``--format gguf``) or ``--bits/--group-size/--symmetric`` (the explorer's
integer grid, for formats that store one), or ``--plan plan.json`` (each linear at its own setting). The folder
``--out`` must not exist; it appears only when everything was written (and, unless ``--no-verify``, checked in the
format's own runtime). Progress on stderr; a summary on stdout (``--json``: the summary as one JSON line at the end).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .common import UsageError, add_common


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="write a method's quantized model as a file (GGUF for llama.cpp, ...), "
                                             "verified in its runtime")
    add_common(p)
    p.set_defaults(bits="4")
    p.add_argument("--method", default=None,
                   help="the method whose model half quantizes (rtn, awq-grouped, awq-clip, gptq, ...; default: the "
                        "plan's method, else rtn)")
    p.add_argument("--type", default=None, help="a llama.cpp type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...): implies "
                                               "--format gguf")
    p.add_argument("--format", default=None, help="gguf (default with --type) or another registered format")
    p.add_argument("--plan", default=None, help="a plan JSON (the Plan page's / 'plan' command's plan.json)")
    p.add_argument("--out", required=True, help="the new folder to write (must not exist)")
    p.add_argument("--imatrix", action="store_true",
                   help="weight the llama.cpp types' rounding by the analysis' activation statistics (llama.cpp's "
                        "importance matrix: mean x^2 per input channel)")
    p.add_argument("--verify-tokens", type=int, default=None,
                   help="held-out tokens the llama.cpp check evaluates (default: all of the analysis' held-out text)")
    p.add_argument("--no-verify", action="store_true", help="do not load the written file back in its runtime")
    p.add_argument("--sweep-bits", default="2,3,4,6,8",
                   help="bit-widths of the layer-level analysis this runs on (the default reuses 'analyze')")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.set_defaults(func=cmd_export)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else (f"{v:.4f}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}")
    return str(v)


def comparison_table(rows: list[dict], runtime: str = "llama.cpp") -> str:
    """``metric | <runtime> | explorer | difference`` lines of a verification (a GGUF's rows name the runtime's value
    ``llamacpp``, a reloaded checkpoint's ``runtime``)."""
    head = ["metric", runtime, "explorer", "difference"]
    value = [r["runtime"] if "runtime" in r else r["llamacpp"] for r in rows]
    lines = [[r["metric"], _fmt(v), _fmt(r["explorer"]), _fmt(v - r["explorer"])] for r, v in zip(rows, value)]
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *lines])


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..analysis import analyze
    from ..grids.quant import check_bits
    from ..grids.spec import QuantSpec
    from ..studies import export as ex
    from .common import settings_from_args, stderr_progress

    if args.type and args.plan:
        raise UsageError("give --type or --plan, not both (a plan names each linear's type)")
    plan = None
    if args.plan:
        path = Path(args.plan).expanduser()
        if not path.is_file():
            raise UsageError(f"plan file {args.plan!r} does not exist")
        try:
            plan = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"plan file {args.plan!r} is not valid JSON ({e})") from None
        if not isinstance(plan, dict):
            raise UsageError(f"plan file {args.plan!r} does not hold a JSON object")
    fmt = args.format or ("gguf" if args.type or plan is not None else None)
    if fmt is None:
        raise UsageError("give --type (a llama.cpp type: a GGUF) or --format")
    method = args.method or (str(plan.get("method")) if plan and plan.get("method") else "rtn")
    if fmt == "gguf" and not args.type and plan is None:
        raise UsageError("a GGUF export needs --type (Q4_0, Q4_1, Q5_0, ...) or --plan")
    spec = ex.type_spec(args.type) if args.type else None
    bits = [check_bits(int(b)) for b in str(args.bits).split(",") if b.strip()]
    if spec is None and plan is None and len(bits) != 1:
        raise UsageError("give one bit-width (--bits 4)")
    ex.check_out(args.out)
    ns = argparse.Namespace(**vars(args))
    ns.bits = args.sweep_bits
    settings = settings_from_args(ns)
    if spec is None and plan is None:
        spec = QuantSpec(bits[0], int(settings.sweep.group_size), not args.symmetric)
    a = analyze(settings, args.cache_dir, progress=None if args.quiet else stderr_progress("analysis "))
    summary = ex.export(a, format=fmt, out=args.out, method=method, spec=spec, plan=plan, verify=not args.no_verify,
                        imatrix=args.imatrix, verify_tokens=args.verify_tokens,
                        progress=None if args.quiet else stderr_progress("export "))
    print(f"model      {a.model_id}")
    print(f"method     {method}  {('type ' + spec.format) if spec is not None and spec.format else ''}"
          f"{'plan ' + args.plan if args.plan else ''}")
    print(f"wrote      {summary['folder']}  ({summary.get('bytes', 0) / 2**20:.1f} MiB, {summary['seconds']:.1f} s)")
    for n in summary.get("notes", []):
        print(f"note       {n}")
    v = summary.get("verify")
    if v:
        print(f"verified   {v['runtime']} on {v['n_tokens']} held-out tokens ({v['protocol']}); "
              f"tolerance: {v['tolerance']}")
        # the column is named by the runtime's name; its versions and loader are on the "verified" line
        print(comparison_table(v["rows"], str(v.get("runtime", "llama.cpp")).split(" ")[0]))
        print(f"agreement  {v['agreement']}")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(summary, default=str))
    return 0
