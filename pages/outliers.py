"""Outliers: massive activations and super weights, which tokens and which weights, what they do, and what each
quantizer does to them (core.studies.anatomy)."""
import streamlit as st

import ui
from core.methods import LAYER_METHODS
from core.present import outliers
from core.studies import anatomy as A
from core.studies import evaluate

a = ui.require_analysis()
st.title("Outliers")
st.caption("AWQ exists because a few input channels carry activations far larger than the rest. Two papers pinned "
           "down where they come from: **massive activations** in the residual stream (Sun et al. 2024, "
           "[arXiv:2402.17762](https://arxiv.org/abs/2402.17762)) and **super weights** in an early MLP down "
           "projection (Yu et al. 2024, [arXiv:2411.07191](https://arxiv.org/abs/2411.07191)). This page finds them "
           "in the current model on its own calibration and held-out text, measures what removing them does, and what "
           "each quantizer does to them.")
if not a.manifest.get("is_causal", True):
    st.info("The outlier anatomy needs a causal language model (a decoder); this analysis is of an encoder.")
    st.stop()


def progress_bar(label: str):
    """A progress bar and the callback that moves it."""
    bar = st.progress(0.0, text=label)
    return bar, lambda f, msg: bar.progress(min(max(float(f), 0.0), 1.0), text=msg)


def compute(label: str, fn) -> object | None:
    """Run ``fn(progress)`` under a status box; one sentence on failure (the page stays up)."""
    with st.status(label, expanded=True) as status:
        _, report = progress_bar("starting")
        try:
            out = fn(report)
        except ui.USER_ERRORS as e:
            status.update(label=f"{label}: failed", state="error")
            st.error(ui.readable(e))
            return None
        status.update(label=f"{label}: done", state="complete", expanded=False)
    return out


an = A.cached_anatomy(a)
s0 = an.settings if an is not None else A.AnatomySettings()
with st.expander("Thresholds", expanded=an is None):
    c1, c2, c3 = st.columns(3)
    factor = c1.number_input("Massive: x the layer's median |h|", min_value=1.0, value=float(s0.massive_factor),
                             step=100.0, key="out_factor", help="Sun et al.: about 1,000.")
    floor = c1.number_input("Massive: and |h| above", min_value=0.0, value=float(s0.massive_floor), step=10.0,
                            key="out_floor", help="Sun et al.: 100.")
    relative = c2.toggle("Spike threshold relative to the median layer", value=bool(s0.spike_relative),
                         key="out_relative", help="On: a spike is spike x the median over layers of the largest "
                                                  "down-projection input (output). Off: an absolute |x| (Yu et al.: 50 "
                                                  "on Llama-7B).")
    spike = c2.number_input("Spike threshold", min_value=0.0, value=float(s0.spike), step=10.0, key="out_spike")
    iters = c3.number_input("Zero-and-repeat passes at most", min_value=1, max_value=50, value=int(s0.max_iterations),
                            key="out_iters")
    prompt = c3.text_input("Super-weight prompt", value=s0.prompt, key="out_prompt",
                           help="Yu et al. find super weights with one forward pass on this prompt.")
try:
    settings = A.AnatomySettings(massive_factor=float(factor), massive_floor=float(floor), spike=float(spike),
                                 spike_relative=bool(relative), max_iterations=int(iters), prompt=prompt,
                                 bits=s0.bits)
except ValueError as e:
    st.error(ui.readable(e))
    st.stop()
held = a.settings.calibration.heldout_samples * a.settings.calibration.seqlen
label = "Run the anatomy" if an is None else "Run again with these thresholds"
if st.button(label, type="primary", key="out_run", icon=":material/play_arrow:",
             disabled=an is not None and an.settings == settings,
             help=f"One pass over the calibration and held-out blocks, the super-weight search on the prompt, "
                  f"{held:,} held-out tokens scored per intervention, every method on each super weight's layer "
                  "(about 2-5 minutes for the bundled model on two CPU cores)."):
    new = compute("Outlier anatomy", lambda p: A.run_anatomy(a, settings, progress=p))
    if new is not None:
        an = new
if an is None:
    st.info("No anatomy of this model yet: press **Run the anatomy**.")
    st.stop()
if an.settings != settings:
    st.caption("Shown: the cached run with its own thresholds (press the button to use the ones above).")

