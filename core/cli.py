"""Headless commands: ``python -m core analyze|list|evaluate``.

Progress goes to stderr, a short summary to stdout. Any bad input ends with one readable line on
stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

DEFAULT_CACHE = os.environ.get("AWQ_EXPLORER_CACHE", str(Path(__file__).resolve().parent.parent / "cache"))


class UsageError(ValueError):
    pass


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise UsageError("expected at least one value")
    return vals


def stderr_progress(prefix: str = "") -> Callable[[float, str], None]:
    state = {"last": -1.0, "t0": time.time()}

    def report(frac: float, msg: str) -> None:
        if frac - state["last"] >= 0.01 or frac >= 1.0:
            state["last"] = frac
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{prefix}[{bar:<30}] {frac * 100:5.1f}% {time.time() - state['t0']:6.1f}s {msg[:60]:<60}")
            if frac >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return report


def _settings(args: argparse.Namespace):
    from .analysis import AnalysisSettings
    from .calibration import CalibrationSpec
    from .quant import check_bits
    from .sweep import SweepSettings

    bits = _int_list(args.bits)
    for b in bits:
        check_bits(b)
    if args.calib_file:
        if not Path(args.calib_file).expanduser().is_file():
            raise UsageError(f"calibration file {args.calib_file!r} does not exist")
        source = str(Path(args.calib_file).expanduser().resolve())
    else:
        source = args.calib
    cal = CalibrationSpec(source=source, n_samples=args.n_samples, seqlen=args.seqlen, heldout_samples=args.heldout_samples)
    model = args.model
    if model != "bundled" and (model.startswith((".", "/", "~")) or Path(model).expanduser().exists()):
        model = str(Path(model).expanduser().resolve())
    return AnalysisSettings(
        model=model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
        revision=args.revision, tokenizer=args.tokenizer, calibration=cal,
        sweep=SweepSettings(bits=bits, group_size=args.group_size, zero_point=not args.symmetric, n_grid=args.n_grid),
        sample_rows=args.sample_rows, heldout_rows=args.sample_rows,
    )


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    settings = _settings(args)
    t0 = time.time()
    a = analyze(settings, args.cache_dir, progress=None if args.quiet else stderr_progress(), force=args.force)
    dt = time.time() - t0
    layers = a.layers
    print(f"model      {a.model_id}")
    print(f"cache      {a.path}")
    print(f"linears    {len(a.names)}  tokens {a.manifest.get('n_tokens')}  time {dt:.1f}s")
    for b, grp in layers.groupby("bits"):
        print(f"w{b}: median RTN rel.err {grp['rtn_rel'].median():.4g}  AWQ {grp['awq_rel'].median():.4g}  "
              f"gain in-sample {grp['gain'].median():.3f}x  held-out {grp['gain_heldout'].median():.3f}x")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .analysis import list_cached

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


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bundled", help="'bundled', a local folder, or a Hugging Face id")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--bits", default="2,3,4,6,8", help="comma-separated bit-widths (2..8)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size; 0 = per output row")
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero point)")
    p.add_argument("--n-grid", type=int, default=20)
    p.add_argument("--n-samples", type=int, default=32, help="calibration blocks")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per block (capped at the model's positions)")
    p.add_argument("--heldout-samples", type=int, default=8)
    p.add_argument("--sample-rows", type=int, default=512, help="input rows kept per distinct input")
    p.add_argument("--calib", default="bundled", help="'bundled', 'wikitext-2' or 'pile-val'")
    p.add_argument("--calib-file", default=None, help="a local UTF-8 text file to calibrate on")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--revision", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if the model folder has none")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core", description="AWQ Explorer, headless")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pa = sub.add_parser("analyze", help="collect statistics and run the layer-level sweep (cached)")
    add_common(pa)
    pa.add_argument("--force", action="store_true", help="recompute even if a cached entry matches")
    pa.set_defaults(func=cmd_analyze)
    pl = sub.add_parser("list", help="list cached analyses")
    pl.add_argument("--cache-dir", default=DEFAULT_CACHE)
    pl.set_defaults(func=cmd_list)
    try:
        from .evaluate_cli import register  # the model-quality command, when present
        register(sub, add_common)
    except ImportError:
        pass
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
