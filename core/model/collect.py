"""Forward hooks that stream per-input-channel statistics, plus a bounded sample of input rows.

Hook point names are the linears' module paths (``model.layers.3.mlp.down_proj``); linears that read
the same tensor (q/k/v, gate/up) share one *input key*: the name of the first of them to run.
Statistics are merged batch by batch (Chan/Pebay central-moment merges in float64), so no activation
is kept except the sample rows. The forward pass stops after the last block (no head, no logits).
"""
from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..grids import alloc, kernels
from .models import LoadedModel
from .linears import find_blocks

Progress = Callable[[float, str], None]
OUTLIER_SIGMA = 6.0

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model object: sessions that share a loaded model run their hooked passes (and whole-model
    fake quantization, which rewrites weights in place) one at a time. Re-entrant, so code holding it can
    read weights through ``Analysis.weight``."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class CollectError(RuntimeError):
    """A collection pass that cannot produce valid statistics (e.g. NaN/inf activations)."""


class _StopForward(Exception):
    pass


class ChannelAccumulator:
    """Streaming per-channel moments of ``x [tokens, in]`` batches.

    Keeps count, mean, central sums M2..M4 (float64), sum |x|, max |x| and the ``k`` largest and
    smallest values per channel (to count 6-sigma outliers exactly once the pooled mean/std are known).
    """

    def __init__(self, n_features: int, k_extremes: int = 64):
        self.n = 0
        self.k = int(k_extremes)
        z = lambda: torch.zeros(n_features, dtype=torch.float64)  # noqa: E731
        self.mean, self.m2, self.m3, self.m4, self.sum_abs = z(), z(), z(), z(), z()
        self.max_abs = torch.zeros(n_features, dtype=torch.float32)
        self._hi: torch.Tensor | None = None
        self._lo: torch.Tensor | None = None
        # fused mode: one C pass per batch, the extremes kept per channel [in, k] (the first `_filled` entries:
        # the same multiset of values as the torch path's running topk, which stays the fallback)
        self._fused = kernels.available() and self.k > 0
        self._heap_hi: torch.Tensor | None = None
        self._heap_lo: torch.Tensor | None = None
        self._filled = 0

    @property
    def hi(self) -> torch.Tensor | None:
        """The ``min(k, n)`` largest values seen per channel ``[kept, in]`` (in no particular order)."""
        if self._heap_hi is not None:
            return self._heap_hi[:, : self._filled].T
        return self._hi

    @property
    def lo(self) -> torch.Tensor | None:
        """The ``min(k, n)`` largest values of ``-x`` per channel ``[kept, in]``."""
        if self._heap_lo is not None:
            return self._heap_lo[:, : self._filled].T
        return self._lo

    def _batch_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(c, s1, s2, s3, s4)``: the shift and the sums of ``(x - c)^1..4`` (float32 powers, float64 sums);
        also updates ``sum_abs``, ``max_abs`` and the extremes."""
        nb = x.shape[0]
        if self._fused:
            first = self._heap_hi is None
            if first:
                self._heap_hi = torch.empty(x.shape[1], self.k, dtype=torch.float32)
                self._heap_lo = torch.empty(x.shape[1], self.k, dtype=torch.float32)
            # shift: the kernel's sample mean in the first batch, then the running mean; any shift near the mean
            # keeps the float32 differences accurate, and the central moments below are exact for any shift
            c = torch.empty(x.shape[1], dtype=torch.float32) if first else self.mean.float()
            r = kernels.channel_stats_update(x.contiguous(), c, self.max_abs, self._heap_hi, self._heap_lo,
                                             self._filled, first=first)
            if r is not None:
                sums, self._filled = r
                self.sum_abs += sums[4]
                return c, sums[0], sums[1], sums[2], sums[3]
            self._fused = False  # pragma: no cover - kernels vanished: continue on the torch path
            if first:
                self._heap_hi = self._heap_lo = None
            else:
                self._hi = self._heap_hi[:, : self._filled].T.contiguous()
                self._lo = self._heap_lo[:, : self._filled].T.contiguous()
                self._heap_hi = self._heap_lo = None
        c = x.mean(0)
        d = x - c
        d2 = d * d
        s1 = d.sum(0, dtype=torch.float64)
        s2 = d2.sum(0, dtype=torch.float64)
        s3 = (d2 * d).sum(0, dtype=torch.float64)
        s4 = (d2 * d2).sum(0, dtype=torch.float64)
        xa = x.abs()
        self.sum_abs += xa.sum(0, dtype=torch.float64)
        self.max_abs = torch.maximum(self.max_abs, xa.amax(0))
        k = min(self.k, nb)
        hi = x.topk(k, dim=0).values
        lo = (-x).topk(k, dim=0).values
        if self._hi is not None:
            hi = torch.cat([self._hi, hi]).topk(min(self.k, self._hi.shape[0] + k), dim=0).values
            lo = torch.cat([self._lo, lo]).topk(min(self.k, self._lo.shape[0] + k), dim=0).values
        self._hi, self._lo = hi, lo
        return c, s1, s2, s3, s4

    def update(self, x: torch.Tensor) -> None:
        # The statistics live on the CPU (the fused kernels too): a GPU batch is reduced here after one copy.
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        nb = x.shape[0]
        if nb == 0:
            return
        c, s1, s2, s3, s4 = self._batch_sums(x)
        # raw moments about c -> central moments about the exact batch mean
        mb = c.double() + s1 / nb
        e = s1 / nb
        m2b = s2 - nb * e * e
        m3b = s3 - 3 * e * s2 + 2 * nb * e**3
        m4b = s4 - 4 * e * s3 + 6 * e * e * s2 - 3 * nb * e**4
        if not (torch.isfinite(s2).all() and torch.isfinite(s4).all()):
            raise CollectError("non-finite")
        na, n = self.n, self.n + nb
        if na == 0:
            self.mean, self.m2, self.m3, self.m4 = mb, m2b, m3b, m4b
        else:
            delta = mb - self.mean
            m2a, m3a = self.m2, self.m3
            self.m4 = (self.m4 + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                       + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
                       + 4 * delta * (na * m3b - nb * m3a) / n)
            self.m3 = m3a + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * m2a) / n
            self.m2 = m2a + m2b + delta**2 * na * nb / n
            self.mean = self.mean + delta * nb / n
        self.n = n

    def result(self) -> "ChannelStats":
        n = max(self.n, 1)
        var = (self.m2 / n).clamp(min=0)
        std = var.sqrt()
        kurt = torch.where(var > 0, (self.m4 / n) / (var * var).clamp(min=1e-300) - 3.0, torch.zeros_like(var))
        hi = self.hi.double() if self.hi is not None and self.n else torch.zeros(1, var.numel(), dtype=torch.float64)
        lo = self.lo.double() if self.lo is not None and self.n else torch.zeros(1, var.numel(), dtype=torch.float64)
        thr = OUTLIER_SIGMA * std
        above = (hi - self.mean > thr).sum(0)
        below = (-lo - self.mean < -thr).sum(0)
        saturated = (above >= hi.shape[0]) | (below >= lo.shape[0])
        ratio = ((above + below).double() / n).where(std > 0, torch.zeros_like(var))
        return ChannelStats(
            n=self.n, mean_abs=(self.sum_abs / n).float(), max_abs=self.max_abs.clone(),
            mean=self.mean.float(), std=std.float(), kurtosis=kurt.float(), outlier_ratio=ratio.float(),
            outlier_saturated=saturated & (std > 0),
        )


@dataclass(frozen=True)
class ChannelStats:
    """Per-input-channel statistics of one distinct input, pooled over all calibration tokens. ``[in]`` each."""

    n: int
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kurtosis: torch.Tensor
    outlier_ratio: torch.Tensor  # a lower bound where outlier_saturated (more than k extremes beyond 6 std)
    outlier_saturated: torch.Tensor


@dataclass
class Collected:
    """What one collection pass produced. ``input_of`` maps every linear to its input key."""

    input_of: dict[str, str]
    stats: dict[str, ChannelStats]
    calib_sample: dict[str, torch.Tensor]  # input key -> [rows, in] float32
    heldout_sample: dict[str, torch.Tensor]
    n_tokens: int
    sample_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # input key -> X^T X over all calibration tokens as its packed upper triangle, float32 [in(in+1)/2]
    # (core.store.pack_symmetric's layout, the cache's; empty unless collect(hessians=True))
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)


HESSIAN_BLOCK = 128
# Float64 X^T X accumulators kept while collecting, at most (a bound on memory, not on the cache entry), counted
# as whole squares (GramLower keeps ~(1 + 128/in)/2 of that, and packs them to float32 halves before the
# held-out pass). Whole width classes are kept, narrowest first, while their upper bound (every linear of that
# width counted as its own input) fits: SmolLM2-135M keeps all of them (<= 1.04 GB), a Qwen2.5-0.5B-shaped model
# its 896-wide inputs (0.46 GB) but not its 4864-wide down_proj inputs (4.5 GB, and +170% collection FLOPs);
# GPTQ then uses the kept sample's X^T X for those layers (core.methods), and the UI says which Hessian it used.
HESSIAN_BUDGET_BYTES = 2**30


def hessian_widths(widths: list[int], budget_bytes: int = HESSIAN_BUDGET_BYTES) -> set[int]:
    """The input widths whose X^T X accumulators are kept: whole classes, narrowest first, within the budget.

    ``widths``: the input width of every quantizable linear (shared inputs counted once per linear, an upper
    bound of the memory actually used)."""
    keep: set[int] = set()
    used = 0
    for w in sorted(set(widths)):
        need = 8 * w * w * sum(1 for x in widths if x == w)
        if used + need > budget_bytes:
            break
        keep.add(w)
        used += need
    return keep


def mirror_lower_(h: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Copy the lower triangle of the square ``h`` onto its upper one, in place, a strip of ``block`` rows at a time
    (exact copies: a -0.0 stays -0.0). Returns ``h``."""
    n = h.shape[0]
    for j in range(0, n, block):
        b = min(block, n - j)
        d = h[j : j + b, j : j + b]
        r, c = torch.triu_indices(b, b, 1, device=h.device)
        d[r, c] = d[c, r]
        h[j : j + b, j + b :] = h[j + b :, j : j + b].T
    return h


