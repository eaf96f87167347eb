"""The small baselines (MSE-clipped RTN, rotated RTN) and the method registry."""
from __future__ import annotations

import pytest
import torch

from core.model.stream import state_dict as stream_state

from core.methods import rtn_mse as mse_clip, rotated_rtn as rotation
from core.quant import pseudo_quantize


def _outlier_weight(seed=0, out=32, d=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=g) * 0.02
    w[:, 7] *= 30  # an outlier input column
    w[3, 50] = 0.5
    return w


@pytest.mark.parametrize("bits,g,zp", [(3, 32, True), (4, 64, True), (3, 0, True), (4, 32, False), (2, 32, True)])
def test_mse_clip_never_raises_a_groups_error(bits, g, zp):
    w = _outlier_weight()
    q = mse_clip.mse_clip_quantize(w, bits, g, zp)
    rtn = pseudo_quantize(w, bits, g, zp)
    gg = g if g > 0 else w.shape[1]
    e_clip = (q - w).reshape(-1, gg).abs().pow(2.4).sum(1)
    e_rtn = (rtn - w).reshape(-1, gg).abs().pow(2.4).sum(1)
    assert (e_clip <= e_rtn).all()
    assert (e_clip < e_rtn).any()  # and it does clip somewhere
    # candidate 0 (p = 1) is exactly core.quant's RTN
    errs = mse_clip.mse_clip_errors(w, bits, g, zp)
    assert errs.shape == (80, w.numel() // gg)
    assert torch.allclose(errs[0], e_rtn, rtol=1e-5)
    # every group is on some candidate's grid: the chosen error is the minimum over candidates
    assert torch.allclose(e_clip, errs.min(0).values, rtol=1e-5)


def test_mse_clip_hand_computed():
    # one 2-bit group [0, 1, 2, 10]: p = 1 -> scale 10/3, levels 0, 3.33, 6.67, 10: errors 0, 1, 2, 0
    w = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    q1 = mse_clip._candidate(w, w.amin(1, keepdim=True), w.amax(1, keepdim=True), 1.0, 2, True)
    assert torch.allclose(q1, torch.tensor([[0.0, 0.0, 10 / 3, 10.0]]))
    q = mse_clip.mse_clip_quantize(w, 2, 4)
    assert (q - w).abs().pow(2.4).sum() < (q1 - w).abs().pow(2.4).sum()


@pytest.mark.parametrize("n", [64, 128, 576, 1536, 896, 4864 // 19 * 3])
def test_rotation_is_orthogonal_and_output_preserving(n):
    r = rotation.rotation(n, seed=1)
    assert r.shape == (n, n)
    assert torch.allclose(r @ r.T, torch.eye(n), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, n, generator=g), torch.randn(8, n, generator=g)
    assert torch.allclose((x @ r) @ (w @ r).T, x @ w.T, rtol=1e-4, atol=1e-3)
    assert torch.equal(r, rotation.rotation(n, seed=1))  # seeded
    assert not torch.equal(r, rotation.rotation(n, seed=2))
    # it mixes every input into every output coordinate (no block-diagonal structure)
    assert (r.abs() > 0).all()


def test_rotation_of_4864_and_hadamard():
    h = rotation.hadamard(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError):
        rotation.hadamard(12)
    r = rotation.rotation(4864)
    assert torch.allclose(r[:64] @ r.T, torch.eye(4864)[:64], atol=1e-4)  # a slice: the full product is 115 GFLOP


def test_rotated_rtn_spreads_outlier_columns():
    w = _outlier_weight(1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, w.shape[1], generator=g)
    rot = rotation.rotated_rtn(w, 3, 32)
    rtn = pseudo_quantize(w, 3, 32)
    err = lambda wh: float((x @ (w - wh).T).pow(2).sum())  # noqa: E731
    assert err(rot) < err(rtn)
    # at 8 bits the rotated weights are w up to quantization noise
    assert torch.allclose(rotation.rotated_rtn(w, 8, 32), w, atol=5e-3)


# --- the registry --------------------------------------------------------------------------------------------
from core import methods as M  # noqa: E402
from core.grids.spec import QuantSpec  # noqa: E402
from core.studies import methods_table  # noqa: E402
from core.gptq import gptq_quantize  # noqa: E402


def _layer(seed=0, out=48, d=128, n=384):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix * (1 + 4 * torch.rand(d, generator=g))
    x[:, 9] *= 20  # a salient channel
    w = torch.randn(out, d, generator=g) * 0.05
    return w, x[: n // 2], x[n // 2:]


def test_registry_names_and_specs():
    assert list(M.LAYER_METHODS) == ["rtn", "rtn-mse", "awq", "awq-clip", "gptq", "gptq-act", "hqq", "rotated-rtn"]
    assert {k for k in M.LAYER_METHODS if not M.METHODS[k].needs_data} == {"rtn", "rtn-mse", "hqq", "rotated-rtn"}


@pytest.mark.parametrize("method", list(M.LAYER_METHODS))
@pytest.mark.parametrize("g", [32, 0])
def test_every_method_quantizes(method, g):
    w, x, _ = _layer()
    w0 = w.clone()
    inp = M.LayerInputs(x_mean=x.abs().mean(0), x=x, hessian=x.T @ x, name="model.layers.0.mlp.down_proj")
    q = M.quantize_layer(method, w, inp, QuantSpec(3, g))
    assert q.shape == w.shape and q.dtype == torch.float32 and torch.isfinite(q).all()
    assert torch.equal(w, w0)
    assert not torch.equal(q, w)
    rel = float((x @ (w - q).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert rel < 0.2  # a real 3-bit quantization of this layer, not garbage


def test_registry_matches_the_primitives():
    w, x, _ = _layer(1)
    H = x.T @ x
    inp = M.LayerInputs(x_mean=x.abs().mean(0), x=x, hessian=H)
    assert torch.equal(M.quantize_layer("rtn", w, inp, QuantSpec(4, 32)), pseudo_quantize(w, 4, 32))
    assert torch.equal(M.quantize_layer("gptq", w, inp, QuantSpec(4, 32)),
                       gptq_quantize(w, H, n_bit=4, group_size=32))
    assert torch.equal(M.quantize_layer("gptq-act", w, inp, QuantSpec(4, 0)),
                       gptq_quantize(w, H, n_bit=4, group_size=0, act_order=True))
    # alpha = 0: every scale is 1, AWQ is RTN
    assert torch.equal(M.quantize_layer("awq", w, inp, QuantSpec(4, 32), M.awq.AWQOptions(alpha=0.0)), pseudo_quantize(w, 4, 32))
    # Q/K are not clipped by default
    qk = M.LayerInputs(x_mean=x.abs().mean(0), x=x, name="model.layers.0.self_attn.q_proj")
    assert torch.equal(M.quantize_layer("awq-clip", w, qk, QuantSpec(3, 32), M.awq_clip.AWQClipOptions(alpha=0.5)),
                       M.quantize_layer("awq", w, qk, QuantSpec(3, 32), M.awq.AWQOptions(alpha=0.5)))
    assert not torch.equal(M.quantize_layer("awq-clip", w, qk, QuantSpec(3, 32), M.awq_clip.AWQClipOptions(alpha=0.5, clip_qk=True)),
                           M.quantize_layer("awq", w, qk, QuantSpec(3, 32), M.awq.AWQOptions(alpha=0.5)))
    # without a stored Hessian GPTQ falls back to the sample's X^T X
    no_h = M.LayerInputs(x=x)
    assert torch.allclose(M.quantize_layer("gptq", w, no_h, QuantSpec(4, 32)),
                          gptq_quantize(w, H, n_bit=4, group_size=32), rtol=1e-4, atol=1e-6)


def test_rotated_rtn_weights_take_the_unrotated_input():
    w, x, _ = _layer(2)
    q = M.quantize_layer("rotated-rtn", w, None, QuantSpec(8, 32))
    rel = float((x @ (w - q).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert rel < 1e-3


def test_registry_bad_input():
    w, x, _ = _layer()
    with pytest.raises(ValueError, match="unknown method"):
        M.quantize_layer("squeeze", w, None, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="calibration input"):
        M.quantize_layer("awq", w, M.LayerInputs(), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="does not take"):
        M.quantize_layer("rtn", w, None, QuantSpec(4, 32), M.awq.AWQOptions(alpha=0.5))
    with pytest.raises(ValueError, match="divide"):
        M.quantize_layer("hqq", w, None, QuantSpec(4, 48))


def test_compare_table():
    w, x, xh = _layer(3)
    inp = M.LayerInputs(x_mean=x.abs().mean(0), x=x, hessian=x.T @ x)
    df = methods_table.compare(w, inp, xh, QuantSpec(3, 32), alpha=0.3)
    assert df["method"].tolist() == ["rtn", "rtn-mse", "awq", "awq@0.3", "awq-clip", "gptq", "gptq-act", "hqq",
                                     "rotated-rtn"]
    r = df.set_index("method")
    assert r.loc["gptq", "rel_error"] < r.loc["rtn", "rel_error"]
    assert r.loc["awq", "rel_error"] <= r.loc["awq@0.3", "rel_error"]  # best alpha on the same rows
    assert (r["seconds"] >= 0).all() and r["sqnr_db_heldout"].notna().all()
    assert abs(r.loc["rtn", "sqnr_db"] + 10 * torch.log10(torch.tensor(r.loc["rtn", "rel_error"])).item()) < 1e-6


# --- Hessians collected in the streaming pass and kept in the cache --------------------------------------------
from conftest import build_tiny, tiny_settings  # noqa: E402
from core.model import collect, linears, models, store  # noqa: E402


def test_streamed_hessian_equals_xtx_of_all_inputs():
    lm = models.wrap_model(build_tiny("llama"), tokenizer=None)
    ids = torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(0))
    # sample every token: the kept sample is then the concatenation of all inputs, in order
    col = collect.collect(lm, ids, None, sample_rows=ids.numel(), batch_tokens=64, hessians=True)
    assert set(col.hessians) == set(col.stats) and len(col.hessians) == 8
    for key, v in col.hessians.items():
        x = col.calib_sample[key].double()
        n = x.shape[1]
        assert v.dtype == torch.float32 and v.shape == (n * (n + 1) // 2,)  # packed upper triangle, the cache's layout
        assert torch.allclose(store.unpack_symmetric(v, n).double(), x.T @ x, rtol=1e-5, atol=1e-4)
    assert not collect.collect(lm, ids, None, sample_rows=8).hessians  # off by default in collect()


def test_hessian_budget_keeps_whole_width_classes_narrowest_first():
    smol = ([576] * 6 + [1536]) * 30  # SmolLM2-135M: q, k, v, o, gate, up read 576 wide inputs, down 1536
    assert collect.hessian_widths(smol) == {576, 1536}  # 1.04 GB upper bound <= 1 GiB
    qwen = ([896] * 6 + [4864]) * 24  # Qwen2.5-0.5B: 4864-wide down_proj inputs would need 4.5 GB
    assert collect.hessian_widths(qwen) == {896}
    assert collect.hessian_widths(smol, budget_bytes=8 * 576 * 576 * 180) == {576}
    assert collect.hessian_widths(smol, budget_bytes=0) == set()
    # in the collection pass: a budget that leaves out the 128-wide down_proj input keeps the 64-wide ones only
    lm = models.wrap_model(build_tiny("llama"), tokenizer=None)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    col = collect.collect(lm, ids, None, sample_rows=8, hessians=True, hessian_budget_bytes=8 * 64 * 64 * 12)
    assert col.hessians and {v.numel() for v in col.hessians.values()} == {64 * 65 // 2}
    assert len(col.hessians) == len([k for k in col.stats if col.hessians.get(k) is not None]) == 6


def test_hessian_packing_round_trip():
    a = torch.randn(9, 9, dtype=torch.float64)
    h = a @ a.T
    v = store.pack_symmetric(h)
    assert v.shape == (45,) and v.dtype == torch.float32
    assert torch.equal(store.unpack_symmetric(v, 9), h.float())
    with pytest.raises(store.CacheError):
        store.unpack_symmetric(v, 8)


@pytest.fixture(scope="module")
def tiny_analysis(tiny_dir, tokenizer_dir, tmp_path_factory):
    from core.analysis import analyze
    return analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path_factory.mktemp("methods-cache"))


def test_analysis_keeps_hessians_and_compares_methods(tiny_analysis, tiny_dir, tokenizer_dir, tmp_path):
    from core.analysis import analyze, open_entry
    a = tiny_analysis
    name = "model.layers.1.mlp.down_proj"
    h = a.hessian(name)
    assert h is not None and h.shape == (128, 128) and torch.allclose(h, h.T)
    # reopened without the model: the Hessian alone runs GPTQ on this layer
    b = open_entry(a.path)
    assert b._lm is None and torch.equal(b.hessian(name), h)
    n_tokens = a.manifest["n_tokens"]
    x = a.inputs(name)
    # the sample is a subset of the tokens: its second moment estimates the full one's
    assert torch.diag(h).sum() / n_tokens == pytest.approx(float(torch.diag(x.T @ x).sum()) / x.shape[0], rel=0.3)
    df = a.compare_methods(name, QuantSpec(3, 32), alpha=0.5)
    assert set(df["method"]) == set(M.LAYER_METHODS) | {"awq@0.5"}
    r = df.set_index("method")
    assert r.loc["gptq", "rel_error"] < r.loc["rtn", "rel_error"]
    w = a.quantize_layer(name, "gptq", QuantSpec(3, 32))
    assert torch.equal(w, gptq_quantize(a.weight(name), h, n_bit=3, group_size=32))
    # opting out: no Hessian file, GPTQ falls back to the sample's X^T X
    c = analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir, hessians=False), tmp_path)
    assert c.hessian(name) is None and not (c.path / store.HESSIANS).exists()
    assert c.compare_methods(name, QuantSpec(3, 32), methods=["gptq"])["rel_error"].notna().all()


# --- whole-model weights: sequential GPTQ, AWQ + GPTQ, HQQ -----------------------------------------------------
from core.methods import gptq, grouped, hqq  # noqa: E402
from core.methods.base import per_linear_weights  # noqa: E402
from core.methods.recipe import Recipe  # noqa: E402
from core.model import blocks  # noqa: E402
from core.hqq import hqq_quantize  # noqa: E402


def _state(lm):
    return {k: v.detach().clone() for k, v in stream_state(lm.model).items()}


def _same_state(lm, before):
    after = stream_state(lm.model)
    return all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_sequential_gptq_is_block_by_block_on_quantized_inputs(kind):
    lm = models.wrap_model(build_tiny(kind), tokenizer=None)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    before = _state(lm)
    snap = blocks.snapshot(lm)
    with torch.no_grad():
        got = gptq.sequential_gptq(lm, ids, snap, QuantSpec(3, 32), batch_tokens=64)
    assert _same_state(lm, before)
    assert set(got) == {li.name for li in lm.linears}
    b0 = [li.name for li in lm.linears if li.block == 0]
    b1 = [li.name for li in lm.linears if li.block == 1]
    # block 0 sees the fp model's inputs
    cap0 = blocks.capture_block(lm, 0, ids, batch_tokens=64, linears=set(b0), modules=set())
    for n in b0:
        ref = gptq_quantize(lm.weight(n), grouped.gram(cap0.x[n]).float(), n_bit=3, group_size=32)
        assert torch.allclose(got[n], ref, rtol=1e-5, atol=1e-6), n
    # block 1 sees the inputs produced by the already-quantized block 0 (not the fp ones)
    with torch.no_grad():
        for n in b0:
            linears.set_linear_weight(lm.model.get_submodule(n), got[n])
        cap1 = blocks.capture_block(lm, 1, ids, batch_tokens=64, linears=set(b1), modules=set())
        blocks.restore(lm, snap)
    cap1_fp = blocks.capture_block(lm, 1, ids, batch_tokens=64, linears=set(b1), modules=set())
    n = b1[-1]
    ref_q = gptq_quantize(lm.weight(n), grouped.gram(cap1.x[n]).float(), n_bit=3, group_size=32)
    ref_fp = gptq_quantize(lm.weight(n), grouped.gram(cap1_fp.x[n]).float(), n_bit=3, group_size=32)
    assert torch.allclose(got[n], ref_q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[n], ref_fp, rtol=1e-5, atol=1e-6)
    # AWQ + GPTQ with unit scales is GPTQ; with real scales it is GPTQ(W s, H_{X/s}) / s
    ones = {n: torch.ones(lm.weight(n).shape[1]) for n in got}
    with torch.no_grad():
        same = gptq.sequential_gptq(lm, ids, snap, QuantSpec(3, 32), batch_tokens=64,
                                    recipe=Recipe(bits=3, group_size=32, col=ones, unscale=set(ones)))
    assert all(torch.equal(same.rounded[n], got[n]) for n in got) and not same.grids  # Q(W s)/s: no grid named
    assert _same_state(lm, before)
    s = torch.rand(lm.weight(b0[0]).shape[1]) + 0.5
    w, h = lm.weight(b0[0]), grouped.gram(cap0.x[b0[0]])
    q = gptq.gptq_with_scales(w, h, s, QuantSpec(3, 32))
    xs = cap0.x[b0[0]] / s
    assert torch.allclose(q * s, gptq_quantize(w * s, (xs.double().T @ xs.double()).float(), n_bit=3, group_size=32),
                          rtol=1e-4, atol=1e-5)


def test_sequential_restores_the_model_on_error_and_hqq():
    lm = models.wrap_model(build_tiny("llama"), tokenizer=None)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(2))
    before = _state(lm)
    snap = blocks.snapshot(lm)

    def boom(f, m):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        gptq.sequential_gptq(lm, ids, snap, QuantSpec(3, 32), batch_tokens=64, progress=boom)
    assert _same_state(lm, before)
    hq = per_linear_weights(lm, snap, QuantSpec(3, 32), hqq.layer, hqq.HQQOptions())
    assert _same_state(lm, before)
    n = lm.linears[0].name
    assert torch.equal(hq[n], hqq_quantize(lm.weight(n), n_bit=3, group_size=32))


def test_methods_table_winners_and_cache(tiny_analysis):
    a = tiny_analysis
    names = [n for n in a.names if n.startswith("model.layers.1.")][:3]
    t = methods_table.methods_table(a, bits=[3], group_size=32, names=names, methods=["rtn", "gptq", "awq"])
    assert len(t) == 3 * 3 and set(t["method"]) == {"rtn", "gptq", "awq"}
    assert (t["group_size"] == 32).all() and t["rel_error_heldout"].notna().all()
    w = methods_table.winners(t)
    assert set(w["family"]) == set(t["family"])
    assert (w["margin"] >= 1).all()
    for r in w.to_dict("records"):  # the winner has the lowest median error of its family
        fam = t[(t["family"] == r["family"]) & (t["bits"] == r["bits"])]
        assert r["winner_error"] == fam.groupby("method")["rel_error_heldout"].median().min()
    h = methods_table.head_to_head(t)
    assert len(h) == 3 and (h["ratio"] > 0).all()
    assert methods_table.cached_methods_table(a, bits=[3], group_size=32, compute=False) is None
    with pytest.raises(ValueError, match="does not divide"):  # the model-wide rule: 48 divides no width here
        methods_table.methods_table(a, bits=[3], group_size=48, names=names[:1], methods=["rtn"])


def test_cli_analyze_methods(tiny_dir, tokenizer_dir, tmp_path, capsys):
    from core.cli import main
    rc = main(["analyze", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir, "--cache-dir", str(tmp_path),
               "--bits", "3", "--group-size", "32", "--n-samples", "4", "--seqlen", "64", "--heldout-samples", "2",
               "--sample-rows", "64", "--n-grid", "5", "--quiet", "--methods"])
    out = capsys.readouterr().out
    assert rc == 0 and "methods (median held-out" in out
    assert sum(line.strip().startswith("w3 ") for line in out.splitlines()) == 7  # one line per family


# --- the app: Layer Lab's methods section and the Methods page (AppTest) -------------------------------------
def _app(cache, entry, monkeypatch):
    from app_harness import app_test
    return app_test(monkeypatch, cache, entry.path)


def test_app_methods_section_and_page(tiny_dir, tokenizer_dir, tmp_path, monkeypatch):
    import json

    from core.analysis import analyze, open_entry
    a = analyze(tiny_settings(tiny_dir("qwen2"), tokenizer_dir, sweep=__import__("core.studies.sweep").studies.sweep.SweepSettings(
        bits=(3,), group_size=32, n_grid=10)), tmp_path)
    at = _app(tmp_path, a, monkeypatch)
    at.switch_page("pages/layer_lab.py").run()
    assert not at.exception and not at.error
    at.toggle(key="lab_methods_on").set_value(True).run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    name, bits = at.selectbox(key="lab_layer").value, int(at.segmented_control(key="lab_bits").value)
    group, alpha = int(at.select_slider(key="lab_group").value), float(at.slider(key="lab_alpha").value)
    shown = at.dataframe[-1].value
    ref = open_entry(a.path).compare_methods(name, QuantSpec(bits, group), alpha=alpha)
    assert len(shown) == len(ref) == len(M.LAYER_METHODS) + 1
    assert sorted(shown["rel_error_heldout"].round(10)) == sorted(ref["rel_error_heldout"].round(10))
    assert any("Methods on" in json.dumps(json.loads(c.proto.spec).get("title", "")) for c in at.get("vega_lite_chart"))
    assert "Recomputed in" in {m.label for m in at.metric}

    at.switch_page("pages/methods.py").run()
    assert not at.exception and not at.error
    at.multiselect(key="methods_bits").set_value([3]).run()
    at.button(key="methods_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    t = methods_table.cached_methods_table(open_entry(a.path), bits=[3], group_size=32, compute=False)
    assert t is not None and len(t) == len(a.names) * len(M.LAYER_METHODS)
    fam = at.dataframe[0].value
    assert set(fam["family"]) == set(a.linears["family"]) and set(fam["winner"]) <= set(M.LAYER_METHODS)
    assert any("beat GPTQ" in json.dumps(json.loads(c.proto.spec).get("title", "")) for c in at.get("vega_lite_chart"))


@pytest.mark.parametrize("mode", ["gptq", "awq-gptq", "hqq"])
def test_quality_modes_restore_the_model_also_on_error(mode, tiny_analysis, monkeypatch):
    from core.studies import evaluate
    a = tiny_analysis
    before = _state(a.lm)
    df = evaluate.run_quality(a, modes=["fp", mode], bits=[4], group_size=32)
    assert _same_state(a.lm, before)
    ppl = df[(df["mode"] == mode) & (df["metric"] == "perplexity")]["value"].iloc[0]
    fp = df[(df["mode"] == "fp") & (df["metric"] == "perplexity")]["value"].iloc[0]
    assert 0 < ppl and abs(ppl / fp - 1) < 0.5
    # a failure in the middle of the build (after some blocks were written into the model)
    # the per-linear call each mode's whole-model pass makes (sequential GPTQ asks for the grid it lands on)
    fn = {"gptq": "gptq_grid", "awq-gptq": "gptq_grid", "hqq": "hqq_quantize"}[mode]
    module = hqq if mode == "hqq" else gptq
    target = f"{module.__name__}.{fn}"
    calls = []
    real = getattr(module, fn)

    def boom(*args, **kw):
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("boom")
        return real(*args, **kw)
    monkeypatch.setattr(target, boom)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate.run_quality(a, modes=[mode], bits=[3], group_size=32)
    assert _same_state(a.lm, before)


@pytest.mark.parametrize("n,block", [(600, 256), (64, 16), (100, 256), (257, 128)])
def test_blocked_lower_gram_equals_xtx(n, block):
    g = torch.Generator().manual_seed(n)
    acc = collect.GramLower(n, block)
    xs = [torch.randn(37, n, generator=g) for _ in range(3)]
    for x in xs:
        acc.add(x)
    # panels hold only the diagonal blocks and what lies below them
    assert sum(p.numel() for p in acc.panels) == sum((n - j) * min(block, n - j) for j in range(0, n, block))
    full = torch.cat(xs).double()
    h = acc.full()
    assert h.dtype == torch.float64 and torch.equal(h, h.T)
    assert torch.allclose(h, full.T @ full, rtol=1e-5, atol=1e-4)
    # packed: exactly pack_symmetric of the full matrix (the cache's layout), and back
    assert torch.equal(acc.packed(), store.pack_symmetric(h))
    assert torch.equal(store.unpack_symmetric(acc.packed(), n), h.float())
    # consumed: the same square in either dtype, the accumulator empty afterwards
    h32 = acc.full(torch.float32)
    assert torch.equal(acc.full(torch.float32, consume=True), h32) and acc.panels is None
    with pytest.raises(RuntimeError, match="consumed"):
        acc.full()


def test_sweep_alpha_is_never_handed_to_a_llamacpp_type(tiny_analysis):
    # Q4_1 is a 4-bit grid in blocks of 32 with a minimum, the sweep's own settings here: its alpha is still the
    # integer grid's, so a llama.cpp type must run its own search
    a = tiny_analysis
    name = "model.layers.1.mlp.down_proj"
    assert a.sweep_alpha(name, QuantSpec(4, 32)) is not None
    q41 = QuantSpec.of_type("Q4_1")
    assert (q41.bits, q41.group_size, q41.zero_point) == (4, 32, True)
    assert a.sweep_alpha(name, q41) is None
