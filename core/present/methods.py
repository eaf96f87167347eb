"""Methods (RTN, MSE clip, AWQ, GPTQ, HQQ, rotation): where one method beats another, per block and family."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from ..grids import metrics
from .common import AX, WIDTH, Figure, _family_sort, _title


def methods_heatmap(h2h: pd.DataFrame, *, grid: str, a: str = "awq", b: str = "gptq") -> Figure:
    """Block x family heatmap of ``error(b) / error(a)`` on held-out rows (log colour scale centred on 1;
    > 1, blue: ``a`` wins). ``h2h``: ``core.studies.methods_table.head_to_head``'s table; ``grid``: which of its
    grids (``w3``, or a llama.cpp type such as ``Q4_K``)."""
    df = h2h[h2h["grid"] == grid].groupby(["block", "family"], as_index=False)["ratio"].median()
    fams = _family_sort(df["family"].unique().tolist())
    lo, hi = float(df["ratio"].min()), float(df["ratio"].max())
    span = max(abs(np.log(max(lo, 1e-6))), abs(np.log(max(hi, 1e-6))), np.log(1.05))
    dom = [float(np.exp(-span)), 1.0, float(np.exp(span))]
    base = alt.Chart(df).encode(x=alt.X("family:N", sort=fams, title="module family", axis=alt.Axis(labelAngle=0)),
                                y=alt.Y("block:O", title=AX["block"]))
    chart = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("ratio:Q", title=f"{b} / {a}", scale=alt.Scale(type="log", scheme="redblue", domain=dom),
                        legend=alt.Legend(format=".2f")),
        tooltip=["block:O", "family:N", alt.Tooltip("ratio:Q", format=".3f")],
    ).properties(width=min(WIDTH, 72 * len(fams)), height=max(120, min(520, 24 * int(df["block"].nunique()))),
                 title=_title(f"Where does {a.upper()} beat {b.upper()}? {grid}",
                              f"held-out error of {b} / error of {a}; > 1 (blue): {a} wins"))
    return Figure(f"{a}_vs_{b}_{grid}", chart, df, metrics.DEFINITIONS["rel_error"])
