"""AWQ's grouped scales, then sequential GPTQ on the scaled weights: ``GPTQ(W s, H_{X/s})`` with ``1/s`` folded into
the preceding operator (llm-compressor's AWQ-then-GPTQ recipes).

Model half only: its scales come from the grouped search, which scores a block module's output. It returns the
grouped search's ``Recipe`` (the scales and their folds into norms and preceding linears) with GPTQ's weights and
integer grids in the folded coordinates (``Recipe.rounded`` / ``grids``): the model Model quality scores is the one a
file stores (``core.studies.export``). Where a group's scales have no preceding operator (architectures other than
the Llama family: ``Recipe.unscale``) its linears stay ``GPTQ(W s) / s``, which lies on no grid of the model's own
coordinates."""
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
                                input_of=ctx.input_of, recipe=res.plans[spec.bits], specs=ctx.specs,
                                progress=progress)


METHOD = register(Method(
    "awq-gptq", "AWQ + GPTQ", "AWQ's grouped scales, then GPTQ on the scaled weights (whole model only)",
    "AWQ's grouped scales folded into the preceding norms / linears, then sequential GPTQ on the folded weights W*s "
    "with the Hessian of the folded model's input X/s", AWQGPTQOptions, None, model, cost=gptq.sequential_cost,
    shared=grouped.SEARCH, budget="search"))
