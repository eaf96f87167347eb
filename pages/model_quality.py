"""Model quality: does a layer-level gain survive into the whole model? (core.evaluate)"""
import pandas as pd
import streamlit as st

import ui
from core.grids import llamacpp
from core.grids.spec import QuantSpec
from core.model import score
from core.present import common, model_quality
from core.studies import ct_export

a = ui.require_analysis()
st.title("Model quality")
st.caption("Whole-model fake quantization (weights replaced by Q(W·s)/s, restored afterwards), scored on the "
           "held-out text: for causal LMs llama.cpp's KL report (perplexity, mean KL to full precision, same top "
           "token and RMS Δp, each ± as llama.cpp computes it, and the 99th / 99.9th KL percentiles), by default "
           "with llama.cpp's own protocol so the numbers compare with `llama-perplexity --kl-divergence`; for "
           "encoders cosine similarity of the embeddings and hidden-state error. Beside it, the layer-level gain "
           "of the sweep.")

try:
    from core.studies import evaluate
except ImportError:
    st.info("Whole-model evaluation (core.evaluate) is not part of this build yet.")
    st.stop()

k1, k2 = st.columns([2, 3])
with k1:
    llama = ui.grid_kind_picker("mq_grid_kind")
with k2:  # a llama.cpp type fixes bits, block and minimum; the modes that run on it
    fmt = ui.type_picker("mq_type") if llama else None
MODES = list(evaluate.FORMAT_MODES if fmt else evaluate.MODES)
if fmt and "mq_modes" in st.session_state:  # picks made on the integer grid that do not run on llama.cpp types
    st.session_state["mq_modes"] = [m for m in st.session_state["mq_modes"] if m in MODES]
c1, c2, c3, c4 = st.columns([4, 2, 1, 1])
modes = c1.multiselect("Modes", MODES, default=[m for m in evaluate.DEFAULT_MODES if m in MODES], key="mq_modes",
                       help="\n".join(f"- **{m}**: {d}" for m, d in evaluate.MODE_DEFINITIONS.items() if m in MODES))
if fmt:
    spec = QuantSpec.of_type(fmt)
    bits, group, zero_point = [spec.bits], spec.group_size, spec.zero_point
    widths = {n: int(w) for n, w in zip(a.linears["name"], a.linears["in_features"])}
    c2.caption(common.type_fallbacks(spec, widths) or f"{fmt} fits every linear of this model "
               f"({llamacpp.bits_per_weight(fmt):g} bits per weight).")
else:
    bits = c2.multiselect("Bits", list(range(2, 9)), default=[3, 4], key="mq_bits")
    groups = [g for g in (32, 64, 128, 256) if any(int(f) % g == 0 for f in a.linears["in_features"])] + [0]
    default_g = a.settings.sweep.group_size if a.settings.sweep.group_size in groups else groups[0]
    group = c3.selectbox("Group size", groups, index=groups.index(default_g), format_func=ui.group_label,
                         key="mq_group")
    zero_point = c4.toggle("Zero point", value=True, key="mq_zp")
protocol = st.radio("Scoring", score.PROTOCOLS, horizontal=True, key="mq_protocol",
                    help="\n".join(f"- **{k}**: {v}" for k, v in score.PROTOCOL_DEFINITIONS.items()))
cal = a.settings.calibration
max_calib = cal.n_samples * cal.seqlen
b1, b2 = st.columns(2)
search_tokens = b1.number_input(
    "Search tokens (awq-grouped, awq-clip)", min_value=cal.seqlen, max_value=max_calib, step=cal.seqlen,
    value=min(max_calib, max(cal.seqlen, evaluate.SEARCH_TOKENS)), key="mq_search_tokens",
    help="Calibration tokens (whole blocks of the analysis) the grouped scale and clip searches run each "
         "scoring module on, once per alpha: the official search on these tokens.")
ca_tokens = b2.number_input(
    "Const-alpha tokens", min_value=cal.seqlen, max_value=max_calib, step=cal.seqlen,
    value=min(max_calib, max(cal.seqlen, evaluate.CONST_ALPHA_TOKENS)), key="mq_ca_tokens",
    help="Calibration tokens the const-alpha search runs the whole model on, once per alpha of the grid.")
units = evaluate.estimate_units(a, list(modes), [int(b) for b in bits], search_tokens=int(search_tokens),
                                const_alpha_tokens=int(ca_tokens)) if modes and bits else 0.0
