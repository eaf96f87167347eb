"""Layer Lab: one linear, live. A slider release recomputes this layer only (inside a fragment)."""
import time

import pandas as pd
import streamlit as st

import ui
from core.present import common
from core.present import layer_lab as lab  # the page's fragment below is named layer_lab
from core.grids import llamacpp, metrics
from core.grids.spec import QuantSpec
from core.analysis import Analysis
from core.studies import methods_table

a = ui.require_analysis()
st.title("Layer Lab")
st.caption("Pick a layer and drag alpha: AWQ quantizes Q(W·s)/s with s = mean|x|^alpha, so alpha 0 is plain "
           "round-to-nearest (RTN) — except with duo scaling, where s = mean|x|^alpha / w_mean^(1−alpha). "
           "Everything below is recomputed from the cached statistics and input sample of this one layer — "
           "the model never runs.")


def _snap_alpha(value: float) -> None:
    st.session_state["lab_alpha"] = float(value)


@st.cache_data(max_entries=32, show_spinner=False)
def clipped_curve(entry: str, name: str, bits: int, group_size: int, zero_point: bool, duo_scaling: bool,
                  n_grid: int, format: str | None) -> pd.DataFrame:
    """``lab.clipped_alpha_curve`` on a registered analysis, cached per setting (one clip search per alpha)."""
    return lab.clipped_alpha_curve(ui.registry().get(entry), name, bits=bits, group_size=group_size,
                                   zero_point=zero_point, duo_scaling=duo_scaling, n_grid=n_grid, format=format)


def methods_section(a: Analysis, name: str, *, spec: QuantSpec, alpha: float) -> None:
    """Every method on this layer on the Layer Lab's grid: one bar chart, one table, exportable; the methods that
    do not run on a llama.cpp type listed with their sentence."""
    from core import methods as core_methods

    labels = {k: core_methods.METHODS[k].label for k in core_methods.LAYER_METHODS}
    picked = st.multiselect("Methods", list(labels), default=list(labels), format_func=labels.get, key="lab_methods",
                            help="AWQ appears at the best alpha of its grid search and at the slider's alpha.")
    refused = methods_table.refusals(picked, spec)
    if refused:
        ui.show_table(pd.DataFrame({"method": [labels[m] for m in refused], "not run": list(refused.values())}))
    picked = [m for m in picked if m not in refused]
    if not picked:
        st.info("Pick at least one method that runs on this grid.")
        return
    t0 = time.perf_counter()
    try:
        df = a.compare_methods(name, spec, alpha=alpha, methods=picked)
    except ui.USER_ERRORS as e:
        st.error(ui.readable(e))
        return
    dt = time.perf_counter() - t0
    best = df.sort_values("rel_error_heldout").iloc[0]
    m = st.columns(3)
    m[0].metric("Best on held-out rows", str(best["label"]), help=metrics.DEFINITIONS["rel_error"])
    m[1].metric("Its held-out SQNR", common.fmt_db(float(best["sqnr_db_heldout"])))
    m[2].metric("Recomputed in", f"{dt * 1000:.0f} ms", help="All picked methods on this layer, quantization + errors.")
    grid = common.grid_label(spec, int(a.info(name)["in_features"]))
    ui.show_figure(lab.methods_bars(df, name=name, grid=grid), "lab_methods", model_id=a.model_id)
    ui.show_table(df.drop(columns=["method"]), rel_error=("rel. error, calib", "%.4g"),
                  sqnr_db=("SQNR calib (dB)", "%.2f"), rel_error_heldout=("rel. error, held-out", "%.4g"),
                  sqnr_db_heldout=("SQNR held-out (dB)", "%.2f"), weight_rel_error=("weight rel. error", "%.4g"),
                  seconds=("seconds", "%.3f"))
    st.caption("GPTQ uses X^T X over all calibration tokens (kept in the cache), or the kept sample's when the "
               "entry has none; HQQ is always asymmetric. **Rotated RTN** quantizes W·R with a random orthogonal R: "
               "deploying it needs the activations rotated at run time (X·R, or R folded into the previous layer).")
    with st.expander("What each method does"):
        for k in picked:
            st.markdown(f"- **{labels[k]}** (`{k}`): {core_methods.METHODS[k].description}")


