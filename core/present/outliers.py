"""Outliers: massive activations and super weights (``core.studies.anatomy``), their interventions and what each
quantizer does to them. Views (tables the page, the CLI and the figures share) and figures."""
from __future__ import annotations

import math
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ..studies.anatomy import Anatomy, sw_label
from .common import ACCENT, AX, HEIGHT, INT, MUTED, PALETTE, WIDE, WIDTH, Figure, _title

QUALITY = ("perplexity", "kl", "kl_p99", "same_top", "rms_dp")  # the model-level columns the tables show


# --- views ----------------------------------------------------------------------------------------------

def token_label(split: str, seq: int, pos: int, token: str) -> str:
    """``cal 2 · pos 0 · 'The'``: where a token sits and what it is (its text quoted, so spaces and newlines show)."""
    return f"{'cal' if str(split).startswith('cal') else 'held'} {int(seq)} · pos {int(pos)} · {token!r}"


def massive_dims(an: Anatomy) -> list[int]:
    """Every residual dimension with a massive activation in some layer."""
    return sorted({int(d) for d in an.massive["dim"]})


def dims_view(an: Anatomy) -> pd.DataFrame:
    """Per massive dimension: the layers it is massive in, its largest |h| and sign, and how many tokens carry it."""
    m = an.massive
    rows = []
    for d, g in m.groupby("dim"):
        top = g.loc[g["value"].abs().idxmax()]
        first = int(g["layer"].min())
        at_first = g[g["layer"] == first]
        rows.append({"dim": int(d), "first_layer": first, "last_layer": int(g["layer"].max()),
                     "n_layers": int(g["layer"].nunique()), "max_abs": float(abs(top["value"])),
                     "sign": "+" if top["value"] > 0 else "-", "n_tokens_first_layer": int(len(at_first)),
                     "share_at_position_0": float((at_first["pos"] == 0).mean())})
    return pd.DataFrame(rows, columns=["dim", "first_layer", "last_layer", "n_layers", "max_abs", "sign",
                                       "n_tokens_first_layer", "share_at_position_0"])


def massive_tokens(an: Anatomy, layer: int | None = None) -> pd.DataFrame:
    """The tokens carrying a massive activation at ``layer`` (default: the first layer with one), the largest first:
    where they are, their text, which dimensions and the largest value."""
    layer = an.first_massive_layer if layer is None else layer
    m = an.massive[an.massive["layer"] == layer] if layer is not None else an.massive.iloc[0:0]
    rows = []
    for (split, seq, pos, token), g in m.groupby(["split", "seq", "pos", "token"], sort=False):
        top = g.loc[g["value"].abs().idxmax()]
        rows.append({"layer": int(layer), "split": split, "seq": int(seq), "pos": int(pos), "token": token,
                     "dims": ",".join(str(int(d)) for d in sorted(g["dim"])), "value": float(top["value"]),
                     "label": token_label(split, seq, pos, token)})
    df = pd.DataFrame(rows, columns=["layer", "split", "seq", "pos", "token", "dims", "value", "label"])
    return df.iloc[df["value"].abs().argsort()[::-1]].reset_index(drop=True) if len(df) else df


def token_summary(an: Anatomy, layer: int | None = None) -> str:
    """One sentence: how many tokens carry the massive activations at ``layer`` and where they sit."""
    t = massive_tokens(an, layer)
    if t.empty:
        return "No token carries a massive activation."
    at0 = t[t["pos"] == 0]
    later = t[t["pos"] > 0]
    text = (f"{len(t)} token{'s' if len(t) != 1 else ''} carry them at layer {int(t['layer'].iloc[0])}: {len(at0)} "
            f"{'is' if len(at0) == 1 else 'are'} the first token of their block (position 0)")
    if len(later):
        shown = "; ".join(f"{r.label}" for r in later.head(5).itertuples())
        text += f", {len(later)} sit{'s' if len(later) == 1 else ''} later ({shown}{'; ...' if len(later) > 5 else ''})"
    return text + "."


