"""Whole-model layer-level tables from collected statistics: no forward pass happens here.

For every linear and every bit-width: RTN error, the whole loss-vs-alpha curve, the best alpha,
the AWQ error, and the gain in-sample and held-out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from ..methods import awq_search as awq
from ..grids import alloc, metrics
from ..model.collect import Collected
from ..model.models import LoadedModel
from ..grids.quant import check_bits, check_model_group_size

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class SweepSettings:
    """What the layer-level sweep tries. ``group_size <= 0``: one group per output row."""

    bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20

    def validate(self, in_features: list[int]) -> None:
        if not self.bits:
            raise ValueError("give at least one bit-width")
        for b in self.bits:
            check_bits(b)
        check_model_group_size(in_features, self.group_size)  # one rule everywhere: divide every layer
        if int(self.n_grid) < 1:
            raise ValueError("grid size must be at least 1")


def layer_group_size(in_features: int, group_size: int) -> int:
    """The group length a layer uses: ``group_size``, or the whole row for ``group_size <= 0``.

    ``SweepSettings.validate`` refuses a group size that does not divide every layer, so the whole-row case
    only arises for per-row settings (and old cache entries)."""
    return group_size if group_size > 0 and in_features % group_size == 0 else in_features


def channel_table(col: Collected) -> pd.DataFrame:
    frames = []
    for key, s in col.stats.items():
        frames.append(pd.DataFrame({
            "input_key": key, "channel": range(s.mean_abs.numel()),
            "mean_abs": s.mean_abs.numpy(), "max_abs": s.max_abs.numpy(), "mean": s.mean.numpy(),
            "std": s.std.numpy(), "kurtosis": s.kurtosis.numpy(), "outlier_ratio": s.outlier_ratio.numpy(),
            "outlier_saturated": s.outlier_saturated.numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def run_sweep(
    lm: LoadedModel,
    col: Collected,
    settings: SweepSettings,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Returns ``(layers, curves, importance)`` tables (see README for the columns)."""
    progress = progress or (lambda f, m: None)
    settings.validate([li.in_features for li in lm.linears])
    layer_rows, curve_frames, imp_frames = [], [], []
    alphas = awq.alpha_grid(settings.n_grid)
    n = len(lm.linears)
    # glibc left alone keeps what each linear's temporaries freed and still grows its heap (it fragments): +1.1 GB
    # over the 168 linears of the Qwen2.5-0.5B shape. In the allocator scope freed memory is reused, and bounded.
    with alloc.keep_freed_memory():
        for i, li in enumerate(lm.linears):
            key = col.input_of[li.name]
            st = col.stats[key]
            w = lm.weight(li.name).cpu()  # layer maths on the CPU (fused kernels); the forward pass may be on a GPU
            x = col.calib_sample[key]
            xh = col.heldout_sample.get(key)
            imp = metrics.importance(w, st.mean_abs)
            imp_frames.append(pd.DataFrame({"name": li.name, "channel": range(imp.numel()), "importance": imp.numpy()}))
            g = layer_group_size(li.in_features, settings.group_size)
            ref = awq.output_sq_norm(x, w)
            ref_h = awq.output_sq_norm(xh, w) if xh is not None else float("nan")
            norm = x.shape[0] * w.shape[0]
            # search_scale for every bit-width at once (the same scales, one fused pass per alpha for all bits); the
            # held-out columns from the same pass: RTN and each bit-width's best alpha, no second quantization
            scales = awq.awq_scales(st.mean_abs.float(), alphas)
            sw = awq.sweep_sq_errors(w, x, xh, scales, settings.bits, g, settings.zero_point, norm=norm)
            sq_bits = sw.calib
            searches = []
            for sq, best in zip(sq_bits, sw.best):
                losses = sq / norm
                assert best == awq.first_min_index(losses)
                searches.append(awq.ScaleSearch(alphas=alphas, losses=losses, scales=scales[best], best_index=best))
            sq_h_rtn, sq_h_awq = sw.heldout_rtn, sw.heldout_awq
            for bi, (b, sq, res) in enumerate(zip(settings.bits, sq_bits, searches)):
                rtn_rel, awq_rel = metrics.rel_error(sq[0], ref), metrics.rel_error(sq[res.best_index], ref)
                if xh is not None:
                    rtn_h, awq_h = metrics.rel_error(sq_h_rtn[bi], ref_h), metrics.rel_error(sq_h_awq[bi], ref_h)
                else:
                    rtn_h = awq_h = float("nan")
                layer_rows.append({
                    "name": li.name, "block": li.block, "family": li.family, "input_key": key,
                    "in_features": li.in_features, "out_features": li.out_features, "bits": int(b), "group_size": g,
                    "best_alpha": res.best_alpha, "rtn_loss": res.rtn_loss, "awq_loss": res.best_loss,
                    "rtn_rel": rtn_rel, "awq_rel": awq_rel,
                    "rtn_sqnr_db": metrics.sqnr_db(rtn_rel), "awq_sqnr_db": metrics.sqnr_db(awq_rel),
                    "gain": metrics.gain(rtn_rel, awq_rel),
                    "rtn_rel_heldout": rtn_h, "awq_rel_heldout": awq_h, "gain_heldout": metrics.gain(rtn_h, awq_h),
                    "top1_share": metrics.top1_share(imp),
                    "mean_kurtosis": float(st.kurtosis.mean()), "max_kurtosis": float(st.kurtosis.max()),
                    "mean_abs_max_over_median": float(st.mean_abs.max() / st.mean_abs.median().clamp(min=1e-12)),
                })
                curve_frames.append(pd.DataFrame({
                    "name": li.name, "bits": int(b), "alpha": alphas.numpy(), "loss": res.losses.numpy(),
                    "rel_error": (sq / ref).numpy() if ref > 0 else float("nan"),
                }))
            alloc.bound_retained()
            progress((i + 1) / n, f"sweep {i + 1}/{n}: {li.name}")
    return (pd.DataFrame(layer_rows), pd.concat(curve_frames, ignore_index=True),
            pd.concat(imp_frames, ignore_index=True))
