"""Plan: sensitivities per block, the plan's bits per linear, the measured frontier of plans vs uniform bits."""
from __future__ import annotations

import altair as alt
import pandas as pd

from ..grids import metrics
from .common import ACCENT, HEIGHT, MUTED, PALETTE, WIDE, WIDTH, Figure, _family_sort, _title


def plan_sensitivity(layer_df: pd.DataFrame, model_df: pd.DataFrame, bits: int, granularity: str = "block",
                     metric: str = "kl") -> Figure:
    """Both sensitivities per block at ``bits``: whole-model damage (top) and layer-level held-out error per
    family (bottom); layers that stand out (robust z > 3.5 within their family / among blocks) ringed."""
    from ..studies.plan import standouts

    lay = layer_df[layer_df["bits"] == int(bits)].copy()
    lay["standout"] = standouts(lay["rel_heldout"].to_numpy(), lay["family"].to_numpy())
    mod = model_df[model_df["bits"] == int(bits)].copy()
    if granularity == "block":
        mod = mod[~mod["unit"].astype(str).str.startswith("family:")].copy()  # the family rows are not per block
        mod["block"] = mod["unit"].astype(int)
        mod["family"] = "block"
    else:
        info = lay.set_index("name")[["block", "family"]]
        mod = mod[mod["unit"].isin(info.index)]
        mod["block"] = info.loc[mod["unit"], "block"].to_numpy()
        mod["family"] = info.loc[mod["unit"], "family"].to_numpy()
    mod["standout"] = standouts(mod["value"].clip(lower=0).to_numpy(), mod["family"].to_numpy())
    fams = _family_sort(lay["family"].unique().tolist())
    n_blocks = int(lay["block"].max()) + 1 if len(lay) else 1
    xax = alt.X("block:Q", title="block", scale=alt.Scale(domain=[-0.5, n_blocks - 0.5], nice=False),
                axis=alt.Axis(tickMinStep=1, format="d"))
    unit_title = "only this block quantized" if granularity == "block" else "only this linear quantized"
    top_base = alt.Chart(mod).encode(x=xax)
    if granularity == "block":
        top = top_base.mark_bar(color=PALETTE[0], size=max(3, 300 // n_blocks)).encode(
            y=alt.Y("value:Q", title=f"model {metric} (nats)" if metric == "kl" else f"model {metric}"),
            tooltip=["block:Q", alt.Tooltip("value:Q", format=".4g"), "n_tokens:Q", "standout:N"])
    else:
        top = top_base.mark_line(point=True).encode(
            y=alt.Y("value:Q", title=f"model {metric}", scale=alt.Scale(type="symlog")),
            color=alt.Color("family:N", sort=fams, title="family"),
            tooltip=["unit:N", alt.Tooltip("value:Q", format=".4g"), "standout:N"])
    top_mark = alt.Chart(mod[mod["standout"]]).mark_point(shape="circle", size=160, color=ACCENT, strokeWidth=2).encode(
        x=xax, y="value:Q", tooltip=["block:Q", alt.Tooltip("value:Q", format=".4g")])
    top = (top + top_mark).properties(width=WIDE * 0.7, height=170,
                                      title=_title(f"Model-level sensitivity, w{bits}", unit_title + ", the rest fp"))
    bottom = alt.Chart(lay).mark_line(point=True).encode(
        x=xax, y=alt.Y("rel_heldout:Q", title="relative output error (held-out)", scale=alt.Scale(type="log")),
        color=alt.Color("family:N", sort=fams, title="family"),
        tooltip=["name:N", "family:N", alt.Tooltip("rel_heldout:Q", format=".4g"), "standout:N"])
    bottom_mark = alt.Chart(lay[lay["standout"]]).mark_point(shape="circle", size=160, color=ACCENT,
                                                             strokeWidth=2).encode(
        x=xax, y="rel_heldout:Q", tooltip=["name:N", alt.Tooltip("rel_heldout:Q", format=".4g")])
    bottom = (bottom + bottom_mark).properties(width=WIDE * 0.7, height=220,
                                               title=_title(f"Layer-level sensitivity, w{bits}",
                                                            "each linear alone; ringed: stands out in its family"))
    chart = alt.vconcat(top, bottom).resolve_scale(color="independent")
    data = pd.concat([mod.assign(level="model"), lay.rename(columns={"rel_heldout": "value"}).assign(level="layer")],
                     ignore_index=True)
    return Figure(f"plan_sensitivity_w{bits}", chart, data,
                  "model level: whole-model damage with only that unit quantized; layer level: "
                  + metrics.DEFINITIONS["rel_error"] + " on held-out rows")


def plan_map(layers: dict, linears: pd.DataFrame) -> Figure:
    """Block x family map of a plan's bits (16 = kept fp16)."""
    info = linears.set_index("name")
    df = pd.DataFrame([{"name": n, "block": int(info.loc[n, "block"]), "family": str(info.loc[n, "family"]),
                        "bits": int(b), "label": "fp16" if int(b) == 16 else f"w{int(b)}"}
                       for n, (b, _) in layers.items()])
    fams = _family_sort(df["family"].unique().tolist())
    order = [f"w{b}" for b in range(2, 9)] + ["fp16"]
    present = [o for o in order if o in set(df["label"])]
    colors = {"w2": "#D55E00", "w3": "#E69F00", "w4": "#56B4E9", "w5": "#009E73", "w6": "#009E73", "w7": "#0072B2",
              "w8": "#0072B2", "fp16": "#000000"}
    base = alt.Chart(df).encode(x=alt.X("family:N", sort=fams, title="module family", axis=alt.Axis(labelAngle=0)),
                                y=alt.Y("block:O", title="block"))
    chart = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("label:N", title="bits", sort=present,
                        scale=alt.Scale(domain=present, range=[colors[p] for p in present])),
        tooltip=["name:N", "bits:Q"])
    if len(df) <= 240:
        chart = chart + base.mark_text(fontSize=10, color="white").encode(text="label:N")
    n_blocks = int(df["block"].nunique())
    chart = chart.properties(width=min(WIDTH, 72 * len(fams)), height=max(120, min(620, 20 * n_blocks)),
                             title=_title("Plan: bits per linear", "block x family; fp16 = kept at 16 bits"))
    return Figure("plan_map", chart, df)


