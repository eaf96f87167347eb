"""Model quality: does a layer-level AWQ gain survive into the whole model?

Two entry points, one scoring engine:

* ``score_variants(analysis, variants)``: the agreed whole-model API. Each variant is a callable returning
  ``{linear name: replacement weight [out, in]}``; the model runs on the analysis' held-out text with those
  weights, is restored bit for bit afterwards (also on error), and is scored against the full-precision
  reference (computed once per call).
* ``run_quality(analysis, modes=..., bits=..., group_size=...)``: the Model quality page and ``python -m core
  evaluate``. Each mode is a small builder in ``MODE_REGISTRY`` (``ModeSpec``) that returns the weights (or a
  ``Plan``) of the whole model at one bit-width; searches shared by several modes (the grouped search) run
  once per run for every bit-width. Adding a mode is one function and one registry line.

Modes (definitions in ``MODE_DEFINITIONS``, shown by the UI):

* ``fp``: the unquantized model, the reference of every other row.
* ``rtn``: ``Q(W)``.
* ``awq``: ``Q(W*s)/s`` with one alpha per linear, the layer-local search of the analysis (its kept
  calibration sample, ``mean|x|`` over all calibration tokens), as the Layer Lab shows it.
* ``awq-grouped``: official AWQ's grouped search (see ``core.grouped``) on the first ``search_tokens``
  calibration tokens.
* ``awq-clip``: ``awq-grouped`` plus official AWQ's weight-clipping search (q/k skipped).
* ``const-alpha``: ``Q(W*s)/s`` with one alpha for every linear, chosen on the first ``const_alpha_tokens``
  calibration tokens by the model-level loss (mean next-token cross-entropy for causal LMs; hidden-state
  relative error against ``fp`` for encoders) over the same alpha grid.

Held-out text: the held-out blocks of the analysis' calibration split (``core.calibration.prepare`` with the
analysis' settings; ``heldout_samples x seqlen`` tokens, non-overlapping windows). Metrics (``DEFINITIONS``):
causal LMs ``perplexity, perplexity_se, kl, kl_p99, kl_p999, same_top, rms_dp`` (llama.cpp's
``--kl-divergence`` report); encoders ``cosine`` and ``hidden_rel_error``.

Result rows: ``mode, bits, group_size, metric, value, n_tokens, seconds, zero_point, search_tokens``. ``fp``
rows carry ``bits = 16`` (``FP_BITS``: "not quantized", whatever the model's dtype) and the run's group
size; they are always included (the reference is computed anyway).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd
import torch

from . import awq, metrics
from .calibration import CalibrationData, CalibrationError, load_text, prepare
from .collect import model_lock
from .grouped import (Plan, apply_plan, build_grouping, forward, is_llama_like, restore, search_grouped,
                      snapshot, with_clip)
from .models import LoadedModel, set_linear_weight
from .quant import check_bits, check_model_group_size

Progress = Callable[[float, str], None]
Weights = Mapping[str, torch.Tensor]
Variant = Plan | Weights  # what a mode builds: a Plan (folds, clips) or plain replacement weights

FP_BITS = 16
COLUMNS = ["mode", "bits", "group_size", "metric", "value", "n_tokens", "seconds", "zero_point", "search_tokens"]
SEARCH_COLUMNS = ["mode", "bits", "group_size", "zero_point", "block", "target", "alpha", "loss", "chosen"]
KL_COLUMNS = ["mode", "bits", "group_size", "zero_point", "fraction", "kl"]
SCORE_COLUMNS = ["variant", "metric", "value", "n_tokens", "seconds"]
CAUSAL_METRICS = ("perplexity", "perplexity_se", "kl", "kl_p99", "kl_p999", "same_top", "rms_dp")
ENCODER_METRICS = ("cosine", "hidden_rel_error")
EVAL_VERSION = 2  # 2: llama.cpp's KL report, token budgets for the searches (column search_tokens)
# Default token budgets of the searches (whole calibration blocks; CLI --search-tokens / --const-alpha-tokens,
# the page's inputs). Both searches cost a forward pass per alpha and bit-width: the grouped one about one
# pass of the blocks over ``SEARCH_TOKENS`` tokens, const-alpha one pass of the model over
# ``CONST_ALPHA_TOKENS``; these defaults keep all six modes at two bit-widths near 35 forward passes over
# the 2,048 held-out tokens of the bundled LLM.
SEARCH_TOKENS = 512  # calibration tokens of the grouped scale / clip search
CONST_ALPHA_TOKENS = 256  # calibration tokens the const-alpha search scores each alpha on
CLIP_TOKENS = 512  # official auto_clip_layer's n_sample_token (core.grouped.CLIP_SAMPLE_TOKENS)
KL_FRACTIONS = tuple(i / 200 for i in range(201)) + (0.999,)  # per-token KL quantiles kept for the chart
KL_BUDGET_BYTES = 512 * 2**20  # full-precision log-probs kept at once (the held-out set is chunked beyond)
LOGIT_BATCH_ELEMENTS = 32 * 2**20  # logits per forward batch (bounds memory on large vocabularies)

DEFINITIONS: dict[str, str] = {
    "perplexity": "exp(mean next-token cross-entropy) over the scored held-out tokens (non-overlapping windows; "
                  "n_tokens = scored tokens)",
    "perplexity_se": "standard error of the perplexity by the delta method: perplexity * sqrt(var(CE) / (n - 1)), "
                     "var over the scored tokens' cross-entropies (llama.cpp)",
    "kl": "mean over scored tokens of KL(p_fp || q) of the next-token distributions, in nats",
    "kl_p99": "99th percentile of the per-token KL(p_fp || q) (linear interpolation between ranks, as llama.cpp)",
    "kl_p999": "99.9th percentile of the per-token KL(p_fp || q)",
    "same_top": "share of scored tokens whose most likely next token (argmax) is the same as in the fp model",
    "rms_dp": "sqrt(mean (q[y] - p_fp[y])^2) with y the actual next token: RMS change of its probability",
    "cosine": "mean over held-out windows of the cosine similarity between the mean-pooled last hidden states "
              "(the sentence embedding of all-MiniLM-L6-v2) of the quantized and the fp model",
    "hidden_rel_error": "||H - H_fp||^2 / ||H_fp||^2 over all held-out tokens' last hidden states",
}


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def check_modes(modes: list[str] | tuple[str, ...] | str) -> list[str]:
    if isinstance(modes, str):
        modes = [m for m in modes.split(",")]
    out: list[str] = []
    for m in modes:
        m = str(m).strip().lower()
        if not m:
            continue
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; pick from {', '.join(MODES)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"give at least one mode ({', '.join(MODES)})")
    return [m for m in MODES if m in out]


def check_bits_list(bits: list[int] | tuple[int, ...], modes: list[str]) -> list[int]:
    out = sorted({check_bits(b) for b in bits})
    if not out and any(m != "fp" for m in modes):
        raise ValueError("give at least one bit-width (2..8)")
    return out


def check_group_size(widths: list[int], group_size: int) -> int:
    """The model-wide group-size rule, shared with analyze and the Layer Lab (``core.quant``)."""
    return check_model_group_size(widths, group_size)


def check_tokens(n: int | None, label: str) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"{label} must be a positive number of tokens, got {n!r}")
    return int(n)


def first_blocks(ids: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """The first whole blocks of ``ids [n, seqlen]`` holding at most ``max_tokens`` tokens (at least one block)."""
    if max_tokens is None:
        return ids
    return ids[:max(1, min(ids.shape[0], int(max_tokens) // max(1, ids.shape[1])))]


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def eval_data(analysis, lm: LoadedModel, text: str | None = None) -> CalibrationData:
    """The analysis' calibration and held-out blocks, recreated from its settings (and checked against
    the text hash recorded in its manifest). ``text``: the calibration text, when it was an upload."""
    spec = analysis.settings.calibration
    if text is None:
        try:
            text = load_text(spec.source)
        except CalibrationError as e:
            raise ValueError(f"cannot reload this analysis' calibration text ({e}); pass it as text=") from e
    data = prepare(spec, lm.tokenizer, lm.max_positions, text=text)
    want = analysis.manifest.get("text_sha")
    if want and data.text_sha != want:
        raise ValueError("the calibration text differs from the one this analysis was computed on "
                         "(the file changed?); re-run the analysis first")
    return data


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def _vocab(lm: LoadedModel) -> int:
    return int(getattr(lm.model.config, "vocab_size", 0) or 0) or 50000


def _eval_batches(lm: LoadedModel, ids: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    t = ids.shape[1]
    per = max(1, int(batch_tokens) // t)
    if lm.is_causal:
        per = max(1, min(per, LOGIT_BATCH_ELEMENTS // (t * _vocab(lm))))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def _chunks(lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Held-out blocks in chunks whose full-precision reference fits ``KL_BUDGET_BYTES``."""
    if not lm.is_causal:
        return [ids]
    per = max(1, KL_BUDGET_BYTES // (ids.shape[1] * _vocab(lm) * 4))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def _output(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    out = forward(lm, ids)
    if lm.is_causal:
        return out.logits.float()
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0]
    return h.float()


