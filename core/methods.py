"""One entry for "quantize this layer with method M": the registry the Layer Lab, the sweep, Model quality and
the planner call (COMMON.md interface 1).

Every method is a pure function of ``(w [out, in], LayerInputs, settings)`` that returns the dequantized weights
``[out, in]`` (float32) meant to be used *with the unrotated input* ``X``: ``y_hat = X @ W_hat.T``. A sixth method
is one small module plus one ``_register`` line here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd
import torch

from . import awq, metrics, quant
from .gptq import gptq_quantize
from .hqq import hqq_quantize
from .mse_clip import mse_clip_quantize
from .rotation import rotated_rtn


@dataclass(frozen=True)
class LayerInputs:
    """What a method may use besides the weights. Shapes: ``x_mean [in]`` (mean |x| over all calibration tokens),
    ``x [rows, in]`` (the kept calibration sample), ``hessian [in, in]`` (``X^T X`` over all calibration tokens,
    any positive multiple works), ``w_shared [sum out, in]`` (all linears reading the same input, for AWQ's
    duo scaling); ``name``: the linear's module path (decides the Q/K clip skip)."""

    x_mean: torch.Tensor | None = None
    x: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    w_shared: torch.Tensor | None = None
    name: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``needs_data`` is False for the data-free ones (RTN, MSE clip, HQQ, rotation)."""

    name: str
    label: str
    needs_data: bool
    description: str
    fn: Callable[..., torch.Tensor]


METHODS: dict[str, MethodSpec] = {}


def _register(name: str, label: str, needs_data: bool, description: str):
    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS[name] = MethodSpec(name, label, needs_data, description, fn)
        return fn
    return deco


def _need_x(inputs: LayerInputs, method: str) -> torch.Tensor:
    if inputs.x is None or inputs.x.numel() == 0:
        raise ValueError(f"method {method!r} needs the layer's calibration input sample")
    return inputs.x.float()


def _scales(w: torch.Tensor, inputs: LayerInputs, n_bit: int, group_size: int, zero_point: bool,
            alpha: float | None, n_grid: int, duo_scaling: bool) -> torch.Tensor:
    """AWQ's scales ``[in]``: at ``alpha``, or at the grid search's best alpha when ``alpha`` is None."""
    x = _need_x(inputs, "awq")
    xm = inputs.x_mean.float() if inputs.x_mean is not None else x.abs().mean(0)
    if alpha is None:
        return awq.search_scale(w, x, n_bit=n_bit, group_size=group_size, zero_point=zero_point, n_grid=n_grid,
                                duo_scaling=duo_scaling, x_mean=xm, w_for_mean=inputs.w_shared).scales
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha!r}")
    wm = awq.weight_mean(inputs.w_shared if inputs.w_shared is not None else w, group_size) if duo_scaling else None
    return awq.awq_scales(xm, torch.tensor([float(alpha)], dtype=torch.float64), wm)[0]


@_register("rtn", "RTN", False, "round to nearest on the min/max grid of each group (llm-awq's quantizer)")
def _rtn(w, inputs, *, n_bit, group_size, zero_point):
    return quant.pseudo_quantize(w, n_bit, group_size, zero_point)


@_register("rtn-mse", "RTN + MSE clip", False,
           "RTN with each group's range shrunk (p = 1 - i/100, down to 0.2) to minimise sum |Q(w) - w|^2.4 "
           "(GPTQ's find_params(mse=True)); data-free")
def _rtn_mse(w, inputs, *, n_bit, group_size, zero_point, grid: int = 100, maxshrink: float = 0.8,
             norm: float = 2.4):
    return mse_clip_quantize(w, n_bit, group_size, zero_point, grid=grid, maxshrink=maxshrink, norm=norm)


@_register("awq", "AWQ", True,
           "Q(W s) / s with s = mean|x|^alpha (alpha from the grid search on the calibration sample, or given)")
def _awq(w, inputs, *, n_bit, group_size, zero_point, alpha: float | None = None, n_grid: int = 20,
         duo_scaling: bool = False):
    s = _scales(w, inputs, n_bit, group_size, zero_point, alpha, n_grid, duo_scaling)
    return awq.scaled_fake_quant(w, s, n_bit, group_size, zero_point)


@_register("awq-clip", "AWQ + clip", True,
           "AWQ's scales, then its per-group clip search on the scaled weights (Q/K projections not clipped)")
def _awq_clip(w, inputs, *, n_bit, group_size, zero_point, alpha: float | None = None, n_grid: int = 20,
              duo_scaling: bool = False, clip_qk: bool = False):
    s = _scales(w, inputs, n_bit, group_size, zero_point, alpha, n_grid, duo_scaling)
    if awq.is_clip_skipped(inputs.name) and not clip_qk:
        return awq.scaled_fake_quant(w, s, n_bit, group_size, zero_point)
    ws = w * s.view(1, -1)
    max_val = awq.search_clip(ws, _need_x(inputs, "awq-clip") / s.view(1, -1), n_bit=n_bit, group_size=group_size,
                              zero_point=zero_point)
    return awq.scaled_fake_quant(awq.apply_clip(ws, max_val) / s.view(1, -1), s, n_bit, group_size, zero_point)


def _hessian(inputs: LayerInputs, method: str) -> torch.Tensor:
    if inputs.hessian is not None:
        return inputs.hessian
    x = _need_x(inputs, method)  # no stored Hessian (opted out): the sample's X^T X
    return (x.double().T @ x.double()).float()


@_register("gptq", "GPTQ", True, "GPTQ (column by column with error feedback through the inverse Hessian X^T X)")
def _gptq(w, inputs, *, n_bit, group_size, zero_point, block_size: int = 128, percdamp: float = 0.01,
          static_groups: bool = False, act_order: bool = False):
    return gptq_quantize(w, _hessian(inputs, "gptq"), n_bit=n_bit, group_size=group_size, zero_point=zero_point,
                         block_size=block_size, percdamp=percdamp, act_order=act_order, static_groups=static_groups)


@_register("gptq-act", "GPTQ act-order", True, "GPTQ with columns in order of decreasing Hessian diagonal")
def _gptq_act(w, inputs, *, n_bit, group_size, zero_point, block_size: int = 128, percdamp: float = 0.01,
              static_groups: bool = False):
    return gptq_quantize(w, _hessian(inputs, "gptq-act"), n_bit=n_bit, group_size=group_size, zero_point=zero_point,
                         block_size=block_size, percdamp=percdamp, act_order=True, static_groups=static_groups)


@_register("hqq", "HQQ", False,
           "half-quadratic optimisation of each group's float zero (always asymmetric: HQQ has no symmetric "
           "grid); data-free")
def _hqq(w, inputs, *, n_bit, group_size, zero_point, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
         kappa: float = 1.01, early_stop: bool = True):
    return hqq_quantize(w, n_bit=n_bit, group_size=group_size, iters=iters, lp_norm=lp_norm, beta=beta,
                        kappa=kappa, early_stop=early_stop)


@_register("rotated-rtn", "Rotated RTN", False,
           "RTN of W R with R a seeded random orthogonal (Hadamard-based) rotation, returned as Q(W R) R^T; "
           "deploying it needs the activations rotated at run time (X R)")
def _rotated(w, inputs, *, n_bit, group_size, zero_point, seed: int = 0):
    return rotated_rtn(w, n_bit, group_size, zero_point, seed=seed)


def quantize_layer(method: str, w: torch.Tensor, inputs: LayerInputs | None = None, *, n_bit: int, group_size: int,
                   zero_point: bool = True, **options: Any) -> torch.Tensor:
    """Quantize ``w [out, in]`` with ``method`` -> dequantized ``[out, in]`` float32 (``w`` not modified).

    ``options`` are the method's own settings (e.g. ``alpha`` for AWQ, ``block_size`` for GPTQ); an unknown
    method, option, bit-width or a group size that does not divide ``in`` is a ``ValueError``.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    n_bit = quant.check_bits(n_bit)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError("quantize_layer needs a non-empty 2-D weight [out, in]")
    quant.effective_group_size(w.shape[1], group_size)  # ValueError if it does not divide
    # the raw group size travels on (<= 0: per row), so GPTQ takes its per-row grid before zeroing dead columns
    g = int(group_size) if group_size is not None else 0
    inputs = inputs or LayerInputs()
    try:
        return spec.fn(w.detach().float(), inputs, n_bit=n_bit, group_size=g, zero_point=bool(zero_point), **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"method {method!r} does not take option(s) {sorted(options)}") from None
        raise


