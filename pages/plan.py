"""Plan: which layers to keep at higher precision under a bit budget, verified on the whole model, exported."""
import streamlit as st

import ui
from core.studies import alpha_predict
from core.present import plan
from core.grids import metrics
from core.studies import plan as P
from core.studies import plan_export as PE

a = ui.require_analysis()
st.title("Plan")
st.caption("Pick an average bit budget (scales and zeros counted: " + metrics.DEFINITIONS["bit_cost"] + "), the "
           "candidate bit-widths and a method. The whole model's damage is measured with only one block quantized "
           "and with only one family quantized in every block; a linear's value is its block's damage shared by "
           "its family's. An exact knapsack solver picks each linear's bits to minimise the summed damage under "
           "the budget, and the plan is applied to the whole model and scored beside uniform quantization.")

nw, gs = P.layer_geometry(a)
c1, c2, c3, c4 = st.columns([2, 3, 2, 2])
choices = c2.multiselect("Candidate bits", [2, 3, 4, 5, 6, 8, 16], default=[2, 3, 4, 8, 16], key="plan_bits",
                         help="16 = keep the layer in fp16")
method = c3.selectbox("Method", P.PLAN_METHODS, key="plan_method")
granularity = c4.selectbox("Sensitivity unit", ["block", "linear"], key="plan_gran",
                           help="block: one whole-model run per block and bit-width; linear: one per linear (slower)")
lo, hi = P.budget_range(nw, gs, choices or [16], a.settings.sweep.zero_point)
budget = c1.number_input("Budget (bits / weight)", min_value=float(round(lo, 4)), max_value=float(round(hi, 4)),
                         value=float(min(max(3.5, lo), hi)), step=0.125, key="plan_budget")
c5, c6, c7 = st.columns(3)
sens_tokens = c5.select_slider("Tokens per sensitivity run", [128, 256, 512, 1024, 2048], value=512, key="plan_stok")
eval_tokens = c6.select_slider("Tokens of the verification", [256, 512, 1024, 2048, 0], value=0, key="plan_etok",
                               format_func=lambda t: "all held-out" if t == 0 else str(t))
extra = c7.multiselect("More budgets on the frontier", [2.75, 3.0, 3.25, 3.75, 4.0, 4.25, 4.5, 5.0, 6.0],
                       default=[], key="plan_extra", help="each one is planned and measured on the whole model too")
extra = [b for b in extra if lo <= b <= hi]
settings = P.PlanSettings(budget=float(budget), method=method, bits=tuple(choices), zero_point=a.settings.sweep.zero_point,
                          granularity=granularity, sens_tokens=int(sens_tokens), eval_tokens=int(eval_tokens) or None)
key = ("plan_report", str(a.path))

if st.button("Plan and verify", type="primary", key="plan_run", disabled=not choices, icon=":material/play_arrow:"):
    with st.status("Measuring sensitivity, solving, verifying…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        try:
            st.session_state[key] = P.run(a, settings, extra_budgets=extra, progress=lambda f, m: bar.progress(min(max(f, 0.0), 1.0), text=m))
        except Exception as e:  # noqa: BLE001 - one sentence; the page stays up
            status.update(label="Planning failed", state="error")
            st.error(ui.readable(e))
        else:
            status.update(label="Plan verified", state="complete", expanded=False)

rep = st.session_state.get(key)
if rep is None:
    st.info("Press **Plan and verify**. The sensitivity pass is cached: a second budget reuses it.")
else:
    p = rep.plan
    st.markdown(f"**Plan**: {p.avg_bits:.4f} bits per weight for a budget of {p.budget_bits:g} "
                f"({'exact optimum' if p.exact else f'within {p.slack_bits:.3g} bits of the optimum'}); "
                + ", ".join(f"{'fp16' if b == 16 else f'w{b}'} x{n}" for b, n in p.counts().items()))
    for note in rep.notes:
        st.markdown(f"- {note}")
    t1, t2, t3, t4 = st.tabs(["Frontier", "Plan map", "Sensitivity", "Export"])
    with t1:
        metric = "kl" if "kl" in set(rep.quality["metric"]) else P.model_metric(a)
        ui.show_figure(plan.plan_frontier(rep.quality, metric), "plan_frontier", model_id=a.model_id)
        st.dataframe(rep.quality.pivot_table(index=["variant", "avg_bits"], columns="metric", values="value").reset_index(),
                     hide_index=True)
    with t2:
        ui.show_figure(plan.plan_map(p.layers, a.linears), "plan_map", model_id=a.model_id)
    with t3:
        sb = st.selectbox("Bits", sorted(set(rep.layer_sens["bits"])), key="plan_sens_bits")
        ui.show_figure(plan.plan_sensitivity(rep.layer_sens, rep.model_sens, int(sb), settings.granularity,
                                                P.model_metric(a)), "plan_sens", model_id=a.model_id, caption=True)
    with t4:
        fmts = st.multiselect("Formats", PE.FORMATS, default=list(PE.FORMATS), key="plan_fmts")
        try:
            paths = PE.write_exports(p, a.path / "plan", fmts, linears=a.linears.to_dict("records"),
                                     module_names=list(a.lm.modules))
        except Exception as e:  # noqa: BLE001
            st.error(ui.readable(e))
        else:
            st.caption("Each file was written, read back and checked: regexes match exactly the planned linears of "
                       "this model. llama.cpp's k-quants are another grid, so there the plan is a ranking.")
            for f, path in paths.items():
                st.download_button(f"{f}: {path.name}", data=path.read_bytes(), file_name=path.name, key=f"plan_dl_{f}",
                                   icon=":material/download:")

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
