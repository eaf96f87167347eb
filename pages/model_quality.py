"""Model quality: does a layer-level gain survive into the whole model? (core.evaluate)"""
import pandas as pd
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

MODES = list(evaluate.MODES)
c1, c2, c3, c4 = st.columns([4, 2, 1, 1])
modes = c1.multiselect("Modes", MODES, default=MODES, key="mq_modes", help="\n".join(f"- **{m}**: {d}" for m, d in evaluate.MODE_DEFINITIONS.items()))
bits = c2.multiselect("Bits", list(range(2, 9)), default=[3, 4], key="mq_bits")
groups = [g for g in (32, 64, 128, 256) if any(int(f) % g == 0 for f in a.linears["in_features"])] + [0]
default_g = a.settings.sweep.group_size if a.settings.sweep.group_size in groups else groups[0]
group = c3.selectbox("Group size", groups, index=groups.index(default_g), format_func=ui.group_label, key="mq_group")
zero_point = c4.toggle("Zero point", value=True, key="mq_zp")
st.caption(evaluate.grouping_note(a) + " Every mode runs the whole model over the held-out text (awq-grouped, "
           "awq-clip and const-alpha also over calibration text): all six modes at two bit-widths take a few "
           "minutes for the bundled model on a CPU.")

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

# This group size and zero point; fp (the reference, computed by every run) once per metric.
shown = results[(results["group_size"] == group) & (results["zero_point"] == zero_point)]
shown = shown[shown["mode"] != "fp"]
fp = results[results["mode"] == "fp"].drop_duplicates("metric", keep="last")
shown = pd.concat([fp, shown], ignore_index=True) if not shown.empty else shown
if shown.empty:
    st.info("No results at this group size and zero-point setting yet: press **Run**.")
    st.stop()

c1, c2 = st.container(), st.container()  # stacked, full width: no table is cut off
with c1:
    st.subheader("Model level")
    table = shown.pivot_table(index=["mode", "bits"], columns="metric", values="value", aggfunc="last")
    order = {m: i for i, m in enumerate(MODES)}
    table = table.reset_index()
    table = table.iloc[sorted(range(len(table)), key=lambda i: (-1 if table["mode"].iloc[i] == "fp"
                                                                else int(table["bits"].iloc[i]),
                                                                order.get(table["mode"].iloc[i], 99)))]
    table["bits"] = table["bits"].map(lambda b: "fp" if b == evaluate.FP_BITS else f"w{b}")
    st.dataframe(table, hide_index=True, column_config={
        m: st.column_config.NumberColumn(m, format="%.5g", help=evaluate.DEFINITIONS.get(m)) for m in table.columns
        if m in evaluate.DEFINITIONS})
    n_tok = int(shown["n_tokens"].max()) if "n_tokens" in shown else 0
    st.caption(f"Scored on {n_tok:,} held-out tokens. " + " ".join(
        f"**{m}**: {d}." for m, d in evaluate.DEFINITIONS.items() if m in set(shown["metric"])))
with c2:
    st.subheader(f"Gain vs RTN at group {ui.group_label(group)}: layer and model")
    gains = views.gain_levels(a.layers, shown, a.settings.sweep.group_size)
    if gains.empty:
        st.info("Run with the rtn mode to compare gains.")
    else:
        st.dataframe(gains, hide_index=True, column_config={
            "group_size": st.column_config.NumberColumn("group size", format="%d"),
            **{c: st.column_config.NumberColumn(c, format="%.3f") for c in gains.columns if c not in ("bits", "group_size")}})
    same = int(group) == int(a.settings.sweep.group_size)
    st.caption((f"Layer gain: median over linears of the sweep, at the same group size {ui.group_label(group)}. "
                if same else f"Layer gain: not shown — the sweep ran at group {ui.group_label(a.settings.sweep.group_size)}, "
                f"these model rows at group {ui.group_label(group)}; pick group "
                f"{ui.group_label(a.settings.sweep.group_size)} to compare the two at one group size. ")
               + "Model gain: error(rtn) / error(mode) for the model's output error metric — > 1 means the "
               "mode beats RTN on the whole model, as the layer gain says for single layers.")
ui.show_figure(figures.quality_bars(shown), "mq_bars", model_id=a.model_id)
with st.expander("All cached results"):
    st.dataframe(results, hide_index=True)
