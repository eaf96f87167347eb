"""The quantizer and the searches: hand-computed cases, the official reference, and invariants."""
from __future__ import annotations

import pytest
import torch

from core import awq as awq_api
from core.grids.spec import QuantSpec
from core.methods import awq_search as awq
from core.quant import pseudo_quantize


def llm_awq_reference(w, n_bit, q_group_size, zero_point=True):
    """llm-awq's pseudo_quantize_tensor (zero-point branch), transcribed as the oracle for bit-exactness."""
    org_w_shape = w.shape
    if q_group_size > 0:
        assert org_w_shape[-1] % q_group_size == 0
        w = w.reshape(-1, q_group_size)
    assert w.dim() == 2
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int = 2**n_bit - 1
    min_int = 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


def test_hand_computed_asymmetric():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.2]])
    # scale = 3/3 = 1, zero = -round(-1) = 1; round half to even sends 0.5 to 0
    assert torch.equal(pseudo_quantize(w, 2, 4), torch.tensor([[-1.0, 0.0, 2.0, 0.0]]))
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0]])
    # two groups of 4. The official zero point is clamped into [0, 2^n - 1], so an all-positive group
    # loses its offset: [1, 2, 3, 4] has scale 1, zero clamp(-1) = 0, and 4 saturates at level 3.
    q = pseudo_quantize(w, 2, 4)
    assert torch.equal(q[0], torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 3.0]))
    # a constant positive group: scale clamps to 1e-5 / 3 and every value collapses to 3 * scale
    q = pseudo_quantize(torch.full((1, 4), 10.0), 2, 4)
    assert torch.allclose(q, torch.full((1, 4), 1e-5))


def test_hand_computed_symmetric():
    w = torch.tensor([[-3.0, 1.4, 0.5, 2.0]])
    # 3 bits: absmax 3, scale 3/3 = 1, levels -4..3; 1.4 -> 1, 0.5 -> 0 (half to even)
    assert torch.equal(pseudo_quantize(w, 3, 4, zero_point=False), torch.tensor([[-3.0, 1.0, 0.0, 2.0]]))
    w = torch.tensor([[1.0, -0.25, 0.3, 0.0]])
    # the largest |w| maps exactly onto the top level (the seed clipped it)
    q = pseudo_quantize(w, 4, 0, zero_point=False)
    assert q[0, 0] == 1.0


@pytest.mark.parametrize("n_bit", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("g", [32, 128, 0])
def test_bit_exact_with_llm_awq(n_bit, g):
    torch.manual_seed(n_bit * 100 + g)
    w = torch.randn(96, 256) * torch.rand(1, 256) * 3
    ref = llm_awq_reference(w.clone(), n_bit, g if g > 0 else -1) if g > 0 else \
        llm_awq_reference(w.clone().reshape(-1, 256), n_bit, 256)
    assert torch.equal(pseudo_quantize(w, n_bit, g), ref)


@pytest.mark.parametrize("n_bit", [2, 3, 4])
@pytest.mark.parametrize("zero_point", [True, False])
def test_at_most_2n_levels_per_group(n_bit, zero_point):
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    q = pseudo_quantize(w, n_bit, 32, zero_point).reshape(-1, 32)
    for row in q:
        assert row.unique().numel() <= 2**n_bit


@pytest.mark.parametrize("n_bit", [2, 3, 4, 8])
def test_symmetric_levels(n_bit):
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    g = w.reshape(-1, 32)
    scale = g.abs().amax(1, keepdim=True) / (2 ** (n_bit - 1) - 1)
    levels = pseudo_quantize(w, n_bit, 32, zero_point=False).reshape(-1, 32) / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().min() >= -(2 ** (n_bit - 1)) and levels.round().max() <= 2 ** (n_bit - 1) - 1
    assert (levels.round().abs().amax(1) == 2 ** (n_bit - 1) - 1).all()  # absmax is representable


def test_bad_arguments():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="does not divide"):
        pseudo_quantize(w, 4, 48)
    for bad in (1, 9, 0):
        with pytest.raises(ValueError, match="between 2 and 8"):
            pseudo_quantize(w, bad, 32)


def _layer(seed=0, out=48, inn=128, tokens=300):
    torch.manual_seed(seed)
    x = torch.randn(tokens, inn) * (torch.rand(inn) * 4 + 0.1)
    x[:, 5] *= 30  # an outlier channel, as in real models
    w = torch.randn(out, inn) / inn**0.5
    return w, x


