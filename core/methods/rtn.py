"""RTN: round to nearest on the min/max grid of each group (llm-awq's quantizer), at both scopes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids.quant import fake_quant
from ..grids.spec import Options, QuantSpec
from .base import LayerInputs, Method, ModelContext, Progress, Variant, register
from .recipe import Recipe


@dataclass(frozen=True)
class RTNOptions(Options):
    """RTN has no options of its own: the grid (``QuantSpec``) is all of it."""


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: RTNOptions) -> torch.Tensor:
    return fake_quant(w, spec)


def model(ctx: ModelContext, spec: QuantSpec, options: RTNOptions, progress: Progress) -> Variant:
    return Recipe.on(spec)


METHOD = register(Method(
    "rtn", "RTN", "round to nearest on the min/max grid of each group (llm-awq's quantizer)",
    "round-to-nearest: every block linear W -> Q(W)", RTNOptions, layer, model, needs_data=False, formats=True))
