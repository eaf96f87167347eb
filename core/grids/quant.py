"""Pseudo-quantizers: small pure primitives, no model walking here.

Conventions: ``w`` is ``[out, in]`` (nn.Linear layout). Quantization groups run along ``in``:
``group_size <= 0`` means one group per output row.

``pseudo_quantize(..., zero_point=True)`` reproduces llm-awq's ``pseudo_quantize_tensor`` bit for bit
in float32: the same operations in the same order (division by the scale, ``torch.round`` half to
even, clamp floor 1e-5). Do not "simplify" ``w / scale`` into ``w * (1 / scale)``: it changes bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import kernels, llamacpp

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be an integer between {MIN_BITS} and {MAX_BITS}, got {bits!r}")
    return int(bits)


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group length along ``in`` (``in_features`` for per-channel); ValueError if it does not divide."""
    if group_size is None or int(group_size) <= 0:
        return int(in_features)
    g = int(group_size)
    if in_features % g:
        raise ValueError(
            f"group size {g} does not divide the layer's {in_features} input channels "
            f"(use a divisor of {in_features}, or 0 / -1 for one group per output row)"
        )
    return g


DEFAULT_GROUP_CANDIDATES = (128, 64, 32)  # the default group size is the largest of these that fits the model
GROUP_CHOICES = (16, 32, 64, 128, 256, 512)  # what pickers offer, where it fits


def default_group_size(widths: Iterable[int]) -> int:
    """The largest of 128, 64, 32 that divides every width in ``widths``; 0 (one group per row) if none does.

    ``widths``: the input widths of a model's quantizable linears (SmolLM2-135M: 576 and 1536 -> 64;
    MiniLM-L6 and Qwen2.5: 128).
    """
    ws = {int(w) for w in widths}
    for g in DEFAULT_GROUP_CANDIDATES:
        if ws and all(w % g == 0 for w in ws):
            return g
    return 0


def check_model_group_size(widths: Iterable[int], group_size: int) -> int:
    """The one group-size rule for a whole model (analyze, Layer Lab and Model quality alike).

    ``group_size <= 0`` is one group per output row (returns 0). A positive group size must divide the input
    width of every quantizable linear; otherwise ValueError naming the widths it does not divide and the
    model's default group size. (No silent per-row fallback for the layers it does not fit.)
    """
    if isinstance(group_size, bool) or int(group_size) != group_size:
        raise ValueError(f"group size must be an integer, got {group_size!r}")
    g = int(group_size)
    if g <= 0:
        return 0
    ws = sorted({int(w) for w in widths})
    bad = [w for w in ws if w % g]
    if bad:
        d = default_group_size(ws)
        hint = (f"this model's default group size is {d}" if d else
                "none of 128, 64, 32 divides all of them")
        raise ValueError(
            f"group size {g} does not divide the input width {', '.join(str(w) for w in bad)} of some of this "
            f"model's linears (widths {', '.join(str(w) for w in ws)}); {hint}, or use 0 for one group per output row"
        )
    return g


def model_group_sizes(widths: Iterable[int], candidates: Iterable[int] = GROUP_CHOICES) -> list[int]:
    """The group sizes a picker offers for a model: candidates dividing every width (and smaller than the
    narrowest), then 0 (one group per output row, always possible)."""
    ws = {int(w) for w in widths}
    if not ws:
        return [0]
    return [g for g in candidates if g < min(ws) and all(w % g == 0 for w in ws)] + [0]


