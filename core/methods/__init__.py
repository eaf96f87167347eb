"""The one list of quantization methods. Each method is one module with both halves (``core.methods.base``):
quantize one layer from its statistics / Hessian / sample, and apply itself to a whole model. A name means one
method at both scopes.

Adding a method is one new module (its options, its halves, ``register(Method(...))``) plus one line below. The
order of the lines is the order the UI lists them in.
"""
from __future__ import annotations

import torch

from ..grids.spec import Options, QuantSpec
from .base import REGISTRY, LayerInputs, Method, ModelContext, RunShape, SharedSearch, get, register

# the registry: one line per method
from . import rtn  # noqa: E402,F401
from . import rtn_mse  # noqa: E402,F401
from . import awq  # noqa: E402,F401
from . import awq_grouped  # noqa: E402,F401
from . import awq_clip  # noqa: E402,F401
from . import const_alpha  # noqa: E402,F401
from . import gptq  # noqa: E402,F401
from . import gptq_act  # noqa: E402,F401
from . import hqq  # noqa: E402,F401
from . import awq_gptq  # noqa: E402,F401
from . import rotated_rtn  # noqa: E402,F401

METHODS: dict[str, Method] = REGISTRY
LAYER_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.layer is not None)
MODEL_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.model is not None)


def quantize_layer(method: str, w: torch.Tensor, inputs: LayerInputs | None, spec: QuantSpec,
                   options: Options | None = None) -> torch.Tensor:
    """Quantize ``w [out, in]`` with ``method`` on ``spec``'s grid -> dequantized ``[out, in]`` float32 (``w`` not
    modified). ``options``: the method's own options object (its defaults when None). An unknown method, a method
    without a layer half, options of another method, or a group size that does not divide ``in`` is a
    ``ValueError``."""
    m = get(method)
    if m.layer is None:
        raise ValueError(f"method {method!r} has no one-layer form ({m.description}); "
                         f"pick from {', '.join(LAYER_METHODS)}")
    options = m.check_options(options)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError("quantize_layer needs a non-empty 2-D weight [out, in]")
    spec.group(w.shape[1])  # ValueError if it does not divide
    return m.layer(w.detach().float(), inputs or LayerInputs(), spec, options)


__all__ = ["METHODS", "LAYER_METHODS", "MODEL_METHODS", "Method", "LayerInputs", "ModelContext", "RunShape",
           "SharedSearch", "Options", "QuantSpec", "quantize_layer", "get", "register"]
