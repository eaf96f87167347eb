"""Every chart of the app: one registered Altair theme, chart builders, exports, the 3D surface, the figure pack.

A :class:`Figure` is a chart plus the exact table it draws. The app shows ``figure.chart`` with
``theme=None`` (so Streamlit adds no theme of its own) and offers ``png()`` / ``svg()`` / ``pdf()`` /
``csv()``; all of them come from the same Vega-Lite spec, so what is on screen is what is exported.
Charts have a fixed size that fits two side by side on a laptop screen (460 x 260 px, 960 px for wide
ones); the PNG is rendered at scale 4 (1840 px wide: sharp on a 1080p slide), SVG and PDF are vector.
No streamlit import here: the figure pack and the tests use this module headless.
"""
from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import pandas as pd

from . import metrics, views

if TYPE_CHECKING:
    import pyvista as pv

    from .analysis import Analysis, LayerEval

THEME_NAME = "awq_explorer"
FONT = "Liberation Sans, Arial, Helvetica, sans-serif"
WIDTH, HEIGHT = 460, 260  # two per row on a 1440 px wide screen
WIDE = 960  # full-width charts (heatmaps over channels)
PNG_SCALE = 4  # 460 px wide charts -> 1840 px PNG: sharp on a 1080p slide
# Okabe-Ito: distinguishable for colour-blind viewers and on a projector.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
ACCENT = "#D55E00"  # salient channels, current alpha
MUTED = "#8a8f98"
METHOD_COLORS = {"RTN": "#8a8f98", "AWQ": "#0072B2"}


def theme_config() -> dict[str, Any]:
    """The one chart theme (fonts large enough for a talk, white background, light grid)."""
    return {
        # Sizes are the plot area; axes, legends and titles add to them ("pad"), in the browser as in the
        # exports. Streamlit would otherwise set "fit" and squeeze everything into width x height.
        "autosize": {"type": "pad", "contains": "padding"},
        "config": {
            "font": FONT,
            "background": "white",
            "padding": 10,
            "view": {"continuousWidth": WIDTH, "continuousHeight": HEIGHT, "stroke": None},
            "title": {"fontSize": 17, "fontWeight": 600, "anchor": "start", "subtitleFontSize": 13,
                      "subtitleColor": "#4a4f57", "offset": 10},
            "axis": {"labelFontSize": 13, "titleFontSize": 14, "titleFontWeight": 500, "gridColor": "#e9e9ee",
                     "domainColor": "#777", "tickColor": "#777", "labelColor": "#222", "titleColor": "#222"},
            # legends on top: keeps the plot area wide when two charts share a row
            "legend": {"labelFontSize": 13, "titleFontSize": 13, "symbolSize": 120, "orient": "top",
                       "direction": "horizontal", "titleOrient": "left", "gradientLength": 220},
            "mark": {"color": PALETTE[0]},
            "header": {"labelFontSize": 14, "titleFontSize": 14},
            "range": {"category": PALETTE},
            "line": {"strokeWidth": 2.5},
            "point": {"size": 55, "filled": True},
            "text": {"fontSize": 12},
        }
    }


def register_theme() -> None:
    """Register and enable the theme (idempotent; importing this module does it)."""
    if THEME_NAME not in alt.theme.names():
        alt.theme.register(THEME_NAME, enable=False)(theme_config)
    if alt.theme.active != THEME_NAME:
        alt.theme.enable(THEME_NAME)


register_theme()


# --- Figure and exports -----------------------------------------------------------------------------

_VL_LOCK = threading.Lock()


@dataclass
class Figure:
    """A chart plus the table it draws; ``slug`` names the exported files."""

    slug: str
    chart: alt.TopLevelMixin
    data: pd.DataFrame
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """The Vega-Lite spec with the theme's config inlined (what the browser and exports render)."""
        with alt.theme.enable(THEME_NAME):
            return self.chart.to_dict()

    def png(self, scale: float = PNG_SCALE) -> bytes:
        return chart_png(self.spec(), scale=scale)

    def svg(self) -> str:
        return chart_svg(self.spec())

    def pdf(self) -> bytes:
        return chart_pdf(self.spec())

    def csv(self) -> bytes:
        return self.data.to_csv(index=False).encode("utf-8")


