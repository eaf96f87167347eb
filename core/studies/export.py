"""The shared export model: one quantized model as it leaves the explorer, and the registry of file formats.

``prepare_export(analysis, method=..., spec=..., plan=...)`` runs a method's model half exactly as Model quality
does (``core.studies.evaluate.run_quality``: a ``ModelContext`` on the analysis' calibration blocks, the shared
searches, ``METHODS[m].model(ctx, spec, options, progress)``) and turns its result into an :class:`ExportModel`:

* a ``Recipe`` (rtn, awq-grouped, awq-clip, ...) is **folded** as official AWQ's ``apply_scale`` does and as
  ``core.methods.recipe.apply_recipe`` applies it: each norm's weight (and bias) divided by its scales, each
  preceding linear's output rows divided by the next group's scales, each linear's ``weight`` the scaled, row-folded
  and clipped weight the grid rounds, its ``fake`` ``Recipe.final`` (the weight Model quality scores). A Recipe
  with ``unscale`` linears (``Q(W s)/s``: the per-linear ``awq`` method, or awq-grouped on an architecture whose
  scales have no preceding operator) has no folded form where linears share an input and is refused;
  awq-grouped and awq-clip are the folded forms of AWQ. A Recipe whose method rounded the folded weights itself
  (awq-gptq: ``Recipe.rounded``, GPTQ on ``W s``) passes those weights and their integer grids (``Recipe.grids``).
* a ``core.methods.base.GridWeights`` mapping (gptq, hqq) passes its integer grid per linear (``params``); a plain
  mapping has ``params=None``. Their ``weight`` is the method's output (what a file format's own grid rounds).

For a llama.cpp type (``spec.format``, e.g. ``"Q4_0"``) ``fake`` is the weight rounded by that type
(``core.grids.llamacpp``), i.e. exactly what a GGUF reader dequantizes.

A plan (the JSON of ``core.studies.plan_export``: ``method``, ``layers: {name: {bits, group_size}}``, optionally a
llama.cpp ``type`` per layer) puts each linear at its own setting. Scales and clip values of a Recipe are one per
group of linears sharing an input, so they cannot follow each linear's setting: the method's search runs once at
the plan's most common quantized setting, and each linear's folded, clipped weight is then rounded at its own
setting. A method that rounds linear by linear in one pass (sequential GPTQ: gptq, awq-gptq) gets the plan's
settings (``ModelContext.specs``) and runs once, each linear at its own setting, as the plan's model runs; another
method that returns weights (hqq) runs once per distinct setting and each linear takes its weight from the run at
its setting. Linears at 16 bits stay in full precision (``spec=None``).

``export(analysis, format=..., out=...)`` writes with a registered writer (``register_format``) into a temporary
sibling folder renamed to ``out`` only at the end: nothing half-written on error or Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..grids import llamacpp as _llamacpp
from ..grids.quant import fake_quant
from ..grids.spec import QuantSpec
from ..methods import METHODS, MODEL_METHODS, ModelContext
from ..methods.base import GridWeights
from ..methods.recipe import Recipe, folded_params
from ..methods import awq_search
from ..model import store, stream
from ..model.blocks import original_weight, restore, snapshot
from ..model.stream import Snapshot
from ..model.collect import model_lock
from . import evaluate

Progress = Callable[[float, str], None]
FP16 = 16  # a plan's "kept in full precision"


class ExportError(ValueError):
    """An export that cannot be written faithfully; the message is one sentence."""


@dataclass
class ExportLinear:
    """One quantizable linear as it leaves the explorer.

    ``name``: HF module name (``model.layers.3.mlp.down_proj``); ``weight [out, in]`` float32: what the grid rounds
    (AWQ's scales folded in, clip applied); ``fake [out, in]`` float32: the quantized weight (what Model quality
    scores; ``weight`` itself when ``spec`` is None); ``spec``: its grid or llama.cpp type (``spec.format``), None
    when kept in full precision; ``params``: ``(scale [out, n_groups], zero [out, n_groups])`` of an integer grid
    when the method named it (``GridWeights``), else None; ``imatrix [in]``: llama.cpp's importance (mean x^2 of
    the input that ``weight`` multiplies, so divided by AWQ's folded scales squared) when the rounding used one."""

    name: str
    weight: torch.Tensor
    fake: torch.Tensor
    spec: QuantSpec | None
    params: tuple | None = None
    imatrix: torch.Tensor | None = None  # [in] importance a llama.cpp type's rounding weights by (mean x^2 of the input)