def super_table(an: Anatomy) -> pd.DataFrame:
    """The super weights with their label, value, rank among their tensor's |w| and size against the median |w|."""
    s = an.tables["super"].copy()
    if s.empty:
        return s.assign(label=pd.Series(dtype=str), times_median=pd.Series(dtype=float),
                        perplexity_zeroed=pd.Series(dtype=float), kl_zeroed=pd.Series(dtype=float))
    s["label"] = [sw_label(l, r, c) for l, r, c in zip(s["layer"], s["row"], s["col"])]
    s["times_median"] = s["value"].abs() / s["median_abs_weight"]
    iv = interventions_view(an).set_index("variant")
    for m in ("perplexity", "kl"):
        s[f"{m}_zeroed"] = [float(iv[m].get(f"zero super weight {x}", np.nan)) if m in iv else np.nan
                            for x in s["label"]]
    return s[["label", "name", "layer", "row", "col", "value", "rank", "n_weights", "times_median",
              "perplexity_zeroed", "kl_zeroed", "iteration", "input_value", "output_value", "pos", "token"]]


def largest_spike(an: Anatomy) -> dict[str, Any]:
    """The down projection closest to a spike on the first pass (the largest ``min(max_in / threshold_in,
    max_out / threshold_out)``): what to report when no super weight passes the threshold."""
    sp = an.spikes[an.spikes["iteration"] == 0].copy()
    if sp.empty:
        return {}
    sp["ratio_in"] = sp["max_in"] / sp["threshold_in"]
    sp["ratio_out"] = sp["max_out"] / sp["threshold_out"]
    r = sp.loc[np.minimum(sp["ratio_in"], sp["ratio_out"]).idxmax()]
    return {k: (r[k].item() if hasattr(r[k], "item") else r[k]) for k in
            ("layer", "name", "max_in", "in_channel", "max_out", "out_channel", "threshold_in", "threshold_out",
             "ratio_in", "ratio_out")}


def super_statement(an: Anatomy) -> str:
    """One sentence: the super weights found, or the measured statement that there is none and the largest spike."""
    s = an.tables["super"]
    sp = an.spikes
    left = int(sp.loc[sp["iteration"] == sp["iteration"].max(), "spike"].sum()) if len(sp) else 0
    n = int(an.meta["search_passes"])
    if not an.meta["search_stopped"]:
        end = f"stopped at the limit of {an.settings.max_iterations} passes with new spikes still appearing"
    elif left:
        end = (f"stopped: the last pass's {left} spike{'s' if left != 1 else ''} point{'s' if left == 1 else ''} at "
               "weights already zeroed")
    else:
        end = "stopped: no spike left"
    how = f"{n} pass{'es' if n != 1 else ''}, {end}"
    if len(s):
        items = "; ".join(f"{sw_label(r.layer, r.row, r.col)} = {r.value:.4g} (rank {r.rank:,} of {r.n_weights:,})"
                          for r in s.itertuples())
        return f"{len(s)} super weight{'s' if len(s) != 1 else ''} by this criterion ({how}): {items}."
    b = largest_spike(an)
    if not b:
        return "No down projection was found."
    return (f"No super weight by this criterion ({how}). The largest spike: layer {b['layer']}, largest |input| "
            f"{b['max_in']:.4g} (channel {b['in_channel']}, {b['ratio_in']:.2g} x the threshold) and |output| "
            f"{b['max_out']:.4g} (channel {b['out_channel']}, {b['ratio_out']:.2g} x the threshold).")


