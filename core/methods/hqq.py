"""HQQ (Badri & Shaji, "Half-Quadratic Quantization", 2023): data-free, a pure function of ``(w, settings)``.

A transcription of mobiusml/hqq's ``optimize_weights_proximal_legacy`` as it was before its May 2025 memory
refactor (the version that still applies ``beta *= kappa``), on HQQ's own asymmetric initialisation
(``Quantizer.quantize`` with ``axis=1``, ``round_zero=False``), in float32 (DESIGN.md section 2). HQQ keeps
the *inverse* step ``s`` and a float zero ``z``: ``W_q = round(W * s + z)``, ``W ~ (W_q - z) / s``; only the
zero is optimised, by alternating a rounding step with an l_p (p < 1) shrinkage of the weight error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import quant
from ..grids.spec import Options, QuantSpec
from .base import LayerInputs, data_free


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """The generalized soft-thresholding ``sign(x) relu(|x| - |x|^(p-1) / beta)`` (``p == 1``: ``1 / beta``)."""
    if lp_norm == 1:
        return torch.sign(x) * torch.nn.functional.relu(torch.abs(x) - 1.0 / beta)
    return torch.sign(x) * torch.nn.functional.relu(torch.abs(x) - (1.0 / beta) * torch.pow(torch.abs(x), lp_norm - 1))


def init_params(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's initial inverse step and zero of grouped weights ``wg [groups, g]`` (each ``[groups, 1]``)."""
    max_v = 2**bits - 1
    _min = wg.min(dim=1, keepdim=True)[0]
    _max = wg.max(dim=1, keepdim=True)[0]
    denom = _max - _min
    scale = max_v / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale)  # avoid small ranges
    scale = scale.clamp(max=2e4)
    zero = -_min * scale
    return scale, zero


def optimize_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, *, iters: int = 20,
                  lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                  early_stop: bool = True) -> tuple[torch.Tensor, list[float]]:
    """The proximal loop on ``wg [groups, g]``; returns the final zero ``[groups, 1]`` and the error per iteration.

    With ``early_stop`` the loop breaks at the first iteration whose error (mean ``|W - W_r|`` over the whole
    matrix) is not strictly below the best so far; the zero returned is the one updated in that iteration
    (the reference's behaviour, not the best iterate's).
    """
    lo, hi = 0, 2**bits - 1
    best_error = 1e4
    errors: list[float] = []
    for _ in range(int(iters)):
        W_q = torch.round(wg * scale + zero).clamp(lo, hi)
        W_r = (W_q - zero) / scale
        W_e = shrink_lp(wg - W_r, beta, lp_norm)
        zero = torch.mean(W_q - (wg - W_e) * scale, dim=1, keepdim=True)
        beta *= kappa
        current_error = float(torch.abs(wg - W_r).mean())
        errors.append(current_error)
        if current_error < best_error:
            best_error = current_error
        elif early_stop:
            break
    return zero, errors


def dequantize(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """HQQ's final quantization of ``wg`` and its dequantization ``(W_q - z) * (1 / s)``."""
    W_q = torch.round(wg * scale + zero).clamp(0, 2**bits - 1)
    return (W_q - zero) * (1.0 / scale)


@dataclass(frozen=True)
class HQQOptions(Options):
    """HQQ's solver: ``iters`` proximal steps, the ``lp_norm`` of the sparsity-promoting error, ``beta`` and its
    growth ``kappa`` per step; ``early_stop`` at the first step whose error does not improve."""

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    early_stop: bool = True


def hqq_quantize(w: torch.Tensor, spec: QuantSpec, options: HQQOptions = HQQOptions()) -> torch.Tensor:
    """HQQ-quantize ``w [out, in]`` in groups of ``spec.group_size`` along ``in`` (``<= 0``: one group per row); HQQ
    is always asymmetric (``spec.zero_point`` is not used).

    Returns the dequantized weights (float32, shape of ``w``); ``w`` is not modified.
    """
    bits, o = spec.bits, options
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError("hqq_quantize needs a non-empty 2-D weight [out, in]")
    if int(o.iters) < 0:
        raise ValueError(f"iters must be >= 0, got {o.iters!r}")
    if not (0 < o.lp_norm <= 1):
        raise ValueError(f"lp_norm must be in (0, 1], got {o.lp_norm!r}")
    g = quant.effective_group_size(w.shape[1], spec.group_size)
    wg = w.detach().float().reshape(-1, g)
    scale, zero = init_params(wg, bits)
    zero, _ = optimize_zero(wg, scale, zero, bits, iters=o.iters, lp_norm=o.lp_norm, beta=o.beta, kappa=o.kappa,
                            early_stop=o.early_stop)
    return dequantize(wg, scale, zero, bits).reshape(w.shape)


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: HQQOptions) -> torch.Tensor:
    return hqq_quantize(w, spec, options)



METHOD = data_free("hqq", "HQQ", HQQOptions, layer,
                   "half-quadratic optimisation of each group's float zero (always asymmetric: HQQ has no "
                   "symmetric grid); data-free",
                   "HQQ: data-free half-quadratic optimisation of each group's zero (asymmetric)")
