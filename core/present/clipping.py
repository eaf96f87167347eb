"""Clipping: AWQ's weight-clip search on one layer (error vs shrink, the chosen shrinks), the Q/K skip list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import altair as alt
import numpy as np
import pandas as pd

from ..grids.spec import QuantSpec
from ..methods import awq_search as awq
from ..studies.sweep import layer_group_size
from .common import HEIGHT, PALETTE, WIDTH, Figure, _title

if TYPE_CHECKING:
    from ..analysis import Analysis


# --- views --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipStudy:
    """AWQ's clip search on one layer, with its scales applied (as official AWQ clips after scaling)."""

    name: str
    skipped_by_default: bool
    shrink_curve: pd.DataFrame  # shrink, error (summed over rows and groups), rel_to_noclip
    chosen: pd.DataFrame  # shrink, count: how many (row, group) pairs chose each shrink
    per_group: pd.DataFrame  # group, mean_shrink, share_clipped
    n_rows: int
    n_groups: int


def clip_study(analysis: "Analysis", name: str, *, bits: int, group_size: int, alpha: float,
               zero_point: bool = True, duo_scaling: bool = False, n_grid: int = 20,
               max_shrink: float = 0.5) -> ClipStudy:
    """Error vs shrink ratio and the chosen shrink per (row, group), from ``awq.clip_errors``."""
    info = analysis.info(name)
    g = layer_group_size(int(info["in_features"]), group_size) if group_size > 0 else int(info["in_features"])
    s = analysis.scales_at(name, alpha, group_size=g, duo_scaling=duo_scaling)
    w = analysis.weight(name) * s.view(1, -1)
    x = analysis.inputs(name) / s.view(1, -1)
    errs, _ = awq.clip_errors(w, x, QuantSpec(bits, g, zero_point), awq.ClipSearch(n_grid=n_grid, max_shrink=max_shrink))
    # candidate i clips at org_max * (1 - i / n_grid) (see awq.clip_errors): shrink i / n_grid, 0 = no clipping
    shrink = np.arange(errs.shape[0]) / n_grid
    total = errs.sum(dim=(1, 2)).numpy()
    curve = pd.DataFrame({"shrink": shrink, "error": total,
                          "rel_to_noclip": total / total[0] if total[0] > 0 else np.nan})
    idx = awq.best_clip_index(errs).numpy()  # [out, groups]
    picked = shrink[idx]
    vals, counts = np.unique(picked, return_counts=True)
    chosen = pd.DataFrame({"shrink": shrink, "count": 0})
    chosen.loc[np.searchsorted(shrink, vals), "count"] = counts
    per_group = pd.DataFrame({"group": np.arange(idx.shape[1]), "mean_shrink": picked.mean(0),
                              "share_clipped": (picked > 0).mean(0)})
    return ClipStudy(name=name, skipped_by_default=awq.is_clip_skipped(name), shrink_curve=curve,
                     chosen=chosen, per_group=per_group, n_rows=int(idx.shape[0]), n_groups=int(idx.shape[1]))


def clip_skip_table(linears: pd.DataFrame) -> pd.DataFrame:
    """Every linear and whether AWQ's clip search leaves it alone by default (Q/K projections)."""
    df = linears[["name", "block", "family"]].copy()
    df["clipped_by_default"] = [not awq.is_clip_skipped(n) for n in df["name"]]
    df["matched_pattern"] = [next((p for p in awq.CLIP_SKIP_PATTERNS if p in n), "") for n in df["name"]]
    return df


def qk_clip_effect(analysis: "Analysis", bits: int, progress=None) -> pd.DataFrame:
    """For every linear on the Q/K skip list: its AWQ error at its best alpha without and with clipping.

    The layer's own output error only: the attention scores QK^T, where Q and K errors multiply, are
    not measured here.
    """
    rows = []
    qk = [n for n in analysis.names if awq.is_clip_skipped(n)]
    group = analysis.settings.sweep.group_size
    for i, name in enumerate(qk):
        lay = analysis.layers[(analysis.layers["name"] == name) & (analysis.layers["bits"] == bits)]
        alpha = float(lay["best_alpha"].iloc[0]) if len(lay) else 0.5
        g = layer_group_size(int(analysis.info(name)["in_features"]), group) if group > 0 else 0
        plain = analysis.evaluate_layer(name, alpha=alpha, bits=bits, group_size=g)
        clipped = analysis.evaluate_layer(name, alpha=alpha, bits=bits, group_size=g, clip=True, clip_qk=True)
        rows.append({"name": name, "alpha": alpha, "awq_rel": plain.awq_rel, "awq_clip_rel": clipped.awq_rel,
                     "change_pct": (clipped.awq_rel / plain.awq_rel - 1) * 100 if plain.awq_rel > 0 else float("nan"),
                     "awq_rel_heldout": plain.awq_rel_heldout, "awq_clip_rel_heldout": clipped.awq_rel_heldout})
        if progress is not None:
            progress((i + 1) / len(qk), name)
    return pd.DataFrame(rows)


# --- figures ------------------------------------------------------------------------------------------

def clip_curve(study: "ClipStudy") -> Figure:
    df = study.shrink_curve
    best = df.loc[df["error"].idxmin()]
    line = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("shrink:Q", title="shrink ratio (fraction of max|W| cut; 0 = none)"),
        y=alt.Y("rel_to_noclip:Q", title="clip-search error / unclipped (×)", scale=alt.Scale(zero=False)),
        tooltip=[alt.Tooltip("shrink:Q", format=".2f"), alt.Tooltip("rel_to_noclip:Q", format=".4f")],
    )
    pt = alt.Chart(pd.DataFrame([best])).mark_point(size=180, shape="diamond", filled=True, color="#009E73").encode(
        x="shrink:Q", y="rel_to_noclip:Q")
    chart = (line + pt).properties(
        width=WIDTH, height=HEIGHT,
        title=_title("Clip search: error vs shrink, one shrink for the whole layer",
                     f"{study.name}; each (row, group) picks its own shrink (next chart)"))
    return Figure("clip_error_vs_shrink", chart, df)


def clip_choices(study: "ClipStudy") -> Figure:
    df = study.chosen
    chart = alt.Chart(df).mark_bar(color=PALETTE[0]).encode(
        x=alt.X("shrink:O", title="chosen shrink ratio (fraction of max|W|)", axis=alt.Axis(format=".2f", labelAngle=0)),
        y=alt.Y("count:Q", title="(row, group) pairs (count)", axis=alt.Axis(format="d", tickMinStep=1)),
        tooltip=[alt.Tooltip("shrink:Q", format=".2f"), "count:Q"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Chosen shrink per (row, group)", f"{study.n_rows} rows x {study.n_groups} groups"))
    return Figure("clip_chosen_shrink", chart, df)


def clip_per_group(study: "ClipStudy") -> Figure:
    df = study.per_group
    chart = alt.Chart(df).mark_bar(color=PALETTE[1]).encode(
        x=alt.X("group:O", title="input group (index)", axis=alt.Axis(labelAngle=0, labelOverlap=True)),
        y=alt.Y("mean_shrink:Q", title="mean chosen shrink (fraction of max|W|)"),
        tooltip=["group:O", alt.Tooltip("mean_shrink:Q", format=".3f"), alt.Tooltip("share_clipped:Q", format=".1%")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title("Mean chosen shrink per input group"))
    return Figure("clip_shrink_per_group", chart, df)
