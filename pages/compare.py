"""Compare: two or more cached analyses side by side (family gains, hockey sticks, error vs bits)."""
import streamlit as st

import ui
from core.present import common, compare
from core.analysis import list_cached

ui.page_guard()
st.title("Compare")
st.caption("Cached analyses side by side, each named by its model and the settings that differ between them "
           "(zero point, group size, tokens, ...). Each is read from the cache: no model is loaded here.")

entries = list_cached(ui.cache_dir())
if not entries:
    st.info("Nothing cached yet: analyze a model from the sidebar first.")
    st.stop()
# Each analysis is named by the model and the settings that tell the cached analyses apart (not a hash).
labels = dict(zip((m["path"] for m in entries), common.compare_labels(entries)))
paths = list(labels)
if "cmp_paths" not in st.session_state:
    st.session_state["cmp_paths"] = paths[:2]  # the two most recent analyses (list_cached: newest first)
st.session_state["cmp_paths"] = [p for p in st.session_state["cmp_paths"] if p in paths]
picked = st.multiselect("Analyses", paths, key="cmp_paths", format_func=labels.get)
if not picked:
    st.info("Pick at least one analysis (two or more to compare).")
    st.stop()
analyses = []
for p in picked:
    try:
        analyses.append(ui.registry().get(p))
    except ui.USER_ERRORS as e:
        st.error(f"{labels[p]}: {ui.readable(e)}")
if len(analyses) < 2:
    st.info("Only one analysis picked: add another one to compare.")
if not analyses:
    st.stop()

shared_bits = sorted(set.intersection(*(set(common.bits_available(x)) for x in analyses)))
if not shared_bits:
    st.warning("These analyses share no bit-width; family gains need one in common.")
    bits = None
else:
    bits = ui.bits_picker(None, "cmp_bits", options=shared_bits)

if bits is not None:
    ui.show_table(compare.compare_headlines(analyses, bits))
c1, c2 = st.columns(2)
with c1:
    if bits is not None:
        ui.show_figure(compare.compare_family_gains(analyses, bits), "cmp_family")
with c2:
    ui.show_figure(compare.compare_hockey(analyses), "cmp_hockey")
ui.show_figure(compare.compare_error_vs_bits(analyses), "cmp_bits_err")
