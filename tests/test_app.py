"""The Streamlit app, headless (AppTest), and its figures.

Every page on tiny random models and on the bundled model; the Layer Lab's shown numbers against
``Analysis.evaluate_layer``; bad input ends in ``st.error`` with the cache untouched; chart specs carry
the one theme; exports (PNG/SVG/PDF/CSV, figure pack, 3D PNG, offline 3D HTML) are what they claim.
Charts come back from AppTest as unknown elements, so the tests read their Vega-Lite specs.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from app_harness import PAGES, ROOT, ensure_bundled, navigation_mode, shared_cache
from conftest import tiny_settings
from core.present import (common, compare, how_awq_works, importance_map, layer_lab, model_quality, overview, pack,
                          surface)
from core.analysis import analyze, list_cached, open_entry
from core.model.models import BUNDLED_ID

APP = str(ROOT / "app.py")
TIMEOUT = 300  # seconds per AppTest run; a first open analyzes the bundled model (tens of seconds on 2 cores)
ENTRY = "entry_path"  # ui.ENTRY_KEY
LAB_METRICS = ("RTN rel. error", "AWQ rel. error", "RTN SQNR", "AWQ SQNR", "Gain (in-sample)", "Gain (held-out)",
               "RTN rel. error, held-out", "AWQ rel. error, held-out", "Best alpha on the grid")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return shared_cache(tmp_path_factory)


@pytest.fixture(autouse=True)
def _app_env(cache, monkeypatch):
    monkeypatch.setenv("AWQ_EXPLORER_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    navigation_mode(monkeypatch)


@pytest.fixture(scope="module")
def tiny(cache, tiny_dir, tokenizer_dir):
    """Cached analyses of tiny random models: a Qwen2 (GQA), a GPT-2 (Conv1D, fused qkv), a BERT encoder."""
    return {kind: analyze(tiny_settings(tiny_dir(kind), tokenizer_dir), cache) for kind in ("qwen2", "gpt2", "bert")}


def open_app(entry=None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if entry is not None:
        at.session_state[ENTRY] = str(entry.path)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def metrics_shown(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def chart_data(at: AppTest) -> list[dict[str, pd.DataFrame]]:
    """Per chart, its datasets (Streamlit ships them beside the spec as Arrow)."""
    import pyarrow as pa

    return [{d.name: pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in c.proto.datasets}
            for c in at.get("vega_lite_chart")]


def assert_themed(at: AppTest, n_min: int = 1) -> None:
    specs = chart_specs(at)
    assert len(specs) >= n_min
    for spec in specs:  # rendered with the app's own theme, exactly as the exports
        assert spec["config"]["font"] == common.FONT
        assert spec["autosize"]["type"] == "pad"
    for c in at.get("vega_lite_chart"):
        assert c.proto.theme == ""  # theme=None: Streamlit adds nothing


def snapshot(cache: Path) -> list[tuple[str, int, int]]:
    """Every file of the cache (the first-visit marker aside: a page view writes it, no analysis does)."""
    return sorted((str(p.relative_to(cache)), p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*")
                  if p.name != ".intro_seen")


def lab_state(at: AppTest) -> dict:
    return {
        "name": at.selectbox(key="lab_layer").value, "bits": int(at.segmented_control(key="lab_bits").value),
        "alpha": float(at.slider(key="lab_alpha").value), "group_size": int(at.select_slider(key="lab_group").value),
        "n_grid": int(at.select_slider(key="lab_grid").value), "zero_point": at.toggle(key="lab_zp").value,
        "duo_scaling": at.toggle(key="lab_duo").value, "clip": at.toggle(key="lab_clip").value,
        "clip_qk": at.toggle(key="lab_clip_qk").value,
    }


def expected_lab_metrics(ev) -> dict[str, str]:
    return {
        "RTN rel. error": common.fmt_rel(ev.rtn_rel), "AWQ rel. error": common.fmt_rel(ev.awq_rel),
        "RTN SQNR": common.fmt_db(ev.rtn_sqnr_db), "AWQ SQNR": common.fmt_db(ev.awq_sqnr_db),
        "Gain (in-sample)": common.fmt_gain(ev.gain), "Gain (held-out)": common.fmt_gain(ev.gain_heldout),
        "RTN rel. error, held-out": common.fmt_rel(ev.rtn_rel_heldout),
        "AWQ rel. error, held-out": common.fmt_rel(ev.awq_rel_heldout),
        "Best alpha on the grid": f"{ev.best_alpha:.2f}",
    }


def check_lab_against_engine(at: AppTest, engine) -> object:
    """The Layer Lab's numbers are evaluate_layer's at the widgets' values; returns that LayerEval."""
    assert_clean(at)
    st_ = lab_state(at)
    ev = engine.evaluate_layer(st_.pop("name"), **st_)
    shown = metrics_shown(at)
    assert {k: shown[k] for k in LAB_METRICS} == expected_lab_metrics(ev)
    curve = lab_curve(at)
    assert np.allclose(curve["alpha"], ev.search.alphas.numpy()) and np.allclose(curve["rel_error"], ev.rel_curve.numpy())
    return ev


def lab_curve(at: AppTest, which: str = layer_lab.CURVE_PLAIN) -> pd.DataFrame:
    """The points of one curve of the Layer Lab's error-vs-alpha chart, as the browser receives them."""
    for data in chart_data(at):
        for df in data.values():
            if list(df.columns) == ["alpha", "curve", "rel_error"]:
                return df[df["curve"] == which].reset_index(drop=True)
    raise AssertionError("no error-vs-alpha chart")


def lab_spec(at: AppTest) -> dict:
    return next(sp for sp in chart_specs(at) if pack.figure_title(sp).startswith("Output error vs alpha"))


def title_words(spec: dict) -> str:
    """Title and subtitle of a spec as one line (they are wrapped into several lines to fit the chart)."""
    t = spec.get("title", {})
    parts = []
    for k in ("text", "subtitle"):
        v = t.get(k, "") if isinstance(t, dict) else (t if k == "text" else "")
        parts += v if isinstance(v, list) else [v]
    return " ".join(str(p) for p in parts)


# --- opening the app ---------------------------------------------------------------------------------

INTRO_TITLES = ("Round to nearest", "Input activations of", "s = mean|x|^α", "Q(W·s)/s vs Q(W)", "AWQ gain per layer")


