"""GPTQ (Frantar et al., arXiv 2210.17323) at both scopes.

Layer half: a transcription of IST-DASLab/gptq's ``GPTQ.fasterquant`` (gptq.py as of its "static group option"
commit), line for line, in float32, a pure function of ``(w, hessian, settings)``. The one deliberate difference
(DESIGN.md section 2): every group's grid is ``core.grids.quant``'s (llm-awq's min/max grid with the zero clamped
to the levels; symmetric with signed levels), not GPTQ's own quantizer (which widens the range to include 0), so
that RTN, AWQ and GPTQ on this explorer differ only in their algorithm, never in their grid.

Model half, ``sequential_gptq``: as the GPTQ paper (and IST-DASLab/gptq's ``llama_sequential`` without
true-sequential): block by block, each block's Hessians ``X^T X`` come from the calibration tokens run through the
model whose *earlier blocks are already quantized*; every linear of a block sees its block's input of that pass.
With AWQ's scales (``awq-gptq``: a scales-only ``Recipe``) the pass runs on the model as a file stores it: each
group's scales folded into its preceding operator (norm weights divided by ``s``, the preceding linear's rows by
``s``), every linear GPTQ-quantized in those coordinates (``GPTQ(W s, H_{X/s})``, the Hessian of the folded model's
own input), and the Recipe returned with GPTQ's weights and grids (``Recipe.rounded`` / ``grids``); a linear whose
scales have no preceding operator stays ``GPTQ(W s, H_{X/s}) / s`` (``Recipe.unscale``). Otherwise it returns
``{linear name: dequantized weight [out, in] float32}`` with their grids (``GridWeights``). Either way the model's
parameters are bit-identical to ``snap`` afterwards, also on error.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch

from ..grids import quant
from ..grids.spec import Options, QuantSpec
from ..model.blocks import BlockInputs, first_output, hold, original_weight, restore, with_hidden
from ..model.collect import GramLower, mirror_lower_
from ..model.linears import find_blocks, set_linear_weight
from ..model.models import LoadedModel
from .base import GridWeights, LayerInputs, Method, ModelContext, Progress, RunShape, Variant, register
from .recipe import Recipe, apply_recipe


def _qparams(cols: torch.Tensor, bits: int, zero_point: bool) -> quant.QParams:
    """The grid of ``cols [out, k]``: one group per row over those ``k`` columns (``scale, zero [out, 1]``)."""
    return quant.choose_qparams(cols, bits, zero_point)


def _quantize_column(col: torch.Tensor, qp: quant.QParams) -> torch.Tensor:
    """Round one column ``[out]`` onto the per-row grid ``qp`` and dequantize (``[out]``)."""
    return quant.dequantize(quant.quantize(col.unsqueeze(1), qp), qp).flatten()


def check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if hessian is None or hessian.dim() != 2 or tuple(hessian.shape) != (in_features, in_features):
        shape = None if hessian is None else tuple(hessian.shape)
        raise ValueError(f"the Hessian must be [{in_features}, {in_features}] for this layer, got {shape}")
    # row strips: torch.isfinite takes an abs() copy and two masks of the whole square (466 MiB at 8960 wide)
    if not all(bool(torch.isfinite(hessian[i:i + 512]).all()) for i in range(0, in_features, 512)):
        raise ValueError("the Hessian contains NaN or inf values")


@dataclass(frozen=True)
class GPTQOptions(Options):
    """GPTQ's own settings: columns per lazy batch (``block_size``), damping as a share of the mean Hessian
    diagonal (``percdamp``), columns in order of decreasing Hessian diagonal (``act_order``) and group grids
    fixed before any update (``static_groups``)."""

    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False


def _inverse_cholesky_(h: torch.Tensor) -> torch.Tensor:
    """The reference's ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``, worked out in ``h``'s own memory.

    Each of the three LAPACK calls writes its result over its input when that is column-major, so they run on the
    transposed view of ``h``; the lower triangle is first mirrored so that the view's lower triangle, the one the
    first factorisation reads, holds the same numbers as ``h``'s. The result is the reference's bit for bit (the same
    calls on the same column-major data) and the peak is one matrix instead of two (a 8960-wide input: 306 MiB
    less). ``h`` is overwritten; the returned tensor is a view of it."""
    t = mirror_lower_(h).mT
    torch.linalg.cholesky(t, out=t)
    torch.cholesky_inverse(t, out=t)
    torch.linalg.cholesky(t, upper=True, out=t)
    return t


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  options: GPTQOptions = GPTQOptions()) -> torch.Tensor:
    """GPTQ-quantize ``w [out, in]`` given ``hessian [in, in]`` (any positive multiple of ``X^T X``).

    Returns the dequantized weights (float32, shape of ``w``); ``w`` and ``hessian`` are not modified.
    ``group_size <= 0``: one grid per output row, computed once from ``w`` before dead columns are zeroed.
    Raises ``ValueError`` on a bad shape, a group size that does not divide ``in``, or a Hessian that is
    not positive definite after damping.
    """
    return gptq_grid(w, hessian, spec, options)[0]


def gptq_grid(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, options: GPTQOptions = GPTQOptions(),
              *, consume_hessian: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`gptq_quantize` and the integer grid its result lies on: ``(w_hat [out, in], (scale, zero))`` with
    ``scale, zero [out, n_groups]`` for the groups of ``spec.group_size`` along ``in`` in their original order (one
    group per row when ``group_size <= 0``), such that ``w_hat`` is each group's ``quant.dequantize`` of its levels.
    The grid is None under ``act_order`` without ``static_groups``: a group is then a run of permuted columns, which
    no contiguous group of the original order describes. ``consume_hessian``: a float32 ``hessian`` the caller
    holds no other reference to (pass an expression, not a name) is worked on in place instead of copied, so
    its memory goes as the factorisation replaces it (a 8960-wide input: 306 MiB less at the peak)."""
    bits, group_size, zero_point = spec.bits, spec.group_size, spec.zero_point
    block_size, percdamp = options.block_size, options.percdamp
    act_order, static_groups = options.act_order, options.static_groups
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError("gptq_quantize needs a non-empty 2-D weight [out, in]")
    columns = w.shape[1]
    check_hessian(hessian, columns)
    grouped = group_size is not None and int(group_size) > 0
    groupsize = quant.effective_group_size(columns, group_size) if grouped else -1
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    blocksize = int(block_size)

    W = w.detach().clone().float()
    if consume_hessian and hessian.dtype == torch.float32:
        H = hessian.detach()
    else:
        H = hessian.detach().clone().float()
    del hessian

    qp = None
    if not grouped:  # the reference's `if not self.quantizer.ready(): find_params(W)` before dead columns
        qp = _qparams(W, bits, zero_point)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups: list[quant.QParams] = []
    dynamic: list[quant.QParams] = []  # the grid of each group as it was chosen (in column order without act_order)
    if grouped and static_groups:
        for i in range(0, columns, groupsize):
            groups.append(_qparams(W[:, i:i + groupsize], bits, zero_point))

    perm = invperm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Q = torch.zeros_like(W)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    try:
        Hinv = _inverse_cholesky_(H)
    except torch.linalg.LinAlgError:
        raise ValueError("the damped Hessian is not positive definite (raise percdamp)") from None
    del H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            col = W1[:, i]
            d = Hinv1[i, i]

            if grouped:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        # from the full matrix: updates of earlier batches, not of this batch's columns
                        qp = _qparams(W[:, (i1 + i):(i1 + i + groupsize)], bits, zero_point)
                        dynamic.append(qp)
                else:
                    idx = i1 + i
                    if act_order:
                        idx = int(perm[idx])
                    qp = groups[idx // groupsize]

            q = _quantize_column(col, qp)
            Q1[:, i] = q

            err1 = (col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if act_order:
        Q = Q[:, invperm]
    if not grouped:
        grid = [qp]
    elif static_groups:
        grid = groups
    else:
        grid = None if act_order else dynamic
    if grid is None:
        return Q, None
    return Q, (torch.cat([g.scale for g in grid], dim=1), torch.cat([g.zero for g in grid], dim=1))


# ------------------------------------------------------------------------------------------------
# the whole-model half: sequential GPTQ
# ------------------------------------------------------------------------------------------------
def scaled_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of ``X / s`` from that of ``X``: ``H_ij / (s_i s_j)`` (``h [in, in]``, ``s [in]``)."""
    inv = 1.0 / s.to(h.dtype)
    return h * inv.view(-1, 1) * inv.view(1, -1)


def gptq_with_scales(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor | None, spec: QuantSpec,
                     options: GPTQOptions = GPTQOptions()) -> torch.Tensor:
    """``GPTQ(W s, H_{X/s}) / s`` (``s`` None: plain GPTQ) for ``w [out, in]`` and ``h = X^T X [in, in]``."""
    if s is None:
        return gptq_quantize(w, h.float(), spec, options)
    s = s.float().to(w.device)
    q = gptq_quantize(w.float() * s.view(1, -1), scaled_hessian(h, s).float(), spec, options)
    return q / s.view(1, -1)


def sequential_gptq(lm: LoadedModel, calib: torch.Tensor, snap: dict[str, torch.Tensor], spec: QuantSpec,
                    options: GPTQOptions = GPTQOptions(), *, batch_tokens: int = 4096, recipe: Recipe | None = None,
                    input_of: dict[str, str] | None = None, specs: Mapping[str, QuantSpec | None] | None = None,
                    progress: Progress | None = None) -> GridWeights | Recipe:
    """GPTQ of every block linear, block by block on ``calib [n, seqlen]`` token blocks (see the module doc).
    The result names each weight's integer grid (``GridWeights.params``, or ``Recipe.grids`` with ``recipe``) where
    it has one in the coordinates it is stored in: not for ``Q(W s) / s`` nor under ``act_order`` without
    ``static_groups``.

    As the reference's ``*_sequential``: the inputs of block 0 are captured once (one forward pass up to it);
    then each block runs twice on its cached inputs, once with hooks accumulating ``X^T X`` per distinct
    input (float32 GEMMs into float64) and, after its linears are quantized, once more to produce the next
    block's inputs. The other arguments of the block call (attention mask, position embeddings) are block 0's.
    ``recipe``: AWQ's scales and folds (``awq_gptq``; its own rounding, clips and kept weights are not used): the
    pass runs on the folded model and returns ``recipe`` with GPTQ's weights (``Recipe.rounded``). ``input_of``:
    linear -> input key, so linears that share an input share one Hessian. ``specs``: a plan's setting per linear
    (``ModelContext.specs``; a linear it does not name takes ``spec``; None keeps it in full precision, which the
    later blocks then see), so a mixed plan is one sequential pass as its model runs. The model must hold
    ``snap``'s weights on entry; it does again on return.
    """

    progress = progress or (lambda f, m: None)
    _, blocks = find_blocks(lm.model)
    n_blocks = len(blocks)
    input_of = dict(input_of or {})
    out = GridWeights()
    try:
        with torch.no_grad():
            if recipe is not None:  # the model as the file stores it, before rounding: scales folded in
                apply_recipe(lm, dataclasses.replace(recipe, bits=None, clip={}, keep={}, rounded={}, grids={}), snap)
            calls = BlockInputs(lm, calib, batch_tokens=batch_tokens).calls  # block 0's calls, one truncated forward
            for i in range(n_blocks):
                with hold(lm, i):  # streamed: block i read once for its Hessians, its solves and its outputs
                    names = [li.name for li in lm.linears if li.block == i]
                    key_of = {n: input_of.get(n, n) for n in names}
                    first_of: dict[str, str] = {}
                    for n in names:
                        first_of.setdefault(key_of[n], n)
                    hess: dict[str, GramLower] = {}

                    def hook(key: str):
                        def fn(mod, args) -> None:
                            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                            if key not in hess:
                                hess[key] = GramLower(x.shape[1], device=x.device)
                            hess[key].add(x)  # the collection pass's X^T X
                        return fn
                    handles = [lm.model.get_submodule(n).register_forward_pre_hook(hook(k)) for k, n in first_of.items()]
                    try:
                        for a, k in calls:
                            blocks[i](*a, **k)
                    finally:
                        for h in handles:
                            h.remove()
                    users = collections.Counter(key_of.values())
                    full: dict[tuple[str, str], torch.Tensor] = {}  # float32 X^T X, while a linear still needs it
                    for n in names:
                        w = original_weight(lm, snap, n)
                        key = key_of[n]
                        unscale = None
                        if recipe is not None:
                            w = recipe.prequant(n, w)  # W s, rows divided by the next group's scales where folded
                            if n in recipe.unscale:  # not folded: the live linear still reads X, GPTQ needs X / s
                                unscale = recipe.col[n].float().to(w.device)
                        s_n = specs.get(n, spec) if specs is not None else spec
                        users[key] -= 1
                        last = not users[key]  # no later linear of this block reads this input
                        h_key = ("input", key) if unscale is None else ("scaled", n)  # n's own X / s
                        gram = hess.pop(key) if last else hess[key]  # the last reader consumes it
                        if s_n is not None and h_key not in full:  # float32 X^T X, built once per input
                            full[h_key] = (gram.full(torch.float32, consume=last).to(w.device) if unscale is None
                                           else scaled_hessian(gram.full(consume=last).to(w.device), unscale).float())
                        del gram
                        if last and s_n is None:  # one input's matrices at a time (8960 wide: 306 MiB in float32)
                            full.pop(h_key, None)
                        if s_n is None:  # kept in full precision
                            q, grid = w.float(), None
                        elif last or unscale is not None:  # nothing else needs it: factorised in place
                            q, grid = gptq_grid(w, full.pop(h_key), s_n, options, consume_hessian=True)
                        else:
                            q, grid = gptq_grid(w, full[h_key], s_n, options)
                        if grid is not None and unscale is None:
                            out.params[n] = (grid[0].cpu(), grid[1].cpu(), s_n)
                        out[n] = q.cpu()
                        set_linear_weight(lm.model.get_submodule(n), q if unscale is None else q / unscale.view(1, -1))
                    del hess, full
                    if i + 1 < n_blocks:  # the next block's inputs, from this block quantized
                        calls = [with_hidden(a, k, first_output(blocks[i](*a, **k))) for a, k in calls]
                    progress((i + 1) / n_blocks, f"sequential GPTQ w{spec.bits}: block {i + 1}/{n_blocks}")
    finally:
        restore(lm, snap)
    if recipe is None:
        return out
    return dataclasses.replace(recipe, rounded=out, grids={n: p[:2] for n, p in out.params.items()})


def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: GPTQOptions) -> torch.Tensor:
    return gptq_quantize(w, inputs.gram("gptq"), spec, options)


def model(ctx: ModelContext, spec: QuantSpec, options: GPTQOptions, progress: Progress) -> Variant:
    """Sequential GPTQ on the search token budget."""
    return sequential_gptq(ctx.lm, ctx.search_blocks(), ctx.snap, spec, options, batch_tokens=ctx.batch_tokens,
                           input_of=ctx.input_of, specs=ctx.specs, progress=progress)


def sequential_cost(shape: RunShape) -> float:
    """Block 0's capture plus every block run twice on the search tokens, and the GPTQ solves."""
    return 2 * shape.search + 0.5


METHOD = register(Method(
    "gptq", "GPTQ", "GPTQ (column by column with error feedback through the inverse Hessian X^T X)",
    "GPTQ, sequential: block by block, each block's Hessians X^T X from the search token budget run through the "
    "already-quantized blocks before it", GPTQOptions, layer, model, cost=sequential_cost, budget="search"))
