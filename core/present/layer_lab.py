"""Layer Lab: one linear, live — the alpha curve (with clipping on request), importance, scales, weight
histograms, and every method side by side on that layer."""
from __future__ import annotations

from typing import TYPE_CHECKING

import altair as alt
import numpy as np
import pandas as pd
import torch

from ..grids import metrics
from ..grids.spec import QuantSpec
from ..methods import awq_search as awq
from ..studies.sweep import layer_group_size
from .common import (ACCENT, AX, HEIGHT, INT, MUTED, PALETTE, WIDTH, Figure, _rank_points, _title, grid_label,
                     salient_count)

if TYPE_CHECKING:
    from ..analysis import Analysis, LayerEval


# --- views --------------------------------------------------------------------------------------------

def alpha_curve(ev: "LayerEval") -> pd.DataFrame:
    """The scale search of one layer: relative output error (and the official MSE ``loss``) per alpha.

    Computed as ``ev`` was: same bits, group size, zero point and duo scaling, without clipping
    (official AWQ chooses alpha first, then clips). Alpha 0 is plain RTN only without duo scaling.
    """
    return pd.DataFrame({"alpha": ev.search.alphas.numpy(), "loss": ev.search.losses.numpy(),
                         "rel_error": ev.rel_curve.double().numpy()})


def clipped_alpha_curve(analysis: "Analysis", name: str, *, bits: int, group_size: int, zero_point: bool = True,
                        duo_scaling: bool = False, n_grid: int = 20, format: str | None = None,
                        progress=None) -> pd.DataFrame:
    """Relative output error vs alpha with AWQ's clip search after scaling, at every alpha of the grid.

    Each point is what ``Analysis.evaluate_layer(..., clip=True, clip_qk=True)`` computes at that alpha
    (scales, per-(row, group) clip search on the scaled weights, ``Q(clip(W s)) / s``), on the calibration
    sample. One clip search per alpha, so it takes seconds: the Layer Lab computes it on request.
    ``format``: a llama.cpp type instead of the integer grid (as ``evaluate_layer``'s).
    Columns: alpha, rel_error, rel_error_heldout.
    """
    in_f = int(analysis.info(name)["in_features"])
    if format:
        spec = QuantSpec.of_type(format)
    else:
        spec = QuantSpec(bits, layer_group_size(in_f, group_size) if group_size > 0 else in_f, zero_point)
    g = spec.group(in_f)
    w, x = analysis.weight(name), analysis.inputs(name)
    alphas = awq.alpha_grid(n_grid).tolist()
    rel, rel_h = [], []
    for i, alpha in enumerate(alphas):
        s = analysis.scales_at(name, alpha, group_size=g, duo_scaling=duo_scaling)
        ws = w * s.view(1, -1)
        max_val = awq.search_clip(ws, x / s.view(1, -1), spec)
        w_hat = awq.scaled_fake_quant(awq.apply_clip(ws, max_val) / s.view(1, -1), s, spec.bits, spec.group_size,
                                      spec.zero_point, format=spec.format)
        rel.append(analysis.layer_error(name, w_hat))
        rel_h.append(analysis.layer_error(name, w_hat, "heldout"))
        if progress is not None:
            progress((i + 1) / len(alphas), f"alpha {alpha:.2f}")
    return pd.DataFrame({"alpha": alphas, "rel_error": rel, "rel_error_heldout": rel_h})


def first_min(values) -> int:
    """Index of the first minimum (strict ``<``: ties keep the smaller alpha, as the scale search does)."""
    return awq.first_min_index(torch.tensor(np.array(values, dtype=np.float64)))


def sorted_importance(ev: "LayerEval", max_rows: int = 2000) -> pd.DataFrame:
    """Channel importance sorted descending; the top 1% flagged salient. Long tails are thinned."""
    imp = ev.importance.double().numpy()
    order = np.argsort(imp)[::-1]
    k = salient_count(imp.size)
    df = pd.DataFrame({"rank": np.arange(1, imp.size + 1), "channel": order, "importance": imp[order],
                       "salient": np.arange(imp.size) < k})
    if len(df) > max_rows:  # keep every salient rank, then a log-uniform sample of the tail
        keep = np.union1d(np.arange(k), _rank_points(imp.size, max_rows - k) - 1)
        df = df.iloc[keep].reset_index(drop=True)
    return df