def test_alpha_zero_is_rtn_and_best_never_above_rtn():
    for seed in range(4):
        w, x = _layer(seed)
        for zp in (True, False):
            r = awq_api.search_scale(w, x, n_bit=3, group_size=32, zero_point=zp)
            assert torch.allclose(r.alphas, torch.arange(20, dtype=torch.float64) / 20)
            rtn = ((x @ pseudo_quantize(w, 3, 32, zp).T - x @ w.T) ** 2).mean()
            assert r.losses[0] == pytest.approx(float(rtn), rel=1e-4)
            assert r.best_loss <= r.rtn_loss
            assert r.best_index == int(torch.nonzero(r.losses == r.losses.min())[0])
            # the winning scales are the ones for best_alpha, normalised by sqrt(max * min)
            s = (x.abs().mean(0) ** r.best_alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            assert torch.allclose(r.scales, s)


def test_scale_loss_matches_direct_definition():
    w, x = _layer(3)
    r = awq_api.search_scale(w, x, n_bit=4, group_size=64, n_grid=5)
    for a, loss in zip(r.alphas.tolist(), r.losses.tolist()):
        s = x.abs().mean(0).pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = pseudo_quantize(w * s.view(1, -1), 4, 64) / s.view(1, -1)
        assert loss == pytest.approx(float(((x @ wq.T - x @ w.T) ** 2).mean()), rel=1e-4)


def test_first_minimum_wins_ties():
    assert awq.first_min_index(torch.tensor([3.0, 1.0, 1.0, 2.0])) == 1
    assert awq.first_min_index(torch.tensor([float("nan"), 2.0, 2.0])) == 1


def test_duo_scaling_formula():
    w, x = _layer(4)
    r = awq_api.search_scale(w, x, n_bit=3, group_size=32, n_grid=4, duo_scaling=True)
    a = r.best_alpha
    wa = w.abs().reshape(-1, 32)
    w_mean = (wa / (wa.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    s = (x.abs().mean(0).pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    assert torch.allclose(r.scales, s)
    assert r.best_loss <= r.rtn_loss or a > 0  # with duo scaling alpha 0 is not RTN; still a valid search


def test_clip_never_raises_a_groups_error():
    for seed in range(3):
        w, x = _layer(seed, out=70)  # 70 rows: not a multiple of 64 or 256
        errs, org_max = awq.clip_errors(w, x, QuantSpec(3, 32))
        idx = awq.best_clip_index(errs)
        best = errs.gather(0, idx.unsqueeze(0))[0]
        assert (best <= errs[0]).all()  # candidate 0 is no clipping at all
        mv = awq_api.search_clip(w, x, n_bit=3, group_size=32)
        assert mv.shape == (70, 4)
        assert (mv <= org_max + 1e-7).all() and (mv >= org_max * 0.5).all()


def test_clip_error_definition_and_subsampling():
    w, x = _layer(5, out=8, inn=64, tokens=1030)
    errs, org_max = awq.clip_errors(w, x, QuantSpec(2, 32), awq.ClipSearch(n_grid=20, max_shrink=0.5, n_sample_token=512))
    xs = x[:: 1030 // 512]
    for i in (0, 3, 9):
        mv = org_max * (1 - i / 20)
        wc = awq.apply_clip(w, mv)
        q = pseudo_quantize(wc, 2, 32)
        for gi in range(2):
            sl = slice(gi * 32, gi * 32 + 32)
            direct = ((xs[:, sl] @ q[:, sl].T - xs[:, sl] @ w[:, sl].T) ** 2).mean(0)
            assert torch.allclose(errs[i, :, gi].float(), direct, rtol=1e-3, atol=1e-9)
    assert errs.shape[0] == 10


def test_clip_skip_list():
    for name in ("model.layers.0.self_attn.q_proj", "encoder.layer.0.attention.self.query", "attn.Wqkv",
                 "self_attn.k_proj", "attention.self.key"):
        assert awq.is_clip_skipped(name)
    for name in ("model.layers.0.self_attn.v_proj", "mlp.down_proj", "attention.self.value", "mlp.up_proj"):
        assert not awq.is_clip_skipped(name)


def test_clip_errors_gram_and_direct_paths_agree_with_the_definition():
    # groups narrower than the token sample go through the Gram matrix, wider ones through the direct products:
    # both must give the official error (float64 reference) and the same choices
    for inn, g, tokens in ((128, 32, 700), (128, 64, 40)):  # Gram path (g < T); direct path (g >= T)
        w, x = _layer(7, out=48, inn=inn, tokens=tokens)
        errs, org_max = awq.clip_errors(w, x, QuantSpec(3, g))
        xs = x[:: max(1, tokens // 512)].double()
        ref = torch.empty_like(errs)
        for i in range(errs.shape[0]):
            q = pseudo_quantize(awq.apply_clip(w, org_max * (1 - i / 20)), 3, g)
            d = (q - w).double().reshape(48, inn // g, g)
            part = torch.einsum("tkg,rkg->trk", xs.reshape(-1, inn // g, g), d)
            ref[i] = part.pow(2).mean(0)
        assert torch.allclose(errs, ref, rtol=1e-5, atol=1e-12)
        assert torch.equal(awq.best_clip_index(errs), awq.best_clip_index(ref))