def test_first_open_walks_how_awq_works_then_the_layer_lab(cache):
    """No typing: a fresh session analyzes the bundled model (or reads it from the cache) and starts the walk.

    The walk's five figures are live numbers of this model; its button opens the Layer Lab at the walk's
    layer; a later session (the walk has been shown once) opens on the Layer Lab.
    """
    import ui

    (cache / ui.INTRO_MARK).unlink(missing_ok=True)
    at = open_app()
    at.run()
    assert_clean(at)
    assert at.title[0].value == "How AWQ works"
    entries = [m for m in list_cached(cache) if m["model_id"] == BUNDLED_ID]
    assert entries, "the bundled model's analysis was not cached"
    assert at.session_state[ENTRY] == entries[0]["path"]
    engine = open_entry(entries[0]["path"])
    walk = how_awq_works.intro_walk(engine)
    steps = [h.value for h in at.subheader]
    assert [h.split(" · ")[0] for h in steps[:5]] == ["1", "2", "3", "4", "5"], steps
    assert "https://arxiv.org/abs/2306.00978" in at.caption[0].value and "MLSys 2024" in at.caption[0].value
    titles = [pack.figure_title(sp) for sp in chart_specs(at)]
    for start in INTRO_TITLES:
        assert any(t.startswith(start) for t in titles), (start, titles)
    # live: the weight group drawn is this model's weight row, and its RTN values are what pseudo_quantize gives
    pts, levels, info = how_awq_works.weight_group(walk.ev)
    group = next(df for data in chart_data(at) for df in data.values() if {"channel", "weight", "rtn"} <= set(df.columns))
    w = engine.weight(walk.name)[info["row"]].double().numpy()
    assert np.allclose(group["weight"], w[group["channel"].to_numpy()])
    assert set(np.round(group["rtn"], 6)) <= set(np.round(levels["level"], 6))
    assert len(levels) == 2 ** walk.bits
    assert_themed(at, 5)

    at.button(key="intro_to_lab").click().run()
    assert_clean(at)
    assert at.title[0].value == "Layer Lab"
    assert at.selectbox(key="lab_layer").value == walk.name
    before = check_lab_against_engine(at, engine)
    at.slider(key="lab_alpha").set_value(0.2).run()
    after = check_lab_against_engine(at, engine)
    assert after.alpha == pytest.approx(0.2)
    assert metrics_shown(at)["AWQ rel. error"] != common.fmt_rel(before.awq_rel)
    assert_themed(at, 4)

    later = open_app()  # the walk has been shown once: later visits open on the Layer Lab
    later.run()
    assert_clean(later)
    assert later.title[0].value == "Layer Lab"


def test_every_page_on_the_bundled_model(cache):
    a = ensure_bundled(cache)
    at = open_app(a)
    for page in PAGES:
        at.switch_page(page).run()
        assert_clean(at)
        if page.endswith("overview.py"):
            h = common.headline(a, common.default_bits(a))
            assert metrics_shown(at)["Linears"] == str(len(a.names)) == "210"  # SmolLM2: 30 blocks x 7
            assert any("Q4_1, blocks of 32" in c.value for c in at.caption)  # what its GGUF source means
            assert metrics_shown(at)[f"Median gain w{common.default_bits(a)}"] == common.fmt_gain(h["median_gain"])
            assert_themed(at, 4)
        elif page.endswith("importance_map.py"):
            assert at.get("vega_lite_chart"), "the heatmap twin is missing"
            for data in chart_data(at):
                for df in data.values():
                    assert len(df) <= 5000  # wide families are pre-aggregated
        elif page.endswith("clipping.py"):
            assert "AWQ + clip rel. error" in metrics_shown(at)
        elif page.endswith("model_quality.py"):
            assert at.title[0].value == "Model quality"


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "bert"])
def test_every_page_on_a_tiny_model(tiny, kind):
    at = open_app(tiny[kind])
    for page in PAGES:
        at.switch_page(page).run()
        assert_clean(at)
        if page.endswith(("overview.py", "layer_lab.py", "clipping.py")):
            assert_themed(at, 3)


# --- the Layer Lab follows the engine ----------------------------------------------------------------

def test_layer_lab_controls_recompute_exactly_what_the_engine_computes(tiny):
    a = tiny["qwen2"]
    engine = open_entry(a.path)  # a separate handle: the app's numbers must match a fresh computation
    at = open_app(a)
    at.switch_page("pages/layer_lab.py").run()
    first = check_lab_against_engine(at, engine)

    seen = {metrics_shown(at)["AWQ rel. error"]}
    for alpha in (0.0, 0.35, 0.9):
        at.slider(key="lab_alpha").set_value(alpha).run()
        ev = check_lab_against_engine(at, engine)
        assert ev.alpha == pytest.approx(alpha)
        seen.add(metrics_shown(at)["AWQ rel. error"])
    assert len(seen) >= 3, "moving alpha did not change the shown AWQ error"
    at.slider(key="lab_alpha").set_value(0.0).run()
    shown = metrics_shown(at)
    assert shown["AWQ rel. error"] == shown["RTN rel. error"]  # alpha 0 is RTN

    assert "RTN (= alpha 0)" in title_words(lab_spec(at))  # true here: no duo scaling

    at.slider(key="lab_alpha").set_value(0.5).run()
    at.segmented_control(key="lab_bits").set_value(2).run()
    check_lab_against_engine(at, engine)
    for key, value in (("lab_group", 16), ("lab_grid", 10)):
        at.select_slider(key=key).set_value(value).run()
        check_lab_against_engine(at, engine)
    at.toggle(key="lab_zp").set_value(False).run()
    check_lab_against_engine(at, engine)

    # Duo scaling: the curve is the duo-scaled search, whose alpha-0 point is not RTN, and the chart says so.
    at.toggle(key="lab_duo").set_value(True).run()
    ev = check_lab_against_engine(at, engine)
    st_ = lab_state(at)
    at0 = engine.evaluate_layer(st_["name"], **{**{k: v for k, v in st_.items() if k != "name"}, "alpha": 0.0})
    curve = lab_curve(at)
    assert curve["alpha"].iloc[0] == 0.0
    assert curve["rel_error"].iloc[0] == pytest.approx(at0.awq_rel, rel=1e-9)
    assert abs(curve["rel_error"].iloc[0] - ev.rtn_rel) > 1e-6 * ev.rtn_rel  # alpha 0 with duo scaling is not RTN
    title = title_words(lab_spec(at))
    assert "alpha 0 is not RTN" in title and "= alpha 0" not in title

    # Clipping: the chart says its curve is the unclipped search; on request it draws the clipped curve,
    # whose point at the current alpha is the shown AWQ + clip error, and "Set alpha" follows that curve.
    down = next(n for n in a.names if n.endswith("down_proj"))
    at.selectbox(key="lab_layer").set_value(down).run()
    at.toggle(key="lab_clip").set_value(True).run()
    ev = check_lab_against_engine(at, engine)
    assert ev.clipped and metrics_shown(at)["Clipping"] == "applied"
    title = title_words(lab_spec(at))
    assert "+ clip" in title and "curve without clipping" in title
    at.button(key="lab_clip_curve_btn").click().run()
    ev = check_lab_against_engine(at, engine)
    clipped = lab_curve(at, layer_lab.CURVE_CLIP)
    assert len(clipped) == 10 and "curve without clipping" not in title_words(lab_spec(at))
    here = clipped.loc[np.isclose(clipped["alpha"], ev.alpha), "rel_error"]
    assert len(here) == 1 and here.iloc[0] == pytest.approx(ev.awq_rel, rel=1e-9)
    for alpha in (0.0, 0.3):  # every point is evaluate_layer(clip=True) at that alpha
        ref = engine.evaluate_layer(ev.name, alpha=alpha, bits=ev.bits, group_size=16, zero_point=False,
                                    duo_scaling=True, clip=True, n_grid=10)
        assert clipped.loc[np.isclose(clipped["alpha"], alpha), "rel_error"].iloc[0] == pytest.approx(ref.awq_rel, rel=1e-9)
    best_clip = float(clipped["alpha"].iloc[int(np.argmin(clipped["rel_error"].to_numpy()))])
    at.button(key="lab_snap_clip").click().run()
    assert at.slider(key="lab_alpha").value == pytest.approx(best_clip)
    check_lab_against_engine(at, engine)

    q_proj = next(n for n in a.names if n.endswith("q_proj"))
    at.selectbox(key="lab_layer").set_value(q_proj).run()
    ev = check_lab_against_engine(at, engine)
    assert not ev.clipped and metrics_shown(at)["Clipping"] == "Q/K: skipped"
    at.toggle(key="lab_clip_qk").set_value(True).run()
    ev = check_lab_against_engine(at, engine)
    assert ev.clipped and metrics_shown(at)["Clipping"] == "applied"

    down = next(n for n in a.names if n.endswith("down_proj"))
    at.selectbox(key="lab_layer").set_value(down).run()
    ev = check_lab_against_engine(at, engine)
    at.button(key="lab_snap").click().run()  # "Set alpha to <best>"
    assert at.slider(key="lab_alpha").value == pytest.approx(ev.best_alpha)
    check_lab_against_engine(at, engine)
    assert first.name in a.names


