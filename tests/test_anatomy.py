"""Outlier anatomy (issue 22): massive activations, super weights, interventions, each quantizer's treatment and
keeping super weights in fp16, on a tiny random Llama with an implanted super weight and an implanted massive
dimension (built from a config, no download)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, tiny_settings
from core.analysis import analyze
from core.methods import LAYER_METHODS, MODEL_METHODS
from core.methods.recipe import Recipe, apply_recipe, check_keep
from core.model.blocks import restore, snapshot
from core.model.linears import linear_weight, set_linear_weight
from core.studies import anatomy, evaluate
from test_evaluate import assert_bit_identical, state  # the one bit-for-bit check of the suite

GS = 32
SW_LAYER, SW_ROW, SW_COL = 1, 5, 17  # the implanted super weight: model.layers.1.mlp.down_proj[5, 17]
CARRIER = 3  # the residual dimension only the trigger token's embedding writes (drives the spike)
SW_VALUE = 20.0


def implanted_llama(tokenizer_dir: str):
    """A 4-layer tiny Llama where the token "." (and only it) drives input channel ``SW_COL`` of layer 1's down
    projection to ~1,000, and the weight ``[SW_ROW, SW_COL]`` turns that into ~20,000 on residual dimension ``SW_ROW``:
    a super weight that creates a massive activation on every "." token from layer 1 on."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    trigger = tok.convert_tokens_to_ids(".")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
                         tie_word_embeddings=False, vocab_size=tok.vocab_size)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight[:, CARRIER] = 0.0
        m.model.embed_tokens.weight[trigger, CARRIER] = 1.0
        for layer in m.model.layers[:SW_LAYER + 1]:  # nothing else writes the carrier dimension
            layer.self_attn.o_proj.weight[CARRIER] = 0.0
            layer.mlp.down_proj.weight[CARRIER] = 0.0
        mlp = m.model.layers[SW_LAYER].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[SW_COL] = 0.0
            lin.weight[SW_COL, CARRIER] = 4.0
        mlp.down_proj.weight[:, SW_COL] = 0.0
        mlp.down_proj.weight[SW_ROW, SW_COL] = SW_VALUE
    return m, trigger


@pytest.fixture(scope="module")
def implanted(tokenizer_dir, tmp_path_factory):
    model, trigger = implanted_llama(tokenizer_dir)
    folder = tmp_path_factory.mktemp("implanted")
    model.save_pretrained(folder)
    a = analyze(tiny_settings(str(folder), tokenizer_dir), tmp_path_factory.mktemp("cache-implanted"))
    return a, trigger


@pytest.fixture(scope="module")
def run(implanted):
    a, _ = implanted
    before = state(a.lm.model)
    seen = []
    an = anatomy.run_anatomy(a, progress=lambda f, m: seen.append(f))
    assert_bit_identical(a.lm.model, before)
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert all(x <= y for x, y in zip(seen, seen[1:])), "progress goes backwards"
    return an


def trigger_positions(a, trigger: int) -> set[tuple[int, int]]:
    data = evaluate.eval_data(a, a.lm)
    ids = torch.cat([data.calib, data.heldout])
    return {(int(s), int(p)) for s, p in (ids == trigger).nonzero().tolist()}


