"""Every chart of the app: one registered Altair theme, chart builders, exports, the 3D surface, the figure pack.

A :class:`Figure` is a chart plus the exact table it draws. The app shows ``figure.chart`` with
``theme=None`` (so Streamlit adds no theme of its own) and offers ``png()`` / ``svg()`` / ``pdf()`` /
``csv()``; all of them come from the same Vega-Lite spec, so what is on screen is what is exported.
Charts have a fixed size that fits two side by side on a laptop screen (460 x 260 px, 960 px for wide
ones); the PNG is rendered at scale 4 (1840 px wide: sharp on a 1080p slide), SVG and PDF are vector.
The ``talk`` preset (``png(preset="talk")`` ...) re-renders the same spec for a 16:9 slide: 1920 x 1080 px,
fonts about twice as large. Every axis has a title with its unit; index axes (channels, ranks) have integer
ticks; titles are wrapped to the chart's width. No streamlit import here: the figure pack and the tests
use this module headless.
"""
from __future__ import annotations

import copy
import io
import json
import os
import textwrap
import threading
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import pandas as pd

from ..grids import metrics
from . import views

if TYPE_CHECKING:
    import pyvista as pv

    from ..analysis import Analysis, LayerEval

THEME_NAME = "awq_explorer"
FONT = "Liberation Sans, Arial, Helvetica, sans-serif"
WIDTH, HEIGHT = 460, 260  # two per row on a 1440 px wide screen
WIDE = 960  # full-width charts (heatmaps over channels)
PNG_SCALE = 4  # 460 px wide charts -> 1840 px PNG: sharp on a 1080p slide
TITLE_SIZE, SUBTITLE_SIZE = 17, 13
# Okabe-Ito: distinguishable for colour-blind viewers and on a projector.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
ACCENT = "#D55E00"  # salient channels, current alpha
MUTED = "#8a8f98"
METHOD_COLORS = {"RTN": "#8a8f98", "AWQ": "#0072B2"}
SPLIT_DASH = {"calibration": [1, 0], "held-out": [7, 4]}  # held-out dashed, long enough to see at 2.5 px
INT = {"format": "d", "tickMinStep": 1}  # axis properties of an index axis (channels, ranks): integer ticks
PRESETS = {"standard": "Standard (460 px charts, PNG at 4x)", "talk": "Talk (16:9 slide, 1920 x 1080, large fonts)"}
TALK_SIZE = (1920, 1080)


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
            "title": {"fontSize": TITLE_SIZE, "fontWeight": 600, "anchor": "start", "subtitleFontSize": SUBTITLE_SIZE,
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

    def spec(self, preset: str = "standard") -> dict[str, Any]:
        """The Vega-Lite spec with the theme's config inlined (what the browser and exports render)."""
        with alt.theme.enable(THEME_NAME):
            spec = self.chart.to_dict()
        return talk_spec(spec, panels=self.meta.get("panels")) if preset == "talk" else spec

    def png(self, scale: float = PNG_SCALE, preset: str = "standard") -> bytes:
        if preset == "talk":
            return letterbox_png(chart_png(self.spec("talk"), scale=1), TALK_SIZE)
        return chart_png(self.spec(), scale=scale)

    def svg(self, preset: str = "standard") -> str:
        return chart_svg(self.spec(preset))

    def pdf(self, preset: str = "standard") -> bytes:
        return chart_pdf(self.spec(preset))

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


# --- the talk preset -----------------------------------------------------------------------------------

TALK_FONTS = {"title": 34, "subtitle": 24, "axis_label": 22, "axis_title": 25, "legend": 22, "header": 24, "text": 20}


def _scale_sizes(node: Any, fx: float, fy: float) -> None:
    """Multiply every ``width`` / ``height`` of the (nested) view specs in place."""
    if isinstance(node, dict):
        for key, f in (("width", fx), ("height", fy)):
            if isinstance(node.get(key), (int, float)):
                node[key] = int(round(node[key] * f))
        for k, v in node.items():
            if k not in ("config", "data", "datasets", "encoding", "title"):
                _scale_sizes(v, fx, fy)
    elif isinstance(node, list):
        for v in node:
            _scale_sizes(v, fx, fy)


def _rewrap_title(node: Any, width: int) -> None:
    """Titles were wrapped for the screen width; rewrap them for the talk fonts and width."""
    if isinstance(node, dict):
        t = node.get("title")
        if isinstance(t, dict) and "text" in t:
            text = " ".join(t["text"]) if isinstance(t["text"], list) else str(t["text"])
            t["text"] = fit_lines(text, width, TALK_FONTS["title"])
            if "subtitle" in t:
                sub = " ".join(t["subtitle"]) if isinstance(t["subtitle"], list) else str(t["subtitle"])
                t["subtitle"] = fit_lines(sub, width, TALK_FONTS["subtitle"])
        for k, v in node.items():
            if k not in ("config", "data", "datasets", "title"):
                _rewrap_title(v, width)
    elif isinstance(node, list):
        for v in node:
            _rewrap_title(v, width)


def talk_spec(spec: dict[str, Any], panels: int | None = None) -> dict[str, Any]:
    """The same chart for a 16:9 slide: large fonts, views enlarged so the whole figure is about 1920 x 1080.

    Only sizes and fonts change (same data, marks and encodings); ``letterbox_png`` pads the rendering to
    exactly 1920 x 1080.
    """
    s = copy.deepcopy(spec)
    cfg = s.setdefault("config", {})
    cfg["padding"] = 30
    cfg.setdefault("title", {}).update(fontSize=TALK_FONTS["title"], subtitleFontSize=TALK_FONTS["subtitle"], offset=18)
    cfg.setdefault("axis", {}).update(labelFontSize=TALK_FONTS["axis_label"], titleFontSize=TALK_FONTS["axis_title"],
                                      titlePadding=12, labelLimit=360)
    cfg.setdefault("legend", {}).update(labelFontSize=TALK_FONTS["legend"], titleFontSize=TALK_FONTS["legend"],
                                        symbolSize=300, gradientLength=420, gradientThickness=22, labelLimit=600)
    cfg.setdefault("header", {}).update(labelFontSize=TALK_FONTS["header"], titleFontSize=TALK_FONTS["header"])
    cfg.setdefault("text", {}).update(fontSize=TALK_FONTS["text"])
    cfg.setdefault("point", {}).update(size=160)
    cfg.setdefault("line", {}).update(strokeWidth=4)
    cols, rows = _grid_shape(s, panels)
    w0, h0 = _view_size(s)
    # room for axes, legend and title at talk font sizes, then fill the rest of the slide
    avail_w = (TALK_SIZE[0] - 60 - 170 * cols) / cols
    avail_h = (TALK_SIZE[1] - 60 - 230 - 110 * rows) / rows
    _scale_sizes(s, max(1.0, avail_w / max(w0, 1)), max(1.0, avail_h / max(h0, 1)))
    _rewrap_title(s, TALK_SIZE[0] - 80)
    return s


def _view_size(spec: dict[str, Any]) -> tuple[int, int]:
    """Width and height of the first view with a numeric size (the one all panels share here)."""
    stack = [spec]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if isinstance(node.get("width"), (int, float)) and isinstance(node.get("height"), (int, float)):
                return int(node["width"]), int(node["height"])
            stack += [v for k, v in node.items() if k not in ("config", "data", "datasets", "encoding")]
        elif isinstance(node, list):
            stack += node
    return WIDTH, HEIGHT


def _grid_shape(spec: dict[str, Any], panels: int | None = None) -> tuple[int, int]:
    """(columns, rows) of panels: vconcat / hconcat / a wrapped facet; 1 x 1 for a single or layered view."""
    if "vconcat" in spec:
        return 1, len(spec["vconcat"])
    if "hconcat" in spec:
        return len(spec["hconcat"]), 1
    if "facet" in spec:
        n = int(panels or 3)
        cols = min(n, int(spec.get("columns") or n))
        return cols, max(1, -(-int(n) // cols))
    return 1, 1


def letterbox_png(png: bytes, size: tuple[int, int] = TALK_SIZE) -> bytes:
    """Fit a PNG into exactly ``size`` on white (scaled down if larger, never up; centred)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    f = min(1.0, size[0] / img.width, size[1] / img.height)
    if f < 1.0:
        img = img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))), Image.LANCZOS)
    canvas = Image.new("RGB", size, "white")
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# --- small helpers ----------------------------------------------------------------------------------------

def text_width(text: str, font_size: float) -> float:
    """A generous estimate of a line's width in px (0.6 em per character; Liberation Sans averages ~0.5)."""
    return 0.6 * font_size * len(text)


def fit_lines(text: str, width: float, font_size: float) -> list[str] | str:
    """``text`` wrapped into lines no wider than ``width`` px (a single string when it fits)."""
    n = max(12, int(width / (0.6 * font_size)))
    lines = textwrap.wrap(text, n, break_long_words=False, break_on_hyphens=False) or [text]
    return lines[0] if len(lines) == 1 else lines


def _family_sort(families: list[str]) -> list[str]:
    order = {f: i for i, f in enumerate(views.FAMILY_ORDER)}
    return sorted(families, key=lambda f: order.get(f, 99))


def _title(text: str, subtitle: str | None = None, width: int = WIDTH) -> alt.TitleParams:
    """A title (and subtitle) wrapped to the chart's width: the y axis adds ~60 px, nothing is cut."""
    room = width + 60
    t = fit_lines(text, room, TITLE_SIZE)
    if subtitle:
        return alt.TitleParams(t, subtitle=fit_lines(subtitle, room, SUBTITLE_SIZE))
    return alt.TitleParams(t)


# --- axis titles (one wording per quantity, with its unit) ------------------------------------------------

AX = {
    "rel_error": "relative output error ||ΔY||² / ||Y||²",
    "gain": "AWQ gain (×, RTN / AWQ error)",
    "ratio": "AWQ error / RTN error (×; < 1: AWQ better)",
    "bits": "bits per weight",
    "block": "block (index)",
    "channel": "input channel (index)",
    "family": "module family",
    "alpha": "alpha (exponent in s = mean|x|^α)",
}


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
        x=alt.X("family:N", sort=fams, title=AX["family"], axis=alt.Axis(labelAngle=0)),
        y=alt.Y("block:O", title=AX["block"]),
    )
    rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("gain:Q", title="gain (×, log colour scale)",
                        scale=alt.Scale(type="log", scheme="redblue", domain=dom),
                        legend=alt.Legend(type="gradient", values=[round(float(v), 2) for v in np.exp(np.linspace(-span, span, 5))],
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
    width = max(300, min(WIDTH, 72 * len(fams)))
    chart = chart.properties(
        width=width, height=max(120, min(520, 24 * n_blocks)),
        title=_title(f"AWQ gain per layer, w{bits}", f"RTN error / AWQ error on {split}; > 1: AWQ helps", width),
    )
    return Figure(f"gain_heatmap_w{bits}{'_heldout' if held_out else ''}", chart, df,
                  metrics.DEFINITIONS["gain_heldout" if held_out else "gain"])


def family_gains(analysis: "Analysis", bits: int) -> Figure:
    ft = views.family_table(analysis.layers, bits)
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


def _error_bits_chart(err: pd.DataFrame, ratio: pd.DataFrame, color: str | None, title: str, subtitle: str) -> alt.VConcatChart:
    """Two panels over bit-width: the median error (log axis) and AWQ error / RTN error (linear axis)."""
    dash = alt.StrokeDash("split:N", title="scored on", scale=alt.Scale(domain=list(SPLIT_DASH),
                                                                        range=list(SPLIT_DASH.values())))
    shape = alt.Shape("split:N", title="scored on", scale=alt.Scale(domain=list(SPLIT_DASH), range=["circle", "triangle"]))
    if color is None:
        ccol = alt.Color("method:N", title="method", scale=alt.Scale(domain=list(METHOD_COLORS), range=list(METHOD_COLORS.values())))
        rcol = alt.value(PALETTE[0])
    else:
        ccol = alt.Color(f"{color}:N", title=None)
        rcol = alt.Color(f"{color}:N", title=None)
        dash = alt.StrokeDash("method:N", title="method", sort=["RTN", "AWQ"])
        shape = alt.Shape("method:N", title="method", sort=["RTN", "AWQ"])
    x = alt.X("bits:O", title=AX["bits"], axis=alt.Axis(labelAngle=0))
    top = alt.Chart(err).mark_line(point=alt.OverlayMarkDef(size=70, filled=True)).encode(
        x=x, y=alt.Y("median_rel_error:Q", title=["rel. output error", "(median, log scale)"], scale=alt.Scale(type="log")),
        color=ccol, strokeDash=dash, shape=shape,
        tooltip=[c for c in (color,) if c] + ["bits:O", "method:N", "split:N",
                                              alt.Tooltip("median_rel_error:Q", format=".4g")],
    ).properties(width=WIDTH, height=190)
    rdash = alt.StrokeDash("split:N", title="scored on", scale=alt.Scale(domain=list(SPLIT_DASH),
                                                                         range=list(SPLIT_DASH.values())))
    rshape = alt.Shape("split:N", title="scored on", scale=alt.Scale(domain=list(SPLIT_DASH), range=["circle", "triangle"]))
    bottom = alt.Chart(ratio).mark_line(point=alt.OverlayMarkDef(size=70, filled=True)).encode(
        x=x, y=alt.Y("median_awq_over_rtn:Q", title=["AWQ / RTN error", "(×; < 1: AWQ better)"],
                     scale=alt.Scale(zero=False, type="linear")),
        color=rcol, strokeDash=rdash, shape=rshape,
        tooltip=[c for c in (color,) if c] + ["bits:O", "split:N", alt.Tooltip("median_awq_over_rtn:Q", format=".3f")],
    ).properties(width=WIDTH, height=190)
    one = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="#333", strokeDash=[2, 3]).encode(y="y:Q")
    return alt.vconcat(top, bottom + one, spacing=14).resolve_scale(color="independent", strokeDash="independent",
                                                                     shape="independent").properties(
        title=_title(title, subtitle))


def error_vs_bits(analysis: "Analysis") -> Figure:
    err = views.error_by_bits(analysis.layers)
    ratio = views.error_ratio_by_bits(analysis.layers)
    chart = _error_bits_chart(err, ratio, None, "Output error vs bit-width",
                              "median over all linears; bottom: AWQ / RTN per linear, dashed: held-out")
    data = err.merge(ratio[["bits", "split", "median_awq_over_rtn"]], on=["bits", "split"], how="left")
    return Figure("error_vs_bits", chart, data, metrics.DEFINITIONS["rel_error"])


def hockey_stick_chart(df: pd.DataFrame, color: str, title: str, subtitle: str,
                       order: list[str] | None = None) -> alt.Chart:
    return alt.Chart(df).mark_line().encode(
        x=alt.X("rank_pct:Q", title="channel rank, % of the layer's channels (log scale)",
                scale=alt.Scale(type="log", domain=[float(df["rank_pct"].min()) if len(df) else 0.01, 100], nice=False)),
        y=alt.Y("importance_norm:Q", title="importance / layer mean (×)"),
        color=alt.Color(f"{color}:N", title={"group": "family", "analysis": None}.get(color, color), sort=order),
        tooltip=[f"{color}:N", alt.Tooltip("rank_pct:Q", format=".2f"), alt.Tooltip("importance_norm:Q", format=".2f")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(title, subtitle))


def hockey_stick(analysis: "Analysis") -> Figure:
    df = views.hockey_stick(analysis, by="family")
    fams = _family_sort(df["group"].unique().tolist())
    chart = hockey_stick_chart(df, "group", "Sorted channel importance ('hockey stick')",
                               "mean over the blocks of each family; each curve starts at its layers' top channel",
                               order=fams)
    return Figure("hockey_stick", chart, df, metrics.DEFINITIONS["importance"])


# --- Importance map -----------------------------------------------------------------------------------

def importance_heatmap(analysis: "Analysis", family: str, value: str = "importance", log: bool = False) -> Figure:
    """Channel x block heatmap; ``log`` only where every value is positive (else linear, ``meta['log']`` False)."""
    mat, names = views.channel_matrix(analysis, family, value)
    df = views.matrix_long(mat)
    binned = int(df["channel_end"].iloc[0] - df["channel_start"].iloc[0]) > 0
    label = views.CHANNEL_VALUES[value]
    use_log = log and views.log_applicable(mat)
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


# --- Layer Lab ----------------------------------------------------------------------------------------

CURVE_PLAIN, CURVE_CLIP = "scale search (no clipping)", "with clipping at each alpha"


def loss_curve(ev: "LayerEval", clipped: pd.DataFrame | None = None) -> Figure:
    """Relative output error vs alpha for exactly ``ev``'s setting, the current alpha and the best one.

    The curve is the scale search at ``ev``'s bits, group size, zero point and duo scaling. With clipping on,
    official AWQ picks alpha on this unclipped curve and clips afterwards, and the chart says so; given
    ``clipped`` (``views.clipped_alpha_curve``), it also draws the curve with clipping at every alpha and
    marks that curve's best alpha.
    """
    df = views.alpha_curve(ev)
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
        bi = views.first_min(df["rel_error_clipped"])
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
    g = "per row" if ev.group_size == ev.weight.shape[1] else f"g{ev.group_size}"
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
        title=_title(f"Output error vs alpha, w{ev.bits} {g}" + (" + clip" if ev.clipped else ""), "; ".join(notes)))
    return Figure("rel_error_vs_alpha", chart, df, metrics.DEFINITIONS["rel_error"],
                  meta={"best_alpha": best[0], "curve": "clipped" if with_clip else "unclipped"})


def importance_bars(ev: "LayerEval") -> Figure:
    df = views.sorted_importance(ev)
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
    df = views.scale_vector(ev)
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
    df = views.weight_histograms(ev, salient_only=salient_only)
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


# --- Clipping -----------------------------------------------------------------------------------------

def clip_curve(study: "views.ClipStudy") -> Figure:
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


def clip_choices(study: "views.ClipStudy") -> Figure:
    df = study.chosen
    chart = alt.Chart(df).mark_bar(color=PALETTE[0]).encode(
        x=alt.X("shrink:O", title="chosen shrink ratio (fraction of max|W|)", axis=alt.Axis(format=".2f", labelAngle=0)),
        y=alt.Y("count:Q", title="(row, group) pairs (count)", axis=alt.Axis(format="d", tickMinStep=1)),
        tooltip=[alt.Tooltip("shrink:Q", format=".2f"), "count:Q"],
    ).properties(width=WIDTH, height=HEIGHT,
                 title=_title("Chosen shrink per (row, group)", f"{study.n_rows} rows x {study.n_groups} groups"))
    return Figure("clip_chosen_shrink", chart, df)


def clip_per_group(study: "views.ClipStudy") -> Figure:
    df = study.per_group
    chart = alt.Chart(df).mark_bar(color=PALETTE[1]).encode(
        x=alt.X("group:O", title="input group (index)", axis=alt.Axis(labelAngle=0, labelOverlap=True)),
        y=alt.Y("mean_shrink:Q", title="mean chosen shrink (fraction of max|W|)"),
        tooltip=["group:O", alt.Tooltip("mean_shrink:Q", format=".3f"), alt.Tooltip("share_clipped:Q", format=".1%")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title("Mean chosen shrink per input group"))
    return Figure("clip_shrink_per_group", chart, df)


# --- Compare ------------------------------------------------------------------------------------------

def compare_family_gains(analyses: list["Analysis"], bits: int) -> Figure:
    df = views.compare_family_gains(analyses, bits)
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
    df = views.compare_hockey(analyses)
    chart = hockey_stick_chart(df, "analysis", "Sorted channel importance, all linears",
                               "each linear normalised by its mean, then averaged").encode(
        color=alt.Color("analysis:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=440)))
    return Figure("compare_hockey_stick", chart, df)


def compare_error_vs_bits(analyses: list["Analysis"]) -> Figure:
    err = views.compare_error_by_bits(analyses)
    split = "held-out" if len(err) and (err["split"] == "held-out").any() else "calibration"
    err = err[err["split"] == split] if len(err) else err
    frames = []
    for a, label in zip(analyses, views.compare_labels([x.manifest for x in analyses])):
        r = views.error_ratio_by_bits(a.layers)
        r.insert(0, "analysis", label)
        frames.append(r[r["split"] == split])
    ratio = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    chart = _error_bits_chart(err, ratio.drop(columns="split").assign(split=split) if len(ratio) else ratio, "analysis",
                              "Output error vs bit-width",
                              f"median over linears, scored on {split} rows; bottom: AWQ / RTN per linear")
    data = err.merge(ratio[["analysis", "bits", "split", "median_awq_over_rtn"]], on=["analysis", "bits", "split"],
                     how="left") if len(ratio) else err
    return Figure("compare_error_vs_bits", chart, data)


# --- Model quality -------------------------------------------------------------------------------------

METRIC_LABELS = {
    "perplexity": "perplexity (lower is better)",
    "kl": "KL to fp, nats (lower is better)",
    "kl_p99": "KL p99, nats (lower is better)",
    "kl_p999": "KL p99.9, nats (lower is better)",
    "same_top": "same top-1 token as fp (share)",
    "rms_dp": "RMS change of probabilities",
    "cosine": "embedding cosine to fp (higher is better)",
    "hidden_rel_error": "hidden-state rel. error (lower is better)",
}


def metric_label(metric: str) -> str:
    """A readable name for a model-level metric (its key stays in the CSV and the tooltip)."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def quality_bars(df: pd.DataFrame) -> Figure:
    """One panel per metric (independent y starting near the data): a dot per mode and bit-width, fp as a line.

    fp is the unquantized reference, so it is drawn as a dashed horizontal line in each panel rather than
    as a bit-width. Standard-error metrics (``*_se``) are left out of the panels (they stay in the CSV).
    """
    data = df[["mode", "bits", "group_size", "metric", "value"]].copy()
    data = data[~data["metric"].astype(str).str.endswith("_se")]
    data["metric_label"] = data["metric"].map(metric_label)
    data["bits_label"] = np.where(data["mode"] == "fp", "fp (not quantized)", "w" + data["bits"].astype(str))
    modes = [m for m in ("rtn", "awq", "awq-grouped", "awq-clip", "const-alpha") if m in set(data["mode"])]
    modes += sorted(set(data["mode"]) - set(modes) - {"fp"})
    metrics_present = list(dict.fromkeys(data["metric_label"]))
    n = max(1, len(metrics_present))
    cols = min(n, 3)
    width = max(200, (WIDE - 60 * cols) // cols)
    quant_bits = sorted({b for b in data.loc[data["mode"] != "fp", "bits_label"]}, key=lambda b: int(b[1:]))
    pts = alt.Chart().mark_point(size=110, filled=True).encode(
        x=alt.X("mode:N", sort=modes, title="quantization mode", axis=alt.Axis(labelAngle=-30)),
        xOffset=alt.XOffset("bits_label:N", sort=quant_bits),
        y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False, nice=True)),
        color=alt.Color("bits_label:N", title="bits per weight", sort=quant_bits),
        tooltip=["mode:N", "bits:Q", "group_size:Q", "metric:N", alt.Tooltip("value:Q", format=".5g")],
    ).transform_filter("datum.mode != 'fp'")
    fp = alt.Chart().mark_rule(color="#222", strokeDash=[5, 4], strokeWidth=1.5).encode(
        y="value:Q", tooltip=["mode:N", "metric:N", alt.Tooltip("value:Q", format=".5g")],
    ).transform_filter("datum.mode == 'fp'")
    chart = alt.layer(pts, fp, data=data).properties(width=width, height=220).facet(
        facet=alt.Facet("metric_label:N", title=None, sort=metrics_present, header=alt.Header(labelFontWeight=600)),
        columns=cols,
    ).resolve_scale(y="independent").properties(
        title=_title("Whole-model quality by quantization mode",
                     "held-out text; dashed line: fp (not quantized); each axis starts near its data", WIDE))
    return Figure("model_quality", chart, df, meta={"panels": n})


# --- How AWQ works ------------------------------------------------------------------------------------

def intro_weight_group(ev: "LayerEval") -> Figure:
    """Step 1: one group of weights, each rounded to the nearest of the group's 2^bits levels."""
    pts, levels, info = views.weight_group(ev)
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
    df = views.activation_outliers(analysis, name)
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
    df = views.scales_by_alpha(analysis, name, alphas, group_size)
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
    df = views.channel_errors(ev)
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


def nice_step(span: float, max_ticks: int = 6, integer: bool = False) -> float:
    """The smallest 1-2-5 step that covers ``span`` in at most ``max_ticks - 1`` intervals (>= 1 if ``integer``)."""
    if not span > 0:
        return 1.0
    raw = span / max(1, max_ticks - 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw - 1e-12)
    return float(max(1.0, round(step))) if integer else float(step)


@dataclass(frozen=True)
class SurfaceAxes:
    """Tick values of the 3D view: integer channels and blocks, distinct value labels on the height axis.

    The scene box is ``3 x 1.2 x 1`` scene units; each axis runs over a whole number of tick steps
    (``[0, x_max]``, ``[0, y_max]``, ``[z_lo, z_hi]``), so evenly spaced labels land on round values.
    """

    x_ticks: list[int]
    y_ticks: list[int]
    z_ticks: list[float]
    z_format: str  # printf style, enough decimals that no two height labels are equal
    log: bool

    @property
    def x_max(self) -> int:
        return self.x_ticks[-1]

    @property
    def y_max(self) -> int:
        return self.y_ticks[-1]


def surface_ticks(mat: np.ndarray, log: bool = False) -> SurfaceAxes:
    vals = surface_values(mat, log)
    n_blocks, n_ch = vals.shape
    xs = nice_step(n_ch - 1, 6, integer=True)
    ys = nice_step(max(1, n_blocks - 1), 7, integer=True)
    x_max = int(np.ceil((n_ch - 1) / xs) * xs)
    y_max = int(np.ceil(max(1, n_blocks - 1) / ys) * ys)
    lo, hi = float(vals.min()), float(vals.max())
    zs = nice_step(hi - lo if hi > lo else abs(hi) or 1.0, 5)
    z_lo, z_hi = np.floor(lo / zs) * zs, np.ceil(hi / zs) * zs
    if z_hi <= z_lo:
        z_hi = z_lo + zs
    n_z = int(round((z_hi - z_lo) / zs)) + 1
    decimals = max(0, int(-np.floor(np.log10(zs) + 1e-9)) + (1 if round(zs / 10 ** np.floor(np.log10(zs)), 3) == 2.5 else 0))
    return SurfaceAxes(x_ticks=list(range(0, x_max + 1, int(xs))), y_ticks=list(range(0, y_max + 1, int(ys))),
                       z_ticks=[float(z_lo + i * zs) for i in range(n_z)], z_format=f"%.{decimals}f", log=log)


def surface_values(mat: np.ndarray, log: bool = False) -> np.ndarray:
    """The heights of the surface: the values, or their log10 (ValueError unless every value is > 0)."""
    vals = np.asarray(mat, dtype=np.float64)
    if log:
        if not views.log_applicable(vals):
            raise ValueError("a log scale needs values > 0, and these include zero or negative values "
                             "(excess kurtosis can be negative)")
        vals = np.log10(vals)
    return vals


def surface_geometry(mat: np.ndarray, log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scene coordinates for a ``[blocks, channels]`` matrix: x channel, y block, z height, plus the scalars.

    The scene box is 3 : 1.2 : 1 so any width reads well; it spans whole tick steps (``surface_ticks``) and
    the axis labels carry the real values.
    """
    vals = surface_values(mat, log)
    ax = surface_ticks(mat, log)
    n_blocks, n_ch = vals.shape
    xs = np.arange(n_ch) / ax.x_max * 3.0
    ys = np.arange(n_blocks) / ax.y_max * 1.2 if n_blocks > 1 else np.zeros(1)
    z = (vals - ax.z_ticks[0]) / (ax.z_ticks[-1] - ax.z_ticks[0])
    return xs, ys, z, vals


def surface_mesh(mat: np.ndarray, log: bool = False, value_name: str = "importance") -> "pv.StructuredGrid":
    pv = pyvista_module()
    xs, ys, z, vals = surface_geometry(mat, log)
    x, y = np.meshgrid(xs, ys)  # [blocks, channels]
    grid = pv.StructuredGrid(x, y, z)
    grid[value_name] = vals.ravel(order="F")
    return grid


def value_axis_title(value_name: str, log: bool) -> str:
    return f"{value_name} (log10 scale)" if log else value_name


def surface_plotter(mat: np.ndarray, *, title: str, value_name: str = "importance", log: bool = False,
                    window_size: tuple[int, int] = (960, 540), with_bounds: bool = True) -> "pv.Plotter":
    """An off-screen plotter holding the surface (also what the interactive view serializes).

    ``with_bounds``: axis titles, integer channel / block ticks and distinct height labels (the PNG export;
    the interactive view gets its axes from ``surface_axes``). Fonts and the title scale with the window.
    """
    pv = pyvista_module()
    mesh = surface_mesh(mat, log, value_name)
    ax = surface_ticks(mat, log)
    width, height = window_size
    pl = pv.Plotter(off_screen=True, window_size=list(window_size))
    pl.set_background("white")
    label = value_axis_title(value_name, log)
    font = max(10, int(height / 50))  # 1080 px -> 21 px labels
    pl.add_mesh(mesh, scalars=value_name, cmap="viridis", smooth_shading=True, show_scalar_bar=True,
                scalar_bar_args={"title": label + "\n", "color": "black", "vertical": True, "position_x": 0.86,
                                 "position_y": 0.18, "height": 0.62, "width": 0.045, "title_font_size": font,
                                 "label_font_size": font, "n_labels": 5, "fmt": "%.3g"})
    if with_bounds:
        actor = pl.show_bounds(
            bounds=[0, 3.0, 0, 1.2 if mat.shape[0] > 1 else 0.0, 0, 1.0],
            axes_ranges=[0, ax.x_max, 0, ax.y_max if mat.shape[0] > 1 else 0, ax.z_ticks[0], ax.z_ticks[-1]],
            xtitle="input channel (index)", ytitle="block (index)", ztitle=label, color="black", font_size=font,
            n_xlabels=len(ax.x_ticks), n_ylabels=len(ax.y_ticks) if mat.shape[0] > 1 else 1,
            n_zlabels=len(ax.z_ticks), grid=False, location="outer", fmt="%.0f", bold=False)
        actor.z_label_format = ax.z_format
        # The last channel tick sits in the corner where the block axis starts: leave it unlabelled so "0"
        # of the blocks and the channel count never print over each other.
        labels = pv.convert_array(np.array([str(t) for t in ax.x_ticks[:-1]] + [""], dtype=object))
        actor.SetAxisLabels(0, labels)
    pl.add_text(title, position=(int(0.03 * width), int(height - 0.045 * height - 1.6 * font)),
                font_size=int(font * 0.9), color="black")
    pl.camera_position = [(4.4, -3.0, 2.4), (1.45, 0.55, 0.3), (0.0, 0.0, 1.0)]
    pl.camera.zoom(0.92)
    return pl


def colour_bar(mat: np.ndarray, value_name: str, log: bool = False, width: int = 560) -> Figure:
    """The 3D view's colour bar as a chart (panel's VTK pane draws none): viridis over the surface's heights."""
    vals = surface_values(mat, log)
    lo, hi = float(vals.min()), float(vals.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 129)
    df = pd.DataFrame({"start": edges[:-1], "end": edges[1:], "value": (edges[:-1] + edges[1:]) / 2})
    chart = alt.Chart(df).mark_rect().encode(
        x=alt.X("start:Q", title=value_axis_title(value_name, log), scale=alt.Scale(domain=[lo, hi], nice=False),
                axis=alt.Axis(format=".3~g", tickCount=6)),
        x2="end:Q",
        color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis", domain=[lo, hi]), legend=None),
    ).properties(width=width, height=18, title=_title("Colour and height of the 3D view", None, width))
    return Figure("surface_colour_bar", chart, df)


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
    """Axis ticks for panel's VTK pane in scene coordinates, labelled with channels / blocks / values.

    panel's pane has no axis titles, so the last label of the channel and block axes names the axis
    ("400 channel", "block 5"); at the origin, where the three axes meet, only the channel axis' "0" is
    written (the block and height axes leave their first label empty, so nothing prints over it).
    """
    ax = surface_ticks(mat, log)
    z0, z1 = ax.z_ticks[0], ax.z_ticks[-1]
    last_x, last_y = len(ax.x_ticks) - 1, len(ax.y_ticks) - 1
    return {
        "xticker": {"ticks": [t / ax.x_max * 3.0 for t in ax.x_ticks],
                    "labels": [f"{t} channel" if i == last_x else str(t) for i, t in enumerate(ax.x_ticks)]},
        "yticker": {"ticks": [t / ax.y_max * 1.2 for t in ax.y_ticks],
                    "labels": ["" if i == 0 else (f"block {t}" if i == last_y else str(t))
                               for i, t in enumerate(ax.y_ticks)]},
        "zticker": {"ticks": [(t - z0) / (z1 - z0) for t in ax.z_ticks],
                    "labels": ["" if i == 0 else ax.z_format % t for i, t in enumerate(ax.z_ticks)]},
        "fontsize": 13, "digits": 3, "show_grid": True, "grid_opacity": 0.15, "axes_opacity": 0.6,
        "origin": (3.0, 0.0, 0.0),  # the block and height axes on the right-hand edge, in front of the surface
    }


# --- Figure pack ---------------------------------------------------------------------------------------

def standard_figures(analysis: "Analysis", bits: int, layer: str | None = None) -> list[Figure]:
    """The figures a talk about this model needs: overview, importance maps, one layer's figures.

    ``layer``: the linear of the layer figures (the one on screen); default the one AWQ helps most.
    """
    figs = [gain_heatmap(analysis, bits), gain_heatmap(analysis, bits, held_out=True), family_gains(analysis, bits),
            error_vs_bits(analysis), hockey_stick(analysis)]
    figs += [importance_heatmap(analysis, fam) for fam in views.families_present(analysis.linears)]
    name = layer if layer in analysis.names else views.best_layer(analysis, bits)
    row = analysis.layers[(analysis.layers["name"] == name) & (analysis.layers["bits"] == bits)].iloc[0]
    ev = analysis.evaluate_layer(name, alpha=float(row["best_alpha"]), bits=bits, group_size=int(row["group_size"]),
                                 zero_point=bool(analysis.settings.sweep.zero_point), n_grid=analysis.settings.sweep.n_grid)
    figs += layer_figures(ev)
    return figs


def figure_pack(analysis: "Analysis", bits: int, *, layer: str | None = None, include_3d: bool = True,
                formats: tuple[str, ...] = ("png", "svg", "pdf", "csv"), preset: str = "standard") -> bytes:
    """A ZIP of the standard figures (PNG, SVG, PDF + CSV each), 3D surfaces as PNG, and a README.

    ``layer``: the linear of the layer figures; ``preset``: ``standard`` or ``talk`` (16:9 slides).
    """
    figs = standard_figures(analysis, bits, layer)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        lines = [f"AWQ Explorer figure pack — {analysis.model_id}", f"cache entry: {analysis.path.name}",
                 f"bits: {bits}; calibration tokens: {analysis.manifest.get('n_tokens')}", "",
                 "settings: " + json.dumps(analysis.settings.to_dict(), default=str), "", "Figures:"]
        lines.insert(3, f"export preset: {PRESETS.get(preset, preset)}")
        for f in figs:
            spec = f.spec(preset)
            if "png" in formats:
                z.writestr(f"{f.slug}.png", f.png(preset=preset))
            if "svg" in formats:
                z.writestr(f"{f.slug}.svg", chart_svg(spec))
            if "pdf" in formats:
                z.writestr(f"{f.slug}.pdf", chart_pdf(spec))
            if "csv" in formats:
                z.writestr(f"{f.slug}.csv", f.csv())
            z.writestr(f"{f.slug}.vl.json", json.dumps(spec))
            lines.append(f"  {f.slug} ({figure_title(spec)})" + (f": {f.caption}" if f.caption else ""))
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


def figure_title(spec: dict[str, Any]) -> str:
    """The title text of a spec, as one line."""
    t = spec.get("title", "")
    t = t.get("text", "") if isinstance(t, dict) else t
    return " ".join(t) if isinstance(t, list) else str(t)


def slugify_model(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_id).split("/")[-1])[:60] or "model"


# --- Plan (issue 11; appended by the plan helper) ------------------------------------------------------

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

# --- Methods (RTN, MSE clip, AWQ, GPTQ, HQQ, rotation) ------------------------------------------------------

def methods_bars(df: pd.DataFrame, *, name: str, bits: int, group_size: int) -> Figure:
    """One layer, every method: relative output error on calibration and held-out rows (log x, lower is better).

    ``df``: ``core.studies.methods_table.compare``'s table (method, label, rel_error, rel_error_heldout, ...)."""
    long = df.melt(id_vars=["method", "label"], value_vars=["rel_error", "rel_error_heldout"], var_name="split",
                   value_name="error").replace({"split": {"rel_error": "calibration", "rel_error_heldout": "held-out"}})
    long = long[long["error"] > 0]
    order = df.sort_values("rel_error_heldout")["label"].tolist()
    chart = alt.Chart(long).mark_bar().encode(
        y=alt.Y("label:N", sort=order, title="method"),
        yOffset=alt.YOffset("split:N", sort=["calibration", "held-out"]),
        x=alt.X("error:Q", title=AX["rel_error"] + " (log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("split:N", title=None, sort=["calibration", "held-out"]),
        tooltip=["label:N", "split:N", alt.Tooltip("error:Q", format=".4g")],
    ).properties(width=WIDTH, height=max(200, 34 * len(order)),
                 title=_title(f"Methods on {name}, w{bits} g{group_size}",
                              "||X (W - W_hat)^T||^2 / ||X W^T||^2; sorted by held-out error"))
    return Figure(f"methods_w{bits}", chart, df, metrics.DEFINITIONS["rel_error"])


def methods_heatmap(h2h: pd.DataFrame, *, bits: int, a: str = "awq", b: str = "gptq") -> Figure:
    """Block x family heatmap of ``error(b) / error(a)`` on held-out rows (log colour scale centred on 1;
    > 1, blue: ``a`` wins). ``h2h``: ``core.studies.methods_table.head_to_head``'s table at one bit-width."""
    df = h2h[h2h["bits"] == bits].groupby(["block", "family"], as_index=False)["ratio"].median()
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
                 title=_title(f"Where does {a.upper()} beat {b.upper()}? w{bits}",
                              f"held-out error of {b} / error of {a}; > 1 (blue): {a} wins"))
    return Figure(f"{a}_vs_{b}_w{bits}", chart, df, metrics.DEFINITIONS["rel_error"])