class _Score:
    """Accumulates one model's metrics against the full-precision reference, batch by batch. Causal LMs keep
    one float64 KL value per scored token (for the percentiles), never the log-probabilities."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.ce = self.ce2 = self.dp2 = 0.0
        self.same = 0
        self.kls: list[torch.Tensor] = []
        self.err = self.ref = self.cos = 0.0
        self.n_tok = self.n_seq = 0

    def add(self, ids: torch.Tensor, out: torch.Tensor, ref: torch.Tensor | None) -> None:
        """``out``: logits ``[b, t, vocab]`` (causal) or last hidden states ``[b, t, h]``; ``ref``: the fp
        log-probs ``[b, t-1, vocab]`` / hidden states, ``None`` for the reference itself."""
        if self.causal:
            logp = torch.log_softmax(out[:, :-1], dim=-1)
            tgt = ids[:, 1:].to(logp.device)
            ce = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()
            self.ce += float(ce.sum())
            self.ce2 += float(ce.pow(2).sum())
            self.n_tok += int(tgt.numel())
            if ref is not None:
                kl, same, dp = metrics.token_divergence(ref, logp, tgt)
                self.kls.append(kl.reshape(-1).cpu())
                self.same += int(same.sum())
                self.dp2 += float(dp.pow(2).sum())
        else:
            self.n_tok += int(ids.numel())
            self.n_seq += int(ids.shape[0])
            if ref is not None:
                self.err += float((out - ref).double().pow(2).sum())
                self.ref += float(ref.double().pow(2).sum())
                self.cos += float(torch.nn.functional.cosine_similarity(out.mean(1).double(), ref.mean(1).double(),
                                                                        dim=-1).sum())

    def kl_values(self) -> torch.Tensor:
        return torch.cat(self.kls) if self.kls else torch.zeros(self.n_tok, dtype=torch.float64)

    def metrics(self, fp: bool = False) -> dict[str, float]:
        if self.causal:
            ppl, se = metrics.perplexity_with_se(self.ce, self.ce2, self.n_tok)
            if fp:
                return {"perplexity": ppl, "perplexity_se": se, "kl": 0.0, "kl_p99": 0.0, "kl_p999": 0.0,
                        "same_top": 1.0, "rms_dp": 0.0}
            kl = self.kl_values()
            n = max(1, self.n_tok)
            return {"perplexity": ppl, "perplexity_se": se, "kl": float(kl.sum()) / n,
                    "kl_p99": metrics.percentile(kl, 0.99), "kl_p999": metrics.percentile(kl, 0.999),
                    "same_top": self.same / n, "rms_dp": math.sqrt(self.dp2 / n)}
        if fp:
            return {"cosine": 1.0, "hidden_rel_error": 0.0}
        return {"cosine": self.cos / max(1, self.n_seq),
                "hidden_rel_error": self.err / self.ref if self.ref > 0 else float("nan")}


def _reference(lm: LoadedModel, batches: list[torch.Tensor], score: _Score,
               progress: Progress | None = None) -> list[torch.Tensor]:
    refs = []
    for i, b in enumerate(batches):
        out = _output(lm, b)
        score.add(b, out, None)
        refs.append(torch.log_softmax(out[:, :-1], dim=-1) if lm.is_causal else out)
        if progress:
            progress((i + 1) / len(batches), f"full-precision reference: batch {i + 1}/{len(batches)}")
    return refs


def apply_variant(lm: LoadedModel, variant: Variant, snap) -> None:
    """Write ``variant`` into the model in place (undo with ``grouped.restore``). A mapping names linears
    and their replacement weights ``[out, in]``; the linears it does not name keep their weights."""
    if isinstance(variant, Plan):
        apply_plan(lm, variant, snap)
        return
    info = {li.name: li for li in lm.linears}
    with torch.no_grad():
        for name, w in variant.items():
            if name not in info:
                raise ValueError(f"the variant names {name!r}, which is not a quantizable linear of this model")
            want = (info[name].out_features, info[name].in_features)
            if tuple(w.shape) != want:
                raise ValueError(f"the replacement weight of {name} has shape {tuple(w.shape)}, expected {want} "
                                 f"([out, in])")
            m = lm.model.get_submodule(name)
            set_linear_weight(m, w.to(m.weight.device))


def _score_variants(lm: LoadedModel, heldout: torch.Tensor, builders: dict[Any, Callable[[], Variant]], snap, *,
                    batch_tokens: int, step: Callable[[float, str], None], ref0: tuple | None = None
                    ) -> tuple[_Score, float, dict[Any, _Score], dict[Any, float]]:
    """The scoring engine: fp reference and every variant on ``heldout``, chunk by chunk (one chunk's fp
    log-probs in memory). A builder is called once per chunk; the model is restored after each variant.
    ``step(units, msg)``: progress, one unit per forward pass over all of ``heldout``. ``ref0``: the
    ``(fp score, refs, seconds)`` of the first chunk when already computed."""
    chunks = _chunks(lm, heldout)
    scores = {k: _Score(lm.is_causal) for k in builders}
    seconds = {k: 0.0 for k in builders}
    for ci, chunk in enumerate(chunks):
        batches = _eval_batches(lm, chunk, batch_tokens)
        share = chunk.shape[0] / heldout.shape[0]
        if ci == 0 and ref0 is not None:
            fp_score, refs, fp_seconds = ref0
        else:
            if ci == 0:
                fp_score, fp_seconds = _Score(lm.is_causal), 0.0
            t0 = time.perf_counter()
            refs = _reference(lm, batches, fp_score)
            fp_seconds += time.perf_counter() - t0
            step(share, "full-precision reference")
        for key, build in builders.items():
            t0 = time.perf_counter()
            try:
                apply_variant(lm, build(), snap)
                for b_ids, ref in zip(batches, refs):
                    scores[key].add(b_ids, _output(lm, b_ids), ref)
            finally:
                restore(lm, snap)
            seconds[key] += time.perf_counter() - t0
            step(share, f"held-out evaluation: {key if isinstance(key, str) else ' w'.join(map(str, key))}")
        del refs
    return fp_score, fp_seconds, scores, seconds


def score_variants(analysis, variants: Mapping[str, Callable[[], Weights]], *, max_tokens: int | None = None,
                   progress: Progress | None = None) -> pd.DataFrame:
    """Score whole-model weight variants on the analysis' held-out text against the fp model.

    ``variants``: name -> callable returning ``{linear name: replacement weight [out, in] float32}``; linears
    it does not name keep their fp weights. ``max_tokens``: score only the first whole held-out blocks with at
    most that many tokens (default: all). Returns one row per variant and metric (``SCORE_COLUMNS``:
    ``variant, metric, value, n_tokens, seconds``; metrics as :data:`DEFINITIONS`, ``CAUSAL_METRICS`` or
    ``ENCODER_METRICS``), preceded by the reference's rows as variant ``"fp"`` unless a variant has that
    name. The fp reference is computed once; the model is bit-identical afterwards, also when this raises
    (a callable may be called once per held-out chunk: once unless the fp log-probs exceed 512 MiB).
    """
    max_tokens = check_tokens(max_tokens, "max_tokens")
    names = list(variants)
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError("variant names must be non-empty strings")
    report = progress or (lambda f, m: None)
    report(0.0, "loading the model")
    lm = analysis.lm
    held = first_blocks(eval_data(analysis, lm).heldout, max_tokens)
    ticker = _Ticker(report, 1 + len(names))
    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            fp_score, fp_seconds, scores, seconds = _score_variants(
                lm, held, dict(variants), snap, batch_tokens=int(analysis.settings.batch_tokens), step=ticker.step)
        finally:
            restore(lm, snap)
    rows = []
    if "fp" not in variants:
        rows += [{"variant": "fp", "metric": m, "value": v, "n_tokens": fp_score.n_tok, "seconds": fp_seconds}
                 for m, v in fp_score.metrics(fp=True).items()]
    for n in names:
        rows += [{"variant": n, "metric": m, "value": v, "n_tokens": scores[n].n_tok, "seconds": seconds[n]}
                 for m, v in scores[n].metrics().items()]
    report(1.0, "done")
    return pd.DataFrame(rows, columns=SCORE_COLUMNS).astype({"value": "float64", "n_tokens": "int64",
                                                             "seconds": "float64"})


# ------------------------------------------------------------------------------------------------
# modes: one small builder each, in a registry
# ------------------------------------------------------------------------------------------------
@dataclass
class ModeContext:
    """What a mode builder may use: the analysis, its model with the fp snapshot ``snap`` (the model itself is
    unmodified while builders run), the run's settings, and ``memo`` for results shared between modes.
    Builders append search curves to ``search_rows`` (``SEARCH_COLUMNS``) and may add the time of shared
    work to ``seconds[(mode, bits)]``."""

    analysis: Any
    lm: LoadedModel
    data: CalibrationData
    snap: dict[str, torch.Tensor]
    modes: tuple[str, ...]
    bits: tuple[int, ...]
    group_size: int
    zero_point: bool
    n_grid: int
    batch_tokens: int
    search_tokens: int
    const_alpha_tokens: int
    memo: dict[str, Any] = field(default_factory=dict)
    search_rows: list[dict] = field(default_factory=list)
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def input_of(self) -> dict[str, str]:
        return dict(zip(self.analysis.linears["name"], self.analysis.linears["input_key"]))

    def units(self, ids: torch.Tensor) -> float:
        """Cost of one forward pass over ``ids``, in forward passes over the held-out blocks."""
        return ids.numel() / max(1, self.data.heldout.numel())

    def search_blocks(self) -> torch.Tensor:
        return first_blocks(self.data.calib, self.search_tokens)

    def const_alpha_blocks(self) -> torch.Tensor:
        return first_blocks(self.data.calib, self.const_alpha_tokens)


@dataclass(frozen=True)
class ModeSpec:
    """A whole-model quantization mode. ``build(ctx, bits, progress)`` returns the model's weights at ``bits``:
    a ``Plan`` (scales, folds, clips; see ``core.grouped``) or ``{linear name: weight [out, in]}`` (linears not
    named stay fp). ``cost(ctx, bits)``: the build's work in forward passes over the held-out blocks (for
    progress and the time estimate). ``shared``: a search in ``SHARED_SEARCHES`` it needs, run once per run
    for all bit-widths (its result in ``ctx.memo[shared]``). ``budget``: the calibration token budget its
    searches use, ``"search"`` (``search_tokens``) or ``"const-alpha"`` (``const_alpha_tokens``), recorded
    in its rows' ``search_tokens``; ``None`` when it uses neither."""

    definition: str
    build: Callable[[ModeContext, int, Progress], Variant]
    cost: Callable[[ModeContext, int], float] = lambda ctx, bits: 0.02
    shared: str | None = None
    budget: str | None = None


