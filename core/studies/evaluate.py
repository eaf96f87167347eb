"""Model quality: does a layer-level AWQ gain survive into the whole model?

Two entry points, one scoring engine:

* ``score_variants(analysis, variants)``: the agreed whole-model API. Each variant is a callable returning
  ``{linear name: replacement weight [out, in]}``; the model runs on the analysis' held-out text with those
  weights, is restored bit for bit afterwards (also on error), and is scored against the full-precision
  reference (computed once per call).
* ``run_quality(analysis, modes=..., bits=..., group_size=...)``: the Model quality page and ``python -m core
  evaluate``. A mode is a method of the one registry (``core.methods``) applied at model scope: its model half
  returns the weights (or a ``Recipe``) of the whole model at one bit-width; searches shared by several methods
  (the grouped search) run once per run for every bit-width. This module only scores.

Modes (definitions in ``MODE_DEFINITIONS``, from the registry; shown by the UI):

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

Result rows: ``mode, bits, group_size, metric, value, n_tokens, seconds, zero_point, search_tokens, protocol,
format``. ``fp`` rows carry ``bits = 16`` (``FP_BITS``: "not quantized", whatever the model's dtype) and the run's
group size; they are always included (the reference is computed anyway).

llama.cpp types (``run_quality(format="Q4_0")``): the modes that run on them (rtn, awq, awq-grouped, awq-clip;
``FORMAT_MODES``) quantize every linear in that type as llama-quantize writes it on the linear's width; the rows
carry the type in ``format`` (and its level bits, block and minimum as ``bits``, ``group_size``, ``zero_point``);
integer-grid rows have ``format = ""`` (rows cached before the column existed are read so).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import pandas as pd
import torch

from ..grids import llamacpp, metrics
from ..grids.quant import check_bits, check_model_group_size
from ..grids.spec import choose
from ..methods import METHODS, MODEL_METHODS, ModelContext, RunShape
from ..methods.base import CLIP_TOKENS, SEARCH_COLUMNS, Variant, Weights
from ..methods.grouped import is_llama_like
from ..methods.recipe import Keep, Recipe, apply_recipe, check_keep, keep_values, with_keep
from ..model import score
from ..model.blocks import original_weight, restore, snapshot
from ..model.calibration import CalibrationData, CalibrationError, first_blocks, load_text, prepare
from ..model.collect import model_lock
from ..model import stream
from ..model.linears import set_linear_weight, set_parameter
from ..model.models import MINILM, LoadedModel, canonical_model, minilm_path

Progress = Callable[[float, str], None]
Hooks = Callable[[LoadedModel], list]  # registers forward hooks on the model, returns their handles

FP_BITS = 16
KEEP_SUFFIX = "+keep"  # run_quality(keep=...): the mode of a row scored with the kept weights in fp16
COLUMNS = ["mode", "bits", "group_size", "metric", "value", "n_tokens", "seconds", "zero_point", "search_tokens",
           "protocol", "format"]
KL_COLUMNS = ["mode", "bits", "group_size", "zero_point", "protocol", "format", "fraction", "kl"]
GRID = ""  # the ``format`` of a row on the explorer's integer grid
SCORE_COLUMNS = ["variant", "metric", "value", "n_tokens", "seconds"]
CAUSAL_METRICS = ("perplexity", "perplexity_se", "kl", "kl_se", "kl_p99", "kl_p999", "same_top", "same_top_se", "rms_dp",
                  "rms_dp_se")
PROTOCOL = score.LLAMACPP  # Model quality's scoring protocol unless told (core.model.score.PROTOCOLS)
ENCODER_METRICS = ("cosine", "hidden_rel_error")
EVAL_VERSION = 4  # 2: llama.cpp's KL report, token budgets for the searches; 3: scoring protocol (column protocol);
# 4: awq-gptq runs GPTQ on the folded model (the model its checkpoint stores)
# Cached rows of version 2 were scored on every position without BOS: they are read as protocol "all-positions".
# Default token budgets of the searches (whole calibration blocks; CLI --search-tokens / --const-alpha-tokens,
# the page's inputs). Both searches cost a forward pass per alpha and bit-width: the grouped one about one
# pass of the blocks over ``SEARCH_TOKENS`` tokens, const-alpha one pass of the model over
# ``CONST_ALPHA_TOKENS``; these defaults keep all six modes at two bit-widths near 35 forward passes over
# the 2,048 held-out tokens of the bundled LLM.
SEARCH_TOKENS = 512  # calibration tokens of the grouped scale / clip search
CONST_ALPHA_TOKENS = 256  # calibration tokens the const-alpha search scores each alpha on
KL_FRACTIONS = tuple(i / 200 for i in range(201)) + (0.999,)  # per-token KL quantiles kept for the chart

MODES = ("fp", *MODEL_METHODS)  # fp (the reference) and every method with a model half, in registry order
# what the page and the CLI run when no mode is named (the methods whose whole-model meaning predates the one registry)
DEFAULT_MODES = ("fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha", "gptq", "hqq", "awq-gptq")
AWQ_MODES = ("fp", "rtn", "awq", "awq-grouped", "awq-clip", "const-alpha")  # AWQ and its baselines (issue 9)
FORMAT_MODES = ("fp", *(m for m in MODEL_METHODS if METHODS[m].formats))  # the modes that run on llama.cpp types
MODE_DEFINITIONS: dict[str, str] = {"fp": "the unquantized model (reference)",
                                    **{m: METHODS[m].definition for m in MODEL_METHODS}}

DEFINITIONS: dict[str, str] = {
    "perplexity": "exp(mean next-token cross-entropy) over the scored held-out tokens (non-overlapping windows; "
                  "n_tokens = scored tokens; which positions are scored: the protocol)",
    "perplexity_se": "standard error of the perplexity by the delta method: perplexity * sqrt(var(CE) / (n - 1)), "
                     "var over the scored tokens' cross-entropies (llama.cpp)",
    "kl": "mean over scored tokens of KL(p_fp || q) of the next-token distributions, in nats",
    "kl_se": "± of the mean KL: sqrt((E[KL^2] - E[KL]^2) / (n - 1)) over the scored tokens (llama.cpp)",
    "kl_p99": "99th percentile of the per-token KL(p_fp || q) (linear interpolation between ranks, as llama.cpp)",
    "kl_p999": "99.9th percentile of the per-token KL(p_fp || q)",
    "same_top": "share of scored tokens whose most likely next token (argmax) is the same as in the fp model",
    "same_top_se": "± of same_top: sqrt(p (1 - p) / (n - 1)) (llama.cpp)",
    "rms_dp": "sqrt(mean (q[y] - p_fp[y])^2) with y the actual next token: RMS change of its probability",
    "rms_dp_se": "± of rms_dp: 0.5 / rms_dp * sqrt((E[dp^4] - E[dp^2]^2) / (n - 1)) (llama.cpp)",
    "cosine": "mean over held-out windows of the cosine similarity between the mean-pooled last hidden states "
              "(the sentence embedding of all-MiniLM-L6-v2) of the quantized and the fp model",
    "hidden_rel_error": "||H - H_fp||^2 / ||H_fp||^2 over all held-out tokens' last hidden states",
}


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def check_modes(modes: list[str] | tuple[str, ...] | str) -> list[str]:
    out = choose(modes, MODES, "mode")
    if not out:
        raise ValueError(f"give at least one mode ({', '.join(MODES)})")
    return [m for m in MODES if m in out]


def check_format(format: str | None, modes: list[str]) -> str:
    """``""`` (the integer grid) or the canonical llama.cpp type; a mode that does not run on llama.cpp types is one
    sentence naming those that do."""
    if not format:
        return GRID
    t = llamacpp.check_type(format)
    refused = [m for m in modes if m not in FORMAT_MODES]
    if refused:
        raise ValueError(f"mode {refused[0]!r} does not run on llama.cpp types such as {t}; pick from "
                         f"{', '.join(m for m in FORMAT_MODES if m != 'fp')}")
    return t


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
class FoldedWeights(dict):
    """``{linear name: weight [out, in]}`` of a model whose other block parameters changed too: ``state`` maps
    parameter names (``model.layers.0.input_layernorm.weight``) to their new values, e.g. norms with AWQ's scales
    folded in (``core.studies.export``). ``apply_variant`` writes both; ``restore`` undoes both."""

    def __init__(self, weights: Mapping[str, torch.Tensor] = (), state: Mapping[str, torch.Tensor] | None = None):
        super().__init__(weights)
        self.state: dict[str, torch.Tensor] = dict(state or {})


def keep_variant(lm: LoadedModel, variant: Variant, snap, keep: Keep | None) -> Variant:
    """``variant`` with the weights of ``keep`` (per linear, ``(row, col)``; ``core.methods.recipe.Keep``) kept at
    their unquantized value, stored in fp16: a ``Recipe`` writes them back in its own scaled / folded coordinates,
    a mapping gets the snapshot's value at those cells (a linear it does not name keeps its fp weight anyway)."""
    keep = check_keep(lm, keep)
    if not keep:
        return variant
    if isinstance(variant, Recipe):
        return with_keep(variant, keep)
    if isinstance(variant, FoldedWeights):
        raise ValueError("keeping weights in fp16 is not supported for a folded export model")
    return {n: keep_values(w.float(), original_weight(lm, snap, n).to(w.device), keep[n]) if keep.get(n) else w
            for n, w in variant.items()}


