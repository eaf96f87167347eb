"""What a quantization method is: one registry entry with two halves.

* the **layer half** quantizes one linear ``w [out, in]`` from what the analysis kept of its input
  (``LayerInputs``: mean |x|, the calibration sample, ``X^T X``) and returns the dequantized weights ``[out, in]``
  (float32), meant for the unrotated input: ``y_hat = X @ W_hat.T``;
* the **model half** quantizes every block linear of a model (``ModelContext``: the model with its fp
  snapshot, the calibration blocks, the token budgets) and returns a ``Variant``: a ``Recipe`` (scales, folds,
  clips on one grid) or ``{linear name: weight [out, in]}``.

The Layer Lab, the Methods page, the sweep and the planner call the layer half through
``core.methods.quantize_layer``; Model quality and the planner's verification call the model half through
``core.studies.evaluate``. A method registers itself with :func:`register` (its module is one line of the
registry in ``core/methods/__init__.py``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable, Mapping

import torch

from ..grids.spec import Options, QuantSpec
from ..model.blocks import original_weight
from ..model.calibration import CalibrationData, first_blocks
from ..model.models import LoadedModel
from ..model.stream import Spill
from .awq_search import ClipSearch
from .recipe import Recipe

Progress = Callable[[float, str], None]
Weights = Mapping[str, torch.Tensor]


class GridParams(MutableMapping):
    """``{linear name: (scale [out, n_groups], zero [out, n_groups], spec)}`` with the tensors in a :class:`Spill`:
    beyond its budget they wait in the scratch file with the weights. At group size 128 they are 1/64 of the float32
    weights (a 70B model's: over 4 GB), so kept in memory they would grow with every block quantized."""

    def __init__(self, items: Mapping[str, tuple] | None = None):
        self._tensors = Spill()
        self._spec: dict[str, QuantSpec] = {}
        for k, v in (items or {}).items():
            self[k] = v

    def __setitem__(self, name: str, value: tuple) -> None:
        scale, zero, spec = value
        self._tensors[name + "/scale"], self._tensors[name + "/zero"] = scale, zero
        self._spec[name] = spec

    def __getitem__(self, name: str) -> tuple:
        spec = self._spec[name]
        return self._tensors[name + "/scale"], self._tensors[name + "/zero"], spec

    def spec(self, name: str) -> QuantSpec:
        """``name``'s spec alone (its tensors are not read back)."""
        return self._spec[name]

    def __delitem__(self, name: str) -> None:
        del self._spec[name], self._tensors[name + "/scale"], self._tensors[name + "/zero"]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._spec))

    def __len__(self) -> int:
        return len(self._spec)


class GridWeights(Spill):
    """A model half's ``{linear name: weight [out, in]}`` that also names the integer grid each weight lies on, so an
    exporter writes the method's own integer codes instead of re-deriving them: ``params[name] = (scale [out,
    n_groups], zero [out, n_groups], spec)`` such that ``weight == (clamp(round(w / scale) + zero, min, max) - zero)
    * scale`` per group (``core.grids.quant.QParams``' convention). A linear missing from ``params`` has no integer
    grid to name (an exporter refuses it with a sentence)."""

    def __init__(self, weights: Mapping[str, torch.Tensor] | None = None, params: Mapping[str, tuple] | None = None):
        super().__init__(weights)  # a Spill: beyond its budget the weights wait in a scratch file, not in memory
        self.params = GridParams(params)

Variant = Recipe | Weights  # what a model half builds
CLIP_TOKENS = ClipSearch().n_sample_token  # official auto_clip_layer's token sample
SEARCH_COLUMNS = ["mode", "bits", "group_size", "zero_point", "block", "target", "alpha", "loss", "chosen"]


@dataclass(frozen=True)
class LayerInputs:
    """What a layer half may use besides the weights. Shapes: ``x_mean [in]`` (mean |x| over all calibration
    tokens), ``x [rows, in]`` (the kept calibration sample), ``hessian [in, in]`` (``X^T X`` over all calibration
    tokens, any positive multiple works), ``w_shared [sum out, in]`` (all linears reading the same input, for
    AWQ's duo scaling); ``name``: the linear's module path (decides the Q/K clip skip)."""

    x_mean: torch.Tensor | None = None
    x: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    w_shared: torch.Tensor | None = None
    name: str = ""

    def sample(self, method: str) -> torch.Tensor:
        """The calibration sample ``[rows, in]`` (float32); ValueError when there is none."""
        if self.x is None or self.x.numel() == 0:
            raise ValueError(f"method {method!r} needs the layer's calibration input sample")
        return self.x.float()

    def gram(self, method: str) -> torch.Tensor:
        """``X^T X [in, in]``: the stored one, else the sample's (when the entry kept no Hessians)."""
        if self.hessian is not None:
            return self.hessian
        x = self.sample(method)
        return (x.double().T @ x.double()).float()


