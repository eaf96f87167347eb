"""What more than one page shows: the one chart theme, :class:`Figure` and its exports, shared tables and helpers.

A :class:`Figure` is a chart plus the exact table it draws. The app shows ``figure.chart`` with
``theme=None`` (so Streamlit adds no theme of its own) and offers ``png()`` / ``svg()`` / ``pdf()`` /
``csv()``; all of them come from the same Vega-Lite spec, so what is on screen is what is exported.
Charts have a fixed size that fits two side by side on a laptop screen (460 x 260 px, 960 px for wide
ones); the PNG is rendered at scale 4 (1840 px wide: sharp on a 1080p slide), SVG and PDF are vector.
The ``talk`` preset (``png(preset="talk")`` ...) re-renders the same spec for a 16:9 slide: 1920 x 1080 px,
fonts about twice as large. Every axis has a title with its unit; index axes (channels, ranks) have integer
ticks; titles are wrapped to the chart's width.

The tables (views) are shaped from an ``Analysis`` (pure pandas/torch). Each returns the exact data a chart
draws, so the chart, its CSV export and the tests all see the same numbers. Wide data is pre-aggregated
(Altair refuses more than 5,000 rows by default).

What only one page uses lives in that page's module. No streamlit import here: the figure pack and the tests
use this module headless.
"""
from __future__ import annotations

import copy
import io
import math
import textwrap
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import pandas as pd

from ..grids import llamacpp, metrics
from ..grids.spec import QuantSpec

if TYPE_CHECKING:
    from ..analysis import Analysis


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


# --- Figure and exports -------------------------------------------------------------------------------

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


def slugify_model(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_id).split("/")[-1])[:60] or "model"


# --- the talk preset ----------------------------------------------------------------------------------

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


# --- small helpers ------------------------------------------------------------------------------------

def text_width(text: str, font_size: float) -> float:
    """A generous estimate of a line's width in px (0.6 em per character; Liberation Sans averages ~0.5)."""
    return 0.6 * font_size * len(text)


def fit_lines(text: str, width: float, font_size: float) -> list[str] | str:
    """``text`` wrapped into lines no wider than ``width`` px (a single string when it fits)."""
    n = max(12, int(width / (0.6 * font_size)))
    lines = textwrap.wrap(text, n, break_long_words=False, break_on_hyphens=False) or [text]
    return lines[0] if len(lines) == 1 else lines


def _family_sort(families: list[str]) -> list[str]:
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(families, key=lambda f: order.get(f, 99))


def _title(text: str, subtitle: str | None = None, width: int = WIDTH) -> alt.TitleParams:
    """A title (and subtitle) wrapped to the chart's width: the y axis adds ~60 px, nothing is cut."""
    room = width + 60
    t = fit_lines(text, room, TITLE_SIZE)
    if subtitle:
        return alt.TitleParams(t, subtitle=fit_lines(subtitle, room, SUBTITLE_SIZE))
    return alt.TitleParams(t)


# --- axis titles (one wording per quantity, with its unit) --------------------------------------------

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


# --- shared view helpers: module families, salient channels, bit-widths, layers, log scales -----------

# Family order the UI uses everywhere (data flow through a block), then anything else.
FAMILY_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other")
MAX_CHART_ROWS = 5000


def families_present(linears: pd.DataFrame) -> list[str]:
    present = set(linears["family"])
    return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))