def scale_vector(ev: "LayerEval") -> pd.DataFrame:
    """The AWQ scale ``s_j`` of each input channel at the evaluated alpha, salient channels flagged."""
    imp = ev.importance.double().numpy()
    k = salient_count(imp.size)
    salient = np.zeros(imp.size, dtype=bool)
    salient[np.argsort(imp)[::-1][:k]] = True
    return pd.DataFrame({"channel": np.arange(imp.size), "scale": ev.scales.double().numpy(), "salient": salient})


def weight_histograms(ev: "LayerEval", bins: int = 80, salient_only: bool = False) -> pd.DataFrame:
    """Histograms of the weights before quantization, after RTN and after AWQ, on shared bins.

    ``salient_only``: only the columns of the salient input channels (where AWQ's scaling acts).
    """
    w, wr, wa = ev.weight, ev.w_rtn, ev.w_awq
    if salient_only:
        cols = torch.topk(ev.importance, salient_count(ev.importance.numel())).indices
        w, wr, wa = w[:, cols], wr[:, cols], wa[:, cols]
    lo = float(torch.minimum(w.min(), torch.minimum(wr.min(), wa.min())))
    hi = float(torch.maximum(w.max(), torch.maximum(wr.max(), wa.max())))
    if not hi > lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    frames = []
    for label, t in (("original", w), ("RTN", wr), ("AWQ", wa)):
        counts, _ = np.histogram(t.double().numpy().ravel(), bins=edges)
        frames.append(pd.DataFrame({"version": label, "bin_start": edges[:-1], "bin_end": edges[1:],
                                    "count": counts}))
    return pd.concat(frames, ignore_index=True)


# --- figures ------------------------------------------------------------------------------------------

CURVE_PLAIN, CURVE_CLIP = "scale search (no clipping)", "with clipping at each alpha"