def apply_variant(lm: LoadedModel, variant: Variant, snap, keep: Keep | None = None) -> None:
    """Write ``variant`` into the model in place (undo with ``core.model.blocks.restore``). A mapping names linears
    and their replacement weights ``[out, in]``; the linears it does not name keep their weights. ``keep``: weights
    kept unquantized in fp16 (:func:`keep_variant`)."""
    variant = keep_variant(lm, variant, snap, keep)
    if isinstance(variant, Recipe):
        apply_recipe(lm, variant, snap)
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
        state = getattr(variant, "state", None) or {}
        params = dict(lm.model.named_parameters())
        for name, v in state.items():
            if name not in snap or name not in params or tuple(params[name].shape) != tuple(v.shape):
                raise ValueError(f"the variant changes {name!r}, which is not a block parameter of this model's shape")
        s = lm.streamer
        if s is not None:  # streamed: the variant becomes a layer read with each block (nothing written)
            s.push(stream.Values(_VariantParams(variant, state, {n for n in variant if info[n].transposed})))
            return
        for name, w in variant.items():
            m = lm.model.get_submodule(name)
            set_linear_weight(m, w.to(m.weight.device))
        for name, v in state.items():
            set_parameter(lm.model, name, v)


class _VariantParams(Mapping):
    """A variant's weights by parameter name, in the modules' own layout (GPT-2's Conv1D: ``[in, out]``)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], transposed: set[str]):
        self.weights, self.state, self.transposed = weights, state, transposed

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.state:
            return self.state[key]
        n = key[:-len(".weight")] if key.endswith(".weight") else None
        if n is None or n not in self.weights:
            raise KeyError(key)
        w = self.weights[n]
        return w.T if n in self.transposed else w

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self.state or (key.endswith(".weight") and key[:-7] in self.weights))

    def __iter__(self):
        return iter([f"{n}.weight" for n in self.weights] + list(self.state))

    def __len__(self) -> int:
        return len(self.weights) + len(self.state)


def _score_variants(lm: LoadedModel, heldout: torch.Tensor, builders: dict[Any, Callable[[], Variant]], snap, *,
                    batch_tokens: int, step: Callable[[float, str], None], ref0: tuple | None = None,
                    hooks: Mapping[Any, Hooks] | None = None,
                    protocol: str = score.ALL_POSITIONS) -> tuple[score.Score, float, dict[Any, score.Score], dict[Any, float]]:
    """The scoring engine: fp reference and every variant on ``heldout``, chunk by chunk (one chunk's fp
    log-probs in memory). A builder is called once per chunk; the model is restored after each variant (and its
    ``hooks`` removed). ``step(units, msg)``: progress, one unit per forward pass over all of ``heldout``. ``ref0``:
    the ``(fp score, refs, seconds)`` of the first chunk when already computed. ``protocol``: the positions scored
    (``heldout`` already in the protocol's windows, ``core.model.score.windows``)."""
    chunks = score.held_chunks(lm, heldout)
    scores = {k: score.Score(lm.is_causal, protocol) for k in builders}
    seconds = {k: 0.0 for k in builders}
    for ci, chunk in enumerate(chunks):
        batches = score.eval_batches(lm, chunk, batch_tokens)
        share = chunk.shape[0] / heldout.shape[0]
        if ci == 0 and ref0 is not None:
            fp_score, refs, fp_seconds = ref0
        else:
            if ci == 0:
                fp_score, fp_seconds = score.Score(lm.is_causal, protocol), 0.0
            t0 = time.perf_counter()
            refs = score.reference(lm, batches, fp_score)
            fp_seconds += time.perf_counter() - t0
            step(share, "full-precision reference")
        for key, build in builders.items():
            t0 = time.perf_counter()
            handles: list = []
            try:
                apply_variant(lm, build(), snap)
                if hooks and key in hooks:
                    handles = list(hooks[key](lm))
                for b_ids, ref, out in zip(batches, refs, score.outputs(lm, batches)):
                    scores[key].add(b_ids, out, ref)
            finally:
                for h in handles:
                    h.remove()
                restore(lm, snap)
            seconds[key] += time.perf_counter() - t0
            step(share, f"held-out evaluation: {key if isinstance(key, str) else ' w'.join(map(str, key))}")
        del refs
    return fp_score, fp_seconds, scores, seconds


def score_variants(analysis, variants: Mapping[str, Callable[[], Weights]], *, max_tokens: int | None = None,
                   progress: Progress | None = None, keep: Keep | None = None,
                   hooks: Mapping[str, Hooks] | None = None, protocol: str = score.ALL_POSITIONS) -> pd.DataFrame:
    """Score whole-model weight variants on the analysis' held-out text against the fp model.

    ``variants``: name -> callable returning ``{linear name: replacement weight [out, in] float32}``; linears
    it does not name keep their fp weights. ``max_tokens``: score only the first whole held-out blocks with at
    most that many tokens (default: all). Returns one row per variant and metric (``SCORE_COLUMNS``:
    ``variant, metric, value, n_tokens, seconds``; metrics as :data:`DEFINITIONS`, ``CAUSAL_METRICS`` or
    ``ENCODER_METRICS``), preceded by the reference's rows as variant ``"fp"`` unless a variant has that
    name. The fp reference is computed once; the model is bit-identical afterwards, also when this raises
    (a callable may be called once per held-out chunk: once unless the fp log-probs exceed 512 MiB).
    ``keep``: weights every variant keeps unquantized in fp16 (:func:`keep_variant`). ``hooks``: variant name ->
    ``install(lm)`` returning the forward-hook handles it registered on the model (an intervention on activations,
    e.g. ``core.studies.anatomy``); they are removed after that variant, also on error. ``protocol``: which
    positions are scored (``core.model.score.PROTOCOLS``); ``all-positions`` here by default, so the studies built
    on this (plans, anatomy) keep the numbers of their caches; Model quality's ``run_quality`` defaults to llama.cpp's.
    """
    max_tokens = check_tokens(max_tokens, "max_tokens")
    names = list(variants)
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError("variant names must be non-empty strings")
    report = progress or (lambda f, m: None)
    report(0.0, "loading the model")
    lm = analysis.lm
    protocol = score.check_protocol(protocol)
    held = score.windows(lm, first_blocks(eval_data(analysis, lm).heldout, max_tokens), protocol)
    ticker = _Ticker(report, 1 + len(names))
    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            builders = {k: (lambda f=f: keep_variant(lm, f(), snap, keep)) for k, f in variants.items()}
            fp_score, fp_seconds, scores, seconds = _score_variants(
                lm, held, builders, snap, batch_tokens=int(analysis.settings.batch_tokens), step=ticker.step,
                hooks=hooks, protocol=protocol)
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
    spec = METHODS.get(mode)
    if spec is None or spec.budget is None:
        return 0
    return int(first_blocks(calib, search_tokens if spec.budget == "search" else const_alpha_tokens).numel())


def run_cost(shape: RunShape, modes: list[str]) -> float:
    """The work of a run of ``modes`` (its fp reference included), in forward passes over the held-out blocks:
    each method's model half per bit-width, its shared searches once, one held-out pass per (mode, bits)."""
    q = [METHODS[m] for m in modes if m != "fp"]
    shared = {m.shared.name: m.shared for m in q if m.shared is not None}
    return (1.0 + len(q) * shape.n_bits + sum(s.cost(shape) for s in shared.values())
            + shape.n_bits * sum(m.cost(shape) for m in q))


def estimate_units(analysis, modes: list[str], bits: list[int], *, search_tokens: int = SEARCH_TOKENS,
                   const_alpha_tokens: int = CONST_ALPHA_TOKENS) -> float:
    """The work of a run, in forward passes over the held-out blocks (the UI multiplies it by a measured
    forward time). Needs no model: only the analysis' settings."""
    spec = analysis.settings.calibration
    held = max(1, spec.heldout_samples * spec.seqlen)

    def units(n_tok: int) -> float:
        return max(spec.seqlen, min(spec.n_samples * spec.seqlen, n_tok) // spec.seqlen * spec.seqlen) / held
    shape = RunShape(units(search_tokens), units(min(search_tokens, CLIP_TOKENS)), units(const_alpha_tokens),
                     len(bits), int(analysis.settings.sweep.n_grid), tuple(modes),
                     bool(analysis.manifest.get("is_causal", True)))
    return run_cost(shape, modes)


# ------------------------------------------------------------------------------------------------
# the page's / CLI's entry point
# ------------------------------------------------------------------------------------------------
def run_quality(analysis, *, modes: list[str], bits: list[int], group_size: int, zero_point: bool = True,
                progress: Progress | None = None, text: str | None = None, search_tokens: int = SEARCH_TOKENS,
                const_alpha_tokens: int = CONST_ALPHA_TOKENS, keep: Keep | None = None,
                protocol: str = PROTOCOL, format: str | None = None) -> pd.DataFrame:
    """Fake-quantize the whole model in each of ``modes`` at each of ``bits`` and measure it on held-out text.

    ``search_tokens``: calibration tokens (whole blocks, at least one) the grouped scale and clip searches run
    on; ``const_alpha_tokens``: those the const-alpha search scores each alpha on. Returns this run's rows
    (``COLUMNS``) and merges them into the analysis' cached ``quality`` table (:func:`cached_quality`); the
    search curves go to ``quality_search`` (:func:`cached_search`), the per-token KL quantiles to
    ``quality_kl`` (:func:`cached_kl`). The model's parameters are bit-identical afterwards, also when this
    raises. ``progress(fraction, message)``: the message ends with the estimated time left.

    ``keep``: also score every mode and bits with these weights kept unquantized in fp16 (:func:`keep_variant`;
    the super weights of ``core.studies.anatomy``), built once with the plain one: rows of mode ``<mode>+keep``
    (``KEEP_SUFFIX``) beside the plain rows, returned but never cached.

    ``protocol``: which held-out positions are scored (``core.model.score.PROTOCOLS``; column ``protocol``):
    llama.cpp's by default, so the figures compare with ``llama-perplexity --kl-divergence``.

    ``format``: a llama.cpp type (``"Q4_0"``) instead of the integer grid: every linear in that type as llama-quantize
    writes it on its width (a k-quant on rows 256 does not divide: its fallback); ``bits``, ``group_size`` and
    ``zero_point`` are then the type's own (level bits, block, minimum), the rows' ``format`` names it. Modes that
    do not run on llama.cpp types are refused with one sentence (``FORMAT_MODES``).
    """
    modes = check_modes(modes)
    fmt = check_format(format, modes)
    if fmt:  # the type fixes the grid; its block is the rows' group size (a fallback may use another on some rows)
        bits, group_size, zero_point = [llamacpp.nominal_bits(fmt)], llamacpp.block_size(fmt), llamacpp.has_min(fmt)
    bits = check_bits_list(bits, modes)
    g = group_size if fmt else check_group_size([int(w) for w in analysis.linears["in_features"]], group_size)
    search_tokens = check_tokens(search_tokens, "search_tokens")
    const_alpha_tokens = check_tokens(const_alpha_tokens, "const_alpha_tokens")
    zp = bool(zero_point)
    report = progress or (lambda f, m: None)
    report(0.0, "loading the model")
    lm = analysis.lm
    data = eval_data(analysis, lm, text)
    keep = check_keep(lm, keep)
    settings = analysis.settings
    q_modes = [m for m in modes if m != "fp"]
    tasks = [(m, b) for m in q_modes for b in bits]
    kept = {t: (t[0] + KEEP_SUFFIX, t[1]) for t in tasks} if keep else {}
    protocol = score.check_protocol(protocol)
    held = score.windows(lm, data.heldout, protocol)
    chunks = score.held_chunks(lm, held)
    batch_tokens = int(settings.batch_tokens)

    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        ctx = ModelContext(analysis, lm, data, snap, tuple(modes), tuple(bits), g, zp, int(settings.sweep.n_grid),
                           batch_tokens, search_tokens, const_alpha_tokens, format=fmt or None)
        shape = ctx.shape()
        shared = list({METHODS[m].shared.name: METHODS[m].shared for m in q_modes if METHODS[m].shared}.values())
        ticker = _Ticker(report, run_cost(shape, modes) + len(kept))
        try:
            # 1. the fp reference of the first held-out chunk first: it calibrates the time estimate
            batches0 = score.eval_batches(lm, chunks[0], batch_tokens)
            fp_score, t0 = score.Score(lm.is_causal, protocol), time.perf_counter()
            refs0 = score.reference(lm, batches0, fp_score, ticker.sub(chunks[0].shape[0] / held.shape[0]))
            ref0 = (fp_score, refs0, time.perf_counter() - t0)
            if len(chunks) > 1:
                ticker.done += 1 - chunks[0].shape[0] / held.shape[0]  # the other chunks' references come later
            # 2. shared searches, on the unmodified model
            for s in shared:
                ctx.memo[s.name] = s.run(ctx, ticker.sub(s.cost(shape)))
            # 3. build each mode's weights and score them (one chunk: right away, so only one is held)
            built: dict[tuple[str, int], Variant] = {}
            scores: dict[tuple[str, int], score.Score] = {}
            seconds: dict[tuple[str, int], float] = {}
            for t in tasks:
                t1 = time.perf_counter()
                m = METHODS[t[0]]
                built[t] = m.model(ctx, ctx.spec(t[1]), m.options(), ticker.sub(m.cost(shape)))
                seconds[t] = ctx.seconds.get(t, 0.0) + time.perf_counter() - t1
                if t in kept:
                    seconds[kept[t]] = seconds[t]
                if len(chunks) == 1:
                    v = built.pop(t)
                    run = {t: lambda v=v: v}
                    if t in kept:
                        run[kept[t]] = lambda v=v: keep_variant(lm, v, snap, keep)
                    _, _, sc, sec = _score_variants(lm, held, run, snap, batch_tokens=batch_tokens,
                                                    step=ticker.step, ref0=ref0, protocol=protocol)
                    for k in run:
                        scores[k], seconds[k] = sc[k], seconds[k] + sec[k]
                    del v, run  # before the next mode is built: one mode's weights at a time
            if len(chunks) > 1:
                run = {t: (lambda t=t: built[t]) for t in tasks}
                run.update({kept[t]: (lambda t=t: keep_variant(lm, built[t], snap, keep)) for t in kept})
                fp_score, fp_seconds, sc, sec = _score_variants(
                    lm, held, run, snap, batch_tokens=batch_tokens,
                    step=lambda u, m: ticker.step(u if "reference" not in m else 0.0, m), ref0=ref0,
                    protocol=protocol)
                for k in run:
                    scores[k], seconds[k] = sc[k], seconds[k] + sec[k]
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
                     "n_tokens": n_tok, "seconds": fp_seconds, "zero_point": zp, "search_tokens": 0,
                     "protocol": protocol, "format": fmt})
    for t in tasks + [kept[t] for t in tasks if t in kept]:
        base = t[0].removesuffix(KEEP_SUFFIX)
        for metric, v in scores[t].metrics().items():
            rows.append({"mode": t[0], "bits": t[1], "group_size": g, "metric": metric, "value": v,
                         "n_tokens": scores[t].n_tok, "seconds": seconds[t], "zero_point": zp,
                         "search_tokens": n_st[base], "protocol": protocol, "format": fmt})
        if lm.is_causal and t[0] == base:
            kl = scores[t].kl_values()
            kl_rows += [{"mode": t[0], "bits": t[1], "group_size": g, "zero_point": zp, "protocol": protocol,
                         "format": fmt, "fraction": f, "kl": metrics.percentile(kl, f)} for f in KL_FRACTIONS]
    df = _frame(rows)
    keys = ["mode", "bits", "group_size", "zero_point", "format"]
    _merge_write(analysis, "quality", df[~df["mode"].str.endswith(KEEP_SUFFIX)], keys + ["protocol", "metric"])
    if ctx.search_rows:
        _merge_write(analysis, "quality_search", pd.DataFrame(ctx.search_rows, columns=SEARCH_COLUMNS).assign(format=fmt),
                     keys)
    if kl_rows:
        _merge_write(analysis, "quality_kl", pd.DataFrame(kl_rows, columns=KL_COLUMNS), keys + ["protocol"])
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
                    "seconds": "float64", "zero_point": "bool", "search_tokens": "int64", "protocol": "str",
                    "format": "str"})
    kept = df["mode"].str.endswith(KEEP_SUFFIX)  # a kept-in-fp16 row right after its mode's
    key = ((df["mode"].str.removesuffix(KEEP_SUFFIX).map(order).fillna(99) + 0.5 * kept) * 1e6 + df["bits"] * 1e3
           + df["metric"].map(metric_order).fillna(99))
    return df.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def _upgrade(df: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    """Version-2 rows as version 3: ``quality`` / ``quality_kl`` rows were scored on every position (protocol
    ``all-positions``); the search curves do not depend on the protocol. Rows cached before the ``format`` column
    are the integer grid's (``GRID``)."""
    if df is None or df.empty or "eval_version" not in df:
        return df
    if "format" not in df:
        df = df.assign(format=GRID)
    old = df["eval_version"] == 2
    if not old.any():
        return df
    df = df.copy()
    if name == "quality_search":
        df.loc[old, "eval_version"] = EVAL_VERSION
        return df
    if "protocol" not in df:
        df["protocol"] = score.LLAMACPP
    df.loc[old, "protocol"] = score.ALL_POSITIONS
    df.loc[old, "eval_version"] = EVAL_VERSION
    return df


def _merge_write(analysis, name: str, new: pd.DataFrame, keys: list[str]) -> None:
    new = new.assign(eval_version=EVAL_VERSION)
    old = _upgrade(analysis.read_extra(name), name)
    if old is not None and not old.empty and set(new.columns) <= set(old.columns):
        old = old[old.get("eval_version", -1) == EVAL_VERSION] if "eval_version" in old else old.iloc[0:0]
        if not old.empty:  # (rows of an older version only: nothing to keep; an empty mask would select columns)
            new_keys = set(map(tuple, new[keys].drop_duplicates().itertuples(index=False, name=None)))
            kept = old[[tuple(r) not in new_keys for r in old[keys].itertuples(index=False, name=None)]]
            new = pd.concat([kept[new.columns], new], ignore_index=True)
    analysis.write_extra(name, new)


def _read(analysis, name: str) -> pd.DataFrame | None:
    df = _upgrade(analysis.read_extra(name), name)
    if df is None or df.empty or "eval_version" not in df:
        return None
    df = df[df["eval_version"] == EVAL_VERSION].drop(columns=["eval_version"])
    return df.reset_index(drop=True) if not df.empty else None


def _of_format(df: pd.DataFrame | None, format: str | None) -> pd.DataFrame | None:
    """The rows of ``format`` (``GRID``: the integer grid's; a llama.cpp type: its own; None: every row)."""
    if df is None or format is None:
        return df
    df = df[df["format"].fillna(GRID) == (llamacpp.check_type(format) if format else GRID)]
    return df.reset_index(drop=True) if not df.empty else None


def cached_quality(analysis, format: str | None = GRID) -> pd.DataFrame | None:
    """Every model-quality row computed so far for this analysis (all runs merged) on the integer grid, or ``None``.
    ``format``: a llama.cpp type's rows instead (``run_quality(format=...)``), None for every row (column ``format``)."""
    df = _read(analysis, "quality")
    if df is None or not set(COLUMNS) <= set(df.columns):
        return None
    df = _of_format(df, format)
    return None if df is None else _frame(df[COLUMNS].to_dict("records"))


def cached_search(analysis, format: str | None = GRID) -> pd.DataFrame | None:
    """The search curves behind the cached rows (``SEARCH_COLUMNS``): for ``awq`` one curve per linear, for
    ``awq-grouped`` (shared by ``awq-clip``) one per scale group, for ``const-alpha`` the model-level curve
    (``block = -1``); ``chosen`` marks the selected alpha. ``None`` when nothing is cached."""
    df = _read(analysis, "quality_search")
    if df is None or not set(SEARCH_COLUMNS) <= set(df.columns):
        return None
    df = _of_format(df, format)
    return None if df is None else df[SEARCH_COLUMNS]


def cached_kl(analysis, format: str | None = GRID) -> pd.DataFrame | None:
    """Quantiles of the per-token KL(p_fp || q) of each cached causal-LM row (``KL_COLUMNS``: the KL value at
    each ``fraction`` of ``KL_FRACTIONS``, linear interpolation between ranks), or ``None``."""
    df = _read(analysis, "quality_kl")
    if df is None or not set(KL_COLUMNS) <= set(df.columns):
        return None
    df = _of_format(df, format)
    return None if df is None else df[KL_COLUMNS]


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


__all__ = ["FoldedWeights", "MODES", "FORMAT_MODES", "GRID", "check_format", "DEFAULT_MODES", "AWQ_MODES", "FP_BITS", "KEEP_SUFFIX", "keep_variant", "COLUMNS", "SEARCH_COLUMNS", "KL_COLUMNS",
           "SCORE_COLUMNS", "DEFINITIONS", "MODE_DEFINITIONS", "run_quality", "score_variants", "estimate_units",
           "run_cost", "cached_quality", "cached_search", "cached_kl", "grouping_note", "eval_data", "check_modes"]