# --- llama.cpp types in the Layer Lab and the Methods page (issue 19) ---------------------------------------

def type_lab_state(at: AppTest) -> dict:
    """The Layer Lab's settings on a llama.cpp type (no bits / group / zero point widgets: the type fixes them)."""
    return {"name": at.selectbox(key="lab_layer").value, "format": at.selectbox(key="lab_type").value,
            "alpha": float(at.slider(key="lab_alpha").value), "n_grid": int(at.select_slider(key="lab_grid").value),
            "duo_scaling": at.toggle(key="lab_duo").value, "clip": at.toggle(key="lab_clip").value,
            "clip_qk": at.toggle(key="lab_clip_qk").value}


def check_type_lab(at: AppTest, engine):
    assert_clean(at)
    st_ = type_lab_state(at)
    ev = engine.evaluate_layer(st_.pop("name"), **st_)
    assert {k: metrics_shown(at)[k] for k in LAB_METRICS} == expected_lab_metrics(ev)
    curve = lab_curve(at)
    assert np.allclose(curve["rel_error"], ev.rel_curve.numpy())
    return ev


def test_layer_lab_on_llamacpp_types_and_their_fallback(tiny):
    """The Layer Lab on a llama.cpp type shows evaluate_layer(format=...)'s numbers; where the type's block does
    not divide the row (Q4_K on 64 / 128 wide rows) it says which type llama.cpp stores instead, and the numbers are
    that type's; the methods that refuse llama.cpp types are listed with their sentence, the others run on it."""
    import torch

    from core.grids import quant
    from core.grids.spec import QuantSpec

    a = tiny["qwen2"]
    engine = open_entry(a.path)
    at = open_app(a)
    at.switch_page("pages/layer_lab.py").run()
    at.segmented_control(key="lab_grid_kind").set_value("llama.cpp").run()
    at.selectbox(key="lab_type").set_value("Q4_0").run()
    ev = check_type_lab(at, engine)
    assert ev.format == ev.stored_type == "Q4_0" and ev.bits_per_weight == 4.5
    assert not at.info, "Q4_0's blocks of 32 divide every width of this model"
    w = engine.weight(ev.name)
    assert torch.equal(ev.w_rtn, quant.fake_quant(w, QuantSpec.of_type("Q4_0")))  # RTN is llama.cpp's Q4_0 itself
    caption = at.get("caption")
    assert any("Q4_0 · 4.5 bits per weight" in c.value for c in caption)
    assert "Output error vs alpha, Q4_0" in title_words(lab_spec(at))
    for alpha in (0.0, 0.6):  # a slider release recomputes on the type
        at.slider(key="lab_alpha").set_value(alpha).run()
        ev = check_type_lab(at, engine)
    assert metrics_shown(at)["AWQ rel. error"] != metrics_shown(at)["RTN rel. error"]

    at.selectbox(key="lab_type").set_value("Q4_K").run()
    ev = check_type_lab(at, engine)
    assert ev.format == "Q4_K" and ev.stored_type == "Q5_0" and ev.bits_per_weight == 5.5
    assert any("stored as **Q5_0**" in i.value or "stores it as **Q5_0**" in i.value for i in at.info)
    same = engine.evaluate_layer(ev.name, alpha=ev.alpha, format="Q5_0", n_grid=ev.search.alphas.numel())
    assert same.rtn_rel == ev.rtn_rel and same.awq_rel == ev.awq_rel  # the fallback type's numbers, exactly
    assert "Q4_K → Q5_0" in title_words(lab_spec(at))

    down = next(n for n in a.names if n.endswith("down_proj"))
    at.selectbox(key="lab_layer").set_value(down).run()
    at.toggle(key="lab_clip").set_value(True).run()
    ev = check_type_lab(at, engine)
    assert ev.clipped and ev.awq_rel <= ev.rtn_rel * 1.5
    at.button(key="lab_clip_curve_btn").click().run()
    check_type_lab(at, engine)
    assert len(lab_curve(at, layer_lab.CURVE_CLIP)) == ev.search.alphas.numel()

    at.toggle(key="lab_methods_on").set_value(True).run()
    assert_clean(at)
    tables = [d.value for d in at.dataframe]
    refused = next(t for t in tables if "not run" in t.columns)
    assert "GPTQ" in set(refused["method"]) and all("llama.cpp types" in r for r in refused["not run"])
    shown = tables[-1]
    ref = engine.compare_methods(down, QuantSpec.of_type("Q4_K"), alpha=ev.alpha, methods=["rtn", "awq", "awq-clip"])
    assert sorted(shown["rel_error_heldout"].round(10)) == sorted(ref["rel_error_heldout"].round(10))


def test_methods_page_on_llamacpp_types(tiny):
    from core.studies import methods_table

    a = tiny["qwen2"]
    at = open_app(a)
    at.switch_page("pages/methods.py").run()
    assert_clean(at)
    at.segmented_control(key="methods_grid_kind").set_value("llama.cpp").run()
    at.multiselect(key="methods_types").set_value(["Q4_0", "Q4_K"]).run()
    assert_clean(at)
    fallback = [i.value for i in at.info if "Q4_K" in i.value and "fallback" in i.value]
    assert fallback and f"{len(a.names)} of {len(a.names)} linears as **Q5_0**" in fallback[0]
    at.button(key="methods_run").click().run()
    assert_clean(at)
    t = methods_table.cached_methods_table(open_entry(a.path), types=["Q4_0", "Q4_K"], compute=False)
    assert t is not None and set(t["type"]) == {"Q4_0", "Q4_K"}
    assert set(t["method"]) == {"rtn", "awq", "awq-clip"}  # the layer methods that run on llama.cpp types
    assert set(t.loc[t["type"] == "Q4_K", "stored_type"]) == {"Q5_0"}
    assert set(t.loc[t["type"] == "Q4_K", "bits_per_weight"]) == {5.5}
    fam = next(d.value for d in at.dataframe if {"family", "winner"} <= set(d.value.columns))
    assert set(fam["grid"]) == {"Q4_0", "Q4_K"} and set(fam["winner"]) <= {"rtn", "awq", "awq-clip"}
    assert any("beat RTN" in json.dumps(json.loads(c.proto.spec).get("title", "")) for c in at.get("vega_lite_chart"))
    why = next(d.value for d in at.dataframe if "why" in d.value.columns)
    assert "GPTQ" in set(why["method"]) and all("does not run on llama.cpp types" in w for w in why["why"])
    # back on the integer grid the page asks for its own table (the types' rows are not taken for it)
    at.segmented_control(key="methods_grid_kind").set_value("integer").run()
    assert_clean(at)
    assert any("Not computed yet for w3, w4" in i.value for i in at.info)


