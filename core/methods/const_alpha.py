"""One alpha for the whole model: ``Q(W s) / s`` on every linear with ``s = mean|x|^alpha`` (mean |x| over all
calibration tokens), the alpha with the lowest model-level loss on the const-alpha token budget (mean next-token
cross-entropy for causal LMs; hidden-state relative error against fp for encoders) over the alpha grid.

Model half only: the alpha is chosen by the whole model's loss, which one linear does not have."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids.spec import Options, QuantSpec
from ..model import score
from ..model.blocks import restore
from . import awq_search as awq
from .awq import per_linear_recipe
from .base import Method, ModelContext, Progress, RunShape, Variant, register, search_rows
from .recipe import apply_recipe


@dataclass(frozen=True)
class ConstAlphaOptions(Options):
    """The search runs on the run's const-alpha token budget and alpha grid (``ModelContext``); no options of its
    own."""


def model(ctx: ModelContext, spec: QuantSpec, options: ConstAlphaOptions, progress: Progress) -> Variant:
    """Each alpha quantizes every linear once and runs the model once over the const-alpha blocks."""
    lm, snap = ctx.lm, ctx.snap
    alphas = awq.alpha_grid(ctx.n_grid)
    by_key: dict[str, torch.Tensor] = {}
    key_of = ctx.input_of
    for li in lm.linears:
        k = key_of.get(li.name, li.name)
        if k not in by_key:
            by_key[k] = awq.awq_scales(ctx.analysis.x_mean(li.name), alphas)  # [A, in], mean|x| of all calib tokens
    batches = score.eval_batches(lm, ctx.const_alpha_blocks(), ctx.batch_tokens)
    steps = len(alphas) + (0 if lm.is_causal else 1)
    ref = None
    if not lm.is_causal:
        ref = [score.output(lm, b) for b in batches]
        progress(1 / steps, "const-alpha: reference")
    losses = torch.empty(len(alphas), dtype=torch.float64)

    def recipe_at(i: int):
        return per_linear_recipe(ctx, spec, {li.name: by_key[key_of.get(li.name, li.name)][i] for li in lm.linears})
    try:
        for i in range(len(alphas)):
            # every linear is rewritten from the snapshot (apply_recipe reads the fp weights from ``snap``), so
            # consecutive alphas need no restore in between: one fake quantization per linear and alpha
            apply_recipe(lm, recipe_at(i), snap)
            s = score.Score(lm.is_causal)
            for j, b in enumerate(batches):
                s.add(b, score.output(lm, b), None if ref is None else ref[j])
            losses[i] = s.ce / max(1, s.n_tok) if lm.is_causal else (s.err / s.ref if s.ref > 0 else float("nan"))
            progress((i + 1 + steps - len(alphas)) / steps,
                     f"const-alpha search w{spec.bits}: alpha {float(alphas[i]):.2f}")
    finally:
        restore(lm, snap)
    best = awq.first_min_index(losses)
    ctx.search_rows += search_rows("const-alpha", spec, -1, "whole model (calibration loss)", alphas, losses, best)
    return recipe_at(best)


def _cost(shape: RunShape) -> float:
    return (shape.n_grid + (0 if shape.causal else 1)) * shape.const_alpha


METHOD = register(Method(
    "const-alpha", "AWQ one alpha", "one alpha for every linear, chosen by the whole model's loss (whole model only)",
    "one alpha for the whole model, chosen by the model's loss on the const-alpha token budget of calibration "
    "text; W -> Q(W*s)/s", ConstAlphaOptions, None, model, cost=_cost, budget="const-alpha"))
