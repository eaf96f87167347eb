"""The fused CPU kernels (core.kernels) against the plain torch code they replace: same bits, same statistics."""
from __future__ import annotations

import pytest
import torch

from core.methods import awq_search as awq
from core.model import collect
from core.grids import kernels, quant

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"fused kernels unavailable: {kernels.status()}")


@pytest.fixture(params=kernels.supported_isas())
def isa(request):
    """Each instruction set this CPU runs (AVX-512 / AVX2 / NEON and the scalar portable build): same bits."""
    kernels.set_isa(request.param)
    try:
        if not kernels.available():
            pytest.skip(f"{request.param} kernels unavailable: {kernels.status()}")
        assert kernels.isa() == request.param  # the library reports the ISA it was compiled for
        yield request.param
    finally:
        kernels.set_isa(None)


def _weights(seed: int, out: int = 48, inn: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * torch.rand(1, inn, generator=g) * 3
    w[:, :32] = 0.0  # an all-zero group
    w[1] = 5.0  # constant rows
    w[2, 40:72] = -0.0
    w[3] *= 1e-7  # tiny values: the 1e-5 clamp on the scale
    w[4, :64] = torch.arange(64, dtype=torch.float32) / 2  # exact halves: round half to even
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@needs_kernels
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("g", [32, 128, 0])
def test_pseudo_quantize_kernel_is_bit_exact(zero_point, g, isa):
    for seed in range(3):
        w = _weights(seed)
        for n_bit in (2, 3, 4, 5, 8):
            ref = quant._pseudo_quantize_torch(w, n_bit, quant.effective_group_size(256, g), zero_point)
            assert torch.equal(_bits(quant.pseudo_quantize(w, n_bit, g, zero_point)), _bits(ref))
    w = _weights(5, out=9, inn=250)  # groups of 50 and 250: vector body plus a scalar tail
    for gs in (50, 0):
        ref = quant._pseudo_quantize_torch(w, 3, quant.effective_group_size(250, gs), zero_point)
        assert torch.equal(_bits(quant.pseudo_quantize(w, 3, gs, zero_point)), _bits(ref))


def test_isa_selection(monkeypatch):
    """``$AWQ_EXPLORER_ISA`` picks the build; a name this CPU cannot run falls back to the native ISA."""
    assert kernels.supported_isas()[0] == kernels.native_isa() and kernels.supported_isas()[-1] == "portable"
    monkeypatch.setenv("AWQ_EXPLORER_ISA", "portable")
    assert kernels.requested_isa() == "portable"
    monkeypatch.setenv("AWQ_EXPLORER_ISA", "no-such-isa")
    with pytest.warns(RuntimeWarning, match="not one this CPU runs"):
        assert kernels.requested_isa() == kernels.native_isa()
    with pytest.raises(ValueError, match="unknown instruction set"):
        kernels.set_isa("sse9")


@needs_kernels
@pytest.mark.parametrize("zero_point", [True, False])
def test_scaled_fake_quant_and_multi_bit_kernel_are_bit_exact(zero_point, isa):
    w = _weights(7, out=20)
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 256, generator=g) * 4 + 0.01
    bits = [2, 3, 4, 8]
    dw = torch.empty(3, len(bits), 20, 256)
    wh = torch.empty(3, len(bits), 20, 256)
    assert kernels.fake_quant(w, s, bits, 64, zero_point, w_hat=wh, dw=dw)
    for a in range(3):
        for i, b in enumerate(bits):
            ref = quant._pseudo_quantize_torch(w * s[a].view(1, -1), b, 64, zero_point) / s[a].view(1, -1)
            assert torch.equal(_bits(wh[a, i]), _bits(ref))
            assert torch.equal(_bits(dw[a, i]), _bits(ref - w))
            assert torch.equal(_bits(awq.scaled_fake_quant(w, s[a], b, 64, zero_point)), _bits(ref))


