"""GPTQ: against a straight transcription of the reference loop, and the invariants DESIGN.md section 2 names."""
from __future__ import annotations

import copy

import pytest
import torch

from core.grids import quant
from core.grids.spec import QuantSpec
from core.methods import gptq as gptq_mod
from core.gptq import gptq_quantize
from core.quant import pseudo_quantize


class RefQuantizer:
    """The reference's ``Quantizer`` object, with core.quant's grid in ``find_params`` (the agreed difference)."""

    def __init__(self, n_bit, zero_point):
        self.n_bit, self.zero_point, self.qp = n_bit, zero_point, None

    def find_params(self, x, weight=True):
        self.qp = quant.choose_qparams(x, self.n_bit, self.zero_point)

    def ready(self):
        return self.qp is not None

    def quantize(self, x):
        q = torch.clamp(torch.round(x / self.qp.scale) + self.qp.zero, self.qp.min_int, self.qp.max_int)
        return self.qp.scale * (q - self.qp.zero)


def reference_fasterquant(W, H, n_bit, groupsize, zero_point=True, blocksize=128, percdamp=.01,
                          actorder=False, static_groups=False):
    """IST-DASLab/gptq GPTQ.fasterquant, transcribed as the oracle (only the quantizer's grid replaced)."""
    W = W.clone().float()
    H = H.clone().float()
    columns = W.shape[1]
    quantizer = RefQuantizer(n_bit, zero_point)
    if groupsize == -1:
        quantizer.find_params(W, weight=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            qz = copy.deepcopy(quantizer)
            qz.find_params(W[:, i:(i + groupsize)], weight=True)
            groups.append(qz)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)], weight=True)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q = quantizer.quantize(w.unsqueeze(1)).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q