# --- Save checkpoint (issue 20) ----------------------------------------------------------------------------

def test_model_quality_saves_a_checkpoint_and_shows_the_reload(tiny):
    """'Save checkpoint' writes the compressed-tensors folder of the chosen method at the page's grid, transformers
    reloads it, and the page shows what export() returned; a method the format cannot store is one sentence and
    leaves no folder behind."""
    from core.studies import ct_export

    a = tiny["qwen2"]
    exports = Path(a.path) / "exports"
    before = set(exports.iterdir()) if exports.is_dir() else set()
    at = open_app(a)
    at.switch_page("pages/model_quality.py").run()
    assert_clean(at)
    at.selectbox(key="mq_group").set_value(32).run()
    at.selectbox(key="mq_ct_method").set_value("rtn")
    at.selectbox(key="mq_ct_bits").set_value(4)
    at.button(key="mq_ct").click().run()
    assert_clean(at)
    summary = at.session_state["mq_ct_summary"]
    folder = Path(summary["folder"])
    assert folder.parent == exports and folder.is_dir() and folder not in before
    assert ct_export.read_groups(folder) and {g["num_bits"] for g in ct_export.read_groups(folder).values()} == {4}
    assert {g["group_size"] for g in ct_export.read_groups(folder).values()} == {32}
    v = summary["verify"]
    shown = metrics_shown(at)
    assert shown["max |Δlogit|"] == f"{v['max_logit_diff']:.3g}" and shown["same top token"] == f"{v['same_top']:.2%}"
    assert v["ok"] and any(v["agreement"] in s.value and "Tolerance" in s.value for s in at.success)
    assert any(str(folder) in c.value for c in at.get("caption"))
    table = next(d.value for d in at.dataframe if "transformers" in d.value.columns)
    assert list(table["metric"]) == [r["metric"] for r in v["rows"]]
    assert np.allclose(table["transformers"], [r["runtime"] for r in v["rows"]])

    made = set(exports.iterdir())
    at.selectbox(key="mq_ct_method").set_value("hqq")
    at.button(key="mq_ct").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "HQQ" in at.error[0].value and "\n" not in at.error[0].value.strip()
    assert set(exports.iterdir()) == made  # nothing half-written


def run_plan_page(a, method: str, budget: float, before=None) -> tuple[AppTest, pd.DataFrame]:
    """The Plan page on ``a``: ``before(at)`` (other settings), then ``method`` at ``budget`` on 512 test tokens,
    'Plan and verify'; returns the app and the page's table of each linear's setting."""
    at = open_app(a)
    at.switch_page("pages/plan.py").run()
    assert_clean(at)
    if before is not None:
        before(at)
    at.selectbox(key="plan_method").set_value(method)
    at.number_input(key="plan_budget").set_value(budget)
    at.select_slider(key="plan_test").set_value(512)
    at.button(key="plan_run").click().run()
    assert_clean(at)
    return at, next(d.value for d in at.dataframe if {"name", "setting", "bits_per_weight"} <= set(d.value.columns))


def test_plan_page_saves_the_plans_checkpoint(tiny):
    """The Plan page's 'Save checkpoint' writes the plan with every linear at its planned bits (read back from the
    checkpoint's config); its 'Write GGUF' on a model from a folder is refused with one sentence."""
    from core.studies import ct_export

    a = tiny["qwen2"]
    at, planned = run_plan_page(a, "rtn", 3.75)
    assert set(planned["name"]) == set(a.names)
    at.button(key="plan_ct").click().run()
    assert_clean(at)
    summary = at.session_state["plan_ct_summary"]
    read = ct_export.read_groups(summary["folder"])
    for name, bits in zip(planned["name"], planned["bits"]):  # every linear at its planned bits, read back
        assert (read[name]["num_bits"] if name in read else 16) == int(bits)
    assert summary["verify"]["ok"]
    at.button(key="plan_gguf").click().run()
    assert not at.exception and len(at.error) == 1


def test_plan_page_plans_in_llamacpp_types(tiny):
    """Plans in llama.cpp types: each linear's type as llama.cpp writes it on its width (Q4_K -> Q5_0 on these
    64 / 128 wide rows), costed by its block layout; the page's table says so, the exports offered are the two a
    types plan has, and 'Save checkpoint' refuses llama.cpp types in one sentence, leaving nothing behind."""
    from core.grids import llamacpp

    def pick_types(at: AppTest) -> None:
        at.segmented_control(key="plan_grid_kind").set_value("llama.cpp").run()
        assert_clean(at)
        assert set(at.selectbox(key="plan_method").options) == {"awq", "rtn"}  # GPTQ does not run on llama.cpp types
        at.multiselect(key="plan_types").set_value(["Q4_0", "Q4_K", "Q8_0"]).run()
        assert any("Q4_K → Q5_0" in c.value for c in at.get("caption"))

    a = tiny["qwen2"]
    at, planned = run_plan_page(a, "rtn", 5.5, before=pick_types)
    assert set(planned["setting"]) <= {"Q4_0", "Q5_0", "Q8_0"}
    assert all(b == llamacpp.bits_per_weight(t) for t, b in zip(planned["setting"], planned["bits_per_weight"]))
    sizes = {r["name"]: int(r["in_features"]) * int(r["out_features"]) for r in a.linears.to_dict("records")}
    avg = sum(sizes[nm] * b for nm, b in zip(planned["name"], planned["bits_per_weight"])) / sum(sizes.values())
    assert len(planned) == len(a.names) and avg <= 5.5 + 1e-9  # the table's bits per weight hold the budget
    assert any("llama.cpp type each linear is written in" in m.value for m in at.markdown)
    assert set(at.multiselect(key="plan_fmts_types").options) == {"json", "llamacpp"}
    exports = Path(a.path) / "exports"
    before = set(exports.iterdir()) if exports.is_dir() else set()
    at.button(key="plan_ct").click().run()
    assert not at.exception and len(at.error) == 1 and "llama.cpp" in at.error[0].value
    assert at.error[0].value.startswith("model.layers.")  # a module name keeps its case in the sentence
    assert (set(exports.iterdir()) if exports.is_dir() else set()) == before


def test_model_quality_runs_in_a_llamacpp_type(tiny):
    from core.studies import evaluate

    a = tiny["qwen2"]
    at = open_app(a)
    at.switch_page("pages/model_quality.py").run()
    at.segmented_control(key="mq_grid_kind").set_value("llama.cpp").run()
    assert_clean(at)
    assert set(at.multiselect(key="mq_modes").options) == set(evaluate.FORMAT_MODES)
    at.selectbox(key="mq_type").set_value("Q4_K").run()
    assert any("Q5_0" in c.value for c in at.get("caption"))  # the fallback on these widths, said before running
    at.multiselect(key="mq_modes").set_value(["fp", "rtn"]).run()
    at.button(key="mq_run").click().run()
    assert_clean(at)
    cached = evaluate.cached_quality(open_entry(a.path), "Q4_K")
    assert cached is not None and set(cached["format"]) == {"Q4_K"}
    table = at.dataframe[0].value
    assert list(table.loc[table["mode"] == "rtn", "bits"]) == ["Q4_K"]
    kl = cached[(cached["mode"] == "rtn") & (cached["metric"] == "kl")]["value"]
    assert table.loc[table["mode"] == "rtn", "kl"].iloc[0] == pytest.approx(float(kl.iloc[-1]))
    labels = {v for d in chart_data(at) for df in d.values() if "bits_label" in df for v in df["bits_label"]}
    assert labels == {"Q4_K", "fp (not quantized)"}  # the charts name the type, not "w4"
    at.button(key="mq_ct").click().run()  # compressed-tensors has no llama.cpp types: one sentence
    assert not at.exception and len(at.error) == 1 and "llama.cpp" in at.error[0].value


