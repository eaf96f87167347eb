"""Model quality (issue 4): whole-model fake quantization, grouped AWQ, quality metrics, cache and CLI,
on tiny random Llama / Qwen2 / BERT models built from configs (no download)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from core.model.stream import state_dict as stream_state

from conftest import ROOT, tiny_settings
from core import methods
from core.methods import awq_search as awq, grouped, recipe
from core.studies import evaluate
from core.model import blocks, linears, models, score
from core.analysis import analyze, open_entry
from core.quant import pseudo_quantize

GS = 32  # divides the tiny models' widths (64, 128)
AWQ_MODES = ("fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha")


@pytest.fixture(scope="module")
def tiny_analysis(tiny_dir, tokenizer_dir, tmp_path_factory):
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = analyze(tiny_settings(tiny_dir(kind), tokenizer_dir), tmp_path_factory.mktemp(f"cache-{kind}"))
        return made[kind]
    return get


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in stream_state(model).items()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = stream_state(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{k} changed"


def values(df, mode, bits, metric) -> float:
    sel = df[(df["mode"] == mode) & (df["bits"] == bits) & (df["metric"] == metric)]
    assert len(sel) == 1, (mode, bits, metric)
    return float(sel["value"].iloc[0])


# --------------------------------------------------------------------------------------------------
# causal LMs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_causal_quality_all_modes(kind, tiny_analysis, tiny_dir):
    import transformers

    a = tiny_analysis(kind)
    before = state(a.lm.model)
    seen, msgs = [], []
    df = evaluate.run_quality(a, modes=list(evaluate.MODES), bits=[8, 2], group_size=GS, protocol="all-positions",
                              progress=lambda f, m: (seen.append(f), msgs.append(m)))
    assert list(df.columns) == evaluate.COLUMNS
    assert_bit_identical(a.lm.model, before)
    assert seen and all(0 <= f <= 1 for f in seen) and seen[-1] == 1.0
    assert all(x <= y for x, y in zip(seen, seen[1:])), "progress goes backwards"
    assert msgs[0] == "loading the model" and msgs[1].startswith("full-precision reference: batch 1")
    assert seen[1] > 0  # moves with the first batch of the reference

    # fp perplexity is the plain model's (loaded afresh, scored by transformers itself)
    data = evaluate.eval_data(a, a.lm)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir(kind)).eval()
    with torch.no_grad():
        loss = plain(input_ids=data.heldout, labels=data.heldout, use_cache=False).loss
    fp_ppl = values(df, "fp", evaluate.FP_BITS, "perplexity")
    assert fp_ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    fp_rows = df[df["mode"] == "fp"]
    assert set(fp_rows["metric"]) == set(evaluate.CAUSAL_METRICS) and (fp_rows["bits"] == evaluate.FP_BITS).all()
    assert values(df, "fp", evaluate.FP_BITS, "same_top") == 1.0 and values(df, "fp", evaluate.FP_BITS, "kl_p999") == 0.0
    # its standard error by the delta method, from transformers' own per-token cross-entropies
    with torch.no_grad():
        logits = plain(input_ids=data.heldout, use_cache=False).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.heldout[:, 1:].reshape(-1),
                                               reduction="none").double()
    se = math.exp(float(ce.mean())) * float(ce.std()) / math.sqrt(ce.numel())  # std: (n-1); / sqrt(n)
    assert values(df, "fp", evaluate.FP_BITS, "perplexity_se") == pytest.approx(se, rel=1e-4)
    assert (df["n_tokens"] == data.heldout.shape[0] * (data.heldout.shape[1] - 1)).all()
    assert (df["group_size"] == GS).all() and df["zero_point"].all()
    n_calib = data.calib.numel()  # the tiny analysis has fewer calibration tokens than either default budget
    budget = dict(zip(df["mode"], df["search_tokens"]))
    assert {m: budget[m] for m in AWQ_MODES} == {"fp": 0, "rtn": 0, "awq": 0, "awq-grouped": n_calib,
                                                 "awq-clip": n_calib, "const-alpha": n_calib}
    assert all(budget[m] == (n_calib if methods.METHODS[m].budget else 0) for m in methods.MODEL_METHODS)
    assert evaluate.estimate_units(a, list(evaluate.MODES), [8, 2]) > 1 + 10

    for mode in evaluate.MODES[1:]:
        p8, p2 = values(df, mode, 8, "perplexity"), values(df, mode, 2, "perplexity")
        k8, k2 = values(df, mode, 8, "kl"), values(df, mode, 2, "kl")
        assert abs(p8 / fp_ppl - 1) < 0.02, (mode, p8, fp_ppl)  # 8 bits: within 2% of fp
        assert 0 <= k8 < k2, (mode, k8, k2)  # 2 bits is worse than 8 bits
        for b in (8, 2):
            assert 0 <= values(df, mode, b, "kl_p99") <= values(df, mode, b, "kl_p999")
            assert 0 <= values(df, mode, b, "same_top") <= 1 and values(df, mode, b, "rms_dp") >= 0
            assert values(df, mode, b, "perplexity_se") > 0
        assert values(df, mode, 8, "same_top") > values(df, mode, 2, "same_top")
        assert values(df, mode, 8, "rms_dp") < values(df, mode, 2, "rms_dp")
    assert abs(values(df, "rtn", 2, "perplexity") / fp_ppl - 1) > abs(values(df, "rtn", 8, "perplexity") / fp_ppl - 1)

    # cached beside the analysis, and shown at once after reopening it
    again = open_entry(a.path)
    cached = evaluate.cached_quality(again)
    assert cached is not None and cached.equals(evaluate.cached_quality(a)) and len(cached) == len(df)
    kl = evaluate.cached_kl(again)
    assert set(zip(kl["mode"], kl["bits"])) == {(m, b) for m in evaluate.MODES[1:] for b in (8, 2)}
    for (mode, b), q in kl.groupby(["mode", "bits"]):
        q = q.sort_values("fraction")
        assert q["kl"].is_monotonic_increasing
        assert float(q.loc[q["fraction"] == 0.99, "kl"].iloc[0]) == pytest.approx(values(df, mode, b, "kl_p99"))
    search = evaluate.cached_search(again)
    assert set(search["mode"]) == {"awq", "awq-grouped", "const-alpha"}
    for _, curve in search.groupby(["mode", "bits", "target"]):
        assert curve["chosen"].sum() == 1
        assert float(curve.loc[curve["chosen"], "loss"].iloc[0]) <= float(curve.loc[curve["alpha"] == 0, "loss"].iloc[0])


def test_weights_restored_when_evaluation_fails(tiny_analysis, monkeypatch):
    a = tiny_analysis("llama")
    before = state(a.lm.model)
    real, calls = score.outputs, []

    def flaky(lm, batches):
        calls.append(1)
        if len(calls) == 2:  # the first pass after the weights were quantized (streamed: the layers pushed)
            raise RuntimeError("boom")
        yield from real(lm, batches)
    monkeypatch.setattr(score, "outputs", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate.run_quality(a, modes=["rtn"], bits=[3], group_size=GS)
    assert_bit_identical(a.lm.model, before)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_folded_scales_leave_every_block_output_unchanged(kind, tiny_analysis):
    a = tiny_analysis(kind)
    lm = a.lm
    gr = grouped.build_grouping(lm, {})
    assert gr.kind == "llama"
    per_block = 4 if kind == "llama" else 3  # Qwen2/Mistral tiny configs have GQA: v_proj [32, 64], o_proj [64, 64]
    assert len(gr.of_block(0)) == per_block and len(gr.skipped) == (0 if kind == "llama" else 2)
    assert {g.prev_kind for g in gr.groups} == {"norm", "linear"}  # o_proj has no group under GQA, down_proj has
    before = state(lm.model)
    snap = blocks.snapshot(lm)
    ids = torch.randint(100, 30000, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    data = evaluate.eval_data(a, lm)
    searched = grouped.search_grouped(lm, gr, data.calib, snap, bits=[3], group_size=GS, n_grid=10)
    gen = torch.Generator().manual_seed(0)
    random_plan = recipe.Recipe(bits=None, group_size=GS)
    for g in gr.groups:
        n_in = lm.weight(g.linears[0]).shape[1]
        recipe.add_group(random_plan, g, torch.exp(torch.randn(n_in, generator=gen)))  # s in ~[0.05, 20]
    searched_plan = searched.plans[3]
    searched_plan.bits = None  # fold the searched scales, no quantization
    for plan in (random_plan, searched_plan):
        assert plan.norm and plan.row and not plan.unscale  # folded into norms and preceding linears
        recipe.apply_recipe(lm, plan, snap)
        try:
            key = f"{next(iter(plan.norm))}.weight"
            assert not torch.equal(stream_state(lm.model)[key], snap[key])  # the fold really happened
            with torch.no_grad():
                out = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        finally:
            blocks.restore(lm, snap)
        for h, r in zip(out, ref):  # embeddings, then the output of every block
            torch.testing.assert_close(h, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    assert_bit_identical(lm.model, before)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grouped_search_never_above_rtn(kind, tiny_analysis):
    a = tiny_analysis(kind)
    lm = a.lm
    gr = grouped.build_grouping(lm, {})
    snap = blocks.snapshot(lm)
    data = evaluate.eval_data(a, lm)
    before = state(lm.model)
    res = grouped.search_grouped(lm, gr, data.calib, snap, bits=[2, 4], group_size=GS, n_grid=10, clip=True)
    assert_bit_identical(lm.model, before)
    for b in (2, 4):
        assert len(res.searches[b]) == len(gr.groups)
        for s in res.searches[b]:
            assert float(s.alphas[0]) == 0.0 and s.best_loss <= s.rtn_loss
        assert not any("q_proj" in n or "k_proj" in n for n in res.clips[b])  # the official skip list
        assert any("down_proj" in n for n in res.clips[b])

    # alpha 0 is exactly RTN: recompute RTN's loss of block 0's module-scored groups independently
    cap = blocks.capture_block(lm, 0, data.calib, batch_tokens=4096, linears=set(),
                                modules={g.inspect for g in gr.of_block(0) if g.inspect})
    for s in res.searches[4][:len(gr.of_block(0))]:
        g = s.group
        if not g.inspect:
            continue
        mod = lm.model.get_submodule(g.inspect)
        with torch.no_grad():
            ref = [blocks.first_output(mod(*ar, **kw)) for ar, kw in cap.calls[g.inspect]]
            for n in g.linears:
                linears.set_linear_weight(lm.model.get_submodule(n), pseudo_quantize(lm.weight(n), 4, GS))
            try:
                out = [blocks.first_output(mod(*ar, **kw)) for ar, kw in cap.calls[g.inspect]]
            finally:
                blocks.restore(lm, snap)
        mse = sum(float((r - o).double().pow(2).sum()) for r, o in zip(ref, out)) / sum(r.numel() for r in ref)
        assert s.rtn_loss == pytest.approx(mse, rel=1e-6)

    # the Gram-matrix loss equals the direct one
    x = torch.randn(600, 64, dtype=torch.float32) * torch.linspace(0.1, 5, 64)
    w = torch.randn(96, 64)
    sc = awq.awq_scales(x.abs().mean(0), awq.alpha_grid(10))
    direct = grouped.linear_losses(w, x, sc, bits=3, group_size=GS, zero_point=True)
    viag = grouped.linear_losses(w, None, sc, bits=3, group_size=GS, zero_point=True,
                                 gram_matrix=grouped.gram(x), n_tokens=600)
    torch.testing.assert_close(viag, direct, rtol=1e-5, atol=0)


def test_per_linear_awq_uses_the_sweep_when_it_matches(tiny_analysis):
    a = tiny_analysis("qwen2")
    s = a.settings.sweep
    ctx = methods.ModelContext(a, a.lm, evaluate.eval_data(a, a.lm), blocks.snapshot(a.lm), ("awq",), (s.bits[0],),
                               s.group_size, s.zero_point, s.n_grid, a.settings.batch_tokens, 512, 256)
    plan = methods.METHODS["awq"].model(ctx, ctx.spec(s.bits[0]), methods.awq.AWQOptions(), lambda f, m: None)
    rows = ctx.search_rows
    for li in a.lm.linears:
        c = a.alpha_curve(li.name, bits=s.bits[0], group_size=s.group_size, zero_point=s.zero_point, n_grid=s.n_grid)
        assert torch.equal(plan.col[li.name], c.scales)
    assert sum(r["chosen"] for r in rows) == len(a.lm.linears)


# --------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------
def test_encoder_quality_and_shared_input_groups(tiny_analysis):
    a = tiny_analysis("bert")
    before = state(a.lm.model)
    df = evaluate.run_quality(a, modes=["fp", "rtn", "awq-grouped", "awq-clip"], bits=[2, 8], group_size=GS)
    assert_bit_identical(a.lm.model, before)
    assert set(df["metric"]) == {"cosine", "hidden_rel_error"}
    assert values(df, "fp", evaluate.FP_BITS, "cosine") == 1.0
    data = evaluate.eval_data(a, a.lm)
    assert (df["n_tokens"] == data.heldout.numel()).all()
    for mode in ("rtn", "awq-grouped", "awq-clip"):
        assert values(df, mode, 8, "cosine") > 0.999 and values(df, mode, 8, "hidden_rel_error") < 1e-3
        assert values(df, mode, 2, "cosine") < values(df, mode, 8, "cosine")
        assert values(df, mode, 2, "hidden_rel_error") > values(df, mode, 8, "hidden_rel_error")

    input_of = dict(zip(a.linears["name"], a.linears["input_key"]))
    gr = grouped.build_grouping(a.lm, input_of)
    assert gr.kind == "shared-input"
    assert [len(g.linears) for g in gr.of_block(0)] == [3, 1, 1, 1]  # {q, k, v}, o, intermediate, output
    assert all(g.prev is None and g.inspect is None for g in gr.groups)
    note = evaluate.grouping_note(a)
    assert "not a Llama-style" in note and "attention.self.query, attention.self.key, attention.self.value" in note

    # reruns replace their rows in the cache instead of duplicating them
    n = len(evaluate.cached_quality(a))
    evaluate.run_quality(a, modes=["rtn"], bits=[2], group_size=GS)
    cached = evaluate.cached_quality(a)
    assert len(cached) == n
    assert len(cached[(cached["mode"] == "rtn") & (cached["bits"] == 2)]) == 2


def test_grouping_note_for_llama_and_gqa(tiny_analysis):
    assert "v_proj → o_proj scored on o_proj" in evaluate.grouping_note(tiny_analysis("llama"))
    assert "grouped-query attention" in evaluate.grouping_note(tiny_analysis("qwen2"))


def test_bad_input_is_a_clear_error(tiny_analysis):
    a = tiny_analysis("llama")
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate.run_quality(a, modes=["squeeze"], bits=[4], group_size=GS)
    with pytest.raises(ValueError, match="bits"):
        evaluate.run_quality(a, modes=["rtn"], bits=[1], group_size=GS)
    with pytest.raises(ValueError, match="does not divide"):
        evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=48)
    with pytest.raises(ValueError, match="at least one bit-width"):
        evaluate.run_quality(a, modes=["rtn"], bits=[], group_size=GS)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_evaluate_json(tiny_dir, tokenizer_dir, tmp_path):
    cmd = [sys.executable, "-m", "core", "evaluate", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir,
           "--modes", "fp,rtn,awq-grouped", "--bits", "4,8", "--group-size", str(GS), "--n-samples", "4",
           "--seqlen", "64", "--heldout-samples", "2", "--sample-rows", "128", "--sweep-bits", "4",
           "--cache-dir", str(tmp_path), "--json", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(set(x) == {"mode", "bits", "group_size", "protocol", "type", "metric", "value"} for x in rows)
    assert {x["type"] for x in rows} == {""}  # the integer grid
    assert {(x["mode"], x["bits"]) for x in rows} == {("fp", 16), ("rtn", 4), ("rtn", 8), ("awq-grouped", 4),
                                                      ("awq-grouped", 8)}
    assert {x["metric"] for x in rows} == set(evaluate.CAUSAL_METRICS) and all(x["group_size"] == GS for x in rows)
    assert "perplexity" in r.stdout and "awq-grouped" in r.stdout

    from core import cli
    assert cli.main(["evaluate", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir, "--modes", "bogus",
                     "--cache-dir", str(tmp_path), "--quiet"]) == 2
    assert cli.main(["evaluate", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir, "--search-tokens", "0",
                     "--cache-dir", str(tmp_path), "--quiet"]) == 2


def test_quality_in_a_llamacpp_type(tiny_analysis):
    """run_quality(format=...): every linear in the llama.cpp type (rtn: exactly the type's rounding through the one
    door fake_quant), rows labelled with the type and cached apart from the integer grid's; refusals in one sentence."""
    from core.grids.quant import fake_quant
    from core.grids.spec import QuantSpec

    a = tiny_analysis("llama")
    before = state(a.lm.model)
    grid = evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=GS, zero_point=False)
    df = evaluate.run_quality(a, modes=["fp", "rtn", "awq-clip"], bits=[], group_size=0, format="q4_0")
    assert_bit_identical(a.lm.model, before)
    assert set(df["format"]) == {"Q4_0"} and set(grid["format"]) == {evaluate.GRID}
    q = df[df["mode"] != "fp"]
    assert set(q["bits"]) == {4} and set(df["group_size"]) == {32} and not df["zero_point"].any()
    # rtn in Q4_0 is the type's rounding of every linear, scored like any variant
    spec = QuantSpec.of_type("Q4_0")
    by_hand = evaluate.score_variants(a, {"x": lambda: {n: fake_quant(a.weight(n).float(), spec) for n in a.names}},
                                      protocol="llama.cpp")
    for m in ("kl", "perplexity", "same_top"):
        assert values(df, "rtn", 4, m) == pytest.approx(float(by_hand.query("variant == 'x' and metric == @m")["value"].iloc[0]),
                                                         rel=1e-9)
    assert values(df, "rtn", 4, "kl") != values(grid, "rtn", 4, "kl")  # another grid than w4 g32 symmetric
    assert values(df, "awq-clip", 4, "kl") > 0
    # cached apart: the integer grid's readers never see the type's rows; a type's own, or every row
    g_rows, t_rows, every = evaluate.cached_quality(a), evaluate.cached_quality(a, "Q4_0"), evaluate.cached_quality(a, None)
    assert set(g_rows["format"]) == {""} and set(t_rows["format"]) == {"Q4_0"}
    assert len(every) == len(g_rows) + len(t_rows) and len(t_rows) == len(df)
    assert set(evaluate.cached_kl(a, "Q4_0")["mode"]) == {"rtn", "awq-clip"}
    assert set(evaluate.cached_search(a, "Q4_0")["mode"]) <= {"awq-grouped", "awq-clip"}
    # rows cached before the column existed are the integer grid's
    raw = a.read_extra("quality")
    a.write_extra("quality", raw[raw["format"] == ""].drop(columns=["format"]))
    back = evaluate.cached_quality(a)
    assert len(back) == len(g_rows) and set(back["format"]) == {""} and evaluate.cached_quality(a, "Q4_0") is None
    with pytest.raises(ValueError, match="mode 'gptq' does not run on llama.cpp types such as Q4_0; pick from rtn, "
                                         "awq, awq-grouped, awq-clip"):
        evaluate.run_quality(a, modes=["rtn", "gptq"], bits=[], group_size=0, format="Q4_0")
    with pytest.raises(ValueError, match="unknown llama.cpp type 'Q4_9'"):
        evaluate.run_quality(a, modes=["rtn"], bits=[], group_size=0, format="Q4_9")


