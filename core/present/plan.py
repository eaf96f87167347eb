"""Plan: the predicted damage of each linear, the plan's setting per linear, the measured frontier on the test
tokens, the three token sets and the candidates the plan was chosen from."""
from __future__ import annotations

import altair as alt
import pandas as pd

from ..grids import llamacpp
from ..grids.metrics import bit_cost
from ..studies.plan import DEFINITIONS, TOKEN_ROLES, standouts
from .common import ACCENT, MUTED, PALETTE, WIDE, WIDTH, Figure, _family_sort, _title

METRIC_TITLES = {"kl": "mean KL to fp (nats, log)", "perplexity": "perplexity (log)", "same_top": "same top-1 as fp",
                 "hidden_rel_error": "hidden-state relative error (log)", "cosine": "cosine to fp"}
ERRORS = {"kl": "kl_se", "perplexity": "perplexity_se"}  # the ± of a metric, where the report has one


def _group_label(variant: str) -> str:
    """``uniform w3g64`` -> ``g64``; ``uniform w4g0`` -> ``per row``; ``uniform Q4_0`` (a plan in llama.cpp types)
    -> ``Q4_0``; plans -> ``plan``."""
    if not variant.startswith("uniform"):
        return "plan"
    setting = variant.split()[1]
    if llamacpp.is_type(setting):
        return setting
    g = variant.rsplit("g", 1)[1].rstrip("s")
    return "per row" if g == "0" else f"g{g}"