def quality_pivot(df: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Rows of ``variant/mode, metric, value`` as one row per ``index`` with the ``QUALITY`` metrics as columns."""
    p = df.pivot_table(index=index, columns="metric", values="value", aggfunc="last", sort=False).reset_index()
    return p[[*index, *[m for m in QUALITY if m in p.columns]]]


def interventions_view(an: Anatomy) -> pd.DataFrame:
    """One row per intervention (fp first) with perplexity, KL, its 99th percentile, same top token, RMS Δp."""
    iv = an.interventions
    if iv.empty:
        return pd.DataFrame(columns=["variant", "kind", *QUALITY])
    out = quality_pivot(iv, ["variant", "kind"])
    n = iv.groupby("variant", sort=False)["n_tokens"].max()
    return out.assign(n_tokens=out["variant"].map(n))


def treatment_view(an: Anatomy, bits: int) -> pd.DataFrame:
    """Each super weight under every method at ``bits``: its quantized value and error, the error on its group and
    row, the super activation it produces on the spike token, and that token's output error against RTN's."""
    t = an.treatment[an.treatment["bits"] == bits].copy()
    if t.empty:
        return t
    t["value_error"] = t["value_q"] - t["value_fp"]
    t["super_activation_ratio"] = t["super_activation_q"] / t["super_activation_fp"]
    rtn = t[t["method"] == "rtn"].set_index("name")["spike_token_rel_error"]
    t["spike_token_error_vs_rtn"] = t["spike_token_rel_error"] / t["name"].map(rtn)
    layer = dict(zip(an.tables["super"]["name"], an.tables["super"]["layer"]))
    t["super_weight"] = [sw_label(int(layer[n]), r, c) for n, r, c in zip(t["name"], t["row"], t["col"])]
    return t[["super_weight", "method", "bits", "group_size", "value_fp", "value_q", "value_error", "group_rel_error",
              "row_rel_error", "col_rel_error", "super_activation_fp", "super_activation_q", "super_activation_ratio",
              "spike_token_rel_error", "spike_token_error_vs_rtn", "spike_error_share_col"]].reset_index(drop=True)


def consumer_summary(cons: pd.DataFrame | None, by: tuple[str, ...] = ("bits", "method")) -> pd.DataFrame:
    """Median relative output error over the linears reading the massive tokens, on those tokens' rows and on
    ordinary held-out rows, per ``by``, and both against RTN's at the same bits (and family, when grouped by it)."""
    cols = [*by, "n_linears", "median_rel_error_massive", "median_rel_error_heldout", "massive_vs_rtn",
            "heldout_vs_rtn"]
    if cons is None or cons.empty:
        return pd.DataFrame(columns=cols)
    g = cons.groupby(list(by), sort=False).agg(n_linears=("name", "nunique"),
                                                median_rel_error_massive=("rel_error_massive", "median"),
                                                median_rel_error_heldout=("rel_error_heldout", "median")).reset_index()
    key = [k for k in by if k != "method"]
    rtn = g[g["method"] == "rtn"].set_index(key) if key else g[g["method"] == "rtn"]
    for col, out in (("median_rel_error_massive", "massive_vs_rtn"), ("median_rel_error_heldout", "heldout_vs_rtn")):
        if key:
            ref = [rtn[col].get(tuple(r) if len(key) > 1 else r[0], np.nan) for r in g[key].itertuples(index=False)]
        else:
            ref = float(rtn[col].iloc[0]) if len(rtn) else np.nan
        g[out] = g[col] / ref
    return g[cols]


def keep_view(keep: pd.DataFrame | None) -> pd.DataFrame:
    """Every method at each width: perplexity, KL and same top token with the super weights quantized and kept in
    fp16, side by side."""
    if keep is None or keep.empty:
        return pd.DataFrame()
    q = keep[keep["mode"] != "fp"]
    rows = []
    for (mode, bits), g in q.groupby(["mode", "bits"], sort=False):
        v = {(bool(k), m): float(x) for k, m, x in zip(g["kept"], g["metric"], g["value"])}
        row: dict[str, Any] = {"mode": mode, "bits": int(bits)}
        for m in ("perplexity", "kl", "same_top"):
            row[m] = v.get((False, m), np.nan)
            row[f"{m}_kept"] = v.get((True, m), np.nan)
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["bits"], kind="stable").reset_index(drop=True)


def attribution_view(attr: pd.DataFrame | None) -> pd.DataFrame:
    """One row per attribution variant: the group swapped, its size, perplexity, KL, same top token, and the share of
    the method's extra KL (over the baseline's) that swapping that group alone recovers."""
    if attr is None or attr.empty:
        return pd.DataFrame()
    p = quality_pivot(attr, ["variant", "group", "n_linears"])
    kl = p.set_index("variant")["kl"]
    method, baseline = attr["method"].iloc[0], attr["baseline"].iloc[0]
    lo, hi = kl.get(f"{baseline} everywhere", np.nan), kl.get(f"{method} everywhere", np.nan)
    p["share_of_extra_kl"] = (p["kl"] - lo) / (hi - lo) if hi != lo else np.nan
    return p


