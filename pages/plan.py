"""Plan: each linear's bits and group size under a bit budget, chosen on selection tokens, reported on test tokens."""
import streamlit as st

import ui
from core.studies import alpha_predict
from core.present import model_quality, plan
from core.grids import llamacpp, metrics
from core.methods import METHODS
from core.studies import plan as P
from core.studies import plan_export as PE

a = ui.require_analysis()
st.title("Plan")
st.caption("Pick an average bit budget (scales and zeros counted: " + metrics.DEFINITIONS["bit_cost"] + "), the "
           "candidate bit-widths and group sizes, and a method. Three token sets are kept apart: **calibration** "
           "(statistics, the method's searches), **selection** (each linear's predicted damage and every choice) "
           "and **test** (every figure below; nothing is chosen on it). An exact knapsack solver picks each linear's "
           "setting to minimise the summed predicted damage; that plan and every uniform configuration within the "
           "budget are then run on the whole model over the selection tokens, and the best one is kept, so the plan "
           "never loses to uniform quantization on the tokens it was chosen on.")

nw, inf = P.geometry(a)
zp = bool(a.settings.sweep.zero_point)
k1, k2 = st.columns([3, 7])
with k1:
    llama = ui.grid_kind_picker("plan_grid_kind")
c1, c2, c3, c4 = st.columns([2, 3, 3, 2])
choices, groups, types = [16], [0], []
if llama:  # the settings are llama.cpp types, costed by their block layout: a GGUF written from the plan is at budget
    types = c2.multiselect("Candidate llama.cpp types", llamacpp.TYPES, default=list(llamacpp.TYPES), key="plan_types",
                           format_func=lambda t: f"{t} · {llamacpp.bits_per_weight(t):g} bits/weight")
    widths = {int(w) for w in inf.values()}
    moved = sorted({f"{t} → {llamacpp.fallback(t, w)}" for t in types for w in widths if llamacpp.fallback(t, w) != t})
    c3.caption("Each linear takes a type as llama-quantize writes it on its width: a k-quant on rows 256 does not "
               "divide is written, costed and quantized as its block-32 fallback"
               + (f" (here: {', '.join(moved)} on the rows it does not divide)." if moved else "."))
    methods = [m for m in P.PLAN_METHODS if METHODS[m].formats]
else:
    choices = c2.multiselect("Candidate bits", [2, 3, 4, 5, 6, 8, 16], default=list(P.DEFAULT_CHOICES),
                             key="plan_bits", help="16 = keep the layer in fp16")
    groups = c3.multiselect("Candidate group sizes", [32, 64, 128, 256, 0], default=list(P.DEFAULT_GROUP_SIZES),
                            key="plan_groups", format_func=lambda g: "per row" if g == 0 else str(g),
                            help="each used on the linears whose width it divides; per row is always possible")
    methods = list(P.PLAN_METHODS)
method = c4.selectbox("Method", methods, key="plan_method",
                      help="On llama.cpp types: the methods that run on them (GPTQ does not)." if llama else None)
draft = P.PlanSettings(bits=tuple(choices) or (16,), group_sizes=tuple(groups) or (0,), zero_point=zp,
                       types=tuple(types))
ready = bool(types) if llama else bool(choices and groups)
try:
    lo, hi = P.budget_range(nw, inf, P.plan_choices(a, draft), zp) if ready else (16.0, 16.0)
except ValueError as e:
    st.error(ui.readable(e))
    st.stop()
lo, hi = float(round(lo, 4)), float(round(hi, 4))
# the budget lives in Session State only (a widget given a value too warns): first the default, then kept in the
# range of another kind of grid or other candidates
start = st.session_state.get("plan_budget", 3.5 if not llama else 4.5)
st.session_state["plan_budget"] = float(min(max(start, lo), hi))
budget = c1.number_input("Budget (bits / weight)", min_value=lo, max_value=hi, step=0.125, key="plan_budget")
c5, c6, c7 = st.columns(3)
held = int(a.manifest.get("n_heldout_tokens") or 0)
sel_tokens = c5.select_slider("Selection tokens", [t for t in (128, 256, 512, 1024, 2048) if t < held] + [0], value=0,
                              key="plan_sel", format_func=lambda t: f"all held-out ({held})" if t == 0 else str(t),
                              help="the analysis' held-out tokens the sensitivities and choices use")
test_tokens = c6.select_slider("Test tokens", [512, 1024, 2048, 4096], value=2048, key="plan_test",
                               help="held-out tokens after the selection ones: every reported figure")
frontier = c7.checkbox(f"Frontier ({', '.join(f'{b:g}' for b in P.FRONTIER_BUDGETS)} bits)", key="plan_frontier",
                       help="plans at these budgets too, and every uniform configuration scored on the test tokens")
