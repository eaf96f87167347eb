"""Public API, a stable import path called by tests outside this repo (DESIGN.md section 2): mobiusml/hqq's
proximal solver. The code lives in ``core.methods.hqq``; this keeps the documented signature."""
from __future__ import annotations

import torch

from .grids.spec import QuantSpec
from .methods import hqq as _hqq


def hqq_quantize(w: torch.Tensor, *, n_bit: int, group_size: int, iters: int = 20, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, early_stop: bool = True) -> torch.Tensor:
    """HQQ of ``w [out, in]`` in groups of ``group_size`` along ``in``; dequantized, shape of ``w``."""
    return _hqq.hqq_quantize(w, QuantSpec(n_bit, group_size), _hqq.HQQOptions(iters, lp_norm, beta, kappa, early_stop))


__all__ = ["hqq_quantize"]