@needs_kernels
def test_non_finite_weights_fall_back_to_torch(isa):
    w = _weights(3)
    w[5, 7] = float("nan")
    w[6, 9] = float("inf")
    assert not kernels.fake_quant(w, None, 4, 32, True, w_hat=torch.empty_like(w))
    ref = quant._pseudo_quantize_torch(w, 4, 32, True)
    assert torch.equal(quant.pseudo_quantize(w, 4, 32).isnan(), ref.isnan())
    fin = ref.isfinite()
    assert torch.equal(quant.pseudo_quantize(w, 4, 32)[fin], ref[fin])


def test_errors_without_kernels_match(monkeypatch):
    """The torch fallback gives the same losses (up to float summation order) and the same quantized weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 128, generator=g) * (torch.rand(128, generator=g) * 3 + 0.1)
    w = torch.randn(40, 128, generator=g) / 12
    scales = awq.awq_scales(x.abs().mean(0), awq.alpha_grid(8))
    fast = awq.scale_sq_errors_bits(w, x, scales, [3, 4], 32)
    w_fast, e_fast = awq.fake_quant_errors(w, scales[5], 3, 32, True, [x, x[:50]])
    monkeypatch.setattr(kernels, "_load", lambda: None)
    assert not kernels.available()
    slow = awq.scale_sq_errors_bits(w, x, scales, [3, 4], 32)
    w_slow, e_slow = awq.fake_quant_errors(w, scales[5], 3, 32, True, [x, x[:50]])
    assert torch.allclose(fast, slow, rtol=1e-6)
    assert torch.equal(w_fast, w_slow) and torch.allclose(e_fast, e_slow, rtol=1e-6)
    for i, b in enumerate([3, 4]):
        assert torch.allclose(slow[i], awq.scale_sq_errors(w, x, scales, b, 32), rtol=1e-6)


def _acts(kind: str, t: int, c: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gauss":
        return torch.randn(t, c, generator=g) * (torch.rand(c, generator=g) * 3) + torch.randn(c, generator=g)
    if kind == "ties":
        return torch.randint(-3, 4, (t, c), generator=g).float()
    if kind == "relu":
        return torch.relu(torch.randn(t, c, generator=g))
    if kind == "spiky":  # attention-sink-like rows at every sequence start
        x = torch.randn(t, c, generator=g) * 0.1
        x[::64] = 50.0
        return x
    return torch.full((t, c), 2.5)


@needs_kernels
@pytest.mark.parametrize("kind", ["gauss", "ties", "relu", "spiky", "const"])
@pytest.mark.parametrize("sizes", [(700, 700), (30, 20, 900), (9,)])
def test_channel_statistics_kernel_matches_torch(kind, sizes, isa):
    g = torch.Generator().manual_seed(len(sizes))
    batches = [_acts(kind, t, 40, g) for t in sizes]
    accs = []
    for fused in (True, False):
        acc = collect.ChannelAccumulator(40, k_extremes=64)
        acc._fused = fused
        for b in batches:
            acc.update(b)
        accs.append(acc)
    fast, slow = accs
    for side in ("hi", "lo"):  # the same multiset of extremes as the running topk
        assert torch.equal(getattr(fast, side).sort(0).values, getattr(slow, side).sort(0).values)
    rf, rs = fast.result(), slow.result()
    for f in ("mean_abs", "max_abs", "outlier_ratio", "outlier_saturated"):
        assert torch.equal(getattr(rf, f), getattr(rs, f)), f
    for f in ("mean", "std", "kurtosis"):
        assert torch.allclose(getattr(rf, f), getattr(rs, f), rtol=1e-4, atol=1e-5), f


@needs_kernels
@pytest.mark.parametrize("width", [576, 600, 1100])
def test_channel_statistics_are_the_same_bits_on_every_isa_and_thread_count(width):
    """Sums, max |x| and extremes do not depend on the ISA (vector quickselect and scan on AVX-512 / AVX2,
    Hoare partitioning on the portable build) nor on how the channels are tiled over the threads."""
    g = torch.Generator().manual_seed(width)
    batches = [_acts("gauss", t, width, g) for t in (600, 300)]
    batches[0][5::97, 3] = 40.0  # a massive-activation channel: many candidates, several cuts per batch
    results = {}
    threads = torch.get_num_threads()
    try:
        for isa in kernels.supported_isas():
            kernels.set_isa(isa)
            for nt in (1, 2, 3):
                torch.set_num_threads(nt)
                acc = collect.ChannelAccumulator(width, k_extremes=20)
                assert acc._fused
                for b in batches:
                    acc.update(b)
                results[isa, nt] = (acc.mean, acc.m2, acc.m3, acc.m4, acc.sum_abs, acc.max_abs,
                                    acc.hi.sort(0).values, acc.lo.sort(0).values)
    finally:
        torch.set_num_threads(threads)
        kernels.set_isa(None)
    ref = results[kernels.supported_isas()[-1], 1]  # portable, one thread
    for key, got in results.items():
        for a, b in zip(ref, got):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("fused", [True, False])
def test_sweep_errors_reuse_the_calibration_pass(monkeypatch, fused):
    """Held-out RTN / best-alpha errors from the calibration pass's dW equal a separate quantization's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 128, generator=g) * (torch.rand(128, generator=g) * 3 + 0.1)
    xh = torch.randn(70, 128, generator=g) * (torch.rand(128, generator=g) * 3 + 0.1)
    w = torch.randn(40, 128, generator=g) / 12
    scales = awq.awq_scales(x.abs().mean(0), awq.alpha_grid(9))
    if not fused:
        monkeypatch.setattr(kernels, "_load", lambda: None)
    old = awq._CHUNK_ELEMENTS
    try:
        # several chunks of alphas; then a bound too small to keep every bit-width's dW (separate passes)
        for chunk, bits, zp in ((6, [2, 3, 4, 8], True), (6, [3, 6], False), (1, [2, 3, 4, 8], True)):
            awq._CHUNK_ELEMENTS = chunk * w.numel()
            gs = 32 if zp else 0
            norm = float(x.shape[0] * w.shape[0])
            sw = awq.sweep_sq_errors(w, x, xh, scales, bits, gs, zp, norm=norm)
            ref = awq.scale_sq_errors_bits(w, x, scales, bits, gs, zp)
            assert torch.allclose(sw.calib, ref, rtol=1e-6)
            assert sw.best == [awq.first_min_index(c / norm) for c in sw.calib]
            rtn, aw = awq.rtn_and_scaled_sq_errors(w, xh, [None if b == 0 else scales[b] for b in sw.best], bits,
                                                   gs, zp)
            assert torch.allclose(sw.heldout_rtn, rtn, rtol=1e-6) and torch.allclose(sw.heldout_awq, aw, rtol=1e-6)
            assert any(b > 0 for b in sw.best)  # the kept-dW path is exercised
            none = awq.sweep_sq_errors(w, x, None, scales, bits, gs, zp)
            assert torch.allclose(none.calib, ref, rtol=1e-6) and none.heldout_rtn.isnan().all()
    finally:
        awq._CHUNK_ELEMENTS = old