def salient_count(n_channels: int) -> int:
    """How many channels count as salient: the top 1% (the same k as ``metrics.top1_share``)."""
    return max(1, n_channels // 100)


def bits_available(analysis: "Analysis") -> list[int]:
    return sorted(int(b) for b in analysis.layers["bits"].unique())


def default_bits(analysis: "Analysis") -> int:
    """3 bits when swept (where AWQ matters most and the seed reports), else the lowest swept width above 2."""
    bits = bits_available(analysis)
    if 3 in bits:
        return 3
    above2 = [b for b in bits if b > 2]
    return above2[0] if above2 else bits[0]


def best_layer(analysis: "Analysis", bits: int) -> str:
    """The linear where AWQ helps most in-sample at ``bits`` (the Layer Lab's opening layer)."""
    lay = analysis.layers[analysis.layers["bits"] == bits]
    if lay.empty or lay["gain"].isna().all():
        return analysis.names[0]
    return str(lay.loc[lay["gain"].idxmax(), "name"])


def log_applicable(values) -> bool:
    """A log scale can show these values: all finite and > 0 (excess kurtosis, for one, can be negative)."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.size) and bool(np.isfinite(v).all()) and bool((v > 0).all())


def _rank_points(n: int, k: int = 120) -> np.ndarray:
    """Ranks ``1..n`` thinned log-uniformly to about ``k`` points (keeps every one of the top ranks)."""
    return np.unique(np.round(np.geomspace(1, n, num=min(n, k))).astype(int))


# --- number formats (what the pages print and the tests compare against) ------------------------------

def fmt_rel(x: float) -> str:
    """How the UI prints a relative error (also what the tests compare against)."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def fmt_db(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else ("inf dB" if math.isinf(x) else f"{x:.2f} dB")


def fmt_count_of(k: int, n: int) -> str:
    """``k of n`` as a share without rounding a miss away: 209 of 210 is "99.5%", never "100%"."""
    if n <= 0:
        return "n/a"
    share = k / n
    text = f"{share:.0%}"
    if (text == "100%" and k < n) or (text == "0%" and k > 0):
        text = f"{share:.1%}"
    return text


def fmt_gain(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}x"


# --- grids: the integer grid or a llama.cpp type (Layer Lab, Methods) -----------------------------------

def grid_label(spec: QuantSpec, in_features: int) -> str:
    """How the pages name a grid on a linear ``in_features`` wide: ``w4 g64`` (``per row``), or a llama.cpp type
    with the type it is really stored in when llama.cpp falls back (``Q4_K → Q5_0``)."""
    if spec.format:
        stored = spec.stored_type(in_features)
        return spec.format if stored == spec.format else f"{spec.format} → {stored}"
    g = spec.group(in_features)
    return f"w{spec.bits} " + ("per row" if g == int(in_features) else f"g{g}")


def type_note(spec: QuantSpec, in_features: int) -> str | None:
    """One sentence when llama.cpp stores a linear ``in_features`` wide in another type than ``spec.format``
    (llama-quantize's fallback: the type's block does not divide the row), naming that type and its bits per
    weight; None on the integer grid and where the type fits."""
    if not spec.format:
        return None
    stored = spec.stored_type(in_features)
    if stored == spec.format:
        return None
    block = llamacpp.block_size(spec.format)
    return (f"{spec.format}'s blocks of {block} do not divide this linear's {int(in_features)} inputs, so llama.cpp "
            f"stores it as **{stored}** ({spec.cost(in_features):g} bits per weight instead of "
            f"{llamacpp.bits_per_weight(spec.format):g}), as llama-quantize falls back; every number here is {stored}'s.")


def type_fallbacks(spec: QuantSpec, widths: dict[str, int]) -> str | None:
    """For a whole model (``widths``: linear name -> input width): one sentence on how many linears llama.cpp stores
    in another type than ``spec.format`` and which, with the bits per weight of each; None when all fit."""
    if not spec.format:
        return None
    stored: dict[str, list[str]] = {}
    for n, w in widths.items():
        stored.setdefault(spec.stored_type(int(w)), []).append(n)
    moved = {t: ns for t, ns in stored.items() if t != spec.format}
    if not moved:
        return None
    n_all = len(widths)
    parts = [f"{len(ns)} of {n_all} linears as **{t}** ({(16.0 if t == llamacpp.F16 else llamacpp.bits_per_weight(t)):g} "
             f"bits per weight; widths {', '.join(str(w) for w in sorted({int(widths[n]) for n in ns}))})"
             for t, ns in sorted(moved.items())]
    return (f"{spec.format}: its blocks of {llamacpp.block_size(spec.format)} do not divide every width, so llama.cpp "
            f"stores " + "; ".join(parts) + f" (llama-quantize's fallback); the rest are {spec.format} "
            f"({llamacpp.bits_per_weight(spec.format):g} bits per weight).")


# --- analysis labels (the sidebar's cached analyses and the Compare page) -----------------------------

def _settings_parts(manifest: dict[str, Any]) -> dict[str, str]:
    """The settings of a cached analysis that can tell two analyses apart, each as a short readable part."""
    s = manifest.get("settings", {})
    cal, sw = s.get("calibration", {}), s.get("sweep", {})
    src = str(cal.get("source", "?")).rsplit("/", 1)[-1]
    g = int(sw.get("group_size", 0) or 0)
    return {
        "model": str(manifest.get("model_id", "?")).rstrip("/").split("/")[-1],
        "zero_point": "zero point" if sw.get("zero_point", True) else "symmetric",
        "group_size": f"group {g}" if g > 0 else "per-row groups",
        "tokens": f"{cal.get('n_samples')}x{cal.get('seqlen')} tokens",
        "heldout": f"{cal.get('heldout_samples')} held-out blocks",
        "calibration": f"text {src}",
        "bits": "bits " + ",".join(str(b) for b in sw.get("bits", [])),
        "grid": f"grid {sw.get('n_grid')}",
        "dtype": str(s.get("dtype", "")),
        "rows": f"{s.get('sample_rows')} sample rows",
    }


def compare_labels(manifests: list[dict[str, Any]]) -> list[str]:
    """One label per analysis: the model name plus only the settings that differ between ``manifests``.

    Two analyses of the same model at different zero point / group size / tokens read
    ``all-MiniLM-L6-v2 · symmetric · group 64`` and ``all-MiniLM-L6-v2 · zero point · group 128``; identical
    settings fall back to the creation time. Labels are unique.
    """
    parts = [_settings_parts(m) for m in manifests]
    keys = [k for k in (parts[0] if parts else {}) if k != "model" and len({p[k] for p in parts}) > 1]
    labels = [" · ".join([p["model"]] + [p[k] for k in keys]) for p in parts]
    for i, m in enumerate(manifests):
        if labels.count(labels[i]) > 1:
            labels[i] += f" · {str(m.get('created', ''))[5:16].replace('T', ' ')}"
    seen: dict[str, int] = {}
    for i, lab in enumerate(list(labels)):  # still equal (same minute): number them
        seen[lab] = seen.get(lab, 0) + 1
        if labels.count(lab) > 1:
            labels[i] = f"{lab} #{seen[lab]}"
    return labels


# --- summaries of a sweep (Overview, Compare, How AWQ works) ------------------------------------------

def headline(analysis: "Analysis", bits: int) -> dict[str, Any]:
    """The numbers at the top of the Overview for one bit-width."""
    lay = analysis.layers[analysis.layers["bits"] == bits]
    ch = analysis.channels
    ratio = ch.groupby("input_key")["mean_abs"].agg(lambda s: float(s.max() / max(s.median(), 1e-12)))
    worst_key = str(ratio.idxmax()) if len(ratio) else ""
    worst = ch[ch["input_key"] == worst_key]
    top_channel = int(worst.loc[worst["mean_abs"].idxmax(), "channel"]) if len(worst) else -1
    n_params = int((analysis.linears["in_features"] * analysis.linears["out_features"]).sum())
    return {
        "model_id": analysis.model_id,
        "n_linears": int(len(analysis.linears)),
        "n_blocks": int(analysis.linears["block"].nunique()),
        "n_params": n_params,
        "n_tokens": int(analysis.manifest.get("n_tokens", 0)),
        "median_gain": float(lay["gain"].median()),
        "median_gain_heldout": float(lay["gain_heldout"].median()),
        "share_helped_heldout": float((lay["gain_heldout"] > 1).mean()),
        "n_helped_heldout": int((lay["gain_heldout"] > 1).sum()),
        "median_rtn_rel": float(lay["rtn_rel"].median()),
        "median_awq_rel": float(lay["awq_rel"].median()),
        "max_outlier_ratio": float(ratio.max()) if len(ratio) else float("nan"),
        "max_outlier_input": worst_key,
        "max_outlier_channel": top_channel,
    }


def family_table(layers: pd.DataFrame, bits: int) -> pd.DataFrame:
    """Per module family at ``bits``: layer count, median errors, gains in-sample and held-out, alphas."""
    lay = layers[layers["bits"] == bits]
    grp = lay.groupby("family")
    out = pd.DataFrame({
        "layers": grp.size(),
        "median_rtn_rel": grp["rtn_rel"].median(),
        "median_awq_rel": grp["awq_rel"].median(),
        "mean_gain": grp["gain"].mean(),
        "median_gain": grp["gain"].median(),
        "median_gain_heldout": grp["gain_heldout"].median(),
        "mean_best_alpha": grp["best_alpha"].mean(),
        "mean_top1_share": grp["top1_share"].mean(),
        "max_kurtosis": grp["max_kurtosis"].max(),
    }).reset_index()
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return out.sort_values("family", key=lambda s: s.map(lambda f: order.get(f, 99))).reset_index(drop=True)


def gain_matrix(layers: pd.DataFrame, bits: int, held_out: bool = False) -> pd.DataFrame:
    """``block x family`` AWQ gain at ``bits`` (long format: block, family, gain, name)."""
    col = "gain_heldout" if held_out else "gain"
    lay = layers[layers["bits"] == bits]
    return (lay[["block", "family", "name", col]].rename(columns={col: "gain"})
            .sort_values(["block", "family"]).reset_index(drop=True))


def error_by_bits(layers: pd.DataFrame) -> pd.DataFrame:
    """Median relative output error per bit-width for RTN and AWQ, on calibration and held-out rows."""
    rows = []
    for b, lay in layers.groupby("bits"):
        for method, split, col in (("RTN", "calibration", "rtn_rel"), ("AWQ", "calibration", "awq_rel"),
                                   ("RTN", "held-out", "rtn_rel_heldout"), ("AWQ", "held-out", "awq_rel_heldout")):
            v = lay[col].dropna()
            if v.empty:
                continue
            rows.append({"bits": int(b), "method": method, "split": split, "median_rel_error": float(v.median()),
                         "q25": float(v.quantile(0.25)), "q75": float(v.quantile(0.75)),
                         "median_sqnr_db": metrics.sqnr_db(float(v.median()))})
    return pd.DataFrame(rows)


def error_ratio_by_bits(layers: pd.DataFrame) -> pd.DataFrame:
    """Median over linears of AWQ error / RTN error per bit-width, on calibration and held-out rows.

    The per-layer ratio is ``1 / gain``: below 1, AWQ's output error is smaller than RTN's.
    """
    rows = []
    for b, lay in layers.groupby("bits"):
        for split, num, den in (("calibration", "awq_rel", "rtn_rel"), ("held-out", "awq_rel_heldout", "rtn_rel_heldout")):
            r = (lay[num] / lay[den]).replace([np.inf, -np.inf], np.nan).dropna()
            if r.empty:
                continue
            rows.append({"bits": int(b), "split": split, "median_awq_over_rtn": float(r.median()),
                         "q25": float(r.quantile(0.25)), "q75": float(r.quantile(0.75))})
    return pd.DataFrame(rows)


def hockey_stick(analysis: "Analysis", by: str = "family", n_points: int = 120) -> pd.DataFrame:
    """Sorted channel importance (the 'hockey stick'), each linear normalised by its own mean importance.

    Every linear's sorted curve is read off at the same log-spaced ranks, given as a percentage of its
    channels (so layers of different widths line up), then averaged per family (``by="family"``) or over
    all linears (``by="all"``).
    """
    imp = analysis.importance
    fam = analysis.linears.set_index("name")["family"]
    curves: dict[str, list[np.ndarray]] = {}
    widths = imp.groupby("name", sort=False).size()
    if widths.empty:
        return pd.DataFrame(columns=["group", "rank_pct", "importance_norm"])
    grid = np.geomspace(100.0 / int(widths.max()), 100.0, n_points)
    for name, g in imp.groupby("name", sort=False):
        v = np.sort(g["importance"].to_numpy(dtype=np.float64))[::-1]
        if v.size == 0 or not np.isfinite(v).all() or v.mean() <= 0:
            continue
        v = v / v.mean()
        pct = 100.0 * np.arange(1, v.size + 1) / v.size
        # Only inside the layer's own ranks: a narrow layer has no channel at 0.1 %, so it has no value
        # there (NaN) rather than a flat plateau copied from its top channel.
        lp, lg = np.log(pct), np.log(grid)
        lg = np.where(np.abs(lg - lp[0]) < 1e-9, lp[0], np.where(np.abs(lg - lp[-1]) < 1e-9, lp[-1], lg))
        vals = np.interp(lg, lp, v, left=np.nan, right=np.nan)
        curves.setdefault(str(fam.get(name, "other")) if by == "family" else "all linears", []).append(vals)
    rows = []
    for k, vs in curves.items():
        stack = np.vstack(vs)
        have = np.isfinite(stack).sum(0)
        # a grid point is kept where every linear of the group has data (the narrowest sets the start)
        keep = have == stack.shape[0]
        mean = np.where(keep, np.nansum(stack, axis=0) / np.maximum(have, 1), np.nan)
        rows.append(pd.DataFrame({"group": k, "rank_pct": grid[keep], "importance_norm": mean[keep]}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["group", "rank_pct", "importance_norm"])


# --- charts more than one page shows (Overview, Compare, How AWQ works) -------------------------------

def gain_heatmap(analysis: "Analysis", bits: int, held_out: bool = False) -> Figure:
    """Block x family heatmap of the AWQ gain (log colour scale centred on 1: blue = AWQ helps)."""
    df = gain_matrix(analysis.layers, bits, held_out)
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


def hockey_stick_chart(df: pd.DataFrame, color: str, title: str, subtitle: str,
                       order: list[str] | None = None) -> alt.Chart:
    return alt.Chart(df).mark_line().encode(
        x=alt.X("rank_pct:Q", title="channel rank, % of the layer's channels (log scale)",
                scale=alt.Scale(type="log", domain=[float(df["rank_pct"].min()) if len(df) else 0.01, 100], nice=False)),
        y=alt.Y("importance_norm:Q", title="importance / layer mean (×)"),
        color=alt.Color(f"{color}:N", title={"group": "family", "analysis": None}.get(color, color), sort=order),
        tooltip=[f"{color}:N", alt.Tooltip("rank_pct:Q", format=".2f"), alt.Tooltip("importance_norm:Q", format=".2f")],
    ).properties(width=WIDTH, height=HEIGHT, title=_title(title, subtitle))
