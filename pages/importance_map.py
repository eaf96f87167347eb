"""Importance map: the channel x block surface of one module family, in 3D and as an exportable heatmap."""
import streamlit as st

import ui
from core.present import common, importance_map, surface
from core.grids import metrics

a = ui.require_analysis()
st.title("Importance map")
st.caption("Each row of the surface is one block's linear of the chosen family; each column one input channel. "
           "Ridges that run across blocks are outlier channels that recur through the network.")

fams = common.families_present(a.linears)
c1, c2, c3 = st.columns([3, 2, 1])
with c1:
    if st.session_state.get("map_family") not in fams:
        st.session_state["map_family"] = importance_map.most_recurrent_family(a)
    family = st.segmented_control("Module family", fams, key="map_family", required=True)
with c2:
    value = st.selectbox("Value", list(importance_map.CHANNEL_VALUES), format_func=importance_map.CHANNEL_VALUES.get,
                         key="map_value")
with c3:
    log = st.toggle("Log scale", key="map_log")

heat = importance_map.importance_heatmap(a, family, value, log)
mat = heat.meta["matrix"]
use_log = bool(heat.meta["log"])  # the 3D view and the heatmap use the same scale
label = importance_map.CHANNEL_VALUES[value].split(" (")[0]
if log and not use_log:
    st.info(f"Log scale is off for {label}: it needs values above zero, and these include zero or negative "
            "values (excess kurtosis is negative for light-tailed channels). Both views show a linear scale.")
title = f"{a.model_id.split('/')[-1]}: {label}, family {family}"

if mat.shape[0] > 1:
    st.markdown(f"**{title}** — 3D: x input channel, y block, height and colour {surface.value_axis_title(label, use_log)}")
    ui.show_surface(mat, title=title, value_name=label, log=use_log, key="map_3d",
                    cache_key=f"{a.path}|{family}|{value}|{use_log}")
    st.download_button("3D view as PNG", data=lambda: surface.surface_png(mat, title=title, value_name=label, log=use_log),
                       file_name=f"{common.slugify_model(a.model_id)}_surface_{family}_{value}.png", mime="image/png",
                       on_click="ignore", key="map_3d_png", icon=":material/download:",
                       help="Rendered off-screen at 1920 x 1080, with axis titles and a colour bar.")
else:
    st.info("This model has a single block: the surface would be one line, so only the heatmap is shown.")

ui.show_figure(heat, "map_heat", model_id=a.model_id)
st.subheader("Channels that stand out across blocks")
ui.show_table(importance_map.top_channels(mat), sum_over_blocks=(f"{label}, summed over blocks", "%.4g"),
              blocks_in_top1pct=("blocks where it is in the top 1%", None))
ui.definitions([value] if value in metrics.DEFINITIONS else ["importance"])