def method_story(an: Anatomy, method: str, bits: int, *, baseline: str = "rtn", keep: pd.DataFrame | None = None,
                 attr: pd.DataFrame | None = None, consumers: pd.DataFrame | None = None) -> list[str]:
    """Measured sentences on what ``method`` does at ``bits`` to the outliers, against ``baseline``: the super weight,
    the massive tokens' readers, the model with the super weights kept, and where its damage comes from. Only what
    has been computed is said."""
    def pair(df: pd.DataFrame, col: str, **match: Any) -> tuple[pd.Series, pd.Series] | None:
        """The rows of ``method`` and ``baseline`` (in column ``col``) among those matching ``match``."""
        for k, v in match.items():
            df = df[df[k] == v]
        r, b = df[df[col] == method], df[df[col] == baseline]
        return (r.iloc[0], b.iloc[0]) if len(r) and len(b) else None

    lines = []
    t = treatment_view(an, bits)
    for sw in t["super_weight"].unique() if len(t) else []:
        rb = pair(t, "method", super_weight=sw)
        if rb:
            r, b = rb
            lines.append(f"Super weight {sw} ({r['value_fp']:.4g}): {method} stores {r['value_q']:.4g}, {baseline} "
                         f"{b['value_q']:.4g}; on the spike token the layer's output error is "
                         f"{r['spike_token_rel_error']:.3g} ({b['spike_token_rel_error']:.3g} for {baseline}), "
                         f"{_pct(r['spike_error_share_col'])} of it from the spiking input channel, whose column "
                         f"{method} rounds with a relative error of {r['col_rel_error']:.3g} ({baseline} "
                         f"{b['col_rel_error']:.3g}).")
    cs = consumer_summary(consumers, ("bits", "family", "method"))
    cs = cs[(cs["bits"] == bits) & (cs["method"] == method)] if len(cs) else cs
    if len(cs):
        worst = cs.loc[cs["massive_vs_rtn"].idxmax()]
        lines.append(f"On the linears that read the massive tokens, {method}'s median output error on those "
                     f"tokens' rows is {worst['massive_vs_rtn']:.2f}x {baseline}'s at worst ({worst['family']}; on "
                     f"ordinary held-out "
                     f"rows {worst['heldout_vs_rtn']:.2f}x); " + ", ".join(
                         f"{r.family} {r.massive_vs_rtn:.2f}x" for r in cs.itertuples()) + ".")
    kv = keep_view(keep)
    rb = pair(kv, "mode", bits=bits) if len(kv) else None
    if rb:
        r, b = rb
        lines.append(f"Whole model at w{bits}: {method} perplexity {r['perplexity']:.4g} (KL {r['kl']:.3f}), "
                     f"{baseline} {b['perplexity']:.4g} (KL {b['kl']:.3f}); with the super weights kept in fp16 "
                     f"{method} {r['perplexity_kept']:.4g}, {baseline} {b['perplexity_kept']:.4g}.")
    av = attribution_view(attr)
    if len(av):
        parts = av[~av["group"].isin(["", "all linears", "reference"])]
        parts = parts.sort_values("share_of_extra_kl", ascending=False)
        base = av[av["variant"] == f"{baseline} everywhere"]
        full = av[av["variant"] == f"{method} everywhere"]
        if len(base) and len(full) and len(parts):
            top = parts.iloc[0]
            lines.append(
                f"Where it comes from ({baseline} everywhere: perplexity {base['perplexity'].iloc[0]:.4g}; {method} "
                f"everywhere: {full['perplexity'].iloc[0]:.4g}): {method} on {top['group']} alone "
                f"({int(top['n_linears'])} linears) gives {top['perplexity']:.4g}, "
                f"{_pct(top['share_of_extra_kl'])} of the extra KL; "
                + "; ".join(f"{r.group} {r.perplexity:.4g} ({_pct(r.share_of_extra_kl)})"
                            for r in parts.iloc[1:].itertuples()) + ".")
    return lines


def _pct(v: float) -> str:
    """A share as a percentage, ``0%`` rather than ``-0%``."""
    return "0%" if abs(v) < 0.005 else f"{v:.0%}"


# --- figures ----------------------------------------------------------------------------------------------

