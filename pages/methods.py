"""Methods: which quantization method wins where (per module family and block), at 3 and 4 bits, held-out."""
import streamlit as st

import ui
from core.present import methods
from core.studies import methods_table

a = ui.require_analysis()
st.title("Methods")
st.caption("RTN, MSE-clipped RTN, AWQ (best alpha), AWQ + clip, GPTQ (act-order off / on), HQQ and rotated RTN "
           "on every linear of this model, scored on held-out input rows. Rotated RTN needs the activations "
           "rotated at run time; HQQ, RTN and MSE clip use no data.")

sw = a.settings.sweep
c1, c2 = st.columns(2)
bits = c1.multiselect("Bits", [2, 3, 4, 5, 6, 8], default=[3, 4], key="methods_bits")
group = int(c2.number_input("Group size (0 = per row)", min_value=0, value=int(sw.group_size), step=32,
                            key="methods_group"))
if not bits:
    st.info("Pick at least one bit-width.")
    st.stop()
table = methods_table.cached_methods_table(a, bits=bits, group_size=group, zero_point=sw.zero_point, compute=False)
if table is None or set(table["bits"]) != set(bits):
    st.info(f"Not computed yet for w{', w'.join(map(str, sorted(bits)))}, group {group}: every method on all "
            f"{len(a.names)} linears (minutes on a CPU; cached afterwards, also for `python -m core analyze --methods`).")
    if st.button("Compute the methods table", type="primary", key="methods_run"):
        bar = st.progress(0.0, "starting")
        try:
            table = methods_table.cached_methods_table(a, bits=bits, group_size=group, zero_point=sw.zero_point,
                                                 progress=lambda f, m: bar.progress(min(1.0, f), m))
        except ui.USER_ERRORS as e:
            st.error(ui.readable(e))
            st.stop()
        bar.empty()
    else:
        st.stop()

st.subheader("Winner per module family")
fam = methods_table.winners(table, by="family")
ui.show_table(fam, winner_error=("winner's median rel. error", "%.4g"),
              runner_up_error=("runner-up's median rel. error", "%.4g"), margin=("margin (x)", "%.2f"))
with st.expander("Winner per block"):
    ui.show_table(methods_table.winners(table, by="block"), winner_error=("winner's median rel. error", "%.4g"),
                  runner_up_error=("runner-up's median rel. error", "%.4g"), margin=("margin (x)", "%.2f"))

st.subheader("Where does AWQ beat GPTQ?")
h2h = methods_table.head_to_head(table, "awq", "gptq")
for b in sorted(bits):
    if (h2h["bits"] == b).any():
        ui.show_figure(methods.methods_heatmap(h2h, bits=b), f"methods_h2h_{b}", model_id=a.model_id)
with st.expander("All rows"):
    st.dataframe(table, hide_index=True)
ui.definitions(["rel_error", "sqnr_db"])
