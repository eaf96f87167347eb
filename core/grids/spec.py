"""The settings objects: one frozen ``QuantSpec`` for the grid a weight is put on, and the base of every method's
own options (``AWQOptions``, ``GPTQOptions``, ... in ``core.methods``).

Keys (cache entries, table rows, memo keys) come from these objects (``QuantSpec.key``, ``Options.key``), never
from strings built by hand at the call site.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from . import metrics
from .quant import check_bits, effective_group_size


@dataclass(frozen=True)
class QuantSpec:
    """How the weights of one linear are put on a grid.

    ``bits``: 2..8. ``group_size``: weights per group along ``in``; ``<= 0`` is one group per output row.
    ``zero_point``: llm-awq's asymmetric grid with an integer zero (True) or the symmetric grid (False).
    ``format``: a named storage format whose block layout fixes the grid (room for a llama.cpp type such as
    ``"Q4_0"``); ``None`` is the explorer's own integer grid described by the other three fields.
    """

    bits: int
    group_size: int = 128
    zero_point: bool = True
    format: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        g = self.group_size
        if g is None:
            g = 0
        if isinstance(g, bool) or int(g) != g:
            raise ValueError(f"group size must be an integer, got {self.group_size!r}")
        object.__setattr__(self, "group_size", int(g) if int(g) > 0 else 0)
        object.__setattr__(self, "zero_point", bool(self.zero_point))

    @property
    def per_row(self) -> bool:
        return self.group_size <= 0

    def group(self, in_features: int) -> int:
        """The group length used on a layer ``in_features`` wide (``in_features`` when per row); ValueError if
        ``group_size`` does not divide it."""
        return effective_group_size(int(in_features), self.group_size)

    def cost(self, in_features: int) -> float:
        """Storage bits per weight on a layer ``in_features`` wide (``core.grids.metrics.bit_cost``)."""
        return metrics.bit_cost(self.bits, self.group(in_features), self.zero_point)

    def with_bits(self, bits: int) -> "QuantSpec":
        return dataclasses.replace(self, bits=bits)

    @property
    def key(self) -> str:
        """``w3g64`` (``g0``: per row; a trailing ``s``: symmetric; ``:<format>`` for a named format)."""
        k = f"w{self.bits}g{self.group_size}{'' if self.zero_point else 's'}"
        return f"{k}:{self.format}" if self.format else k


@dataclass(frozen=True)
class Options:
    """Base of a method's own options (the settings apart from the grid). Subclasses are frozen dataclasses with a
    docstring per field group; ``Options.of(cls, mapping)`` builds one from loose values with a clear error."""

    def key(self) -> str:
        """The fields that differ from their defaults, ``name=value`` joined by ``,`` (``""`` at the defaults)."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            parts.append(f"{f.name}={v:g}" if isinstance(v, float) else f"{f.name}={v}")
        return ",".join(parts)

    def replace(self, **changes: Any) -> "Options":
        return type(self).build(self, **changes)

    @classmethod
    def build(cls, base: "Options | None" = None, **values: Any) -> "Options":
        """``cls`` with ``values`` (over ``base``'s, if given); an unknown field is a ``ValueError`` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no option(s) {unknown} (it takes {sorted(names) or 'none'})")
        return dataclasses.replace(base, **values) if base is not None else cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose(values: str | Iterable[str], known: Sequence[str], what: str,
           error: type[Exception] = ValueError) -> list[str]:
    """Names from ``values`` (a comma-separated string or a list), lower-cased, without repeats, in the order given;
    an unknown name is ``error("unknown <what> 'x'; pick from ...")``."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out: list[str] = []
    for v in items:
        v = str(v).strip().lower()
        if v and v not in known:
            raise error(f"unknown {what} {v!r}; pick from {', '.join(known)}")
        if v and v not in out:
            out.append(v)
    return out


__all__ = ["QuantSpec", "Options", "choose"]
