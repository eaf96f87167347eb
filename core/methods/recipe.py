"""A ``Recipe``: what a whole-model method does to the weights (scales, folds into the preceding op, clips, the
grid), applied to a model in place and undone exactly with ``core.model.blocks.restore``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from . import awq_search as awq
from ..grids.quant import fake_quant
from ..grids.spec import QuantSpec
from ..model.blocks import Snapshot, original_weight
from ..model.linears import set_linear_weight, set_parameter
from ..model.models import LoadedModel

Cells = Sequence[tuple[int, int]]  # (row, col) positions of one ``[out, in]`` weight
Keep = Mapping[str, Cells]  # linear name -> the weights kept unquantized (super weights)


def keep_values(w: torch.Tensor, ref: torch.Tensor, cells: Cells) -> torch.Tensor:
    """A copy of ``w [out, in]`` with the entries at ``cells`` replaced by ``ref``'s, rounded to fp16: the weights
    a deployment stores beside the integer grid in fp16 (the super weights). ``ref`` is in ``w``'s coordinates."""
    out = w.clone()
    if len(cells):
        rows, cols = (torch.tensor(v, dtype=torch.long, device=w.device) for v in zip(*cells))
        out[rows, cols] = ref[rows, cols].to(torch.float16).to(out.dtype)
    return out