def compare(w: torch.Tensor, inputs: LayerInputs, heldout: torch.Tensor | None, *, n_bit: int, group_size: int,
            zero_point: bool = True, alpha: float | None = None, methods: Iterable[str] | None = None,
            best_alpha: float | None = None,
            quantize: Callable[[str, dict], tuple[torch.Tensor, float]] | None = None) -> pd.DataFrame:
    """Every method on one layer: relative output error and SQNR on the calibration sample ``inputs.x`` and on
    ``heldout [rows, in]``, and the seconds each quantization took.

    With ``alpha`` given, AWQ appears twice: at the best alpha (``awq``) and at ``alpha`` (``awq@alpha``).
    ``best_alpha``: the grid search's result when already known (the sweep's), so AWQ and AWQ + clip skip it.
    ``quantize(method, options) -> (w_hat, seconds)``: a memoizing stand-in for ``quantize_layer`` on this layer
    (the Analysis passes one, so a slider release recomputes only what changed; seconds are the first run's).
    Columns: method, label, rel_error, sqnr_db, rel_error_heldout, sqnr_db_heldout, weight_rel_error, seconds.
    """
    names = list(methods) if methods is not None else list(METHODS)
    x = inputs.x.float() if inputs.x is not None else None
    ref = metrics.output_ref_sq(x, w) if x is not None else float("nan")
    ref_h = metrics.output_ref_sq(heldout, w) if heldout is not None else float("nan")
    w_sq = float(w.double().pow(2).sum())
    variants: list[tuple[str, str, str, dict]] = []
    for m in names:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
        known = {"alpha": float(best_alpha)} if best_alpha is not None and m in ("awq", "awq-clip") else {}
        variants.append((m, METHODS[m].label, m, known))
        if m == "awq" and alpha is not None:
            variants.append((f"awq@{float(alpha):g}", f"AWQ (alpha {float(alpha):g})", "awq", {"alpha": float(alpha)}))
    rows = []

    def timed(m: str, opts: dict) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        w_hat = quantize_layer(m, w, inputs, n_bit=n_bit, group_size=group_size, zero_point=zero_point, **opts)
        return w_hat, time.perf_counter() - t0

    for key, label, m, opts in variants:
        w_hat, sec = (quantize or timed)(m, opts)
        dw = w.float() - w_hat
        # ||X dW^T||^2 with the same float64 helper as ||X W^T||^2
        rel = metrics.rel_error(metrics.output_ref_sq(x, dw), ref) if x is not None else float("nan")
        rel_h = metrics.rel_error(metrics.output_ref_sq(heldout, dw), ref_h) if heldout is not None else float("nan")
        rows.append({"method": key, "label": label, "rel_error": rel, "sqnr_db": metrics.sqnr_db(rel),
                     "rel_error_heldout": rel_h, "sqnr_db_heldout": metrics.sqnr_db(rel_h),
                     "weight_rel_error": float(dw.double().pow(2).sum()) / w_sq if w_sq > 0 else float("nan"),
                     "seconds": sec})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# the per-linear methods table of an analysis (an extra cached table), and who wins where
