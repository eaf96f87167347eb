"""GGUF export (issue 19): the shared export model (folding AWQ's scales exactly as Model quality applies them),
the GGUF writer (metadata, tokenizer, llama.cpp types, attn_q / attn_k row order), its refusals, and the written
file run in llama.cpp itself (skipped only when llama.cpp's Python bindings are not built)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_settings
from test_gguf import N_HEAD, N_KV, tiny_gguf, write_tiny_gguf  # noqa: F401 - the tiny GGUF fixture
from core.analysis import AnalysisSettings, analyze
from core.grids.spec import QuantSpec
from core.model.calibration import CalibrationSpec
from core.studies import evaluate, export as ex, gguf_export
from core.studies.sweep import SweepSettings

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HAVE_TOOL = ex.llamacpp() is not None and ex.llamacpp().tool_path("llama-perplexity") is not None
needs_tool = pytest.mark.skipif(not HAVE_TOOL, reason="llama-perplexity is not built; tools/build_llamacpp.sh builds it")
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama.cpp's Python bindings (llama_cpp) are not built; "
                                                        "tools/build_llamacpp.sh builds them")
GS = 32


@pytest.fixture(scope="module")
def tiny_llama(tiny_dir, tokenizer_dir, tmp_path_factory):
    return analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path_factory.mktemp("export-llama"))


@pytest.fixture(scope="module")
def gguf_analysis(tiny_gguf, tokenizer_dir, tmp_path_factory):  # noqa: F811
    path, _ = tiny_gguf
    settings = tiny_settings(str(path), tokenizer_dir, sweep=SweepSettings(bits=(4,), group_size=32, n_grid=5),
                             calibration=CalibrationSpec(n_samples=2, seqlen=64, heldout_samples=4))
    settings = AnalysisSettings(**{**settings.__dict__, "tokenizer": None})  # the GGUF's own tokenizer
    return analyze(settings, tmp_path_factory.mktemp("export-gguf-cache"))


def _metrics(df, variant=None, mode=None) -> dict[str, float]:
    sel = df[df["variant"] == variant] if variant is not None else df[df["mode"] == mode]
    return dict(zip(sel["metric"], sel["value"]))


@pytest.mark.parametrize("method", ["rtn", "awq-grouped", "awq-clip"])
def test_folded_export_model_scores_exactly_as_model_quality(method, tiny_llama):
    """fake_weights() with the folded norms, scored by score_variants, gives run_quality's numbers to the bit."""
    spec = QuantSpec(4, GS, True)
    m = ex.prepare_export(tiny_llama, method=method, spec=spec)
    assert set(m.linears) == set(tiny_llama.names)
    if method != "rtn":  # AWQ's scales went into the RMSNorms (and up_proj's rows)
        assert any(k.endswith("input_layernorm.weight") for k in m.folded)
        assert any(k.endswith("post_attention_layernorm.weight") for k in m.folded)
    got = _metrics(evaluate.score_variants(tiny_llama, {"x": m.fake_weights}, protocol="llama.cpp"), variant="x")
    want = _metrics(evaluate.run_quality(tiny_llama, modes=[method], bits=[4], group_size=GS), mode=method)
    assert got.keys() == want.keys()
    for k in got:  # percentiles are NaN under llama.cpp's protocol below 100 scored tokens, as llama-perplexity
        assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), k
    # the fake weight is the grid's rounding of the folded weight, and different from the fp weight
    li = m.linears["model.layers.0.mlp.down_proj"]
    assert not torch.equal(li.fake, li.weight)
    assert torch.allclose(ex.round_weight(li.weight, spec), li.fake, atol=1e-6)


def test_per_linear_awq_is_refused_with_one_sentence(tiny_llama):
    with pytest.raises(ex.ExportError, match="awq-grouped or awq-clip") as e:
        ex.prepare_export(tiny_llama, method="awq", spec=QuantSpec(4, GS, True))
    assert "\n" not in str(e.value)


def test_plan_settings_and_corrupt_plans(tiny_llama):
    names = tiny_llama.names
    layers = {n: {"bits": 4, "group_size": 32} for n in names}
    layers[names[0]] = {"bits": 8, "group_size": 32}
    layers[names[1]] = {"bits": 16, "group_size": 0}
    m = ex.prepare_export(tiny_llama, method="rtn", plan={"method": "rtn", "layers": layers})
    assert m.linears[names[0]].spec == QuantSpec(8, 32) and m.linears[names[1]].spec is None
    assert torch.equal(m.linears[names[1]].fake, tiny_llama.weight(names[1]))
    g = ex.prepare_export(tiny_llama, method="rtn", plan={"method": "rtn", "layers": layers}, llamacpp_types=True)
    assert g.linears[names[0]].spec.format == "Q8_0" and g.linears[names[2]].spec.format == "Q4_1"
    for bad, msg in [({"layers": {}}, "no 'layers'"), ({"layers": {**layers, "x.y": {"bits": 4}}}, "x.y"),
                     ({"layers": {n: v for n, v in layers.items() if n != names[3]}}, "no setting"),
                     ({"layers": {**layers, names[2]: {"bits": "four"}}}, "not {")]:
        with pytest.raises(ex.ExportError, match=msg):
            ex.prepare_export(tiny_llama, method="rtn", plan=bad)


