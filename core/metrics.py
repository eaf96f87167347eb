"""One definition of each metric the app shows (listed in the README, section "Metrics").

The UI prints ``DEFINITIONS`` next to the numbers, so the text here is the documentation.
"""
from __future__ import annotations

import math

import torch

DEFINITIONS: dict[str, str] = {
    "mean_abs": "mean |x_j| over all calibration tokens (AWQ's activation scale)",
    "max_abs": "max |x_j| over all calibration tokens",
    "std": "standard deviation of x_j over all calibration tokens (population)",
    "kurtosis": "pooled excess kurtosis of x_j: m4 / m2^2 - 3 over all calibration tokens (0 for a Gaussian)",
    "outlier_ratio": "fraction of calibration tokens with |x_j - mean_j| > 6 std_j",
    "importance": "I_j = mean_i |W_ij| * mean_abs_j",
    "top1_share": "share of the total importance held by the top max(1, in // 100) channels",
    "rel_error": "||X (W - W_hat)^T||^2 / ||X W^T||^2 on the kept input sample",
    "sqnr_db": "-10 log10(rel_error)",
    "loss": "official AWQ loss: mean over output elements of (X W_hat^T - X W^T)^2",
    "gain": "RTN rel_error / AWQ rel_error at the same bits and group size (> 1: AWQ helps)",
    "gain_heldout": "the same gain with alpha chosen on calibration tokens and scored on held-out tokens",
}


def importance(w: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
    """``I_j = mean_i |W_ij| * mean_abs_j`` for ``w [out, in]`` -> ``[in]``."""
    return w.float().abs().mean(0) * mean_abs.float()


def top1_share(imp: torch.Tensor) -> float:
    k = max(1, imp.numel() // 100)
    total = float(imp.sum())
    return float(imp.topk(k).values.sum()) / total if total > 0 else float("nan")


def rel_error(sq_err: float | torch.Tensor, ref_sq: float | torch.Tensor) -> float:
    """Relative output error from ``||X dW^T||^2`` and ``||X W^T||^2``."""
    ref = float(ref_sq)
    return float(sq_err) / ref if ref > 0 else float("nan")


def sqnr_db(rel: float) -> float:
    if rel is None or not math.isfinite(rel) or rel < 0:
        return float("nan")
    return float("inf") if rel == 0 else -10.0 * math.log10(rel)


def gain(rtn_rel: float, awq_rel: float) -> float:
    if awq_rel == 0:
        return float("inf") if rtn_rel > 0 else 1.0
    return rtn_rel / awq_rel


def output_ref_sq(x: torch.Tensor, w: torch.Tensor) -> float:
    """``||X W^T||^2`` in float64."""
    return float((x.float() @ w.float().T).double().pow(2).sum())