# --- model quality (issue 4) --------------------------------------------------------------------------

def test_model_quality_page_runs_and_shows_the_cached_results(tiny):
    from core.studies import evaluate

    a = tiny["qwen2"]
    at = open_app(a)
    at.switch_page("pages/model_quality.py").run()
    assert_clean(at)
    at.multiselect(key="mq_modes").set_value(["fp", "rtn", "awq"])
    at.multiselect(key="mq_bits").set_value([4])
    at.selectbox(key="mq_group").set_value(32)
    at.button(key="mq_run").click().run()
    assert_clean(at)
    cached = evaluate.cached_quality(open_entry(a.path))
    assert cached is not None and {"fp", "rtn", "awq"} <= set(cached["mode"])
    table = at.dataframe[0].value
    ppl = cached[(cached["mode"] == "awq") & (cached["bits"] == 4) & (cached["metric"] == "perplexity")]["value"]
    assert table.loc[table["mode"] == "awq", "perplexity"].iloc[0] == pytest.approx(float(ppl.iloc[-1]))
    gains = at.dataframe[1].value  # layer-level and model-level gain side by side
    assert {"bits", "layer_gain", "layer_gain_heldout", "awq (kl)"} <= set(gains.columns)
    assert_themed(at, 1)
    at2 = open_app(a)  # reopening shows the cached results at once
    at2.switch_page("pages/model_quality.py").run()
    at2.selectbox(key="mq_group").set_value(32).run()
    assert_clean(at2)
    assert len(at2.dataframe) >= 2


# --- bad input ----------------------------------------------------------------------------------------

def _new_analysis(at: AppTest, **fields) -> AppTest:
    at.run()
    if "kind" in fields:
        at.radio(key="src_kind").set_value(fields["kind"]).run()
    for key, value in fields.items():
        if key == "kind":
            continue
        if key == "q_group":
            at.selectbox(key=key).set_value(value)
        elif key == "upload":
            at.selectbox(key="cal_source").set_value("upload").run()
            at.file_uploader(key="cal_upload").set_value(value)
        else:
            at.text_input(key=key).input(value)
    at.button(key="analyze").click().run()
    return at


@pytest.mark.parametrize("case", ["unknown hub id", "folder without weights", "missing folder", "empty upload",
                                  "run that fails"])
def test_bad_input_shows_a_readable_error_and_keeps_the_app_usable(tiny, cache, tmp_path, tiny_dir, tokenizer_dir,
                                                                   case):
    a = tiny["qwen2"]
    if case == "unknown hub id":
        fields, expect = {"kind": "hub", "src_hub": "no-such-org/no-such-model-xyz"}, "hub"
    elif case == "folder without weights":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        fields, expect = {"kind": "folder", "src_folder": str(tmp_path)}, "no .safetensors"
    elif case == "missing folder":
        fields, expect = {"kind": "folder", "src_folder": str(tmp_path / "nope")}, "does not exist"
    elif case == "empty upload":
        fields, expect = {"upload": ("empty.txt", b"  \n", "text/plain")}, "empty"
    else:  # a real model, but a group size that divides none of its widths (64, 128): the run fails
        fields = {"kind": "folder", "src_folder": tiny_dir("qwen2"), "src_tok": tokenizer_dir, "q_group": 256}
        expect = "group size 256"
    before = snapshot(cache)
    at = _new_analysis(open_app(a), **fields)
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert errors and expect in " ".join(errors).lower(), errors
    assert all("Traceback" not in e for e in errors)
    assert snapshot(cache) == before  # nothing written, nothing removed
    assert at.session_state[ENTRY] == str(a.path)  # still on the previous model
    at.switch_page("pages/layer_lab.py").run()
    assert_clean(at)
    assert "AWQ rel. error" in metrics_shown(at)


def test_sidebar_analyze_of_a_local_folder_switches_the_pages_to_it(cache, tiny, tiny_dir, tokenizer_dir):
    """The whole sidebar path: folder + tokenizer + uploaded text + settings -> Analyze -> pages show it."""
    from core.model.calibration import bundled_text

    text = bundled_text()[:40_000].encode()
    at = open_app(tiny["qwen2"])
    at.run()
    at.radio(key="src_kind").set_value("folder").run()
    at.text_input(key="src_folder").input(tiny_dir("llama"))
    at.text_input(key="src_tok").input(tokenizer_dir)
    at.selectbox(key="cal_source").set_value("upload").run()
    at.file_uploader(key="cal_upload").set_value(("notes.txt", text, "text/plain"))
    at.number_input(key="cal_n").set_value(4)
    at.number_input(key="cal_len").set_value(64)
    at.number_input(key="cal_held").set_value(2)
    at.multiselect(key="q_bits").set_value([3, 4])
    at.selectbox(key="q_group").set_value(32)
    at.button(key="analyze").click().run()
    assert_clean(at)
    path = at.session_state[ENTRY]
    a = open_entry(path)
    assert a.model_id == str(Path(tiny_dir("llama")).resolve())
    assert a.settings.calibration.n_samples == 4 and a.settings.sweep.bits == (3, 4)
    assert not a.settings.trust_remote_code
    kept = Path(a.settings.calibration.source)  # the upload is kept so the analysis can be reproduced
    assert kept.parent == cache / ".uploads" and kept.read_bytes() == text
    at.switch_page("pages/overview.py").run()
    assert_clean(at)
    assert metrics_shown(at)["Linears"] == str(len(a.names))


# --- figures and exports (no Streamlit) ---------------------------------------------------------------

def test_every_standard_figure_exports_png_svg_pdf_csv_with_the_theme(tiny):
    a = tiny["qwen2"]
    figs = pack.standard_figures(a, 3)
    assert len({f.slug for f in figs}) == len(figs)
    for f in figs:
        spec = f.spec()
        assert spec["config"]["font"] == common.FONT and spec["autosize"]["type"] == "pad"
        png = f.png()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(png[16:20], "big")
        assert width >= common.PNG_SCALE * min(spec.get("width", common.WIDTH), common.WIDTH)  # talk-ready
        assert f.svg().lstrip().startswith("<svg")
        assert f.pdf()[:5] == b"%PDF-"
        back = pd.read_csv(io.BytesIO(f.csv()))
        assert list(back.columns) == [str(c) for c in f.data.columns] and len(back) == len(f.data)