def residual_magnitude(an: Anatomy) -> Figure:
    """Per layer: the residual stream's largest and median |h| and the massive threshold (log axis); the layers with
    massive activations marked."""
    lay = an.layers
    data = pd.concat([
        lay[["layer"]].assign(quantity="largest |h|", value=lay["max_abs"]),
        lay[["layer"]].assign(quantity="median |h|", value=lay["median_abs"]),
        lay[["layer"]].assign(quantity="massive threshold", value=lay["threshold"]),
    ], ignore_index=True)
    data["massive"] = data["layer"].map(dict(zip(lay["layer"], lay["n_massive"] > 0)))
    order = ["largest |h|", "median |h|", "massive threshold"]
    x = alt.X("layer:Q", title="decoder layer (index)", axis=alt.Axis(**INT),
              scale=alt.Scale(domain=[0, int(lay["layer"].max()) if len(lay) else 1], nice=False))
    lines = alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=30, filled=True)).encode(
        x=x, y=alt.Y("value:Q", title="|h| (log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("quantity:N", sort=order, title=None, scale=alt.Scale(domain=order,
                                                                              range=[PALETTE[0], MUTED, ACCENT])),
        strokeDash=alt.StrokeDash("quantity:N", sort=order, title=None,  # same field and title: one legend
                                  scale=alt.Scale(domain=order, range=[[1, 0], [1, 0], [6, 4]])),
        tooltip=["layer:Q", "quantity:N", alt.Tooltip("value:Q", format=".4g"), "massive:N"],
    )
    marks = alt.Chart(data[(data["quantity"] == "largest |h|") & data["massive"]]).mark_point(
        shape="diamond", size=140, filled=True, color=ACCENT).encode(x=x, y="value:Q")
    n_tok = int(an.meta.get("n_tokens", 0))
    first = an.first_massive_layer
    chart = (lines + marks).properties(width=WIDE - 160, height=HEIGHT, title=_title(
        "Residual stream magnitude per layer",
        f"largest and median |h| over {n_tok:,} tokens (calibration + held-out); diamonds: layers with massive "
        f"activations ({an.settings.massive_rule})" + (f"; they appear at layer {first}" if first is not None else
                                                       "; none here"), WIDE - 160))
    return Figure("residual_magnitude", chart, data, caption=an.settings.massive_rule)


def token_dim_heatmap(an: Anatomy, layer: int) -> Figure:
    """The tokens x dimensions with the largest |h| of one layer, each cell's value printed (log colour scale)."""
    g = an.grid[an.grid["layer"] == layer].copy()
    g["token_label"] = [token_label(*r) for r in zip(g["split"], g["seq"], g["pos"], g["token"])]
    g["abs_value"] = g["value"].abs()
    tokens = list(dict.fromkeys(g.sort_values("token_rank")["token_label"]))
    dims = [int(d) for d in dict.fromkeys(g.sort_values("dim_rank")["dim"])]
    thr = float(an.layers.loc[an.layers["layer"] == layer, "threshold"].iloc[0]) if len(g) else float("nan")
    lo = max(float(g["abs_value"].min()) if len(g) else 1e-3, 1e-3)
    base = alt.Chart(g).encode(
        x=alt.X("dim:O", sort=dims, title="residual dimension (index)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("token_label:N", sort=tokens, title=None, axis=alt.Axis(labelLimit=320)),
    )
    rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("abs_value:Q", title="|h| (log colour scale)",
                        scale=alt.Scale(type="log", scheme="oranges", domain=[lo, max(lo * 10, float(
                            g["abs_value"].max()) if len(g) else 1.0)])),
        tooltip=["token_label:N", "dim:O", alt.Tooltip("value:Q", format=".4g")],
    )
    text = base.mark_text(fontSize=10).transform_calculate(  # 24.4k, 835, -59.7, 0.709: no SI "m" for milli
        label="abs(datum.value) >= 1000 ? format(datum.value, '.3~s') : format(datum.value, '.3~r')").encode(
        text="label:N",
        color=alt.condition(f"datum.abs_value > {thr:.6g}", alt.value("white"), alt.value("#111111")))
    chart = (rect + text).properties(
        width=max(260, 56 * len(dims)), height=max(160, 20 * len(tokens)),
        title=_title(f"Layer {layer}: the largest activations, tokens x dimensions",
                     f"the {len(tokens)} tokens and {len(dims)} dimensions with the largest |h|; white text: massive "
                     f"(|h| > {thr:.4g})", max(260, 56 * len(dims)) + 260))
    return Figure(f"token_dims_layer{layer}", chart, g.drop(columns=["abs_value"]))


