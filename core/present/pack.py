"""The figure pack: the standard figures of one analysis (Overview, Importance map, one layer) as a ZIP."""
from __future__ import annotations

import io
import json
import zipfile
from typing import TYPE_CHECKING, Any

from ..grids import metrics
from .common import PRESETS, Figure, best_layer, chart_pdf, chart_svg, families_present, gain_heatmap
from .importance_map import channel_matrix, importance_heatmap
from .layer_lab import layer_figures
from .overview import error_vs_bits, family_gains, hockey_stick
from .surface import surface_png

if TYPE_CHECKING:
    from ..analysis import Analysis


def standard_figures(analysis: "Analysis", bits: int, layer: str | None = None) -> list[Figure]:
    """The figures a talk about this model needs: overview, importance maps, one layer's figures.

    ``layer``: the linear of the layer figures (the one on screen); default the one AWQ helps most.
    """
    figs = [gain_heatmap(analysis, bits), gain_heatmap(analysis, bits, held_out=True), family_gains(analysis, bits),
            error_vs_bits(analysis), hockey_stick(analysis)]
    figs += [importance_heatmap(analysis, fam) for fam in families_present(analysis.linears)]
    name = layer if layer in analysis.names else best_layer(analysis, bits)
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
            for fam in families_present(analysis.linears):
                mat, _ = channel_matrix(analysis, fam, "importance")
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
