"""How AWQ works: a first-visit walk through one layer of the current model, in figures of its own numbers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import pandas as pd
import torch

from ..grids import metrics
from ..studies.sweep import layer_group_size
from .common import (ACCENT, AX, HEIGHT, INT, MUTED, PALETTE, WIDE, WIDTH, Figure, _rank_points, _title,
                     best_layer, bits_available, default_bits, headline, salient_count)

if TYPE_CHECKING:
    from ..analysis import Analysis, LayerEval


# --- views --------------------------------------------------------------------------------------------

def weight_group(ev: "LayerEval") -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One quantization group of ``ev``'s weight, before and after round-to-nearest, and its levels.

    The group is the one holding the most important input channel, in the output row where that channel's
    weight is largest. Returns ``(points, levels, info)``: points per input channel of the group (channel,
    weight, rtn, salient), the ``2^bits`` dequantized levels the group can take, and {row, group, bits}.
    """
    from ..grids.quant import choose_qparams, dequantize

    w = ev.weight
    g = int(ev.group_size)
    top = int(torch.argmax(ev.importance))
    row = int(torch.argmax(w[:, top].abs()))
    start = (top // g) * g
    wg = w[row, start:start + g].reshape(1, -1)
    qp = choose_qparams(wg, ev.bits, ev.zero_point)
    levels = dequantize(torch.arange(qp.min_int, qp.max_int + 1, dtype=torch.float32).view(1, -1), qp).view(-1)
    imp = ev.importance.double().numpy()
    k = salient_count(imp.size)
    salient = np.zeros(imp.size, dtype=bool)
    salient[np.argsort(imp)[::-1][:k]] = True
    chans = np.arange(start, start + g)
    points = pd.DataFrame({"channel": chans, "weight": wg.view(-1).double().numpy(),
                           "rtn": ev.w_rtn[row, start:start + g].double().numpy(), "salient": salient[chans]})
    return points, pd.DataFrame({"level": levels.double().numpy()}), {"row": row, "group": start // g,
                                                                       "bits": ev.bits, "top_channel": top}


def activation_outliers(analysis: "Analysis", name: str) -> pd.DataFrame:
    """mean|x_j| of every input channel of ``name`` with the salient (top-1% importance) channels flagged."""
    xm = analysis.x_mean(name).double().numpy()
    imp = analysis.importance[analysis.importance["name"] == name].sort_values("channel")["importance"].to_numpy()
    k = salient_count(xm.size)
    salient = np.zeros(xm.size, dtype=bool)
    salient[np.argsort(imp)[::-1][:k]] = True
    return pd.DataFrame({"channel": np.arange(xm.size), "mean_abs": xm, "salient": salient})


def scales_by_alpha(analysis: "Analysis", name: str, alphas: list[float], group_size: int) -> pd.DataFrame:
    """AWQ's scale ``s_j`` for a few alphas, channels ordered by mean|x_j| (largest first): alpha, rank, channel, scale."""
    xm = analysis.x_mean(name).double().numpy()
    order = np.argsort(xm)[::-1]
    ranks = _rank_points(xm.size, 200)
    frames = []
    for alpha in alphas:
        s = analysis.scales_at(name, float(alpha), group_size=group_size).double().numpy()[order]
        frames.append(pd.DataFrame({"alpha": float(alpha), "rank": ranks, "channel": order[ranks - 1],
                                    "scale": s[ranks - 1]}))
    return pd.concat(frames, ignore_index=True)


def channel_errors(ev: "LayerEval", n_bins: int = 24) -> pd.DataFrame:
    """Per input channel, the weight error times the channel's activation scale, for RTN and for AWQ.

    ``e_j = mean_i |W_ij - Ŵ_ij| * mean|x_j|`` (how much the error of column j can move the output), with
    channels ranked by importance and averaged in log-spaced rank bins: rank_start, rank_end, method, error.
    """
    x_mean = (ev.importance / ev.weight.abs().mean(0).clamp(min=1e-30)).double()  # I_j / mean|W_j| = mean|x_j|
    order = torch.argsort(ev.importance, descending=True)
    n = order.numel()
    edges = np.unique(np.round(np.geomspace(1, n + 1, n_bins + 1)).astype(int))
    frames = []
    for method, w_hat in (("RTN: Q(W)", ev.w_rtn), ("AWQ: Q(W·s)/s", ev.w_awq)):
        e = ((ev.weight - w_hat).abs().mean(0).double() * x_mean)[order].numpy()
        rows = [{"rank_start": int(a), "rank_end": int(b) - 1, "method": method, "error": float(e[a - 1:b - 1].mean())}
                for a, b in zip(edges[:-1], edges[1:]) if b > a]
        frames.append(pd.DataFrame(rows))
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class IntroWalk:
    """What the "How AWQ works" page shows for one model: its layer, that layer's evaluation, the numbers."""

    name: str
    bits: int
    group_size: int
    alpha: float
    ev: "LayerEval"
    numbers: dict[str, Any]


def intro_walk(analysis: "Analysis", bits: int | None = None) -> IntroWalk:
    """The walk's layer (where AWQ helps most at ``bits``), evaluated at its best alpha, and the numbers quoted.

    Numbers: the layer's activation outlier ratio (max / median mean|x|), its top-1% importance share, RTN
    and AWQ errors and gains, and the network-wide median gain and share of layers helped (held-out).
    """
    bits = int(bits) if bits in bits_available(analysis) else default_bits(analysis)
    name = best_layer(analysis, bits)
    info = analysis.info(name)
    g = layer_group_size(int(info["in_features"]), analysis.settings.sweep.group_size) \
        if analysis.settings.sweep.group_size > 0 else 0
    lay = analysis.layers[(analysis.layers["name"] == name) & (analysis.layers["bits"] == bits)]
    alpha = float(lay["best_alpha"].iloc[0]) if len(lay) else 0.5
    ev = analysis.evaluate_layer(name, alpha=alpha, bits=bits, group_size=g,
                                 zero_point=bool(analysis.settings.sweep.zero_point), n_grid=analysis.settings.sweep.n_grid)
    xm = analysis.x_mean(name).double()
    h = headline(analysis, bits)
    numbers = {
        "outlier_ratio": float(xm.max() / xm.median().clamp(min=1e-12)),
        "top1_share": metrics.top1_share(ev.importance),
        "n_salient": salient_count(int(info["in_features"])),
        "in_features": int(info["in_features"]), "out_features": int(info["out_features"]),
        "rtn_rel": ev.rtn_rel, "awq_rel": ev.awq_rel, "gain": ev.gain, "gain_heldout": ev.gain_heldout,
        "median_gain": h["median_gain"], "median_gain_heldout": h["median_gain_heldout"],
        "share_helped_heldout": h["share_helped_heldout"], "n_helped_heldout": h["n_helped_heldout"],
        "n_linears": h["n_linears"],
    }
    return IntroWalk(name=name, bits=bits, group_size=int(ev.group_size), alpha=alpha, ev=ev, numbers=numbers)


# --- figures ------------------------------------------------------------------------------------------

def intro_weight_group(ev: "LayerEval") -> Figure:
    """Step 1: one group of weights, each rounded to the nearest of the group's 2^bits levels."""
    pts, levels, info = weight_group(ev)
    kinds = ["original W", f"RTN Q(W), w{ev.bits}"]
    long = pd.concat([pts.assign(kind=kinds[0], value=pts["weight"]), pts.assign(kind=kinds[1], value=pts["rtn"])],
                     ignore_index=True)
    lv = alt.Chart(levels).mark_rule(color="#9aa0aa", strokeWidth=1, strokeDash=[3, 3]).encode(y=alt.Y("level:Q"))
    seg = alt.Chart(pts).mark_rule(color=MUTED, strokeWidth=1).encode(x="channel:Q", y="weight:Q", y2="rtn:Q")
    dots = alt.Chart(long).mark_point(filled=True, size=45).encode(
        x=alt.X("channel:Q", title=AX["channel"], scale=alt.Scale(zero=False, nice=False), axis=alt.Axis(**INT)),
        y=alt.Y("value:Q", title="weight value (as stored in W)", axis=alt.Axis(grid=False)),
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=kinds, range=["#222222", PALETTE[0]])),
        shape=alt.Shape("kind:N", title=None, scale=alt.Scale(domain=kinds, range=["circle", "square"])),
        tooltip=["channel:Q", "kind:N", alt.Tooltip("value:Q", format=".4g"), "salient:N"],
    )
    chart = (lv + seg + dots).properties(width=WIDE - 100, height=HEIGHT, title=_title(
        f"Round to nearest: {len(pts)} weights of one group, {len(levels)} levels (w{ev.bits})",
        f"{ev.name}, row {info['row']}, input channels {int(pts['channel'].min())}-{int(pts['channel'].max())}; "
        f"dashed lines: the levels this group can take (its min..max in 2^bits steps); it holds the most "
        f"important input channel, #{info['top_channel']}", WIDE - 100))
    return Figure("how_1_weight_group", chart, pts, "round-to-nearest: each weight becomes the nearest level of its group")


