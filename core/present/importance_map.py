"""Importance map: one module family's channel x block matrix (importance or an input statistic) and its heatmap.

The 3D view of the same matrix is in ``surface``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import altair as alt
import numpy as np
import pandas as pd

from ..grids import metrics
from .common import (AX, INT, MAX_CHART_ROWS, WIDE, Figure, _title, families_present, log_applicable,
                     salient_count)

if TYPE_CHECKING:
    from ..analysis import Analysis


# --- views --------------------------------------------------------------------------------------------

CHANNEL_VALUES = {
    "importance": "importance",
    "mean_abs": "mean |x| (activation scale)",
    "max_abs": "max |x|",
    "kurtosis": "excess kurtosis",
}


def channel_matrix(analysis: "Analysis", family: str, value: str = "importance") -> tuple[np.ndarray, list[str]]:
    """``[blocks, channels]`` of ``value`` for the linears of one family, in block order, and their names.

    ``value``: ``importance`` (per linear) or a per-channel input statistic (``mean_abs``, ``max_abs``,
    ``kurtosis``). Linears of a family of different widths (rare) are cut to the narrowest.
    """
    lin = analysis.linears[analysis.linears["family"] == family].sort_values("block")
    if lin.empty:
        raise ValueError(f"no linears of family {family!r}")
    names = lin["name"].tolist()
    vecs = []
    if value == "importance":
        imp = analysis.importance
        for n in names:
            vecs.append(imp[imp["name"] == n].sort_values("channel")["importance"].to_numpy(np.float64))
    elif value in ("mean_abs", "max_abs", "kurtosis"):
        ch = analysis.channels
        for key in lin["input_key"]:
            vecs.append(ch[ch["input_key"] == key].sort_values("channel")[value].to_numpy(np.float64))
    else:
        raise ValueError(f"unknown channel value {value!r}; pick one of {', '.join(CHANNEL_VALUES)}")
    width = min(v.size for v in vecs)
    return np.stack([v[:width] for v in vecs]), names


def matrix_long(mat: np.ndarray, max_rows: int = MAX_CHART_ROWS) -> pd.DataFrame:
    """A ``[blocks, channels]`` matrix as long rows for a heatmap, channels binned so rows <= ``max_rows``.

    Bins keep the maximum (an outlier channel must stay visible after aggregation) and say which
    channel range each covers.
    """
    n_blocks, n_ch = mat.shape
    per_bin = max(1, math.ceil(n_ch / max(1, max_rows // max(1, n_blocks))))  # whole channels per bin
    edges = np.append(np.arange(0, n_ch, per_bin), n_ch)
    n_bins = len(edges) - 1
    frames = []
    for b in range(n_blocks):
        row = mat[b]
        vmax = np.array([row[edges[i]:edges[i + 1]].max() for i in range(n_bins)])
        argm = np.array([edges[i] + int(np.argmax(row[edges[i]:edges[i + 1]])) for i in range(n_bins)])
        frames.append(pd.DataFrame({"block": b, "channel_start": edges[:-1], "channel_end": edges[1:] - 1,
                                    "value": vmax, "max_channel": argm}))
    return pd.concat(frames, ignore_index=True)


def top_channels(mat: np.ndarray, k: int = 10) -> pd.DataFrame:
    """The channels with the largest value summed over blocks, and in how many blocks each is top-1%."""
    n_blocks, n_ch = mat.shape
    kk = salient_count(n_ch)
    top_sets = [set(np.argsort(mat[b])[::-1][:kk].tolist()) for b in range(n_blocks)]
    total = mat.sum(0)
    idx = np.argsort(total)[::-1][:k]
    return pd.DataFrame({"channel": idx, "sum_over_blocks": total[idx],
                         "blocks_in_top1pct": [sum(i in s for s in top_sets) for i in idx]})


def most_recurrent_family(analysis: "Analysis", value: str = "importance") -> str:
    """The family whose top channel is in the top 1% of the most blocks (ties: larger top-1% share).

    That is where the importance map shows ridges running through the network, so it opens there.
    """
    best, best_key = "", (-1, -1.0)
    for fam in families_present(analysis.linears):
        mat, _ = channel_matrix(analysis, fam, value)
        top = top_channels(mat, k=1)
        share = float(analysis.layers.loc[analysis.layers["family"] == fam, "top1_share"].mean())
        key = (int(top["blocks_in_top1pct"].iloc[0]), share)
        if key > best_key:
            best, best_key = fam, key
    return best


# --- figures ------------------------------------------------------------------------------------------

def importance_heatmap(analysis: "Analysis", family: str, value: str = "importance", log: bool = False) -> Figure:
    """Channel x block heatmap; ``log`` only where every value is positive (else linear, ``meta['log']`` False)."""
    mat, names = channel_matrix(analysis, family, value)
    df = matrix_long(mat)
    binned = int(df["channel_end"].iloc[0] - df["channel_start"].iloc[0]) > 0
    label = CHANNEL_VALUES[value]
    use_log = log and log_applicable(mat)
    chart = alt.Chart(df).mark_rect().encode(
        x=alt.X("channel_start:Q", title=AX["channel"], scale=alt.Scale(domain=[0, mat.shape[1]], nice=False),
                axis=alt.Axis(**INT)),
        x2="channel_end_excl:Q",
        y=alt.Y("block:O", title=AX["block"]),
        color=alt.Color("value:Q", title=label.split(" (")[0] + (" (log scale)" if use_log else ""),
                        scale=alt.Scale(scheme="viridis", type="log" if use_log else "linear"),
                        legend=alt.Legend(type="gradient", format=".3~g")),
        tooltip=["block:O", "channel_start:Q", "channel_end:Q", "max_channel:Q", alt.Tooltip("value:Q", format=".4g")],
    ).transform_calculate(channel_end_excl="datum.channel_end + 1").properties(
        width=WIDE, height=max(120, min(480, 22 * mat.shape[0])),
        title=_title(f"{label}: channel x block, family {family}",
                     ("max over each channel bin; " if binned else "") + f"{mat.shape[1]} channels, {mat.shape[0]} blocks",
                     WIDE),
    )
    return Figure(f"importance_map_{family}_{value}", chart, df, metrics.DEFINITIONS.get(value, label),
                  meta={"matrix": mat, "names": names, "log": use_log})
