"""Compare: two or more cached analyses side by side, each named by ``common.compare_labels``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import altair as alt
import pandas as pd

from .common import (AX, HEIGHT, WIDTH, Figure, _error_bits_chart, _family_sort, _title, bits_available,
                     compare_labels, error_by_bits, error_ratio_by_bits, family_table, headline, hockey_stick,
                     hockey_stick_chart)

if TYPE_CHECKING:
    from ..analysis import Analysis


# --- views --------------------------------------------------------------------------------------------

def _labels(analyses: list["Analysis"]) -> list[str]:
    return compare_labels([a.manifest for a in analyses])


def compare_family_table(analyses: list["Analysis"], bits: int) -> pd.DataFrame:
    frames = []
    for a, label in zip(analyses, _labels(analyses)):
        if bits not in bits_available(a):
            continue
        ft = family_table(a.layers, bits)
        ft.insert(0, "analysis", label)
        frames.append(ft)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_hockey_table(analyses: list["Analysis"]) -> pd.DataFrame:
    frames = []
    for a, label in zip(analyses, _labels(analyses)):
        hs = hockey_stick(a, by="all")
        hs["group"] = label
        frames.append(hs)
    return pd.concat(frames, ignore_index=True).rename(columns={"group": "analysis"}) if frames else pd.DataFrame()


def compare_error_by_bits(analyses: list["Analysis"]) -> pd.DataFrame:
    frames = []
    for a, label in zip(analyses, _labels(analyses)):
        eb = error_by_bits(a.layers)
        eb.insert(0, "analysis", label)
        frames.append(eb)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_headlines(analyses: list["Analysis"], bits: int) -> pd.DataFrame:
    rows = []
    for a, label in zip(analyses, _labels(analyses)):
        if bits not in bits_available(a):
            continue
        h = headline(a, bits)
        rows.append({"analysis": label, "model_id": a.model_id, "linears": h["n_linears"],
                     "tokens": h["n_tokens"], "median_gain": h["median_gain"],
                     "median_gain_heldout": h["median_gain_heldout"], "median_awq_rel": h["median_awq_rel"],
                     "max_mean_abs_over_median": h["max_outlier_ratio"]})
    return pd.DataFrame(rows)


# --- figures ------------------------------------------------------------------------------------------

def compare_family_gains(analyses: list["Analysis"], bits: int) -> Figure:
    df = compare_family_table(analyses, bits)
    fams = _family_sort(df["family"].unique().tolist()) if len(df) else []
    chart = alt.Chart(df).mark_bar().encode(
        x=alt.X("family:N", sort=fams, title=AX["family"], axis=alt.Axis(labelAngle=0)),
        xOffset="analysis:N",
        y=alt.Y("median_gain:Q", title="median " + AX["gain"], scale=alt.Scale(zero=False)),
        color=alt.Color("analysis:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=440)),
        tooltip=["analysis:N", "family:N", alt.Tooltip("median_gain:Q", format=".3f"),
                 alt.Tooltip("median_gain_heldout:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(f"AWQ gain per module family, w{bits}", "in-sample"))
    return Figure(f"compare_family_gains_w{bits}", chart, df)


def compare_hockey(analyses: list["Analysis"]) -> Figure:
    df = compare_hockey_table(analyses)
    chart = hockey_stick_chart(df, "analysis", "Sorted channel importance, all linears",
                               "each linear normalised by its mean, then averaged").encode(
        color=alt.Color("analysis:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=440)))
    return Figure("compare_hockey_stick", chart, df)


def compare_error_vs_bits(analyses: list["Analysis"]) -> Figure:
    err = compare_error_by_bits(analyses)
    split = "held-out" if len(err) and (err["split"] == "held-out").any() else "calibration"
    err = err[err["split"] == split] if len(err) else err
    frames = []
    for a, label in zip(analyses, compare_labels([x.manifest for x in analyses])):
        r = error_ratio_by_bits(a.layers)
        r.insert(0, "analysis", label)
        frames.append(r[r["split"] == split])
    ratio = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    chart = _error_bits_chart(err, ratio.drop(columns="split").assign(split=split) if len(ratio) else ratio, "analysis",
                              "Output error vs bit-width",
                              f"median over linears, scored on {split} rows; bottom: AWQ / RTN per linear")
    data = err.merge(ratio[["analysis", "bits", "split", "median_awq_over_rtn"]], on=["analysis", "bits", "split"],
                     how="left") if len(ratio) else err
    return Figure("compare_error_vs_bits", chart, data)
