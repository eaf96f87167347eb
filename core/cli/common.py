"""What every ``python -m core`` sub-command shares: common arguments, settings from them, progress on stderr.

Sub-command modules (``core.cli``, ``core.evaluate_cli``, ...) import this module and never each other.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

DEFAULT_CACHE = os.environ.get("AWQ_EXPLORER_CACHE", str(Path(__file__).resolve().parents[2] / "cache"))


class UsageError(ValueError):
    pass


def int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise UsageError("expected at least one value")
    return vals


def stderr_progress(prefix: str = "") -> Callable[[float, str], None]:
    state = {"last": -1.0, "t0": time.time(), "shown": 0.0}

    def report(frac: float, msg: str) -> None:
        # every 1% of the work, and at least once a second while a long first step runs
        if frac - state["last"] >= 0.01 or frac >= 1.0 or time.time() - state["shown"] >= 1.0:
            state["last"], state["shown"] = frac, time.time()
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{prefix}[{bar:<30}] {frac * 100:5.1f}% {time.time() - state['t0']:6.1f}s {msg[:60]:<60}")
            if frac >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return report


def settings_from_args(args: argparse.Namespace):
    from ..analysis import AnalysisSettings
    from ..model.calibration import CalibrationSpec
    from ..model.models import BUNDLED_MODELS, canonical_model, layer_widths
    from ..grids.quant import check_bits, default_group_size
    from ..studies.sweep import SweepSettings

    bits = int_list(args.bits)
    for b in bits:
        check_bits(b)
    if args.calib_file:
        if not Path(args.calib_file).expanduser().is_file():
            raise UsageError(f"calibration file {args.calib_file!r} does not exist")
        source = str(Path(args.calib_file).expanduser().resolve())
    else:
        source = args.calib
    cal = CalibrationSpec(source=source, n_samples=args.n_samples, seqlen=args.seqlen, heldout_samples=args.heldout_samples)
    model = canonical_model(args.model)
    if model not in BUNDLED_MODELS and (model.startswith((".", "/", "~")) or Path(model).expanduser().exists()):
        model = str(Path(model).expanduser().resolve())
    group_size = args.group_size
    if group_size == "auto":
        # the largest of 128, 64, 32 dividing every layer (widths from the config, or a GGUF's header)
        group_size = default_group_size(layer_widths(
            model, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code, revision=args.revision,
            progress=None if getattr(args, "quiet", False) else stderr_progress("convert ")))
    return AnalysisSettings(
        model=model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
        revision=args.revision, tokenizer=args.tokenizer, calibration=cal,
        sweep=SweepSettings(bits=bits, group_size=int(group_size), zero_point=not args.symmetric, n_grid=args.n_grid),
        sample_rows=args.sample_rows, heldout_rows=args.sample_rows,
        hessians=not getattr(args, "no_hessians", False),
    )


def group_size_arg(text: str) -> int | str:
    """``auto`` or an integer (0 or negative: one group per output row)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def add_common(p: argparse.ArgumentParser) -> None:
    # Defaults are the app's first-open settings (core.analysis.FIRST_OPEN_*): one set of defaults everywhere.
    # Literal copies here keep `--help` fast (no torch import); tests check they match.
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default; 'bundled' means the same), 'minilm', a .gguf file, a local folder, "
                        "or a Hugging Face id")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--bits", default="3,4", help="comma-separated bit-widths (2..8)")
    p.add_argument("--group-size", type=group_size_arg, default="auto",
                   help="quantization group size; 'auto' (default): the largest of 128, 64, 32 dividing every "
                        "layer's input width; 0 = per output row; a size that does not divide every layer is refused")
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero point)")
    p.add_argument("--n-grid", type=int, default=20)
    p.add_argument("--n-samples", type=int, default=8, help="calibration blocks")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per block (capped at the model's positions)")
    p.add_argument("--heldout-samples", type=int, default=2)
    p.add_argument("--sample-rows", type=int, default=128, help="input rows kept per distinct input")
    p.add_argument("--calib", default="bundled", help="'bundled', 'wikitext-2' or 'pile-val'")
    p.add_argument("--calib-file", default=None, help="a local UTF-8 text file to calibrate on")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"],
                   help="where each block runs (streamed from the checkpoint); auto: the whole model spread over the GPUs by accelerate")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the dtype each block is read in")
    p.add_argument("--revision", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if the model folder has none")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    p.add_argument("--quiet", action="store_true")
