"""Model quality: does a layer-level gain survive into the whole model? (core.evaluate)"""
import streamlit as st

import ui
from core import figures, views

a = ui.require_analysis()
st.title("Model quality")
st.caption("Whole-model fake quantization (weights replaced by Q(W·s)/s, restored afterwards), scored on the "
           "held-out text: perplexity and KL to full precision for causal LMs, cosine similarity of the "
           "embeddings and hidden-state error for encoders. Beside it, the layer-level gain of the sweep.")

try:
    from core import evaluate
except ImportError:
    st.info("Whole-model evaluation (core.evaluate) is not part of this build yet.")
    st.stop()

MODES = ["fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha"]
MODE_HELP = {"fp": "full precision (reference)", "rtn": "round-to-nearest", "awq": "alpha per linear, layer-local",
             "awq-grouped": "one scale per group of linears sharing an input, official AWQ style",
             "awq-clip": "grouped + clip search (Q/K skipped)", "const-alpha": "one alpha for the whole model"}
c1, c2, c3, c4 = st.columns([4, 2, 1, 1])
modes = c1.multiselect("Modes", MODES, default=MODES, key="mq_modes", format_func=lambda m: f"{m} — {MODE_HELP[m]}")
bits = c2.multiselect("Bits", list(range(2, 9)), default=[3, 4], key="mq_bits")
groups = [g for g in (32, 64, 128, 256) if any(int(f) % g == 0 for f in a.linears["in_features"])] + [0]
default_g = a.settings.sweep.group_size if a.settings.sweep.group_size in groups else groups[0]
group = c3.selectbox("Group size", groups, index=groups.index(default_g), format_func=ui.group_label, key="mq_group")
zero_point = c4.toggle("Zero point", value=True, key="mq_zp")
st.caption(evaluate.grouping_note(a))

if st.button("Run", type="primary", key="mq_run", disabled=not modes or not bits, icon=":material/play_arrow:"):
    with st.status("Evaluating the whole model…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        try:
            evaluate.run_quality(a, modes=list(modes), bits=sorted(int(b) for b in bits), group_size=int(group),
                                 zero_point=bool(zero_point),
                                 progress=lambda f, msg: bar.progress(min(max(float(f), 0.0), 1.0), text=msg))
        except Exception as e:  # noqa: BLE001 - shown as a sentence; the page stays usable
            status.update(label="Evaluation failed", state="error")
            st.error(ui.readable(e))
        else:
            status.update(label="Evaluation done", state="complete", expanded=False)

results = evaluate.cached_quality(a)
if results is None or results.empty:
    st.info("No whole-model results for this analysis yet: pick modes and bits and press **Run**.")
    st.stop()

shown = results[(results["group_size"] == group) | (results["mode"] == "fp")]
if "zero_point" in shown.columns:
    shown = shown[(shown["zero_point"] == zero_point) | (shown["mode"] == "fp")]
if shown.empty:
    st.info("No results at this group size yet: press **Run**.")
    st.stop()

c1, c2 = st.columns([3, 2])
with c1:
    st.subheader("Model level")
    table = shown.pivot_table(index=["mode", "bits"], columns="metric", values="value", aggfunc="last").reset_index()
    st.dataframe(table, hide_index=True)
with c2:
    st.subheader("Layer level (sweep)")
    lay = a.layers[a.layers["bits"].isin(shown["bits"].unique())]
    st.dataframe(lay.groupby("bits").agg(median_rtn_rel=("rtn_rel", "median"), median_awq_rel=("awq_rel", "median"),
                                         median_gain=("gain", "median"), median_gain_heldout=("gain_heldout", "median"))
                 .reset_index(), hide_index=True, column_config={
                     c: st.column_config.NumberColumn(format="%.4g")
                     for c in ("median_rtn_rel", "median_awq_rel", "median_gain", "median_gain_heldout")})
    st.caption(f"Sweep group size: {ui.group_label(a.settings.sweep.group_size)}.")
ui.show_figure(figures.quality_bars(shown), "mq_bars", model_id=a.model_id)
with st.expander("All cached results"):
    st.dataframe(results, hide_index=True)