@dataclass
class ExportModel:
    """A whole quantized model in the coordinates a file stores: ``state`` every parameter that is not a quantizable
    linear's weight, after folding (norm weights divided by AWQ's scales, ...), HF names; ``linears`` by module name.
    ``folded``: the names in ``state`` the folding changed. ``notes``: sentences on what was decided (plans)."""

    analysis: Any
    method: str
    spec: QuantSpec | None
    plan: dict | None
    state: dict[str, torch.Tensor]
    linears: dict[str, ExportLinear]
    folded: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def fake_weights(self) -> evaluate.FoldedWeights:
        """``{linear: fake [out, in]}`` with the folded parameters attached (``FoldedWeights.state``), for
        ``evaluate.score_variants``: the model it scores is the one the file holds, in the same coordinates."""
        return evaluate.FoldedWeights({n: li.fake for n, li in self.linears.items()},
                                      {n: self.state[n] for n in self.folded})

    def setting(self, name: str) -> str:
        """``Q4_0``, ``w4g32``, or ``fp`` of one linear."""
        s = self.linears[name].spec
        return "fp" if s is None else (s.format or s.key)


# ------------------------------------------------------------------------------------------------
# llama.cpp types (core.grids.llamacpp, helper A's module; gguf.quants for Q4_0..Q8_0 until it is there)
# ------------------------------------------------------------------------------------------------
def llamacpp():
    """``core.grids.llamacpp`` (tests ask it for the built tools)."""
    return _llamacpp


def known_types() -> tuple[str, ...]:
    return tuple(_llamacpp.TYPES)


def type_spec(type_name: str) -> QuantSpec:
    """The ``QuantSpec`` of llama.cpp type ``type_name`` (``Q4_0``: 4 bits, blocks of 32, no zero point)."""
    t = str(type_name).strip().upper()
    if t not in _llamacpp.TYPES:
        raise ExportError(f"unknown llama.cpp type {type_name!r}; pick from {', '.join(_llamacpp.TYPES)}")
    return QuantSpec.of_type(t)


def quantize_type(w: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None):
    """``w [out, in]`` float32 in llama.cpp type ``type_name``: the bytes ``uint8 [out, bytes per row]``."""
    return _llamacpp.quantize(w.detach().float().cpu().numpy(), type_name,
                              None if imatrix is None else imatrix.float().cpu().numpy())


