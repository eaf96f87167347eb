"""GPTQ with act-order: columns in order of decreasing Hessian diagonal, at both scopes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..grids.spec import Options, QuantSpec
from . import gptq
from .base import LayerInputs, Method, ModelContext, Progress, Variant, register


@dataclass(frozen=True)
class GPTQActOptions(Options):
    """GPTQ's settings with ``act_order`` always on (see ``GPTQOptions``)."""

    block_size: int = 128
    percdamp: float = 0.01
    static_groups: bool = False

    def gptq(self) -> gptq.GPTQOptions:
        return gptq.GPTQOptions(act_order=True, **dataclasses.asdict(self))


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: GPTQActOptions) -> torch.Tensor:
    return gptq.layer(w, inputs, spec, options.gptq())


def model(ctx: ModelContext, spec: QuantSpec, options: GPTQActOptions, progress: Progress) -> Variant:
    return gptq.model(ctx, spec, options.gptq(), progress)


METHOD = register(Method(
    "gptq-act", "GPTQ act-order", "GPTQ with columns in order of decreasing Hessian diagonal",
    "sequential GPTQ (as gptq) with columns in order of decreasing Hessian diagonal", GPTQActOptions, layer, model,
    cost=gptq.sequential_cost, budget="search"))
