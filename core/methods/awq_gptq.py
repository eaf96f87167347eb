"""AWQ's grouped scales, then sequential GPTQ on the scaled weights: ``GPTQ(W s, H_{X/s}) / s``, the function of
folding ``1/s`` into the preceding op (llm-compressor's AWQ-then-GPTQ recipes).

Model half only: its scales come from the grouped search, which scores a block module's output."""
from __future__ import annotations

from dataclasses import dataclass

from ..grids.spec import QuantSpec
from . import gptq, grouped
from .base import Method, ModelContext, Progress, Variant, register


@dataclass(frozen=True)
class AWQGPTQOptions(gptq.GPTQOptions):
    """GPTQ's options (``GPTQOptions``) for the second step."""


def model(ctx: ModelContext, spec: QuantSpec, options: AWQGPTQOptions, progress: Progress) -> Variant:
    res = ctx.memo[grouped.SEARCH.name]
    ctx.seconds[("awq-gptq", spec.bits)] = res.scale_seconds[spec.bits]
    return gptq.sequential_gptq(ctx.lm, ctx.search_blocks(), ctx.snap, spec, options, batch_tokens=ctx.batch_tokens,
                                input_of=ctx.input_of, scales=dict(res.plans[spec.bits].col), progress=progress)


METHOD = register(Method(
    "awq-gptq", "AWQ + GPTQ", "AWQ's grouped scales, then GPTQ on the scaled weights (whole model only)",
    "AWQ's grouped scales, then sequential GPTQ on the scaled weights W*s with the Hessian of X/s (GPTQ(W*s)/s: "
    "the function of folding 1/s into the previous op)", AWQGPTQOptions, None, model, cost=gptq.sequential_cost,
    shared=grouped.SEARCH, budget="search"))
