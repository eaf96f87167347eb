"""AWQ with one scale search per linear: ``Q(W s) / s`` with ``s = mean|x|^alpha``, alpha from the grid search on
the linear's kept calibration sample (or given). The model half applies the layer half to every linear, as the
Layer Lab shows it (the sweep's searches reused where it ran the same settings)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids.spec import Options, QuantSpec
from . import awq_search as awq
from .base import LayerInputs, Method, ModelContext, Progress, Variant, register, search_rows
from .recipe import Recipe


@dataclass(frozen=True)
class AWQOptions(Options):
    """``alpha``: the exponent of ``s = mean|x|^alpha`` (None: the grid search's best); ``n_grid``: the search's
    alpha grid ``i / n_grid``; ``duo_scaling``: AutoAWQ's ``x_mean^a / w_mean^(1-a)``."""

    alpha: float | None = None
    n_grid: int = 20
    duo_scaling: bool = False


def scales(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: AWQOptions) -> torch.Tensor:
    """AWQ's scales ``[in]``: at ``options.alpha``, or at the grid search's best alpha when it is None."""
    x = inputs.sample("awq")
    xm = inputs.x_mean.float() if inputs.x_mean is not None else x.abs().mean(0)
    if options.alpha is None:
        return awq.search_scale(w, x, spec, n_grid=options.n_grid, duo_scaling=options.duo_scaling, x_mean=xm,
                                w_for_mean=inputs.w_shared).scales
    if not 0.0 <= float(options.alpha) <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {options.alpha!r}")
    wm = None
    if options.duo_scaling:
        wm = awq.weight_mean(inputs.w_shared if inputs.w_shared is not None else w, spec.group(w.shape[1]))
    return awq.awq_scales(xm, torch.tensor([float(options.alpha)], dtype=torch.float64), wm)[0]


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: AWQOptions) -> torch.Tensor:
    return awq.scaled_fake_quant(w, scales(w, inputs, spec, options), spec.bits, spec.group_size, spec.zero_point,
                                 format=spec.format)


def per_linear_recipe(ctx: ModelContext, spec: QuantSpec, scales_of: dict[str, torch.Tensor]) -> Recipe:
    """Every block linear as ``Q(W s) / s`` with its own scales."""
    recipe = Recipe.on(spec)
    for li in ctx.lm.linears:
        recipe.col[li.name] = scales_of[li.name].float().cpu()
        recipe.unscale.add(li.name)
    return recipe


def model(ctx: ModelContext, spec: QuantSpec, options: AWQOptions, progress: Progress) -> Variant:
    """Each linear's own best alpha from the layer-local search: the analysis' sweep table when it was run at this
    setting, else ``Analysis.alpha_curve``, which computes the same search (the run's ``n_grid``)."""
    a, lm, bits, g, zp, n_grid = ctx.analysis, ctx.lm, spec.bits, spec.group_size, spec.zero_point, ctx.n_grid
    sw = a.settings.sweep
    layers = a.layers
    sel = layers[layers["bits"] == bits] if "bits" in layers else layers.iloc[0:0]
    width = dict(zip(a.linears["name"], a.linears["in_features"]))
    cached = (not spec.format and bits in tuple(sw.bits) and bool(sw.zero_point) == zp and int(sw.n_grid) == n_grid
              and len(sel) == len(lm.linears)
              and all(int(gs) == (g if g > 0 else int(width[n])) for n, gs in zip(sel["name"], sel["group_size"])))
    found: dict[str, torch.Tensor] = {}
    block_of = {li.name: li.block for li in lm.linears}
    if cached:
        curves = a.curves
        curves = curves[curves["bits"] == bits]
        for n, alpha in zip(sel["name"], sel["best_alpha"]):
            found[n] = a.scales_at(n, float(alpha), group_size=g)
            c = curves[curves["name"] == n]
            al = torch.tensor(c["alpha"].to_numpy())
            ctx.search_rows += search_rows("awq", spec, block_of[n], n, al, torch.tensor(c["loss"].to_numpy()),
                                           int((al - float(alpha)).abs().argmin()))
    else:
        for li in lm.linears:
            if spec.format:  # the same search as Analysis.alpha_curve, on the llama.cpp type's quantizer
                c = awq.search_scale(a.weight(li.name), a.inputs(li.name), spec, n_grid=n_grid, x_mean=a.x_mean(li.name))
            else:
                c = a.alpha_curve(li.name, bits=bits, group_size=g, zero_point=zp, n_grid=n_grid)
            found[li.name] = c.scales
            ctx.search_rows += search_rows("awq", spec, li.block, li.name, c.alphas, c.losses, c.best_index)
    return per_linear_recipe(ctx, spec, found)


METHOD = register(Method(
    "awq", "AWQ", "Q(W s) / s with s = mean|x|^alpha (alpha from the grid search on the calibration sample, or given)",
    "one alpha per linear, chosen layer-locally on the kept calibration sample (mean|x| over all calibration "
    "tokens); W -> Q(W*s)/s", AWQOptions, layer, model, cost=lambda shape: 0.2, formats=True))