def test_figure_pack_zip_holds_every_format_and_the_3d_surfaces(tiny):
    a = tiny["bert"]
    data = pack.figure_pack(a, 4)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
        assert "README.txt" in names and "rel_error" in z.read("README.txt").decode()
        for f in pack.standard_figures(a, 4):
            assert {f"{f.slug}.{ext}" for ext in ("png", "svg", "pdf", "csv")} <= names
        assert any(n.startswith("importance_surface_") and n.endswith(".png") for n in names)


def test_figure_pack_names_each_quantity_once_and_shows_the_layer_on_screen(tiny):
    """The error-vs-alpha figure is described as the relative output error (what it plots), in the README and
    the CSV header alike, and the layer figures are of the layer picked on screen, not another one."""
    from core.grids import metrics

    a = tiny["qwen2"]
    layer = next(n for n in a.names if n != common.best_layer(a, 3))
    with zipfile.ZipFile(io.BytesIO(pack.figure_pack(a, 3, layer=layer, include_3d=False, formats=("csv",)))) as z:
        readme = z.read("README.txt").decode()
        line = next(x for x in readme.splitlines() if x.strip().startswith("rel_error_vs_alpha"))
        assert "Output error vs alpha" in line and metrics.DEFINITIONS["rel_error"] in line
        assert metrics.DEFINITIONS["loss"] not in line
        header = z.read("rel_error_vs_alpha.csv").decode().splitlines()[0].split(",")
        assert header[:3] == ["alpha", "loss", "rel_error"]  # the DEFINITIONS keys, defined in the README
        scales = pd.read_csv(io.BytesIO(z.read("scale_vector.csv")))
        assert len(scales) == int(a.info(layer)["in_features"])
        assert np.allclose(scales["scale"], a.scales_at(layer, float(a.layers[(a.layers["name"] == layer) & (
            a.layers["bits"] == 3)]["best_alpha"].iloc[0]), group_size=32).numpy(), rtol=1e-6)


def test_wide_layers_are_pre_aggregated_under_altairs_row_limit():
    rng = np.random.default_rng(0)
    mat = rng.random((24, 4864))  # Qwen2.5-0.5B's down_proj input width over its 24 blocks
    mat[:, 1234] = 50.0  # one recurring outlier channel
    df = importance_map.matrix_long(mat)
    assert len(df) <= 5000
    assert df["channel_start"].min() == 0 and df["channel_end"].max() == 4863
    assert (df.groupby("block")["value"].max() == 50.0).all()  # max-pooling keeps the outlier visible
    assert set(df.loc[df["value"] == 50.0, "max_channel"]) == {1234}


def test_3d_surface_renders_off_screen_and_is_not_blank():
    from PIL import Image

    rng = np.random.default_rng(1)
    mat = rng.random((6, 384))
    mat[:, 94] += 5
    png = surface.surface_png(mat, title="test surface", window_size=(640, 360))
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    assert img.shape == (360, 640, 3)
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_3d_view_html_is_self_contained_for_offline_use():
    import re

    import ui

    mat = np.random.default_rng(2).random((3, 64))
    pl = surface.surface_plotter(mat, title="t", window_size=(400, 300), with_bounds=False)
    try:
        html = ui._inline_panel_html(pl)
    finally:
        pl.close()
    assert "vtk" in html.lower()
    external = re.findall(r"<script[^>]+src=[\"']https?://", html)
    assert external == [], external  # every script inline: works without a network


def test_empty_upload_is_refused_before_anything_is_written(cache):
    import ui
    from core.model.calibration import CalibrationError

    class Upload:
        name = "empty.txt"

        def getvalue(self) -> bytes:
            return b"   \n\n"

    values = {"model_kind": "bundled", "text_source": "upload", "upload": Upload(), "n_samples": 4, "seqlen": 64,
              "heldout_samples": 1, "bits": [4], "group_size": 128, "zero_point": True, "dtype": "float32",
              "device": "cpu", "trust_remote_code": False}
    before = snapshot(cache)
    with pytest.raises(CalibrationError, match="empty"):
        ui._settings_from_sidebar(values)
    assert snapshot(cache) == before


# --- slide-ready, truthful figures (issue 12) ----------------------------------------------------------

INDEX_FIELDS = {"channel", "channel_start", "rank", "rank_mid"}  # axes whose values are indices


def _views_of(spec: dict):
    """Every unit/layered view of a spec (through layer, vconcat, hconcat, facet)."""
    stack = [spec]
    while stack:
        node = stack.pop()
        if "encoding" in node:
            yield node
        for key in ("layer", "vconcat", "hconcat"):
            stack += node.get(key, [])
        if isinstance(node.get("spec"), dict):
            stack.append(node["spec"])


def _title_lines(spec: dict) -> list[tuple[str, int]]:
    t = spec.get("title") or {}
    out = []
    for key, size in (("text", common.TITLE_SIZE), ("subtitle", common.SUBTITLE_SIZE)):
        v = t.get(key, "") if isinstance(t, dict) else (t if key == "text" else "")
        out += [(line, size) for line in (v if isinstance(v, list) else [v]) if line]
    return out


def assert_slide_ready(fig: common.Figure) -> None:
    """Every x / y axis has a title; index axes have integer ticks; every title line fits the chart's width."""
    spec = fig.spec()
    widths = []
    for view in _views_of(spec):
        for ch in ("x", "y"):
            enc = view["encoding"].get(ch)
            if not enc or "field" not in enc or enc.get("axis") is None and "axis" in enc:
                continue
            widths.append(view.get("width") or spec.get("width"))
            title = enc.get("title")
            if title is None and any(v is not view and "encoding" in v and v["encoding"].get(ch, {}).get("title")
                                     for v in _views_of(spec)):
                continue  # a layer that shares the axis titled by another layer
            assert title, (fig.slug, ch, enc.get("field"))
            extent = (view.get("width") if ch == "x" else view.get("height")) or spec.get("width" if ch == "x" else "height")
            if isinstance(extent, (int, float)):  # an axis title is not longer than its axis
                for line in title if isinstance(title, list) else [title]:
                    assert common.text_width(line, 14) * 0.85 <= extent + 30, (fig.slug, ch, line)
            if enc["field"] in INDEX_FIELDS and enc.get("type") == "quantitative":
                assert enc.get("axis", {}).get("format") == "d", (fig.slug, enc["field"])
    width = max([w for w in widths if isinstance(w, (int, float))] + [common.WIDTH]) if widths else common.WIDTH
    for view in [spec] + list(_views_of(spec)):
        for line, size in _title_lines(view):
            assert common.text_width(line, size) <= width + 60 + 1, (fig.slug, line)


def _every_figure(a, extra_analyses=()):
    bits = common.default_bits(a)
    figs = pack.standard_figures(a, bits)
    walk = how_awq_works.intro_walk(a)
    ev_clip = a.evaluate_layer(walk.name, alpha=0.4, bits=bits, group_size=walk.group_size, clip=True, n_grid=10)
    figs += [layer_lab.loss_curve(ev_clip), how_awq_works.intro_weight_group(walk.ev),
             how_awq_works.intro_outliers(a, walk.name),
             how_awq_works.intro_scales(a, walk.name, [0.0, 0.5], walk.group_size),
             how_awq_works.intro_channel_errors(walk.ev),
             compare.compare_family_gains([a, *extra_analyses], bits), compare.compare_hockey([a, *extra_analyses]),
             compare.compare_error_vs_bits([a, *extra_analyses])]
    return figs