def chart_png(spec: dict[str, Any], scale: float = PNG_SCALE) -> bytes:
    import vl_convert as vlc

    with _VL_LOCK:  # one converter at a time: exports come from several sessions' threads
        return vlc.vegalite_to_png(spec, scale=scale)


def chart_svg(spec: dict[str, Any]) -> str:
    import vl_convert as vlc

    with _VL_LOCK:
        return vlc.vegalite_to_svg(spec)


def chart_pdf(spec: dict[str, Any]) -> bytes:
    import vl_convert as vlc

    with _VL_LOCK:
        return vlc.vegalite_to_pdf(spec)


def _family_sort(families: list[str]) -> list[str]:
    order = {f: i for i, f in enumerate(views.FAMILY_ORDER)}
    return sorted(families, key=lambda f: order.get(f, 99))


def _title(text: str, subtitle: str | None = None) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle) if subtitle else alt.TitleParams(text)


# --- Overview -----------------------------------------------------------------------------------------

def gain_heatmap(analysis: "Analysis", bits: int, held_out: bool = False) -> Figure:
    """Block x family heatmap of the AWQ gain (log colour scale centred on 1: blue = AWQ helps)."""
    df = views.gain_matrix(analysis.layers, bits, held_out)
    fams = _family_sort(df["family"].unique().tolist())
    n_blocks = int(df["block"].nunique())
    lo, hi = float(df["gain"].min()), float(df["gain"].max())
    span = max(abs(np.log(max(lo, 1e-6))), abs(np.log(max(hi, 1e-6))), np.log(1.05))
    dom = [float(np.exp(-span)), 1.0, float(np.exp(span))]
    base = alt.Chart(df).encode(
        x=alt.X("family:N", sort=fams, title="module family", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("block:O", title="block"),
    )
    rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("gain:Q", title="gain", scale=alt.Scale(type="log", scheme="redblue", domain=dom),
                        legend=alt.Legend(values=[round(float(v), 2) for v in np.exp(np.linspace(-span, span, 5))],
                                          format=".2f")),
        tooltip=["name:N", "block:O", "family:N", alt.Tooltip("gain:Q", format=".3f")],
    )
    chart = rect
    if len(df) <= 240:  # numbers in the cells; white on the dark ends of the scale
        dark = f"datum.gain > {float(np.exp(0.55 * span)):.6g} || datum.gain < {float(np.exp(-0.55 * span)):.6g}"
        chart = rect + base.mark_text(fontSize=11).encode(
            text=alt.Text("gain:Q", format=".2f"),
            color=alt.condition(dark, alt.value("white"), alt.value("#111111")))
    split = "held-out tokens" if held_out else "calibration tokens (in-sample)"
    chart = chart.properties(
        width=min(WIDTH, 72 * len(fams)), height=max(120, min(520, 24 * n_blocks)),
        title=_title(f"AWQ gain per layer, w{bits}", f"RTN error / AWQ error on {split}; > 1: AWQ helps"),
    )
    return Figure(f"gain_heatmap_w{bits}{'_heldout' if held_out else ''}", chart, df,
                  metrics.DEFINITIONS["gain_heldout" if held_out else "gain"])


def family_gains(analysis: "Analysis", bits: int) -> Figure:
    ft = views.family_table(analysis.layers, bits)
    long = ft.melt(id_vars=["family"], value_vars=["median_gain", "median_gain_heldout"], var_name="split",
                   value_name="gain").replace({"split": {"median_gain": "in-sample", "median_gain_heldout": "held-out"}})
    fams = _family_sort(ft["family"].tolist())
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("family:N", sort=fams, title="module family", axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("split:N", sort=["in-sample", "held-out"]),
        y=alt.Y("gain:Q", title="median AWQ gain (x)", scale=alt.Scale(zero=False)),
        color=alt.Color("split:N", title=None, sort=["in-sample", "held-out"]),
        tooltip=["family:N", "split:N", alt.Tooltip("gain:Q", format=".3f")],
    )
    one = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="#333", strokeDash=[4, 3]).encode(y="y:Q")
    chart = (bars + one).properties(width=WIDTH, height=HEIGHT,
                                    title=_title(f"Median AWQ gain per module family, w{bits}",
                                                 "dashed line: no gain"))
    return Figure(f"family_gains_w{bits}", chart, long, metrics.DEFINITIONS["gain"])