def loss_curve(ev: "LayerEval", clipped: pd.DataFrame | None = None) -> Figure:
    """Relative output error vs alpha for exactly ``ev``'s setting, the current alpha and the best one.

    The curve is the scale search at ``ev``'s bits, group size, zero point and duo scaling. With clipping on,
    official AWQ picks alpha on this unclipped curve and clips afterwards, and the chart says so; given
    ``clipped`` (``clipped_alpha_curve``), it also draws the curve with clipping at every alpha and
    marks that curve's best alpha.
    """
    df = alpha_curve(ev)
    with_clip = ev.clipped and clipped is not None
    if with_clip:
        df = df.assign(rel_error_clipped=clipped["rel_error"].to_numpy())
    long = pd.concat([pd.DataFrame({"alpha": df["alpha"], "curve": CURVE_PLAIN, "rel_error": df["rel_error"]})]
                     + ([pd.DataFrame({"alpha": df["alpha"], "curve": CURVE_CLIP, "rel_error": df["rel_error_clipped"]})]
                        if with_clip else []), ignore_index=True)
    curves = [CURVE_PLAIN, CURVE_CLIP] if with_clip else [CURVE_PLAIN]
    line = alt.Chart(long).mark_line(point=alt.OverlayMarkDef(size=30, color=PALETTE[0]), color=PALETTE[0]).encode(
        x=alt.X("alpha:Q", title=AX["alpha"], scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("rel_error:Q", title=AX["rel_error"], scale=alt.Scale(zero=False)),
        strokeDash=alt.StrokeDash("curve:N", title=None, scale=alt.Scale(domain=curves, range=[[1, 0], [6, 3]][:len(curves)]),
                                  legend=alt.Legend(orient="bottom", symbolType="stroke", symbolStrokeWidth=2.5,
                                                    symbolSize=500) if with_clip else None),
        detail="curve:N",
        tooltip=["curve:N", alt.Tooltip("alpha:Q", format=".3f"), alt.Tooltip("rel_error:Q", format=".4g")],
    )
    if with_clip:
        bi = first_min(df["rel_error_clipped"])
        best = (float(df["alpha"].iloc[bi]), float(df["rel_error_clipped"].iloc[bi]))
    else:
        best = (ev.best_alpha, float(df["rel_error"].iloc[ev.search.best_index]))
    labels = ["current α" + (" after clipping" if ev.clipped else ""),
              "best α" + (" with clipping" if with_clip else " of the search")]
    marks = pd.DataFrame({"alpha": [ev.alpha, best[0]], "rel_error": [ev.awq_rel, best[1]], "mark": labels})
    pts = alt.Chart(marks).mark_point(size=170, filled=True, opacity=1).encode(
        x="alpha:Q", y="rel_error:Q",
        color=alt.Color("mark:N", title=None, scale=alt.Scale(domain=labels, range=[ACCENT, "#009E73"])),
        shape=alt.Shape("mark:N", title=None, scale=alt.Scale(domain=labels, range=["circle", "diamond"])),
        tooltip=["mark:N", alt.Tooltip("alpha:Q", format=".3f"), alt.Tooltip("rel_error:Q", format=".4g")],
    )
    rule = alt.Chart(pd.DataFrame({"alpha": [ev.alpha]})).mark_rule(color=ACCENT, strokeWidth=1.5).encode(x="alpha:Q")
    rtn = alt.Chart(pd.DataFrame({"rtn": [ev.rtn_rel]})).mark_rule(color=MUTED, strokeDash=[5, 4]).encode(y="rtn:Q")
    grid = grid_label(ev.spec, int(ev.weight.shape[1]))
    notes = [ev.name, "dashed: RTN"]
    if ev.duo_scaling:
        notes.append("duo scaling: s = mean|x|^α / w_mean^(1−α), so alpha 0 is not RTN")
    else:
        notes[1] = "dashed: RTN (= alpha 0)"
    if ev.clipped and not with_clip:
        notes.append("curve without clipping (official AWQ picks alpha, then clips); ● = current alpha after clipping")
    elif ev.clip and not ev.clipped:
        notes.append("clipping skipped for this Q/K layer")
    chart = (line + rtn + rule + pts).properties(
        width=WIDTH, height=HEIGHT,
        title=_title(f"Output error vs alpha, {grid}" + (" + clip" if ev.clipped else ""), "; ".join(notes)))
    return Figure("rel_error_vs_alpha", chart, df, metrics.DEFINITIONS["rel_error"],
                  meta={"best_alpha": best[0], "curve": "clipped" if with_clip else "unclipped"})


def importance_bars(ev: "LayerEval") -> Figure:
    df = sorted_importance(ev)
    k = int(df["salient"].sum())
    df["kind"] = np.where(df["salient"], f"salient (top 1%, {k})", "other")
    chart = alt.Chart(df).mark_bar(width=2).encode(
        x=alt.X("rank:Q", title="channel rank by importance (log scale)",
                scale=alt.Scale(type="log", domain=[1, int(df["rank"].max())]),
                axis=alt.Axis(labelOverlap="greedy", **INT)),
        y=alt.Y("importance:Q", title="importance mean|W_j|·mean|x_j|"),
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=[f"salient (top 1%, {k})", "other"],
                                                                 range=[ACCENT, MUTED])),
        tooltip=["rank:Q", "channel:Q", alt.Tooltip("importance:Q", format=".4g"), "salient:N"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Sorted channel importance", "I_j = mean_i |W_ij| * mean|x_j|"))
    return Figure("channel_importance", chart, df.drop(columns="kind"), metrics.DEFINITIONS["importance"])


def scale_plot(ev: "LayerEval") -> Figure:
    df = scale_vector(ev)
    df["kind"] = np.where(df["salient"], "salient", "other")
    base = alt.Chart(df).encode(
        x=alt.X("channel:Q", title=AX["channel"], scale=alt.Scale(domain=[0, len(df)], nice=False), axis=alt.Axis(**INT)),
        y=alt.Y("scale:Q", title="scale s_j (×, log scale)", scale=alt.Scale(type="log")),
        tooltip=["channel:Q", alt.Tooltip("scale:Q", format=".4g"), "salient:N"],
    )
    dots = base.mark_circle(size=14, opacity=0.7).encode(
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=["salient", "other"], range=[ACCENT, MUTED])),
        size=alt.Size("kind:N", scale=alt.Scale(domain=["salient", "other"], range=[70, 12]), legend=None),
    )
    one = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="#333", strokeDash=[4, 3]).encode(y="y:Q")
    formula = "mean|x|^α / w_mean^(1−α)" if ev.duo_scaling else "mean|x|^α"
    chart = (dots + one).properties(width=WIDTH, height=HEIGHT,
                                    title=_title(f"AWQ scales at alpha = {ev.alpha:.2f}",
                                                 f"s = {formula}, normalised by sqrt(max * min)"))
    return Figure("scale_vector", chart, df.drop(columns="kind"), "W is quantized as Q(W * s) / s")