@dataclass
class Recipe:
    """Fake quantization of a model's block linears.

    For each linear ``W`` (``[out, in]``, float32 arithmetic): ``W' = W * col[s]`` (if scaled), its last
    ``len(t)`` output rows divided by ``row[t]`` (fc->fc fold), clamped per (row, group) to ``clip``, then
    ``Q(W')`` when ``bits`` is set, then divided by ``s`` again for linears in ``unscale`` (the unfolded
    ``Q(W*s)/s``). Norms in ``norm`` get weight and bias divided by their ``s``; the bias of a linear in
    ``row`` is divided by ``t``. ``bits=None``: no quantization (only the scaling/folding). ``keep``: per linear, the
    ``(row, col)`` weights written back after quantization with their unquantized value in the recipe's own
    coordinates (``W'`` before clipping, fp16-rounded; unscaled with the rest), so a kept weight leaves the
    model in fp16 whatever the method scaled or folded. ``format``: a llama.cpp type (``QuantSpec.format``; then
    ``bits``, ``group_size`` and ``zero_point`` are that type's): ``Q`` is its quantizer. ``rounded``: per linear,
    the weight ``[out, in]`` a method rounded itself in the recipe's coordinates (GPTQ on ``W'``: awq-gptq), taken
    instead of ``Q(W')``; ``grids``: its integer grid ``(scale, zero) [out, n_groups]`` (``core.methods.base.
    GridWeights.params``' convention) where it has one, so an exporter writes the method's own codes.
    """

    bits: int | None
    group_size: int
    zero_point: bool = True
    col: dict[str, torch.Tensor] = field(default_factory=dict)
    unscale: set[str] = field(default_factory=set)
    row: dict[str, torch.Tensor] = field(default_factory=dict)
    norm: dict[str, torch.Tensor] = field(default_factory=dict)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)
    keep: dict[str, Cells] = field(default_factory=dict)
    format: str | None = None
    rounded: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def on(cls, spec: QuantSpec) -> "Recipe":
        """An empty recipe (no scales, folds or clips) quantizing on ``spec``'s grid."""
        return cls(bits=spec.bits, group_size=spec.group_size, zero_point=spec.zero_point, format=spec.format)

    @property
    def spec(self) -> QuantSpec | None:
        """The grid ``Q`` puts the weights on (None when ``bits`` is None: no quantization)."""
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.zero_point, self.format)

    def prequant(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The scaled (and row-folded) weight before clipping and quantization."""
        w = w.float()
        if name in self.col:
            w = w * self.col[name].to(w.device, torch.float32).view(1, -1)
        if name in self.row:
            t = self.row[name].to(w.device, torch.float32)
            w = w.clone()
            w[-t.numel():] = w[-t.numel():] / t.view(-1, 1)
        return w

    def final(self, name: str, w: torch.Tensor) -> torch.Tensor:
        w = ref = self.prequant(name, w)
        if name in self.clip:
            w = awq.apply_clip(w, self.clip[name].to(w.device))
        if name in self.rounded:
            w = self.rounded[name].to(w.device, torch.float32)
        elif self.bits is not None:
            w = fake_quant(w, self.spec)
        if self.keep.get(name):
            w = keep_values(w, ref, self.keep[name])
        if name in self.unscale:
            w = w / self.col[name].to(w.device, torch.float32).view(1, -1)
        return w


def check_keep(lm: LoadedModel, keep: Keep | None) -> dict[str, list[tuple[int, int]]]:
    """``keep`` checked against ``lm``: every name a quantizable linear, every ``(row, col)`` inside its ``[out, in]``
    weight (ValueError with one sentence otherwise); ``{}`` for None."""
    out: dict[str, list[tuple[int, int]]] = {}
    info = {li.name: li for li in lm.linears}
    for name, cells in (keep or {}).items():
        li = info.get(name)
        if li is None:
            raise ValueError(f"cannot keep weights of {name!r}: it is not a quantizable linear of this model")
        out[name] = []
        for r, c in cells:
            if not (0 <= int(r) < li.out_features and 0 <= int(c) < li.in_features):
                raise ValueError(f"cannot keep weight [{r}, {c}] of {name}: its weight is "
                                 f"[{li.out_features}, {li.in_features}] ([out, in])")
            out[name].append((int(r), int(c)))
    return out


def with_keep(recipe: Recipe, keep: Keep) -> Recipe:
    """``recipe`` that also keeps the weights of ``keep`` unquantized (added to its own)."""
    merged = {n: [*recipe.keep.get(n, ()), *keep.get(n, ())] for n in {*recipe.keep, *keep}}
    return dataclasses.replace(recipe, keep=merged)


def add_group(recipe: Recipe, group: Any, scales: torch.Tensor, fold: bool = True) -> None:
    """Record one group's scales in ``recipe`` (``group``: a ``core.methods.grouped.ScaleGroup``): folded into its preceding op when it has one and ``fold``."""
    s = scales.detach().float().cpu()
    for n in group.linears:
        recipe.col[n] = s
    if fold and group.prev_kind == "norm":
        recipe.norm[group.prev] = s
    elif fold and group.prev_kind == "linear":
        recipe.row[group.prev] = s
    else:
        recipe.unscale.update(group.linears)


def folded_params(lm: LoadedModel, recipe: Recipe, snap: Snapshot, names: list[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The parameters ``recipe``'s folds change besides the linears' weights, by name: each norm's weight and bias
    divided by its ``s``, and the bias of each linear in ``row`` (of ``names``) divided by its ``t`` (in the
    parameters' dtype, from the snapshot)."""
    names = [li.name for li in lm.linears] if names is None else names
    params = dict(lm.model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for n in names:
        key = f"{n}.bias"
        if n in recipe.row and key in params:
            t = recipe.row[n].float().cpu()
            b = snap[key].float().clone()
            b[-t.numel():] = b[-t.numel():] / t
            out[key] = b.to(params[key].dtype)
    for n, s in recipe.norm.items():
        s = s.float().cpu()
        for p in ("weight", "bias"):
            key = f"{n}.{p}"
            if key in params:
                out[key] = (snap[key].float() / s).to(params[key].dtype)
    return out


def apply_recipe(lm: LoadedModel, recipe: Recipe, snap: Snapshot, names: list[str] | None = None) -> None:
    """Write ``recipe``'s weights into the model (in place). Undo with :func:`restore`."""
    names = [li.name for li in lm.linears] if names is None else names
    s = lm.streamer
    if s is not None:  # streamed: a layer that applies the recipe to each block as it is read
        s.push(_recipe_layer(lm, recipe, names))
        return
    with torch.no_grad():
        for n in names:
            m = lm.model.get_submodule(n)
            set_linear_weight(m, recipe.final(n, original_weight(lm, snap, n).to(m.weight.device)))
        for key, v in folded_params(lm, recipe, snap, names).items():
            set_parameter(lm.model, key, v)


def _recipe_layer(lm: LoadedModel, recipe: Recipe, names: list[str]) -> Any:
    """``recipe`` as a ``core.model.stream.Transform``: the same arithmetic as :func:`apply_recipe` on the value
    below it (the snapshot's, when the recipe is applied to the model it was searched on)."""
    from ..model.stream import Transform

    info = {li.name: li for li in lm.linears}
    fold = {}  # parameter -> (kind, s): biases of row-folded linears, norms' weights and biases
    for n in names:
        if n in recipe.row:
            fold[f"{n}.bias"] = ("row", recipe.row[n].float().cpu())
    for n, sc in recipe.norm.items():
        for p in ("weight", "bias"):
            fold[f"{n}.{p}"] = ("norm", sc.float().cpu())
    weights = {f"{n}.weight": n for n in names}

    def fn(key: str, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        if key in weights:
            n = weights[key]
            w = v.T if info[n].transposed else v
            out = recipe.final(n, w.float().to(lm.device)).to(dtype)
            return out.T if info[n].transposed else out
        kind, sc = fold[key]
        if kind == "row":
            b = v.float().cpu().clone()
            b[-sc.numel():] = b[-sc.numel():] / sc
            return b.to(dtype)
        return (v.float().cpu() / sc).to(dtype)
    return Transform(set(weights) | set(fold), fn)


def with_clip(recipe: Recipe, clip: dict[str, torch.Tensor]) -> Recipe:
    return dataclasses.replace(recipe, col=dict(recipe.col), unscale=set(recipe.unscale), row=dict(recipe.row),
                               norm=dict(recipe.norm), clip=dict(clip), keep=dict(recipe.keep))
