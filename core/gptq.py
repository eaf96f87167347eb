"""GPTQ (Frantar et al., arXiv 2210.17323): one layer, a pure function of ``(w, hessian, settings)``.

A transcription of IST-DASLab/gptq's ``GPTQ.fasterquant`` (gptq.py as of its "static group option" commit),
line for line, in float32. The one deliberate difference (DESIGN.md section 2): every group's grid is
``core.quant``'s (llm-awq's min/max grid with the zero clamped to the levels; symmetric with signed levels),
not GPTQ's own quantizer (which widens the range to include 0), so that RTN, AWQ and GPTQ on this explorer
differ only in their algorithm, never in their grid.
"""
from __future__ import annotations

import torch

from . import quant


def _qparams(cols: torch.Tensor, n_bit: int, zero_point: bool) -> quant.QParams:
    """The grid of ``cols [out, k]``: one group per row over those ``k`` columns (``scale, zero [out, 1]``)."""
    return quant.choose_qparams(cols, n_bit, zero_point)


def _quantize_column(col: torch.Tensor, qp: quant.QParams) -> torch.Tensor:
    """Round one column ``[out]`` onto the per-row grid ``qp`` and dequantize (``[out]``)."""
    return quant.dequantize(quant.quantize(col.unsqueeze(1), qp), qp).flatten()


def check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if hessian is None or hessian.dim() != 2 or tuple(hessian.shape) != (in_features, in_features):
        shape = None if hessian is None else tuple(hessian.shape)
        raise ValueError(f"the Hessian must be [{in_features}, {in_features}] for this layer, got {shape}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the Hessian contains NaN or inf values")


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    n_bit: int,
    group_size: int,
    zero_point: bool = True,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> torch.Tensor:
    """GPTQ-quantize ``w [out, in]`` given ``hessian [in, in]`` (any positive multiple of ``X^T X``).

    Returns the dequantized weights (float32, shape of ``w``); ``w`` and ``hessian`` are not modified.
    ``group_size <= 0``: one grid per output row, computed once from ``w`` before dead columns are zeroed.
    Raises ``ValueError`` on a bad shape, a group size that does not divide ``in``, or a Hessian that is
    not positive definite after damping.
    """
    n_bit = quant.check_bits(n_bit)
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
    H = hessian.detach().clone().float()

    qp = None
    if not grouped:  # the reference's `if not self.quantizer.ready(): find_params(W)` before dead columns
        qp = _qparams(W, n_bit, zero_point)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups: list[quant.QParams] = []
    if grouped and static_groups:
        for i in range(0, columns, groupsize):
            groups.append(_qparams(W[:, i:i + groupsize], n_bit, zero_point))

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
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError("the damped Hessian is not positive definite (raise percdamp)") from None
    Hinv = H

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
                        qp = _qparams(W[:, (i1 + i):(i1 + i + groupsize)], n_bit, zero_point)
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
    return Q
