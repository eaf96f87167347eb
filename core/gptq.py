"""Public API, a stable import path called by tests outside this repo (DESIGN.md section 2): IST-DASLab/gptq's
``fasterquant``. The code lives in ``core.methods.gptq``; this keeps the documented signature."""
from __future__ import annotations

import torch

from .grids.spec import QuantSpec
from .methods import gptq as _gptq


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, n_bit: int, group_size: int, zero_point: bool = True,
                  block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False) -> torch.Tensor:
    """GPTQ of ``w [out, in]`` with ``hessian [in, in]``; dequantized, shape of ``w``; inputs not modified."""
    return _gptq.gptq_quantize(w, hessian, QuantSpec(n_bit, group_size, zero_point),
                               _gptq.GPTQOptions(block_size, percdamp, act_order, static_groups))


__all__ = ["gptq_quantize"]
