"""The 3D channel x block surface of the Importance map (pyvista, rendered off-screen through EGL).

Scene geometry and ticks, the plotter the interactive view serialises, its colour bar as a chart, the PNG
export of the figure pack.
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import pandas as pd

from .common import Figure, _title, log_applicable

if TYPE_CHECKING:
    import pyvista as pv


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
        if not log_applicable(vals):
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
