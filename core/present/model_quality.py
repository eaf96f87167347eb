"""Model quality: layer-level against model-level gain, the whole-model metrics per mode, per-token KL."""
from __future__ import annotations

from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ..grids import llamacpp, metrics
from .common import HEIGHT, PALETTE, WIDE, WIDTH, Figure, _title


ERROR_METRICS = ("kl", "hidden_rel_error")  # model-level metrics that are errors (0 = identical to fp)
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


# --- views --------------------------------------------------------------------------------------------

def gain_levels(layers: pd.DataFrame, quality: pd.DataFrame, sweep_group_size: int | None = None) -> pd.DataFrame:
    """Layer-level and model-level gain side by side, per bit-width, at one group size.

    Layer level: the sweep's median gain (in-sample and held-out). Model level: for an error metric
    (KL for causal LMs, hidden-state error for encoders) ``error(rtn) / error(mode)`` for each quantized
    mode, the same ratio the layer gain is. Needs ``rtn`` rows in ``quality``. ``group_size`` says the group
    size of both; when the model-level rows are at another group size than the sweep
    (``sweep_group_size``), the layer gains are NaN rather than numbers from another setting.
    """
    q = quality[quality["metric"].isin(ERROR_METRICS) & (quality["mode"] != "fp")]
    groups = sorted({int(g) for g in q["group_size"].unique()}) if "group_size" in q else []
    same = sweep_group_size is None or groups == [int(sweep_group_size)]
    rows = []
    for b in sorted(int(x) for x in q["bits"].unique()):
        lay = layers[layers["bits"] == b] if same else layers.iloc[0:0]
        row: dict[str, Any] = {"bits": b, "group_size": groups[0] if len(groups) == 1 else -1,
                               "layer_gain": float(lay["gain"].median()) if len(lay) else float("nan"),
                               "layer_gain_heldout": float(lay["gain_heldout"].median()) if len(lay) else float("nan")}
        qb = q[q["bits"] == b]
        for metric, qm in qb.groupby("metric"):
            rtn = qm.loc[qm["mode"] == "rtn", "value"]
            if rtn.empty:
                continue
            for mode, v in zip(qm["mode"], qm["value"]):
                if mode != "rtn":
                    row[f"{mode} ({metric})"] = metrics.gain(float(rtn.iloc[-1]), float(v))
        rows.append(row)
    return pd.DataFrame(rows)


# --- figures ------------------------------------------------------------------------------------------

def grid_labels(df: pd.DataFrame) -> pd.Series:
    """Each row's grid: ``w4`` on the integer grid, the llama.cpp type (column ``format``) for a type's rows."""
    fmt = df["format"].fillna("") if "format" in df else pd.Series("", index=df.index)
    return fmt.where(fmt != "", "w" + df["bits"].astype(str))


def _grid_order(labels) -> list[str]:
    """Integer grids by bits, then llama.cpp types by bits per weight."""
    return sorted(set(labels), key=lambda b: (1, llamacpp.bits_per_weight(b)) if llamacpp.is_type(b) else (0, int(b[1:])))