def spike_chart(an: Anatomy) -> Figure:
    """The super-weight search: per layer the down projection's largest |input| and |output| on the prompt, on the
    first pass and after the found super weights were zeroed (log axis), the thresholds dashed."""
    sp = an.spikes
    last = int(sp["iteration"].max()) if len(sp) else 0
    passes = {0: "first pass"} | ({last: f"pass {last + 1} (found weights zeroed)"} if last > 0 else {})
    sel = sp[sp["iteration"].isin(list(passes))]
    data = pd.concat([
        sel[["iteration", "layer", "name"]].assign(side="largest |input|", value=sel["max_in"],
                                                   channel=sel["in_channel"], threshold=sel["threshold_in"]),
        sel[["iteration", "layer", "name"]].assign(side="largest |output|", value=sel["max_out"],
                                                   channel=sel["out_channel"], threshold=sel["threshold_out"]),
    ], ignore_index=True)
    data["pass"] = data["iteration"].map(passes)
    x = alt.X("layer:Q", title="decoder layer (index)", axis=alt.Axis(**INT))
    order = list(passes.values())
    lines = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=30, filled=True)).encode(
        x=x, y=alt.Y("value:Q", title="|x| on the prompt (log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("pass:N", sort=order, title=None, scale=alt.Scale(range=[PALETTE[0], PALETTE[1]]),
                        legend=alt.Legend(labelLimit=400)),
        tooltip=["pass:N", "layer:Q", "name:N", "side:N", alt.Tooltip("value:Q", format=".4g"), "channel:Q"],
    )
    thr = alt.Chart().mark_rule(color=ACCENT, strokeDash=[6, 4]).encode(
        y="mean(threshold):Q", tooltip=[alt.Tooltip("mean(threshold):Q", format=".4g", title="threshold")],
    ).transform_filter("datum.iteration == 0")
    chart = alt.layer(lines, thr, data=data).properties(width=WIDTH, height=HEIGHT - 40).facet(
        column=alt.Column("side:N", title=None, sort=["largest |input|", "largest |output|"]),
    ).properties(title=_title("Super-weight search: down projections on the prompt",
                              f"a spike: {an.settings.spike_rule}; dashed: the threshold", 2 * WIDTH))
    return Figure("super_weight_search", chart, data, meta={"panels": 2})