held = cal.heldout_samples * cal.seqlen
prior = evaluate.cached_quality(a, None)
fp_secs = prior[prior["mode"] == "fp"]["seconds"] if prior is not None else None
eta = (f" — about {units * float(fp_secs.iloc[-1]) / 60:.1f} min at the last measured forward pass "
       f"({float(fp_secs.iloc[-1]):.1f} s)" if fp_secs is not None and len(fp_secs) else "")
st.caption(evaluate.grouping_note(a) + f" Held-out text: {held:,} tokens; the searches use the first "
           f"{int(search_tokens):,} (grouped) and {int(ca_tokens):,} (const-alpha) calibration tokens. "
           f"This run costs about {units:.0f} forward passes over the held-out tokens{eta}; the progress bar "
           "shows the time left as it runs.")


if st.button("Run", type="primary", key="mq_run", disabled=not modes or not bits, icon=":material/play_arrow:"):
    ui.with_progress("Evaluating the whole model…", "Evaluation failed", "Evaluation done", lambda progress:
                     evaluate.run_quality(a, modes=list(modes), bits=sorted(int(b) for b in bits),
                                          group_size=int(group), zero_point=bool(zero_point),
                                          search_tokens=int(search_tokens), const_alpha_tokens=int(ca_tokens),
                                          protocol=protocol, format=fmt, progress=progress))

st.subheader("Write a GGUF for llama.cpp")
st.caption("The chosen method's weights in a llama.cpp type, AWQ's scales folded into the RMSNorms and up_proj (as "
           "official AWQ applies them), clip values applied, with the source GGUF's metadata and tokenizer; then "
           "llama.cpp itself loads the file, evaluates the held-out text and its figures are shown beside the "
           "explorer's prediction for the same weights (the two agree to about 0.003 nats of mean KL for identical "
           "weights: llama.cpp keeps its KV cache in f16).")
g1, g2, g3 = st.columns([2, 2, 1])
gm = g1.selectbox("Method", model_quality.GGUF_METHODS, index=2, key="mq_gguf_method",
                  help="awq (one scale per linear, Q(W·s)/s) has no folded form a file can store")
gt = g2.selectbox("llama.cpp type", llamacpp.TYPES, key="mq_gguf_type", index=llamacpp.TYPES.index(fmt or "Q4_0"),
                  help="A k-quant on rows its 256-block does not divide is written in llama.cpp's fallback type "
                       "(the summary counts them).")
gi = g3.toggle("imatrix", value=False, key="mq_gguf_imatrix",
               help="weight the rounding by the activations' mean x² per input channel (llama.cpp's imatrix)")
ui.export_button(a, "mq_gguf", "Write GGUF", "Writing the GGUF and running it in llama.cpp…",
                 "GGUF written and verified in llama.cpp", format="gguf", method=gm, spec=QuantSpec.of_type(gt),
                 imatrix=gi, folder=f"{gm}-{gt}", download=True)

st.subheader("Save a checkpoint for transformers and vLLM")
st.caption("The chosen method's own quantized weights packed as a compressed-tensors `pack-quantized` checkpoint "
           "(integer codes with their group scales and zero points, one config group per grid, `quantization_config` "
           "in config.json: the format vLLM serves and transformers loads), AWQ's scales folded into the preceding "
           + (f"operators, on this page's grid ({fmt}: compressed-tensors has no llama.cpp types, so it is refused)"
              if fmt else f"operators, at this page's group size ({ui.group_label(group)}) and zero point "
              f"({'on' if zero_point else 'off'})") + ", with the tokenizer and generation config. Then transformers reloads the "
           "folder on CPU and its logits are compared with the explorer's fake-quantized model on up to 512 held-out tokens (the first held-out blocks) "
           "(the codes are the explorer's own, so they should agree exactly).")
k1, k2 = st.columns([2, 1])
cm = k1.selectbox("Method", ct_export.METHODS + tuple(m for m in ("hqq",) if m not in ct_export.METHODS),
                  key="mq_ct_method", index=ct_export.METHODS.index("awq-clip") if "awq-clip" in ct_export.METHODS else 0,
                  help="The methods whose weights lie on an integer grid of the stored coordinates; the others are "
                       "refused with the reason.")
cb = k2.selectbox("Bits", list(range(2, 9)), index=2, key="mq_ct_bits", format_func=lambda b: f"w{b}",
                  disabled=bool(fmt))
