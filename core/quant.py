"""Public API, a stable import path called by tests outside this repo (DESIGN.md section 2). The code lives in
``core.grids.quant``; this keeps the documented signature."""
from __future__ import annotations

import torch

from .grids import quant as _quant


def pseudo_quantize(w: torch.Tensor, n_bit: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """llm-awq's ``pseudo_quantize_tensor`` bit for bit (``zero_point=True``), or the symmetric grid; same shape."""
    return _quant.pseudo_quantize(w, n_bit, group_size, zero_point)


__all__ = ["pseudo_quantize"]
