"""AWQ's searches at the level of one linear layer: activation-aware scales and weight clipping.

Shapes: ``w [out, in]``, ``x [tokens, in]``, scales ``[in]``. The official loss of a scale is the MSE
of ``X @ (Q(W*s)/s).T`` against ``X @ W.T``; we compute it as ``X @ (Q(W*s)/s - W).T`` (one product
instead of two, same value up to float rounding) and evaluate many alphas in one batched product.

Speed (see BENCHMARKS.md): ``Q(W*s)/s - W`` comes from one fused pass (``core.kernels``, bit-identical to
the torch ops, which remain the fallback) written into a pooled scratch buffer, the product is ``dW @ X.T`` so each
alpha's output block is contiguous, and the float64 sum of squares is one pass over it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from ..grids import kernels
from ..grids.quant import check_bits, effective_group_size, fake_quant
from ..grids.spec import QuantSpec

# Elements of a [alphas, out, in] temporary we allow at once; bounds memory on wide layers.
_CHUNK_ELEMENTS = 24 * 1024 * 1024
_POOL: dict[str, list[torch.Tensor]] = {}  # idle scratch buffers by name, shared by all threads
_POOL_LOCK = threading.Lock()
_POOL_KEEP = 1  # idle buffers kept per name (Streamlit runs each rerun in a new thread: a per-thread cache
# would start cold every time, and fresh 20-90 MB tensors cost page faults on every evaluation)


class _Scratch:
    """Float32 scratch buffers checked out of the shared pool for the duration of a ``with`` block."""

    def __init__(self):
        self._held: list[tuple[str, torch.Tensor]] = []

    def __enter__(self) -> "_Scratch":
        return self

    def get(self, name: str, numel: int) -> torch.Tensor:
        with _POOL_LOCK:
            idle = _POOL.get(name, [])
            fit = [b for b in idle if b.numel() >= numel]
            buf = min(fit, key=lambda b: b.numel()) if fit else None
            if buf is not None:
                del idle[next(i for i, b in enumerate(idle) if b is buf)]  # (list.remove would compare values)
        if buf is None:
            buf = torch.empty(numel, dtype=torch.float32)
        self._held.append((name, buf))
        return buf[:numel]

    def __exit__(self, *exc) -> None:
        with _POOL_LOCK:
            for name, buf in self._held:
                idle = _POOL.setdefault(name, [])
                idle.append(buf)
                idle.sort(key=lambda b: b.numel(), reverse=True)
                del idle[_POOL_KEEP:]
        self._held.clear()


def release_buffers() -> None:
    """Free the idle scratch buffers (they are otherwise kept for the next evaluation)."""
    with _POOL_LOCK:
        _POOL.clear()


CLIP_SKIP_PATTERNS = ("q_", "k_", "query", "key", "Wqkv")


def is_clip_skipped(name: str) -> bool:
    """Official AWQ does not clip Q/K projections: their outputs meet in QK^T (seed 000)."""
    return any(p in name for p in CLIP_SKIP_PATTERNS)


def alpha_grid(n_grid: int) -> torch.Tensor:
    """The official ratios ``i / n_grid`` for ``i = 0 .. n_grid - 1`` (1.0 itself is never tried)."""
    if int(n_grid) < 1:
        raise ValueError(f"grid size must be at least 1, got {n_grid}")
    return torch.tensor([i / n_grid for i in range(int(n_grid))], dtype=torch.float64)


def weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean`` ``[in]``: mean over rows of ``|W| / (group max |W| + 1e-6)``.

    ``w`` may be several linears that share one input, stacked along ``out``.
    """
    g = effective_group_size(w.shape[-1], group_size)
    wa = w.abs().reshape(-1, g)
    w_scale = (wa / (wa.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape)
    return w_scale.mean(0)


def awq_scales(
    x_mean: torch.Tensor,
    alphas: torch.Tensor,
    w_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scales ``[len(alphas), in]`` for each alpha, normalised by ``sqrt(max * min)`` as official AWQ.

    Without ``w_mean``: ``s = clamp(x_mean^a, 1e-4)``. With it (duo scaling):
    ``s = clamp(x_mean^a / (w_mean^(1-a) + 1e-4), 1e-4)``; non-finite scales become 1.
    """
    x_mean = x_mean.float()
    rows = []
    for a in alphas.tolist():
        if w_mean is None:
            s = x_mean.pow(a).clamp(min=1e-4)
        else:
            s = (x_mean.pow(a) / (w_mean.float().pow(1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if w_mean is not None:
            s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        rows.append(s)
    return torch.stack(rows)


def scaled_fake_quant(
    w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, *,
    format: str | None = None,
) -> torch.Tensor:
    """``Q(W * s) / s`` for one scale vector ``[in]`` -> ``[out, in]``, or a batch ``[A, in]`` -> ``[A, out, in]``.

    ``format``: a llama.cpp type (``QuantSpec.format``; then ``bits``, ``group_size``, ``zero_point`` are its own):
    ``Q`` is that type's quantizer (``core.grids.quant.fake_quant``)."""
    s = scales.to(w.dtype)
    spec = QuantSpec(bits, group_size, zero_point, format)
    if not format and w.dim() == 2 and s.dim() in (1, 2) and s.shape[-1] == w.shape[1] and w.dtype == torch.float32 \
            and w.device.type == "cpu" and not (torch.is_grad_enabled() and (w.requires_grad or s.requires_grad)):
        bits = check_bits(bits)
        g = effective_group_size(w.shape[1], group_size)
        s2 = s.reshape(-1, w.shape[1]).contiguous()
        out = torch.empty((s2.shape[0], *w.shape) if s.dim() == 2 else w.shape, dtype=w.dtype)
        if kernels.fake_quant(w.contiguous(), s2, bits, g, zero_point, w_hat=out):
            return out
    if s.dim() == 1:
        return fake_quant(w * s.view(1, -1), spec) / s.view(1, -1)
    return fake_quant(w.unsqueeze(0) * s[:, None, :], spec) / s[:, None, :]


def _dw_sq_errors(x: torch.Tensor, dw: torch.Tensor, a: int) -> torch.Tensor:
    """``||X dW_i^T||^2`` for the ``a`` stacked blocks of ``dw [a*out, in]`` -> float64 ``[a]`` (one GEMM)."""
    x = x.float()
    with _Scratch() as sc:
        y = sc.get("y", dw.shape[0] * x.shape[0]).view(dw.shape[0], x.shape[0])
        torch.mm(dw, x.T, out=y)  # [a*out, tokens]: each alpha's block is contiguous
        return kernels.row_sq_sums(y).view(a, -1).sum(1)


def output_sq_norm(x: torch.Tensor, w: torch.Tensor) -> float:
    """``||X W^T||^2`` in float64: ``metrics.output_ref_sq`` computed the way the errors are (one GEMM, one pass)."""
    return float(_dw_sq_errors(x, w.float().contiguous(), 1)[0])


def output_sq_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """``||X (W_hat - W)^T||^2`` (float64 scalar); ``w_hat`` may be a batch ``[A, out, in]`` -> ``[A]``."""
    a = 1 if w_hat.dim() == 2 else w_hat.shape[0]
    out_f, in_f = w_hat.shape[-2:]
    if w_hat.dtype != torch.float32 or w.dtype != torch.float32 or w_hat.device.type != "cpu":
        dw = (w_hat - w).reshape(a * out_f, in_f).float().contiguous()
        e = _dw_sq_errors(x, dw, a)
        return e[0] if w_hat.dim() == 2 else e
    with _Scratch() as sc:  # dW in a pooled buffer: a fresh 17+ MB temporary per call cost page faults
        dw = sc.get("dw", a * out_f * in_f).view(w_hat.shape)
        torch.sub(w_hat, w, out=dw)
        e = _dw_sq_errors(x, dw.view(a * out_f, in_f), a)
    return e[0] if w_hat.dim() == 2 else e


def fake_quant_errors(
    w: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool,
    xs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(W*s)/s, [||X_k (Q(W*s)/s - W)^T||^2 for X_k in xs])`` for one scale vector ``[in]``.

    The same numbers as ``scaled_fake_quant`` followed by ``output_sq_error`` per ``x``, with the weights and
    their difference written in one fused pass (what a Layer Lab slider release needs).
    """
    bits = check_bits(bits)
    w = w.float().contiguous()
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    s = scales.to(torch.float32).reshape(1, in_f).contiguous()
    w_hat = torch.empty_like(w)
    with _Scratch() as sc:
        dw = sc.get("dw", out_f * in_f).view(out_f, in_f)
        if not kernels.fake_quant(w, s, bits, g, zero_point, w_hat=w_hat, dw=dw):
            w_hat = scaled_fake_quant(w, s[0], bits, g, zero_point)
            dw = w_hat - w
        errs = torch.stack([_dw_sq_errors(x, dw, 1)[0] for x in xs]) if xs else torch.zeros(0, dtype=torch.float64)
    return w_hat, errs


def _chunk(n_alpha: int, w: torch.Tensor) -> int:
    return max(1, min(n_alpha, _CHUNK_ELEMENTS // max(1, w.numel())))


def scale_sq_errors(
    w: torch.Tensor,
    x: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    *,
    format: str | None = None,
) -> torch.Tensor:
    """``||X (Q(W*s)/s - W)^T||^2`` for each row of ``scales [A, in]`` -> float64 ``[A]`` (``format``: a llama.cpp
    type, as in ``scaled_fake_quant``)."""
    return scale_sq_errors_multi(w, [x], scales, bits, group_size, zero_point, format=format)[0]


def scale_sq_errors_multi(
    w: torch.Tensor,
    xs: Sequence[torch.Tensor],
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    *,
    format: str | None = None,
) -> torch.Tensor:
    """``scale_sq_errors`` on several input samples (e.g. calibration and held-out rows) -> ``[len(xs), A]``.

    Each ``Q(W*s)/s - W`` is computed once (fused kernel into a reused buffer; a llama.cpp ``format``: its
    quantizer) and multiplied by every ``x``.
    """
    bits = check_bits(bits)
    w = w.float().contiguous()
    xs = [x.float() for x in xs]
    out_f, in_f = w.shape
    g = QuantSpec(bits, group_size, zero_point, format).group(in_f)
    n_alpha = scales.shape[0]
    res = torch.empty(len(xs), n_alpha, dtype=torch.float64)
    step = _chunk(n_alpha, w)
    with _Scratch() as sc:
        buf = sc.get("dw", min(step, n_alpha) * out_f * in_f)
        for i in range(0, n_alpha, step):
            s = scales[i : i + step].to(torch.float32).contiguous()
            n = s.shape[0]
            dw = buf[: n * out_f * in_f].view(n * out_f, in_f)
            if format:
                dw = (scaled_fake_quant(w, s, bits, group_size, zero_point, format=format) - w).reshape(n * out_f, in_f)
            elif not kernels.fake_quant(w, s, bits, g, zero_point, dw=dw):
                dw = (scaled_fake_quant(w, s, bits, g, zero_point) - w).reshape(n * out_f, in_f)
            for k, x in enumerate(xs):
                res[k, i : i + n] = _dw_sq_errors(x, dw, n)
    return res


def scale_sq_errors_bits(
    w: torch.Tensor,
    x: torch.Tensor,
    scales: torch.Tensor,
    bits: Sequence[int],
    group_size: int,
    zero_point: bool = True,
) -> torch.Tensor:
    """``scale_sq_errors`` for several bit-widths at once -> float64 ``[len(bits), A]``.

    The fused kernel finds each group's max/min of ``W*s`` once for all bit-widths (the layer-level sweep).
    """
    bits = [check_bits(b) for b in bits]
    w = w.float().contiguous()
    x = x.float()
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    n_alpha, nb = scales.shape[0], len(bits)
    res = torch.empty(nb, n_alpha, dtype=torch.float64)
    step = max(1, min(n_alpha, _CHUNK_ELEMENTS // max(1, nb * w.numel())))
    with _Scratch() as sc:
        buf = sc.get("dw", step * nb * out_f * in_f)
        for i in range(0, n_alpha, step):
            s = scales[i : i + step].to(torch.float32).contiguous()
            n = s.shape[0]
            dw = buf[: n * nb * out_f * in_f].view(n * nb * out_f, in_f)
            if kernels.fake_quant(w, s, bits, g, zero_point, dw=dw):
                res[:, i : i + n] = _dw_sq_errors(x, dw, n * nb).view(n, nb).T
            else:
                for k, b in enumerate(bits):
                    res[k, i : i + n] = scale_sq_errors(w, x, s, b, g, zero_point)
    return res


@dataclass(frozen=True)
class BitsSweep:
    """What the layer-level sweep needs of one linear: the whole curve per bit-width, and held-out errors.

    ``calib [len(bits), A]`` squared errors on the calibration rows for every scale row; ``best [len(bits)]`` the
    first minimum of each curve (``first_min_index``); ``heldout_rtn`` / ``heldout_awq [len(bits)]`` the squared
    errors on the held-out rows of RTN and of the scales at ``best`` (NaN without held-out rows).
    """

    calib: torch.Tensor
    best: list[int]
    heldout_rtn: torch.Tensor
    heldout_awq: torch.Tensor


def sweep_sq_errors(
    w: torch.Tensor,
    x: torch.Tensor,
    xh: torch.Tensor | None,
    scales: torch.Tensor,
    bits: Sequence[int],
    group_size: int,
    zero_point: bool = True,
    norm: float = 1.0,
) -> BitsSweep:
    """``scale_sq_errors_bits`` on ``x`` plus the held-out errors of RTN and of each bit-width's best scales.

    The held-out columns reuse the calibration pass's quantized weights instead of quantizing again: when
    ``scales[0]`` is all ones (alpha 0, as ``awq_scales`` gives it) its ``dW`` blocks are multiplied by ``xh``
    right away (RTN), and each bit-width's ``dW`` at its running best alpha (of ``calib / norm``: the losses
    the caller ranks) is kept (copied only when the best
    improves), so the end costs one GEMM for the AWQ columns and no fused pass. Same numbers as
    ``scale_sq_errors_bits`` + ``rtn_and_scaled_sq_errors`` up to the GEMM's float summation order.
    """
    bits = [check_bits(b) for b in bits]
    w = w.float().contiguous()
    x = x.float()
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    n_alpha, nb, numel = scales.shape[0], len(bits), w.numel()
    rtn_first = bool((scales[0] == 1).all())
    # (the kept dW of every bit-width must fit the same memory bound as a chunk; wider layers: separate passes)
    if xh is None or not rtn_first or not kernels.available() or nb * numel > _CHUNK_ELEMENTS:
        calib = scale_sq_errors_bits(w, x, scales, bits, group_size, zero_point)
        best = [first_min_index(c / norm) for c in calib]
        if xh is None:
            nan = torch.full((nb,), float("nan"), dtype=torch.float64)
            return BitsSweep(calib, best, nan, nan.clone())
        rtn, awq_h = rtn_and_scaled_sq_errors(w, xh, [None if i == 0 and rtn_first else scales[i] for i in best],
                                              bits, g, zero_point)
        return BitsSweep(calib, best, rtn, awq_h)
    xh = xh.float()
    calib = torch.empty(nb, n_alpha, dtype=torch.float64)
    best_val = [float("inf")] * nb
    best = [0] * nb
    step = max(1, min(n_alpha, _CHUNK_ELEMENTS // max(1, nb * numel)))
    rtn_h = None
    with _Scratch() as sc:
        buf = sc.get("dw", step * nb * numel)
        keep = sc.get("dw_best", nb * numel).view(nb, out_f, in_f)  # dW of each bit-width's best alpha so far
        for i in range(0, n_alpha, step):
            s = scales[i : i + step].to(torch.float32).contiguous()
            n = s.shape[0]
            dw = buf[: n * nb * numel].view(n, nb, out_f, in_f)
            if not kernels.fake_quant(w, s, bits, g, zero_point, dw=dw):  # NaN/inf in the weights: the torch path
                calib = scale_sq_errors_bits(w, x, scales, bits, group_size, zero_point)
                best = [first_min_index(c / norm) for c in calib]
                rtn, awq_h = rtn_and_scaled_sq_errors(w, xh, [None if k == 0 else scales[k] for k in best],
                                                      bits, g, zero_point)
                return BitsSweep(calib, best, rtn, awq_h)
            calib[:, i : i + n] = _dw_sq_errors(x, dw.view(n * nb * out_f, in_f), n * nb).view(n, nb).T
            if i == 0:
                rtn_h = _dw_sq_errors(xh, dw[0].reshape(nb * out_f, in_f), nb)
            for b in range(nb):  # first_min_index's rule: strict <, NaN never wins
                for k in range(n):
                    v = float(calib[b, i + k]) / norm
                    if v < best_val[b]:
                        best_val[b], best[b] = v, i + k
                        if i + k > 0:
                            keep[b].copy_(dw[k, b])
        awq_h = rtn_h.clone()
        todo = [b for b in range(nb) if best[b] > 0]
        if todo:
            for j, b in enumerate(todo):  # pack to the front (j <= b: nothing is overwritten before it is moved)
                if j != b:
                    keep[j].copy_(keep[b])
            awq_h[todo] = _dw_sq_errors(xh, keep[: len(todo)].reshape(len(todo) * out_f, in_f), len(todo))
    return BitsSweep(calib, best, rtn_h, awq_h)


def rtn_and_scaled_sq_errors(
    w: torch.Tensor,
    x: torch.Tensor,
    scales: Sequence[torch.Tensor | None],
    bits: Sequence[int],
    group_size: int,
    zero_point: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RTN errors [len(bits)], errors at scales[i] for bits[i] [len(bits)])`` on one input sample.

    What the held-out columns of the sweep need: RTN for every bit-width from one fused pass and one GEMM,
    the chosen scales per bit-width from one more GEMM. ``scales[i] is None`` means "the same as RTN".
    Same values as ``scale_sq_errors`` per bit-width (up to float summation order).
    """
    bits = [check_bits(b) for b in bits]
    w = w.float().contiguous()
    x = x.float()
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    nb = len(bits)
    rtn = awq = None
    if nb * w.numel() <= _CHUNK_ELEMENTS:
        with _Scratch() as scr:
            buf = scr.get("dw", nb * w.numel())
            dw = buf.view(nb * out_f, in_f)
            if kernels.fake_quant(w, None, bits, g, zero_point, dw=dw):
                rtn = _dw_sq_errors(x, dw, nb)
                todo = [i for i, sc in enumerate(scales) if sc is not None]
                awq = rtn.clone()
                if todo:
                    dw = buf[: len(todo) * w.numel()].view(len(todo), out_f, in_f)
                    ok = all(kernels.fake_quant(w, scales[i].to(torch.float32).reshape(1, in_f).contiguous(), bits[i],
                                                g, zero_point, dw=dw[n]) for n, i in enumerate(todo))
                    if ok:
                        awq[todo] = _dw_sq_errors(x, dw.view(len(todo) * out_f, in_f), len(todo))
                    else:
                        rtn = None
    if rtn is None:  # torch path (or a very wide layer): per bit-width
        rtn = torch.empty(nb, dtype=torch.float64)
        awq = torch.empty(nb, dtype=torch.float64)
        for i, b in enumerate(bits):
            sc = [torch.ones(in_f)] + ([scales[i].float()] if scales[i] is not None else [])
            e = scale_sq_errors(w, x, torch.stack(sc), b, g, zero_point)
            rtn[i], awq[i] = e[0], e[-1]
    return rtn, awq


@dataclass(frozen=True)
class ScaleSearch:
    """Result of the AWQ scale grid search on one linear (or one shared-input group)."""

    alphas: torch.Tensor  # [n_grid] float64, i / n_grid
    losses: torch.Tensor  # [n_grid] float64, MSE per output element
    scales: torch.Tensor  # [in] the winning s
    best_index: int

    @property
    def best_alpha(self) -> float:
        return float(self.alphas[self.best_index])

    @property
    def best_loss(self) -> float:
        return float(self.losses[self.best_index])

    @property
    def rtn_loss(self) -> float:
        """Loss at alpha = 0: every scale is 1 after normalisation, which is plain RTN."""
        return float(self.losses[0])


def first_min_index(losses: torch.Tensor) -> int:
    """Index of the first minimum with strict ``<`` (ties keep the earlier, smaller alpha); NaN never wins."""
    best, best_i = float("inf"), 0
    for i, v in enumerate(losses.tolist()):
        if v < best:
            best, best_i = v, i
    return best_i


def search_scale(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, *, n_grid: int = 20, duo_scaling: bool = False,
                 x_mean: torch.Tensor | None = None, w_for_mean: torch.Tensor | None = None) -> ScaleSearch:
    """Grid-search AWQ's ``alpha`` for ``w [out, in]`` on inputs ``x [tokens, in]`` on ``spec``'s grid.

    ``x_mean`` overrides ``mean|x|`` (e.g. with the mean over all calibration tokens while ``x`` is a
    sample); ``w_for_mean`` gives the stacked weights of a shared-input group for duo scaling.
    """
    bits, group_size, zero_point = spec.bits, spec.group_size, spec.zero_point
    w, x = w.float(), x.float()
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shapes do not match: w {tuple(w.shape)} and x {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("search_scale needs at least one input token")
    g = spec.group(w.shape[1])
    xm = x.abs().mean(0) if x_mean is None else x_mean.float()
    wm = weight_mean(w if w_for_mean is None else w_for_mean.float(), g) if duo_scaling else None
    alphas = alpha_grid(n_grid)
    scales = awq_scales(xm, alphas, wm)
    losses = scale_sq_errors(w, x, scales, bits, group_size, zero_point, format=spec.format) / (x.shape[0] * w.shape[0])
    best = first_min_index(losses)
    return ScaleSearch(alphas=alphas, losses=losses, scales=scales[best], best_index=best)


def clip_candidates(org_max: torch.Tensor, n_grid: int, max_shrink: float) -> list[float]:
    return [1 - i / n_grid for i in range(int(max_shrink * n_grid))]


@dataclass(frozen=True)
class ClipSearch:
    """Official ``auto_clip_layer``'s settings: candidates ``max|w_group| * (1 - i / n_grid)`` for
    ``i < max_shrink * n_grid``, scored on every ``max(1, N // n_sample_token)``-th token."""

    n_grid: int = 20
    max_shrink: float = 0.5
    n_sample_token: int = 512


def clip_errors(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec,
                clip: ClipSearch = ClipSearch()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) error of every clip candidate on ``spec``'s grid.

    Returns ``(errors [n_shrink, out, groups], org_max [out, groups])``; candidate ``i`` clips at
    ``org_max * (1 - i / n_grid)``. Error = mean over sampled tokens of the squared partial output
    error of the group (official ``auto_clip_layer``). A llama.cpp type clips per block of the type the layer
    is stored in (``spec.group``).

    The error of group ``k`` with weight difference ``d [g]`` is ``d^T G_k d / T``, ``G_k = X_k^T X_k`` the group's
    Gram matrix over the ``T`` sampled tokens: computed that way (float64) whenever the group is narrower than the
    sample, ``g / T`` of the work of the direct products ``X_k d`` (official; used otherwise, squared and averaged in
    float64). The two differ by float rounding only (``tests/test_quant.py``).
    """
    n_grid, max_shrink, n_sample_token = clip.n_grid, clip.max_shrink, clip.n_sample_token
    w, x = w.float(), x.float()
    out_f, in_f = w.shape
    g = spec.group(in_f)
    n_groups = in_f // g
    x = x.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // n_sample_token)]
    n_tok = x.shape[0]
    xg = x.reshape(n_tok, n_groups, g).transpose(0, 1)  # [groups, tok, g]
    wg = w.reshape(out_f, n_groups, g)
    org_max = wg.abs().amax(dim=-1)  # [out, groups]
    factors = clip_candidates(org_max, n_grid, max_shrink)
    if not factors:
        raise ValueError("max_shrink * n_grid must be at least 1")
    errs = torch.empty(len(factors), out_f, n_groups, dtype=torch.float64)
    grams = torch.bmm(xg.transpose(1, 2).double(), xg.double()) if g < n_tok else None  # [groups, g, g]
    # Rows in batches so the [groups, tok or g, rows] products stay bounded (official: 256 or 64 rows).
    rows = max(1, min(out_f, _CHUNK_ELEMENTS // max(1, min(n_tok, g) * n_groups * 4)))
    for r in range(0, out_f, rows):
        wb = wg[r : r + rows]  # [rb, groups, g]
        mb = org_max[r : r + rows].unsqueeze(-1)
        for i, f in enumerate(factors):
            max_val = mb * f
            cur = torch.clamp(wb, -max_val, max_val)
            d = (fake_quant(cur, spec) - wb).transpose(0, 1)  # [groups, rb, g]
            if grams is None:
                part = torch.bmm(xg, d.transpose(1, 2))  # [groups, tok, rb]
                errs[i, r : r + rows] = part.double().pow(2).mean(dim=1).T
            else:
                d = d.double()
                errs[i, r : r + rows] = (torch.bmm(d, grams) * d).sum(dim=-1).T / n_tok
    return errs, org_max


def best_clip_index(errs: torch.Tensor) -> torch.Tensor:
    """First candidate with the smallest error, strict ``<`` (the smaller shrink wins ties) -> ``[out, groups]``."""
    best = torch.full(errs.shape[1:], float("inf"), dtype=errs.dtype)
    idx = torch.zeros(errs.shape[1:], dtype=torch.long)
    for i in range(errs.shape[0]):
        better = errs[i] < best
        best = torch.where(better, errs[i], best)
        idx = torch.where(better, torch.full_like(idx, i), idx)
    return idx


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, clip: ClipSearch = ClipSearch()) -> torch.Tensor:
    """Official AWQ clip search: the per-(row, group) symmetric clip value ``[out, in // group]``."""
    errs, org_max = clip_errors(w, x, spec, clip)
    idx = best_clip_index(errs)
    factors = torch.tensor(clip_candidates(org_max, clip.n_grid, clip.max_shrink), dtype=org_max.dtype)
    return org_max * factors[idx]


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each (row, group) of ``w [out, in]`` to ``[-max_val, max_val]`` (``max_val [out, groups]``)."""
    out_f, in_f = w.shape
    mv = max_val.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.reshape(out_f, max_val.shape[1], -1), -mv, mv).reshape(out_f, in_f)