ui.export_button(a, "mq_ct", "Save checkpoint", "Writing the checkpoint and reloading it in transformers…",
                 "Checkpoint written and reloaded in transformers", format=ct_export.FORMAT, method=cm,
                 spec=QuantSpec.of_type(fmt) if fmt else QuantSpec(int(cb), int(group), bool(zero_point)),
                 verify_tokens=512, folder=f"{cm}-{fmt or f'w{cb}g{group}'}{'' if zero_point else 's'}")

results = evaluate.cached_quality(a, fmt or evaluate.GRID)
if results is None or results.empty:
    st.info("No whole-model results for this analysis yet: pick modes and bits and press **Run**.")
    st.stop()

# This group size, zero point and protocol; fp (the reference, computed by every run) once per metric.
results = results[results["protocol"] == protocol]
shown = results if fmt else results[(results["group_size"] == group) & (results["zero_point"] == zero_point)]
shown = shown[shown["mode"] != "fp"]
fp = results[results["mode"] == "fp"].drop_duplicates("metric", keep="last")
shown = pd.concat([fp, shown], ignore_index=True) if not shown.empty else shown
if shown.empty:
    st.info(f"No results {f'in {fmt}' if fmt else 'at this group size, zero-point setting'} and scoring protocol "
            f"({protocol}) yet: press **Run**.")
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
    table["bits"] = table["bits"].map(lambda b: "fp" if b == evaluate.FP_BITS else fmt or f"w{b}")
    known = [m for m in evaluate.CAUSAL_METRICS + evaluate.ENCODER_METRICS if m in table.columns]
    table = table[["mode", "bits", *known, *[c for c in table.columns if c not in known and c not in ("mode", "bits")]]]
    st.dataframe(table, hide_index=True, column_config={
        m: st.column_config.NumberColumn(m, format="%.5g", help=evaluate.DEFINITIONS.get(m)) for m in table.columns
        if m in evaluate.DEFINITIONS})
    n_tok = int(shown["n_tokens"].max()) if "n_tokens" in shown else 0
    budgets = {m: int(t) for m, t in zip(shown["mode"], shown["search_tokens"]) if t}
    st.caption(f"Scored on {n_tok:,} held-out tokens, protocol **{protocol}**: {score.PROTOCOL_DEFINITIONS[protocol]}"
               + (" (searches on " + ", ".join(
        f"{m} {t:,}" for m, t in budgets.items()) + " calibration tokens). " if budgets else ". ") + " ".join(
        f"**{m}**: {d}." for m, d in evaluate.DEFINITIONS.items() if m in set(shown["metric"])))
with c2:
    st.subheader(f"Gain vs RTN {f'in {fmt}' if fmt else f'at group {ui.group_label(group)}'}: layer and model")
    gains = model_quality.gain_levels(a.layers, shown, -1 if fmt else a.settings.sweep.group_size)
    if gains.empty:
        st.info("Run with the rtn mode to compare gains.")
    else:
        st.dataframe(gains, hide_index=True, column_config={
            "group_size": st.column_config.NumberColumn("group size", format="%d"),
            **{c: st.column_config.NumberColumn(c, format="%.3f") for c in gains.columns if c not in ("bits", "group_size")}})
    same = not fmt and int(group) == int(a.settings.sweep.group_size)
    st.caption((f"Layer gain: median over linears of the sweep, at the same group size {ui.group_label(group)}. "
                if same else f"Layer gain: not shown — the sweep ran on the integer grid, these model rows are {fmt}. "
                if fmt else f"Layer gain: not shown — the sweep ran at group {ui.group_label(a.settings.sweep.group_size)}, "
                f"these model rows at group {ui.group_label(group)}; pick group "
                f"{ui.group_label(a.settings.sweep.group_size)} to compare the two at one group size. ")
               + "Model gain: error(rtn) / error(mode) for the model's output error metric — > 1 means the "
               "mode beats RTN on the whole model, as the layer gain says for single layers.")
kl = evaluate.cached_kl(a, fmt or evaluate.GRID)
if kl is not None:
    kl = kl[(kl["protocol"] == protocol) & ((kl["group_size"] == group) & (kl["zero_point"] == zero_point) | bool(fmt))]
if kl is not None and not kl.empty:
    ui.show_figure(model_quality.kl_distribution(kl), "mq_kl", model_id=a.model_id)
ui.show_figure(model_quality.quality_bars(shown), "mq_bars", model_id=a.model_id)
with st.expander("All cached results"):
    st.dataframe(results, hide_index=True)