def plan_frontier(df: pd.DataFrame, metric: str = "kl") -> Figure:
    """Measured whole-model quality vs average storage bits: uniform widths (line) and plans (points)."""
    d = df[df["metric"] == metric][["variant", "kind", "avg_bits", "value", "n_tokens"]].copy()
    titles = {"kl": "mean KL to fp (nats, log)", "perplexity": "perplexity (log)",
              "hidden_rel_error": "hidden-state relative error (log)"}
    y = alt.Y("value:Q", title=titles.get(metric, metric), scale=alt.Scale(type="log"))
    x = alt.X("avg_bits:Q", title="average storage bits per weight (scales and zeros included)",
              scale=alt.Scale(zero=False))
    uni = alt.Chart(d[d["kind"] == "uniform"]).mark_line(point=True, color=MUTED).encode(
        x=x, y=y, tooltip=["variant:N", alt.Tooltip("avg_bits:Q", format=".3f"), alt.Tooltip("value:Q", format=".4g")])
    uni_lab = alt.Chart(d[d["kind"] == "uniform"]).mark_text(dx=8, dy=-8, align="left", color=MUTED).encode(
        x=x, y=y, text="variant:N")
    pl = alt.Chart(d[d["kind"] == "plan"]).mark_point(filled=True, size=110, color=ACCENT, shape="diamond").encode(
        x=x, y=y, tooltip=["variant:N", alt.Tooltip("avg_bits:Q", format=".3f"), alt.Tooltip("value:Q", format=".4g")])
    pl_lab = alt.Chart(d[d["kind"] == "plan"]).mark_text(dx=8, dy=10, align="left", color=ACCENT).encode(
        x=x, y=y, text="variant:N")
    chart = (uni + uni_lab + pl + pl_lab).properties(
        width=WIDTH, height=HEIGHT, title=_title("Frontier: uniform bits vs mixed-precision plans",
                                                 "every point measured on held-out text"))
    return Figure(f"plan_frontier_{metric}", chart, d)