def weight_histogram(ev: "LayerEval", salient_only: bool = False) -> Figure:
    df = weight_histograms(ev, salient_only=salient_only)
    df["center"] = (df["bin_start"] + df["bin_end"]) / 2
    chart = alt.Chart(df).mark_line(interpolate="step", strokeWidth=1.8).encode(
        x=alt.X("center:Q", title="weight value (as stored in W)"),
        y=alt.Y("count:Q", title="weights per bin (sqrt scale)", scale=alt.Scale(type="sqrt"), axis=alt.Axis(tickCount=5)),
        color=alt.Color("version:N", title=None, sort=["original", "RTN", "AWQ"],
                        scale=alt.Scale(domain=["original", "RTN", "AWQ"], range=["#222222", MUTED, PALETTE[0]])),
        tooltip=["version:N", alt.Tooltip("bin_start:Q", format=".4g"), alt.Tooltip("bin_end:Q", format=".4g"),
                 "count:Q"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Weights before and after quantization",
                              "salient input channels only" if salient_only else "all weights of the layer"))
    return Figure("weight_histograms" + ("_salient" if salient_only else ""), chart, df.drop(columns="center"))


def layer_figures(ev: "LayerEval", clipped: pd.DataFrame | None = None) -> list[Figure]:
    return [loss_curve(ev, clipped), importance_bars(ev), scale_plot(ev), weight_histogram(ev)]


# --- methods side by side (the Layer Lab's methods section) -------------------------------------------

def methods_bars(df: pd.DataFrame, *, name: str, grid: str) -> Figure:
    """One layer, every method: relative output error on calibration and held-out rows (log x, lower is better).

    ``df``: ``core.studies.methods_table.compare``'s table (method, label, rel_error, rel_error_heldout, ...);
    ``grid``: the grid's label (``common.grid_label``: ``w4 g64``, ``Q4_K → Q5_0``)."""
    long = df.melt(id_vars=["method", "label"], value_vars=["rel_error", "rel_error_heldout"], var_name="split",
                   value_name="error").replace({"split": {"rel_error": "calibration", "rel_error_heldout": "held-out"}})
    long = long[long["error"] > 0]
    order = df.sort_values("rel_error_heldout")["label"].tolist()
    chart = alt.Chart(long).mark_bar().encode(
        y=alt.Y("label:N", sort=order, title="method"),
        yOffset=alt.YOffset("split:N", sort=["calibration", "held-out"]),
        x=alt.X("error:Q", title=AX["rel_error"] + " (log scale)", scale=alt.Scale(type="log"), stack=None),
        color=alt.Color("split:N", title=None, sort=["calibration", "held-out"]),
        tooltip=["label:N", "split:N", alt.Tooltip("error:Q", format=".4g")],
    ).properties(width=WIDTH, height=max(200, 34 * len(order)),
                 title=_title(f"Methods on {name}, {grid}",
                              "||X (W - W_hat)^T||^2 / ||X W^T||^2; sorted by held-out error"))
    slug = grid.split(" → ")[0].replace(" ", "_")
    return Figure(f"methods_{slug}", chart, df, metrics.DEFINITIONS["rel_error"])
