"""Overview: the charts of one analysis at a glance (where AWQ helps per family, error vs bits, the hockey stick).

Its tables (``headline``, ``family_table``, ``gain_matrix``, ``error_by_bits``, ``hockey_stick`` ...) and the
gain heatmap are in ``common``: Compare and How AWQ works show them too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import altair as alt
import pandas as pd

from ..grids import metrics
from . import common
from .common import (AX, HEIGHT, WIDTH, Figure, _error_bits_chart, _family_sort, _title, error_by_bits,
                     error_ratio_by_bits, family_table, hockey_stick_chart)

if TYPE_CHECKING:
    from ..analysis import Analysis


def family_gains(analysis: "Analysis", bits: int) -> Figure:
    ft = family_table(analysis.layers, bits)
    long = ft.melt(id_vars=["family"], value_vars=["median_gain", "median_gain_heldout"], var_name="split",
                   value_name="gain").replace({"split": {"median_gain": "in-sample", "median_gain_heldout": "held-out"}})
    fams = _family_sort(ft["family"].tolist())
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("family:N", sort=fams, title=AX["family"], axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("split:N", sort=["in-sample", "held-out"]),
        y=alt.Y("gain:Q", title="median " + AX["gain"], scale=alt.Scale(zero=False)),
        color=alt.Color("split:N", title=None, sort=["in-sample", "held-out"]),
        tooltip=["family:N", "split:N", alt.Tooltip("gain:Q", format=".3f")],
    )
    one = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="#333", strokeDash=[4, 3]).encode(y="y:Q")
    chart = (bars + one).properties(width=WIDTH, height=HEIGHT,
                                    title=_title(f"Median AWQ gain per module family, w{bits}",
                                                 "dashed line: no gain"))
    return Figure(f"family_gains_w{bits}", chart, long, metrics.DEFINITIONS["gain"])


def error_vs_bits(analysis: "Analysis") -> Figure:
    err = error_by_bits(analysis.layers)
    ratio = error_ratio_by_bits(analysis.layers)
    chart = _error_bits_chart(err, ratio, None, "Output error vs bit-width",
                              "median over all linears; bottom: AWQ / RTN per linear, dashed: held-out")
    data = err.merge(ratio[["bits", "split", "median_awq_over_rtn"]], on=["bits", "split"], how="left")
    return Figure("error_vs_bits", chart, data, metrics.DEFINITIONS["rel_error"])


def hockey_stick(analysis: "Analysis") -> Figure:
    df = common.hockey_stick(analysis, by="family")
    fams = _family_sort(df["group"].unique().tolist())
    chart = hockey_stick_chart(df, "group", "Sorted channel importance ('hockey stick')",
                               "mean over the blocks of each family; each curve starts at its layers' top channel",
                               order=fams)
    return Figure("hockey_stick", chart, df, metrics.DEFINITIONS["importance"])
