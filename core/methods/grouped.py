"""Official AWQ's grouped search: scale groups and the grouped scale and clip searches (llm-awq semantics),
block by block on carried block inputs (``core.model.blocks``); results are ``Recipe``s (``core.methods.recipe``).

Official AWQ (``awq/quantize/auto_scale.py``) searches one scale vector per group of linears that read the
same input, block by block on full-precision inputs, and scores it on the module that consumes them:

* Llama / Qwen2 / Mistral / Qwen3 blocks: ``input_layernorm -> q,k,v`` scored on the ``self_attn`` output;
  ``v_proj -> o_proj`` scored on ``o_proj`` (skipped when ``v_proj`` and ``o_proj`` weight shapes differ,
  i.e. grouped-query attention, llm-awq PR 67); ``post_attention_layernorm -> gate,up`` scored on the
  ``mlp`` output; ``up_proj -> down_proj`` scored on ``down_proj``. The scales are folded as official
  ``apply_scale`` does: the norm's weight (and bias) divided by ``s``, the preceding linear's output rows
  (and bias) divided by ``s``, the group's weights multiplied by ``s``; then every block linear is
  quantized (``Q(W')``).
* Any other architecture: one group per set of linears that read the same tensor (BERT/OPT ``q,k,v``;
  GPT-2 ``c_attn``; each other linear alone), scored by the MSE of their concatenated outputs
  (``X @ [W1; W2; ...]^T``), and applied without folding as ``Q(W * s) / s``. In exact arithmetic this is
  the same function as a fold; it needs no knowledge of the preceding op (GELU, residual, ...).

The official loss is the mean over output elements of ``(out_fp - out_q)^2`` on *all* calibration
tokens. For a single-linear (or concatenated) group we compute ``||X D^T||^2`` through the float64 Gram
matrix ``X^T X`` when there are more tokens than input channels (same value, far fewer flops, better
precision than float32); a module-scored group is run through its module for each alpha.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import awq_search as awq
from .base import ModelContext, RunShape, SharedSearch, search_rows
from .recipe import Recipe, add_group
from ..grids.spec import QuantSpec
from ..model.blocks import BlockInputs, Snapshot, block_name, capture_block, first_output, hold, original_weight
from ..model.linears import find_blocks, set_linear_weight
from ..model.models import LoadedModel

Progress = Callable[[float, str], None]

# Model types whose decoder blocks follow Llama's layout (official AWQ handles Llama and Qwen2 with the
# same four groups; Mistral and Qwen3 blocks are the same up to q/k norms inside attention).
LLAMA_TYPES = frozenset({"llama", "qwen2", "mistral", "qwen3"})
LLAMA_LINEARS = frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_CHUNK_ELEMENTS = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleGroup:
    """One scale vector shared by ``linears`` (full module names, in block order).

    ``prev``/``prev_kind``: the op the scales are folded into (``norm`` or ``linear``), or ``None`` when the
    group is applied as ``Q(W*s)/s``. ``inspect``: the module whose output scores a candidate scale;
    ``None`` means the concatenated outputs of ``linears``.
    """

    block: int
    linears: tuple[str, ...]
    prev: str | None = None
    prev_kind: str | None = None
    inspect: str | None = None

    def label(self, prefix: str) -> str:
        """E.g. ``block 0: input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj [self_attn]``."""
        p = block_name(prefix, self.block) + "."
        rel = lambda n: n[len(p):] if n.startswith(p) else n  # noqa: E731
        head = f"{rel(self.prev)} -> " if self.prev else ""
        tail = f" [scored on {rel(self.inspect)}]" if self.inspect else ""
        return f"block {self.block}: {head}{', '.join(rel(n) for n in self.linears)}{tail}"


@dataclass(frozen=True)
class Grouping:
    """How a model's linears are grouped for grouped AWQ. ``kind``: ``llama`` or ``shared-input``."""

    kind: str
    block_class: str
    prefix: str
    groups: tuple[ScaleGroup, ...]
    skipped: tuple[str, ...] = ()  # human-readable notes on groups official AWQ leaves out (GQA v->o)

    def of_block(self, i: int) -> list[ScaleGroup]:
        return [g for g in self.groups if g.block == i]


def is_llama_like(model_type: str, rel_linears: set[str] | frozenset[str]) -> bool:
    return model_type in LLAMA_TYPES and set(rel_linears) == LLAMA_LINEARS