@dataclass
class ModelContext:
    """What a model half may use: the analysis (its tables and kept samples), its model with the fp snapshot
    ``snap`` (the model itself is unmodified while model halves run), the run's settings, and ``memo`` for the
    results of shared searches (``memo[search.name]``). Model halves append search curves to ``search_rows``
    (``SEARCH_COLUMNS``) and may add the time of shared work to ``seconds[(method, bits)]``.

    ``bits``: every bit-width of the run (a shared search runs once for all of them); ``group_size`` and
    ``zero_point``: the run's grid (each call gets its own ``QuantSpec`` too, ``spec(bits)``); ``format``: a
    llama.cpp type whose family gives the grid instead (``QuantSpec.grid``). ``specs``: a plan's setting per linear
    (None: kept in full precision; ``core.studies.export``): a model half that rounds linear by linear in one pass
    (sequential GPTQ) takes each linear's setting from here instead of its call's ``spec``, and names it in its
    result's grid (``GridWeights.params``)."""

    analysis: Any
    lm: LoadedModel
    data: CalibrationData
    snap: dict[str, torch.Tensor]
    methods: tuple[str, ...]
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
    format: str | None = None
    specs: Mapping[str, QuantSpec | None] | None = None

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

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec.grid(bits, self.group_size, self.zero_point, self.format)

    def shape(self) -> RunShape:
        blocks = self.search_blocks()
        return RunShape(self.units(blocks), self.units(first_blocks(blocks, CLIP_TOKENS)),
                        self.units(self.const_alpha_blocks()), len(self.bits), self.n_grid, self.methods,
                        self.lm.is_causal)


@dataclass(frozen=True)
class RunShape:
    """The size of a whole-model run, in forward passes over the held-out blocks (one unit): the calibration
    blocks of the search token budget (``search``), of the clip search's sample (``clip``) and of the const-alpha
    budget (``const_alpha``); the run's bit-widths, alpha grid, methods, and whether the model is causal. Known
    before any model is loaded (time estimates) and during the run (progress)."""

    search: float
    clip: float
    const_alpha: float
    n_bits: int
    n_grid: int
    methods: tuple[str, ...]
    causal: bool = True


@dataclass(frozen=True)
class SharedSearch:
    """A search several model halves share, run once per run for every bit-width: ``run(ctx, progress)`` (its
    result lands in ``ctx.memo[name]``), ``cost(shape)`` in forward passes over the held-out blocks."""

    name: str
    run: Callable[[ModelContext, Progress], Any]
    cost: Callable[[RunShape], float]


