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
    "bit_cost": "storage bits per weight: bits + (16-bit scale + 16-bit zero) / group size (no zero when symmetric); "
                "fp16 layers cost 16",
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


FP16_BITS = 16


def bit_cost(bits: int, group_size: int, zero_point: bool = True) -> float:
    """Storage bits per weight of a setting, counted honestly (DESIGN.md section 3).

    ``bits + (16 + 16) / group_size`` with an fp16 scale and an fp16 zero per group (4-bit g128 = 4.25,
    3-bit g64 = 3.5); symmetric (``zero_point=False``) stores no zero: ``bits + 16 / group_size``. ``bits=16``
    means the layer stays fp16 and costs 16. ``group_size`` is the group length actually used (for one group
    per output row pass the row length, ``in_features``).
    """
    if isinstance(bits, bool) or int(bits) != bits:
        raise ValueError(f"bits must be an integer, got {bits!r}")
    b = int(bits)
    if b == FP16_BITS:
        return 16.0
    if not 2 <= b <= 8:
        raise ValueError(f"bits must be 2..8 (or 16 for fp16), got {b}")
    if isinstance(group_size, bool) or int(group_size) != group_size or int(group_size) <= 0:
        raise ValueError(f"group size must be a positive integer (the row length for per-row groups), got {group_size!r}")
    return b + (2 * FP16_BITS if zero_point else FP16_BITS) / int(group_size)


# ------------------------------------------------------------------------------------------------
# whole-model quality of a causal LM (llama.cpp's ``--kl-divergence`` report)
# ------------------------------------------------------------------------------------------------
def token_divergence(ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scored token, from log-probabilities ``[..., vocab]`` of the reference ``p`` and the quantized
    ``q`` model and the actual next tokens ``targets [...]``: ``KL(p || q)`` in nats (float64), whether the
    argmax is unchanged (bool) and ``q[y] - p[y]`` (float64). Shapes ``[...]``."""
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1, dtype=torch.float64)
    same = ref_logp.argmax(-1) == logp.argmax(-1)
    y = targets.unsqueeze(-1)
    dp = logp.gather(-1, y).squeeze(-1).double().exp() - ref_logp.gather(-1, y).squeeze(-1).double().exp()
    return kl, same, dp


def percentile(values: torch.Tensor, fraction: float) -> float:
    """llama.cpp's percentile: sort, then interpolate linearly between ranks ``fraction * (n - 1)``
    (numpy's default ``linear`` method). NaN for no values."""
    v = values.reshape(-1).double().sort().values
    n = v.numel()
    if n == 0:
        return float("nan")
    p = min(max(float(fraction), 0.0), 1.0) * (n - 1)
    i = math.floor(p)
    j = min(i + 1, n - 1)
    return float(v[i] + (p - i) * (v[j] - v[i]))


def perplexity_with_se(ce_sum: float, ce_sq_sum: float, n: int) -> tuple[float, float]:
    """``exp(mean CE)`` and its standard error by the delta method, ``exp(m) * sqrt((E[c^2] - m^2) / (n - 1))``,
    from the sum and the sum of squares of the per-token cross-entropies (llama.cpp's ``log_ppl``)."""
    if n <= 0:
        return float("nan"), float("nan")
    m = ce_sum / n
    ppl = math.exp(m)
    if n < 2:
        return ppl, float("nan")
    var = max(ce_sq_sum / n - m * m, 0.0)
    return ppl, ppl * math.sqrt(var / (n - 1))