def metric_label(metric: str) -> str:
    """A readable name for a model-level metric (its key stays in the CSV and the tooltip)."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def quality_bars(df: pd.DataFrame) -> Figure:
    """One panel per metric (independent y starting near the data): a dot per mode and bit-width, fp as a line.

    fp is the unquantized reference, so it is drawn as a dashed horizontal line in each panel rather than
    as a bit-width. Standard-error metrics (``*_se``) are left out of the panels (they stay in the CSV).
    """
    data = df[["mode", "bits", "group_size", "metric", "value"]].assign(grid=grid_labels(df))
    data = data[~data["metric"].astype(str).str.endswith("_se")]
    data["metric_label"] = data["metric"].map(metric_label)
    data["bits_label"] = np.where(data["mode"] == "fp", "fp (not quantized)", data["grid"])
    modes = [m for m in ("rtn", "awq", "awq-grouped", "awq-clip", "const-alpha") if m in set(data["mode"])]
    modes += sorted(set(data["mode"]) - set(modes) - {"fp"})
    metrics_present = list(dict.fromkeys(data["metric_label"]))
    n = max(1, len(metrics_present))
    cols = min(n, 3)
    width = max(200, (WIDE - 60 * cols) // cols)
    quant_bits = _grid_order(data.loc[data["mode"] != "fp", "bits_label"])
    pts = alt.Chart().mark_point(size=110, filled=True).encode(
        x=alt.X("mode:N", sort=modes, title="quantization mode", axis=alt.Axis(labelAngle=-30)),
        xOffset=alt.XOffset("bits_label:N", sort=quant_bits),
        y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False, nice=True)),
        color=alt.Color("bits_label:N", title="grid", sort=quant_bits),
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


def kl_distribution(kl: pd.DataFrame) -> Figure:
    """Per-token KL(p_fp || q) as a cumulative distribution per mode, one panel per bit-width, from the
    quantiles of ``core.evaluate.cached_kl`` (columns mode, bits, fraction, kl). Log x axis: KL values
    below 1e-6 nats (and the exact zeros) are drawn at 1e-6."""
    data = kl[["mode", "bits", "fraction", "kl"]].copy()
    data["kl"] = data["kl"].clip(lower=1e-6)
    data["bits"] = grid_labels(kl)
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
        column=alt.Column("bits:N", title=None, sort=_grid_order(data["bits"])),
    ).properties(title=_title("Per-token KL divergence to full precision",
                              "cumulative share of held-out tokens; further left is better"))
    return Figure("kl_distribution", chart, kl)


# --- GGUF export (issue 19): what the pages show after "Write GGUF" ---------------------------------------------

GGUF_METHODS = ("rtn", "awq-grouped", "awq-clip")  # the model methods a GGUF stores as they are (folded, no Q(Ws)/s)


def export_folder(analysis, label: str) -> "Path":
    """A new folder for an export from the app: ``<analysis cache>/exports/<label>-<UTC time>``."""
    import re
    import time
    from pathlib import Path

    root = Path(analysis.path) / "exports"
    root.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "export"
    return root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{time.time_ns() % 1000000:06d}"


RUNTIMES = {"gguf": "llama.cpp", "compressed-tensors": "transformers"}  # what reads each export format back


def runtime_label(summary: dict) -> str:
    """The runtime an export was verified in, as a column name (``llama.cpp``, ``transformers``)."""
    return RUNTIMES.get(str(summary.get("format")), "runtime")


def verification_table(summary: dict) -> pd.DataFrame:
    """``metric, <runtime>, explorer, difference`` of an export's verification (``summary['verify']['rows']``): each
    metric against the fp model as the runtime that loaded the written files computes it (``runtime_label``: a GGUF
    in llama.cpp, a compressed-tensors folder in transformers) beside the explorer's for the same weights."""
    rt = runtime_label(summary)
    rows = (summary.get("verify") or {}).get("rows", [])
    value = [r["runtime"] if "runtime" in r else r["llamacpp"] for r in rows]
    return pd.DataFrame([{"metric": r["metric"], rt: v, "explorer": r["explorer"], "difference": v - r["explorer"]}
                         for r, v in zip(rows, value)], columns=["metric", rt, "explorer", "difference"])


def export_caption(summary: dict) -> str:
    """One line on what an export wrote: method, folder, size, time, and the format's own facts (a GGUF's tensor
    types; a checkpoint's config groups, stored bits per quantized weight and kept linears)."""
    parts = [f"{summary.get('method')} → `{summary['folder']}`", f"{summary['bytes'] / 2**20:.1f} MiB",
             f"{summary['seconds']:.0f} s"]
    if summary.get("tensor_types"):
        parts.append("tensors " + ", ".join(f"{t} x{n}" for t, n in summary["tensor_types"].items()))
    if summary.get("groups"):
        parts.append("config groups " + ", ".join(f"{g}: {n} linears" for g, n in summary["groups"].items()))
    if summary.get("linear_bits_per_weight") is not None:
        parts.append(f"{summary['linear_bits_per_weight']:.4g} bits per weight in the linears (bytes written)")
    if summary.get("fallbacks"):
        parts.append(f"{len(summary['fallbacks'])} linears in llama.cpp's fallback type (their width)")
    if summary.get("bits_per_weight") is not None and summary.get("format") == "compressed-tensors":
        parts.append(f"{summary['bits_per_weight']:.4g} stored bits per quantized weight")
    if summary.get("kept"):
        parts.append(f"{summary['kept']} linears kept in full precision")
    return " · ".join(parts)
