"""RTN with a per-group MSE clip search: the grid search of IST-DASLab/gptq's ``Quantizer.find_params(mse=True)``.

Each group's range is shrunk by ``p = 1 - i / grid`` for ``i < maxshrink * grid`` (``p = 1`` first: plain RTN)
and the candidate with the smallest ``sum |Q(w) - w|^norm`` over the group wins (strict ``<``: the smaller
shrink on ties). Data-free. The grid is ``core.grids.quant``'s (min and max of the group scaled by ``p``, zero
clamped to the levels; symmetric: ``p * absmax``), not GPTQ's own (which widens the range to include 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import quant
from ..grids.spec import Options, QuantSpec
from .base import LayerInputs, data_free


def _candidate(wg: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, p: float, bits: int,
               zero_point: bool) -> torch.Tensor:
    """``Q(wg)`` on core.quant's grid of the range shrunk by ``p`` (``wg [groups, g]``)."""
    if zero_point:
        max_int = 2**bits - 1
        scale = (p * xmax - p * xmin).clamp(min=1e-5) / max_int
        zero = (-torch.round(p * xmin / scale)).clamp_(0, max_int)
        qp = quant.QParams(scale, zero, 0, max_int)
    else:
        max_int = 2 ** (bits - 1) - 1
        scale = (p * xmax).clamp(min=1e-5) / max_int
        qp = quant.QParams(scale, torch.zeros_like(scale), -(2 ** (bits - 1)), max_int)
    return quant.dequantize(quant.quantize(wg, qp), qp)


def mse_clip_errors(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, *, grid: int = 100,
                    maxshrink: float = 0.8, norm: float = 2.4) -> torch.Tensor:
    """``sum |Q_p(w) - w|^norm`` per candidate and group -> ``[n_candidates, out * in // g]``."""
    bits = quant.check_bits(bits)
    g = quant.effective_group_size(w.shape[-1], group_size)
    wg = w.detach().float().reshape(-1, g)
    xmin, xmax = _range(wg, zero_point)
    n = int(maxshrink * grid)
    if n < 1:
        raise ValueError("maxshrink * grid must be at least 1")
    return torch.stack([(_candidate(wg, xmin, xmax, 1 - i / grid, bits, zero_point) - wg).abs().pow(norm).sum(1)
                        for i in range(n)])


def _range(wg: torch.Tensor, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if zero_point:
        return wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    a = wg.abs().amax(1, keepdim=True)
    return -a, a


def mse_clip_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, *, grid: int = 100,
                      maxshrink: float = 0.8, norm: float = 2.4) -> torch.Tensor:
    """RTN of ``w [out, in]`` with each group's range shrunk to minimise ``sum |Q(w) - w|^norm``; same shape."""
    bits = quant.check_bits(bits)
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError("mse_clip_quantize needs a non-empty weight tensor")
    g = quant.effective_group_size(w.shape[-1], group_size)
    wg = w.detach().float().reshape(-1, g)
    xmin, xmax = _range(wg, zero_point)
    best = torch.full((wg.shape[0],), float("inf"))
    out = torch.empty_like(wg)
    for i in range(int(maxshrink * grid)):
        q = _candidate(wg, xmin, xmax, 1 - i / grid, bits, zero_point)
        err = (q - wg).abs_().pow_(norm).sum(1)  # float32 sums, as the reference
        better = err < best
        if bool(better.any()):
            best = torch.where(better, err, best)
            out[better] = q[better]
    return out.reshape(w.shape)


@dataclass(frozen=True)
class RTNMSEOptions(Options):
    """``grid``: shrink candidates per unit range; ``maxshrink``: the largest shrink tried (0.8: down to 0.2 of
    the range); ``norm``: the exponent of the error ``sum |Q(w) - w|^norm`` (GPTQ's 2.4)."""

    grid: int = 100
    maxshrink: float = 0.8
    norm: float = 2.4


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: RTNMSEOptions) -> torch.Tensor:
    return mse_clip_quantize(w, spec.bits, spec.group_size, spec.zero_point, grid=options.grid,
                             maxshrink=options.maxshrink, norm=options.norm)



METHOD = data_free("rtn-mse", "RTN + MSE clip", RTNMSEOptions, layer,
                   "RTN with each group's range shrunk (p = 1 - i/100, down to 0.2) to minimise sum |Q(w) - w|^2.4 "
                   "(GPTQ's find_params(mse=True)); data-free",
                   "every block linear clipped and rounded on its own as at layer scope (data-free)")