def correlated(n=512, d=128, out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix * (1 + 4 * torch.rand(d, generator=g))
    w = torch.randn(out, d, generator=g) * 0.05
    return w, x


def out_err(x, w, w_hat):
    return float((x @ (w - w_hat).T).double().pow(2).sum() / (x @ w.T).double().pow(2).sum())


@pytest.mark.parametrize("g", [0, 32])
@pytest.mark.parametrize("zp", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_rtn(g, zp, act_order):
    w, _ = correlated()
    q = gptq_quantize(w, torch.eye(w.shape[1]), n_bit=3, group_size=g, zero_point=zp, act_order=act_order,
                      static_groups=act_order and g > 0)
    assert torch.equal(q, pseudo_quantize(w, 3, g, zp))


@pytest.mark.parametrize("g,block,act,static,zp", [
    (0, 128, False, False, True), (32, 128, False, False, True), (32, 32, False, False, True),
    (32, 48, True, False, True), (32, 128, True, True, True), (32, 128, False, True, False),
    (0, 64, True, False, False), (64, 128, True, False, True),
])
def test_matches_reference_transcription(g, block, act, static, zp):
    w, x = correlated(seed=3)
    H = 2 / x.shape[0] * x.T @ x
    w0, H0 = w.clone(), H.clone()
    got = gptq_quantize(w, H, n_bit=3, group_size=g, zero_point=zp, block_size=block, act_order=act,
                        static_groups=static)
    ref = reference_fasterquant(w, H, 3, g if g > 0 else -1, zp, block, actorder=act, static_groups=static)
    assert torch.equal(w, w0) and torch.equal(H, H0)  # inputs not modified
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert abs(out_err(x, w, got) - out_err(x, w, ref)) <= 0.01 * out_err(x, w, ref)


@pytest.mark.parametrize("g", [0, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_calibration_error_below_rtn(g, bits):
    w, x = correlated(seed=1)
    H = x.T @ x
    e_gptq = out_err(x, w, gptq_quantize(w, H, n_bit=bits, group_size=g))
    e_rtn = out_err(x, w, pseudo_quantize(w, bits, g))
    assert e_gptq < e_rtn
    # any positive multiple of X^T X gives the same result up to float rounding
    assert torch.allclose(gptq_quantize(w, 7.0 * H, n_bit=bits, group_size=g),
                          gptq_quantize(w, H, n_bit=bits, group_size=g), rtol=1e-4, atol=1e-6)


def test_dead_channels():
    w, x = correlated(seed=2)
    x[:, [5, 77]] = 0
    H = x.T @ x
    q = gptq_quantize(w, H, n_bit=4, group_size=32)
    assert torch.isfinite(q).all()
    assert torch.equal(q[:, [5, 77]], torch.zeros(w.shape[0], 2))
    assert torch.allclose(q, reference_fasterquant(w, H, 4, 32), rtol=1e-5, atol=1e-7)
    # per-row grid: computed from w *before* the dead columns are zeroed (their weights still set the range)
    w2 = w.clone()
    w2[0, 5] = 10.0
    q2 = gptq_quantize(w2, H, n_bit=4, group_size=0)
    assert torch.allclose(q2, reference_fasterquant(w2, H, 4, -1), rtol=1e-5, atol=1e-7)
    step = 10.0 / 15  # the row's range includes the dead weight 10.0
    assert (q2[0, 6:] - q2[0, 6:].min()).div(step).sub((q2[0, 6:] - q2[0, 6:].min()).div(step).round()).abs().max() < 1e-3


def test_act_order_restores_column_order():
    w, x = correlated(seed=4)
    H = x.T @ x
    perm = torch.argsort(torch.diag(H), descending=True)
    inv = torch.argsort(perm)
    # per-row grids are invariant under a column permutation: act_order == GPTQ on the permuted problem, unpermuted
    manual = gptq_quantize(w[:, perm], H[perm][:, perm], n_bit=3, group_size=0)[:, inv]
    assert torch.allclose(gptq_quantize(w, H, n_bit=3, group_size=0, act_order=True), manual, rtol=1e-5, atol=1e-7)
    # with a diagonal Hessian nothing propagates: act_order is RTN, column for column
    d = torch.diag(torch.diag(H))
    assert torch.equal(gptq_quantize(w, d, n_bit=3, group_size=0, act_order=True), pseudo_quantize(w, 3, 0))


def test_static_groups_use_original_groups_grid():
    w, x = correlated(seed=5)
    H = x.T @ x
    g, bits = 32, 3
    q = gptq_quantize(w, H, n_bit=bits, group_size=g, act_order=True, static_groups=True)
    qp = quant.choose_qparams(w.reshape(-1, g), bits, True)  # grids of the original groups of w
    levels = q.reshape(-1, g) / qp.scale + qp.zero
    assert (levels - levels.round()).abs().max() < 1e-3
    assert levels.round().min() >= 0 and levels.round().max() <= 2**bits - 1
    # not static: groups are runs of permuted columns, so the original groups' grids do not hold
    q2 = gptq_quantize(w, H, n_bit=bits, group_size=g, act_order=True, static_groups=False)
    levels2 = q2.reshape(-1, g) / qp.scale + qp.zero
    assert (levels2 - levels2.round()).abs().max() > 1e-2


def test_block_size_matters_for_grouped_grids():
    w, x = correlated(seed=6)
    H = x.T @ x
    a = gptq_quantize(w, H, n_bit=3, group_size=32, block_size=32)
    b = gptq_quantize(w, H, n_bit=3, group_size=32, block_size=128)
    assert not torch.allclose(a, b)
    # per-row grid: the block size only changes float summation order
    c = gptq_quantize(w, H, n_bit=3, group_size=0, block_size=32)
    d = gptq_quantize(w, H, n_bit=3, group_size=0, block_size=128)
    assert (c != d).float().mean() < 0.01


def test_bad_input():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(w, torch.eye(32), n_bit=4, group_size=32)
    with pytest.raises(ValueError, match="divide"):
        gptq_quantize(w, torch.eye(64), n_bit=4, group_size=48)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, torch.eye(64), n_bit=1, group_size=32)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, -torch.eye(64), n_bit=4, group_size=32)


@pytest.mark.parametrize("n", [1, 5, 130, 1100])
def test_inverse_cholesky_in_place_is_the_references_chain(n):
    # the reference's three calls read only the lower triangle; the in-place version must too, bit for bit, and
    # write into the matrix it is given
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n + 3, n, generator=g)
    h = x.T @ x + 0.5 * torch.eye(n)
    if n > 1:
        r, c = torch.triu_indices(n, n, 1)
        h[r, c] += 1e-3 * torch.randn(r.numel(), generator=g)  # an upper triangle the reference never reads
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = h.clone()
    got = gptq_mod._inverse_cholesky_(work)
    assert torch.equal(got, ref)
    assert got.untyped_storage().data_ptr() == work.untyped_storage().data_ptr()


def test_consumed_hessian_gives_the_same_weights_and_a_late_nan_is_refused():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(16, 1030, generator=g), torch.randn(2000, 1030, generator=g)
    h = x.T @ x
    spec = QuantSpec(4, 103 * 2)
    kept = h.clone()
    a, _ = gptq_mod.gptq_grid(w, h, spec)
    assert torch.equal(h, kept)  # not consumed: untouched
    b, _ = gptq_mod.gptq_grid(w, h.clone(), spec, consume_hessian=True)
    assert torch.equal(a, b)
    bad = h.clone()
    bad[1029, 3] = float("nan")  # in the last row strip the finiteness check reads
    with pytest.raises(ValueError, match="NaN"):
        gptq_mod.gptq_grid(w, bad, spec)
