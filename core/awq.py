"""Public API, a stable import path called by tests outside this repo (DESIGN.md section 2): official llm-awq
semantics. The code lives in ``core.methods.awq_search``; these keep the documented signatures."""
from __future__ import annotations

import torch

from .grids.spec import QuantSpec
from .methods import awq_search as _awq
from .methods.awq_search import ScaleSearch


def search_scale(w: torch.Tensor, x: torch.Tensor, *, n_bit: int, group_size: int, zero_point: bool = True,
                 n_grid: int = 20, duo_scaling: bool = False) -> ScaleSearch:
    """AWQ's grid search of ``s = mean|x|^alpha`` for ``w [out, in]`` on ``x [tokens, in]``."""
    return _awq.search_scale(w, x, QuantSpec(n_bit, group_size, zero_point), n_grid=n_grid, duo_scaling=duo_scaling)


def search_clip(w: torch.Tensor, x: torch.Tensor, *, n_bit: int, group_size: int, zero_point: bool = True,
                n_grid: int = 20, max_shrink: float = 0.5, n_sample_token: int = 512) -> torch.Tensor:
    """Official ``auto_clip_layer``: the per-(row, group) clip value ``[out, in // group]``."""
    return _awq.search_clip(w, x, QuantSpec(n_bit, group_size, zero_point),
                            _awq.ClipSearch(n_grid=n_grid, max_shrink=max_shrink, n_sample_token=n_sample_token))


__all__ = ["search_scale", "search_clip", "ScaleSearch"]
