"""AWQ's scales, then its per-(row, group) clip search on the scaled weights (q/k projections not clipped).

Layer half: the linear's own scale search (as ``awq``), then ``search_clip`` on ``W s`` with the input ``X / s``.
Model half: official AWQ, the grouped search's scales (``awq-grouped``) and its clip search on every block's
carried inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids.spec import QuantSpec
from . import awq, awq_search, grouped
from .base import LayerInputs, Method, ModelContext, Progress, Variant, register
from .recipe import with_clip


@dataclass(frozen=True)
class AWQClipOptions(awq.AWQOptions):
    """``AWQOptions``, and ``clip_qk``: clip the Q/K projections too (official AWQ does not: their outputs meet in
    ``Q K^T``)."""

    clip_qk: bool = False


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: AWQClipOptions) -> torch.Tensor:
    s = awq.scales(w, inputs, spec, options)
    bits, g, zp, fmt = spec.bits, spec.group_size, spec.zero_point, spec.format
    if awq_search.is_clip_skipped(inputs.name) and not options.clip_qk:
        return awq_search.scaled_fake_quant(w, s, bits, g, zp, format=fmt)
    ws = w * s.view(1, -1)
    max_val = awq_search.search_clip(ws, inputs.sample("awq-clip") / s.view(1, -1), spec)
    return awq_search.scaled_fake_quant(awq_search.apply_clip(ws, max_val) / s.view(1, -1), s, bits, g, zp, format=fmt)


def model(ctx: ModelContext, spec: QuantSpec, options: AWQClipOptions, progress: Progress) -> Variant:
    res = ctx.memo[grouped.SEARCH.name]
    ctx.seconds[("awq-clip", spec.bits)] = res.scale_seconds[spec.bits] + res.clip_seconds[spec.bits]
    return with_clip(res.plans[spec.bits], res.clips[spec.bits])


METHOD = register(Method(
    "awq-clip", "AWQ + clip",
    "AWQ's scales, then its per-group clip search on the scaled weights (Q/K projections not clipped)",
    "awq-grouped plus official AWQ's per-group weight clipping search (q/k projections not clipped)",
    AWQClipOptions, layer, model, shared=grouped.SEARCH, budget="search", formats=True))