def error_vs_bits(analysis: "Analysis") -> Figure:
    df = views.error_by_bits(analysis.layers)
    chart = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("bits:O", title="bits", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("median_rel_error:Q", title="median relative output error", scale=alt.Scale(type="log")),
        color=alt.Color("method:N", title="method", scale=alt.Scale(domain=list(METHOD_COLORS),
                                                                     range=list(METHOD_COLORS.values()))),
        strokeDash=alt.StrokeDash("split:N", title="scored on", sort=["calibration", "held-out"]),
        tooltip=["bits:O", "method:N", "split:N", alt.Tooltip("median_rel_error:Q", format=".4g"),
                 alt.Tooltip("median_sqnr_db:Q", format=".2f", title="SQNR dB")],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Output error vs bit-width", "median over all linears; log scale"))
    return Figure("error_vs_bits", chart, df, metrics.DEFINITIONS["rel_error"])


def hockey_stick_chart(df: pd.DataFrame, color: str, title: str, subtitle: str,
                       order: list[str] | None = None) -> alt.Chart:
    return alt.Chart(df).mark_line().encode(
        x=alt.X("rank_pct:Q", title="channel rank (% of the layer's channels, log)",
                scale=alt.Scale(type="log", domain=[float(df["rank_pct"].min()) if len(df) else 0.01, 100], nice=False)),
        y=alt.Y("importance_norm:Q", title="importance / layer mean"),
        color=alt.Color(f"{color}:N", title=color if color != "group" else "family", sort=order),
        tooltip=[f"{color}:N", alt.Tooltip("rank_pct:Q", format=".2f"), alt.Tooltip("importance_norm:Q", format=".2f")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(title, subtitle))


def hockey_stick(analysis: "Analysis") -> Figure:
    df = views.hockey_stick(analysis, by="family")
    fams = _family_sort(df["group"].unique().tolist())
    chart = hockey_stick_chart(df, "group", "Sorted channel importance ('hockey stick')",
                               "mean over the blocks of each family", order=fams)
    return Figure("hockey_stick", chart, df, metrics.DEFINITIONS["importance"])


# --- Importance map -----------------------------------------------------------------------------------

def importance_heatmap(analysis: "Analysis", family: str, value: str = "importance", log: bool = False) -> Figure:
    mat, names = views.channel_matrix(analysis, family, value)
    df = views.matrix_long(mat)
    binned = int(df["channel_end"].iloc[0] - df["channel_start"].iloc[0]) > 0
    label = views.CHANNEL_VALUES[value]
    use_log = log and bool((df["value"] > 0).all())
    chart = alt.Chart(df).mark_rect().encode(
        x=alt.X("channel_start:Q", title="input channel", scale=alt.Scale(domain=[0, mat.shape[1]], nice=False)),
        x2="channel_end_excl:Q",
        y=alt.Y("block:O", title="block"),
        color=alt.Color("value:Q", title=label.split(" (")[0],
                        scale=alt.Scale(scheme="viridis", type="log" if use_log else "linear")),
        tooltip=["block:O", "channel_start:Q", "channel_end:Q", "max_channel:Q", alt.Tooltip("value:Q", format=".4g")],
    ).transform_calculate(channel_end_excl="datum.channel_end + 1").properties(
        width=WIDE, height=max(120, min(480, 22 * mat.shape[0])),
        title=_title(f"{label}: channel x block, family {family}",
                     ("max over each channel bin; " if binned else "") + f"{mat.shape[1]} channels, {mat.shape[0]} blocks"),
    )
    return Figure(f"importance_map_{family}_{value}", chart, df, metrics.DEFINITIONS.get(value, label),
                  meta={"matrix": mat, "names": names})


# --- Layer Lab ----------------------------------------------------------------------------------------

def loss_curve(ev: "LayerEval") -> Figure:
    """Relative error vs alpha at these bits / group size; current alpha (rule + point) and best alpha."""
    df = views.alpha_curve(ev)
    line = alt.Chart(df).mark_line(point=alt.OverlayMarkDef(size=30, color=PALETTE[0])).encode(
        x=alt.X("alpha:Q", title="alpha", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("rel_error:Q", title="relative output error", scale=alt.Scale(zero=False)),
        tooltip=[alt.Tooltip("alpha:Q", format=".3f"), alt.Tooltip("rel_error:Q", format=".4g"),
                 alt.Tooltip("loss:Q", format=".4g", title="MSE loss")],
    )
    labels = ["current α" + (" (+clip)" if ev.clipped else ""), "best α on the grid"]
    marks = pd.DataFrame({
        "alpha": [ev.alpha, ev.best_alpha],
        "rel_error": [ev.awq_rel, float(df["rel_error"].iloc[ev.search.best_index])],
        "mark": labels,
    })
    pts = alt.Chart(marks).mark_point(size=170, filled=True, opacity=1).encode(
        x="alpha:Q", y="rel_error:Q",
        color=alt.Color("mark:N", title=None, scale=alt.Scale(domain=labels, range=[ACCENT, "#009E73"])),
        shape=alt.Shape("mark:N", scale=alt.Scale(domain=labels, range=["circle", "diamond"])),
        tooltip=["mark:N", alt.Tooltip("alpha:Q", format=".3f"), alt.Tooltip("rel_error:Q", format=".4g")],
    )
    rule = alt.Chart(pd.DataFrame({"alpha": [ev.alpha]})).mark_rule(color=ACCENT, strokeWidth=1.5).encode(x="alpha:Q")
    rtn = alt.Chart(pd.DataFrame({"rtn": [ev.rtn_rel]})).mark_rule(color=MUTED, strokeDash=[5, 4]).encode(y="rtn:Q")
    g = "per row" if ev.group_size == ev.weight.shape[1] else f"g{ev.group_size}"
    chart = (line + rtn + rule + pts).properties(
        width=WIDTH, height=HEIGHT,
        title=_title(f"Loss vs alpha — w{ev.bits} {g}", f"{ev.name}; dashed: RTN (alpha = 0)"))
    return Figure("loss_vs_alpha", chart, df, metrics.DEFINITIONS["loss"])


def importance_bars(ev: "LayerEval") -> Figure:
    df = views.sorted_importance(ev)
    k = int(df["salient"].sum())
    df["kind"] = np.where(df["salient"], f"salient (top 1%, {k})", "other")
    chart = alt.Chart(df).mark_bar(width=2).encode(
        x=alt.X("rank:Q", title="channel rank (log)", scale=alt.Scale(type="log", domain=[1, int(df["rank"].max())]),
                axis=alt.Axis(labelOverlap="greedy")),
        y=alt.Y("importance:Q", title="importance"),
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=[f"salient (top 1%, {k})", "other"],
                                                                 range=[ACCENT, MUTED])),
        tooltip=["rank:Q", "channel:Q", alt.Tooltip("importance:Q", format=".4g"), "salient:N"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Sorted channel importance", "I_j = mean_i |W_ij| * mean|x_j|"))
    return Figure("channel_importance", chart, df.drop(columns="kind"), metrics.DEFINITIONS["importance"])


def scale_plot(ev: "LayerEval") -> Figure:
    df = views.scale_vector(ev)
    df["kind"] = np.where(df["salient"], "salient", "other")
    base = alt.Chart(df).encode(
        x=alt.X("channel:Q", title="input channel", scale=alt.Scale(domain=[0, len(df)], nice=False)),
        y=alt.Y("scale:Q", title="scale s_j (log)", scale=alt.Scale(type="log")),
        tooltip=["channel:Q", alt.Tooltip("scale:Q", format=".4g"), "salient:N"],
    )
    dots = base.mark_circle(size=14, opacity=0.7).encode(
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=["salient", "other"], range=[ACCENT, MUTED])),
        size=alt.Size("kind:N", scale=alt.Scale(domain=["salient", "other"], range=[70, 12]), legend=None),
    )
    one = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="#333", strokeDash=[4, 3]).encode(y="y:Q")
    chart = (dots + one).properties(width=WIDTH, height=HEIGHT,
                                    title=_title(f"AWQ scales at alpha = {ev.alpha:.2f}",
                                                 "s = mean|x|^alpha, normalised by sqrt(max * min)"))
    return Figure("scale_vector", chart, df.drop(columns="kind"), "W is quantized as Q(W * s) / s")


