"""Methods: which quantization method wins where (per module family and block), on the integer grid at 3 and 4 bits
or in llama.cpp's types, held-out."""
import pandas as pd
import streamlit as st

import ui
from core import methods as core_methods
from core.grids import llamacpp
from core.grids.spec import QuantSpec
from core.present import common, methods
from core.studies import methods_table

a = ui.require_analysis()
st.title("Methods")
st.caption("RTN, MSE-clipped RTN, AWQ (best alpha), AWQ + clip, GPTQ (act-order off / on), HQQ and rotated RTN "
           "on every linear of this model, scored on held-out input rows. Rotated RTN needs the activations "
           "rotated at run time; HQQ, RTN and MSE clip use no data. On a llama.cpp type the methods round with "
           "llama.cpp's own quantizer; those that do not run on its types are listed with the reason.")

sw = a.settings.sweep
c0, c1, c2 = st.columns([2, 3, 2])
with c0:
    llama = ui.grid_kind_picker("methods_grid_kind")
bits: list[int] = []
types: list[str] = []
group = int(sw.group_size)
if llama:
    types = c1.multiselect("llama.cpp types", llamacpp.TYPES, default=["Q4_0", "Q4_K"], key="methods_types",
                           format_func=lambda t: f"{t} · {llamacpp.bits_per_weight(t):g} bits/weight")
else:
    bits = c1.multiselect("Bits", [2, 3, 4, 5, 6, 8], default=[3, 4], key="methods_bits")
    group = int(c2.number_input("Group size (0 = per row)", min_value=0, value=int(sw.group_size), step=32,
                                key="methods_group"))
grids = [f"w{b}" for b in sorted(bits)] + list(types)
if not grids:
    st.info("Pick at least one bit-width." if not llama else "Pick at least one llama.cpp type.")
    st.stop()
widths = {n: int(w) for n, w in zip(a.linears["name"], a.linears["in_features"])}
for t in types:
    note = common.type_fallbacks(QuantSpec.of_type(t), widths)
    if note:
        st.info(note, icon=":material/swap_horiz:")
labels = {k: core_methods.METHODS[k].label for k in core_methods.LAYER_METHODS}
refused = {m: why for t in types for m, why in methods_table.refusals(list(labels), QuantSpec.of_type(t)).items()}
if refused:
    with st.expander(f"Not run on llama.cpp types: {', '.join(labels[m] for m in refused)}"):
        ui.show_table(pd.DataFrame({"method": [labels[m] for m in refused], "why": list(refused.values())}))

table = methods_table.cached_methods_table(a, bits=bits, group_size=group, zero_point=sw.zero_point, types=types,
                                          compute=False)
if table is None or set(methods_table.grid_column(table)) != set(grids):
    st.info(f"Not computed yet for {', '.join(grids)}" + ("" if llama else f", group {group}") + ": every method on "
            f"all {len(a.names)} linears (minutes on a CPU; cached afterwards"
            + ("" if llama else ", also for `python -m core analyze --methods`") + ").")
    if st.button("Compute the methods table", type="primary", key="methods_run"):
        table = ui.with_progress("Every method on every linear…", "The methods table failed", "Methods table done",
                                 lambda progress: methods_table.cached_methods_table(
                                     a, bits=bits, group_size=group, zero_point=sw.zero_point, types=types,
                                     progress=progress))
        if table is None:
            st.stop()
        st.rerun()  # show the table without the "not computed yet" note above the button
    else:
        st.stop()

st.subheader("Winner per module family")
fam = methods_table.winners(table, by="family")
ui.show_table(fam, winner_error=("winner's median rel. error", "%.4g"),
              runner_up_error=("runner-up's median rel. error", "%.4g"), margin=("margin (x)", "%.2f"))
with st.expander("Winner per block"):
    ui.show_table(methods_table.winners(table, by="block"), winner_error=("winner's median rel. error", "%.4g"),
                  runner_up_error=("runner-up's median rel. error", "%.4g"), margin=("margin (x)", "%.2f"))

# GPTQ does not run on llama.cpp types: there the question is AWQ against plain rounding
rival = "rtn" if llama else "gptq"
st.subheader(f"Where does AWQ beat {labels[rival]}?")
h2h = methods_table.head_to_head(table, "awq", rival)
for grid in grids:
    if (h2h["grid"] == grid).any():
        ui.show_figure(methods.methods_heatmap(h2h, grid=grid, b=rival), f"methods_h2h_{grid}", model_id=a.model_id)
with st.expander("All rows"):
    st.dataframe(table, hide_index=True)
ui.definitions(["rel_error", "sqnr_db", "bit_cost"])