# --- headline ------------------------------------------------------------------------------------------------
lay = an.layers
iv = outliers.interventions_view(an)
sw = outliers.super_table(an)
m = st.columns(4)
first = an.first_massive_layer
m[0].metric("Massive activations appear at layer", "none" if first is None else str(first))
m[1].metric("Massive dimensions", ", ".join(map(str, outliers.massive_dims(an))) or "none")
m[2].metric("Largest |h| / median", f"{lay['ratio'].max():,.0f}x", help=A.DEFINITIONS["residual"])
m[3].metric("Super weights", str(len(sw)) if len(sw) else "none", help=A.DEFINITIONS["super_weight"])

# --- massive activations ---------------------------------------------------------------------------------------
st.subheader("Massive activations")
st.caption(f"Rule: {an.settings.massive_rule}. " + outliers.token_summary(an))
ui.show_figure(outliers.residual_magnitude(an), "out_magnitude", model_id=a.model_id)
layers = [int(x) for x in lay["layer"]]
pick = st.select_slider("Layer of the token x dimension view", layers, value=first if first is not None else
                        int(lay.loc[lay["ratio"].idxmax(), "layer"]), key="out_layer")
ui.show_figure(outliers.token_dim_heatmap(an, int(pick)), "out_grid", model_id=a.model_id)
c1, c2 = st.columns([2, 3])
with c1:
    tokens = outliers.massive_tokens(an, int(pick))
    st.markdown(f"**Tokens carrying a massive activation at layer {int(pick)}**")
    if tokens.empty:
        st.caption("None at this layer.")
    else:
        st.dataframe(tokens[["label", "dims", "value"]], hide_index=True, height=260, column_config={
            "label": st.column_config.TextColumn("token (block · position · text)"),
            "value": st.column_config.NumberColumn("largest value", format="%.5g")})
with c2:
    st.markdown("**Massive dimensions**")
    st.dataframe(outliers.dims_view(an), hide_index=True, column_config={
        "max_abs": st.column_config.NumberColumn("max |h|", format="%.5g"),
        "share_at_position_0": st.column_config.NumberColumn("share at position 0", format="%.2f")})

# --- super weights ---------------------------------------------------------------------------------------------
st.subheader("Super weights")
st.markdown(outliers.super_statement(an))
ui.show_figure(outliers.spike_chart(an), "out_spikes", model_id=a.model_id)
if len(sw):
    st.dataframe(sw, hide_index=True, column_config={
        "value": st.column_config.NumberColumn("value", format="%.5g"),
        "times_median": st.column_config.NumberColumn("x median |w|", format="%.1f"),
        "perplexity_zeroed": st.column_config.NumberColumn("perplexity, zeroed", format="%.5g"),
        "kl_zeroed": st.column_config.NumberColumn("KL, zeroed", format="%.4g"),
        "input_value": st.column_config.NumberColumn("input on the spike token", format="%.5g"),
        "output_value": st.column_config.NumberColumn("largest |output|", format="%.5g")})

# --- interventions ---------------------------------------------------------------------------------------------
st.subheader("Interventions")
st.caption("Each scored against the fp model on the held-out blocks (Model quality's report, every position of each "
           "block scored: protocol all-positions, also in the tables below). The massive "
           "activations are changed where they appear (a forward hook on that block's output: the entries above the "
           "threshold in the massive dimensions), as Sun et al. do; the model is restored bit for bit afterwards.")
if len(iv) > 1:
    ui.show_figure(outliers.interventions_chart(an), "out_interventions", model_id=a.model_id)
st.dataframe(iv, hide_index=True, column_config={
    k: st.column_config.NumberColumn(k, format="%.5g", help=evaluate.DEFINITIONS.get(k)) for k in outliers.QUALITY})

# --- each quantizer ---------------------------------------------------------------------------------------------
st.subheader("What each quantizer does to them")
bits = ui.bits_picker(a, "out_bits", options=list(an.settings.bits))
if len(sw):
    st.markdown("**The super weight under each method** (its layer quantized by the method's one-layer half; the super "
                "activation is that layer's output on the spike token of the prompt)")
    st.dataframe(outliers.treatment_view(an, bits), hide_index=True, column_config={
        c: st.column_config.NumberColumn(c, format="%.4g") for c in
        ("value_fp", "value_q", "value_error", "group_rel_error", "row_rel_error", "col_rel_error",
         "super_activation_fp", "super_activation_q", "super_activation_ratio", "spike_token_rel_error",
         "spike_token_error_vs_rtn", "spike_error_share_col")})