CONSUME_TRIM_BYTES = 32 * 2**20  # GramLower.full(consume=True) gives freed panels back this often


class GramLower:
    """A streamed ``X^T X`` of one input, kept as float64 column panels on and below the diagonal blocks.

    Panel ``j`` holds ``H[j:, j:j+b]`` (``[in - j, b]``): ``(1 + b / in) / 2`` of the square (0.57 for in = 896,
    b = 128) in memory, and each ``add`` is one float32 GEMM per panel, ``x[:, j:].T @ x[:, j:j+b]``, about that
    share of a full ``X^T X`` GEMM, added into the float64 panel (the sum over batches is what needs float64)."""

    def __init__(self, n: int, block: int = HESSIAN_BLOCK, device: torch.device | str = "cpu"):
        self.n, self.block = int(n), int(block)
        self.panels = [torch.zeros(self.n - j, min(self.n, j + self.block) - j, dtype=torch.float64, device=device)
                       for j in range(0, self.n, self.block)]

    def add(self, x: torch.Tensor) -> None:
        """``H += x^T x`` for ``x [tokens, in]`` float32."""
        for p, j in zip(self.panels, range(0, self.n, self.block)):
            p += x[:, j:].T @ x[:, j : j + p.shape[1]]

    def full(self, dtype: torch.dtype = torch.float64, *, consume: bool = False) -> torch.Tensor:
        """The symmetric ``[in, in]`` matrix (its lower triangle mirrored, as ``packed`` reads it), in ``dtype``
        (float32: the same values as the float64 one converted, without it). Built in place, panel by panel: one
        matrix in memory (a 8960-wide input's float64 square is 612 MiB; whole-matrix ``tril`` arithmetic took
        four of them).

        ``consume``: each panel is freed once copied and its pages given back every ``CONSUME_TRIM_BYTES``, so the
        panels and the square are not both resident (the square's pages are touched in about the proportion the
        panels are freed: a 8960-wide input peaks at ~330 MiB instead of 616 in float32); the accumulator is empty
        afterwards."""
        if self.panels is None:
            raise RuntimeError("this X^T X was consumed by full(consume=True)")
        h = torch.empty(self.n, self.n, dtype=dtype, device=self.panels[0].device if self.panels else "cpu")
        panels, freed = self.panels, 0
        if consume:
            self.panels = None
        for k, j in enumerate(range(0, self.n, self.block)):
            p = panels[k]
            b = p.shape[1]
            h[j:, j : j + b] = p
            if consume:
                freed += p.numel() * p.element_size()
                panels[k] = p = None
                if freed >= CONSUME_TRIM_BYTES and h.device.type == "cpu":
                    alloc.give_back(0)
                    freed = 0
        return mirror_lower_(h, self.block)

    def packed(self) -> torch.Tensor:
        """The upper triangle of ``H`` row by row as float32 ``[in(in+1)/2]`` (``core.store.pack_symmetric``'s
        layout): row ``i`` of the upper triangle is column ``i`` of the lower one, read down from the diagonal."""
        return torch.cat([torch.take(p.cpu().float(), _lower_by_columns(*p.shape)) for p in self.panels])