def test_cli_evaluate_type(tiny_dir, tokenizer_dir, tmp_path):
    cmd = [sys.executable, "-m", "core", "evaluate", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir,
           "--modes", "fp,rtn", "--type", "Q4_0,Q8_0", "--n-samples", "2", "--seqlen", "64", "--heldout-samples", "2",
           "--sweep-bits", "4", "--group-size", str(GS), "--cache-dir", str(tmp_path), "--json", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert {(x["mode"], x["bits"], x["type"]) for x in rows} == {("fp", 16, "Q4_0"), ("rtn", 4, "Q4_0"),
                                                               ("fp", 16, "Q8_0"), ("rtn", 8, "Q8_0")}
    head = next(x for x in r.stdout.splitlines() if x.startswith("mode "))
    assert head.split()[:3] == ["mode", "bits", "type"] and "llama.cpp types Q4_0, Q8_0" in r.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert "(cache)" in again.stdout and json.loads(again.stdout.strip().splitlines()[-1]) == rows
    bad = subprocess.run([*cmd[:9], "fp,gptq", *cmd[10:]], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: mode 'gptq' does not run on "
                                                                                  "llama.cpp types"), bad.stderr


# --------------------------------------------------------------------------------------------------
# the KL report's statistics on hand-made distributions
# --------------------------------------------------------------------------------------------------
def test_token_divergence_percentile_and_perplexity_se_by_hand():
    from core.grids import metrics

    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.6, 0.3]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    kl, same, dp = metrics.token_divergence(p.log().float(), q.log().float(), y)
    # KL row 0: 0.5 ln 2 + 0.25 ln(1/2) + 0 = 0.25 ln 2; row 1: identical distributions
    torch.testing.assert_close(kl, torch.tensor([0.25 * math.log(2), 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert same.tolist() == [False, True]  # argmax 0 -> 1, then unchanged
    torch.testing.assert_close(dp, torch.tensor([0.25, 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-7)

    v = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    assert metrics.percentile(v, 0.5) == 3.0
    assert metrics.percentile(v, 0.99) == pytest.approx(4.96)  # rank 3.96: 4 + 0.96 * (5 - 4)
    assert metrics.percentile(v, 1.0) == 5.0 and metrics.percentile(v, 0.0) == 1.0
    assert math.isnan(metrics.percentile(torch.tensor([]), 0.5))

    ce = [1.0, 2.0, 3.0, 6.0]  # mean 3, population variance 3.5
    ppl, se = metrics.perplexity_with_se(sum(ce), sum(c * c for c in ce), len(ce))
    assert ppl == pytest.approx(math.exp(3.0)) and se == pytest.approx(math.exp(3.0) * math.sqrt(3.5 / 3))


# --------------------------------------------------------------------------------------------------
# score_variants: the agreed whole-model API
# --------------------------------------------------------------------------------------------------
def test_score_variants(tiny_analysis):
    a = tiny_analysis("llama")
    lm = a.lm
    before = state(lm.model)
    calls = []

    def rtn4():
        calls.append("rtn4")
        return {li.name: pseudo_quantize(lm.weight(li.name), 4, GS) for li in lm.linears}

    def one_layer():
        name = lm.linears[0].name
        return {name: pseudo_quantize(lm.weight(name), 2, GS)}

    def check_restored():  # each variant starts from the fp weights
        assert_bit_identical(lm.model, before)
        return {}

    df = evaluate.score_variants(a, {"none": lambda: {}, "rtn4": rtn4, "one": one_layer, "check": check_restored,
                                     "rtn4 again": rtn4})
    assert list(df.columns) == evaluate.SCORE_COLUMNS
    assert_bit_identical(lm.model, before)
    assert calls == ["rtn4", "rtn4"]
    val = {(r.variant, r.metric): r.value for r in df.itertuples()}
    assert set(df["variant"]) == {"fp", "none", "rtn4", "one", "check", "rtn4 again"}
    assert set(df["metric"]) == set(evaluate.CAUSAL_METRICS)
    for v in ("none", "check"):  # no replaced weights: the fp model exactly
        assert val[(v, "kl")] == 0 and val[(v, "kl_p999")] == 0 and val[(v, "same_top")] == 1
        assert val[(v, "rms_dp")] == 0 and val[(v, "perplexity")] == val[("fp", "perplexity")]
    assert val[("rtn4", "kl")] > val[("one", "kl")] > 0 or val[("one", "kl")] > 0
    assert all(val[("rtn4", m)] == val[("rtn4 again", m)] for m in evaluate.CAUSAL_METRICS)  # deterministic
    data = evaluate.eval_data(a, lm)
    assert (df["n_tokens"] == data.heldout.shape[0] * (data.heldout.shape[1] - 1)).all()

    # the same numbers as run_quality's rtn mode (the same weights, the same scoring engine)
    q = evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=GS, protocol="all-positions")
    for m in evaluate.CAUSAL_METRICS:
        assert values(q, "rtn", 4, m) == pytest.approx(val[("rtn4", m)], rel=1e-12, abs=1e-15), m

    # a token budget scores the first whole held-out blocks only
    small = evaluate.score_variants(a, {"rtn4": rtn4}, max_tokens=data.heldout.shape[1])
    assert (small["n_tokens"] == data.heldout.shape[1] - 1).all()

    # restored when a variant fails half-way (after some weights were written), and clear errors
    def broken():
        w = {li.name: torch.zeros(li.out_features, li.in_features) for li in lm.linears[:3]}
        w[lm.linears[3].name] = torch.zeros(1, 1)
        return w
    with pytest.raises(ValueError, match="has shape"):
        evaluate.score_variants(a, {"ok": rtn4, "broken": broken})
    assert_bit_identical(lm.model, before)
    with pytest.raises(ValueError, match="not a quantizable linear"):
        evaluate.score_variants(a, {"x": lambda: {"lm_head": torch.zeros(3, 3)}})
    with pytest.raises(ValueError, match="max_tokens"):
        evaluate.score_variants(a, {"x": lambda: {}}, max_tokens=0)
    assert_bit_identical(lm.model, before)


def test_score_variants_encoder(tiny_analysis):
    a = tiny_analysis("bert")
    lm = a.lm
    before = state(lm.model)
    df = evaluate.score_variants(a, {"none": lambda: {}, "rtn2": lambda: {
        li.name: pseudo_quantize(lm.weight(li.name), 2, GS) for li in lm.linears}})
    assert_bit_identical(lm.model, before)
    val = {(r.variant, r.metric): r.value for r in df.itertuples()}
    assert set(df["metric"]) == set(evaluate.ENCODER_METRICS)
    assert val[("none", "cosine")] == pytest.approx(1.0, abs=1e-12) and val[("none", "hidden_rel_error")] == 0
    assert val[("rtn2", "hidden_rel_error")] > 0


# --------------------------------------------------------------------------------------------------
# the fast grouped search (cached block inputs, one fp module output for all bit-widths) against the
# straightforward one (recapture every block through the whole model)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_fast_grouped_search_equals_straightforward(kind, tiny_analysis):
    a = tiny_analysis(kind)
    lm = a.lm
    input_of = dict(zip(a.linears["name"], a.linears["input_key"]))
    gr = grouped.build_grouping(lm, input_of)
    snap = blocks.snapshot(lm)
    calib = evaluate.eval_data(a, lm).calib
    kw = dict(bits=[2, 4], group_size=GS, n_grid=5, clip=True, batch_tokens=128, input_of=input_of)
    fast = grouped.search_grouped(lm, gr, calib, snap, **kw)
    slow = grouped.search_grouped(lm, gr, calib, snap, cache_inputs=False, **kw)
    for b in (2, 4):
        assert [s.best_alpha for s in fast.searches[b]] == [s.best_alpha for s in slow.searches[b]]
        for f, s in zip(fast.searches[b], slow.searches[b]):
            assert torch.equal(f.losses, s.losses) and torch.equal(f.scales, s.scales)
        assert fast.clips[b].keys() == slow.clips[b].keys()
        assert all(torch.equal(fast.clips[b][n], slow.clips[b][n]) for n in fast.clips[b])
    with pytest.raises(ValueError, match="in order"):
        blocks.BlockInputs(lm, calib[:1], batch_tokens=128).capture(1, linears=set(), modules=set())


def test_cache_of_an_older_version_is_replaced_not_an_error(tiny_dir, tokenizer_dir, tmp_path):
    # the cache of a previous release (every row of an older eval_version) must not break the next run: its rows are
    # dropped and the new ones written (an empty keep-mask once selected columns instead of rows: KeyError on screen)
    a = analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path)
    first = evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=GS)
    for name in ("quality", "quality_kl", "quality_search"):
        df = a.read_extra(name)
        if df is not None and "eval_version" in df:
            a.write_extra(name, df.assign(eval_version=evaluate.EVAL_VERSION - 1))
    assert evaluate.cached_quality(a) is None  # an older version is never shown
    again = evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=GS)
    cached = evaluate.cached_quality(a)
    assert cached is not None and len(cached) == len(again) == len(first)
    assert set(a.read_extra("quality")["eval_version"]) == {evaluate.EVAL_VERSION}