def weight_histogram(ev: "LayerEval", salient_only: bool = False) -> Figure:
    df = views.weight_histograms(ev, salient_only=salient_only)
    df["center"] = (df["bin_start"] + df["bin_end"]) / 2
    chart = alt.Chart(df).mark_line(interpolate="step", strokeWidth=1.8).encode(
        x=alt.X("center:Q", title="weight value"),
        y=alt.Y("count:Q", title="count (sqrt)", scale=alt.Scale(type="sqrt"), axis=alt.Axis(tickCount=5)),
        color=alt.Color("version:N", title=None, sort=["original", "RTN", "AWQ"],
                        scale=alt.Scale(domain=["original", "RTN", "AWQ"], range=["#222222", MUTED, PALETTE[0]])),
        tooltip=["version:N", alt.Tooltip("bin_start:Q", format=".4g"), alt.Tooltip("bin_end:Q", format=".4g"),
                 "count:Q"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Weights before and after quantization",
                              "salient input channels only" if salient_only else "all weights of the layer"))
    return Figure("weight_histograms" + ("_salient" if salient_only else ""), chart, df.drop(columns="center"))


def layer_figures(ev: "LayerEval") -> list[Figure]:
    return [loss_curve(ev), importance_bars(ev), scale_plot(ev), weight_histogram(ev)]