LayerHalf = Callable[[torch.Tensor, LayerInputs, QuantSpec, Options], torch.Tensor]
ModelHalf = Callable[[ModelContext, QuantSpec, Options, Progress], Variant]


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``options``: its options class (a frozen ``Options`` dataclass; ``options()`` are the defaults).
    ``layer`` / ``model``: the two halves; ``None`` where a half has no meaning (awq-grouped's and const-alpha's
    scale is chosen by a block's or the model's loss, which one linear does not have; ``definition`` says so).
    ``needs_data``: False for the data-free methods (their layer half ignores ``LayerInputs``).
    ``cost(shape)``: the model half's work per bit-width in forward passes over the held-out blocks.
    ``shared``: a search the model half needs (run once for every bit-width). ``budget``: the calibration token
    budget its searches use, ``"search"`` or ``"const-alpha"``; ``None`` when it uses neither. ``formats``: whether
    it runs on llama.cpp types (``QuantSpec.format``); ``register`` makes both halves of a method without it
    refuse such a spec with one sentence."""

    name: str
    label: str
    description: str  # the layer half, one sentence
    definition: str  # the model half, one sentence (Model quality, CLI)
    options: type[Options]
    layer: LayerHalf | None = None
    model: ModelHalf | None = None
    needs_data: bool = True
    cost: Callable[[RunShape], float] = lambda shape: 0.02
    shared: SharedSearch | None = None
    budget: str | None = None
    formats: bool = False

    def check_spec(self, spec: QuantSpec) -> QuantSpec:
        """``spec``, or ValueError when it is a llama.cpp type and this method does not run on those."""
        if spec.format and not self.formats:
            takes = ", ".join(n for n, m in REGISTRY.items() if m.formats)
            raise ValueError(f"method {self.name!r} does not run on llama.cpp types such as {spec.format} "
                             f"(methods that do: {takes})")
        return spec

    def check_options(self, options: Options | None) -> Options:
        if options is None:
            return self.options()
        if type(options) is not self.options:
            raise ValueError(f"method {self.name!r} does not take {type(options).__name__} (its options are "
                             f"{self.options.__name__})")
        return options

    def variant_key(self, options: Options | None = None) -> str:
        """The row key of this method at ``options``: its name at the defaults, else ``name@<changed values>``
        (``awq@0.5`` for AWQ at alpha 0.5)."""
        opts = self.check_options(options)
        changed = [v for v in (f.split("=", 1)[1] for f in opts.key().split(",") if f)]
        return self.name if not changed else f"{self.name}@{','.join(changed)}"


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    if not method.formats:  # every caller of either half gets the one-sentence refusal of a llama.cpp type
        method = dataclasses.replace(method, layer=_checked_layer(method), model=_checked_model(method))
    REGISTRY[method.name] = method
    return method


def _checked_layer(method: Method) -> LayerHalf | None:
    half = method.layer
    if half is None:
        return None

    def layer(w: torch.Tensor, inputs: LayerInputs, spec: QuantSpec, options: Options) -> torch.Tensor:
        return half(w, inputs, method.check_spec(spec), options)
    return layer


def _checked_model(method: Method) -> ModelHalf | None:
    half = method.model
    if half is None:
        return None

    def model(ctx: ModelContext, spec: QuantSpec, options: Options, progress: Progress) -> Variant:
        return half(ctx, method.check_spec(spec), options, progress)
    return model


def get(name: str) -> Method:
    m = REGISTRY.get(name)
    if m is None:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(REGISTRY)})")
    return m


def search_rows(method: str, spec: QuantSpec, block: int, target: str, alphas: torch.Tensor, losses: torch.Tensor,
                best: int) -> list[dict]:
    """One ``SEARCH_COLUMNS`` row per alpha of one search curve."""
    return [{"mode": method, "bits": spec.bits, "group_size": spec.group_size, "zero_point": spec.zero_point,
             "block": block, "target": target, "alpha": float(a), "loss": float(v), "chosen": i == best}
            for i, (a, v) in enumerate(zip(alphas.tolist(), losses.tolist()))]


def data_free(name: str, label: str, options: type[Options], layer: LayerHalf, description: str,
              definition: str) -> Method:
    """Register a data-free method: its model half is its layer half on every linear (``per_linear``)."""
    return register(Method(name, label, description, definition, options, layer, per_linear(layer), needs_data=False,
                           cost=lambda shape: 0.2))


def per_linear_weights(lm: LoadedModel, snap: dict[str, torch.Tensor], spec: QuantSpec, layer: LayerHalf,
                       options: Options, progress: Progress | None = None,
                       inputs_of: Callable[[str], LayerInputs] | None = None) -> Weights:
    """``layer`` applied to every block linear of ``lm`` on its snapshot (fp) weight; the model is not touched.
    ``inputs_of(name)``: the linear's ``LayerInputs`` (only its name when None)."""
    progress = progress or (lambda f, m: None)
    out = Spill()  # a whole model's quantized weights: in memory up to a budget, in a scratch file beyond
    for i, li in enumerate(lm.linears):
        inputs = inputs_of(li.name) if inputs_of is not None else LayerInputs(name=li.name)
        out[li.name] = layer(original_weight(lm, snap, li.name), inputs, spec, options).cpu()
        progress((i + 1) / len(lm.linears), f"{li.name} w{spec.bits}")
    return out


def per_linear(layer: LayerHalf, needs_data: bool = False) -> ModelHalf:
    """The model half that applies ``layer`` to every block linear on its fp weights (with the analysis' kept inputs
    when ``needs_data``): the whole-model meaning of a method whose layer half needs nothing the model run adds."""
    def model(ctx: ModelContext, spec: QuantSpec, options: Options, progress: Progress) -> dict[str, torch.Tensor]:
        return per_linear_weights(ctx.lm, ctx.snap, spec, layer, options, progress,
                                  ctx.analysis.layer_inputs if needs_data else None)
    return model


__all__ = ["LayerInputs", "ModelContext", "SharedSearch", "Method", "REGISTRY", "register", "get", "search_rows",
           "data_free", "per_linear", "per_linear_weights", "RunShape", "Variant", "Weights", "Progress", "SEARCH_COLUMNS"]
