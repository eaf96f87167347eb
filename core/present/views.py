"""The tables the app's pages and the figure pack show, shaped from an ``Analysis`` (pure pandas/torch).

Each function returns the exact data a chart draws, so the chart, its CSV export and the tests all see
the same numbers. Wide data is pre-aggregated here (Altair refuses more than 5,000 rows by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..methods import awq_search as awq
from ..grids import metrics
from ..studies.sweep import layer_group_size

if TYPE_CHECKING:
    from ..analysis import Analysis, LayerEval

# Family order the UI uses everywhere (data flow through a block), then anything else.
FAMILY_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other")
FAMILY_LABELS = {"q": "q", "k": "k", "v": "v", "qkv": "qkv (fused)", "o": "o (attn out)", "gate": "gate",
                 "up": "up (FFN in)", "gate_up": "gate_up (fused)", "down": "down (FFN out)", "other": "other"}
MAX_CHART_ROWS = 5000
CHANNEL_VALUES = {
    "importance": "importance",
    "mean_abs": "mean |x| (activation scale)",
    "max_abs": "max |x|",
    "kurtosis": "excess kurtosis",
}


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


# --- Overview ---------------------------------------------------------------------------------------

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


def _rank_points(n: int, k: int = 120) -> np.ndarray:
    """Ranks ``1..n`` thinned log-uniformly to about ``k`` points (keeps every one of the top ranks)."""
    return np.unique(np.round(np.geomspace(1, n, num=min(n, k))).astype(int))


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


# --- Importance map ---------------------------------------------------------------------------------

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


def log_applicable(values) -> bool:
    """A log scale can show these values: all finite and > 0 (excess kurtosis, for one, can be negative)."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.size) and bool(np.isfinite(v).all()) and bool((v > 0).all())


# --- Layer Lab --------------------------------------------------------------------------------------

def alpha_curve(ev: "LayerEval") -> pd.DataFrame:
    """The scale search of one layer: relative output error (and the official MSE ``loss``) per alpha.

    Computed as ``ev`` was: same bits, group size, zero point and duo scaling, without clipping
    (official AWQ chooses alpha first, then clips). Alpha 0 is plain RTN only without duo scaling.
    """
    return pd.DataFrame({"alpha": ev.search.alphas.numpy(), "loss": ev.search.losses.numpy(),
                         "rel_error": ev.rel_curve.double().numpy()})


def clipped_alpha_curve(analysis: "Analysis", name: str, *, bits: int, group_size: int, zero_point: bool = True,
                        duo_scaling: bool = False, n_grid: int = 20, progress=None) -> pd.DataFrame:
    """Relative output error vs alpha with AWQ's clip search after scaling, at every alpha of the grid.

    Each point is what ``Analysis.evaluate_layer(..., clip=True, clip_qk=True)`` computes at that alpha
    (scales, per-(row, group) clip search on the scaled weights, ``Q(clip(W s)) / s``), on the calibration
    sample. One clip search per alpha, so it takes seconds: the Layer Lab computes it on request.
    Columns: alpha, rel_error, rel_error_heldout.
    """
    info = analysis.info(name)
    g = layer_group_size(int(info["in_features"]), group_size) if group_size > 0 else int(info["in_features"])
    w, x = analysis.weight(name), analysis.inputs(name)
    alphas = awq.alpha_grid(n_grid).tolist()
    rel, rel_h = [], []
    for i, alpha in enumerate(alphas):
        s = analysis.scales_at(name, alpha, group_size=g, duo_scaling=duo_scaling)
        ws = w * s.view(1, -1)
        max_val = awq.search_clip(ws, x / s.view(1, -1), bits=bits, group_size=g, zero_point=zero_point)
        w_hat = awq.scaled_fake_quant(awq.apply_clip(ws, max_val) / s.view(1, -1), s, bits, g, zero_point)
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


def best_layer(analysis: "Analysis", bits: int) -> str:
    """The linear where AWQ helps most in-sample at ``bits`` (the Layer Lab's opening layer)."""
    lay = analysis.layers[analysis.layers["bits"] == bits]
    if lay.empty or lay["gain"].isna().all():
        return analysis.names[0]
    return str(lay.loc[lay["gain"].idxmax(), "name"])


def group_size_options(in_features: int, candidates: tuple[int, ...] = (16, 32, 64, 128, 256, 512)) -> list[int]:
    """Group sizes that divide ``in_features``; ``0`` (one group per output row) is always possible."""
    return [g for g in candidates if g < in_features and in_features % g == 0] + [0]


# --- Clipping -------------------------------------------------------------------------------------

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
    errs, _ = awq.clip_errors(w, x, bits=bits, group_size=g, zero_point=zero_point, n_grid=n_grid,
                              max_shrink=max_shrink)
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


# --- Compare --------------------------------------------------------------------------------------

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


def _labels(analyses: list["Analysis"]) -> list[str]:
    return compare_labels([a.manifest for a in analyses])


def model_label(analysis: "Analysis") -> str:
    """Short label for one model: the last part of its id (comparisons use ``compare_labels``)."""
    return str(analysis.model_id).rstrip("/").split("/")[-1]


def compare_family_gains(analyses: list["Analysis"], bits: int) -> pd.DataFrame:
    frames = []
    for a, label in zip(analyses, _labels(analyses)):
        if bits not in bits_available(a):
            continue
        ft = family_table(a.layers, bits)
        ft.insert(0, "analysis", label)
        frames.append(ft)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_hockey(analyses: list["Analysis"]) -> pd.DataFrame:
    frames = []
    for a, label in zip(analyses, _labels(analyses)):
        hs = hockey_stick(a, by="all")
        hs["group"] = label
        frames.append(hs)
    return pd.concat(frames, ignore_index=True).rename(columns={"group": "analysis"}) if frames else pd.DataFrame()


def compare_error_by_bits(analyses: list["Analysis"]) -> pd.DataFrame:
    frames = []
    for a, label in zip(analyses, _labels(analyses)):
        eb = error_by_bits(a.layers)
        eb.insert(0, "analysis", label)
        frames.append(eb)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_headlines(analyses: list["Analysis"], bits: int) -> pd.DataFrame:
    rows = []
    for a, label in zip(analyses, _labels(analyses)):
        if bits not in bits_available(a):
            continue
        h = headline(a, bits)
        rows.append({"analysis": label, "model_id": a.model_id, "linears": h["n_linears"],
                     "tokens": h["n_tokens"], "median_gain": h["median_gain"],
                     "median_gain_heldout": h["median_gain_heldout"], "median_awq_rel": h["median_awq_rel"],
                     "max_mean_abs_over_median": h["max_outlier_ratio"]})
    return pd.DataFrame(rows)


# --- Model quality ---------------------------------------------------------------------------------

ERROR_METRICS = ("kl", "hidden_rel_error")  # model-level metrics that are errors (0 = identical to fp)


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


# --- How AWQ works (a first-visit walk through one layer of the current model) ----------------------

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