# ------------------------------------------------------------------------------------------------
TABLE = "methods"
TABLE_COLUMNS = ["name", "block", "family", "bits", "group_size", "zero_point", "method", "rel_error", "sqnr_db",
                 "rel_error_heldout", "sqnr_db_heldout", "weight_rel_error", "seconds"]


def methods_table(analysis, *, bits: Iterable[int], group_size: int, zero_point: bool = True,
                  methods: Iterable[str] | None = None, names: Iterable[str] | None = None,
                  progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """Every method on every linear of ``analysis`` (an ``Analysis``) at each of ``bits`` (AWQ at its best alpha).

    ``group_size`` follows the model-wide rule (``core.quant.check_model_group_size``: it must divide every
    linear's width, else ValueError; ``<= 0`` is one group per row).
    Rows: ``TABLE_COLUMNS``. Needs the kept samples (and the Hessians, if the entry has them), not the model's
    forward pass; the weights are read from the model.
    """
    progress = progress or (lambda f, m: None)
    bits = [quant.check_bits(b) for b in bits]
    g = quant.check_model_group_size([int(w) for w in analysis.linears["in_features"]], group_size)
    methods = list(methods) if methods is not None else list(METHODS)
    names = list(names) if names is not None else list(analysis.names)
    rows = []
    total = max(1, len(names) * len(bits))
    for i, n in enumerate(names):
        info = analysis.info(n)
        in_f = int(info["in_features"])
        for j, b in enumerate(bits):
            df = analysis.compare_methods(n, bits=b, group_size=g, zero_point=zero_point, methods=methods,
                                          best_alpha=_sweep_alpha(analysis, n, b, g if g > 0 else in_f, zero_point))
            for r in df.to_dict("records"):
                rows.append({"name": n, "block": int(info["block"]), "family": str(info["family"]), "bits": b,
                             "group_size": g if g > 0 else in_f, "zero_point": bool(zero_point),
                             **{k: r[k] for k in TABLE_COLUMNS[6:]}})
            progress((i * len(bits) + j + 1) / total, f"methods: {n} w{b}")
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _sweep_alpha(analysis, name: str, bits: int, g: int, zero_point: bool) -> float | None:
    """The sweep's best alpha of ``name`` at these settings (the same grid search), or None if it did not run them."""
    sw = analysis.settings.sweep
    if bool(sw.zero_point) != bool(zero_point) or int(sw.n_grid) != 20:
        return None
    lay = analysis.layers
    sel = lay[(lay["name"] == name) & (lay["bits"] == bits) & (lay["group_size"] == g)]
    return float(sel["best_alpha"].iloc[0]) if len(sel) else None


def cached_methods_table(analysis, *, bits: Iterable[int], group_size: int, zero_point: bool = True,
                         compute: bool = True, progress: Callable[[float, str], None] | None = None
                         ) -> pd.DataFrame | None:
    """The analysis' cached methods table at these settings, computing (and caching) the missing bit-widths when
    ``compute``; None when nothing is cached and ``compute`` is False."""
    bits = sorted({quant.check_bits(b) for b in bits})
    old = analysis.read_extra(TABLE)
    have = set()
    if old is not None and len(old):
        mask = (old["zero_point"] == bool(zero_point)) & (old["req_group_size"] == int(group_size)) \
            if "req_group_size" in old else None
        if mask is not None:
            have = set(old.loc[mask, "bits"].astype(int))
    missing = [b for b in bits if b not in have]
    if missing and compute:
        new = methods_table(analysis, bits=missing, group_size=group_size, zero_point=zero_point, progress=progress)
        new["req_group_size"] = int(group_size)
        merged = new if old is None or "req_group_size" not in old else pd.concat([old, new], ignore_index=True)
        analysis.write_extra(TABLE, merged)
        old = merged
    if old is None or "req_group_size" not in old:
        return None
    sel = old[(old["zero_point"] == bool(zero_point)) & (old["req_group_size"] == int(group_size))
              & old["bits"].isin(bits)]
    return sel.reset_index(drop=True) if len(sel) else None


def winners(table: pd.DataFrame, *, by: str = "family", metric: str = "rel_error_heldout") -> pd.DataFrame:
    """Per ``by`` (family or block) and bit-width: the method with the lowest median ``metric``, the runner-up,
    and the margin (runner-up / winner, >= 1)."""
    rows = []
    for (key, b), grp in table.groupby([by, "bits"], sort=True):
        med = grp.groupby("method")[metric].median().sort_values()
        if med.empty:
            continue
        best, second = med.index[0], (med.index[1] if len(med) > 1 else None)
        rows.append({by: key, "bits": int(b), "winner": best, "winner_error": float(med.iloc[0]),
                     "runner_up": second, "runner_up_error": float(med.iloc[1]) if second else float("nan"),
                     "margin": float(med.iloc[1] / med.iloc[0]) if second and med.iloc[0] > 0 else float("nan"),
                     "n_linears": int(grp["name"].nunique())})
    return pd.DataFrame(rows)


def head_to_head(table: pd.DataFrame, a: str = "awq", b: str = "gptq", metric: str = "rel_error_heldout"
                 ) -> pd.DataFrame:
    """Per linear and bit-width: ``error(b) / error(a)`` (> 1: ``a`` wins), with block and family, for a heatmap."""
    p = table[table["method"].isin([a, b])].pivot_table(index=["name", "block", "family", "bits"], columns="method",
                                                        values=metric).reset_index()
    if a not in p or b not in p:
        return pd.DataFrame(columns=["name", "block", "family", "bits", "ratio"])
    p["ratio"] = p[b] / p[a]
    return p[["name", "block", "family", "bits", "ratio"]]


__all__ = ["LayerInputs", "MethodSpec", "METHODS", "quantize_layer", "compare", "methods_table",
           "cached_methods_table", "winners", "head_to_head"]