def build_grouping(lm: LoadedModel, input_of: dict[str, str]) -> Grouping:
    """The scale groups of ``lm``. ``input_of`` maps each linear to the first linear reading the same tensor
    (the ``input_key`` of the analysis' ``linears`` table); only the generic path needs it."""
    prefix, blocks = find_blocks(lm.model)
    model_type = str(getattr(getattr(lm.model, "config", None), "model_type", "") or "")
    by_block: dict[int, list[str]] = {}
    for li in lm.linears:
        by_block.setdefault(li.block, []).append(li.name)
    rel0 = {n[len(block_name(prefix, 0)) + 1:] for n in by_block.get(0, [])}
    groups: list[ScaleGroup] = []
    skipped: list[str] = []
    if is_llama_like(model_type, rel0) and all(hasattr(blocks[0], n) for n in LLAMA_NORMS):
        for i in range(len(blocks)):
            p = block_name(prefix, i)
            attn, mlp = f"{p}.self_attn", f"{p}.mlp"
            groups.append(ScaleGroup(i, (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
                                     f"{p}.input_layernorm", "norm", attn))
            v, o = lm.model.get_submodule(f"{attn}.v_proj"), lm.model.get_submodule(f"{attn}.o_proj")
            if tuple(v.weight.shape) == tuple(o.weight.shape):
                groups.append(ScaleGroup(i, (f"{attn}.o_proj",), f"{attn}.v_proj", "linear", None))
            else:
                skipped.append(f"block {i}: v_proj -> o_proj skipped (weight shapes {tuple(v.weight.shape)} and "
                               f"{tuple(o.weight.shape)} differ: grouped-query attention)")
            groups.append(ScaleGroup(i, (f"{mlp}.gate_proj", f"{mlp}.up_proj"),
                                     f"{p}.post_attention_layernorm", "norm", mlp))
            groups.append(ScaleGroup(i, (f"{mlp}.down_proj",), f"{mlp}.up_proj", "linear", None))
        return Grouping("llama", type(blocks[0]).__name__, prefix, tuple(groups), tuple(skipped))
    for i in sorted(by_block):
        seen: dict[str, list[str]] = {}
        for n in by_block[i]:
            seen.setdefault(input_of.get(n, n), []).append(n)
        groups.extend(ScaleGroup(i, tuple(ns)) for ns in seen.values())
    return Grouping("shared-input", type(blocks[0]).__name__, prefix, tuple(groups), ())


# ------------------------------------------------------------------------------------------------
# searches
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSearch(awq.ScaleSearch):
    """The alpha grid search of one group at one setting (``best_alpha``, ``rtn_loss`` ... as ``ScaleSearch``:
    ``losses[0]``, alpha 0 with every s = 1, is RTN's loss)."""

    group: ScaleGroup | None = None
    bits: int = 0


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64, accumulated in row chunks."""
    x = x.reshape(-1, x.shape[-1])
    g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    for i in range(0, x.shape[0], step):
        xc = x[i:i + step].double()
        g += xc.T @ xc
    return g


def linear_losses(w: torch.Tensor, x: torch.Tensor | None, scales: torch.Tensor, *, bits: int, group_size: int,
                  zero_point: bool, gram_matrix: torch.Tensor | None = None, n_tokens: int | None = None,
                  format: str | None = None) -> torch.Tensor:
    """Official loss of ``Q(W*s)/s`` for each row of ``scales [A, in]``: mean over tokens and outputs of
    ``(X (Q(W*s)/s - W)^T)^2``, from ``x`` directly or from its Gram matrix (then give ``n_tokens``).
    ``format``: a llama.cpp type (``Q`` is its quantizer; see ``awq_search.scaled_fake_quant``)."""
    w = w.float()
    if gram_matrix is None:
        return awq.scale_sq_errors(w, x.float(), scales, bits, group_size, zero_point,
                                   format=format) / (x.shape[0] * w.shape[0])
    out = []
    step = max(1, min(scales.shape[0], _CHUNK_ELEMENTS // max(1, w.numel())))
    for i in range(0, scales.shape[0], step):
        d = (awq.scaled_fake_quant(w, scales[i:i + step], bits, group_size, zero_point, format=format) - w).double()
        out.append(((d @ gram_matrix) * d).sum(dim=(1, 2)))
    return torch.cat(out) / (int(n_tokens) * w.shape[0])


def module_losses(lm: LoadedModel, group: ScaleGroup, calls: list[tuple[tuple, dict]], weights: dict[str, torch.Tensor],
                  scales: torch.Tensor, *, bits: int, group_size: int, zero_point: bool,
                  ref: list[torch.Tensor] | None = None, format: str | None = None) -> torch.Tensor:
    """Official ``_search_module_scale``: for each candidate ``s``, the group's linears become ``Q(W*s)/s``
    and the mean squared difference of ``group.inspect``'s output (all calibration tokens) is the loss.
    ``ref``: the module's fp outputs on ``calls`` when already computed (:func:`module_reference`); ``format``: a
    llama.cpp type (``Q`` is its quantizer).
    The linears are restored from ``weights`` afterwards (also on error)."""
    module = lm.model.get_submodule(group.inspect)
    mods = [lm.model.get_submodule(n) for n in group.linears]
    losses = torch.empty(scales.shape[0], dtype=torch.float64)
    with torch.no_grad():
        if ref is None:
            ref = module_reference(lm, group, calls)
        n_el = sum(r.numel() for r in ref)
        try:
            for i in range(scales.shape[0]):
                for n, m in zip(group.linears, mods):
                    set_linear_weight(m, awq.scaled_fake_quant(weights[n], scales[i], bits, group_size, zero_point,
                                                               format=format))
                se = torch.zeros((), dtype=torch.float64)
                for (a, k), r in zip(calls, ref):
                    se += (r - first_output(module(*a, **k))).float().pow(2).sum(dtype=torch.float64).cpu()
                losses[i] = se / n_el
        finally:
            for n, m in zip(group.linears, mods):
                set_linear_weight(m, weights[n])
    return losses


def module_reference(lm: LoadedModel, group: ScaleGroup, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The fp outputs of ``group.inspect`` on its captured ``calls`` (shared by every bit-width's search)."""
    module = lm.model.get_submodule(group.inspect)
    with torch.no_grad():
        return [first_output(module(*a, **k)) for a, k in calls]


@dataclass
class GroupedResult:
    """Grouped search results per bit-width: the searches, the plans (scales only) and, with clipping,
    the per-linear clip values. ``seconds``: time of the shared capture + scale search, and of the clip search."""

    grouping: Grouping
    searches: dict[int, list[GroupSearch]]
    plans: dict[int, Recipe]
    clips: dict[int, dict[str, torch.Tensor]]
    scale_seconds: dict[int, float]
    clip_seconds: dict[int, float]


def search_grouped(lm: LoadedModel, grouping: Grouping, calib: torch.Tensor, snap: Snapshot, *, bits: list[int],
                   group_size: int, zero_point: bool = True, n_grid: int = 20, clip: bool = False,
                   clip_qk: bool = False, batch_tokens: int = 4096, input_of: dict[str, str] | None = None,
                   progress: Progress | None = None, cache_inputs: bool = True,
                   format: str | None = None) -> GroupedResult:
    """Official grouped AWQ search on ``calib [n, seqlen]`` blocks, one block at a time on full-precision
    inputs (as ``run_awq`` does: scales never change the full-precision function, so block inputs are
    those of the unmodified model). The model must be unmodified (``snap`` holds its weights).

    Work: one forward pass of the blocks to capture their inputs (``BlockInputs``; ``cache_inputs=False``
    recaptures each block through the whole model instead, the straightforward path, same values), then per
    bit-width and group one run of the scoring module per alpha (its fp output computed once for all
    bit-widths). ``format``: a llama.cpp type; each bit-width's grid is then the type of its family at that width
    (``QuantSpec.grid``), ``group_size`` and ``zero_point`` being the type's own."""
    progress = progress or (lambda f, m: None)
    _, blocks = find_blocks(lm.model)
    n_blocks = len(blocks)
    alphas = awq.alpha_grid(n_grid)
    input_of = dict(input_of or {})
    searches: dict[int, list[GroupSearch]] = {b: [] for b in bits}
    specs = {b: QuantSpec.grid(b, group_size, zero_point, format) for b in bits}
    plans = {b: Recipe.on(specs[b]) for b in bits}
    clips: dict[int, dict[str, torch.Tensor]] = {b: {} for b in bits}
    t_scale = {b: 0.0 for b in bits}
    t_clip = {b: 0.0 for b in bits}
    names_of = {i: [li.name for li in lm.linears if li.block == i] for i in range(n_blocks)}
    dev = lm.device
    inputs = BlockInputs(lm, calib, batch_tokens=batch_tokens) if cache_inputs else None
    for i in range(n_blocks):
        with hold(lm, i):  # streamed: block i read once for its capture, searches and clips
            _search_block(lm, i, grouping, inputs, calib, snap, bits, specs, alphas, input_of, names_of, searches,
                          plans, clips, t_scale, t_clip, dev, batch_tokens, clip, clip_qk, progress, n_blocks)
    return GroupedResult(grouping, searches, plans, clips, t_scale, t_clip)


def _search_block(lm, i, grouping, inputs, calib, snap, bits, specs, alphas, input_of, names_of, searches, plans,
                  clips, t_scale, t_clip, dev, batch_tokens, clip, clip_qk, progress, n_blocks) -> None:
    """Block ``i`` of :func:`search_grouped` (its loop body; the results go into the dicts passed in)."""
    groups = grouping.of_block(i)
    t0 = time.perf_counter()
    key_of = {}
    for g in groups:  # each group reads one tensor: capture it once, via its first linear
        for n in g.linears:
            key_of[n] = g.linears[0]
    for n in names_of[i]:
        key_of.setdefault(n, input_of.get(n, n))
    want = dict(linears=set(key_of.values()), modules={g.inspect for g in groups if g.inspect})
    if inputs is not None:
        cap = inputs.capture(i, **want)
    else:
        cap = capture_block(lm, i, calib, batch_tokens=batch_tokens, **want)
    refs = {g.inspect: module_reference(lm, g, cap.calls[g.inspect]) for g in groups if g.inspect}
    t_cap = (time.perf_counter() - t0) / max(1, len(bits))
    weights = {n: original_weight(lm, snap, n).to(dev) for n in names_of[i]}
    grams: dict[str, torch.Tensor] = {}
    for b_i, b in enumerate(bits):
        t1 = time.perf_counter()
        for g in groups:
            x = cap.x[g.linears[0]].float()
            x_mean = x.abs().mean(0)  # official get_act_scale: mean |x| over the group's calibration tokens
            scales = awq.awq_scales(x_mean, alphas)
            if g.inspect:
                sp = specs[b]
                losses = module_losses(lm, g, cap.calls[g.inspect], weights, scales, bits=b,
                                       group_size=sp.group_size, zero_point=sp.zero_point, ref=refs[g.inspect],
                                       format=sp.format)
            else:
                w = torch.cat([weights[n] for n in g.linears])
                if x.shape[0] > 2 * x.shape[1]:
                    if g.linears[0] not in grams:
                        grams[g.linears[0]] = gram(x)
                    losses = linear_losses(w, None, scales, bits=b, group_size=specs[b].group_size,
                                           zero_point=specs[b].zero_point, gram_matrix=grams[g.linears[0]],
                                           n_tokens=x.shape[0], format=specs[b].format)
                else:
                    losses = linear_losses(w, x, scales, bits=b, group_size=specs[b].group_size,
                                           zero_point=specs[b].zero_point, format=specs[b].format)
            best = awq.first_min_index(losses)
            gs = GroupSearch(alphas=alphas, losses=losses, scales=scales[best].clone(), best_index=best,
                             group=g, bits=b)
            searches[b].append(gs)
            add_group(plans[b], g, gs.scales)
        t_scale[b] += t_cap + time.perf_counter() - t1
        if clip:
            t2 = time.perf_counter()
            prefix = block_name(grouping.prefix, i) + "."
            for n in names_of[i]:
                if not clip_qk and awq.is_clip_skipped(n[len(prefix):]):
                    continue  # official skips q/k: their outputs meet in Q K^T
                x = cap.x[key_of[n]].float()
                if n in plans[b].col:
                    x = x / plans[b].col[n].to(x.device).view(1, -1)  # official apply_scale divides input_feat by s
                # official auto_clip_layer's defaults
                clips[b][n] = awq.search_clip(plans[b].prequant(n, weights[n]), x, specs[b], awq.ClipSearch()).cpu()
            t_clip[b] += time.perf_counter() - t2
        progress((i + (b_i + 1) / len(bits)) / n_blocks, f"grouped AWQ search: block {i + 1}/{n_blocks}, w{b}")
    del cap, grams, refs


# ------------------------------------------------------------------------------------------------
# the search awq-grouped, awq-clip and awq-gptq share in a whole-model run
# ------------------------------------------------------------------------------------------------
def _run(ctx: ModelContext, progress: Progress) -> GroupedResult:
    grouping = build_grouping(ctx.lm, ctx.input_of)
    res = search_grouped(ctx.lm, grouping, ctx.search_blocks(), ctx.snap, bits=list(ctx.bits),
                         group_size=ctx.group_size, zero_point=ctx.zero_point, n_grid=ctx.n_grid,
                         clip="awq-clip" in ctx.methods, batch_tokens=ctx.batch_tokens, input_of=ctx.input_of,
                         progress=progress, format=ctx.format)
    for b in ctx.bits:
        for s in res.searches[b]:
            ctx.search_rows += search_rows("awq-grouped", ctx.spec(b), s.group.block, s.group.label(grouping.prefix),
                                           s.alphas, s.losses, s.best_index)
    return res


def _cost(shape: RunShape) -> float:
    """One pass of the blocks to capture their inputs, then per bit-width every block's scoring modules once per
    alpha (about one pass of the blocks each); the clip search (official: 10 candidates on at most 512 sampled
    tokens, scored through each group's Gram matrix: ``awq_search.clip_errors``) measured about 1.5 such passes over
    its tokens per bit-width (13 with the direct products it used before)."""
    clip = 1.5 * shape.clip * shape.n_bits if "awq-clip" in shape.methods else 0.0
    return shape.search * (1 + shape.n_bits * shape.n_grid) + clip


SEARCH = SharedSearch("grouped", _run, _cost)