def test_every_figure_has_axis_titles_integer_index_ticks_and_titles_that_fit(tiny):
    for fig in _every_figure(tiny["qwen2"], [tiny["gpt2"]]):
        assert_slide_ready(fig)
    # the helper itself catches what it should: an untitled axis and an over-long title
    bad = common.Figure("bad", alt_chart_without_titles(), pd.DataFrame())
    with pytest.raises(AssertionError):
        assert_slide_ready(bad)


def alt_chart_without_titles():
    import altair as alt

    return alt.Chart(pd.DataFrame({"channel": [1, 2], "v": [1.0, 2.0]})).mark_line().encode(
        x="channel:Q", y="v:Q").properties(title="x" * 200)


def test_talk_preset_is_a_16_9_slide_with_large_fonts(tiny):
    from PIL import Image

    a = tiny["qwen2"]
    for fig in (overview.error_vs_bits(a), overview.hockey_stick(a), common.gain_heatmap(a, 3)):
        png = fig.png(preset="talk")
        assert Image.open(io.BytesIO(png)).size == common.TALK_SIZE
        talk, std = fig.spec("talk"), fig.spec()
        assert talk["config"]["axis"]["labelFontSize"] >= 2 * std["config"]["axis"]["labelFontSize"] - 4
        assert talk["config"]["title"]["fontSize"] >= 2 * std["config"]["title"]["fontSize"]
        assert talk["datasets"] == std["datasets"]  # the same data, only sizes and fonts change
        assert fig.svg("talk").lstrip().startswith("<svg") and fig.pdf("talk")[:5] == b"%PDF-"


def test_error_vs_bits_shows_the_awq_over_rtn_ratio_on_a_linear_axis(tiny):
    a = tiny["qwen2"]
    fig = overview.error_vs_bits(a)
    spec = fig.spec()
    assert "vconcat" in spec and len(spec["vconcat"]) == 2
    ratio_view = next(v for v in _views_of(spec) if v["encoding"].get("y", {}).get("field") == "median_awq_over_rtn")
    assert ratio_view["encoding"]["y"]["scale"]["type"] == "linear"
    dash = ratio_view["encoding"]["strokeDash"]["scale"]
    assert dash["domain"] == ["calibration", "held-out"] and dash["range"][1][0] >= 5  # visible dashes
    lay = a.layers[a.layers["bits"] == 3]
    want = float((lay["awq_rel_heldout"] / lay["rtn_rel_heldout"]).median())
    got = fig.data[(fig.data["bits"] == 3) & (fig.data["split"] == "held-out")]["median_awq_over_rtn"].iloc[0]
    assert got == pytest.approx(want)


def test_hockey_stick_has_no_invented_points(tiny):
    """Each curve starts at the top channel of its layers; no flat plateau copied left of a narrow layer's data."""
    a = tiny["qwen2"]
    widths = a.linears.set_index("name")["in_features"]
    fam_width = a.linears.groupby("family")["in_features"].min()
    df = common.hockey_stick(a, by="family")
    for fam, g in df.groupby("group"):
        assert g["rank_pct"].min() >= 100.0 / fam_width[fam] - 1e-9, fam
    both = common.hockey_stick(a, by="all")  # 64- and 128-wide linears: starts where the narrow ones have data
    assert both["rank_pct"].min() >= 100.0 / widths.min() - 1e-9
    assert widths.max() > widths.min()  # the case that used to be extrapolated
    # the first point of a family is the mean of its layers' top channel (importance / layer mean): real data
    fam = "down"
    names = a.linears.loc[a.linears["family"] == fam, "name"]
    tops = []
    for n in names:
        v = np.sort(a.importance.loc[a.importance["name"] == n, "importance"].to_numpy())[::-1]
        tops.append(v[0] / v.mean())
    first = df[df["group"] == fam].sort_values("rank_pct").iloc[0]
    if first["rank_pct"] == pytest.approx(100.0 / fam_width[fam]):
        assert first["importance_norm"] == pytest.approx(np.mean(tops))


def test_compare_labels_name_the_settings_that_differ_and_preselect_the_last_two(cache, tiny_dir, tokenizer_dir, tiny,
                                                                                 monkeypatch):
    from core.model.calibration import CalibrationSpec
    from core.studies.sweep import SweepSettings

    cmp_cache = cache / "compare"
    cmp_cache.mkdir(exist_ok=True)
    d = tiny_dir("qwen2")
    x = analyze(tiny_settings(d, tokenizer_dir), cmp_cache)
    y = analyze(tiny_settings(d, tokenizer_dir, sweep=SweepSettings(bits=(3, 4), group_size=64, zero_point=False,
                                                                     n_grid=10),
                              calibration=CalibrationSpec(n_samples=3, seqlen=64, heldout_samples=2)), cmp_cache)
    lx, ly = common.compare_labels([x.manifest, y.manifest])
    assert lx != ly
    assert "zero point" in lx and "symmetric" in ly and "group 32" in lx and "group 64" in ly
    assert "4x64 tokens" in lx and "3x64 tokens" in ly
    assert x.path.name[:6] not in lx + ly  # no hash
    assert "bits" not in lx  # equal settings are not repeated
    df = compare.compare_family_table([x, y], 3)
    assert set(df["analysis"]) == {lx, ly}

    monkeypatch.setenv("AWQ_EXPLORER_CACHE", str(cmp_cache))  # the page lists this folder's analyses
    z = analyze(tiny_settings(d, tokenizer_dir, sweep=SweepSettings(bits=(3,), group_size=32, n_grid=10)), cmp_cache)
    at = open_app(x)
    at.switch_page("pages/compare.py").run()
    assert_clean(at)
    newest = [m["path"] for m in list_cached(cmp_cache)][:2]
    assert at.multiselect(key="cmp_paths").value == newest and str(z.path) in newest
    shown = {lab for data in chart_data(at) for df in data.values() if "analysis" in df.columns for lab in df["analysis"]}
    assert shown == set(common.compare_labels([open_entry(p).manifest for p in newest]))


def test_model_quality_chart_starts_at_the_data_with_readable_names_and_fp_as_a_line():
    rows = []
    for mode, bits, cos, err in (("fp", 16, 1.0, 0.0), ("rtn", 3, 0.91, 0.2), ("awq", 3, 0.95, 0.1),
                                 ("rtn", 4, 0.98, 0.05), ("awq", 4, 0.99, 0.03)):
        rows += [{"mode": mode, "bits": bits, "group_size": 128, "metric": "cosine", "value": cos},
                 {"mode": mode, "bits": bits, "group_size": 128, "metric": "hidden_rel_error", "value": err}]
    fig = model_quality.quality_bars(pd.DataFrame(rows))
    spec = fig.spec()
    layers = spec["spec"]["layer"]
    pts = next(v for v in layers if v["mark"]["type"] == "point")
    assert pts["encoding"]["y"]["scale"]["zero"] is False  # cosine 0.91..0.99 is not drawn from 0
    assert {"filter": "datum.mode != 'fp'"} in pts["transform"]  # fp is no bit-width ...
    rule = next(v for v in layers if v["mark"]["type"] == "rule")
    assert {"filter": "datum.mode == 'fp'"} in rule["transform"]  # ... but a reference line
    data = next(iter(spec["datasets"].values()))
    assert {r["metric_label"] for r in data} == {model_quality.metric_label("cosine"),
                                                 model_quality.metric_label("hidden_rel_error")}
    assert all("_" not in r["metric_label"] for r in data)
    assert {r["bits_label"] for r in data if r["mode"] != "fp"} == {"w3", "w4"}
    assert fig.png(preset="talk")[:8] == b"\x89PNG\r\n\x1a\n"