def interventions_chart(an: Anatomy) -> Figure:
    """Perplexity and mean KL to fp of each intervention (log axes; fp's perplexity dashed)."""
    v = interventions_view(an)
    data = v.melt(id_vars=["variant", "kind"], value_vars=[m for m in ("perplexity", "kl") if m in v.columns],
                  var_name="metric", value_name="value")
    data = data[data["variant"] != "fp"]
    order = [x for x in v["variant"] if x != "fp"]
    kinds = ["super weight", "massive activation"]
    height = max(80, 30 * len(order))

    def panel(metric: str, title: str, labels: bool = True) -> alt.Chart:
        d = data[(data["metric"] == metric) & (data["value"] > 0)]  # a log axis has no room for 0
        # the second panel shares the rows: no labels, so both fit the page's width (the KL panel was cut off)
        axis = alt.Axis(labelLimit=360) if labels else alt.Axis(labels=False, ticks=False)
        lo, hi = (float(d["value"].min()), float(d["value"].max())) if len(d) else (1.0, 10.0)
        decades = [10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
        return alt.Chart(d).mark_point(size=150, filled=True).encode(
            y=alt.Y("variant:N", sort=order, title=None, axis=axis),
            x=alt.X("value:Q", title=title, scale=alt.Scale(type="log"), axis=alt.Axis(values=decades, format="~g")),
            color=alt.Color("kind:N", title=None, sort=kinds, scale=alt.Scale(domain=kinds,
                                                                              range=[PALETTE[0], PALETTE[3]])),
            tooltip=["variant:N", "metric:N", alt.Tooltip("value:Q", format=".4g")],
        ).properties(width=WIDTH - 140, height=height)

    ppl = panel("perplexity", "perplexity (log scale)")
    if (v["variant"] == "fp").any():
        fp = float(v.loc[v["variant"] == "fp", "perplexity"].iloc[0])
        ppl = ppl + alt.Chart(pd.DataFrame({"value": [fp]})).mark_rule(color="#222", strokeDash=[5, 4]).encode(
            x="value:Q")
    n_tok = int(v["n_tokens"].max()) if len(v) else 0
    chart = alt.hconcat(ppl, panel("kl", "KL to fp, nats (log scale)", labels=False)).properties(title=_title(
        "Interventions on the outliers", f"scored against the fp model on {n_tok:,} held-out tokens; dashed: fp's "
        "perplexity", WIDE))
    return Figure("interventions", chart, data)


def consumer_chart(cons: pd.DataFrame, bits: int) -> Figure:
    """Median relative output error per method and family of the linears reading the massive tokens, on those
    tokens' rows and on ordinary held-out rows (log axis)."""
    s = consumer_summary(cons, ("bits", "family", "method"))
    s = s[s["bits"] == bits]
    data = pd.concat([
        s[["family", "method"]].assign(rows="massive tokens", value=s["median_rel_error_massive"]),
        s[["family", "method"]].assign(rows="ordinary held-out", value=s["median_rel_error_heldout"]),
    ], ignore_index=True)
    methods = list(dict.fromkeys(s["method"]))
    chart = alt.Chart(data).mark_point(size=90, filled=True).encode(
        x=alt.X("method:N", sort=methods, title="method", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("value:Q", title="median rel. output error (log)", scale=alt.Scale(type="log")),
        color=alt.Color("rows:N", title="rows", scale=alt.Scale(range=[ACCENT, PALETTE[0]])),
        shape=alt.Shape("rows:N", title="rows"),  # same field and title as the colour: one legend
        tooltip=["family:N", "method:N", "rows:N", alt.Tooltip("value:Q", format=".4g")],
    ).properties(width=170, height=HEIGHT - 60).facet(
        column=alt.Column("family:N", title=None, sort=["q", "k", "v", "qkv", "gate", "up", "gate_up"]),
    ).properties(title=_title(f"Linears reading the massive tokens, w{bits}",
                              f"{AX['rel_error']} on the massive tokens' rows and on ordinary held-out rows, median "
                              f"over {int(s['n_linears'].max()) if len(s) else 0} linear(s) per family", WIDE))
    return Figure(f"massive_readers_w{bits}", chart, data, meta={"panels": max(1, s["family"].nunique())})


def keep_chart(keep: pd.DataFrame) -> Figure:
    """Perplexity of every method at each width with the super weights quantized and kept in fp16 (log axis)."""
    kv = keep_view(keep)
    data = pd.concat([kv[["mode", "bits"]].assign(super_weights="quantized", perplexity=kv["perplexity"]),
                      kv[["mode", "bits"]].assign(super_weights="kept in fp16", perplexity=kv["perplexity_kept"])],
                     ignore_index=True)
    data["bits"] = "w" + data["bits"].astype(str)
    fp = keep[(keep["mode"] == "fp") & (keep["metric"] == "perplexity")]["value"]
    modes = list(dict.fromkeys(kv["mode"]))
    pts = alt.Chart().mark_point(size=90, filled=True).encode(
        x=alt.X("mode:N", sort=modes, title="method", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("perplexity:Q", title="perplexity (log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("super_weights:N", title="super weights", scale=alt.Scale(range=[MUTED, PALETTE[2]])),
        shape=alt.Shape("super_weights:N", title="super weights"),
        tooltip=["mode:N", "bits:N", "super_weights:N", alt.Tooltip("perplexity:Q", format=".4g")],
    )
    layers = [pts]
    if len(fp):
        layers.append(alt.Chart().mark_rule(color="#222", strokeDash=[5, 4]).encode(y=alt.datum(float(fp.iloc[-1]))))
    chart = alt.layer(*layers, data=data).properties(width=WIDTH - 40, height=HEIGHT).facet(
        column=alt.Column("bits:N", title=None)).properties(title=_title(
            "Keeping the super weights in fp16", "every method's perplexity on the held-out text; dashed: fp", WIDE))
    return Figure("keep_super_weights", chart, data, meta={"panels": int(data["bits"].nunique())})


def attribution_chart(attr: pd.DataFrame) -> Figure:
    """Perplexity of the baseline model with one group of linears swapped to the method (log axis; the baseline and
    the method everywhere dashed)."""
    v = attribution_view(attr)
    method, baseline, bits = attr["method"].iloc[0], attr["baseline"].iloc[0], int(attr["bits"].iloc[0])
    data = v[~v["variant"].isin(["fp", f"{baseline} everywhere", f"{method} everywhere"])]
    order = list(data["variant"])
    ends = v[v["variant"].isin([f"{baseline} everywhere", f"{method} everywhere"])]
    pts = alt.Chart(data).mark_point(size=150, filled=True, color=PALETTE[0]).encode(
        y=alt.Y("variant:N", sort=order, title=None, axis=alt.Axis(labelLimit=360)),
        x=alt.X("perplexity:Q", title="perplexity (log scale)", scale=alt.Scale(type="log")),
        tooltip=["variant:N", "n_linears:Q", alt.Tooltip("perplexity:Q", format=".4g"),
                 alt.Tooltip("kl:Q", format=".4g"), alt.Tooltip("share_of_extra_kl:Q", format=".0%")],
    )
    rules = alt.Chart(ends).mark_rule(strokeDash=[5, 4]).encode(
        x="perplexity:Q", color=alt.Color("variant:N", title=None, scale=alt.Scale(range=[MUTED, ACCENT])),
        tooltip=["variant:N", alt.Tooltip("perplexity:Q", format=".4g")])
    chart = (rules + pts).properties(width=WIDTH, height=max(100, 28 * len(data)), title=_title(
        f"Where {method}'s damage comes from, w{bits}",
        f"{baseline} on every linear except the group named, which gets {method}; dashed: {baseline} and {method} "
        "on every linear", WIDTH + 300))
    return Figure(f"attribution_{method}_w{bits}", chart, v)


# --- the CLI's text ------------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4g}"


def summary_lines(an: Anatomy, keep: pd.DataFrame | None = None, attr: pd.DataFrame | None = None,
                  consumers: pd.DataFrame | None = None) -> list[str]:
    """What the Outliers page shows, as text lines (``python -m core anatomy``)."""
    s = an.settings
    out = [f"massive    {s.massive_rule}"]
    lay = an.layers
    first = an.first_massive_layer
    if first is None:
        top = lay.loc[lay["ratio"].idxmax()]
        out.append(f"           none; the largest |h| / median is {top['ratio']:.4g} at layer {int(top['layer'])}")
    else:
        out.append(f"           appear at layer {first}; dims {massive_dims(an)}; {token_summary(an)}")
    out.append("layer  max|h|      median|h|  ratio     massive  dims")
    for r in lay.itertuples():
        out.append(f"{r.layer:<6} {_fmt(r.max_abs):<11} {_fmt(r.median_abs):<10} {_fmt(r.ratio):<9} "
                   f"{r.n_massive:<8} {r.dims}")
    for r in massive_tokens(an).head(12).itertuples():
        out.append(f"  token  {r.label:<40} dims {r.dims:<10} {_fmt(r.value)}")
    out.append(f"super weights  {s.spike_rule}")
    out.append(f"           {super_statement(an)}")
    def section(header: str, df: pd.DataFrame, line) -> None:
        if len(df):
            out.append(header)
            out.extend(f"  {line(r)}" for r in df.itertuples())

    section("interventions (held-out, against fp):", interventions_view(an),
            lambda r: f"{r.variant:<48} perplexity {_fmt(r.perplexity):<10} kl {_fmt(r.kl):<10} "
                      f"same_top {_fmt(r.same_top)}")
    section("each super weight under each method:", pd.concat([treatment_view(an, b) for b in s.bits]),
            lambda r: f"w{r.bits} {r.super_weight:<18} {r.method:<12} value {_fmt(r.value_q):<9} (fp "
                      f"{_fmt(r.value_fp)}) group err {_fmt(r.group_rel_error):<9} spike-token err "
                      f"{_fmt(r.spike_token_rel_error)}")
    section("linears reading the massive tokens (median rel. error: massive rows / held-out rows):",
            consumer_summary(consumers),
            lambda r: f"w{r.bits} {r.method:<12} {_fmt(r.median_rel_error_massive):<10} "
                      f"{_fmt(r.median_rel_error_heldout):<10} ({_fmt(r.massive_vs_rtn)}x / {_fmt(r.heldout_vs_rtn)}x "
                      "rtn)")
    section("super weights kept in fp16 (perplexity / KL: quantized -> kept):", keep_view(keep),
            lambda r: f"w{r.bits} {r.mode:<12} {_fmt(r.perplexity):<9} -> {_fmt(r.perplexity_kept):<9} "
                      f"kl {_fmt(r.kl)} -> {_fmt(r.kl_kept)}")
    if attr is not None and len(attr):
        section(f"attribution of {attr['method'].iloc[0]} against {attr['baseline'].iloc[0]}, "
                f"w{int(attr['bits'].iloc[0])}:", attribution_view(attr),
                lambda r: f"{r.variant:<48} perplexity {_fmt(r.perplexity):<10} kl {_fmt(r.kl):<9} "
                          f"share {_fmt(r.share_of_extra_kl)}")
    return out