settings = P.PlanSettings(budget=float(budget), method=method, bits=tuple(choices), group_sizes=tuple(groups),
                          zero_point=zp, selection_tokens=int(sel_tokens) or None, test_tokens=int(test_tokens),
                          types=tuple(types))
key = ("plan_report", str(a.path))

if st.button("Plan and verify", type="primary", key="plan_run", disabled=not ready,
             icon=":material/play_arrow:"):
    with st.status("Predicting damage, solving, checking candidates, scoring on the test tokens…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        try:
            budgets = [b for b in P.FRONTIER_BUDGETS if lo <= b <= hi] if frontier else []
            st.session_state[key] = P.run(a, settings, frontier=budgets,
                                          progress=lambda f, m: bar.progress(min(max(f, 0.0), 1.0), text=m))
        except Exception as e:  # noqa: BLE001 - one sentence; the page stays up
            status.update(label="Planning failed", state="error")
            st.error(ui.readable(e))
        else:
            status.update(label="Plan verified", state="complete", expanded=False)

rep = st.session_state.get(key)
if rep is None:
    st.info("Press **Plan and verify**. The sensitivity table and every score are cached: another budget reuses them.")
else:
    p = rep.plan
    st.subheader("Three token sets")
    ui.show_table(plan.token_table(rep.tokens))
    st.caption("Scoring: " + P.PROTOCOL_NOTE + ".")
    how = ("the solver's plan" + (" (exact optimum)" if p.exact else f" (within {p.slack_bits:.3g} bits of the optimum)")
           if p.source == "solver" else f"**{p.source}**: it scored better on the selection tokens than the solver's plan")
    st.markdown(f"**Plan** for {rep.settings.budget:g} bits: {p.avg_bits:.4f} bits per weight, {how}; {p.summary()} "
                + ("(the llama.cpp type each linear is written in)." if p.in_types else "(g0 = one group per row)."))
    st.markdown("**On the test tokens**, beside the best uniform configuration within the budget:")
    ui.show_table(plan.side_by_side(rep), **{c: (c, "%.4f") for c in ("avg bits", "mean KL", "± (KL)", "KL p99",
                                                                       "same top-1")})
    for note in rep.notes:
        st.markdown(f"- {note}")
    with st.expander("Candidates on the selection tokens (what the choice was made on)"):
        ui.show_table(rep.candidates.pivot_table(index=["variant", "avg_bits", "chosen"], columns="metric",
                                                 values="value").reset_index().sort_values(rep.metric))
    t1, t2, t3, t4 = st.tabs(["Frontier", "Plan map", "Sensitivity", "Export"])
    with t1:
        ui.show_figure(plan.plan_frontier(rep.quality, rep.metric), "plan_frontier", model_id=a.model_id, caption=True)
        st.dataframe(rep.quality.pivot_table(index=["variant", "avg_bits"], columns="metric", values="value")
                     .reset_index().sort_values("avg_bits"), hide_index=True)
    with t2:
        ui.show_figure(plan.plan_map(p.layers, a.linears), "plan_map", model_id=a.model_id)
        ui.show_table(plan.plan_table(p.layers, a.linears, p.zero_point),
                      bits_per_weight=("bits per weight (storage)", "%.4g"),
                      group_size=("group / block (0: per row)", "%d"))
    with t3:
        s1, s2 = st.columns(2)
        ref = P.calibration_setting(rep.settings, inf)  # the setting the family factors were measured at
        if p.in_types:  # one table row per linear and type written (Q4_0 and Q4_1 share bits and block)
            type_list = sorted(set(rep.sensitivity["type"]), key=llamacpp.bits_per_weight)
            st_ = s1.selectbox("llama.cpp type", type_list, key="plan_sens_type",
                               index=type_list.index(ref.format) if ref.format in type_list else 0)
            fig = plan.plan_sensitivity(rep.sensitivity, 0, 0, rep.metric, type=st_)
        else:
            bits_list = sorted(set(rep.sensitivity["bits"]))
            group_list = sorted(set(rep.sensitivity["group_size"]), key=lambda g: (g == 0, g))
            sb = s1.selectbox("Bits", bits_list, key="plan_sens_bits",
                              index=bits_list.index(ref.bits) if ref.bits in bits_list else 0)
            sg = s2.selectbox("Group size", group_list, key="plan_sens_group",
                              index=group_list.index(ref.group_size) if ref.group_size in group_list else 0,
                              format_func=lambda g: "per row" if g == 0 else str(g))
            fig = plan.plan_sensitivity(rep.sensitivity, int(sb), int(sg), rep.metric)
        ui.show_figure(fig, "plan_sens", model_id=a.model_id, caption=True)
        if rep.families is not None:
            st.caption(f"Family calibration: every linear of a family quantized at {ref.format or ref.key}, the rest "
                       "fp, measured "
                       "on the selection tokens, over the sum of its linears' predictions; each prediction of that "
                       "family is multiplied by this factor.")
            ui.show_table(rep.families[["family", "measured", "predicted", "factor"]],
                          measured=("measured", "%.4g"), predicted=("predicted (summed)", "%.4g"),
                          factor=("factor", "%.2f"))
    with t4:
        fmts = st.multiselect("Formats", PE.formats_for(p), default=list(PE.formats_for(p)),  # one pick per kind
                              key="plan_fmts_types" if p.in_types else "plan_fmts")
        try:
            paths = PE.write_exports(p, a.path / "plan", fmts, linears=a.linears.to_dict("records"),
                                     module_names=list(a.lm.modules), report=rep)
        except Exception as e:  # noqa: BLE001
            st.error(ui.readable(e))
        else:
            st.caption("Each file was written, read back and checked: regexes match exactly the planned linears of "
                       "this model. plan.json carries the test figures of the plan and of the best uniform "
                       "configuration, and the three token sets."
                       + (" Each linear's llama.cpp type is the plan's own, so llama_quantize_args.txt is the plan."
                          if p.in_types else " llama.cpp's k-quants are another grid, so there the plan is a ranking."))
            for f, path in paths.items():
                st.download_button(f"{f}: {path.name}", data=path.read_bytes(), file_name=path.name, key=f"plan_dl_{f}",
                                   icon=":material/download:")
        file_method = PE.gguf_method(p.method)
        st.caption(f"**Write GGUF**: this plan as a file llama.cpp runs — "
                   + ("each linear in the type the plan chose (so the file is at the plan's budget)" if p.in_types else
                      "each linear in the llama.cpp type of its bits (the types of llama_quantize_args.txt; 16 bits "
                      "stay F32: not at the plan's budget where a type costs more than its bits)")
                   + f", quantized by **{file_method}**"
                   + (" (the plan's per-linear awq has no folded form a file can store; awq-clip's scales are searched "
                      "once at the plan's most common type, folded into the norms, and each linear rounded at its own "
                      "type)" if file_method != p.method else "")
                   + ", then loaded in llama.cpp and scored beside the explorer's prediction for the same weights.")
        summary = ui.export_button(a, "plan_gguf", "Write GGUF", "Writing the plan's GGUF and running it in llama.cpp…",
                                   "GGUF written and verified in llama.cpp", format="gguf", method=file_method,
                                   plan=PE.plan_dict(p), folder=f"plan-{p.budget_bits:g}-{file_method}")
        if summary is not None and summary.get("linear_bits_per_weight") is not None:
            st.caption(f"The file's linear tensors: {summary['linear_bits_per_weight']:.4f} bits per weight; "
                       f"the plan's {p.avg_bits:.4f}.")

        st.caption(f"**Save checkpoint**: this plan as a compressed-tensors `pack-quantized` folder that transformers "
                   f"loads and vLLM serves — each linear at its planned bits and group size (one config group per "
                   f"grid; 16-bit linears listed as ignored), quantized by **{file_method}**, then reloaded in "
                   "transformers and its logits compared with the explorer's on up to 512 held-out tokens (the first held-out blocks).")
        ui.export_button(a, "plan_ct", "Save checkpoint", "Writing the plan's checkpoint and reloading it in transformers…",
                         "Checkpoint written and reloaded in transformers", format="compressed-tensors",
                         method=file_method, plan=PE.plan_dict(p), verify_tokens=512,
                         folder=f"plan-{p.budget_bits:g}-{file_method}-ct")

st.subheader("Predicting AWQ's alpha from statistics")
st.caption("Each layer's best alpha predicted from one statistic (or all) by a line fitted on the other blocks "
           "(leave one block out); kept gain = share of the search's held-out error reduction the predicted alpha "
           "keeps (1 = as good as searching, 0 = no better than RTN).")
ab = st.selectbox("Bits", sorted(set(a.layers["bits"])), key="plan_alpha_bits")
if st.button("Study", key="plan_alpha_run"):
    try:
        st.session_state[("alpha", str(a.path), int(ab))] = alpha_predict.study(a, int(ab))
    except Exception as e:  # noqa: BLE001
        st.error(ui.readable(e))
study = st.session_state.get(("alpha", str(a.path), int(ab)))
if study is not None:
    ui.show_table(study.table, kept_gain=("kept gain (held-out)", "%.3f"), mae_alpha=("mean |alpha error|", "%.3f"),
                  corr=("correlation with best alpha", "%.2f"))