@st.fragment
def layer_lab(a: Analysis) -> None:
    c1, c2, c3 = st.columns([3, 2, 3])
    with c1:
        name = ui.layer_picker(a, "lab_layer")
    with c2:
        llama = ui.grid_kind_picker("lab_grid_kind")
    with c3:  # a llama.cpp type fixes the bits, the block and the minimum
        fmt = ui.type_picker("lab_type") if llama else None
        bits = QuantSpec.of_type(fmt).bits if fmt else ui.bits_picker(a, "lab_bits", options=list(range(2, 9)))
    in_f = int(a.info(name)["in_features"])
    c1, c2, c3 = st.columns([3, 2, 2])
    with c1:
        if "lab_alpha" not in st.session_state:
            row = ui.sweep_row(a, name, bits)
            st.session_state["lab_alpha"] = float(row["best_alpha"]) if row is not None else 0.5
        alpha = float(st.slider("alpha", 0.0, 1.0, step=0.01, key="lab_alpha",
                                help="Exponent of the activation scale: s = mean|x|^alpha (normalised)."))
    with c2:
        if fmt:
            spec = QuantSpec.of_type(fmt)
            group = spec.group(in_f)
            st.metric("Block", f"{group} weights", help="A llama.cpp type fixes its block (32, or 256 for the "
                      "k-quants) and whether it stores a minimum; llama.cpp falls back to a block-32 type where 256 "
                      "does not divide the row.")
        else:
            group = ui.group_picker(a, name, "lab_group")
    with c3:
        grids = [5, 10, 20, 40, 80]
        if st.session_state.get("lab_grid") not in grids:
            st.session_state["lab_grid"] = a.settings.sweep.n_grid if a.settings.sweep.n_grid in grids else 20
        n_grid = int(st.select_slider("Grid size", grids, key="lab_grid",
                                      help="Alphas tried by the search: i / grid for i = 0 … grid−1 (official: 20)."))
    t1, t2, t3, t4 = st.columns(4)
    if fmt:  # what the stored type (llama.cpp's fallback on this width, if any) keeps per block
        stored = spec.stored_type(in_f)
        zero_point = stored != llamacpp.F16 and llamacpp.has_min(stored)
        t1.caption(f"{stored}: " + ("fp16, no blocks." if stored == llamacpp.F16 else
                                    f"{'a scale and a minimum' if zero_point else 'one scale'} per block of {group}."))
    else:
        zero_point = t1.toggle("Zero point", value=a.settings.sweep.zero_point, key="lab_zp",
                               help="Asymmetric quantization with a zero point; off: symmetric.")
    duo = t2.toggle("Duo scaling", value=False, key="lab_duo",
                    help="AutoAWQ's scale: mean|x|^a / w_mean^(1-a), w_mean over the layers sharing this input.")
    clip = t3.toggle("Clipping", value=False, key="lab_clip",
                     help="AWQ's clip search after scaling (per row and group).")
    clip_qk = t4.toggle("Clip Q/K too", value=False, key="lab_clip_qk", disabled=not clip,
                        help="Official AWQ never clips Q/K projections; switch on to see what it would do.")

    t0 = time.perf_counter()
    try:
        ev = a.evaluate_layer(name, alpha=alpha, bits=bits, group_size=group, zero_point=zero_point,
                              duo_scaling=duo, clip=clip, clip_qk=clip_qk, n_grid=n_grid, format=fmt)
    except ui.USER_ERRORS as e:
        st.error(ui.readable(e))
        return
    dt = time.perf_counter() - t0

    info = a.info(name)
    grid = (common.grid_label(ev.spec, in_f) if fmt else f"w{bits} · group "
            f"{ui.group_label(ev.group_size if ev.group_size < in_f else 0)}")
    st.container(key="lab_summary").caption(
        f"**{name}** · {info['family']} · {info['in_features']}→{info['out_features']} · {grid} · "
        f"{ev.bits_per_weight:g} bits per weight · alpha {alpha:.2f} · grid {n_grid} · "
        f"{'zero point' if zero_point else 'symmetric'}"
        f"{' · duo scaling' if duo else ''}{' · clip' if clip else ''}{' (Q/K too)' if clip and clip_qk else ''}")
    note = common.type_note(ev.spec, in_f)
    if note:
        st.container(key="lab_fallback").info(note, icon=":material/swap_horiz:")
    if a.source_format(name):  # GGUF source: these weights were already quantized by llama.cpp
        st.caption(f"Stored in the GGUF as {a.source_format(name)}: the weights here are that grid, dequantized.",
                   help=a.source_note)
    m = st.columns(6)
    m[0].metric("RTN rel. error", common.fmt_rel(ev.rtn_rel), help=metrics.DEFINITIONS["rel_error"])
    m[1].metric("AWQ rel. error", common.fmt_rel(ev.awq_rel),
                delta=f"{(ev.awq_rel / ev.rtn_rel - 1) * 100:+.1f}% vs RTN" if ev.rtn_rel > 0 else None,
                delta_color="inverse", help=metrics.DEFINITIONS["rel_error"])
    m[2].metric("RTN SQNR", common.fmt_db(ev.rtn_sqnr_db), help=metrics.DEFINITIONS["sqnr_db"])
    m[3].metric("AWQ SQNR", common.fmt_db(ev.awq_sqnr_db),
                delta=f"{ev.awq_sqnr_db - ev.rtn_sqnr_db:+.2f} dB", help=metrics.DEFINITIONS["sqnr_db"])
    m[4].metric("Gain (in-sample)", common.fmt_gain(ev.gain), help=metrics.DEFINITIONS["gain"])
    m[5].metric("Gain (held-out)", common.fmt_gain(ev.gain_heldout), help=metrics.DEFINITIONS["gain_heldout"])
    h = st.columns(6)
    h[0].metric("RTN rel. error, held-out", common.fmt_rel(ev.rtn_rel_heldout))
    h[1].metric("AWQ rel. error, held-out", common.fmt_rel(ev.awq_rel_heldout))
    h[2].metric("Best alpha on the grid", f"{ev.best_alpha:.2f}",
                help="Lowest error of the scale search" + (" without clipping (official AWQ chooses alpha "
                                                           "first, then clips)" if ev.clipped else "") + ".")
    with h[3]:
        st.button(f"Set alpha to {ev.best_alpha:.2f}", on_click=_snap_alpha, args=(ev.best_alpha,), key="lab_snap",
                  disabled=abs(ev.best_alpha - alpha) < 1e-9, icon=":material/my_location:",
                  help="The best alpha of the scale search" + (" (without clipping, as official AWQ chooses it)"
                                                               if ev.clipped else "") + ".")
    clip_note = ("applied" if ev.clipped else "Q/K: skipped") if clip else "off"
    h[4].metric("Clipping", clip_note, help="Q/K projections are skipped by official AWQ unless 'Clip Q/K too' is on.")
    h[5].metric("Recomputed in", f"{dt * 1000:.0f} ms", help="Time of this layer's evaluate_layer call.")

    clipped = None
    if ev.clipped:
        args = (str(a.path), name, bits, group, zero_point, duo, n_grid, fmt)
        if st.session_state.get("lab_clip_curve") == args:
            with st.spinner("Clip search at every alpha of the grid…"):
                clipped = clipped_curve(*args)
        else:
            st.button("Curve with clipping at every alpha", key="lab_clip_curve_btn", icon=":material/show_chart:",
                      on_click=lambda: st.session_state.__setitem__("lab_clip_curve", args),
                      help="The curve below is the scale search without clipping (official AWQ chooses alpha "
                           "that way, then clips). This runs the clip search at each of the grid's alphas "
                           "(seconds) and draws that curve and its best alpha too.")
    figs = lab.layer_figures(ev, clipped)
    if clipped is not None:
        best_clip = float(figs[0].meta["best_alpha"])
        st.button(f"Set alpha to {best_clip:.2f} (best with clipping)", on_click=_snap_alpha, args=(best_clip,),
                  key="lab_snap_clip", disabled=abs(best_clip - alpha) < 1e-9, icon=":material/my_location:")
    salient_only = st.session_state.get("lab_hist_salient", False)
    if salient_only:
        figs[3] = lab.weight_histogram(ev, salient_only=True)
    for row in (figs[:2], figs[2:]):
        cols = st.columns(2)
        for col, fig in zip(cols, row):
            with col:
                ui.show_figure(fig, f"lab_{fig.slug.split('_')[0]}", model_id=a.model_id)
    st.toggle("Histograms: salient input channels only", key="lab_hist_salient")

    # --- methods side by side (core.methods; methods_section above) ----------------------------------------
    st.subheader("Methods side by side")
    if st.toggle("Compare RTN, MSE-clipped RTN, AWQ, GPTQ, HQQ and rotated RTN on this layer", key="lab_methods_on",
                 help="Every method at these bits and group size; errors on calibration and held-out rows."):
        methods_section(a, name, spec=ev.spec if fmt else QuantSpec(bits, group, zero_point), alpha=alpha)


layer_lab(a)
ui.definitions(["rel_error", "sqnr_db", "gain", "gain_heldout", "importance"])