readers = A.cached_consumers(a, an)
reading = A.reading_blocks(an)
if reading:
    st.markdown("**The linears that read the massive tokens** (q/k/v and gate/up of the blocks after the massive "
                "activations appear, through their norm)")
    if readers is None:
        n_blocks = st.number_input("Blocks to measure (spread from the first to the last reading one)", 1, len(reading),
                                   min(3, len(reading)), key="out_nblocks")
        if st.button("Measure every method on them", key="out_readers", icon=":material/play_arrow:",
                     help="Every method with a one-layer half at each width on q/k/v/gate/up of these blocks "
                          "(minutes on a CPU)."):
            readers = compute("Massive-token readers", lambda p: A.consumer_errors(a, an, n_blocks=int(n_blocks),
                                                                                    progress=p))
    if readers is not None:
        ui.show_figure(outliers.consumer_chart(readers, bits), "out_readers_chart", model_id=a.model_id)
        summary = outliers.consumer_summary(readers, ("bits", "family", "method"))
        st.dataframe(summary[summary["bits"] == bits], hide_index=True, column_config={
            c: st.column_config.NumberColumn(c, format="%.4g") for c in summary.columns if c.startswith(("median",
                                                                                                         "massive",
                                                                                                         "heldout"))})
        measured = ", ".join(map(str, sorted(set(readers["block"]))))
        st.caption(f"Blocks measured: {measured} of {reading[0]}–{reading[-1]}. "
                   f"{A.DEFINITIONS['rel_error_massive']}; {A.DEFINITIONS['rel_error_heldout']}.")

keep = A.cached_keep_table(a, an) if len(sw) else None
method = st.selectbox("Why does this method do what it does here?", list(LAYER_METHODS),
                      index=list(LAYER_METHODS).index("hqq") if "hqq" in LAYER_METHODS else 0, key="out_method")
attr = A.cached_attribution(a, an, method, bits) if method != "rtn" else None
if method != "rtn" and attr is None:
    if st.button(f"Where does {method}'s damage come from at w{bits}?", key="out_attr", icon=":material/play_arrow:",
                 help=f"The model with RTN everywhere except one group of linears quantized by {method}, one group "
                      "at a time (quantizes every linear with both, then "
                      f"{2 + len(A.attribution_groups(a, an))} held-out scorings; minutes)."):
        attr = compute("Attribution", lambda p: A.attribution(a, an, method, bits, progress=p))
story = outliers.method_story(an, method, bits, keep=keep, attr=attr, consumers=readers)
if story:
    st.markdown("\n".join(f"- {line}" for line in story))
if attr is not None:
    ui.show_figure(outliers.attribution_chart(attr), "out_attr_chart", model_id=a.model_id)

# --- keep super weights in fp16 ---------------------------------------------------------------------------------
st.subheader("Keep the super weights in fp16")
if not len(sw):
    st.info("No super weight was found with these thresholds, so there is nothing to keep.")
else:
    st.caption("Every method's whole-model run (Model quality) with the super weights quantized like every other "
               "weight and written back unquantized in fp16 after quantization (in the method's own scaled "
               "coordinates), at the analysis' group size.")
    if keep is None:
        if st.button("Run every method with and without them", key="out_keep", icon=":material/play_arrow:",
                     help="Every method with a whole-model half at each width, each variant built once and scored "
                          "with the super weights quantized and kept (the plain rows also land in Model quality); "
                          "tens of minutes on a CPU for the bundled model."):
            keep = compute("Keep super weights", lambda p: A.keep_table(a, an, progress=p))
    if keep is not None:
        ui.show_figure(outliers.keep_chart(keep), "out_keep_chart", model_id=a.model_id)
        st.dataframe(outliers.keep_view(keep), hide_index=True, column_config={
            c: st.column_config.NumberColumn(c, format="%.5g") for c in
            ("perplexity", "perplexity_kept", "kl", "kl_kept", "same_top", "same_top_kept")})

with st.expander("Definitions"):
    for k, text in {**A.DEFINITIONS, **{k: evaluate.DEFINITIONS[k] for k in outliers.QUALITY}}.items():
        st.markdown(f"- **{k}**: {text}")
    secs = an.meta.get("seconds", {})
    st.caption("This run: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in secs.items()) + ".")
