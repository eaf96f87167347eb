"""Models, streaming statistics, the sweep, the cache and the CLI on tiny random models and the bundled one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT, build_tiny, tiny_settings
from core.model import calibration, collect, linears, models, store
from core.analysis import analyze, list_cached

FAMILIES = {
    "qwen2": Counter({"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2}),
    "llama": Counter({"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2}),
    "mistral": Counter({"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2}),
    "gpt2": Counter({"qkv": 2, "o": 2, "up": 2, "down": 2}),
    "opt": Counter({"q": 2, "k": 2, "v": 2, "o": 2, "up": 2, "down": 2}),
    "bert": Counter({"q": 2, "k": 2, "v": 2, "o": 2, "up": 2, "down": 2}),
}
DISTINCT_INPUTS_PER_BLOCK = {"qwen2": 4, "llama": 4, "gpt2": 4, "opt": 4, "bert": 4}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_family_mapping_and_layout(kind):
    lm = models.wrap_model(build_tiny(kind), tokenizer=None)
    assert Counter(li.family for li in lm.linears) == FAMILIES[kind]
    assert {li.block for li in lm.linears} == {0, 1}
    for li in lm.linears:
        w = lm.weight(li.name)
        assert w.shape == (li.out_features, li.in_features)  # [out, in], Conv1D transposed
        mod = lm.model.get_submodule(li.name)
        x = torch.randn(3, li.in_features)
        ref = mod(x)
        assert torch.allclose(x @ w.T + mod.bias if mod.bias is not None else x @ w.T, ref, atol=1e-5)
    names = " ".join(li.name for li in lm.linears)
    assert "embed" not in names and "lm_head" not in names and "pooler" not in names


def test_family_names_of_other_schemes():
    assert linears.family_of("self_attention.query_key_value") == "qkv"
    assert linears.family_of("attn.Wqkv") == "qkv"
    assert linears.family_of("self_attn.qkv_proj") == "qkv"
    assert linears.family_of("mlp.gate_up_proj") == "gate_up"
    assert linears.family_of("mlp.dense_4h_to_h") == "down"
    assert linears.family_of("attention.output.dense") == "o"
    assert linears.family_of("intermediate.dense") == "up"
    assert linears.family_of("output.dense") == "down"


def _tokens(n=6, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 30000, (n, seqlen), generator=g)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_streaming_stats_equal_direct(kind):
    lm = models.wrap_model(build_tiny(kind), tokenizer=None)
    ids = _tokens()
    # reference: capture every input in full with plain hooks
    captured: dict[str, list[torch.Tensor]] = {}
    hs = [lm.model.get_submodule(li.name).register_forward_pre_hook(
        lambda m, a, n=li.name: captured.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).clone()))
        for li in lm.linears]
    with torch.no_grad():
        for i in range(0, 6, 2):  # same batches as collect with batch_tokens=64
            lm.model(input_ids=ids[i:i + 2])
    for h in hs:
        h.remove()
    col = collect.collect(lm, ids, None, sample_rows=50, batch_tokens=64, k_extremes=400)
    assert col.n_tokens == ids.numel()
    for key, st in col.stats.items():
        x = torch.cat(captured[key]).double()
        mean, std = x.mean(0), x.std(0, unbiased=False)
        assert torch.allclose(st.mean_abs.double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(st.max_abs.double(), x.abs().amax(0), rtol=1e-6)
        assert torch.allclose(st.mean.double(), mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(st.std.double(), std, rtol=1e-4, atol=1e-6)
        kurt = ((x - mean) ** 4).mean(0) / std**4 - 3
        assert torch.allclose(st.kurtosis.double(), kurt, rtol=1e-3, atol=1e-3)
        outl = ((x - mean).abs() > 6 * std).double().mean(0)
        assert torch.allclose(st.outlier_ratio.double(), outl, atol=1e-9)
        # the kept sample is the exact rows at the sampled positions
        assert torch.equal(col.calib_sample[key], torch.cat(captured[key])[col.sample_index].float())


def test_outlier_ratio_counts_exactly():
    acc = collect.ChannelAccumulator(2, k_extremes=8)
    x = torch.zeros(1000, 2)
    x[::2, 0], x[1::2, 0] = 1.0, -1.0
    x[:3, 0] = torch.tensor([50.0, -60.0, 70.0])  # three 6-sigma outliers in channel 0
    for chunk in x.split(128):
        acc.update(chunk)
    r = acc.result()
    assert r.outlier_ratio[0] == pytest.approx(3 / 1000)
    assert r.outlier_ratio[1] == 0 and not r.outlier_saturated.any()


@pytest.mark.parametrize("kind", ["qwen2", "opt"])
def test_shared_inputs_are_deduplicated(kind):
    lm = models.wrap_model(build_tiny(kind), tokenizer=None)
    col = collect.collect(lm, _tokens(2), None, sample_rows=10)
    keys = set(col.input_of.values())
    assert len(keys) == 2 * DISTINCT_INPUTS_PER_BLOCK[kind]
    assert set(col.stats) == keys
    by_name = {li.name.rsplit(".", 1)[-1]: col.input_of[li.name].rsplit(".", 1)[-1] for li in lm.linears if li.block == 0}
    assert by_name["k_proj"] == by_name["q_proj"] == by_name["v_proj"] == "q_proj"
    if kind == "qwen2":
        assert by_name["up_proj"] == "gate_proj"
        assert by_name["down_proj"] == "down_proj" and by_name["o_proj"] == "o_proj"


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_also_on_error():
    lm = models.wrap_model(build_tiny("llama"), tokenizer=None)
    before = _hook_count(lm.model)
    collect.collect(lm, _tokens(2), _tokens(1), sample_rows=10)
    assert _hook_count(lm.model) == before

    def boom(frac, msg):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        collect.collect(lm, _tokens(4), None, batch_tokens=32, progress=boom)
    assert _hook_count(lm.model) == before


def test_nan_activations_name_the_layer():
    lm = models.wrap_model(build_tiny("llama"), tokenizer=None)
    lm.model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(collect.CollectError, match="layers.1.mlp.down_proj"):
        collect.collect(lm, _tokens(2), None, sample_rows=10)


def test_calibration_blocks_and_split(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = calibration.CalibrationSpec(n_samples=5, seqlen=600, heldout_samples=2)
    d = calibration.prepare(spec, tok, max_positions=512)
    assert d.calib.shape == (5, 512) and d.heldout.shape == (2, 512)  # capped at the model's positions
    d2 = calibration.prepare(spec, tok, max_positions=512)
    assert torch.equal(d.calib, d2.calib) and d.text_sha == d2.text_sha
    calib, held = calibration.split_text(calibration.bundled_text())
    assert len(held) > 30000 and len(calib) > 8 * len(held) and held[:200] not in calib
    with pytest.raises(calibration.CalibrationError, match="empty"):
        calibration.prepare(spec, tok, 512, text="   \n")
    with pytest.raises(calibration.CalibrationError, match="too short"):
        calibration.prepare(spec, tok, 512, text="just a few words")


def test_analyze_cache_round_trip_and_recovery(tiny_dir, tokenizer_dir, tmp_path):
    s = tiny_settings(tiny_dir("qwen2"), tokenizer_dir)
    a = analyze(s, tmp_path)
    assert len(a.names) == 14 and len(a.layers) == 14 * 2
    assert (a.layers["awq_loss"] <= a.layers["rtn_loss"]).all()
    assert set(a.channels["input_key"]) == set(a.linears["input_key"])
    # reopening: no forward pass (the model is not even loaded)
    b = analyze(s, tmp_path)
    assert b._lm is None and b.path == a.path
    for t in ("layers", "curves", "channels", "importance"):
        assert b.tables[t].equals(a.tables[t])
    assert len(list_cached(tmp_path)) == 1
    # a truncated table is detected and the entry recomputed
    f = a.path / "layers.parquet"
    f.write_bytes(f.read_bytes()[:100])
    assert store.read_manifest(a.path) is None
    c = analyze(s, tmp_path)
    assert c.tables["layers"].equals(a.tables["layers"])
    # a schema mismatch too
    m = json.loads((a.path / "manifest.json").read_text())
    m["schema"] = 999
    (a.path / "manifest.json").write_text(json.dumps(m))
    assert store.read_manifest(a.path) is None
    d = analyze(s, tmp_path)
    assert d.tables["curves"].equals(a.tables["curves"])
    assert not [p for p in a.path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_layer_eval_matches_sweep(tiny_dir, tokenizer_dir, tmp_path):
    a = analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path)
    row = a.layers[(a.layers["family"] == "down") & (a.layers["bits"] == 3)].iloc[0]
    e = a.evaluate_layer(row["name"], alpha=row["best_alpha"], bits=3, group_size=32, n_grid=10)
    assert e.rtn_rel == pytest.approx(row["rtn_rel"], rel=1e-5)
    assert e.awq_rel == pytest.approx(row["awq_rel"], rel=1e-4)
    assert e.awq_rel_heldout == pytest.approx(row["awq_rel_heldout"], rel=1e-4)
    e0 = a.evaluate_layer(row["name"], alpha=0.0, bits=3, group_size=32, n_grid=10)
    assert e0.awq_rel == e0.rtn_rel and torch.equal(e0.w_awq, e0.w_rtn)
    e9 = a.evaluate_layer(row["name"], alpha=0.9, bits=3, group_size=32, n_grid=10)
    assert e9.awq_rel != e0.awq_rel


def test_slug_cannot_escape(tmp_path):
    for bad in ("../../etc", "/abs/path", "a/../../b", "..", "~/x"):
        p = store.entry_path(tmp_path, bad, "k")
        assert tmp_path.resolve() in p.parents


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_cli_end_to_end_minilm(tmp_path):
    args = ["analyze", "--model", "minilm", "--cache-dir", str(tmp_path), "--bits", "3,4", "--n-samples", "4",
            "--seqlen", "128", "--heldout-samples", "2", "--sample-rows", "128"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "w3: median RTN" in r.stdout and "gain in-sample" in r.stdout
    assert "100.0%" in r.stderr  # progress on stderr
    r2 = run_cli(*args)
    assert r2.returncode == 0 and "loaded from cache" in r2.stderr
    r3 = run_cli("list", "--cache-dir", str(tmp_path))
    assert "all-MiniLM-L6-v2" in r3.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/folder"], "does not exist"),
    (["--bits", "1"], "between 2 and 8"),
    (["--bits", "3,9"], "between 2 and 8"),
    (["--model", "minilm", "--group-size", "100"], "group size 100 does not divide the input width 384, 1536"),
    (["--calib-file", "/no/such.txt"], "does not exist"),
])
def test_cli_bad_input_one_line(tmp_path, args, needle):
    r = run_cli("analyze", "--cache-dir", str(tmp_path), "--quiet", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1]