def intro_outliers(analysis: "Analysis", name: str) -> Figure:
    """Step 2: the activation scale of every input channel; a few channels carry far larger inputs."""
    df = activation_outliers(analysis, name)
    df["kind"] = np.where(df["salient"], "salient (top 1% importance)", "other")
    chart = alt.Chart(df).mark_bar(width=1.5).encode(
        x=alt.X("channel:Q", title=AX["channel"], scale=alt.Scale(domain=[0, len(df)], nice=False), axis=alt.Axis(**INT)),
        y=alt.Y("mean_abs:Q", title="mean |x_j| over calibration tokens"),
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=["salient (top 1% importance)", "other"],
                                                              range=[ACCENT, MUTED])),
        tooltip=["channel:Q", alt.Tooltip("mean_abs:Q", format=".4g"), "salient:N"],
    ).properties(width=WIDE - 100, height=HEIGHT, title=_title(
        f"Input activations of {name}: a few channels are outliers",
        f"median mean|x| {float(df['mean_abs'].median()):.3g}, largest {float(df['mean_abs'].max()):.3g}", WIDE - 100))
    return Figure("how_2_outliers", chart, df.drop(columns="kind"), metrics.DEFINITIONS["mean_abs"])


def intro_scales(analysis: "Analysis", name: str, alphas: list[float], group_size: int) -> Figure:
    """Step 3: s = mean|x|^alpha for a few alphas, channels sorted by mean|x|."""
    df = scales_by_alpha(analysis, name, alphas, group_size)
    df["alpha_label"] = df["alpha"].map(lambda a: f"α = {a:.2f}")
    order = list(dict.fromkeys(df["alpha_label"]))
    chart = alt.Chart(df).mark_line().encode(
        x=alt.X("rank:Q", title="channel rank by mean|x| (log scale)",
                scale=alt.Scale(type="log", domain=[1, int(df["rank"].max())], nice=False), axis=alt.Axis(**INT)),
        y=alt.Y("scale:Q", title="scale s_j (×, log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("alpha_label:N", title=None, sort=order),
        tooltip=["alpha_label:N", "rank:Q", "channel:Q", alt.Tooltip("scale:Q", format=".4g")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(
        "s = mean|x|^α: larger alpha, larger scales for the outliers", "normalised by sqrt(max * min); α = 0: all ones"))
    return Figure("how_3_scales", chart, df.drop(columns="alpha_label"), "s_j = mean|x_j|^alpha, normalised")


def intro_channel_errors(ev: "LayerEval") -> Figure:
    """Step 4: per channel, the activation-weighted weight error of Q(W) and of Q(W·s)/s."""
    df = channel_errors(ev)
    df["rank_mid"] = np.sqrt(df["rank_start"] * np.maximum(df["rank_end"], df["rank_start"]))
    chart = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("rank_mid:Q", title="channel rank by importance (log scale)",
                scale=alt.Scale(type="log", domain=[1, int(df["rank_end"].max())], nice=False), axis=alt.Axis(**INT)),
        y=alt.Y("error:Q", title="mean|ΔW_j| · mean|x_j| (log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("method:N", title=None, sort=["RTN: Q(W)", "AWQ: Q(W·s)/s"],
                        scale=alt.Scale(domain=["RTN: Q(W)", "AWQ: Q(W·s)/s"], range=[MUTED, PALETTE[0]])),
        tooltip=["method:N", "rank_start:Q", "rank_end:Q", alt.Tooltip("error:Q", format=".4g")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(
        f"Q(W·s)/s vs Q(W) at alpha {ev.alpha:.2f}: error moves off the important channels",
        f"{ev.name}, w{ev.bits}; output error RTN {ev.rtn_rel:.3g} -> AWQ {ev.awq_rel:.3g}"))
    return Figure("how_4_channel_errors", chart, df.drop(columns="rank_mid"),
                  "e_j = mean_i |W_ij - W_hat_ij| * mean|x_j|, averaged in log-spaced rank bins")
