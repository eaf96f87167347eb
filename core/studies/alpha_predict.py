"""Can a layer's best AWQ alpha be predicted from cheap statistics instead of searched?

Features per linear (from the analysis' tables, plus one pass over its weight):
``kurtosis`` (log1p of the mean pooled excess kurtosis of its input channels), ``outlier_ratio`` (mean over
channels of the share of tokens beyond 6 std), ``max_over_median`` (log of max / median mean|x|),
``weight_spread`` (log of max |W| / mean |W|). A predictor is a least-squares line (or plane, for
``all``) from features to the searched best alpha, clipped to the grid and snapped to its nearest point.

Held-out protocol: leave one block out (fit on the other blocks' linears, predict this block's), so a
layer's own search result never informs its prediction. Score: the share of the search's held-out gain
the predicted alpha keeps, ``sum(rtn - pred) / sum(rtn - best)`` over all linears, with errors measured on
the kept held-out tokens (1 = as good as the search, 0 = no better than RTN, < 0 worse than RTN). A
constant alpha fitted the same way is the baseline a statistic has to beat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..methods.awq_search import alpha_grid

FEATURES = ("kurtosis", "outlier_ratio", "max_over_median", "weight_spread")


def features(analysis, bits: int) -> pd.DataFrame:
    """One row per linear: ``name, block, family, best_alpha`` (the sweep's, at ``bits``) and the features."""
    lay = analysis.layers[analysis.layers["bits"] == int(bits)]
    if lay.empty:
        raise ValueError(f"the analysis has no sweep at {bits} bits")
    ch = analysis.channels.groupby("input_key")["outlier_ratio"].mean()
    rows = []
    for r in lay.itertuples(index=False):
        w = analysis.weight(str(r.name)).abs()
        rows.append({
            "name": str(r.name), "block": int(r.block), "family": str(r.family), "best_alpha": float(r.best_alpha),
            "kurtosis": math.log1p(max(0.0, float(r.mean_kurtosis))),
            "outlier_ratio": float(ch.get(r.input_key, 0.0)),
            "max_over_median": math.log(max(1e-12, float(r.mean_abs_max_over_median))),
            "weight_spread": math.log(float(w.max()) / max(1e-12, float(w.mean()))),
        })
    return pd.DataFrame(rows)


def fit_line(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients ``[intercept, slopes...]`` of ``y ~ x`` (``x`` [n, d], d may be 0)."""
    a = np.column_stack([np.ones(len(y)), x]) if x.size else np.ones((len(y), 1))
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coef


def predict_line(coef: np.ndarray, x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    a = np.column_stack([np.ones(len(x)), x]) if x.size else np.ones((len(x), 1))
    p = np.clip(a @ coef, grid.min(), grid.max())
    return grid[np.abs(p[:, None] - grid[None, :]).argmin(1)]  # snap to the searched grid


def leave_one_block_out(df: pd.DataFrame, cols: tuple[str, ...], grid: np.ndarray) -> np.ndarray:
    """Predicted alpha of every row, each from a fit on the other blocks only."""
    pred = np.empty(len(df))
    x = df[list(cols)].to_numpy(dtype=float) if cols else np.empty((len(df), 0))
    y = df["best_alpha"].to_numpy(dtype=float)
    blocks = df["block"].to_numpy()
    for b in np.unique(blocks):
        test = blocks == b
        train = ~test if (~test).any() else test
        coef = fit_line(x[train], y[train])
        pred[test] = predict_line(coef, x[test], grid)
    return pred


@dataclass(frozen=True)
class AlphaStudy:
    """``table``: one row per predictor (``predictor, kept_gain, mae_alpha, corr``) best first;
    ``layers``: per linear the searched and each predictor's alpha with its held-out error."""

    bits: int
    table: pd.DataFrame
    layers: pd.DataFrame

    @property
    def best(self) -> str:
        return str(self.table.iloc[0]["predictor"])


def study(analysis, bits: int) -> AlphaStudy:
    """Fit each predictor leave-one-block-out and score the gain it keeps on held-out tokens."""

    df = features(analysis, bits)
    grid = alpha_grid(int(analysis.settings.sweep.n_grid)).numpy().astype(float)
    lay = analysis.layers[analysis.layers["bits"] == int(bits)].set_index("name")
    zp = bool(analysis.settings.sweep.zero_point)
    preds = {"constant": ("",), **{f: (f,) for f in FEATURES}, "all": FEATURES}
    memo: dict[tuple[str, float], float] = {}

    def heldout_err(name: str, alpha: float) -> float:
        key = (name, round(float(alpha), 6))
        if key not in memo:
            memo[key] = analysis.awq_errors(name, alpha=float(alpha), bits=int(bits),
                                            group_size=int(lay.loc[name, "group_size"]),
                                            zero_point=zp, splits=("heldout",))[1][0]
        return memo[key]

    rtn = lay.loc[df["name"], "rtn_rel_heldout"].to_numpy(dtype=float)
    best = np.array([heldout_err(n, a) for n, a in zip(df["name"], df["best_alpha"])])
    search_gain = float(np.sum(rtn - best))
    rows, per = [], df[["name", "block", "family", "best_alpha"]].copy()
    per["rtn_heldout"], per["search_heldout"] = rtn, best
    for label, cols in preds.items():
        cols = tuple(c for c in cols if c)
        p = leave_one_block_out(df, cols, grid)
        err = np.array([heldout_err(n, a) for n, a in zip(df["name"], p)])
        per[f"alpha_{label}"], per[f"heldout_{label}"] = p, err
        kept = float(np.sum(rtn - err)) / search_gain if search_gain > 0 else float("nan")
        y = df["best_alpha"].to_numpy(dtype=float)
        corr = float(np.corrcoef(df[cols[0]], y)[0, 1]) if len(cols) == 1 and np.std(df[cols[0]]) > 0 \
            and np.std(y) > 0 else float("nan")
        rows.append({"predictor": label, "kept_gain": kept, "mae_alpha": float(np.mean(np.abs(p - y))),
                     "corr": corr})
    table = pd.DataFrame(rows).sort_values("kept_gain", ascending=False, kind="stable").reset_index(drop=True)
    return AlphaStudy(bits=int(bits), table=table, layers=per)