def test_shares_are_not_rounded_to_all_or_nothing():
    assert common.fmt_count_of(209, 210) == "99.5%" and common.fmt_count_of(210, 210) == "100%"
    assert common.fmt_count_of(1, 400) == "0.2%" and common.fmt_count_of(0, 5) == "0%"
    assert common.fmt_count_of(3, 4) == "75%"


def test_gain_table_puts_layer_and_model_gain_at_one_group_size(tiny):
    a = tiny["qwen2"]
    q = pd.DataFrame([{"mode": m, "bits": 3, "group_size": g, "metric": "kl", "value": v}
                      for g in (32,) for m, v in (("rtn", 0.2), ("awq", 0.1))])
    same = model_quality.gain_levels(a.layers, q, a.settings.sweep.group_size)
    assert same["group_size"].iloc[0] == 32 and np.isfinite(same["layer_gain"].iloc[0])
    other = model_quality.gain_levels(a.layers, q.assign(group_size=64), a.settings.sweep.group_size)
    assert other["group_size"].iloc[0] == 64 and np.isnan(other["layer_gain"].iloc[0])  # not from another setting
    assert other["awq (kl)"].iloc[0] == pytest.approx(2.0)


def test_3d_axes_have_integer_ticks_distinct_labels_and_refuse_log_of_signed_values():
    rng = np.random.default_rng(3)
    mat = rng.random((6, 384)) * 0.15  # the shape that gave 95.8-channel ticks and 0.1, 0.1, 0.1 heights
    ax = surface.surface_ticks(mat)
    assert all(isinstance(t, int) for t in ax.x_ticks + ax.y_ticks)
    assert ax.x_ticks[0] == 0 and ax.x_ticks[-1] >= 383 and ax.y_ticks == [0, 1, 2, 3, 4, 5]
    zl = [ax.z_format % t for t in ax.z_ticks]
    assert len(set(zl)) == len(zl) and float(zl[0]) <= mat.min() and float(zl[-1]) >= mat.max()
    axes = surface.surface_axes(mat)
    assert axes["xticker"]["labels"][-1].endswith("channel") and axes["yticker"]["labels"][-1] == "block 5"
    assert axes["xticker"]["labels"][0] == "0" and axes["yticker"]["labels"][0] == axes["zticker"]["labels"][0] == ""
    assert len(set(axes["zticker"]["labels"][1:])) == len(axes["zticker"]["labels"]) - 1
    pl = surface.surface_plotter(mat, title="t", window_size=(640, 360))
    try:
        labels = pl.renderer.cube_axes_actor.x_labels
        assert labels[:-1] == [str(t) for t in ax.x_ticks[:-1]]  # integers; the corner one left blank
        assert pl.renderer.cube_axes_actor.x_title == "input channel (index)" and pl.scalar_bars  # titles, colour bar
    finally:
        pl.close()
    signed = mat - 0.05  # like excess kurtosis: some values below zero
    with pytest.raises(ValueError, match="log scale"):
        surface.surface_geometry(signed, log=True)
    assert not common.log_applicable(signed) and common.log_applicable(mat + 1e-3)


def test_importance_map_applies_log_to_both_views_or_to_neither(tiny):
    a = tiny["qwen2"]
    at = open_app(a)
    at.switch_page("pages/importance_map.py").run()
    at.selectbox(key="map_value").set_value("kurtosis").run()
    at.toggle(key="map_log").set_value(True).run()
    assert_clean(at)
    mat, _ = importance_map.channel_matrix(a, at.segmented_control(key="map_family").value, "kurtosis")
    heat = next(sp for sp in chart_specs(at) if "channel x block" in pack.figure_title(sp))
    scale_type = heat["encoding"]["color"]["scale"]["type"]
    if common.log_applicable(mat):
        assert scale_type == "log"
    else:
        assert scale_type == "linear" and any("Log scale is off" in i.value for i in at.info)
    at.selectbox(key="map_value").set_value("mean_abs").run()  # positive: log applies to the heatmap
    heat = next(sp for sp in chart_specs(at) if "channel x block" in pack.figure_title(sp))
    assert heat["encoding"]["color"]["scale"]["type"] == "log" and "(log scale)" in heat["encoding"]["color"]["title"]
    assert heat["encoding"]["color"]["legend"]["type"] == "gradient"  # a colour bar
    gain = common.gain_heatmap(a, 3).spec()
    assert gain["layer"][0]["encoding"]["color"]["legend"]["type"] == "gradient"


def test_one_layer_and_bits_selection_shared_by_the_pages(tiny):
    a = tiny["qwen2"]
    at = open_app(a)
    at.switch_page("pages/layer_lab.py").run()
    target = a.names[3]
    at.selectbox(key="lab_layer").set_value(target).run()
    at.segmented_control(key="lab_bits").set_value(4).run()
    at.switch_page("pages/clipping.py").run()
    assert_clean(at)
    assert at.selectbox(key="clip_layer").value == target and at.segmented_control(key="clip_bits").value == 4
    other = a.names[5]
    at.selectbox(key="clip_layer").set_value(other).run()
    at.switch_page("pages/overview.py").run()
    assert at.segmented_control(key="ov_bits").value == 4
    at.switch_page("pages/layer_lab.py").run()
    assert at.selectbox(key="lab_layer").value == other
    import ui

    assert at.session_state[ui.SHARED_LAYER] == other


def test_analysis_progress_shows_the_stage_and_time_before_the_engine_reports(tiny, monkeypatch):
    """The bar shows a stage and elapsed seconds from the start, while the engine is silent (model loading)."""
    import contextlib
    import time as _time

    import streamlit as st_mod

    import ui

    texts: list[tuple[float, str]] = []
    t0 = _time.time()

    class Bar:
        def progress(self, value, text=""):
            texts.append((_time.time() - t0, text))

    class Status:
        def update(self, **kw):
            pass

    class Where:
        def status(self, *a, **k):
            return contextlib.nullcontext(Status())

        def error(self, msg):
            raise AssertionError(msg)

    def slow_analyze(settings, cache_dir, progress=None):
        _time.sleep(1.6)  # like loading a model: no progress callback for a while
        progress(0.5, "collecting statistics")
        _time.sleep(0.6)
        return tiny["qwen2"]

    monkeypatch.setattr(ui, "analyze", slow_analyze)
    monkeypatch.setattr(st_mod, "progress", lambda *a, **k: Bar())
    monkeypatch.setattr(ui, "registry", lambda: type("R", (), {"run_lock": __import__("threading").Lock(),
                                                              "put": lambda self, a: None})())
    monkeypatch.setattr(st_mod, "session_state", {})
    a = ui.run_analysis(tiny_settings("x", "y"), where=Where())
    assert a is tiny["qwen2"]
    silent = [(t, s) for t, s in texts if t < 1.5]
    assert any("loading" in s for _, s in silent), texts  # the stage is named at once
    assert any(s.endswith("· 1 s") for t, s in silent), texts  # and the time moves while the engine is silent
    assert any("collecting statistics" in s for _, s in texts)