# --------------------------------------------------------------------------------------------------
# diagnosis
# --------------------------------------------------------------------------------------------------
def test_massive_activations_diagnosed_exactly(implanted, run):
    a, trigger = implanted
    lay = run.layers
    assert run.first_massive_layer == SW_LAYER
    assert lay.loc[lay["layer"] < SW_LAYER, "n_massive"].eq(0).all()
    for r in lay[lay["layer"] >= SW_LAYER].itertuples():
        assert r.dims == str(SW_ROW) and r.top_dim == SW_ROW and r.top_token == "."
        assert r.threshold == pytest.approx(max(100.0, 1000.0 * r.median_abs))
        assert r.max_abs > 1e4 and r.ratio == pytest.approx(r.max_abs / r.median_abs)
    # exactly the "." tokens carry it, every one of them, in every layer from the implanted one on
    want = trigger_positions(a, trigger)
    m = run.massive
    for layer in range(SW_LAYER, 4):
        got = m[m["layer"] == layer]
        assert set(zip(got["seq"], got["pos"])) == want
        assert set(got["dim"]) == {SW_ROW} and set(got["token"]) == {"."} and set(got["token_id"]) == {trigger}
        assert int(lay.loc[lay["layer"] == layer, "n_massive_tokens"].iloc[0]) == len(want)
    # the residual stream itself, recomputed with plain forward hooks: max and median of layer 2
    data = evaluate.eval_data(a, a.lm)
    ids = torch.cat([data.calib, data.heldout])
    out = {}
    h = a.lm.model.model.layers[2].register_forward_hook(
        lambda mod, args, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            a.lm.model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    ref = out["h"].abs()
    row = lay[lay["layer"] == 2].iloc[0]
    assert row["max_abs"] == pytest.approx(float(ref.max()), rel=1e-5)
    assert row["median_abs"] == pytest.approx(float(ref.median()), rel=1e-4)
    # the token x dimension view: the top token is a "." and the top dimension the massive one
    g = run.grid[run.grid["layer"] == SW_LAYER]
    assert g.loc[(g["token_rank"] == 0) & (g["dim_rank"] == 0), "dim"].iloc[0] == SW_ROW
    thr = float(lay.loc[lay["layer"] == SW_LAYER, "threshold"].iloc[0])
    big = g[(g["dim"] == SW_ROW) & (g["value"].abs() > thr)]
    assert set(big["token"]) == {"."} and len(big) == min(16, len(want))
    assert big["token_rank"].max() == len(big) - 1  # the "." tokens rank first
    assert g.groupby("token_rank").size().eq(8).all()


def test_super_weight_found_exactly_and_search_stops(run):
    sw = run.tables["super"]
    assert len(sw) == 1
    r = sw.iloc[0]
    assert (r["name"], r["layer"], r["row"], r["col"]) == (f"model.layers.{SW_LAYER}.mlp.down_proj", SW_LAYER, SW_ROW,
                                                            SW_COL)
    assert r["value"] == pytest.approx(SW_VALUE) and r["rank"] == 1 and r["token"] == "."
    assert r["input_value"] > 500 and r["output_value"] > 1e4
    # the search zeroed it and stopped by itself on the next pass: no spike left
    assert run.meta["search_stopped"] and run.meta["search_passes"] == 2
    sp = run.spikes
    assert sp.loc[sp["iteration"] == 0, "spike"].sum() == 1
    assert not sp.loc[sp["iteration"] == 1, "spike"].any()
    assert run.keep == {f"model.layers.{SW_LAYER}.mlp.down_proj": [(SW_ROW, SW_COL)]}


def test_search_is_bounded_and_restores(implanted):
    a, _ = implanted
    lm = a.lm
    down = lm.model.model.layers[SW_LAYER].mlp.down_proj
    w0 = linear_weight(down).clone()  # streamed: read from the checkpoint; written back through set_linear_weight
    try:
        # every row of the spiking input channel is large: each zeroed weight reveals the next row as the spike, so
        # the zero-and-repeat search never runs out of candidates and must stop at max_iterations
        w = w0.clone()
        w[:, SW_COL] = torch.linspace(20.0, 10.0, w.shape[0])
        set_linear_weight(down, w)
        before = state(lm.model)
        s = anatomy.AnatomySettings(spike=50.0, spike_relative=False, max_iterations=3)
        res = anatomy.find_super_weights(lm, s)
        assert not res.stopped and sorted({r["iteration"] for r in res.spikes}) == [0, 1, 2]
        assert [(f["layer"], f["row"], f["col"], f["iteration"]) for f in res.found] == [
            (SW_LAYER, 0, SW_COL, 0), (SW_LAYER, 1, SW_COL, 1), (SW_LAYER, 2, SW_COL, 2)]
        assert [f["rank"] for f in res.found] == [1, 2, 3]  # ranks among the tensor's |w| before zeroing
        assert_bit_identical(lm.model, before)
    finally:
        set_linear_weight(down, w0)
    # an absolute threshold above every activation: nothing found, one pass
    res = anatomy.find_super_weights(lm, anatomy.AnatomySettings(spike=1e9, spike_relative=False))
    assert res.stopped and not res.found and {r["iteration"] for r in res.spikes} == {0}


def test_search_restores_on_error(implanted):
    a, _ = implanted
    before = state(a.lm.model)

    def boom(f, m):
        raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        anatomy.find_super_weights(a.lm, anatomy.AnatomySettings(), progress=boom)  # raises after zeroing one
    assert_bit_identical(a.lm.model, before)


# --------------------------------------------------------------------------------------------------
# interventions
# --------------------------------------------------------------------------------------------------
def test_interventions_measured_and_model_restored(implanted, run):
    a, _ = implanted
    iv = run.interventions
    variants = set(iv["variant"])
    name = f"zero super weight L{SW_LAYER} [{SW_ROW}, {SW_COL}]"
    assert {"fp", name, f"massive activations of layer {SW_LAYER} set to 0",
            f"massive activations of layer {SW_LAYER} set to their mean"} == variants
    kl = iv[iv["metric"] == "kl"].set_index("variant")["value"]
    zero, mean = (kl[f"massive activations of layer {SW_LAYER} set to {x}"] for x in ("0", "their mean"))
    assert kl["fp"] == 0 and kl[name] > 1e-4 and zero > 1e-4
    assert abs(mean) < zero / 100  # set to their mean, the model hardly changes (Sun et al.); zeroed, it does
    # the zeroed super weight is exactly what score_variants says of that weight zeroed
    w = a.weight(f"model.layers.{SW_LAYER}.mlp.down_proj").clone()
    w[SW_ROW, SW_COL] = 0
    ref = evaluate.score_variants(a, {"z": lambda: {f"model.layers.{SW_LAYER}.mlp.down_proj": w}})
    for metric in ("kl", "perplexity", "same_top"):
        assert float(iv[(iv["variant"] == name) & (iv["metric"] == metric)]["value"].iloc[0]) == pytest.approx(
            float(ref[(ref["variant"] == "z") & (ref["metric"] == metric)]["value"].iloc[0]), rel=1e-9)


def test_massive_hook_sets_entries_and_is_removed(implanted, run):
    a, trigger = implanted
    lm = a.lm
    block = lm.model.model.layers[SW_LAYER]
    thr = float(run.layers.loc[run.layers["layer"] == SW_LAYER, "threshold"].iloc[0])
    ids = torch.tensor([[101, trigger, 2003, trigger, 102]])
    got: list[torch.Tensor] = []

    def grab(mod, args, out):  # registered after the intervention's hook: sees the output it returns
        got.append((out[0] if isinstance(out, tuple) else out).clone())
    with torch.no_grad():
        g = block.register_forward_hook(grab)
        lm.model(input_ids=ids, use_cache=False)
        g.remove()
        handles = anatomy.massive_hooks(SW_LAYER, [SW_ROW], thr, {SW_ROW: 123.0})(lm)
        g = block.register_forward_hook(grab)
        try:
            lm.model(input_ids=ids, use_cache=False)
        finally:
            g.remove()
            for h in handles:
                h.remove()
    plain, x = got
    big = plain[..., SW_ROW].abs() > thr
    assert int(big.sum()) == 2  # the two "." tokens
    assert torch.equal(x[..., SW_ROW][big], torch.full((2,), 123.0))
    assert torch.equal(x[..., SW_ROW][~big], plain[..., SW_ROW][~big])
    other = [d for d in range(64) if d != SW_ROW]
    assert torch.equal(x[..., other], plain[..., other])
    assert not block._forward_hooks  # removed


def test_score_variants_hooks_removed_and_restored_on_error(implanted):
    a, _ = implanted
    before = state(a.lm.model)
    block = a.lm.model.model.layers[SW_LAYER]

    def install(lm):
        return [block.register_forward_hook(lambda m, ar, o: (_ for _ in ()).throw(RuntimeError("hook failed")))]
    with pytest.raises(RuntimeError, match="hook failed"):
        evaluate.score_variants(a, {"bad": lambda: {f"model.layers.{SW_LAYER}.mlp.down_proj":
                                                    torch.zeros(64, 128)}}, hooks={"bad": install})
    assert not block._forward_hooks
    assert_bit_identical(a.lm.model, before)


# --------------------------------------------------------------------------------------------------
# treatment per quantizer
# --------------------------------------------------------------------------------------------------
def test_treatment_of_the_super_weight(implanted, run):
    a, _ = implanted
    t = run.treatment
    assert set(t["method"]) == set(LAYER_METHODS) and set(t["bits"]) == {3, 4}
    name = f"model.layers.{SW_LAYER}.mlp.down_proj"
    w = a.weight(name)
    from core.grids.spec import QuantSpec
    from core.methods import quantize_layer
    r = t[(t["method"] == "rtn") & (t["bits"] == 3)].iloc[0]
    wq = quantize_layer("rtn", w, a.layer_inputs(name), QuantSpec(3, GS, True))
    assert r["value_q"] == pytest.approx(float(wq[SW_ROW, SW_COL]))
    grp = slice(SW_COL // GS * GS, SW_COL // GS * GS + GS)
    want = (wq[SW_ROW, grp] - w[SW_ROW, grp]).norm() / w[SW_ROW, grp].norm()
    assert r["group_rel_error"] == pytest.approx(float(want), rel=1e-5)
    assert r["super_activation_fp"] > 1e4
    assert t["value_fp"].eq(SW_VALUE).all()
    # the spike token's output error and the spiking channel's share of it, by hand from the search's input vector
    x = anatomy.find_super_weights(a.lm, anatomy.AnatomySettings()).inputs[(name, SW_ROW, SW_COL)].double()
    d = (wq - w).double()
    e = x @ d.T
    assert r["spike_token_rel_error"] == pytest.approx(float(e.pow(2).sum() / (x @ w.double().T).pow(2).sum()),
                                                       rel=1e-3)  # float32 products in the anatomy
    assert r["spike_error_share_col"] == pytest.approx(float((x[SW_COL] * d[:, SW_COL]).pow(2).sum()
                                                             / e.pow(2).sum()), rel=1e-3)
    assert r["col_rel_error"] == pytest.approx(float(d[:, SW_COL].norm() / w[:, SW_COL].double().norm()), rel=1e-5)


def test_consumers_read_the_massive_tokens(implanted, run):
    a, trigger = implanted
    assert anatomy.reading_blocks(run) == list(range(SW_LAYER + 1, 4))
    assert anatomy.sample_blocks([2, 4, 6, 8, 10], 3) == [2, 6, 10]
    assert anatomy.sample_blocks([2, 4], 3) == [2, 4] and anatomy.sample_blocks([2, 4, 6], 1) == [2]
    c = anatomy.consumer_errors(a, run, n_blocks=5)
    n_trig = len(trigger_positions(a, trigger))
    # q/k/v/gate/up of the blocks after the implanted layer, each on exactly the "." rows
    assert set(c["block"]) == set(range(SW_LAYER + 1, 4))
    assert set(c["family"]) == {"q", "k", "v", "gate", "up"}
    assert c["n_massive_rows"].eq(n_trig).all()
    assert set(c["method"]) == set(LAYER_METHODS) and set(c["bits"]) == {3, 4}
    assert (c["rel_error_massive"] > 0).all() and (c["rel_error_heldout"] > 0).all()
    # the rows are the "." tokens' inputs: q_proj's input there is RMSNorm(h) of a "." token, massive on SW_ROW
    rows = anatomy.massive_rows(a, run, [f"model.layers.{SW_LAYER + 1}.self_attn.q_proj"])
    x = next(iter(rows.values()))
    assert x.shape == (n_trig, 64) and bool((x.abs().argmax(dim=1) == SW_ROW).all())
    pd.testing.assert_frame_equal(anatomy.cached_consumers(a, run), c)
    with pytest.raises(ValueError, match="do not read a massive activation"):
        anatomy.consumer_errors(a, run, blocks=[0])


# --------------------------------------------------------------------------------------------------
# keep super weights in fp16
# --------------------------------------------------------------------------------------------------
def test_recipe_keep_writes_back_in_recipe_coordinates(implanted):
    a, _ = implanted
    lm = a.lm
    name = f"model.layers.{SW_LAYER}.mlp.down_proj"
    snap = snapshot(lm)
    try:
        s = torch.linspace(0.5, 2.0, 128)
        r = Recipe(bits=3, group_size=GS, col={name: s}, unscale={name}, keep={name: [(SW_ROW, SW_COL), (0, 1)]})
        apply_recipe(lm, r, snap)
        w = lm.weight(name)
        w0 = snap[f"{name}.weight"]
        for row, col in ((SW_ROW, SW_COL), (0, 1)):
            want = (w0[row, col] * s[col]).half().float() / s[col]
            assert float(w[row, col]) == float(want)
        plain = Recipe(bits=3, group_size=GS, col={name: s}, unscale={name}).final(name, w0)
        mask = torch.ones_like(w, dtype=torch.bool)
        mask[SW_ROW, SW_COL] = mask[0, 1] = False
        assert torch.equal(w[mask], plain[mask])
    finally:
        restore(lm, snap)


def test_check_keep_rejects_bad_cells(implanted):
    a, _ = implanted
    with pytest.raises(ValueError, match="not a quantizable linear"):
        check_keep(a.lm, {"lm_head": [(0, 0)]})
    with pytest.raises(ValueError, match=r"\[64, 128\]"):
        check_keep(a.lm, {f"model.layers.{SW_LAYER}.mlp.down_proj": [(64, 0)]})


def test_keep_in_score_variants_and_run_quality(implanted, run):
    a, _ = implanted
    name = f"model.layers.{SW_LAYER}.mlp.down_proj"
    w = a.weight(name)
    wz = w.clone()
    wz[SW_ROW, SW_COL] = 0.0
    before = state(a.lm.model)
    # a plain mapping: the kept cell is the fp16 original again (20.0 is exact in fp16), so this is the fp model
    df = evaluate.score_variants(a, {"z": lambda: {name: wz}}, keep={name: [(SW_ROW, SW_COL)]})
    plain = evaluate.score_variants(a, {"z": lambda: {name: wz}})
    assert float(df[(df["variant"] == "z") & (df["metric"] == "kl")]["value"].iloc[0]) == 0.0
    assert float(plain[(plain["variant"] == "z") & (plain["metric"] == "kl")]["value"].iloc[0]) > 0.0
    # every method with a model half takes keep: each variant is built once and scored plain and kept; the kept rows
    # equal a run whose quantized weights get the cell written back, and only the plain rows are cached
    q = evaluate.run_quality(a, modes=["rtn", "hqq"], bits=[3], group_size=GS, keep=run.keep,
                             protocol="all-positions")  # score_variants' protocol, compared below
    assert_bit_identical(a.lm.model, before)
    kl = q[q["metric"] == "kl"].set_index("mode")["value"]
    assert list(kl.index) == ["fp", "rtn", "rtn+keep", "hqq", "hqq+keep"]
    assert kl["rtn+keep"] != kl["rtn"]  # the super weight's rounding error is gone
    cached = evaluate.cached_quality(a)
    assert not cached["mode"].str.endswith("+keep").any()
    assert float(cached[(cached["mode"] == "rtn") & (cached["metric"] == "kl")]["value"].iloc[0]) == kl["rtn"]
    plain = evaluate.run_quality(a, modes=["rtn"], bits=[3], group_size=GS, protocol="all-positions")
    assert float(plain[(plain["mode"] == "rtn") & (plain["metric"] == "kl")]["value"].iloc[0]) == kl["rtn"]
    # by hand: RTN with the super weight written back in fp16
    from core.quant import pseudo_quantize
    manual = {n: pseudo_quantize(a.weight(n), 3, GS) for n in a.names}
    manual[name][SW_ROW, SW_COL] = torch.tensor(SW_VALUE).half().float()
    ref = evaluate.score_variants(a, {"m": lambda: manual})
    assert float(ref[(ref["variant"] == "m") & (ref["metric"] == "kl")]["value"].iloc[0]) == pytest.approx(
        kl["rtn+keep"], rel=1e-9)


def test_keep_table(implanted, run):
    a, _ = implanted
    modes = ["rtn", "awq"]
    df = anatomy.keep_table(a, run, modes=modes)
    assert set(df["mode"]) == {"fp", *modes}
    assert set(df.loc[df["mode"] != "fp", "bits"]) == {3, 4}
    assert set(df["kept"]) == {False, True}
    again = anatomy.cached_keep_table(a, run)
    pd.testing.assert_frame_equal(again, df)


# --------------------------------------------------------------------------------------------------
# cache and CLI
# --------------------------------------------------------------------------------------------------
def test_cache_round_trip_and_half_written(implanted, run):
    a, _ = implanted
    got = anatomy.cached_anatomy(a)
    assert got is not None and got.meta["run_id"] == run.meta["run_id"]
    for k in anatomy.TABLES:
        pd.testing.assert_frame_equal(got.tables[k], run.tables[k], check_dtype=False)
    assert got.settings == run.settings
    # one table from another run: the whole anatomy is not read
    t = a.read_extra("anatomy_layers")
    a.write_extra("anatomy_layers", t.assign(run_id="other"))
    try:
        assert anatomy.cached_anatomy(a) is None
    finally:
        a.write_extra("anatomy_layers", t)
    assert anatomy.cached_anatomy(a) is not None


def test_settings_validation():
    with pytest.raises(ValueError, match="spike"):
        anatomy.AnatomySettings(spike=-1)
    with pytest.raises(ValueError, match="prompt"):
        anatomy.AnatomySettings(prompt="  ")
    with pytest.raises(ValueError, match="max_iterations"):
        anatomy.AnatomySettings(max_iterations=0)
    with pytest.raises(ValueError):
        anatomy.AnatomySettings(bits=(9,))
    s = anatomy.AnatomySettings(bits=(4, 3, 4))
    assert s.bits == (3, 4) and anatomy.AnatomySettings.from_json(s.to_json()) == s


def test_encoder_refused(tiny_dir, tokenizer_dir, tmp_path):
    a = analyze(tiny_settings(tiny_dir("bert"), tokenizer_dir), tmp_path)
    with pytest.raises(ValueError, match="causal"):
        anatomy.run_anatomy(a)


def _cli(*args, cache) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "core", "anatomy", *args, "--cache-dir", str(cache)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_cli_json_matches_cache(implanted, run, tokenizer_dir):
    a, _ = implanted
    r = _cli("--model", a.settings.model, "--tokenizer", tokenizer_dir, "--n-samples", "4", "--seqlen", "64",
             "--heldout-samples", "2", "--sample-rows", "128", "--group-size", "32", "--n-grid", "10", "--json",
             "--quiet", cache=a.cache_dir)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["first_massive_layer"] == SW_LAYER and out["massive_dims"] == [SW_ROW]
    assert [(s["layer"], s["row"], s["col"]) for s in out["super_weights"]] == [(SW_LAYER, SW_ROW, SW_COL)]
    assert "super weights" in r.stdout and "massive" in r.stdout


def test_cli_bad_input(tmp_path):
    r = _cli("--spike", "-3", cache=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: spike")
    r = _cli("--attribute", "nope@3", cache=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --attribute takes a method")
    r = _cli("--readers", "-1", cache=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --readers")
    assert not any(tmp_path.iterdir())  # refused before any work


# --------------------------------------------------------------------------------------------------
# the page: AppTest and a real browser
# --------------------------------------------------------------------------------------------------
def test_page_in_apptest(implanted, run, monkeypatch):
    import json as _json

    from app_harness import app_test

    a, _ = implanted
    at = app_test(monkeypatch, a.cache_dir, a.path)
    at.run()
    at.switch_page("pages/outliers.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Outliers"
    # the module's run fixture cached an anatomy with the default thresholds: the page shows it right away
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Massive activations appear at layer"] == str(SW_LAYER)
    assert metrics["Massive dimensions"] == str(SW_ROW)
    assert metrics["Super weights"] == "1"
    assert any(f"L{SW_LAYER} [{SW_ROW}, {SW_COL}] = 20" in m.value for m in at.markdown)
    specs = [_json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    titles = [str(s.get("title", {}).get("text", "")) for s in specs]
    for t in ("Residual stream magnitude per layer", f"Layer {SW_LAYER}: the largest activations",
              "Super-weight search", "Interventions on the outliers"):
        assert any(t in x for x in titles), (t, titles)
    # changing a threshold enables the button; pressing it recomputes with the new thresholds, no error
    at.number_input(key="out_iters").set_value(4).run()
    btn = at.button(key="out_run")
    assert not btn.disabled
    btn.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert anatomy.cached_anatomy(a).settings.max_iterations == 4
    # a bad threshold is one sentence, the page stays up
    at.text_input(key="out_prompt").set_value("   ").run()
    assert [e.value for e in at.error] == ["The super-weight prompt is empty"]
    at.text_input(key="out_prompt").set_value(anatomy.PAPER_PROMPT).run()
    # the readers' table on demand
    at.button(key="out_readers").click().run()
    assert not at.exception and not at.error
    assert anatomy.cached_consumers(a, anatomy.cached_anatomy(a)) is not None
    specs = [_json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    assert any("Linears reading the massive tokens" in str(s.get("title", {}).get("text", "")) for s in specs)


def test_page_in_a_real_browser(implanted, tmp_path_factory, tmp_path):
    """The page in chromium: open the implanted model from the sidebar, press "Run the anatomy", read the numbers
    and the drawn charts' titles, download a chart as PNG."""
    from pathlib import Path

    from app_harness import (CHROMIUM, CHROMIUM_ARGS, ensure_bundled, metric_value, settle, shared_cache,
                             streamlit_server)
    from core.analysis import list_cached
    from core.present import common

    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    cache = shared_cache(tmp_path_factory)
    ensure_bundled(cache)  # what a first visit opens; the implanted model is then picked in the sidebar
    a = analyze(implanted[0].settings, cache)
    entries = list_cached(cache)
    label = dict(zip((m["path"] for m in entries), common.compare_labels(entries)))[str(a.path)]
    log = tmp_path / "server.log"
    with streamlit_server(cache, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400}, accept_downloads=True)
            page.goto(f"{url}/outliers", timeout=300_000)
            settle(page, timeout=600)
            assert page.locator('[data-testid="stMain"] h1').first.inner_text().strip() == "Outliers"
            cached = page.locator('[data-testid="stSidebar"] [data-testid="stExpander"]', has_text="Cached analyses")
            cached.locator("summary").click()
            pick = cached.locator('[data-testid="stSelectbox"]')
            pick.wait_for(state="visible", timeout=30_000)
            option = page.get_by_role("option").filter(has_text=label)
            for _ in range(5):  # the list opens on a click once the widget is interactive (slow under load)
                pick.click()
                try:
                    option.wait_for(state="visible", timeout=10_000)
                    break
                except Exception:  # noqa: BLE001 - not open yet: click again
                    page.keyboard.press("Escape")
            option.click()
            settle(page)
            cached.locator('[data-testid="stButton"] button', has_text="Open").click()
            settle(page)
            page.get_by_role("button", name="Run the anatomy").click()
            settle(page, timeout=600)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            assert metric_value(page, "Massive activations appear at layer") == str(SW_LAYER)
            assert metric_value(page, "Massive dimensions") == str(SW_ROW)
            assert metric_value(page, "Super weights") == "1"
            main = page.locator('[data-testid="stMain"]')
            assert f"L{SW_LAYER} [{SW_ROW}, {SW_COL}] = 20" in main.inner_text()
            charts = page.evaluate("""() => Array.from(document.querySelectorAll(
                '[data-testid="stMain"] [data-testid="stVegaLiteChart"]')).map(c => Array.from(
                c.querySelectorAll('text')).map(t => t.textContent).join(' | '))""")
            for title, axis in (("Residual stream magnitude per layer", "decoder layer (index)"),
                                (f"Layer {SW_LAYER}: the largest activations", "residual dimension (index)"),
                                ("Super-weight search", "|x| on the prompt (log scale)"),
                                ("Interventions on the outliers", "KL to fp, nats (log scale)")):
                assert any(title in c and axis in c for c in charts), (title, [c[:80] for c in charts])
            with page.expect_download(timeout=120_000) as dl:
                page.locator('[data-testid="stDownloadButton"]', has_text="PNG").first.click()
            png = Path(dl.value.path()).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and dl.value.suggested_filename.endswith("residual_magnitude.png")
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()
