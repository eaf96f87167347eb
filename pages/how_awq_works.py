"""How AWQ works: a first-visit walk in five steps, each with a live figure of the current model."""
import streamlit as st

import ui
from core.present import common, how_awq_works

a = ui.require_analysis()
ui.mark_intro_seen()
st.title("How AWQ works")
PAPER = "https://arxiv.org/abs/2306.00978"
st.caption(f"Activation-aware Weight Quantization — Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "
           f"*AWQ: Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration*, "
           f"MLSys 2024, [arXiv:2306.00978]({PAPER}). Five steps on **{a.model_id}**: every figure below is "
           "computed from this model's own weights and calibration statistics.")

walk = how_awq_works.intro_walk(a, st.session_state.get(ui.SHARED_BITS))
n, ev = walk.numbers, walk.ev


def to_lab() -> None:
    ui.open_layer_lab(walk.name)
    st.session_state["go_lab"] = True


c1, c2 = st.columns([3, 1])
c1.markdown(f"The walk follows **{walk.name}**, the linear where AWQ helps most at w{walk.bits} "
            f"(gain {common.fmt_gain(n['gain'])} in-sample, {common.fmt_gain(n['gain_heldout'])} held-out).")
c2.button("Skip to the Layer Lab", key="intro_skip", on_click=to_lab, icon=":material/skip_next:", width="stretch")
if st.session_state.pop("go_lab", False):
    st.switch_page("pages/layer_lab.py")

st.subheader("1 · Weights are rounded to a few levels")
st.markdown(f"To store a weight in {walk.bits} bits, each group of {walk.group_size} weights of a row gets "
            f"2^{walk.bits} = {2 ** walk.bits} evenly spaced levels between its smallest and largest weight, and every "
            "weight moves to the nearest level: round-to-nearest (RTN), written Q(W). The rounding error changes "
            f"the layer's output: here by a relative error of **{common.fmt_rel(n['rtn_rel'])}** (‖ΔY‖² / ‖Y‖²).")
ui.show_figure(how_awq_works.intro_weight_group(ev), "intro_group", model_id=a.model_id)

st.subheader("2 · A few input channels carry much larger activations")
st.markdown(f"Averaged over the calibration text, the largest input channel of this layer is "
            f"**{n['outlier_ratio']:.0f}x** the median one. A weight's error is multiplied by its input, so the "
            f"errors on these channels matter most: the top 1% of channels ({n['n_salient']} of {n['in_features']}) "
            f"hold **{n['top1_share']:.0%}** of the importance mean|W_j|·mean|x_j|. These are AWQ's salient channels.")
ui.show_figure(how_awq_works.intro_outliers(a, walk.name), "intro_outliers", model_id=a.model_id)

st.subheader("3 · Scale them up before rounding: s = mean|x|^α")
st.markdown("Multiply column j of W by s_j and divide the input by the same s_j: the output is unchanged, "
            "(W·s)(x/s) = Wx. But the scaled-up salient weights now span more levels, so rounding hurts them less. "
            "AWQ takes s_j = mean|x_j|^α and searches α on a grid from 0 (no scaling: RTN) towards 1, keeping the "
            f"α with the lowest output error — here α = **{walk.alpha:.2f}**.")
ui.show_figure(how_awq_works.intro_scales(a, walk.name, sorted({0.0, 0.25, 0.5, round(walk.alpha, 2)}), walk.group_size),
               "intro_scales", model_id=a.model_id)

st.subheader("4 · Q(W·s)/s against Q(W)")
st.markdown(f"Quantizing the scaled weights and undoing the scale, Q(W·s)/s, moves rounding error from the "
            "important channels to the many unimportant ones. The layer's output error drops from "
            f"**{common.fmt_rel(n['rtn_rel'])}** (RTN) to **{common.fmt_rel(n['awq_rel'])}** (AWQ): a gain of "
            f"**{common.fmt_gain(n['gain'])}**, and **{common.fmt_gain(n['gain_heldout'])}** on held-out text "
            "the search never saw.")
ui.show_figure(how_awq_works.intro_channel_errors(ev), "intro_errors", model_id=a.model_id)

st.subheader("5 · Over the whole network")
st.markdown(f"Every one of the {n['n_linears']} linears gets its own α. The median gain is "
            f"**{common.fmt_gain(n['median_gain'])}** in-sample and **{common.fmt_gain(n['median_gain_heldout'])}** "
            f"held-out; AWQ lowers the held-out error of **{n['n_helped_heldout']} of the {n['n_linears']}** layers. The "
            "Overview has the rest; the Layer Lab lets you move α, bits, group size, duo scaling and clipping yourself.")
ui.show_figure(common.gain_heatmap(a, walk.bits, held_out=True), "intro_network", model_id=a.model_id)

st.button(f"Open the Layer Lab at {walk.name}", key="intro_to_lab", type="primary", on_click=to_lab,
          icon=":material/tune:")