@dataclass(frozen=True)
class SharedSearch:
    """A search several modes share: ``run(ctx, progress)`` (result stored in ``ctx.memo``), ``cost(ctx)``."""

    run: Callable[[ModeContext, Progress], Any]
    cost: Callable[[ModeContext], float]


def _rtn(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    return Plan(bits=bits, group_size=ctx.group_size, zero_point=ctx.zero_point)


def _awq(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    plan, rows = _awq_plan(ctx.analysis, ctx.lm, bits, ctx.group_size, ctx.zero_point, ctx.n_grid)
    ctx.search_rows += rows
    return plan


def _grouped_search(ctx: ModeContext, progress: Progress):
    grouping = build_grouping(ctx.lm, ctx.input_of)
    res = search_grouped(ctx.lm, grouping, ctx.search_blocks(), ctx.snap, bits=list(ctx.bits),
                         group_size=ctx.group_size, zero_point=ctx.zero_point, n_grid=ctx.n_grid,
                         clip="awq-clip" in ctx.modes, batch_tokens=ctx.batch_tokens, input_of=ctx.input_of,
                         progress=progress)
    for b in ctx.bits:
        for s in res.searches[b]:
            ctx.search_rows += _search_rows("awq-grouped", b, ctx.group_size, ctx.zero_point, s.group.block,
                                            s.group.label(grouping.prefix), s.alphas, s.losses, s.best_index)
    return res


def _grouped_units(search_units: float, clip_units: float, n_bits: int, n_grid: int, clip: bool) -> float:
    """Work of the grouped search: one pass of the blocks to capture their inputs, then per bit-width every
    block's scoring modules once per alpha (about one pass of the blocks each); the clip search (official:
    10 candidates on at most 512 sampled tokens) measured about 13 such passes over its tokens per bit-width."""
    return search_units * (1 + n_bits * n_grid) + (13 * clip_units * n_bits if clip else 0.0)


def _grouped_cost(ctx: ModeContext) -> float:
    blocks = ctx.search_blocks()
    return _grouped_units(ctx.units(blocks), ctx.units(first_blocks(blocks, CLIP_TOKENS)), len(ctx.bits),
                          ctx.n_grid, "awq-clip" in ctx.modes)


def _awq_grouped(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    res = ctx.memo["grouped"]
    ctx.seconds[("awq-grouped", bits)] = res.scale_seconds[bits]
    return res.plans[bits]


def _awq_clip(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    res = ctx.memo["grouped"]
    ctx.seconds[("awq-clip", bits)] = res.scale_seconds[bits] + res.clip_seconds[bits]
    return with_clip(res.plans[bits], res.clips[bits])


def _const_alpha_mode(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    plan, alphas, losses, best = _const_alpha(ctx.analysis, ctx.lm, ctx.snap, ctx.const_alpha_blocks(), bits,
                                              ctx.group_size, ctx.zero_point, ctx.n_grid, ctx.batch_tokens, progress)
    ctx.search_rows += _search_rows("const-alpha", bits, ctx.group_size, ctx.zero_point, -1,
                                    "whole model (calibration loss)", alphas, losses, best)
    return plan


def _gptq_mode(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    """Sequential GPTQ (core.sequential) on the search token budget."""
    from .sequential import sequential_gptq
    return sequential_gptq(ctx.lm, ctx.search_blocks(), ctx.snap, bits=bits, group_size=ctx.group_size,
                           zero_point=ctx.zero_point, batch_tokens=ctx.batch_tokens, input_of=ctx.input_of,
                           progress=progress)


def _awq_gptq_mode(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    from .sequential import sequential_gptq
    res = ctx.memo["grouped"]
    ctx.seconds[("awq-gptq", bits)] = res.scale_seconds[bits]
    return sequential_gptq(ctx.lm, ctx.search_blocks(), ctx.snap, bits=bits, group_size=ctx.group_size,
                           zero_point=ctx.zero_point, batch_tokens=ctx.batch_tokens, input_of=ctx.input_of,
                           scales=dict(res.plans[bits].col), progress=progress)


def _hqq_mode(ctx: ModeContext, bits: int, progress: Progress) -> Variant:
    from .sequential import hqq_weights
    return hqq_weights(ctx.lm, ctx.snap, bits=bits, group_size=ctx.group_size, progress=progress)


SHARED_SEARCHES: dict[str, SharedSearch] = {
    "grouped": SharedSearch(_grouped_search, _grouped_cost),
}
MODE_REGISTRY: dict[str, ModeSpec] = {
    "rtn": ModeSpec("round-to-nearest: every block linear W -> Q(W)", _rtn),
    "awq": ModeSpec("one alpha per linear, chosen layer-locally on the kept calibration sample (mean|x| over all "
                    "calibration tokens); W -> Q(W*s)/s", _awq, lambda ctx, b: 0.2),
    "awq-grouped": ModeSpec("official AWQ: one scale per group of linears sharing an input, chosen by the loss of "
                            "the module that consumes them, block by block, on the search token budget",
                            _awq_grouped, shared="grouped", budget="search"),
    "awq-clip": ModeSpec("awq-grouped plus official AWQ's per-group weight clipping search (q/k projections not "
                         "clipped)", _awq_clip, shared="grouped", budget="search"),
    "const-alpha": ModeSpec("one alpha for the whole model, chosen by the model's loss on the const-alpha token "
                            "budget of calibration text; W -> Q(W*s)/s", _const_alpha_mode,
                            lambda ctx, b: (ctx.n_grid + (0 if ctx.lm.is_causal else 1)) * ctx.units(
                                ctx.const_alpha_blocks()), budget="const-alpha"),
    # issue 10 (core.sequential): block inputs captured once, each block run twice on them, GPTQ per linear
    "gptq": ModeSpec("GPTQ, sequential: block by block, each block's Hessians X^T X from the search token budget "
                     "run through the already-quantized blocks before it", _gptq_mode,
                     lambda ctx, b: 2 * ctx.units(ctx.search_blocks()) + 0.5, budget="search"),
    "hqq": ModeSpec("HQQ: data-free half-quadratic optimisation of each group's zero (asymmetric)", _hqq_mode,
                    lambda ctx, b: 0.2),
    "awq-gptq": ModeSpec("AWQ's grouped scales, then sequential GPTQ on the scaled weights W*s with the Hessian of "
                         "X/s (GPTQ(W*s)/s: the function of folding 1/s into the previous op)", _awq_gptq_mode,
                     lambda ctx, b: 2 * ctx.units(ctx.search_blocks()) + 0.5, shared="grouped", budget="search"),
}
MODES = ("fp", *MODE_REGISTRY)
AWQ_MODES = ("fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha")  # AWQ and its baselines (issue 9)
MODE_DEFINITIONS: dict[str, str] = {"fp": "the unquantized model (reference)",
                                    **{m: s.definition for m, s in MODE_REGISTRY.items()}}


def _per_linear_plan(lm: LoadedModel, bits: int, g: int, zp: bool, scales: dict[str, torch.Tensor]) -> Plan:
    plan = Plan(bits=bits, group_size=g, zero_point=zp)
    for li in lm.linears:
        plan.col[li.name] = scales[li.name].float().cpu()
        plan.unscale.add(li.name)
    return plan


def _awq_plan(analysis, lm: LoadedModel, bits: int, g: int, zp: bool, n_grid: int) -> tuple[Plan, list[dict]]:
    """Per-linear AWQ: each linear's own best alpha from the layer-local search (the analysis' sweep table
    when it was run at this setting, else ``Analysis.alpha_curve``, which computes the same search)."""
    sw = analysis.settings.sweep
    layers = analysis.layers
    sel = layers[layers["bits"] == bits] if "bits" in layers else layers.iloc[0:0]
    width = dict(zip(analysis.linears["name"], analysis.linears["in_features"]))
    cached = (bits in tuple(sw.bits) and bool(sw.zero_point) == zp and int(sw.n_grid) == n_grid
              and len(sel) == len(lm.linears)
              and all(int(gs) == (g if g > 0 else int(width[n])) for n, gs in zip(sel["name"], sel["group_size"])))
    scales: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    block_of = {li.name: li.block for li in lm.linears}
    if cached:
        curves = analysis.curves
        curves = curves[curves["bits"] == bits]
        for n, alpha in zip(sel["name"], sel["best_alpha"]):
            scales[n] = analysis.scales_at(n, float(alpha), group_size=g)
            c = curves[curves["name"] == n]
            al = torch.tensor(c["alpha"].to_numpy())
            rows += _search_rows("awq", bits, g, zp, block_of[n], n, al, torch.tensor(c["loss"].to_numpy()),
                                 int((al - float(alpha)).abs().argmin()))
    else:
        for li in lm.linears:
            c = analysis.alpha_curve(li.name, bits=bits, group_size=g, zero_point=zp, n_grid=n_grid)
            scales[li.name] = c.scales
            rows += _search_rows("awq", bits, g, zp, li.block, li.name, c.alphas, c.losses, c.best_index)
    return _per_linear_plan(lm, bits, g, zp, scales), rows


def _search_rows(mode: str, bits: int, g: int, zp: bool, block: int, target: str, alphas, losses, best: int) -> list[dict]:
    return [{"mode": mode, "bits": bits, "group_size": g, "zero_point": zp, "block": block, "target": target,
             "alpha": float(a), "loss": float(v), "chosen": i == best}
            for i, (a, v) in enumerate(zip(alphas.tolist(), losses.tolist()))]


def _const_alpha(analysis, lm: LoadedModel, snap, ids: torch.Tensor, bits: int, g: int, zp: bool, n_grid: int,
                 batch_tokens: int, progress: Progress) -> tuple[Plan, torch.Tensor, torch.Tensor, int]:
    """One alpha for every linear: the grid point with the lowest model-level loss on ``ids`` (calibration).
    Each alpha quantizes every linear once and runs the model once over ``ids``."""
    alphas = awq.alpha_grid(n_grid)
    by_key: dict[str, torch.Tensor] = {}
    key_of = dict(zip(analysis.linears["name"], analysis.linears["input_key"]))
    for li in lm.linears:
        k = key_of.get(li.name, li.name)
        if k not in by_key:
            by_key[k] = awq.awq_scales(analysis.x_mean(li.name), alphas)  # [A, in], mean|x| of all calib tokens
    batches = _eval_batches(lm, ids, batch_tokens)
    steps = len(alphas) + (0 if lm.is_causal else 1)
    ref = None
    if not lm.is_causal:
        ref = [_output(lm, b) for b in batches]
        progress(1 / steps, "const-alpha: reference")
    losses = torch.empty(len(alphas), dtype=torch.float64)
    try:
        for i in range(len(alphas)):
            # every linear is rewritten from the snapshot (apply_plan reads the fp weights from ``snap``), so
            # consecutive alphas need no restore in between: one fake quantization per linear and alpha
            plan = _per_linear_plan(lm, bits, g, zp,
                                    {li.name: by_key[key_of.get(li.name, li.name)][i] for li in lm.linears})
            apply_plan(lm, plan, snap)
            s = _Score(lm.is_causal)
            for j, b in enumerate(batches):
                s.add(b, _output(lm, b), None if ref is None else ref[j])
            losses[i] = s.ce / max(1, s.n_tok) if lm.is_causal else (s.err / s.ref if s.ref > 0 else float("nan"))
            progress((i + 1 + steps - len(alphas)) / steps, f"const-alpha search w{bits}: alpha {float(alphas[i]):.2f}")
    finally:
        restore(lm, snap)
    best = awq.first_min_index(losses)
    plan = _per_linear_plan(lm, bits, g, zp, {li.name: by_key[key_of.get(li.name, li.name)][best] for li in lm.linears})
    return plan, alphas, losses, best


# ------------------------------------------------------------------------------------------------
# progress with a time estimate
# ------------------------------------------------------------------------------------------------
def _duration(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


class _Ticker:
    """Progress in work units (one unit = one forward pass over the held-out blocks), with the time left
    extrapolated from the time per unit so far (so the estimate exists from the first finished batch)."""

    def __init__(self, progress: Progress | None, total: float):
        self.progress = progress or (lambda f, m: None)
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.t0 = time.perf_counter()

    def _emit(self, done: float, msg: str) -> None:
        el = time.perf_counter() - self.t0
        if done > 0 and el > 0.5:
            msg = f"{msg} (about {_duration(el * (self.total - done) / done)} left)"
        self.progress(min(0.999, done / self.total), msg)

    def sub(self, units: float) -> Progress:
        start = self.done

        def report(f: float, msg: str) -> None:
            self._emit(start + units * min(1.0, max(0.0, f)), msg)
        self.done += units
        return report

    def step(self, units: float, msg: str) -> None:
        self.done += units
        self._emit(self.done, msg)


def budget_tokens(mode: str, calib: torch.Tensor, search_tokens: int | None, const_alpha_tokens: int | None) -> int:
    """Calibration tokens ``mode``'s searches run on (its rows' ``search_tokens``; 0 when it has no budget):
    the first whole blocks of ``calib [n, seqlen]`` within its budget."""
    spec = MODE_REGISTRY.get(mode)
    if spec is None or spec.budget is None:
        return 0
    return int(first_blocks(calib, search_tokens if spec.budget == "search" else const_alpha_tokens).numel())


def estimate_units(analysis, modes: list[str], bits: list[int], *, search_tokens: int = SEARCH_TOKENS,
                   const_alpha_tokens: int = CONST_ALPHA_TOKENS) -> float:
    """The work of a run, in forward passes over the held-out blocks (the UI multiplies it by a measured
    forward time). Needs no model: only the analysis' settings."""
    spec = analysis.settings.calibration
    held = max(1, spec.heldout_samples * spec.seqlen)
    causal = bool(analysis.manifest.get("is_causal", True))
    n_grid = int(analysis.settings.sweep.n_grid)

    def units(n_tok: int) -> float:
        return max(spec.seqlen, min(spec.n_samples * spec.seqlen, n_tok) // spec.seqlen * spec.seqlen) / held
    q = [m for m in modes if m != "fp"]
    total = 1.0 + len(q) * len(bits)
    total += sum(2 * units(search_tokens) + 0.5 for m in q if m in ("gptq", "awq-gptq")) * len(bits)
    if any(m in q for m in ("awq-grouped", "awq-clip", "awq-gptq")):
        total += _grouped_units(units(search_tokens), units(min(search_tokens, CLIP_TOKENS)), len(bits), n_grid,
                                "awq-clip" in q)
    if "const-alpha" in q:
        total += len(bits) * (n_grid + (0 if causal else 1)) * units(const_alpha_tokens)
    return total


# ------------------------------------------------------------------------------------------------
# the page's / CLI's entry point
# ------------------------------------------------------------------------------------------------
def run_quality(analysis, *, modes: list[str], bits: list[int], group_size: int, zero_point: bool = True,
                progress: Progress | None = None, text: str | None = None, search_tokens: int = SEARCH_TOKENS,
                const_alpha_tokens: int = CONST_ALPHA_TOKENS) -> pd.DataFrame:
    """Fake-quantize the whole model in each of ``modes`` at each of ``bits`` and measure it on held-out text.

    ``search_tokens``: calibration tokens (whole blocks, at least one) the grouped scale and clip searches run
    on; ``const_alpha_tokens``: those the const-alpha search scores each alpha on. Returns this run's rows
    (``COLUMNS``) and merges them into the analysis' cached ``quality`` table (:func:`cached_quality`); the
    search curves go to ``quality_search`` (:func:`cached_search`), the per-token KL quantiles to
    ``quality_kl`` (:func:`cached_kl`). The model's parameters are bit-identical afterwards, also when this
    raises. ``progress(fraction, message)``: the message ends with the estimated time left.
    """
    modes = check_modes(modes)
    bits = check_bits_list(bits, modes)
    g = check_group_size([int(w) for w in analysis.linears["in_features"]], group_size)
    search_tokens = check_tokens(search_tokens, "search_tokens")
    const_alpha_tokens = check_tokens(const_alpha_tokens, "const_alpha_tokens")
    zp = bool(zero_point)
    report = progress or (lambda f, m: None)
    report(0.0, "loading the model")
    lm = analysis.lm
    data = eval_data(analysis, lm, text)
    settings = analysis.settings
    q_modes = [m for m in modes if m != "fp"]
    tasks = [(m, b) for m in q_modes for b in bits]
    held = data.heldout
    chunks = _chunks(lm, held)
    batch_tokens = int(settings.batch_tokens)

    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        ctx = ModeContext(analysis, lm, data, snap, tuple(modes), tuple(bits), g, zp, int(settings.sweep.n_grid),
                          batch_tokens, search_tokens, const_alpha_tokens)
        shared = list(dict.fromkeys(MODE_REGISTRY[m].shared for m in q_modes if MODE_REGISTRY[m].shared))
        total = (1 + len(tasks) + sum(SHARED_SEARCHES[s].cost(ctx) for s in shared)
                 + sum(MODE_REGISTRY[m].cost(ctx, b) for m, b in tasks))
        ticker = _Ticker(report, total)
        try:
            # 1. the fp reference of the first held-out chunk first: it calibrates the time estimate
            batches0 = _eval_batches(lm, chunks[0], batch_tokens)
            fp_score, t0 = _Score(lm.is_causal), time.perf_counter()
            refs0 = _reference(lm, batches0, fp_score, ticker.sub(chunks[0].shape[0] / held.shape[0]))
            ref0 = (fp_score, refs0, time.perf_counter() - t0)
            if len(chunks) > 1:
                ticker.done += 1 - chunks[0].shape[0] / held.shape[0]  # the other chunks' references come later
            # 2. shared searches, on the unmodified model
            for s in shared:
                ctx.memo[s] = SHARED_SEARCHES[s].run(ctx, ticker.sub(SHARED_SEARCHES[s].cost(ctx)))
            # 3. build each mode's weights and score them (one chunk: right away, so only one is held)
            built: dict[tuple[str, int], Variant] = {}
            scores: dict[tuple[str, int], _Score] = {}
            seconds: dict[tuple[str, int], float] = {}
            for t in tasks:
                t1 = time.perf_counter()
                built[t] = MODE_REGISTRY[t[0]].build(ctx, t[1], ticker.sub(MODE_REGISTRY[t[0]].cost(ctx, t[1])))
                seconds[t] = ctx.seconds.get(t, 0.0) + time.perf_counter() - t1
                if len(chunks) == 1:
                    v = built.pop(t)
                    _, _, sc, sec = _score_variants(lm, held, {t: lambda v=v: v}, snap, batch_tokens=batch_tokens,
                                                    step=ticker.step, ref0=ref0)
                    scores[t], seconds[t] = sc[t], seconds[t] + sec[t]
            if len(chunks) > 1:
                fp_score, fp_seconds, sc, sec = _score_variants(
                    lm, held, {t: (lambda t=t: built[t]) for t in tasks}, snap, batch_tokens=batch_tokens,
                    step=lambda u, m: ticker.step(u if "reference" not in m else 0.0, m), ref0=ref0)
                for t in tasks:
                    scores[t], seconds[t] = sc[t], seconds[t] + sec[t]
            else:
                fp_seconds = ref0[2]
            del ref0, refs0
        finally:
            restore(lm, snap)

    rows, kl_rows = [], []
    n_st = {m: budget_tokens(m, data.calib, search_tokens, const_alpha_tokens) for m in modes}
    n_tok = fp_score.n_tok
    for metric, v in fp_score.metrics(fp=True).items():
        rows.append({"mode": "fp", "bits": FP_BITS, "group_size": g, "metric": metric, "value": v,
                     "n_tokens": n_tok, "seconds": fp_seconds, "zero_point": zp, "search_tokens": 0})
    for t in tasks:
        for metric, v in scores[t].metrics().items():
            rows.append({"mode": t[0], "bits": t[1], "group_size": g, "metric": metric, "value": v,
                         "n_tokens": scores[t].n_tok, "seconds": seconds[t], "zero_point": zp,
                         "search_tokens": n_st[t[0]]})
        if lm.is_causal:
            kl = scores[t].kl_values()
            kl_rows += [{"mode": t[0], "bits": t[1], "group_size": g, "zero_point": zp, "fraction": f,
                         "kl": metrics.percentile(kl, f)} for f in KL_FRACTIONS]
    df = _frame(rows)
    keys = ["mode", "bits", "group_size", "zero_point"]
    _merge_write(analysis, "quality", df, keys + ["metric"])
    if ctx.search_rows:
        _merge_write(analysis, "quality_search", pd.DataFrame(ctx.search_rows, columns=SEARCH_COLUMNS), keys)
    if kl_rows:
        _merge_write(analysis, "quality_kl", pd.DataFrame(kl_rows, columns=KL_COLUMNS), keys)
    report(1.0, "done")
    return df


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    order = {m: i for i, m in enumerate(MODES)}
    metric_order = {m: i for i, m in enumerate(CAUSAL_METRICS + ENCODER_METRICS)}
    if df.empty:
        return df
    df = df.astype({"bits": "int64", "group_size": "int64", "n_tokens": "int64", "value": "float64",
                    "seconds": "float64", "zero_point": "bool", "search_tokens": "int64"})
    key = df["mode"].map(order).fillna(99) * 1e6 + df["bits"] * 1e3 + df["metric"].map(metric_order).fillna(99)
    return df.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def _merge_write(analysis, name: str, new: pd.DataFrame, keys: list[str]) -> None:
    new = new.assign(eval_version=EVAL_VERSION)
    old = analysis.read_extra(name)
    if old is not None and not old.empty and set(new.columns) <= set(old.columns):
        old = old[old.get("eval_version", -1) == EVAL_VERSION] if "eval_version" in old else old.iloc[0:0]
        new_keys = set(map(tuple, new[keys].drop_duplicates().itertuples(index=False, name=None)))
        kept = old[[tuple(r) not in new_keys for r in old[keys].itertuples(index=False, name=None)]]
        new = pd.concat([kept[new.columns], new], ignore_index=True)
    analysis.write_extra(name, new)


def _read(analysis, name: str) -> pd.DataFrame | None:
    df = analysis.read_extra(name)
    if df is None or df.empty or "eval_version" not in df:
        return None
    df = df[df["eval_version"] == EVAL_VERSION].drop(columns=["eval_version"])
    return df.reset_index(drop=True) if not df.empty else None


def cached_quality(analysis) -> pd.DataFrame | None:
    """Every model-quality row computed so far for this analysis (all runs merged), or ``None``."""
    df = _read(analysis, "quality")
    if df is None or not set(COLUMNS) <= set(df.columns):
        return None
    return _frame(df[COLUMNS].to_dict("records"))


def cached_search(analysis) -> pd.DataFrame | None:
    """The search curves behind the cached rows (``SEARCH_COLUMNS``): for ``awq`` one curve per linear, for
    ``awq-grouped`` (shared by ``awq-clip``) one per scale group, for ``const-alpha`` the model-level curve
    (``block = -1``); ``chosen`` marks the selected alpha. ``None`` when nothing is cached."""
    df = _read(analysis, "quality_search")
    if df is None or not set(SEARCH_COLUMNS) <= set(df.columns):
        return None
    return df[SEARCH_COLUMNS]


def cached_kl(analysis) -> pd.DataFrame | None:
    """Quantiles of the per-token KL(p_fp || q) of each cached causal-LM row (``KL_COLUMNS``: the KL value at
    each ``fraction`` of ``KL_FRACTIONS``, linear interpolation between ranks), or ``None``."""
    df = _read(analysis, "quality_kl")
    if df is None or not set(KL_COLUMNS) <= set(df.columns):
        return None
    return df[KL_COLUMNS]


# ------------------------------------------------------------------------------------------------
# UI text
# ------------------------------------------------------------------------------------------------
def _split_name(name: str, block: int) -> tuple[str, str]:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == str(block):
            return ".".join(parts[:i]), ".".join(parts[i + 1:])
    return "", name


def _model_type(analysis) -> str:
    lm = getattr(analysis, "_lm", None)
    if lm is None and analysis.manifest.get("model_type"):  # recorded by analyze (GGUF sources have no config.json)
        return str(analysis.manifest["model_type"])
    if lm is None:
        try:
            from transformers import AutoConfig

            from .models import MINILM, canonical_model, minilm_path
            s = analysis.settings
            src = str(minilm_path()) if canonical_model(s.model) == MINILM else s.model
            cfg = AutoConfig.from_pretrained(src, trust_remote_code=s.trust_remote_code,
                                             **({"revision": s.revision} if s.revision else {}))
            return str(getattr(cfg, "model_type", "") or "")
        except Exception:  # noqa: BLE001 - fall back to the model itself
            lm = analysis.lm
    return str(getattr(lm.model.config, "model_type", "") or "")


def grouping_note(analysis) -> str:
    """One sentence: how ``awq-grouped`` groups this architecture's linears (for the UI)."""
    lin = analysis.linears
    b0 = lin[lin["block"] == lin["block"].min()]
    blk = int(b0["block"].iloc[0])
    rel = {_split_name(n, blk)[1]: r for n, r in zip(b0["name"], b0.to_dict("records"))}
    mtype = _model_type(analysis)
    if is_llama_like(mtype, set(rel)):
        v, o = rel["self_attn.v_proj"], rel["self_attn.o_proj"]
        if (v["out_features"], v["in_features"]) == (o["out_features"], o["in_features"]):
            vo = "v_proj → o_proj scored on o_proj"
        else:
            vo = ("no v_proj → o_proj group (their weight shapes differ: grouped-query attention, which official "
                  "AWQ skips, so o_proj is quantized unscaled)")
        return (f"{mtype} blocks are Llama-style, so awq-grouped uses official AWQ's groups — input_layernorm → "
                f"q/k/v scored on the self-attention output, {vo}, post_attention_layernorm → gate/up scored on "
                f"the MLP output, up_proj → down_proj scored on down_proj — with each scale folded into the "
                f"preceding norm or linear.")
    groups: dict[str, list[str]] = {}
    for n, key in zip(b0["name"], b0["input_key"]):
        groups.setdefault(key, []).append(_split_name(n, blk)[1])
    desc = "; ".join("{" + ", ".join(v) + "}" for v in groups.values())
    return (f"{mtype or 'This model'} is not a Llama-style architecture, so awq-grouped gives one scale to each set "
            f"of linears that read the same input ({desc}), chosen by the MSE of their concatenated outputs on all "
            f"calibration tokens and applied as Q(W·s)/s.")


__all__ = ["MODES", "AWQ_MODES", "MODE_REGISTRY", "ModeSpec", "ModeContext", "FP_BITS", "COLUMNS", "SEARCH_COLUMNS", "KL_COLUMNS",
           "SCORE_COLUMNS", "DEFINITIONS", "MODE_DEFINITIONS", "run_quality", "score_variants", "estimate_units",
           "cached_quality", "cached_search", "cached_kl", "grouping_note", "eval_data", "check_modes"]

