"""Headless commands: ``python -m core analyze|list|evaluate``.

Progress goes to stderr, a short summary to stdout. Any bad input ends with one readable line on
stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from .common import DEFAULT_CACHE, add_common, settings_from_args, stderr_progress

# Modules that each define ``register(subparsers)``; they import core.cli.common, never each other or this module.
COMMAND_MODULES = ("core.cli", "core.cli.evaluate", "core.cli.plan", "core.cli.anatomy", "core.cli.export")


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis import analyze

    settings = settings_from_args(args)
    t0 = time.time()
    a = analyze(settings, args.cache_dir, progress=None if args.quiet else stderr_progress(), force=args.force)
    dt = time.time() - t0
    layers = a.layers
    print(f"model      {a.model_id}")
    print(f"cache      {a.path}")
    print(f"linears    {len(a.names)}  tokens {a.manifest.get('n_tokens')}  time {dt:.1f}s")
    sw = a.settings.sweep
    print(f"setting    group {sw.group_size if sw.group_size > 0 else 'per row'} (model default "
          f"{a.default_group_size or 'per row'}), bits {','.join(map(str, sw.bits))}")
    if a.source_formats:  # a GGUF source: how its linears were stored, and what that means
        print(f"source     {'; '.join(f'{k}: {n} linears' for k, n in a.source_formats.items())}")
        print(f"note       {a.source_note}")
    for b, grp in layers.groupby("bits"):
        print(f"w{b}: median RTN rel.err {grp['rtn_rel'].median():.4g}  AWQ {grp['awq_rel'].median():.4g}  "
              f"gain in-sample {grp['gain'].median():.3f}x  held-out {grp['gain_heldout'].median():.3f}x")
    if getattr(args, "methods", False):
        _print_methods(a, settings, quiet=args.quiet)
    return 0


def _print_methods(a, settings, quiet: bool) -> None:
    """Every method on every linear at the analysis' bits (cached extra table), and who wins per family."""
    from ..studies import methods_table

    sw = settings.sweep
    t = methods_table.cached_methods_table(a, bits=sw.bits, group_size=sw.group_size, zero_point=sw.zero_point,
                                     progress=None if quiet else stderr_progress("methods "))
    win = methods_table.winners(t)
    print("methods (median held-out rel. error per family; margin = runner-up / winner):")
    for r in win.to_dict("records"):
        print(f"  w{r['bits']} {r['family']:<5} winner {r['winner']:<11} {r['winner_error']:.4g}  "
              f"runner-up {r['runner_up']:<11} {r['runner_up_error']:.4g}  margin {r['margin']:.2f}x")


def cmd_list(args: argparse.Namespace) -> int:
    from ..analysis import list_cached

    entries = list_cached(args.cache_dir)
    if not entries:
        print(f"no cached analyses in {args.cache_dir}")
        return 0
    for m in entries:
        s = m.get("settings", {})
        cal = s.get("calibration", {})
        sw = s.get("sweep", {})
        print(f"{m.get('created', '?')}  {m.get('model_id')}  {m.get('dtype')}  tokens={m.get('n_tokens')}  "
              f"bits={','.join(str(b) for b in sw.get('bits', []))} g={sw.get('group_size')} "
              f"calib={Path(str(cal.get('source'))).name}  {m['path']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    pa = sub.add_parser("analyze", help="collect statistics and run the layer-level sweep (cached)")
    add_common(pa)
    pa.add_argument("--force", action="store_true", help="recompute even if a cached entry matches")
    pa.add_argument("--methods", action="store_true",
                    help="also run every method (RTN, MSE clip, AWQ, GPTQ, HQQ, rotation) on every linear (cached)")
    pa.add_argument("--no-hessians", action="store_true",
                    help="do not keep X^T X per input in the cache (GPTQ then uses the kept sample's)")
    pa.set_defaults(func=cmd_analyze)
    pl = sub.add_parser("list", help="list cached analyses")
    pl.add_argument("--cache-dir", default=DEFAULT_CACHE)
    pl.set_defaults(func=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core", description="AWQ Explorer, headless")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a sub-command module not present in this checkout
            if e.name != mod:
                raise
            continue
        m.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract: one readable line, no traceback
        if os.environ.get("AWQ_EXPLORER_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"\nerror: {msg}\n")
        return 2
