"""Outlier anatomy: where the outliers AWQ protects come from, on the analysis' own model and text.

* **Massive activations** (Sun et al. 2024, arXiv 2402.17762). The residual stream of decoder layer ``i`` is block
  ``i``'s output hidden state ``h [tokens, hidden]``, here over every calibration and held-out block of the analysis
  (run block by block, ``core.model.blocks.BlockInputs``). Per layer: the largest ``|h|`` and the median ``|h|`` over
  all tokens x dimensions; an entry is *massive* when ``|h| > massive_factor x median`` and ``|h| > massive_floor``
  (Sun et al.: about 1,000 times the median and larger than 100). Which dimensions and which tokens (text, block,
  position) carry them, and the first layer where they appear.
* **Super weights** (Yu et al. 2024, arXiv 2411.07191), found as the paper does: one forward pass on a short prompt
  with every MLP down projection hooked; a layer *spikes* when its largest ``|input|`` and its largest ``|output|``
  both exceed the threshold (``AnatomySettings.spike``); the weight ``[output channel, input channel]`` of each spike
  is a candidate; it is zeroed and the pass repeats until no new spike is left or ``max_iterations`` passes ran (the
  weights are restored bit for bit afterwards, also on error). Each super weight with its value, its rank among its
  tensor's ``|w|`` and its layer.
* **Interventions**, scored by ``core.studies.evaluate.score_variants`` against the fp model on held-out text (KL,
  perplexity, same top token): each super weight zeroed (and all of them), the massive activations of the layer
  where they appear set to zero and to their mean (forward hooks on that block; removed and the model restored bit
  for bit afterwards, also on error).
* **Each quantizer's treatment** (``core.methods.quantize_layer``, every method with a layer half, at each width):
  the super weight's quantized value, the error on its group and row, and the output it produces on the spike token
  (the super activation). On demand (:func:`consumer_errors`, minutes): the relative output error of the linears
  that read the massive dimensions (q/k/v and gate/up of the blocks after they appear, through their norm) on the
  massive tokens' rows and on the analysis' ordinary held-out rows.
* **Keep super weights in fp16** (:func:`keep_table`, on demand): every method with a model half at each width, with
  and without the super weights written back unquantized (``core.studies.evaluate.run_quality(keep=...)``).
* **Where one method's damage comes from** (:func:`attribution`, on demand): the model quantized by a baseline
  everywhere except one group of linears quantized by the method.

Everything is cached beside the analysis as parquet tables (``Analysis.write_extra``), each stamped with the run's id;
:func:`cached_anatomy` returns a run only when every table carries the same id (nothing half-written is read).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import torch

from ..grids.quant import check_bits
from ..grids.spec import QuantSpec
from ..methods import LAYER_METHODS, MODEL_METHODS
from ..methods.recipe import Keep
from ..model.blocks import BlockInputs, first_output, forward, restore, snapshot, token_batches
from ..model import score
from ..model.collect import model_lock
from ..model.linears import find_blocks, linear_weight, set_linear_weight
from . import evaluate
from .methods_table import layer_errors

Progress = Callable[[float, str], None]

ANATOMY_VERSION = 2  # 2: the treatment's column error and the spiking channel's share
PAPER_PROMPT = "Apple Inc. is a worldwide tech company."  # Yu et al.'s detection prompt
CONSUMER_FAMILIES = ("q", "k", "v", "qkv", "gate", "up", "gate_up")  # read the residual stream through a norm
PROTOCOL = score.ALL_POSITIONS  # every held-out position scored (core.model.score.PROTOCOLS), in every table here
MAX_MASSIVE_ROWS = 2000  # massive entries kept per layer in the table (the largest); counts are exact
TABLES = ("layers", "massive", "grid", "spikes", "super", "interventions", "treatment")
KEEP_TABLE = "anatomy_keep"

DEFINITIONS: dict[str, str] = {
    "residual": "the residual stream of decoder layer i: block i's output hidden state, every token of the "
                "analysis' calibration and held-out blocks",
    "massive": "an entry h of a layer's residual stream with |h| > massive_factor x the median |h| of that layer "
               "(all tokens x dimensions) and |h| > massive_floor (Sun et al. 2024: about 1,000 and 100)",
    "spike": "a down projection whose largest |input| and largest |output| on the prompt both exceed the threshold: "
             "spike x the median over layers of that largest value (relative), or spike itself (absolute; Yu et "
             "al. 2024 used 50 on Llama-7B)",
    "super_weight": "the down projection weight [output channel, input channel] of a spike; zeroed, the search "
                    "repeats until no new spike is left (at most max_iterations passes)",
    "rank": "the super weight's rank among the |w| of its tensor (1 = the largest)",
    "super_activation": "the down projection's output on the spike token at the super weight's output channel: "
                        "x_spike . W[row, :]",
    "rel_error_massive": "||X_m (W - W_hat)^T||^2 / ||X_m W^T||^2 over the input rows of the tokens that carry a "
                         "massive activation into this block",
    "rel_error_heldout": "the same over the analysis' kept held-out input rows (ordinary tokens)",
    "group_rel_error": "||w_hat - w|| / ||w|| over the quantization group that holds the super weight",
    "row_rel_error": "||w_hat - w|| / ||w|| over the super weight's row",
    "col_rel_error": "||w_hat - w|| / ||w|| over the super weight's column: every weight the spiking input channel "
                     "multiplies",
    "spike_token_rel_error": "the layer's relative output error on the spike token: ||x_spike (W - W_hat)^T||^2 / "
                             "||x_spike W^T||^2",
    "spike_error_share_col": "the share of that error coming from the spiking input channel alone: "
                             "||x_spike[col] (W - W_hat)[:, col]||^2 / ||x_spike (W - W_hat)^T||^2 (terms of other "
                             "channels can cancel it, so it can exceed 1)",
}


@dataclass(frozen=True)
class AnatomySettings:
    """The thresholds of one anatomy run (every number on the page says which it used).

    Massive activations: ``|h| > massive_factor x median |h|`` of the layer and ``|h| > massive_floor``.
    Super weights: on ``prompt`` (tokenized with the tokenizer's special tokens), a down projection spikes when its
    largest ``|input|`` and largest ``|output|`` both exceed ``spike`` x the median over layers of that largest value
    (``spike_relative``), or ``spike`` itself; at most ``max_iterations`` zero-and-repeat passes.
    ``bits``: the widths of the per-method treatment. ``top_tokens`` x ``top_dims``: the tokens with the largest
    ``|h|`` and the dimensions with the largest ``|h|`` of each layer, for the token x dimension view.
    """

    massive_factor: float = 1000.0
    massive_floor: float = 100.0
    prompt: str = PAPER_PROMPT
    spike: float = 100.0
    spike_relative: bool = True
    max_iterations: int = 10
    bits: tuple[int, ...] = (3, 4)
    top_tokens: int = 16
    top_dims: int = 8

    def __post_init__(self) -> None:
        for name in ("massive_factor", "massive_floor", "spike"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if not str(self.prompt).strip():
            raise ValueError("the super-weight prompt is empty")
        for name in ("max_iterations", "top_tokens", "top_dims"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or int(v) < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        bits = tuple(sorted({check_bits(b) for b in self.bits}))
        if not bits:
            raise ValueError("give at least one bit-width (2..8)")
        object.__setattr__(self, "bits", bits)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AnatomySettings":
        d = json.loads(text)
        return cls(**{**d, "bits": tuple(d["bits"])})

    @property
    def massive_rule(self) -> str:
        return f"|h| > {self.massive_factor:g} x the layer's median |h| and |h| > {self.massive_floor:g}"

    @property
    def spike_rule(self) -> str:
        if self.spike_relative:
            return (f"largest |input| and largest |output| both > {self.spike:g} x their median over layers "
                    f"(on the prompt {self.prompt!r})")
        return f"largest |input| and largest |output| both > {self.spike:g} (on the prompt {self.prompt!r})"


@dataclass
class Anatomy:
    """One anatomy run: its settings, its tables (``TABLES``; columns in :data:`COLUMNS`) and ``meta`` (run id, the
    first massive layer, whether the super-weight search stopped by itself, seconds per stage, token counts)."""

    settings: AnatomySettings
    tables: dict[str, pd.DataFrame]
    meta: dict[str, Any]

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    @property
    def keep(self) -> dict[str, list[tuple[int, int]]]:
        """The super weights as a ``keep`` mapping (``{linear name: [(row, col), ...]}``)."""
        out: dict[str, list[tuple[int, int]]] = {}
        for r in self.tables["super"].itertuples(index=False):
            out.setdefault(str(r.name), []).append((int(r.row), int(r.col)))
        return out

    @property
    def first_massive_layer(self) -> int | None:
        v = self.meta.get("first_massive_layer")
        return None if v is None or v < 0 else int(v)


COLUMNS: dict[str, list[str]] = {
    "layers": ["layer", "max_abs", "median_abs", "ratio", "threshold", "n_massive", "n_massive_tokens", "dims",
               "top_dim", "top_value", "top_split", "top_seq", "top_pos", "top_token"],
    "massive": ["layer", "split", "seq", "pos", "token_id", "token", "dim", "value"],
    "grid": ["layer", "split", "seq", "pos", "token", "token_rank", "dim", "dim_rank", "value"],
    "spikes": ["iteration", "layer", "name", "max_in", "in_channel", "in_pos", "max_out", "out_channel", "out_pos",
               "threshold_in", "threshold_out", "spike"],
    "super": ["name", "layer", "row", "col", "value", "rank", "n_weights", "median_abs_weight", "iteration",
              "input_value", "output_value", "pos", "token"],
    "interventions": ["variant", "kind", "metric", "value", "n_tokens"],
    "treatment": ["name", "row", "col", "method", "bits", "group_size", "value_fp", "value_q", "group_rel_error",
                  "row_rel_error", "col_rel_error", "super_activation_fp", "super_activation_q",
                  "spike_token_rel_error", "spike_error_share_col"],
    "consumers": ["name", "block", "family", "method", "bits", "group_size", "rel_error_massive",
                  "rel_error_heldout", "n_massive_rows"],
}


# ------------------------------------------------------------------------------------------------
# massive activations: the residual stream, block by block
# ------------------------------------------------------------------------------------------------
@dataclass
class _Scan:
    """What the residual pass keeps: the tables' rows, and each layer's threshold, massive dims and their means."""

    layers: list[dict]
    massive: list[dict]
    grid: list[dict]
    thresholds: dict[int, float]
    dims: dict[int, list[int]]
    means: dict[int, dict[int, float]]


def _hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden states of a block call ``(args, kwargs)`` (the inverse of ``core.model.blocks.with_hidden``)."""
    args, kwargs = call
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


def _token_texts(tokenizer: Any, ids: list[int]) -> dict[int, str]:
    return {int(i): tokenizer.decode([int(i)]) for i in set(ids)}


def _row_hooks(lm, names: list[str], want: torch.Tensor, out: dict[str, list[torch.Tensor]]) -> list:
    """Pre-hooks keeping, of each linear in ``names``, only the input rows whose flat token index (``seq * seqlen +
    pos`` over the whole pass, batch after batch) is in ``want`` (sorted)."""
    handles = []
    for n in names:
        seen = {"offset": 0}

        def hook(mod, args, n=n, seen=seen):
            x = args[0]
            flat = x.detach().reshape(-1, x.shape[-1])
            lo = seen["offset"]
            sel = want[(want >= lo) & (want < lo + flat.shape[0])] - lo
            if sel.numel():
                out.setdefault(n, []).append(flat[sel.to(flat.device)].float().cpu())
            seen["offset"] = lo + flat.shape[0]
        handles.append(lm.model.get_submodule(n).register_forward_pre_hook(hook))
    return handles


def residual_scan(lm, ids: torch.Tensor, split: list[str], settings: AnatomySettings, *, batch_tokens: int,
                  progress: Progress | None = None) -> _Scan:
    """Per decoder layer of ``lm`` on ``ids [n, seqlen]`` (``split[k]``: "calibration" / "held-out" of block ``k``):
    the largest and the median ``|h|`` (``torch.median``: the lower middle value), the massive entries, the top
    tokens x top dims. The model is only read (``BlockInputs``: the same bits as the full forward), one layer's
    hidden states at a time."""
    progress = progress or (lambda f, m: None)
    _, blocks = find_blocks(lm.model)
    n, seqlen = ids.shape
    texts = _token_texts(lm.tokenizer, ids.reshape(-1).tolist())
    flat_ids = ids.reshape(-1)
    scan = _Scan([], [], [], {}, {}, {})
    bi = BlockInputs(lm, ids, batch_tokens=batch_tokens)

    def where(t: int) -> dict[str, Any]:
        s, p = divmod(int(t), seqlen)
        tid = int(flat_ids[t])
        return {"split": split[s], "seq": s, "pos": p, "token_id": tid, "token": texts[tid]}

    for i in range(len(blocks)):
        bi.capture(i, linears=set(), modules=set())
        h = torch.cat([x.detach().float().reshape(-1, x.shape[-1]).cpu() for x in map(_hidden, bi.calls)])
        a = h.abs()
        med = float(a.median())
        mx = float(a.max())
        thr = max(settings.massive_floor, settings.massive_factor * med)
        mask = a > thr
        n_massive = int(mask.sum())
        tok_idx, dim_idx = mask.nonzero(as_tuple=True)
        dims = sorted({int(d) for d in dim_idx.tolist()})
        scan.thresholds[i], scan.dims[i] = thr, dims
        scan.means[i] = {d: float(h[tok_idx[dim_idx == d], d].mean()) for d in dims}
        if n_massive:
            vals = h[tok_idx, dim_idx]
            order = vals.abs().argsort(descending=True)[:MAX_MASSIVE_ROWS]
            for t, d, v in zip(tok_idx[order].tolist(), dim_idx[order].tolist(), vals[order].tolist()):
                scan.massive.append({"layer": i, **where(t), "dim": int(d), "value": float(v)})
        top = int(a.argmax())
        t0, d0 = divmod(top, a.shape[1])
        w0 = where(t0)
        scan.layers.append({"layer": i, "max_abs": mx, "median_abs": med, "ratio": mx / med if med > 0 else math.inf,
                            "threshold": thr, "n_massive": n_massive, "n_massive_tokens": int(tok_idx.unique().numel()),
                            "dims": ",".join(map(str, dims)), "top_dim": d0, "top_value": float(h[t0, d0]),
                            "top_split": w0["split"], "top_seq": w0["seq"], "top_pos": w0["pos"],
                            "top_token": w0["token"]})
        # the token x dimension view: the tokens and the dims with the largest |h|, every cell between them
        toks = a.max(dim=1).values.topk(min(settings.top_tokens, a.shape[0])).indices
        dimsel = a.max(dim=0).values.topk(min(settings.top_dims, a.shape[1])).indices
        for tr, t in enumerate(toks.tolist()):
            wt = where(t)
            for dr, d in enumerate(dimsel.tolist()):
                scan.grid.append({"layer": i, "split": wt["split"], "seq": wt["seq"], "pos": wt["pos"],
                                  "token": wt["token"], "token_rank": tr, "dim": int(d), "dim_rank": dr,
                                  "value": float(h[t, d])})
        del h, a, mask
        progress((i + 1) / len(blocks), f"residual stream: layer {i + 1}/{len(blocks)}")
    return scan


# ------------------------------------------------------------------------------------------------
# super weights: the paper's iterative search on the down projections
# ------------------------------------------------------------------------------------------------
@dataclass
class _Search:
    spikes: list[dict]
    found: list[dict]
    inputs: dict[tuple[str, int, int], torch.Tensor]  # the down projection's input on the spike token [in]
    stopped: bool  # True: no new spike was left; False: max_iterations passes ran


def _down_pass(lm, ids: torch.Tensor, downs: list[str]) -> dict[str, dict[str, Any]]:
    """One forward pass on ``ids [1, t]``: per down projection the largest |input| / |output|, their channels and
    token positions, and the input vector at the largest-|input| token."""
    rec: dict[str, dict[str, Any]] = {}

    def hook(name: str):
        def fn(mod, args, out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            yo = first_output(out)
            y = yo.detach().float().reshape(-1, yo.shape[-1])
            xi, yi = int(x.abs().argmax()), int(y.abs().argmax())
            rec[name] = {"max_in": float(x.abs().max()), "in_channel": xi % x.shape[1], "in_pos": xi // x.shape[1],
                         "max_out": float(y.abs().max()), "out_channel": yi % y.shape[1],
                         "out_pos": yi // y.shape[1], "x": x[xi // x.shape[1]].cpu().clone()}
        return fn

    handles = [lm.model.get_submodule(n).register_forward_hook(hook(n)) for n in downs]
    try:
        with torch.no_grad():
            forward(lm, ids)
    finally:
        for h in handles:
            h.remove()
    return rec


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else float("nan")


def find_super_weights(lm, settings: AnatomySettings, *, progress: Progress | None = None) -> _Search:
    """Yu et al.'s iterative search on ``settings.prompt`` (see the module docstring). The zeroed weights are
    restored bit for bit when it returns or raises."""
    progress = progress or (lambda f, m: None)
    downs = [li.name for li in lm.linears if li.family == "down"]
    block_of = {li.name: li.block for li in lm.linears}
    ids = lm.tokenizer(settings.prompt, return_tensors="pt")["input_ids"][:, :lm.max_positions].to(lm.device)
    texts = _token_texts(lm.tokenizer, ids.reshape(-1).tolist())
    saved: dict[tuple[str, int, int], torch.Tensor] = {}
    out = _Search([], [], {}, stopped=False)
    snap = snapshot(lm) if lm.streamer is not None else None  # streamed: nothing copied, the layers put back
    try:
        for it in range(settings.max_iterations):
            rec = _down_pass(lm, ids, downs)
            if settings.spike_relative:
                t_in = settings.spike * _median([r["max_in"] for r in rec.values()])
                t_out = settings.spike * _median([r["max_out"] for r in rec.values()])
            else:
                t_in = t_out = settings.spike
            new = []
            for n in downs:
                r = rec[n]
                spike = r["max_in"] > t_in and r["max_out"] > t_out
                out.spikes.append({"iteration": it, "layer": block_of[n], "name": n,
                                   **{k: r[k] for k in ("max_in", "in_channel", "in_pos", "max_out", "out_channel",
                                                        "out_pos")},
                                   "threshold_in": t_in, "threshold_out": t_out, "spike": spike})
                key = (n, int(r["out_channel"]), int(r["in_channel"]))
                if spike and key not in saved:
                    new.append((key, r))
            if not new:
                out.stopped = True
                break
            for key, r in new:
                n, row, col = key
                m = lm.model.get_submodule(n)
                w = linear_weight(m).clone()  # [out, in]
                with torch.no_grad():
                    saved[key] = w[row, col].detach().clone()
                    wa = w.float().abs()  # the rank is among the tensor as trained: earlier zeroed weights put back
                    for (n2, r2, c2), v2 in saved.items():
                        if n2 == n:
                            wa[r2, c2] = float(v2.abs())
                    v = float(saved[key])
                    out.found.append({"name": n, "layer": block_of[n], "row": row, "col": col, "value": v,
                                      "rank": int((wa > abs(v)).sum()) + 1, "n_weights": int(wa.numel()),
                                      "median_abs_weight": float(wa.median()), "iteration": it,
                                      "input_value": float(r["x"][col]), "output_value": float(r["max_out"]),
                                      "pos": int(r["in_pos"]), "token": texts[int(ids[0, r["in_pos"]])]})
                    out.inputs[key] = r["x"]
                    w[row, col] = 0
                    set_linear_weight(m, w)
            progress((it + 1) / settings.max_iterations, f"super weights: pass {it + 1}, {len(saved)} found")
    finally:
        if snap is not None:
            restore(lm, snap)
        else:
            with torch.no_grad():
                for (n, row, col), v in saved.items():
                    linear_weight(lm.model.get_submodule(n))[row, col] = v
    return out


# ------------------------------------------------------------------------------------------------
# interventions
# ------------------------------------------------------------------------------------------------
def _with_first(out: Any, h: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (h,) + tuple(out[1:])
    if isinstance(out, list):
        return [h] + list(out[1:])
    return h


def massive_hooks(block: int, dims: list[int], threshold: float, fill: dict[int, float] | None) -> evaluate.Hooks:
    """An ``install(lm)`` for ``score_variants``: a forward hook on block ``block`` that sets every entry of the
    ``dims`` of its output hidden state with ``|h| > threshold`` to ``fill[dim]`` (its mean), or to 0 when ``fill`` is
    None. Sun et al.'s intervention, applied where the massive activations appear."""
    def install(lm) -> list:
        _, blocks = find_blocks(lm.model)
        d = torch.tensor(dims, dtype=torch.long)
        f = torch.tensor([0.0 if fill is None else fill[k] for k in dims])

        def hook(mod, args, out):
            h = first_output(out)
            sel = h[..., d.to(h.device)]
            new = torch.where(sel.abs() > threshold, f.to(h.device, h.dtype).expand_as(sel), sel)
            h = h.clone()
            h[..., d.to(h.device)] = new
            return _with_first(out, h)
        return [blocks[block].register_forward_hook(hook)]
    return install


def sw_label(layer: int, row: int, col: int) -> str:
    return f"L{layer} [{row}, {col}]"


def interventions(analysis, search: _Search, scan: _Scan, first: int | None, *,
                  progress: Progress | None = None) -> pd.DataFrame:
    """Score every intervention against the fp model on the analysis' held-out blocks (``score_variants``)."""
    variants: dict[str, Callable[[], dict]] = {}
    hooks: dict[str, evaluate.Hooks] = {}
    kinds: dict[str, str] = {}

    def zeroed(cells: list[dict]) -> Callable[[], dict]:
        def build() -> dict:
            out: dict[str, torch.Tensor] = {}
            for c in cells:
                w = out.get(c["name"])
                if w is None:
                    w = out[c["name"]] = analysis.weight(c["name"]).clone()
                w[c["row"], c["col"]] = 0.0
            return out
        return build

    for c in search.found:
        key = f"zero super weight {sw_label(c['layer'], c['row'], c['col'])}"
        variants[key], kinds[key] = zeroed([c]), "super weight"
    if len(search.found) > 1:
        key = f"zero all {len(search.found)} super weights"
        variants[key], kinds[key] = zeroed(search.found), "super weight"
    if first is not None:
        dims = scan.dims[first]
        for label, fill in (("0", None), ("their mean", scan.means[first])):
            key = f"massive activations of layer {first} set to {label}"
            variants[key], kinds[key] = (lambda: {}), "massive activation"
            hooks[key] = massive_hooks(first, dims, scan.thresholds[first], fill)
    if not variants:
        return pd.DataFrame(columns=COLUMNS["interventions"])
    df = evaluate.score_variants(analysis, variants, hooks=hooks, progress=progress, protocol=PROTOCOL)
    df["kind"] = df["variant"].map(kinds).fillna("reference")
    return df[COLUMNS["interventions"]]


# ------------------------------------------------------------------------------------------------
# each quantizer's treatment
# ------------------------------------------------------------------------------------------------
def treatment(analysis, search: _Search, bits: tuple[int, ...], *, progress: Progress | None = None) -> pd.DataFrame:
    """Each super weight under every method with a layer half at each of ``bits`` (the analysis' group size and zero
    point): its quantized value, the error on its group, its row and its input column (every weight the spiking
    input channel multiplies), the super activation and the layer's output error on the spike token, and the share
    of that error coming from the spiking input channel."""
    progress = progress or (lambda f, m: None)
    sw = analysis.settings.sweep
    rows = []
    total = max(1, len(search.found) * len(bits) * len(LAYER_METHODS))
    k = 0
    for c in search.found:
        n, r, col = c["name"], c["row"], c["col"]
        w = analysis.weight(n)
        x = search.inputs[(n, r, col)].float()
        y_fp = x @ w.T
        for b in bits:
            spec = QuantSpec(b, sw.group_size, sw.zero_point)
            g = spec.group(w.shape[1])
            grp = slice(col // g * g, col // g * g + g)
            for m in LAYER_METHODS:
                wq = analysis.quantize_layer(n, m, spec)
                y_q = x @ wq.T
                e = (y_q - y_fp).double()
                e_col = x[col].double() * (wq[:, col] - w[:, col]).double()  # the spiking channel's part of e
                rows.append({"name": n, "row": r, "col": col, "method": m, "bits": b, "group_size": g,
                             "value_fp": float(w[r, col]), "value_q": float(wq[r, col]),
                             "group_rel_error": float((wq[r, grp] - w[r, grp]).norm() / w[r, grp].norm()),
                             "row_rel_error": float((wq[r] - w[r]).norm() / w[r].norm()),
                             "super_activation_fp": float(y_fp[r]), "super_activation_q": float(y_q[r]),
                             "col_rel_error": float((wq[:, col] - w[:, col]).norm() / w[:, col].norm()),
                             "spike_token_rel_error": float(e.pow(2).sum() / y_fp.double().pow(2).sum()),
                             "spike_error_share_col": float(e_col.pow(2).sum() / e.pow(2).sum())
                             if float(e.pow(2).sum()) > 0 else float("nan")})
                k += 1
                progress(k / total, f"treatment: {n} w{b} {m}")
    return pd.DataFrame(rows, columns=COLUMNS["treatment"])


def reading_blocks(anatomy: Anatomy) -> list[int]:
    """The blocks whose input residual stream carries a massive activation (layer ``i - 1`` has one)."""
    lay = anatomy.layers
    n = int(lay["layer"].max()) + 1 if len(lay) else 0
    massive = set(lay.loc[lay["n_massive"] > 0, "layer"].astype(int))
    return [i for i in range(1, n) if i - 1 in massive]


def sample_blocks(blocks: list[int], n: int) -> list[int]:
    """``n`` of ``blocks`` spread evenly, the first and the last included (all of them when ``n`` >= their number)."""
    if n >= len(blocks):
        return list(blocks)
    if n <= 1:
        return blocks[:1]
    return sorted({blocks[round(k * (len(blocks) - 1) / (n - 1))] for k in range(n)})


def massive_rows(analysis, anatomy: Anatomy, names: list[str], *, progress: Progress | None = None
                 ) -> dict[str, torch.Tensor]:
    """The input rows ``[n, in]`` of each linear in ``names`` at the tokens that carry a massive activation into its
    block (the massive entries of layer ``block - 1`` in ``anatomy.massive``), from one forward pass over the
    analysis' calibration and held-out blocks (the anatomy's tokens, in the same order)."""
    lm = analysis.lm
    data = evaluate.eval_data(analysis, lm)
    ids = torch.cat([data.calib, data.heldout])
    seqlen = ids.shape[1]
    m = anatomy.massive
    kept: dict[str, list[torch.Tensor]] = {}
    handles = []
    for n in names:
        prev = m[m["layer"] == int(analysis.info(n)["block"]) - 1]
        want = torch.tensor(sorted({int(s) * seqlen + int(p) for s, p in zip(prev["seq"], prev["pos"])}),
                            dtype=torch.long)
        handles += _row_hooks(lm, [n], want, kept)
    try:
        with model_lock(lm.model), torch.no_grad():
            batches = token_batches(ids, int(analysis.settings.batch_tokens))
            for i, b in enumerate(batches):
                forward(lm, b)
                if progress:
                    progress((i + 1) / len(batches), "massive tokens' inputs")
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in kept.items()}


CONSUMER_TABLE = "anatomy_consumers"


def consumer_errors(analysis, anatomy: Anatomy, *, blocks: list[int] | None = None, n_blocks: int = 3,
                    progress: Progress | None = None) -> pd.DataFrame:
    """The linears that read the massive dimensions (q/k/v and gate/up, ``CONSUMER_FAMILIES``, of ``blocks``; default
    ``n_blocks`` of :func:`reading_blocks` spread from the first to the last) under every method with a layer half
    at each of the anatomy's widths: relative output error on the massive tokens' rows and on the analysis' kept
    held-out rows (``core.studies.methods_table.layer_errors``). Cached beside the analysis (``anatomy_consumers``)."""
    progress = progress or (lambda f, m: None)
    reading = reading_blocks(anatomy)
    blocks = sample_blocks(reading, n_blocks) if blocks is None else sorted(set(blocks))
    if not blocks:
        raise ValueError("no block reads a massive activation (the anatomy found none), so there is nothing to measure")
    if not set(blocks) <= set(reading):
        raise ValueError(f"blocks {sorted(set(blocks) - set(reading))} do not read a massive activation "
                         f"(those that do: {reading[0]}..{reading[-1]})")
    names = [n for n in analysis.names if int(analysis.info(n)["block"]) in blocks
             and str(analysis.info(n)["family"]) in CONSUMER_FAMILIES]
    rows = massive_rows(analysis, anatomy, names, progress=lambda f, m: progress(0.1 * f, m))
    sw = analysis.settings.sweep
    bits = anatomy.settings.bits
    out = []
    total = max(1, len(names) * len(bits))
    for i, n in enumerate(names):
        info = analysis.info(n)
        w = analysis.weight(n)
        for j, b in enumerate(bits):
            spec = QuantSpec(b, sw.group_size, sw.zero_point)
            res = [(m, m, analysis.quantize_layer(n, m, spec), 0.0) for m in LAYER_METHODS]
            df = layer_errors(w, rows[n], analysis.inputs(n, "heldout"), res)
            for r in df.itertuples(index=False):
                out.append({"name": n, "block": int(info["block"]), "family": str(info["family"]), "method": r.method,
                            "bits": b, "group_size": spec.group(w.shape[1]), "rel_error_massive": r.rel_error,
                            "rel_error_heldout": r.rel_error_heldout, "n_massive_rows": int(rows[n].shape[0])})
            progress(0.1 + 0.9 * (i * len(bits) + j + 1) / total, f"{n} w{b}")
    df = pd.DataFrame(out, columns=COLUMNS["consumers"])
    analysis.write_extra(CONSUMER_TABLE, df.assign(run_id=anatomy.meta["run_id"]))
    progress(1.0, "done")
    return df


def cached_consumers(analysis, anatomy: Anatomy) -> pd.DataFrame | None:
    """The cached consumer errors measured for this anatomy run, or None."""
    df = analysis.read_extra(CONSUMER_TABLE)
    if df is None or df.empty or "run_id" not in df or (df["run_id"] != anatomy.meta["run_id"]).any():
        return None
    return df[COLUMNS["consumers"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# the whole run, and its cache
# ------------------------------------------------------------------------------------------------
class _Stages:
    """Progress over named stages with fixed weights (their sum is the whole run)."""

    def __init__(self, progress: Progress | None, weights: dict[str, float]):
        self.progress = progress or (lambda f, m: None)
        total = sum(weights.values())
        self.start, acc = {}, 0.0
        for k, v in weights.items():
            self.start[k] = (acc / total, v / total)
            acc += v

    def sub(self, stage: str) -> Progress:
        lo, span = self.start[stage]
        return lambda f, m: self.progress(min(0.999, lo + span * min(1.0, max(0.0, f))), m)


def run_anatomy(analysis, settings: AnatomySettings | None = None, *, progress: Progress | None = None) -> Anatomy:
    """The whole anatomy of ``analysis``' model (module docstring), cached beside the analysis (:func:`cached_anatomy`
    reads it back). The model's parameters are bit-identical afterwards, also when this raises."""
    settings = settings or AnatomySettings()
    stages = _Stages(progress, {"load": 0.02, "scan": 0.35, "super": 0.05, "interventions": 0.4, "treatment": 0.18})
    stages.sub("load")(0.0, "loading the model")
    lm = analysis.lm
    if not lm.is_causal:
        raise ValueError("the outlier anatomy needs a causal language model (decoder); this model is an encoder")
    seconds: dict[str, float] = {}
    data = evaluate.eval_data(analysis, lm)
    ids = torch.cat([data.calib, data.heldout])
    split = ["calibration"] * data.calib.shape[0] + ["held-out"] * data.heldout.shape[0]
    with model_lock(lm.model):
        t0 = time.perf_counter()
        scan = residual_scan(lm, ids, split, settings, batch_tokens=int(analysis.settings.batch_tokens),
                             progress=stages.sub("scan"))
        seconds["residual_scan"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        search = find_super_weights(lm, settings, progress=stages.sub("super"))
        seconds["super_weights"] = time.perf_counter() - t0
    first = next((r["layer"] for r in scan.layers if r["n_massive"] > 0), None)
    t0 = time.perf_counter()
    inter = interventions(analysis, search, scan, first, progress=stages.sub("interventions"))
    seconds["interventions"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    treat = treatment(analysis, search, settings.bits, progress=stages.sub("treatment"))
    seconds["treatment"] = time.perf_counter() - t0
    meta = {"run_id": uuid.uuid4().hex, "version": ANATOMY_VERSION, "settings": settings.to_json(),
            "first_massive_layer": -1 if first is None else int(first), "search_stopped": bool(search.stopped),
            "search_passes": int(max((s["iteration"] for s in search.spikes), default=-1) + 1),
            "n_tokens": int(ids.numel()), "n_heldout_tokens": int(data.heldout.numel()),
            "seconds": json.dumps(seconds), "group_size": int(analysis.settings.sweep.group_size),
            "zero_point": bool(analysis.settings.sweep.zero_point)}
    tables = {"layers": pd.DataFrame(scan.layers, columns=COLUMNS["layers"]),
              "massive": pd.DataFrame(scan.massive, columns=COLUMNS["massive"]),
              "grid": pd.DataFrame(scan.grid, columns=COLUMNS["grid"]),
              "spikes": pd.DataFrame(search.spikes, columns=COLUMNS["spikes"]),
              "super": pd.DataFrame(search.found, columns=COLUMNS["super"]),
              "interventions": inter, "treatment": treat}
    for name, df in tables.items():  # every table first, the meta row last: a reader sees one run or none
        analysis.write_extra(f"anatomy_{name}", df.assign(run_id=meta["run_id"]))
    analysis.write_extra("anatomy_meta", pd.DataFrame([meta]))
    if progress:
        progress(1.0, "done")
    return Anatomy(settings, tables, {**meta, "seconds": seconds})


def cached_anatomy(analysis) -> Anatomy | None:
    """The cached anatomy of ``analysis``, or None when there is none, it is from another version, or its tables do
    not all belong to the same run."""
    meta = analysis.read_extra("anatomy_meta")
    if meta is None or meta.empty or int(meta["version"].iloc[0]) != ANATOMY_VERSION:
        return None
    m = meta.iloc[0].to_dict()
    tables = {}
    for name in TABLES:
        df = analysis.read_extra(f"anatomy_{name}")
        if df is None or "run_id" not in df or not set(COLUMNS[name]) <= set(df.columns):
            return None
        if len(df) and (df["run_id"] != m["run_id"]).any():
            return None
        tables[name] = df[COLUMNS[name]].reset_index(drop=True)
    if len(tables["layers"]) == 0:
        return None
    m["seconds"] = json.loads(m["seconds"])
    m["search_stopped"] = bool(m["search_stopped"])
    return Anatomy(AnatomySettings.from_json(m["settings"]), tables, m)


# ------------------------------------------------------------------------------------------------
# every method with and without the super weights in fp16
# ------------------------------------------------------------------------------------------------
KEEP_COLUMNS = ["mode", "bits", "group_size", "kept", "metric", "value", "n_tokens", "keep_key", "protocol"]


def keep_key(keep: Keep) -> str:
    """The super weights a keep table was measured with (it is stale once the anatomy finds others)."""
    return ";".join(f"{n}[{r},{c}]" for n in sorted(keep) for r, c in sorted(keep[n]))


def keep_table(analysis, anatomy: Anatomy, *, modes: list[str] | None = None, progress: Progress | None = None
               ) -> pd.DataFrame:
    """Every method with a model half (or ``modes``) at the anatomy's widths, the analysis' group size and zero point,
    with the super weights quantized like every other weight (``kept`` False; these rows also go to Model quality's
    cache) and written back unquantized in fp16 (``kept`` True): one ``run_quality(keep=...)``, each variant built
    once and scored both ways. Cached beside the analysis as ``anatomy_keep``."""
    keep = anatomy.keep
    if not keep:
        raise ValueError("the anatomy found no super weight, so there is nothing to keep in fp16")
    modes = list(modes) if modes is not None else list(MODEL_METHODS)
    sw = analysis.settings.sweep
    # the interventions' protocol (score_variants' default), so the page's tables compare like with like
    df = evaluate.run_quality(analysis, modes=["fp", *modes], bits=list(anatomy.settings.bits),
                              group_size=sw.group_size, zero_point=sw.zero_point, keep=keep, progress=progress,
                              protocol=PROTOCOL)
    kept = df["mode"].str.endswith(evaluate.KEEP_SUFFIX)
    df = df.assign(kept=kept, mode=df["mode"].str.removesuffix(evaluate.KEEP_SUFFIX), keep_key=keep_key(keep))
    df = df[KEEP_COLUMNS].reset_index(drop=True)
    analysis.write_extra(KEEP_TABLE, df.assign(run_id=anatomy.meta["run_id"]))
    return df


def cached_keep_table(analysis, anatomy: Anatomy) -> pd.DataFrame | None:
    """The cached keep table measured with this anatomy's super weights, or None."""
    df = analysis.read_extra(KEEP_TABLE)
    if df is None or df.empty or not set(KEEP_COLUMNS) <= set(df.columns):
        return None
    if (df["keep_key"] != keep_key(anatomy.keep)).any() or (df["protocol"] != PROTOCOL).any():
        return None
    return df[KEEP_COLUMNS].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# where one method's damage comes from
# ------------------------------------------------------------------------------------------------
ATTRIBUTION_TABLE = "anatomy_attribution"
ATTRIBUTION_COLUMNS = ["method", "baseline", "bits", "variant", "group", "n_linears", "metric", "value", "n_tokens"]


def attribution_groups(analysis, anatomy: Anatomy) -> dict[str, list[str]]:
    """The linears an attribution swaps together: the super weights' layers, then each module family over every block
    (the super weights' layers left out of theirs)."""
    sw = set(anatomy.tables["super"]["name"])
    groups: dict[str, list[str]] = {}
    if sw:
        groups["super-weight layers"] = [n for n in analysis.names if n in sw]
    lin = analysis.linears
    for fam in dict.fromkeys(lin["family"]):
        names = [n for n, f in zip(lin["name"], lin["family"]) if f == fam and n not in sw]
        if names:
            cut = len(names) < int((lin["family"] == fam).sum())
            groups[f"{fam}, all blocks{' but the super-weight layers' if cut else ''}"] = names
    return groups


def attribution(analysis, anatomy: Anatomy, method: str, bits: int, baseline: str = "rtn", *,
                progress: Progress | None = None) -> pd.DataFrame:
    """Where ``method``'s model-level damage at ``bits`` comes from: the model with every linear quantized by
    ``baseline``, by ``method``, and by ``baseline`` except one group (:func:`attribution_groups`) quantized by
    ``method``, scored against the fp model (``score_variants``). Every linear is quantized by its layer half on the
    analysis' grid (for the data-free methods that is their model half). Holds two quantized copies of the block
    weights in memory. Cached beside the analysis (``anatomy_attribution``, one entry per method, baseline, bits)."""
    for m in (method, baseline):
        if m not in LAYER_METHODS:
            raise ValueError(f"unknown method {m!r} for the attribution; pick from {', '.join(LAYER_METHODS)}")
    if method == baseline:
        raise ValueError("the attribution compares two different methods")
    bits = check_bits(bits)
    progress = progress or (lambda f, m: None)
    sw = analysis.settings.sweep
    spec = QuantSpec(bits, sw.group_size, sw.zero_point)
    names = analysis.names
    q: dict[str, dict[str, torch.Tensor]] = {baseline: {}, method: {}}
    total = 2 * len(names)
    for i, (m, n) in enumerate((m, n) for m in (baseline, method) for n in names):
        q[m][n] = analysis.quantize_layer(n, m, spec)
        progress(0.7 * (i + 1) / total, f"quantizing with {m}: {n}")
    groups = attribution_groups(analysis, anatomy)

    def mixed(only: set[str]) -> Callable[[], dict]:
        return lambda: {n: q[method if n in only else baseline][n] for n in names}
    variants = {f"{baseline} everywhere": mixed(set()), f"{method} everywhere": mixed(set(names))}
    group_of = {f"{baseline} everywhere": "", f"{method} everywhere": "all linears"}
    for g, members in groups.items():
        key = f"{method} only on {g}"
        variants[key], group_of[key] = mixed(set(members)), g
    df = evaluate.score_variants(analysis, variants, progress=lambda f, m: progress(0.7 + 0.3 * f, m),
                                 protocol=PROTOCOL)
    sizes = {"": 0, "all linears": len(names), **{g: len(v) for g, v in groups.items()}}
    df = df.assign(method=method, baseline=baseline, bits=bits, group=df["variant"].map(group_of).fillna("reference"))
    df["n_linears"] = df["group"].map(sizes).fillna(0).astype(int)
    df = df[ATTRIBUTION_COLUMNS]
    old = analysis.read_extra(ATTRIBUTION_TABLE)
    if old is not None and "run_id" in old and set(ATTRIBUTION_COLUMNS) <= set(old.columns):
        old = old[(old["run_id"] == anatomy.meta["run_id"])
                  & ~((old["method"] == method) & (old["baseline"] == baseline) & (old["bits"] == bits))]
        merged = pd.concat([old, df.assign(run_id=anatomy.meta["run_id"])], ignore_index=True)
    else:
        merged = df.assign(run_id=anatomy.meta["run_id"])
    analysis.write_extra(ATTRIBUTION_TABLE, merged)
    progress(1.0, "done")
    return df.reset_index(drop=True)


def cached_attribution(analysis, anatomy: Anatomy, method: str, bits: int, baseline: str = "rtn"
                       ) -> pd.DataFrame | None:
    """The cached attribution of ``method`` against ``baseline`` at ``bits`` for this anatomy run, or None."""
    df = analysis.read_extra(ATTRIBUTION_TABLE)
    if df is None or "run_id" not in df or not set(ATTRIBUTION_COLUMNS) <= set(df.columns):
        return None
    sel = df[(df["run_id"] == anatomy.meta["run_id"]) & (df["method"] == method) & (df["baseline"] == baseline)
             & (df["bits"] == int(bits))]
    return sel[ATTRIBUTION_COLUMNS].reset_index(drop=True) if len(sel) else None


__all__ = ["ATTRIBUTION_COLUMNS", "consumer_errors", "cached_consumers", "reading_blocks", "sample_blocks",
           "massive_rows", "attribution", "cached_attribution", "attribution_groups", "AnatomySettings", "Anatomy",
           "PAPER_PROMPT", "DEFINITIONS", "COLUMNS", "KEEP_COLUMNS", "run_anatomy", "cached_anatomy", "keep_table",
           "cached_keep_table", "residual_scan", "find_super_weights", "massive_hooks", "treatment", "interventions",
           "sw_label", "keep_key"]