_ALLOC_PROBE = r"""
import ctypes, json, resource, torch
from core.grids import alloc
torch.set_num_threads(1)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mmapped(mib):  # is a fresh block of this size mmapped (glibc's default over 32 MiB) or served from the heap?
    n0 = libc.mallinfo2().hblks
    t = torch.empty(mib * 2**18)  # not written: no resident memory
    n1 = libc.mallinfo2().hblks
    del t
    return n1 - n0

def faults(fn):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

def churn():  # what a layer of a forward pass does: allocate, write and free blocks over glibc's 32 MiB mmap ceiling
    for _ in range(4):
        t = torch.empty(16 * 2**20)  # 64 MiB
        t.fill_(1.0)
        del t

def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024

churn()
start = rss_mb()
out = {"available": alloc.available(), "default": faults(churn), "mmapped_before": mmapped(96)}
with alloc.keep_freed_memory():
    with alloc.keep_freed_memory():  # nests
        # glibc's heap takes a few rounds to hold free blocks that fit posix_memalign's padded requests
        out["kept"] = [faults(churn) for _ in range(6)]
        out["kept_rss_growth_mb"] = rss_mb() - start
        out["mmapped_inside"] = mmapped(96)
        # 256-512 MiB kept (glibc decides how many rounds grow the heap), against the 256 MiB floor of a small process
        out["grown_mb"] = (alloc._not_in_use(alloc._glibc()) - alloc._base) / 2**20
        out["limit_mb"] = alloc._limit / 2**20
        out["bound_default"] = alloc.bound_retained()
        out["bound_lower"] = out["bound_default"] or alloc.bound_retained(64 * 2**20)  # past a lower limit: trimmed
        out["rss_after_bound_mb"] = rss_mb() - start
        out["bound_again"] = alloc.bound_retained()
        out["kept_after_bound"] = faults(churn)  # the heap's blocks are still there: faulted in again, not grown
        out["rss_growth_before_exit_mb"] = rss_mb() - start
out["rss_growth_after_exit_mb"] = rss_mb() - start
out["mmapped_after"] = mmapped(2048)  # more than the heap holds free
out["depth"] = alloc._depth
print(json.dumps(out))
"""