def test_gguf_of_a_folder_model_is_refused_and_leaves_nothing(tiny_llama, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ex.ExportError, match="not supported yet"):
        ex.export(tiny_llama, format="gguf", out=out, method="rtn", spec=ex.type_spec("Q4_0"), verify=False)
    assert list(tmp_path.iterdir()) == []


def test_gguf_writer_types_metadata_and_row_order(gguf_analysis, tiny_gguf, tmp_path):  # noqa: F811
    import gguf

    path, model = tiny_gguf
    out = tmp_path / "q40"
    s = ex.export(gguf_analysis, format="gguf", out=out, method="awq-grouped", spec=ex.type_spec("Q4_0"), verify=False)
    assert Path(s["folder"]) == out and sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    src, got = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(out / "model.gguf"))
    assert [t.name for t in got.tensors] == [t.name for t in src.tensors]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.attention.head_count_kv"):
        assert got.fields[key].contents() == src.fields[key].contents()
    types = {t.name: t.tensor_type.name for t in got.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    # every linear: the file's tensor dequantized is the explorer's fake weight in GGUF's row order
    m = ex.prepare_export(gguf_analysis, method="awq-grouped", spec=ex.type_spec("Q4_0"))
    t = {x.name: x for x in got.tensors}
    for hf, gg, heads in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", N_HEAD),
                          ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", N_KV),
                          ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", 0)]:
        deq = torch.from_numpy(gguf.quants.dequantize(t[gg].data, t[gg].tensor_type).copy())
        fake = m.linears[hf].fake
        assert torch.equal(deq, gguf_export.permute_rows(fake, heads) if heads else fake)
    # the folded norms are written, not the source's
    gg = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    changed = 0
    for hf in m.folded:
        blk, norm = hf.split(".")[2], hf.split(".")[3]
        got_norm = torch.from_numpy(np.array(t[f"blk.{blk}.{gg[norm]}.weight"].data))
        assert torch.equal(got_norm, m.state[hf].float())
        changed += not torch.equal(got_norm, model.get_parameter(hf).detach())
    assert len(m.folded) == 4 and changed > 0


def test_existing_out_unknown_type_and_corrupt_plan_leave_nothing(gguf_analysis, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export(gguf_analysis, format="gguf", out=out, method="rtn", spec=ex.type_spec("Q4_0"), verify=False)
    with pytest.raises(ex.ExportError, match="unknown llama.cpp type 'Q4_9'"):
        ex.type_spec("Q4_9")
    with pytest.raises(ex.ExportError, match="not a quantizable linear"):
        ex.export(gguf_analysis, format="gguf", out=tmp_path / "new", method="rtn",
                  plan={"layers": {"nope": {"bits": 4, "group_size": 32}}}, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and list(out.iterdir()) == []


def test_interrupted_write_leaves_nothing(gguf_analysis, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf_export, "quantize_type", boom)
    with pytest.raises(KeyboardInterrupt):
        ex.export(gguf_analysis, format="gguf", out=tmp_path / "x", method="rtn", spec=ex.type_spec("Q4_0"),
                  verify=False)
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "core", "export", "--cache-dir", str(cache), "--quiet", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("args, msg", [
    (["--type", "Q4_9"], "unknown llama.cpp type"),
    (["--plan", "/nonexistent/plan.json"], "does not exist"),
    (["--type", "Q4_0", "--plan", "x.json"], "not both"),
    ([], "give --type"),
])
def test_cli_bad_input_is_one_line(args, msg, tmp_path):
    r = _cli("--model", "smollm2", "--out", str(tmp_path / "o"), *args, cache=tmp_path)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "o").exists()


@needs_llama
def test_exported_gguf_runs_in_llamacpp_and_agrees(gguf_analysis, tmp_path):
    s = ex.export(gguf_analysis, format="gguf", out=tmp_path / "v", method="awq-clip", spec=ex.type_spec("Q4_0"))
    v = s["verify"]
    assert v["ok"], v["agreement"]
    assert v["agree"]["kl_mean"] <= gguf_export.AGREE_KL and v["n_tokens"] > 0
    rows = {r["metric"]: r for r in v["rows"]}
    assert abs(rows["perplexity"]["llamacpp"] / rows["perplexity"]["explorer"] - 1) < 0.05
    json.dumps(s, default=str)  # the CLI's --json summary


def test_kld_base_encoding_matches_perplexity_cpp():
    """perplexity.cpp's 16-bit log-prob record, checked by decoding it: within one quantization step of the exact
    log-softmax over the top 16 nats, and the fields where llama.cpp puts them."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(101, generator=g) * 4).numpy().astype(np.float32)
    rec = gguf_export.encode_log_probs(x)
    assert rec.dtype == np.uint16 and rec.shape == (2 * 51 + 4,)
    scale, min_lp = rec[:4].view(np.float32)
    lp = torch.log_softmax(torch.from_numpy(x).double(), 0).numpy()
    dec = scale * rec[4:105].astype(np.float64) + min_lp
    keep = lp > lp.max() - 16
    assert np.abs(dec[keep] - lp[keep]).max() <= scale
    assert scale == pytest.approx((x.max() - max(x.min(), x.max() - 16)) / 65535, rel=1e-6)


@needs_tool
def test_llama_perplexity_kl_divergence_reads_the_explorers_prediction(gguf_analysis, tmp_path):
    """llama-perplexity --kl-divergence on the exported file, against the explorer's fp reference on the explorer's
    own held-out windows (a --kl-divergence-base file written by the explorer): its mean KL and same-top read the
    explorer's prediction for the same weights within llama.cpp's own ± (plus the runtimes' f16 KV floor)."""
    from core.model import score

    a = gguf_analysis
    s = ex.export(a, format="gguf", out=tmp_path / "q", method="awq-clip", spec=ex.type_spec("Q4_0"), verify=False)
    held = score.windows(a.lm, evaluate.eval_data(a, a.lm).heldout, score.LLAMACPP)
    with torch.no_grad():
        fp = torch.cat([score.output(a.lm, held[i:i + 1]) for i in range(held.shape[0])])
    base = gguf_export.write_kld_base(tmp_path / "base.kld", held, fp)
    got = gguf_export.llama_perplexity_kld(Path(s["folder"]) / "model.gguf", base, held.shape[1])
    m = ex.prepare_export(a, method="awq-clip", spec=ex.type_spec("Q4_0"))
    pred = _metrics(evaluate.score_variants(a, {"q": m.fake_weights}, protocol="llama.cpp"), variant="q")
    assert got["kl"] == pytest.approx(pred["kl"], abs=3 * got["kl_se"] + 0.003)
    assert got["same_top"] == pytest.approx(pred["same_top"], abs=3 * got["same_top_se"] + 0.02)
    assert got["perplexity"] == pytest.approx(pred["perplexity"], rel=0.05)


def test_imatrix_weighted_types(gguf_analysis):
    """--imatrix: each linear rounded by llama.cpp's importance-weighted search with the analysis' mean x^2 (divided
    by AWQ's folded scales squared), which differs from the plain rounding and is what the file holds."""
    from core.grids import llamacpp
    from core.model import imatrix

    plain = ex.prepare_export(gguf_analysis, method="rtn", spec=ex.type_spec("Q4_0"))
    weighted = ex.prepare_export(gguf_analysis, method="rtn", spec=ex.type_spec("Q4_0"), imatrix=True)
    name = "model.layers.0.mlp.down_proj"
    li = weighted.linears[name]
    assert torch.allclose(li.imatrix.double(), torch.from_numpy(imatrix.mean_sq(gguf_analysis, name)), rtol=1e-6)
    assert not torch.equal(li.fake, plain.linears[name].fake)
    data = llamacpp.quantize(li.weight.numpy(), "Q4_0", li.imatrix.numpy())
    assert torch.equal(ex.dequantize_type(data, "Q4_0", tuple(li.weight.shape)), li.fake)
    awq = ex.prepare_export(gguf_analysis, method="awq-grouped", spec=ex.type_spec("Q4_0"), imatrix=True)
    s = awq.state["model.layers.0.input_layernorm.weight"]  # folded: norm / s, so s = original / folded
    q = awq.linears["model.layers.0.self_attn.q_proj"]
    from core.model.stream import state_dict

    scale = state_dict(gguf_analysis.lm.model)["model.layers.0.input_layernorm.weight"] / s  # streamed: read
    assert torch.allclose(q.imatrix, weighted.linears["model.layers.0.self_attn.q_proj"].imatrix / scale.pow(2),
                          rtol=1e-4)


def test_cli_exports_a_gguf_of_a_gguf_model(tiny_gguf, tmp_path):  # noqa: F811
    path, _ = tiny_gguf
    out = tmp_path / "cli"
    r = _cli("--model", str(path), "--n-samples", "2", "--seqlen", "64", "--heldout-samples", "2", "--sweep-bits", "4",
             "--method", "awq-clip", "--type", "Q8_0", "--out", str(out), "--json",
             *([] if HAVE_LLAMA else ["--no-verify"]), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["tensor_types"]["Q8_0"] == 14 and (out / "model.gguf").is_file()
    assert "wrote" in r.stdout and (not HAVE_LLAMA or "llama.cpp" in r.stdout)


def test_plan_written_as_a_mixed_type_gguf(gguf_analysis, tmp_path):
    """A plan's bits become llama.cpp types per linear (plan_export.gguf_type: 8 -> Q8_0, 4 -> Q4_1 with a zero
    point, 16 -> F32), a layer may name its type; awq-grouped's scales are searched once and folded (a note says so)."""
    import gguf

    names = gguf_analysis.names
    layers = {n: {"bits": 4, "group_size": 32} for n in names}
    layers[names[0]] = {"bits": 8, "group_size": 32}
    layers[names[1]] = {"bits": 16, "group_size": 0}
    layers[names[2]] = {"bits": 5, "group_size": 32, "type": "Q5_0"}
    s = ex.export(gguf_analysis, format="gguf", out=tmp_path / "plan", method="awq-grouped",
                  plan={"method": "awq", "zero_point": True, "layers": layers}, verify=False)
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "plan" / "model.gguf")).tensors}
    assert got["blk.0.attn_q.weight"] == "Q8_0" and got["blk.0.attn_k.weight"] == "F32"
    assert got["blk.0.attn_v.weight"] == "Q5_0" and got["blk.1.ffn_down.weight"] == "Q4_1"
    assert any("searched once at Q4_1" in n for n in s["notes"])
    assert 4.5 < s["linear_bits_per_weight"] < 8


def test_types_plan_written_as_a_gguf_at_its_budget(gguf_analysis, tmp_path):
    """A plan made in llama.cpp types (core.studies.plan, PlanSettings.types) is written with each linear in its own
    type: the file's linear tensors cost exactly the plan's bits per weight (read from the bytes written), within the
    budget; llama.cpp loads it and agrees with the explorer's prediction (when the bindings are built)."""
    import gguf

    from core.studies import plan as P
    from core.studies import plan_export as pe

    rep = P.run(gguf_analysis, P.PlanSettings(budget=4.8, method="rtn", types=("Q4_0", "Q4_1", "Q5_0", "Q8_0"),
                                              test_tokens=128, fisher_samples=2))
    p = rep.plan
    assert p.in_types and p.avg_bits <= 4.8 and len(set(p.layers.values())) >= 1
    s = ex.export(gguf_analysis, format="gguf", out=tmp_path / "plan", method="rtn", plan=pe.plan_dict(p, rep),
                  verify=HAVE_LLAMA)
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "plan" / "model.gguf")).tensors}
    mapping = {f"model.layers.{b}.{hf}": f"blk.{b}.{gg}.weight" for b in range(2) for hf, gg in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"))}
    assert {n: got[mapping[n]] for n in p.layers} == dict(p.layers)
    assert s["linear_bits_per_weight"] == pytest.approx(p.avg_bits, rel=1e-12) and s["fallbacks"] == {}
    if HAVE_LLAMA:
        assert s["verify"]["ok"], s["verify"]["agreement"]


@needs_llama
def test_cli_plan_in_types_writes_a_gguf_llamacpp_runs(tiny_gguf, tmp_path):  # noqa: F811
    path, _ = tiny_gguf
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "core", "plan", "--model", str(path), "--cache-dir", str(tmp_path / "cache"),
           "--n-samples", "2", "--seqlen", "64", "--heldout-samples", "2", "--sweep-bits", "4", "--budget", "5",
           "--method", "awq", "--types", "q4_0,Q4_1,Q8_0,Q3_K", "--fisher-samples", "1", "--test-tokens", "128",
           "--export", "json,llamacpp", "--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "g"), "--gguf-method", "rtn", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(x.startswith("method     awq; candidates: llama.cpp types Q4_0,Q4_1,Q8_0,Q3_K") for x in lines)
    gg = next(x for x in lines if x.startswith("gguf "))
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert f"written with rtn: {plan['avg_bits']:.4f} bits per weight" in gg
    assert all("type" in v for v in plan["layers"].values()) and plan["avg_bits"] <= 5
    assert (tmp_path / "g" / "model.gguf").is_file() and any(x.startswith("agreement  ") for x in lines)
    # an existing folder is refused before anything runs, in one line
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "already exists" in r.stderr