def dequantize_type(data, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The bytes of :func:`quantize_type` read back as float32 ``[out, in]``."""
    return torch.from_numpy(_llamacpp.dequantize(data, type_name, shape).copy()).float()


def fallback_type(type_name: str, in_features: int) -> str:
    """What llama-quantize writes for a row ``in_features`` wide asked to take ``type_name``."""
    return _llamacpp.fallback(type_name, in_features)


def round_weight(w: torch.Tensor, spec: QuantSpec, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``w [out, in]`` on ``spec``'s grid, dequantized (float32): the one door ``core.grids.quant.fake_quant`` (the
    llama.cpp type llama-quantize writes for the row width, or llm-awq's integer grid)."""
    return fake_quant(w.float(), spec, imatrix)


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
def plan_specs(plan: Mapping, linears: Mapping[str, int], llamacpp_types: bool) -> dict[str, QuantSpec | None]:
    """Each linear's setting from a plan JSON (``layers: {name: {bits, group_size[, type]}}``); ``linears``: name ->
    in_features. ``llamacpp_types``: a linear the plan gives no ``type`` takes the llama.cpp type of its bits
    (``core.studies.plan_export.gguf_type``, the plan's ``llama_quantize_args.txt``); a 16-bit one stays in full
    precision. ExportError (one sentence) on a corrupt plan."""
    from .plan_export import gguf_type

    layers = plan.get("layers") if isinstance(plan, Mapping) else None
    if not isinstance(layers, Mapping) or not layers:
        raise ExportError("the plan has no 'layers' mapping of linear names to settings")
    unknown = sorted(set(layers) - set(linears))
    if unknown:
        raise ExportError(f"the plan names {unknown[0]!r}, which is not a quantizable linear of this model")
    missing = sorted(set(linears) - set(layers))
    if missing:
        raise ExportError(f"the plan gives no setting for {missing[0]!r} (and {len(missing) - 1} more)")
    zp = bool(plan.get("zero_point", True))
    out: dict[str, QuantSpec | None] = {}
    for n, v in layers.items():
        try:
            bits, g = int(v["bits"]), int(v.get("group_size", 0))
            t = v.get("type")
        except (TypeError, KeyError, ValueError):
            raise ExportError(f"the plan's entry for {n!r} is not {{'bits': int, 'group_size': int}}") from None
        if bits == FP16 and not t:
            out[n] = None
            continue
        if t or llamacpp_types:
            out[n] = type_spec(t or gguf_type(bits, int(linears[n]), zp))
            continue
        try:
            spec = QuantSpec(bits, g, zp)
            spec.group(int(linears[n]))
        except ValueError as e:
            raise ExportError(f"the plan's setting for {n!r} is not usable ({e})") from None
        out[n] = spec
    return out


def _common(specs: Mapping[str, QuantSpec | None]) -> QuantSpec:
    counts = Counter(s for s in specs.values() if s is not None)
    if not counts:
        raise ExportError("the plan keeps every linear in full precision: there is nothing to quantize")
    return counts.most_common(1)[0][0]


# ------------------------------------------------------------------------------------------------
# running a method's model half (as run_quality does) and folding its result
# ------------------------------------------------------------------------------------------------
def _context(analysis, lm, data, snap, method: str, spec: QuantSpec,
             specs: Mapping[str, QuantSpec | None] | None = None) -> ModelContext:
    s = analysis.settings
    return ModelContext(analysis, lm, data, snap, ("fp", method), (spec.bits,), spec.group_size, spec.zero_point,
                        int(s.sweep.n_grid), int(s.batch_tokens), evaluate.SEARCH_TOKENS, evaluate.CONST_ALPHA_TOKENS,
                        format=spec.format, specs=specs)


def run_method(analysis, lm, data, snap, method: str, spec: QuantSpec, progress: Progress,
               specs: Mapping[str, QuantSpec | None] | None = None):
    """``METHODS[method]``'s model half at ``spec`` after its shared search, as ``run_quality`` runs it; ``specs``:
    a plan's setting per linear (``ModelContext.specs``)."""
    m = METHODS[method]
    ctx = _context(analysis, lm, data, snap, method, spec, specs)
    if m.shared is not None:
        ctx.memo[m.shared.name] = m.shared.run(ctx, lambda f, msg: progress(0.5 * f, msg))
    return m.model(ctx, spec, m.options(), lambda f, msg: progress(0.5 + 0.5 * f, msg))


def check_foldable(method: str, recipe: Recipe) -> None:
    if recipe.unscale:
        raise ExportError(f"method {method!r} quantizes some linears as Q(W·s)/s, which no file stores where linears "
                          f"share an input (the scale cannot be folded into one preceding operator); export "
                          f"awq-grouped or awq-clip, AWQ's folded forms")


def activation_sq(analysis, name: str) -> torch.Tensor:
    """Mean x^2 per input channel of linear ``name`` over the calibration tokens ``[in]`` (float32): what llama.cpp's
    imatrix holds (``core.model.imatrix.mean_sq``)."""
    from ..model import imatrix

    return torch.from_numpy(imatrix.mean_sq(analysis, name)).float()


def _recipe_linear(analysis, lm, snap, recipe: Recipe, name: str, spec: QuantSpec | None, same_grid: bool,
                   imatrix: bool) -> ExportLinear:
    w0 = original_weight(lm, snap, name)
    pre = recipe.prequant(name, w0)
    weight = awq_search.apply_clip(pre, recipe.clip[name]) if name in recipe.clip else pre
    if spec is None:
        return ExportLinear(name, weight, weight, None)
    imp = None
    if imatrix and spec.format:
        imp = activation_sq(analysis, name)
        if name in recipe.col:  # the folded weight W s multiplies x / s
            imp = imp / recipe.col[name].float().pow(2)
    own = not spec.format and (same_grid or name in recipe.rounded)  # rounded: at the plan's setting (ctx.specs)
    fake = recipe.final(name, w0) if own else round_weight(weight, spec, imp)
    return ExportLinear(name, weight, fake, spec, recipe.grids.get(name) if own else None, imp)


def prepare_export(analysis, *, method: str, spec: QuantSpec | None = None, plan: Mapping | None = None,
                   llamacpp_types: bool = False, imatrix: bool = False,
                   progress: Progress | None = None) -> ExportModel:
    """``method``'s quantized model at ``spec`` (or each linear at its ``plan`` setting), folded for a file
    (module docstring). ``llamacpp_types``: a plan's bits become llama.cpp types (a GGUF export). ``imatrix``: the
    llama.cpp types' rounding is weighted by the analysis' mean x^2 per input channel (llama.cpp's importance
    matrix; divided by AWQ's scales where they are folded into the weight). The analysis' model is bit-identical
    afterwards, also when this raises."""
    report = progress or (lambda f, m: None)
    method = str(method).strip().lower()
    if method not in MODEL_METHODS:
        raise ExportError(f"unknown method {method!r}; pick from {', '.join(MODEL_METHODS)}")
    if spec is None and plan is None:
        raise ExportError("give a grid (bits / group size or a llama.cpp type) or a plan")
    report(0.0, "loading the model")
    lm = analysis.lm
    widths = {li.name: int(li.in_features) for li in lm.linears}
    specs = plan_specs(plan, widths, llamacpp_types or bool(spec and spec.format)) if plan is not None else {n: spec for n in widths}
    if plan is None:
        for n, w in widths.items():
            if spec.format:
                fallback_type(spec.format, w)  # ExportError when a row cannot take the type at all
            else:
                try:
                    spec.group(w)
                except ValueError as e:
                    raise ExportError(f"{n} cannot take {spec.key} ({e})") from None
    main = _common(specs)
    data = evaluate.eval_data(analysis, lm)
    notes: list[str] = []
    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            mixed = specs if plan is not None and len(set(specs.values())) > 1 else None
            built = run_method(analysis, lm, data, snap, method, main, lambda f, m: report(0.05 + 0.8 * f, m), mixed)
            if isinstance(built, Recipe):
                check_foldable(method, built)
                folded = folded_params(lm, built, snap)
                out = {}
                for i, n in enumerate(widths):
                    out[n] = _recipe_linear(analysis, lm, snap, built, n, specs[n], specs[n] == main, imatrix)
                    report(0.85 + 0.15 * (i + 1) / len(widths), f"rounding {n}")
                if mixed is not None and (built.col or built.clip):
                    notes.append(f"{method}'s scales and clip values were searched once at {main.format or main.key} "
                                 f"(the plan's most common setting) and folded; each linear is then rounded at its "
                                 f"own setting")
            else:
                folded = {}
                runs = {main: built}
                params = built.params if isinstance(built, GridWeights) else {}
                one_pass = all(s is None or (n in params and params.spec(n) == s) for n, s in specs.items())
                for s in () if one_pass else {s for s in specs.values() if s is not None and s != main}:
                    runs[s] = run_method(analysis, lm, data, snap, method, s, lambda f, m: report(0.85, m))
                out = {}
                for n in widths:
                    s = specs[n]
                    if s is None:
                        w = original_weight(lm, snap, n)
                        out[n] = ExportLinear(n, w, w, None)
                        continue
                    got = built if one_pass else runs[s]
                    if n not in got:
                        raise ExportError(f"method {method!r} returned no weight for {n}")
                    w = got[n].float().cpu()
                    p = got.params.get(n) if isinstance(got, GridWeights) else None
                    imp = activation_sq(analysis, n) if imatrix and s.format else None
                    fake = round_weight(w, s, imp) if s.format else w
                    out[n] = ExportLinear(n, w, fake, s, None if p is None else (p[0], p[1]), imp)
        finally:
            restore(lm, snap)
    linear_keys = {f"{n}.weight" for n in widths}
    # block parameters are copied (a later variant writes into them in place); the rest (embeddings) only referenced
    state = {k: (v.detach().clone() if k in snap and not isinstance(snap, Snapshot) else v.detach())
             for k, v in stream.state_dict(lm.model, snap).items() if k not in linear_keys}
    state.update(folded)
    report(1.0, "export model ready")
    return ExportModel(analysis, method, spec, dict(plan) if plan is not None else None, state, out, set(folded), notes)


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------
Writer = Callable[[ExportModel, Path, Progress], dict]
FORMATS: dict[str, Writer] = {}
VERIFIERS: dict[str, Writer] = {}


def register_format(name: str, write: Writer, verify: Writer | None = None) -> None:
    """Register a writer: ``write(model, folder, progress) -> summary dict`` writes the files into ``folder`` (an
    empty temporary folder that becomes ``out``). ``verify(model, folder, progress) -> dict``: reads the written files
    back in their own runtime and compares (``export(verify=True)``; called with ``max_tokens`` too, the held-out
    tokens to use, None for all); its dict lands in the summary's ``verify``."""
    FORMATS[str(name)] = write
    if verify is not None:
        VERIFIERS[str(name)] = verify


WRITER_MODULES = {"gguf": "gguf_export", "compressed-tensors": "ct_export"}  # each registers itself on import


def _load_writer(name: str) -> None:
    """Import the module of format ``name`` (writers import this module, so they are loaded lazily)."""
    import importlib

    mod = WRITER_MODULES.get(name)
    if mod is not None and name not in FORMATS:
        importlib.import_module(f"{__package__}.{mod}")


def check_out(out: str | Path) -> Path:
    p = Path(out).expanduser().resolve()
    if p.exists():
        raise ExportError(f"{str(out)!r} already exists; give a new folder (nothing is overwritten)")
    if not p.parent.is_dir():
        raise ExportError(f"the folder {str(p.parent)!r} that should hold the export does not exist")
    return p


def export(analysis, *, format: str, out: str | Path, method: str, spec: QuantSpec | None = None,
           plan: Mapping | None = None, verify: bool = True, imatrix: bool = False, verify_tokens: int | None = None,
           progress: Progress | None = None) -> dict:
    """Write ``method``'s quantized model in ``format`` into the new folder ``out``; returns the writer's summary
    (with ``folder``, ``format``, ``method``, ``seconds``, ``notes``). ``verify``: the format's verifier reads the
    written files back (for GGUF: runs them in llama.cpp); its dict is the summary's ``verify``. ``out`` appears
    only when everything succeeded. ``imatrix``: llama.cpp types weighted by the activations (``prepare_export``);
    ``verify_tokens``: held-out tokens the verifier evaluates (all when None)."""
    import time

    _load_writer(format)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; pick from {', '.join(sorted({*FORMATS, *WRITER_MODULES}))}")
    dest = check_out(out)
    report = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    model = prepare_export(analysis, method=method, spec=spec, plan=plan, llamacpp_types=format == "gguf",
                           imatrix=imatrix, progress=lambda f, m: report(0.6 * f, m))
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        check = VERIFIERS.get(format) if verify else None
        share = 0.4 if check is None else 0.15
        summary = FORMATS[format](model, tmp, lambda f, m: report(0.6 + share * f, m))
        if check is not None:
            summary["verify"] = check(model, tmp, lambda f, m: report(0.75 + 0.25 * f, m), verify_tokens)
        if dest.exists():
            raise ExportError(f"{str(out)!r} appeared while the export was written; nothing was overwritten")
        store.make_ordinary(tmp)  # mkdtemp and safetensors made it private; the export is an ordinary folder
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"folder": str(dest), "format": format, "method": method, **summary,
               "seconds": time.perf_counter() - t0, "notes": model.notes + list(summary.get("notes", []))}
    report(1.0, "done")
    return summary


__all__ = ["ExportLinear", "ExportModel", "ExportError", "prepare_export", "export", "FORMATS", "register_format",
           "VERIFIERS", "activation_sq", "type_spec", "round_weight", "known_types", "plan_specs"]