# --- Clipping -----------------------------------------------------------------------------------------

def clip_curve(study: "views.ClipStudy") -> Figure:
    df = study.shrink_curve
    best = df.loc[df["error"].idxmin()]
    line = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("shrink:Q", title="shrink ratio (0 = no clipping)"),
        y=alt.Y("rel_to_noclip:Q", title="clip-search error / unclipped", scale=alt.Scale(zero=False)),
        tooltip=[alt.Tooltip("shrink:Q", format=".2f"), alt.Tooltip("rel_to_noclip:Q", format=".4f")],
    )
    pt = alt.Chart(pd.DataFrame([best])).mark_point(size=180, shape="diamond", filled=True, color="#009E73").encode(
        x="shrink:Q", y="rel_to_noclip:Q")
    chart = (line + pt).properties(
        width=WIDTH, height=HEIGHT,
        title=_title("Clip search: error vs shrink (one clip for the whole layer)",
                     f"{study.name}; each (row, group) picks its own shrink below"))
    return Figure("clip_error_vs_shrink", chart, df)


def clip_choices(study: "views.ClipStudy") -> Figure:
    df = study.chosen
    chart = alt.Chart(df).mark_bar(color=PALETTE[0]).encode(
        x=alt.X("shrink:O", title="chosen shrink ratio", axis=alt.Axis(format=".2f", labelAngle=0)),
        y=alt.Y("count:Q", title="(row, group) pairs"),
        tooltip=[alt.Tooltip("shrink:Q", format=".2f"), "count:Q"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Chosen shrink per (row, group)", f"{study.n_rows} rows x {study.n_groups} groups"))
    return Figure("clip_chosen_shrink", chart, df)


def clip_per_group(study: "views.ClipStudy") -> Figure:
    df = study.per_group
    chart = alt.Chart(df).mark_bar(color=PALETTE[1]).encode(
        x=alt.X("group:O", title="input group", axis=alt.Axis(labelAngle=0, labelOverlap=True)),
        y=alt.Y("mean_shrink:Q", title="mean chosen shrink"),
        tooltip=["group:O", alt.Tooltip("mean_shrink:Q", format=".3f"), alt.Tooltip("share_clipped:Q", format=".1%")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title("Mean chosen shrink per input group"))
    return Figure("clip_shrink_per_group", chart, df)


# --- Compare ------------------------------------------------------------------------------------------

def compare_family_gains(analyses: list["Analysis"], bits: int) -> Figure:
    df = views.compare_family_gains(analyses, bits)
    fams = _family_sort(df["family"].unique().tolist()) if len(df) else []
    chart = alt.Chart(df).mark_bar().encode(
        x=alt.X("family:N", sort=fams, title="module family", axis=alt.Axis(labelAngle=0)),
        xOffset="model:N",
        y=alt.Y("median_gain:Q", title="median AWQ gain (in-sample)", scale=alt.Scale(zero=False)),
        color=alt.Color("model:N", title="model"),
        tooltip=["model:N", "family:N", alt.Tooltip("median_gain:Q", format=".3f"),
                 alt.Tooltip("median_gain_heldout:Q", format=".3f")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(f"AWQ gain per module family, w{bits}"))
    return Figure(f"compare_family_gains_w{bits}", chart, df)


def compare_hockey(analyses: list["Analysis"]) -> Figure:
    df = views.compare_hockey(analyses)
    chart = hockey_stick_chart(df, "model", "Sorted channel importance, all linears",
                               "each linear normalised by its mean, then averaged")
    return Figure("compare_hockey_stick", chart, df)


def compare_error_vs_bits(analyses: list["Analysis"]) -> Figure:
    df = views.compare_error_by_bits(analyses)
    df = df[df["split"] == "held-out"] if (df["split"] == "held-out").any() else df
    chart = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("bits:O", title="bits", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("median_rel_error:Q", title="median relative output error", scale=alt.Scale(type="log")),
        color=alt.Color("model:N", title="model"),
        strokeDash=alt.StrokeDash("method:N", title="method", sort=["RTN", "AWQ"]),
        tooltip=["model:N", "bits:O", "method:N", alt.Tooltip("median_rel_error:Q", format=".4g")],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Output error vs bit-width", f"median over linears, scored on {df['split'].iloc[0] if len(df) else ''} rows"))
    return Figure("compare_error_vs_bits", chart, df)


# --- Model quality -------------------------------------------------------------------------------------

def quality_bars(df: pd.DataFrame) -> Figure:
    """One panel per metric (independent y), bars per mode, coloured by bit-width."""
    data = df[["mode", "bits", "group_size", "metric", "value"]].copy()
    data["bits"] = data["bits"].astype(str).where(data["mode"] != "fp", "fp")
    modes = [m for m in ("fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha") if m in set(data["mode"])]
    modes += sorted(set(data["mode"]) - set(modes))
    metrics_present = list(dict.fromkeys(data["metric"]))
    chart = alt.Chart(data).mark_bar().encode(
        x=alt.X("mode:N", sort=modes, title=None, axis=alt.Axis(labelAngle=-30)),
        xOffset=alt.XOffset("bits:N"),
        y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
        color=alt.Color("bits:N", title="bits"),
        tooltip=["mode:N", "bits:N", "group_size:Q", "metric:N", alt.Tooltip("value:Q", format=".5g")],
    ).properties(width=max(220, (WIDTH - 40) // max(1, len(metrics_present))), height=300).facet(
        column=alt.Column("metric:N", title=None, sort=metrics_present),
    ).resolve_scale(y="independent").properties(
        title=_title("Whole-model quality by quantization mode", "held-out text"))
    return Figure("model_quality", chart, df)


def kl_distribution(kl: pd.DataFrame) -> Figure:
    """Per-token KL(p_fp || q) as a cumulative distribution per mode, one panel per bit-width, from the
    quantiles of ``core.evaluate.cached_kl`` (columns mode, bits, fraction, kl). Log x axis: KL values
    below 1e-6 nats (and the exact zeros) are drawn at 1e-6."""
    data = kl[["mode", "bits", "fraction", "kl"]].copy()
    data["kl"] = data["kl"].clip(lower=1e-6)
    data["bits"] = "w" + data["bits"].astype(str)
    data = data.sort_values(["mode", "bits", "fraction"])
    modes = [m for m in ("rtn", "awq", "awq-grouped", "awq-clip", "const-alpha") if m in set(data["mode"])]
    modes += sorted(set(data["mode"]) - set(modes))
    chart = alt.Chart(data).mark_line(interpolate="step-after").encode(
        x=alt.X("kl:Q", title="per-token KL(p_fp || q) (nats)", scale=alt.Scale(type="log")),
        y=alt.Y("fraction:Q", title="share of scored tokens with KL ≤ x", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("mode:N", sort=modes, title="mode", scale=alt.Scale(range=PALETTE)),
        order="fraction:Q",
        tooltip=["mode:N", "bits:N", alt.Tooltip("fraction:Q", format=".3f"), alt.Tooltip("kl:Q", format=".4g")],
    ).properties(width=WIDTH, height=HEIGHT).facet(
        column=alt.Column("bits:N", title=None, sort=sorted(set(data["bits"]), key=lambda b: int(b[1:]))),
    ).properties(title=_title("Per-token KL divergence to full precision",
                              "cumulative share of held-out tokens; further left is better"))
    return Figure("kl_distribution", chart, kl)


# --- 3D surface (pyvista) -------------------------------------------------------------------------------

VTK_LOCK = threading.Lock()


def pyvista_module():
    # Headless EGL rendering; set before VTK creates its first render window (no X11 needed).
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import pyvista as pv

    pv.OFF_SCREEN = True
    return pv


def surface_geometry(mat: np.ndarray, log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scene coordinates for a ``[blocks, channels]`` matrix: x channel, y block, z height, plus the scalars.

    The scene is scaled to a 3 : 1.2 : 1 box so any width reads well; axis labels carry the real values.
    """
    vals = np.asarray(mat, dtype=np.float64)
    if log:
        vals = np.log10(np.clip(vals, max(float(vals[vals > 0].min()) if (vals > 0).any() else 1e-12, 1e-12), None))
    n_blocks, n_ch = vals.shape
    xs = np.linspace(0, 3.0, n_ch)
    ys = np.linspace(0, 1.2, n_blocks) if n_blocks > 1 else np.zeros(1)
    lo, hi = float(vals.min()), float(vals.max())
    z = (vals - lo) / (hi - lo) if hi > lo else np.zeros_like(vals)
    return xs, ys, z, vals


def surface_mesh(mat: np.ndarray, log: bool = False, value_name: str = "importance") -> "pv.StructuredGrid":
    pv = pyvista_module()
    xs, ys, z, vals = surface_geometry(mat, log)
    x, y = np.meshgrid(xs, ys)  # [blocks, channels]
    grid = pv.StructuredGrid(x, y, z)
    grid[value_name] = vals.ravel(order="F")
    return grid


def surface_plotter(mat: np.ndarray, *, title: str, value_name: str = "importance", log: bool = False,
                    window_size: tuple[int, int] = (960, 540), with_bounds: bool = True) -> "pv.Plotter":
    """An off-screen plotter holding the surface (also what the interactive view serializes)."""
    pv = pyvista_module()
    mesh = surface_mesh(mat, log, value_name)
    pl = pv.Plotter(off_screen=True, window_size=list(window_size))
    pl.set_background("white")
    label = f"log10 {value_name}" if log else value_name
    pl.add_mesh(mesh, scalars=value_name, cmap="viridis", smooth_shading=True, show_scalar_bar=True,
                scalar_bar_args={"title": label, "color": "black", "vertical": True, "position_x": 0.88,
                                 "position_y": 0.15, "height": 0.7, "width": 0.05})
    if with_bounds:
        n_blocks, n_ch = mat.shape
        _, _, _, vals = surface_geometry(mat, log)
        pl.show_bounds(xtitle="input channel", ytitle="block", ztitle=label, color="black", font_size=12,
                       axes_ranges=[0, n_ch - 1, 0, max(0, n_blocks - 1), float(vals.min()), float(vals.max())],
                       n_ylabels=min(5, max(2, n_blocks)), grid=False, location="outer")
    pl.add_text(title, position="upper_left", font_size=11, color="black")
    pl.camera_position = [(4.2, -2.6, 2.3), (1.5, 0.6, 0.25), (0.0, 0.0, 1.0)]
    return pl


def surface_png(mat: np.ndarray, *, title: str, value_name: str = "importance", log: bool = False,
                window_size: tuple[int, int] = (1920, 1080)) -> bytes:
    """The 3D surface rendered off-screen as PNG bytes (EGL, no display needed)."""
    from PIL import Image

    with VTK_LOCK:  # VTK render windows are not safe to drive from several threads at once
        pl = surface_plotter(mat, title=title, value_name=value_name, log=log, window_size=window_size)
        try:
            img = pl.screenshot(return_img=True)
        finally:
            pl.close()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def surface_axes(mat: np.ndarray, log: bool = False) -> dict[str, Any]:
    """Axis ticks for panel's VTK pane in scene coordinates, labelled with channels / blocks / values."""
    xs, ys, _, vals = surface_geometry(mat, log)
    n_blocks, n_ch = mat.shape
    xt = np.unique(np.linspace(0, n_ch - 1, 6).round().astype(int))
    yt = list(range(n_blocks)) if n_blocks <= 8 else np.unique(np.linspace(0, n_blocks - 1, 6).round().astype(int)).tolist()
    lo, hi = float(vals.min()), float(vals.max())
    zt = np.linspace(0, 1, 5)
    return {
        "xticker": {"ticks": [float(xs[i]) for i in xt], "labels": [str(int(i)) for i in xt]},
        "yticker": {"ticks": [float(ys[i]) for i in yt], "labels": [str(int(i)) for i in yt]},
        "zticker": {"ticks": [float(t) for t in zt], "labels": [f"{lo + t * (hi - lo):.3g}" for t in zt]},
        "fontsize": 12, "digits": 2, "show_grid": True, "grid_opacity": 0.15, "axes_opacity": 0.6,
        "origin": (0.0, 0.0, 0.0),
    }


# --- Figure pack ---------------------------------------------------------------------------------------

def standard_figures(analysis: "Analysis", bits: int) -> list[Figure]:
    """The figures a talk about this model needs: overview, importance maps, the most helped layer."""
    figs = [gain_heatmap(analysis, bits), gain_heatmap(analysis, bits, held_out=True), family_gains(analysis, bits),
            error_vs_bits(analysis), hockey_stick(analysis)]
    figs += [importance_heatmap(analysis, fam) for fam in views.families_present(analysis.linears)]
    name = views.best_layer(analysis, bits)
    row = analysis.layers[(analysis.layers["name"] == name) & (analysis.layers["bits"] == bits)].iloc[0]
    ev = analysis.evaluate_layer(name, alpha=float(row["best_alpha"]), bits=bits, group_size=int(row["group_size"]),
                                 zero_point=bool(analysis.settings.sweep.zero_point), n_grid=analysis.settings.sweep.n_grid)
    figs += layer_figures(ev)
    return figs


def figure_pack(analysis: "Analysis", bits: int, *, include_3d: bool = True,
                formats: tuple[str, ...] = ("png", "svg", "pdf", "csv")) -> bytes:
    """A ZIP of the standard figures (PNG, SVG, PDF + CSV each), 3D surfaces as PNG, and a README."""
    figs = standard_figures(analysis, bits)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        lines = [f"AWQ Explorer figure pack — {analysis.model_id}", f"cache entry: {analysis.path.name}",
                 f"bits: {bits}; calibration tokens: {analysis.manifest.get('n_tokens')}", "",
                 "settings: " + json.dumps(analysis.settings.to_dict(), default=str), "", "Figures:"]
        for f in figs:
            spec = f.spec()
            if "png" in formats:
                z.writestr(f"{f.slug}.png", chart_png(spec))
            if "svg" in formats:
                z.writestr(f"{f.slug}.svg", chart_svg(spec))
            if "pdf" in formats:
                z.writestr(f"{f.slug}.pdf", chart_pdf(spec))
            if "csv" in formats:
                z.writestr(f"{f.slug}.csv", f.csv())
            z.writestr(f"{f.slug}.vl.json", json.dumps(spec))
            lines.append(f"  {f.slug}: {f.caption}" if f.caption else f"  {f.slug}")
        if include_3d:
            for fam in views.families_present(analysis.linears):
                mat, _ = views.channel_matrix(analysis, fam, "importance")
                if mat.shape[0] > 1:
                    z.writestr(f"importance_surface_{fam}.png",
                               surface_png(mat, title=f"{analysis.model_id} — importance, family {fam}"))
                    lines.append(f"  importance_surface_{fam}.png: 3D channel x block surface")
        lines += ["", "Definitions:"] + [f"  {k}: {v}" for k, v in metrics.DEFINITIONS.items()]
        z.writestr("README.txt", "\n".join(lines) + "\n")
    return buf.getvalue()


def slugify_model(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_id).split("/")[-1])[:60] or "model"
