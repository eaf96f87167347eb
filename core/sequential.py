"""Whole-model weights for the methods beyond AWQ: sequential GPTQ, HQQ, and AWQ scales + GPTQ.

Each function returns ``{linear name: dequantized weight [out, in] float32}`` for every block linear (the
variant form ``core.evaluate`` scores) and leaves the model's parameters bit-identical to ``snap`` when it
returns, also on error.

* ``sequential_gptq``: as the GPTQ paper (and IST-DASLab/gptq's ``llama_sequential`` without true-sequential):
  block by block, each block's Hessians ``X^T X`` come from the calibration tokens run through the model whose
  *earlier blocks are already quantized*; every linear of a block sees its block's input of that pass.
* ``awq_gptq``: AWQ's (grouped) input scales ``s`` per linear, then GPTQ on the scaled weights ``W s`` with the
  Hessian of the scaled input ``X / s`` (``diag(1/s) H diag(1/s)``), returned unfolded as ``GPTQ(W s) / s``: the
  same function as folding ``1/s`` into the preceding norm / linear, without touching anything but the linears
  (llm-compressor's AWQ-then-GPTQ recipes).
* ``hqq_weights``: data-free, each linear on its own.
"""
from __future__ import annotations

from typing import Callable

import torch

from .gptq import gptq_quantize
from .collect import GramLower
from .grouped import BlockInputs, first_output, original_weight, restore, with_hidden
from .hqq import hqq_quantize
from .models import LoadedModel, find_blocks, set_linear_weight

Progress = Callable[[float, str], None]
Weights = dict[str, torch.Tensor]


def scaled_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of ``X / s`` from that of ``X``: ``H_ij / (s_i s_j)`` (``h [in, in]``, ``s [in]``)."""
    inv = 1.0 / s.to(h.dtype)
    return h * inv.view(-1, 1) * inv.view(1, -1)


def gptq_with_scales(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor | None, *, n_bit: int, group_size: int,
                     zero_point: bool = True, **gptq_options) -> torch.Tensor:
    """``GPTQ(W s, H_{X/s}) / s`` (``s`` None: plain GPTQ) for ``w [out, in]`` and ``h = X^T X [in, in]``."""
    if s is None:
        return gptq_quantize(w, h.float(), n_bit=n_bit, group_size=group_size, zero_point=zero_point, **gptq_options)
    s = s.float().to(w.device)
    q = gptq_quantize(w.float() * s.view(1, -1), scaled_hessian(h, s).float(), n_bit=n_bit, group_size=group_size,
                      zero_point=zero_point, **gptq_options)
    return q / s.view(1, -1)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block was called with (first positional argument, else ``hidden_states=``)."""
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


def sequential_gptq(lm: LoadedModel, calib: torch.Tensor, snap: dict[str, torch.Tensor], *, bits: int,
                    group_size: int, zero_point: bool = True, batch_tokens: int = 4096,
                    scales: dict[str, torch.Tensor] | None = None, input_of: dict[str, str] | None = None,
                    progress: Progress | None = None, **gptq_options) -> Weights:
    """GPTQ of every block linear, block by block on ``calib [n, seqlen]`` token blocks (see the module doc).

    As the reference's ``*_sequential``: the inputs of block 0 are captured once (one forward pass up to it);
    then each block runs twice on its cached inputs, once with hooks accumulating ``X^T X`` per distinct
    input (float32 GEMMs into float64) and, after its linears are quantized, once more to produce the next
    block's inputs. The other arguments of the block call (attention mask, position embeddings) are block 0's.
    ``scales``: per-linear AWQ input scales (``awq_gptq``); ``input_of``: linear -> input key, so linears that
    share an input share one Hessian; ``gptq_options``: ``block_size``, ``percdamp``, ``act_order``,
    ``static_groups``. The model must hold ``snap``'s weights on entry; it does again on return.
    """

    progress = progress or (lambda f, m: None)
    _, blocks = find_blocks(lm.model)
    n_blocks = len(blocks)
    input_of = dict(input_of or {})
    out: Weights = {}
    try:
        with torch.no_grad():
            calls = BlockInputs(lm, calib, batch_tokens=batch_tokens).calls  # block 0's calls, one truncated forward
            for i in range(n_blocks):
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
                full = {k: g.full() for k, g in hess.items()}
                for n in names:
                    w = original_weight(lm, snap, n)
                    s = scales.get(n) if scales else None
                    q = gptq_with_scales(w, full[key_of[n]].to(w.device), s, n_bit=bits, group_size=group_size,
                                         zero_point=zero_point, **gptq_options)
                    out[n] = q.cpu()
                    set_linear_weight(lm.model.get_submodule(n), q)
                del hess, full
                if i + 1 < n_blocks:  # the next block's inputs, from this block quantized
                    calls = [with_hidden(a, k, first_output(blocks[i](*a, **k))) for a, k in calls]
                progress((i + 1) / n_blocks, f"sequential GPTQ w{bits}: block {i + 1}/{n_blocks}")
    finally:
        restore(lm, snap)
    return out


def awq_gptq(lm: LoadedModel, calib: torch.Tensor, snap: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
             *, bits: int, group_size: int, zero_point: bool = True, batch_tokens: int = 4096,
             input_of: dict[str, str] | None = None, progress: Progress | None = None, **gptq_options) -> Weights:
    """AWQ's per-linear input scales (e.g. the grouped search's ``Plan.col``), then sequential GPTQ on ``W s``."""
    return sequential_gptq(lm, calib, snap, bits=bits, group_size=group_size, zero_point=zero_point,
                           batch_tokens=batch_tokens, scales=scales, input_of=input_of, progress=progress,
                           **gptq_options)


def hqq_weights(lm: LoadedModel, snap: dict[str, torch.Tensor], *, bits: int, group_size: int,
                progress: Progress | None = None, **hqq_options) -> Weights:
    """HQQ of every block linear from its snapshot weight (data-free; the model is not touched)."""
    progress = progress or (lambda f, m: None)
    out: Weights = {}
    names = [li.name for li in lm.linears]
    for j, n in enumerate(names):
        out[n] = hqq_quantize(original_weight(lm, snap, n), n_bit=bits, group_size=group_size, **hqq_options).cpu()
        progress((j + 1) / len(names), f"HQQ w{bits}: {n}")
    return out