@functools.lru_cache(maxsize=64)
def _lower_by_columns(rows: int, cols: int) -> torch.Tensor:
    """Flat indices into a row-major ``[rows, cols]`` panel of its entries on and below the diagonal, column by
    column (each column from the diagonal down)."""
    r, c = torch.triu_indices(cols, rows)  # r: the column, c >= r: the row, in column-then-row order
    return c * cols + r


def sample_indices(n_total: int, k: int, seed: int) -> torch.Tensor:
    """A reproducible sorted sample of ``min(k, n_total)`` token positions."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[: min(int(k), n_total)].sort().values


def _forward_blocks(lm: LoadedModel, ids: torch.Tensor) -> None:
    """Run the model on ``ids`` up to the end of its last block."""
    kw = {"use_cache": False} if lm.is_causal else {}
    try:
        lm.model(input_ids=ids.to(lm.device), **kw)
    except _StopForward:
        pass


def _between_layers(module: nn.Module, args: tuple, output: object) -> None:
    alloc.bound_retained()  # a forward hook on every block: what keep_freed_memory keeps stays bounded


def _allocator_scope(lm: LoadedModel, ids: torch.Tensor, batch_tokens: int):
    """core.alloc's scope for a forward over ``ids [n, seqlen]`` in batches: the largest temporaries of a batch are
    ``[tokens, widest linear]`` in the model's dtype."""
    width = max((max(li.in_features, li.out_features) for li in lm.linears), default=0)
    tokens = min(int(ids.numel()), max(1, int(batch_tokens) // max(1, ids.shape[-1])) * ids.shape[-1])
    itemsize = next(lm.model.parameters()).element_size()  # activations come out in the weights' dtype
    return alloc.for_blocks_of(tokens * width * itemsize)


def bare_forward(lm: LoadedModel, calib: torch.Tensor, batch_tokens: int = 4096) -> None:
    """The forward pass :func:`collect` runs over ``calib [n, seqlen]`` (same batches, same allocator scope, up to
    the end of the last block), without its statistics hooks: the benchmark's baseline for their cost."""
    _, blocks = find_blocks(lm.model)

    def stop_hook(module, args, output):
        raise _StopForward

    with model_lock(lm.model), torch.no_grad(), _allocator_scope(lm, calib, batch_tokens):
        handles = [b.register_forward_hook(_between_layers) for b in blocks]
        handles.append(blocks[len(blocks) - 1].register_forward_hook(stop_hook))
        try:
            for b in _batches(calib, batch_tokens):
                _forward_blocks(lm, b)
        finally:
            for h in handles:
                h.remove()


def _batches(blocks: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    per = max(1, int(batch_tokens) // blocks.shape[1])
    return [blocks[i : i + per] for i in range(0, blocks.shape[0], per)]


def collect(
    lm: LoadedModel,
    calib: torch.Tensor,
    heldout: torch.Tensor | None = None,
    *,
    sample_rows: int = 512,
    heldout_rows: int = 512,
    seed: int = 0,
    batch_tokens: int = 4096,
    k_extremes: int | None = None,
    progress: Progress | None = None,
    hessians: bool = False,
    hessian_budget_bytes: int = HESSIAN_BUDGET_BYTES,
) -> Collected:
    """Stream statistics over ``calib [n, seqlen]`` token blocks and keep sample rows of every distinct input.

    ``hessians``: also accumulate ``X^T X`` of every distinct input over all calibration tokens (GPTQ's Hessian,
    up to a factor) in the same pass (:class:`GramLower`: float32 GEMMs added into float64 panels, at most
    8 bytes * in^2 per distinct input while collecting), for the input widths that :func:`hessian_widths` keeps
    within ``hessian_budget_bytes``; returned packed as float32 (the cache's layout, 2 bytes * in^2).

    Hooks are always removed, also on error. Concurrent calls on the same model run one after another.
    """
    progress = progress or (lambda f, m: None)
    names = [li.name for li in lm.linears]
    feats = {li.name: li.in_features for li in lm.linears}
    n_total = int(calib.numel())
    k_ext = int(k_extremes) if k_extremes else max(64, n_total // 100)
    calib_idx = sample_indices(n_total, sample_rows, seed)
    held_total = int(heldout.numel()) if heldout is not None else 0
    held_idx = sample_indices(held_total, heldout_rows, seed + 1) if held_total else None

    input_of: dict[str, str] = {}
    acc: dict[str, ChannelAccumulator] = {}
    # the kept rows, written in place into one preallocated [rows, in] float32 tensor per input (no per-batch
    # pieces and no final concatenation: that held two copies of ~0.4 GB at the end of a Qwen2.5-0.5B pass)
    samples: dict[str, torch.Tensor] = {}
    hess: dict[str, GramLower] = {}
    hess_widths = hessian_widths(list(feats.values()), hessian_budget_bytes) if hessians else set()
    state = {"offset": 0, "idx": calib_idx, "stats": True, "first": True}
    seen: dict[tuple, tuple[weakref.ref, int, str]] = {}

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if state["first"]:
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
                hit = seen.get(key)
                if hit is not None and hit[0]() is not None and hit[1] == x._version:
                    input_of[name] = hit[2]
                    return
                seen[key] = (weakref.ref(x), x._version, name)
                input_of[name] = name
            if input_of.get(name) != name:
                return
            x2 = x.detach().reshape(-1, x.shape[-1])
            if state["stats"]:
                a = acc.setdefault(name, ChannelAccumulator(feats[name], k_ext))
                try:
                    a.update(x2)
                except CollectError:
                    raise CollectError(
                        f"NaN or inf in the activations entering {name} (overflow in {lm.dtype}? try float32)"
                    ) from None
                if x2.shape[1] in hess_widths:
                    if name not in hess:
                        hess[name] = GramLower(x2.shape[1], device=x2.device)
                    hess[name].add(x2.float())
            off, idx = state["offset"], state["idx"]
            lo = int(torch.searchsorted(idx, off))
            hi = int(torch.searchsorted(idx, off + x2.shape[0]))
            if hi > lo:
                buf = samples.get(name)
                if buf is None:
                    buf = samples[name] = torch.empty(idx.numel(), x2.shape[1], dtype=torch.float32)
                rows = buf[lo:hi]
                rows.copy_(x2[(idx[lo:hi] - off).to(x2.device)])
                # (with statistics on, a NaN/inf anywhere in x has already raised through the moment sums)
                if not state["stats"] and not torch.isfinite(rows).all():
                    raise CollectError(f"NaN or inf in the activations entering {name}")
        return hook

    def stop_hook(module, args, output):
        raise _StopForward

    mods = lm.modules
    _, blocks = find_blocks(lm.model)
    # core.alloc: the forward's temporaries over 32 MiB reuse the heap instead of being page-faulted in afresh in
    # every layer (~10% of a pass otherwise, and the pass's length no longer depends on heap history)
    with model_lock(lm.model), torch.no_grad(), _allocator_scope(lm, calib, batch_tokens):
        handles = [mods[n].register_forward_pre_hook(pre_hook(n)) for n in names]
        handles += [b.register_forward_hook(_between_layers) for b in blocks]
        handles.append(blocks[len(blocks) - 1].register_forward_hook(stop_hook))
        try:
            batches = _batches(calib, batch_tokens)
            n_steps = len(batches) + (len(_batches(heldout, batch_tokens)) if held_total else 0)
            step = 0
            for b in batches:
                _forward_blocks(lm, b)
                state["first"] = False
                seen.clear()
                state["offset"] += b.numel()
                step += 1
                progress(step / n_steps, f"calibration batch {step}/{len(batches)} ({state['offset']} tokens)")
            calib_samples = dict(samples)
            samples.clear()
            # packed float32 before the held-out pass: its samples then take the room of the float64 panels
            hessians_packed = {k: g.packed() for k, g in hess.items()}
            hess.clear()
            heldout_samples: dict[str, torch.Tensor] = {}
            if held_total:
                state.update(offset=0, idx=held_idx, stats=False)
                for b in _batches(heldout, batch_tokens):
                    _forward_blocks(lm, b)
                    state["offset"] += b.numel()
                    step += 1
                    progress(step / n_steps, f"held-out batch ({state['offset']} tokens)")
                heldout_samples = dict(samples)
        finally:
            for h in handles:
                h.remove()
    missing = [n for n in names if n not in input_of]
    if missing:
        raise CollectError(f"{len(missing)} linears never ran during the forward pass (e.g. {missing[0]})")
    return Collected(
        input_of=input_of,
        stats={k: a.result() for k, a in acc.items()},
        calib_sample=calib_samples,
        heldout_sample=heldout_samples,
        n_tokens=n_total,
        sample_index=calib_idx,
        hessians=hessians_packed,
    )