def frontier_table(quality: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Long table of the frontier: one row per variant and metric, with its ± (``low``/``high``) where known."""
    d = quality[quality["metric"].isin(metrics)][["variant", "kind", "budget", "avg_bits", "metric", "value",
                                                   "n_tokens"]].copy()
    se = quality.set_index(["variant", "metric"])["value"]
    err = [float(se.get((v, ERRORS[m]), 0.0)) if m in ERRORS else 0.0 for v, m in zip(d["variant"], d["metric"])]
    d["low"] = d["value"] - err
    d["high"] = d["value"] + err
    d["group"] = [_group_label(v) for v in d["variant"]]
    return d.reset_index(drop=True)


def plan_frontier(quality: pd.DataFrame, metric: str = "kl", margin: float = 0.75) -> Figure:
    """Measured whole-model quality on the test tokens vs average storage bits: each uniform configuration (points,
    one line per group size) and each plan (diamonds, joined in budget order); one panel per metric, ± where the
    report has one (mean KL, perplexity). Drawn within ``margin`` bits of the plans (the figure's table holds every
    point, ``drawn`` says which are on the chart)."""
    metrics = (metric, "perplexity", "same_top") if metric == "kl" else (metric,)
    metrics = tuple(m for m in metrics if m in set(quality["metric"]))
    d = frontier_table(quality, metrics)
    plans = d[d["kind"] == "plan"]["avg_bits"]
    lo, hi = (float(plans.min()) - margin, float(plans.max()) + margin) if len(plans) else (0.0, 1e9)
    d["drawn"] = d["avg_bits"].between(lo - 1e-9, hi + 1e-9)
    shown = d[d["drawn"]]
    groups = sorted(set(shown["group"]) - {"plan"}, key=lambda g: (g == "per row", -int(g[1:]) if g[1:].isdigit() else 0))
    x = alt.X("avg_bits:Q", title="average storage bits per weight (scales and zeros included)",
              scale=alt.Scale(zero=False, domain=[lo, hi], nice=False))
    color = alt.Color("group:N", title="uniform", sort=groups,
                      scale=alt.Scale(domain=groups, range=[PALETTE[i % len(PALETTE)] for i in range(len(groups))]))
    panels = []
    for i, m in enumerate(metrics):
        sub = shown[shown["metric"] == m]
        log = m in ("kl", "perplexity", "hidden_rel_error")
        y = alt.Y("value:Q", title=METRIC_TITLES.get(m, m), scale=alt.Scale(type="log" if log else "linear",
                                                                            zero=False))
        tip = ["variant:N", alt.Tooltip("avg_bits:Q", format=".3f"), alt.Tooltip("value:Q", format=".4g"),
               alt.Tooltip("low:Q", format=".4g"), alt.Tooltip("high:Q", format=".4g"), "n_tokens:Q"]
        uni = alt.Chart(sub[sub["kind"] == "uniform"]).encode(x=x, y=y, color=color, tooltip=tip)
        layers = [uni.mark_line(opacity=0.5), uni.mark_point(filled=True, size=50),
                  uni.mark_text(dx=6, dy=-8, align="left", fontSize=9).encode(text="variant:N")]
        pl = alt.Chart(sub[sub["kind"] == "plan"].sort_values("budget")).encode(x=x, y=y, tooltip=tip)
        layers += [pl.mark_line(color=ACCENT, strokeDash=[4, 3]),
                   pl.mark_point(filled=True, size=120, color=ACCENT, shape="diamond")]
        if i == 0:  # one set of labels: the panels share the x axis
            layers.append(pl.mark_text(dx=-8, dy=12, align="right", color=ACCENT).encode(text="variant:N"))
        if m in ERRORS:
            layers.append(alt.Chart(sub).mark_rule(color=MUTED).encode(x=x, y="low:Q", y2="high:Q"))
        panels.append(alt.layer(*layers).properties(width=WIDTH, height=200 if len(metrics) > 1 else 260))
    hidden = sorted(set(d.loc[~d["drawn"], "variant"]))
    sub_title = ("every point measured on held-out tokens no choice was made on; diamonds: the plan kept at each "
                 "budget" + (f"; off the chart (in its table): {', '.join(hidden)}" if hidden else ""))
    chart = alt.vconcat(*panels).properties(title=_title("Frontier on the test tokens: uniform configurations vs plans",
                                                         sub_title))
    caption = "; ".join(f"{m}: {DEFINITIONS[m]}" for m in metrics if m in DEFINITIONS)
    return Figure(f"plan_frontier_{metric}", chart, d, caption, meta={"panels": len(panels)})


def plan_sensitivity(table: pd.DataFrame, bits: int, group_size: int, metric: str = "kl",
                     type: str | None = None) -> Figure:
    """Predicted damage of each linear at one setting: per block, stacked by family (top), and per linear by family
    (bottom, log); linears that stand out in their family (robust z > 3.5) ringed. ``type``: a plan in llama.cpp
    types (its table's ``type`` column: the type each linear is written in) is selected by type instead."""
    if type:
        d = table[table["type"] == type].copy()
    else:
        d = table[(table["bits"] == int(bits)) & (table["group_size"] == int(group_size))].copy()
    if d.empty and not type:  # a width-specific group (e.g. 128 on the down projections only): what those take
        d = table[(table["bits"] == int(bits))].copy()
        d = d[d["group_size"] == d.groupby("name")["group_size"].transform("max")]
    setting = type or f"w{bits} g{group_size or 'row'}"
    d["standout"] = standouts(d["value"].clip(lower=0).to_numpy(), d["family"].to_numpy())
    fams = _family_sort(d["family"].unique().tolist())
    n_blocks = int(d["block"].max()) + 1 if len(d) else 1
    xax = alt.X("block:O", title="block", sort="ascending")
    what = "predicted mean KL (nats)" if metric == "kl" else f"predicted {metric}"
    color = alt.Color("family:N", sort=fams, title="family")
    top = alt.Chart(d).mark_bar().encode(
        x=xax, y=alt.Y("sum(value):Q", title=f"{what}, summed"), color=color, order=alt.Order("family:N"),
        tooltip=["name:N", alt.Tooltip("value:Q", format=".3g"), alt.Tooltip("rel_error:Q", format=".3g")]
    ).properties(width=WIDE * 0.7, height=170, title=_title(
        f"Predicted damage per block, {setting}", "each linear alone quantized, the rest fp; "
        "stacked by family"))
    ycol = alt.Y("value:Q", title=what, scale=alt.Scale(type="log"))
    bottom = alt.Chart(d[d["value"] > 0]).mark_line(point=True).encode(
        x=alt.X("block:Q", title="block", scale=alt.Scale(domain=[-0.5, n_blocks - 0.5], nice=False),
                axis=alt.Axis(tickMinStep=1, format="d")), y=ycol, color=color,
        tooltip=["name:N", "family:N", alt.Tooltip("value:Q", format=".3g"), alt.Tooltip("rel_error:Q", format=".3g"),
                 "standout:N"])
    ring = alt.Chart(d[d["standout"] & (d["value"] > 0)]).mark_point(shape="circle", size=160, color=ACCENT,
                                                                       strokeWidth=2).encode(
        x="block:Q", y=ycol, tooltip=["name:N", alt.Tooltip("value:Q", format=".3g")])
    bottom = (bottom + ring).properties(width=WIDE * 0.7, height=220, title=_title(
        f"Predicted damage per linear, {setting}", "ringed: stands out in its family"))
    chart = alt.vconcat(top, bottom).resolve_scale(color="shared")
    key = "predicted_kl" if metric == "kl" else "predicted_hidden_rel_error"
    return Figure(f"plan_sensitivity_{type}" if type else f"plan_sensitivity_w{bits}g{group_size}", chart, d,
                  DEFINITIONS[key])


PLAN_COLORS = {2: "#D55E00", 3: "#E69F00", 4: "#56B4E9", 5: "#009E73", 6: "#009E73", 7: "#0072B2", 8: "#0072B2",
               16: "#000000"}


def plan_table(layers: dict, linears: pd.DataFrame, zero_point: bool = True) -> pd.DataFrame:
    """A plan's setting per linear: name, block, family, width, ``setting`` (``w3g64``, ``w4g0`` = one group per row,
    ``fp16``, or the llama.cpp type it is written in), ``bits`` (level bits; 16 for fp16), ``group_size`` (0: one
    group per row; a llama.cpp type: its block) and ``bits_per_weight`` (storage: scales, zeros and minimums
    included; a llama.cpp type: its block layout)."""
    info = linears.set_index("name")
    rows = []
    for n, c in layers.items():
        width = int(info.loc[n, "in_features"])
        if isinstance(c, str):
            setting, bits, g, bpw = c, llamacpp.nominal_bits(c), llamacpp.block_size(c), llamacpp.bits_per_weight(c)
        else:
            bits, g = int(c[0]), int(c[1])
            setting = "fp16" if bits == 16 else f"w{bits}g{g}"
            bpw = 16.0 if bits == 16 else bit_cost(bits, g if g > 0 else width, zero_point)
        rows.append({"name": n, "block": int(info.loc[n, "block"]), "family": str(info.loc[n, "family"]),
                     "in_features": width, "setting": setting, "bits": bits, "group_size": g, "bits_per_weight": bpw})
    return pd.DataFrame(rows)


def plan_map(layers: dict, linears: pd.DataFrame) -> Figure:
    """Block x family map of a plan's settings: colour = bits, text = bits and group (``g0``: one group per row), or
    in llama.cpp types the type each linear is written in (colours in order of bits per weight)."""
    df = plan_table(layers, linears)
    types = not df.empty and not df["setting"].str.startswith(("w", "fp16")).all()
    df["label"] = df["setting"] if types else ["fp16" if b == 16 else f"w{b}" for b in df["bits"]]
    df["text"] = df["setting"] if types else ["fp16" if b == 16 else f"{b}/{'r' if g == 0 else g}"
                                              for b, g in zip(df["bits"], df["group_size"])]
    fams = _family_sort(df["family"].unique().tolist())
    bpw_of = dict(zip(df["label"], df["bits_per_weight"]))
    order = sorted(bpw_of, key=bpw_of.get) if types else [f"w{b}" for b in range(2, 9)] + ["fp16"]
    present = [o for o in order if o in set(df["label"])]
    base = alt.Chart(df).encode(x=alt.X("family:N", sort=fams, title="module family", axis=alt.Axis(labelAngle=0)),
                                y=alt.Y("block:O", title="block"))
    chart = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("label:N", title="type" if types else "bits", sort=present,
                        scale=alt.Scale(domain=present, range=[PALETTE[i % len(PALETTE)] if types else
                                                                PLAN_COLORS[16 if p == "fp16" else int(p[1:])]
                                                                for i, p in enumerate(present)])),
        tooltip=["name:N", "setting:N", "bits:Q", alt.Tooltip("bits_per_weight:Q", format=".4g")])
    if len(df) <= 240:
        chart = chart + base.mark_text(fontSize=9, color="white").encode(text="text:N")
    n_blocks = int(df["block"].nunique())
    title = ("Plan: llama.cpp type per linear", "block x family; the type each linear is written in (its "
             "fallback where the type's block does not divide the row)") if types else (
        "Plan: bits / group per linear", "block x family; r = one group per row, fp16 = kept at 16 bits")
    chart = chart.properties(width=min(WIDTH, 72 * len(fams)), height=max(120, min(620, 20 * n_blocks)),
                             title=_title(*title))
    return Figure("plan_map", chart, df.drop(columns=["label", "text"]))


def token_table(tokens) -> pd.DataFrame:
    """The three token sets as the page shows them."""
    return pd.DataFrame([{"set": r["set"], "tokens": r["tokens"], "blocks": r["blocks"],
                          "where": f"{r['part']}, tokens {r['span'][0]}-{r['span'][1]}",
                          "used for": TOKEN_ROLES[r["set"]].split(":")[0]} for r in tokens])


def side_by_side(report) -> pd.DataFrame:
    """The plan and the best uniform configuration within its budget on the test tokens: one row each."""
    rows = []
    for who, p in (("plan", report.plan), ("best uniform", report.baseline)):
        if p is None:
            continue
        m = p.measured
        rows.append({"": who, "variant": p.source if who == "best uniform" or p.source != "solver" else "solver",
                     "avg bits": p.avg_bits, "mean KL": m.get("kl"), "± (KL)": m.get("kl_se"), "KL p99": m.get("kl_p99"),
                     "perplexity": m.get("perplexity"), "± (ppl)": m.get("perplexity_se"),
                     "same top-1": m.get("same_top"), f"{report.metric} (selection)": p.selection.get(report.metric)})
    return pd.DataFrame(rows).dropna(axis=1, how="all")
