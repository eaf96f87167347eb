"""Compare: two or more cached analyses side by side (family gains, hockey sticks, error vs bits)."""
import streamlit as st

import ui
from core import figures, views
from core.analysis import list_cached

ui.page_guard()
st.title("Compare")
st.caption("Cached analyses side by side. Each is read from the cache: no model is loaded here.")

entries = list_cached(ui.cache_dir())
if not entries:
    st.info("Nothing cached yet: analyze a model from the sidebar first.")
    st.stop()
labels = {m["path"]: ui.entry_label(m) for m in entries}
paths = list(labels)
if "cmp_paths" not in st.session_state:
    cur = st.session_state.get(ui.ENTRY_KEY)
    first = [cur] if cur in paths else []
    seen = {labels[p].split(" · ")[0] for p in first}
    for p in paths:  # prefer distinct models for the default selection
        if len(first) >= 3:
            break
        if p not in first and labels[p].split(" · ")[0] not in seen:
            first.append(p)
            seen.add(labels[p].split(" · ")[0])
    st.session_state["cmp_paths"] = first or paths[:2]
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

common = sorted(set.intersection(*(set(views.bits_available(x)) for x in analyses)))
if not common:
    st.warning("These analyses share no bit-width; family gains need one in common.")
    bits = None
else:
    if st.session_state.get("cmp_bits") not in common:
        st.session_state["cmp_bits"] = 3 if 3 in common else common[0]
    bits = st.segmented_control("Bits", common, key="cmp_bits", format_func=lambda b: f"w{b}", required=True)

if bits is not None:
    ui.show_table(views.compare_headlines(analyses, bits))
c1, c2 = st.columns(2)
with c1:
    if bits is not None:
        ui.show_figure(figures.compare_family_gains(analyses, bits), "cmp_family")
with c2:
    ui.show_figure(figures.compare_hockey(analyses), "cmp_hockey")
ui.show_figure(figures.compare_error_vs_bits(analyses), "cmp_bits_err")
