"""Clipping: AWQ's weight-clip search on one layer, the Q/K skip list, and what clipping Q/K would do."""
import streamlit as st

import ui
from core.methods import awq_search as awq
from core.present import clipping, common


@st.cache_data(max_entries=64, show_spinner="Running the clip search…")
def clip_study(entry: str, name: str, bits: int, group_size: int, alpha: float) -> clipping.ClipStudy:
    """``clipping.clip_study`` on a registered analysis, cached per setting (toggles on the page do not redo it)."""
    return clipping.clip_study(ui.registry().get(entry), name, bits=bits, group_size=group_size, alpha=alpha)


a = ui.require_analysis()
st.title("Clipping")
st.caption("After scaling, AWQ searches a clip value per output row and input group: shrinking the range "
           "loses the largest weights but refines every other level. Q/K projections are skipped by default "
           "because their outputs meet again in QKᵀ, where a local gain can become a global loss.")

bits0 = common.default_bits(a)
c1, c2, c3 = st.columns([5, 3, 3])
with c1:
    name = ui.layer_picker(a, "clip_layer", common.best_layer(a, bits0))
with c2:
    bits = ui.bits_picker(a, "clip_bits")
with c3:
    group = ui.group_picker(a, name, "clip_group")
row = ui.sweep_row(a, name, bits)
alpha = float(row["best_alpha"]) if row is not None else 0.5
c1, c2 = st.columns([3, 2])
with c1:
    alpha = st.slider("alpha of the scales applied before clipping", 0.0, 1.0, alpha, 0.05, key=f"clip_alpha_{name}_{bits}")
with c2:
    clip_qk = st.toggle("Clip Q/K too", key="clip_qk",
                        help="Override the skip list for this layer to see what clipping a Q/K projection does.")

skipped = awq.is_clip_skipped(name)
try:
    plain = a.evaluate_layer(name, alpha=alpha, bits=bits, group_size=group, clip=False)
    clipped = a.evaluate_layer(name, alpha=alpha, bits=bits, group_size=group, clip=True, clip_qk=clip_qk)
    study = clip_study(str(a.path), name, bits, group, float(alpha))
except ui.USER_ERRORS as e:
    st.error(ui.readable(e))
    st.stop()

m = st.columns(4)
m[0].metric("RTN rel. error", common.fmt_rel(plain.rtn_rel))
m[1].metric("AWQ rel. error (no clip)", common.fmt_rel(plain.awq_rel))
m[2].metric("AWQ + clip rel. error", common.fmt_rel(clipped.awq_rel),
            delta=f"{(clipped.awq_rel / plain.awq_rel - 1) * 100:+.1f}% vs no clip" if plain.awq_rel > 0 else None,
            delta_color="inverse")
m[3].metric("AWQ + clip, held-out", common.fmt_rel(clipped.awq_rel_heldout),
            delta=f"{(clipped.awq_rel_heldout / plain.awq_rel_heldout - 1) * 100:+.1f}% vs no clip"
            if plain.awq_rel_heldout > 0 else None, delta_color="inverse")
if skipped and not clip_qk:
    st.info(f"{name} matches the Q/K skip list, so AWQ leaves it unclipped (the two errors are equal). "
            "Switch on **Clip Q/K too** to see what clipping it would do to this layer's own output.")
elif skipped:
    st.warning("Clipping a Q/K projection: the layer's own output error is shown, not the attention scores QKᵀ "
               "where the Q and K errors multiply.")

c1, c2 = st.columns(2)
with c1:
    ui.show_figure(clipping.clip_curve(study), "clip_curve", model_id=a.model_id)
with c2:
    ui.show_figure(clipping.clip_choices(study), "clip_choice", model_id=a.model_id)
ui.show_figure(clipping.clip_per_group(study), "clip_groups", model_id=a.model_id)

st.subheader("Skip list")
skip = clipping.clip_skip_table(a.linears)
st.caption(f"Patterns {', '.join(repr(p) for p in awq.CLIP_SKIP_PATTERNS)}: "
           f"{int((~skip['clipped_by_default']).sum())} of {len(skip)} linears are not clipped by default.")
st.dataframe(skip, hide_index=True, height=240)

if st.button("What would clipping do to every Q/K projection?", key="clip_all_qk"):
    bar = st.progress(0.0)
    table = clipping.qk_clip_effect(a, bits, progress=lambda f, msg: bar.progress(f, text=msg))
    st.dataframe(table, hide_index=True, column_config={
        c: st.column_config.NumberColumn(c, format="%.4g") for c in table.columns if c not in ("name", "alpha")})
