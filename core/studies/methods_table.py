"""Every method on one layer, and on every linear of an analysis: relative output errors on the calibration sample
and on held-out rows, the time each quantization took, who wins where (the Methods page, the Layer Lab's methods
section, ``python -m core analyze --methods``)."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import pandas as pd
import torch

from ..grids import llamacpp, metrics, quant
from ..grids.spec import Options, QuantSpec
from ..methods import LAYER_METHODS, METHODS, LayerInputs, quantize_layer

TABLE = "methods"
TABLE_COLUMNS = ["name", "block", "family", "bits", "group_size", "zero_point", "type", "stored_type", "bits_per_weight",
                 "method", "rel_error", "sqnr_db", "rel_error_heldout", "sqnr_db_heldout", "weight_rel_error", "seconds"]
SCORE_COLUMNS = TABLE_COLUMNS[TABLE_COLUMNS.index("rel_error"):]
ERROR_COLUMNS = ["method", "label", "rel_error", "sqnr_db", "rel_error_heldout", "sqnr_db_heldout",
                 "weight_rel_error", "seconds"]


def refusals(methods: Iterable[str], spec: QuantSpec) -> dict[str, str]:
    """``{method: its one-sentence refusal}`` of the ``methods`` that do not run on ``spec``'s grid (a llama.cpp type
    and a method without ``formats``); the others are left out."""
    out = {}
    for m in methods:
        try:
            METHODS[m].check_spec(spec)
        except ValueError as e:
            out[m] = str(e)
    return out


def variants(methods: Iterable[str] | None = None, *, alpha: float | None = None,
             best_alpha: float | None = None) -> list[tuple[str, str, str, Options]]:
    """``(row key, label, method, options)`` of every method in ``methods`` (default: all with a layer half).

    With ``alpha`` given, AWQ appears twice: at the best alpha (``awq``) and at ``alpha`` (``awq@alpha``).
    ``best_alpha``: the grid search's result when already known (the sweep's), so AWQ and AWQ + clip skip it."""
    names = list(methods) if methods is not None else list(LAYER_METHODS)
    out = []
    for m in names:
        if m not in LAYER_METHODS:
            raise ValueError(f"unknown method {m!r} (choose from {', '.join(LAYER_METHODS)})")
        spec = METHODS[m]
        known = {"alpha": float(best_alpha)} if best_alpha is not None and "alpha" in spec.options().as_dict() else {}
        out.append((m, spec.label, m, spec.options.build(**known)))
        if m == "awq" and alpha is not None:
            opts = spec.options.build(alpha=float(alpha))
            out.append((spec.variant_key(opts), f"AWQ (alpha {float(alpha):g})", m, opts))
    return out


def layer_errors(w: torch.Tensor, x: torch.Tensor | None, heldout: torch.Tensor | None,
                 results: list[tuple[str, str, torch.Tensor, float]]) -> pd.DataFrame:
    """Score quantized weights of one linear: ``results`` holds ``(row key, label, w_hat [out, in], seconds)``;
    ``x [rows, in]``: the calibration sample, ``heldout [rows, in]``: held-out rows. Columns: ``ERROR_COLUMNS``."""
    x = x.float() if x is not None else None
    ref = metrics.output_ref_sq(x, w) if x is not None else float("nan")
    ref_h = metrics.output_ref_sq(heldout, w) if heldout is not None else float("nan")
    w_sq = float(w.double().pow(2).sum())
    rows = []
    for key, label, w_hat, sec in results:
        dw = w.float() - w_hat
        # ||X dW^T||^2 with the same float64 helper as ||X W^T||^2
        rel = metrics.rel_error(metrics.output_ref_sq(x, dw), ref) if x is not None else float("nan")
        rel_h = metrics.rel_error(metrics.output_ref_sq(heldout, dw), ref_h) if heldout is not None else float("nan")
        rows.append({"method": key, "label": label, "rel_error": rel, "sqnr_db": metrics.sqnr_db(rel),
                     "rel_error_heldout": rel_h, "sqnr_db_heldout": metrics.sqnr_db(rel_h),
                     "weight_rel_error": float(dw.double().pow(2).sum()) / w_sq if w_sq > 0 else float("nan"),
                     "seconds": sec})
    return pd.DataFrame(rows, columns=ERROR_COLUMNS)


def timed(method: str, w: torch.Tensor, inputs: LayerInputs | None, spec: QuantSpec,
          options: Options | None = None) -> tuple[torch.Tensor, float]:
    """``quantize_layer`` and the seconds it took."""
    t0 = time.perf_counter()
    w_hat = quantize_layer(method, w, inputs, spec, options)
    return w_hat, time.perf_counter() - t0


def compare(w: torch.Tensor, inputs: LayerInputs, heldout: torch.Tensor | None, spec: QuantSpec, *,
            alpha: float | None = None, methods: Iterable[str] | None = None,
            best_alpha: float | None = None) -> pd.DataFrame:
    """Every method on one layer ``w [out, in]``: relative output error and SQNR on the calibration sample
    ``inputs.x`` and on ``heldout [rows, in]``, and the seconds each quantization took (``ERROR_COLUMNS``;
    ``variants`` says which rows)."""
    results = []
    for key, label, m, opts in variants(methods, alpha=alpha, best_alpha=best_alpha):
        results.append((key, label, *timed(m, w, inputs, spec, opts)))
    return layer_errors(w, inputs.x, heldout, results)


def methods_table(analysis, *, bits: Iterable[int] = (), group_size: int = 0, zero_point: bool = True,
                  types: Iterable[str] = (), methods: Iterable[str] | None = None, names: Iterable[str] | None = None,
                  progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """Every method on every linear of ``analysis`` (an ``Analysis``) at each of ``bits`` on the integer grid and in
    each llama.cpp type of ``types`` (AWQ at its best alpha).

    ``group_size`` follows the model-wide rule (``core.grids.quant.check_model_group_size``: it must divide every
    linear's width, else ValueError; ``<= 0`` is one group per row). A llama.cpp type is rounded as llama.cpp
    stores each linear (``stored_type``: llama-quantize's fallback where the type's block does not divide the
    width; ``bits_per_weight`` of that layout); the methods that refuse llama.cpp types (``refusals``) have no
    rows there. Rows: ``TABLE_COLUMNS`` (``type`` and ``stored_type`` empty on the integer grid).
    Needs the kept samples (and the Hessians, if the entry has them), not the model's forward pass; the weights
    are read from the model.
    """
    progress = progress or (lambda f, m: None)
    bits = [quant.check_bits(b) for b in bits]
    g = quant.check_model_group_size([int(w) for w in analysis.linears["in_features"]], group_size) if bits else 0
    specs = [QuantSpec(b, g, zero_point) for b in bits] + [QuantSpec.of_type(t) for t in types]
    methods = list(methods) if methods is not None else list(LAYER_METHODS)
    names = list(names) if names is not None else list(analysis.names)
    runs = [[m for m in methods if m not in refusals(methods, spec)] for spec in specs]
    rows = []
    total = max(1, len(names) * len(specs))
    for i, n in enumerate(names):
        info = analysis.info(n)
        in_f = int(info["in_features"])
        for j, (spec, run) in enumerate(zip(specs, runs)):
            alpha = analysis.sweep_alpha(n, spec, n_grid=20)
            df = analysis.compare_methods(n, spec, methods=run, best_alpha=alpha) if run else None
            where = {"name": n, "block": int(info["block"]), "family": str(info["family"]), "bits": spec.bits,
                     "group_size": spec.group(in_f), "zero_point": spec.zero_point, "type": spec.format or "",
                     "stored_type": spec.stored_type(in_f) or "", "bits_per_weight": spec.cost(in_f)}
            for r in ([] if df is None else df.to_dict("records")):
                rows.append({**where, "method": r["method"], **{k: r[k] for k in SCORE_COLUMNS}})
            progress((i * len(specs) + j + 1) / total, f"methods: {n} {spec.format or f'w{spec.bits}'}")
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def cached_methods_table(analysis, *, bits: Iterable[int] = (), group_size: int = 0, zero_point: bool = True,
                         types: Iterable[str] = (), compute: bool = True,
                         progress: Callable[[float, str], None] | None = None) -> pd.DataFrame | None:
    """The analysis' cached methods table at these settings (``bits`` on the integer grid at ``group_size`` /
    ``zero_point``, and the llama.cpp ``types``), computing (and caching) the missing ones when ``compute``; None
    when nothing is cached and ``compute`` is False. Rows cached before llama.cpp types existed read as the integer
    grid."""
    bits = sorted({quant.check_bits(b) for b in bits})
    types = list(dict.fromkeys(llamacpp.check_type(t) for t in types))
    old = analysis.read_extra(TABLE)
    if old is not None and "req_group_size" not in old:
        old = None  # written before the group size was recorded: which rows are which is unknown
    if old is not None:
        old = old.assign(**{c: old[c] if c in old else v for c, v in (("type", ""), ("stored_type", ""))})
        old["type"] = old["type"].fillna("")
        old["stored_type"] = old["stored_type"].fillna("")

    def select(t: pd.DataFrame) -> pd.DataFrame:
        grid = ((t["type"] == "") & (t["zero_point"] == bool(zero_point)) & (t["req_group_size"] == int(group_size))
                & t["bits"].isin(bits))
        return t[grid | t["type"].isin(types)]

    have = select(old) if old is not None else None
    missing_bits = [b for b in bits if have is None or not ((have["type"] == "") & (have["bits"] == b)).any()]
    missing_types = [t for t in types if have is None or not (have["type"] == t).any()]
    if (missing_bits or missing_types) and compute:
        new = methods_table(analysis, bits=missing_bits, group_size=group_size, zero_point=zero_point,
                            types=missing_types, progress=progress)
        new["req_group_size"] = int(group_size)
        old = new if old is None else pd.concat([old, new], ignore_index=True)
        analysis.write_extra(TABLE, old)
    if old is None:
        return None
    sel = select(old)
    return sel.reset_index(drop=True) if len(sel) else None


def grid_column(table: pd.DataFrame) -> pd.Series:
    """Each row's grid as a label: ``w3`` on the integer grid, the llama.cpp type's name otherwise."""
    t = table["type"] if "type" in table else pd.Series("", index=table.index)
    return t.where(t.fillna("") != "", "w" + table["bits"].astype(int).astype(str))


def winners(table: pd.DataFrame, *, by: str = "family", metric: str = "rel_error_heldout") -> pd.DataFrame:
    """Per ``by`` (family or block) and grid (``grid``: ``w3`` or a llama.cpp type): the method with the lowest
    median ``metric``, the runner-up, and the margin (runner-up / winner, >= 1)."""
    rows = []
    for (key, b, grid), grp in table.assign(grid=grid_column(table)).groupby([by, "bits", "grid"], sort=True):
        med = grp.groupby("method")[metric].median().sort_values()
        if med.empty:
            continue
        best, second = med.index[0], (med.index[1] if len(med) > 1 else None)
        rows.append({by: key, "bits": int(b), "grid": grid, "winner": best, "winner_error": float(med.iloc[0]),
                     "runner_up": second, "runner_up_error": float(med.iloc[1]) if second else float("nan"),
                     "margin": float(med.iloc[1] / med.iloc[0]) if second and med.iloc[0] > 0 else float("nan"),
                     "n_linears": int(grp["name"].nunique())})
    return pd.DataFrame(rows)


def head_to_head(table: pd.DataFrame, a: str = "awq", b: str = "gptq", metric: str = "rel_error_heldout"
                 ) -> pd.DataFrame:
    """Per linear and grid (``grid_column``): ``error(b) / error(a)`` (> 1: ``a`` wins), with block and family, for a
    heatmap."""
    index = ["name", "block", "family", "bits", "grid"]
    p = table[table["method"].isin([a, b])].assign(grid=grid_column(table)).pivot_table(
        index=index, columns="method", values=metric).reset_index()
    if a not in p or b not in p:
        return pd.DataFrame(columns=[*index, "ratio"])
    p["ratio"] = p[b] / p[a]
    return p[[*index, "ratio"]]