@dataclass(frozen=True)
class QParams:
    """Per-group quantization parameters; tensors are ``[groups, 1]``.

    Asymmetric: ``q = clamp(round(w / scale) + zero, 0, 2^n - 1)``.
    Symmetric: ``zero == 0`` and levels ``[-2^(n-1), 2^(n-1) - 1]``.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    min_int: int
    max_int: int


def choose_qparams(wg: torch.Tensor, bits: int, zero_point: bool = True) -> QParams:
    """Quantization parameters for grouped weights ``wg`` of shape ``[groups, group_size]``."""
    bits = check_bits(bits)
    if zero_point:
        max_val = wg.amax(dim=1, keepdim=True)
        min_val = wg.amin(dim=1, keepdim=True)
        max_int, min_int = 2**bits - 1, 0
        scale = (max_val - min_val).clamp(min=1e-5) / max_int
        zero = (-torch.round(min_val / scale)).clamp_(min_int, max_int)
    else:
        # Symmetric: divide by 2^(n-1) - 1 so the largest |w| maps onto a level (the seed divided by
        # 2^(n-1) and clipped the largest positive weight).
        max_val = wg.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
        max_int, min_int = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scale = max_val / max_int
        zero = torch.zeros_like(scale)
    return QParams(scale, zero, min_int, max_int)


def quantize(wg: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer levels (stored as float) of grouped weights ``[groups, group_size]``."""
    return torch.clamp(torch.round(wg / qp.scale) + qp.zero, qp.min_int, qp.max_int)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    return (q - qp.zero) * qp.scale


def pseudo_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``w`` (any leading shape, groups along the last dim).

    Returns a tensor of the same shape and dtype as ``w``.
    """
    bits = check_bits(bits)
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError("pseudo_quantize needs a non-empty weight tensor")
    g = effective_group_size(w.shape[-1], group_size)
    if _fused_ok(w):
        out = torch.empty(w.shape, dtype=w.dtype)
        if kernels.fake_quant(w.reshape(-1, w.shape[-1]).contiguous(), None, bits, g, zero_point, w_hat=out):
            return out
    return _pseudo_quantize_torch(w, bits, g, zero_point)


def fake_quant(w: torch.Tensor, spec: "QuantSpec", importance: torch.Tensor | None = None) -> torch.Tensor:
    """The one door every method's grid goes through: ``w`` (any leading shape, rows along the last dim) put on
    ``spec``'s grid and read back, same shape and dtype.

    ``spec.format`` None: the explorer's integer grid (``pseudo_quantize``, llm-awq's quantizer bit for bit).
    A llama.cpp type: ``llamacpp.fake_quantize`` on the rows (the type llama-quantize writes for the row width,
    see ``llamacpp.fallback``); the last dim may also be one block of a row (the clip search quantizes
    ``[rows, groups, block]``): blocks are quantized independently, so the result is the same.
    ``importance [in]``: llama.cpp's importance weights (an imatrix's mean x^2), llama.cpp types only; the last
    dim must then be the whole row (the legacy types weigh by the row's mean x^2 too).
    (``spec``: a ``core.grids.spec.QuantSpec``, which imports this module, hence the name in quotes.)
    """
    if spec.format is None:
        if importance is not None:
            raise ValueError("importance weights (an imatrix) apply to llama.cpp types only, not the integer grid")
        return pseudo_quantize(w, spec.bits, spec.group_size, spec.zero_point)
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError("fake_quant needs a non-empty weight tensor")
    flat = w.reshape(-1, w.shape[-1])
    return llamacpp.fake_quantize(flat, spec.format, importance).reshape(w.shape)


def _fused_ok(w: torch.Tensor) -> bool:
    """The fused kernel runs on CPU float32 tensors outside autograd (else: the torch ops below)."""
    return (w.dtype == torch.float32 and w.device.type == "cpu"
            and not (w.requires_grad and torch.is_grad_enabled()))


def _pseudo_quantize_torch(w: torch.Tensor, bits: int, g: int, zero_point: bool) -> torch.Tensor:
    """The reference implementation in torch ops (llm-awq's order of operations); ``g`` already checked."""
    wg = w.reshape(-1, g)
    qp = choose_qparams(wg, bits, zero_point)
    # quantize() then dequantize(), with the same operations in the same order, in place on one temporary
    q = (wg / qp.scale).round_().add_(qp.zero).clamp_(qp.min_int, qp.max_int)
    return q.sub_(qp.zero).mul_(qp.scale).reshape(w.shape)