def test_keep_freed_memory_stops_refaulting_and_gives_memory_back():
    """core.alloc under glibc: 64 MiB blocks are page-faulted in afresh on every allocation by default (16,384
    pages each) and reuse the heap inside keep_freed_memory; bound_retained returns what is kept once it has grown
    past its limit; after the outermost exit the kept memory is returned
    (malloc_trim) and a block larger than the heap now holds free is mmapped again, as glibc does by default."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", _ALLOC_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["available"]:
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    pages = 4 * 16 * 2**20 * 4 // 4096
    assert out["default"] >= 0.9 * pages, out  # the problem it solves
    assert out["mmapped_before"] == 1, out
    assert out["kept"][-1] < 0.05 * pages, out  # the steady state: the heap's free blocks are reused
    assert out["kept_rss_growth_mb"] < 1024, out  # bounded: a few rounds' worth at most
    assert out["mmapped_inside"] == 0, out
    # bound_retained gives the kept memory back once it has grown past its limit, and only then
    assert out["bound_default"] is (out["grown_mb"] > out["limit_mb"]), out
    assert out["bound_lower"] is True and out["rss_after_bound_mb"] < 64, out
    assert out["bound_again"] is False, out
    assert out["kept_after_bound"] >= 0.9 * pages // 4 and out["rss_growth_before_exit_mb"] < 300, out
    assert out["rss_growth_after_exit_mb"] < 32, out
    assert out["mmapped_after"] == 1, out  # glibc's behaviour is back
    assert out["depth"] == 0


def test_keep_freed_memory_restores_on_error():
    from core.grids import alloc

    with pytest.raises(collect.CollectError):
        with alloc.keep_freed_memory():
            raise collect.CollectError("boom")
    assert alloc._depth == 0


def test_allocator_scope_only_for_blocks_over_glibcs_mmap_ceiling():
    """collect enters keep_freed_memory only when a batch's [tokens, widest linear] activations are over 32 MiB
    (SmolLM2 at 4096 tokens: 25 MB, served from glibc's heap already; the Qwen2.5-0.5B shape: 80 MB)."""
    import contextlib

    from core.grids import alloc

    assert isinstance(alloc.for_blocks_of(32 * 2**20), contextlib.nullcontext)
    assert not isinstance(alloc.for_blocks_of(32 * 2**20 + 1), contextlib.nullcontext)
