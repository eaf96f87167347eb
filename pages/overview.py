"""Overview: headline numbers, the module-family table, where AWQ helps, error vs bits, the hockey stick."""
import streamlit as st

import ui
from core.present import common, overview
from core.grids import metrics

a = ui.require_analysis()
st.title("Overview")
st.caption(f"{a.model_id} — every quantizable linear, RTN vs AWQ at the best alpha of the sweep "
           f"(group {ui.group_label(a.settings.sweep.group_size)}).")
if a.source_note:  # a GGUF source: say what its stored format means for every number below
    st.caption(f"Source: {', '.join(f'{k} ({n} linears)' for k, n in a.source_formats.items())}. {a.source_note}")

bits = ui.bits_picker(a, "ov_bits")
h = common.headline(a, bits)
m = st.columns(6)
m[0].metric("Linears", f"{h['n_linears']}", help=f"in {h['n_blocks']} blocks, {h['n_params'] / 1e6:.1f} M weights")
m[1].metric("Calibration tokens", f"{h['n_tokens']:,}")
m[2].metric(f"Median gain w{bits}", common.fmt_gain(h["median_gain"]), help=metrics.DEFINITIONS["gain"])
m[3].metric("Median gain, held-out", common.fmt_gain(h["median_gain_heldout"]),
            help=metrics.DEFINITIONS["gain_heldout"])
m[4].metric("Layers AWQ helps", common.fmt_count_of(h["n_helped_heldout"], h["n_linears"]),
            help=f"{h['n_helped_heldout']} of {h['n_linears']} linears have a held-out gain > 1")
m[5].metric("Top outlier channel", f"#{h['max_outlier_channel']}",
            help=f"mean|x| max/median = {h['max_outlier_ratio']:.1f}x at the input of {h['max_outlier_input']}")

st.subheader("Module families")
ui.show_table(common.family_table(a.layers, bits))

c1, c2 = st.columns(2)
with c1:
    held_out = st.toggle("Gain scored on held-out tokens", key="ov_heldout")
    ui.show_figure(common.gain_heatmap(a, bits, held_out), "ov_heatmap", model_id=a.model_id)
with c2:
    st.write("")
    st.write("")
    ui.show_figure(overview.family_gains(a, bits), "ov_family", model_id=a.model_id)
c1, c2 = st.columns(2)
with c1:
    ui.show_figure(overview.error_vs_bits(a), "ov_bits_err", model_id=a.model_id)
with c2:
    ui.show_figure(overview.hockey_stick(a), "ov_hockey", model_id=a.model_id)
ui.definitions(["rel_error", "gain", "gain_heldout", "importance", "top1_share", "kurtosis"])
