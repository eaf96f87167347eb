"""Official AWQ's grouped search (``core.methods.grouped``): one scale per group of linears that share an input,
chosen by the loss of the module that consumes them, block by block, folded into the preceding op.

Model half only: the scale is chosen on a block module's output (the attention or MLP of a Llama block), which
one linear on its own does not have."""
from __future__ import annotations

from dataclasses import dataclass

from ..grids.spec import Options, QuantSpec
from . import grouped
from .base import Method, ModelContext, Progress, Variant, register


@dataclass(frozen=True)
class AWQGroupedOptions(Options):
    """The grouped search runs on the run's search token budget and alpha grid (``ModelContext``); no options of
    its own."""


def model(ctx: ModelContext, spec: QuantSpec, options: AWQGroupedOptions, progress: Progress) -> Variant:
    res = ctx.memo[grouped.SEARCH.name]
    ctx.seconds[("awq-grouped", spec.bits)] = res.scale_seconds[spec.bits]
    return res.plans[spec.bits]


METHOD = register(Method(
    "awq-grouped", "AWQ grouped", "official AWQ's grouped scale search (whole model only)",
    "official AWQ: one scale per group of linears sharing an input, chosen by the loss of the module that consumes "
    "them, block by block, on the search token budget", AWQGroupedOptions, None, model, shared=grouped.SEARCH,
    budget="search", formats=True))
