"""``python -m core anatomy``: the outlier anatomy of a model (``core.studies.anatomy``), headless.

Runs (or reuses from the cache) the layer-level analysis, then the anatomy (or reuses it when the cached one used the
same thresholds): massive activations per layer with their dimensions and tokens, the super weights (or the statement
that there is none, with the largest spike), the interventions, each quantizer's treatment; ``--keep`` adds every
method with and without the super weights in fp16, ``--attribute METHOD`` where that method's damage comes from.
Prints what the Outliers page shows (progress on stderr); with ``--json`` the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .common import add_common


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("anatomy", help="massive activations, super weights, interventions and what each "
                                              "quantizer does to them (cached)")
    add_common(p)
    p.add_argument("--massive-factor", type=float, default=1000.0,
                   help="massive: |h| > this x the layer's median |h| (default 1000, Sun et al.)")
    p.add_argument("--massive-floor", type=float, default=100.0, help="massive: and |h| > this (default 100)")
    p.add_argument("--spike", type=float, default=100.0,
                   help="super-weight spike threshold: x the median over layers of the largest down-projection "
                        "input / output (default 100), or an absolute |x| with --absolute (the paper: 50)")
    p.add_argument("--absolute", action="store_true", help="--spike is an absolute |x| (Yu et al.'s criterion)")
    p.add_argument("--prompt", default=None, help="the super-weight search prompt (default: Yu et al.'s)")
    p.add_argument("--max-iterations", type=int, default=10, help="zero-and-repeat passes at most (default 10)")
    p.add_argument("--readers", type=int, default=0, metavar="N",
                   help="also measure every method on the q/k/v/gate/up of N blocks that read the massive tokens "
                        "(spread from the first to the last; minutes)")
    p.add_argument("--keep", action="store_true",
                   help="also run every method with and without the super weights kept in fp16 (minutes)")
    p.add_argument("--keep-modes", default=None, metavar="M,M",
                   help="with --keep: only these methods (comma-separated, e.g. rtn,awq,gptq,hqq; default all)")
    p.add_argument("--attribute", default=None, metavar="METHOD[@BITS]",
                   help="where a method's model-level damage comes from, e.g. hqq@3 (against rtn)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--force", action="store_true", help="recompute the anatomy even when it is cached")
    p.set_defaults(func=cmd_anatomy)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _records(df) -> list[dict]:
    return _clean(json.loads(df.to_json(orient="records"))) if df is not None else []


def parse_attribute(text: str, bits: tuple[int, ...]) -> tuple[str, int]:
    """``hqq@3`` -> ``("hqq", 3)``; without ``@BITS`` the lowest of ``bits``."""
    from ..grids.quant import check_bits
    from ..methods import LAYER_METHODS
    from .common import UsageError

    method, _, b = str(text).strip().lower().partition("@")
    if method not in LAYER_METHODS:
        raise UsageError(f"--attribute takes a method with a layer half ({', '.join(LAYER_METHODS)}), got {method!r}")
    try:
        return method, check_bits(int(b)) if b else min(bits)
    except ValueError:
        raise UsageError(f"--attribute {text!r}: the bits after @ must be 2..8") from None


def cmd_anatomy(args: argparse.Namespace) -> int:
    from ..analysis import analyze
    from ..grids.spec import choose
    from ..methods import MODEL_METHODS
    from ..present import outliers
    from ..studies import anatomy as A
    from .common import UsageError, settings_from_args, stderr_progress

    settings = A.AnatomySettings(  # validated before any work: a bad threshold is one line, exit 2
        massive_factor=args.massive_factor, massive_floor=args.massive_floor, spike=args.spike,
        spike_relative=not args.absolute, max_iterations=args.max_iterations,
        prompt=args.prompt if args.prompt is not None else A.PAPER_PROMPT,
        bits=tuple(int(b) for b in args.bits.split(",") if b.strip()))
    attribute = parse_attribute(args.attribute, settings.bits) if args.attribute else None
    keep_modes = choose(args.keep_modes, MODEL_METHODS, "method", UsageError) if args.keep_modes else None
    if args.readers < 0:
        raise UsageError(f"--readers must be a number of blocks (0 = none), got {args.readers}")
    quiet = args.quiet
    a = analyze(settings_from_args(args), args.cache_dir, progress=None if quiet else stderr_progress("analysis "))
    an = None if args.force else A.cached_anatomy(a)
    source = "cache"
    if an is None or an.settings != settings:
        source = "computed"
        an = A.run_anatomy(a, settings, progress=None if quiet else stderr_progress("anatomy "))
    readers = A.cached_consumers(a, an)
    if args.readers and readers is None:
        readers = A.consumer_errors(a, an, n_blocks=args.readers,
                                    progress=None if quiet else stderr_progress("readers "))
    keep = A.cached_keep_table(a, an)
    if args.keep and keep is None and an.keep:
        keep = A.keep_table(a, an, modes=keep_modes, progress=None if quiet else stderr_progress("keep "))
    attr = None
    if attribute:
        attr = A.cached_attribution(a, an, *attribute)
        if attr is None:
            attr = A.attribution(a, an, *attribute, progress=None if quiet else stderr_progress("attribute "))

    print(f"model      {a.model_id}")
    print(f"cache      {a.path} (anatomy {source})")
    for line in outliers.summary_lines(an, keep, attr, readers):
        print(line)
    if args.json:
        layers = an.layers
        out = {
            "model": a.model_id, "settings": json.loads(an.settings.to_json()),
            "rules": {"massive": an.settings.massive_rule, "spike": an.settings.spike_rule},
            "first_massive_layer": an.first_massive_layer,
            "massive_dims": outliers.massive_dims(an),
            "layers": _records(layers),
            "massive_tokens": _records(outliers.massive_tokens(an)),
            "super_weights": _records(outliers.super_table(an)),
            "search": {"stopped": bool(an.meta["search_stopped"]), "passes": int(an.meta["search_passes"]),
                       "largest_spike": _clean(outliers.largest_spike(an))},
            "interventions": _records(outliers.interventions_view(an)),
            "treatment": _records(an.treatment),
            "readers": _records(outliers.consumer_summary(readers)) if readers is not None else None,
            "keep": _records(outliers.keep_view(keep)) if keep is not None else None,
            "attribution": _records(outliers.attribution_view(attr)) if attr is not None else None,
            "seconds": an.meta["seconds"],
        }
        sys.stdout.flush()
        print(json.dumps(out))
    return 0
