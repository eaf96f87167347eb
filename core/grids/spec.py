"""The settings objects: one frozen ``QuantSpec`` for the grid a weight is put on, and the base of every method's
own options (``AWQOptions``, ``GPTQOptions``, ... in ``core.methods``).

Keys (cache entries, table rows, memo keys) come from these objects (``QuantSpec.key``, ``Options.key``), never
from strings built by hand at the call site.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from . import llamacpp, metrics
from .quant import check_bits, effective_group_size


@dataclass(frozen=True)
class QuantSpec:
    """How the weights of one linear are put on a grid.

    ``bits``: 2..8. ``group_size``: weights per group along ``in``; ``<= 0`` is one group per output row.
    ``zero_point``: llm-awq's asymmetric grid with an integer zero (True) or the symmetric grid (False).
    ``format``: a llama.cpp type (``core.grids.llamacpp.TYPES``: ``"Q4_0"`` ... ``"Q6_K"``) whose block layout
    fixes the grid: ``bits`` must be its level bits, ``group_size`` its block (32 or 256) and ``zero_point``
    whether its blocks store a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K); ``QuantSpec.of_type("Q4_K")`` fills them
    in. ``None`` is the explorer's own integer grid described by the other three fields.
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
        if self.format is not None:
            t = llamacpp.check_type(self.format)
            object.__setattr__(self, "format", t)
            want = (llamacpp.nominal_bits(t), llamacpp.block_size(t), llamacpp.has_min(t))
            if (self.bits, self.group_size, self.zero_point) != want:
                raise ValueError(f"llama.cpp type {t} is {want[0]}-bit levels in blocks of {want[1]} "
                                 f"{'with' if want[2] else 'without'} a minimum; got bits={self.bits}, "
                                 f"group_size={self.group_size}, zero_point={self.zero_point} "
                                 f"(QuantSpec.of_type({t!r}) fills them in)")

    @classmethod
    def of_type(cls, type: str) -> "QuantSpec":
        """The spec of llama.cpp type ``type`` (``Q4_0``: 4 bits, blocks of 32, no minimum)."""
        t = llamacpp.check_type(type)
        return cls(llamacpp.nominal_bits(t), llamacpp.block_size(t), llamacpp.has_min(t), t)

    @classmethod
    def grid(cls, bits: int, group_size: int, zero_point: bool = True, format: str | None = None) -> "QuantSpec":
        """The spec at ``bits`` of a run's grid: the integer grid ``(group_size, zero_point)``, or with a llama.cpp
        ``format`` the type of its family at ``bits`` (``format="Q4_K"``, 6 -> Q6_K; ``group_size`` and
        ``zero_point`` are then the type's own)."""
        if format:
            return cls.of_type(format).with_bits(bits)
        return cls(bits, group_size, zero_point)

    def stored_type(self, in_features: int) -> str | None:
        """The llama.cpp type a layer ``in_features`` wide is written in (``llamacpp.fallback``: Q4_K on a
        576-wide row is Q5_0; ``"F16"`` when no block fits); ``None`` for the integer grid."""
        return llamacpp.fallback(self.format, in_features) if self.format else None

    @property
    def per_row(self) -> bool:
        return self.group_size <= 0

    def group(self, in_features: int) -> int:
        """The group length used on a layer ``in_features`` wide (``in_features`` when per row); ValueError if
        ``group_size`` does not divide it. A llama.cpp type: the block of the type the layer is stored in (its
        ``stored_type``; the whole row for ``F16``)."""
        if self.format:
            t = self.stored_type(in_features)
            return int(in_features) if t == llamacpp.F16 else llamacpp.block_size(t)
        return effective_group_size(int(in_features), self.group_size)

    def cost(self, in_features: int) -> float:
        """Storage bits per weight on a layer ``in_features`` wide (``core.grids.metrics.bit_cost``; a llama.cpp
        type: ``llamacpp.bits_per_weight`` of its ``stored_type``, 16 for ``F16``)."""
        if self.format:
            t = self.stored_type(in_features)
            return 16.0 if t == llamacpp.F16 else llamacpp.bits_per_weight(t)
        return metrics.bit_cost(self.bits, self.group(in_features), self.zero_point)

    def with_bits(self, bits: int) -> "QuantSpec":
        """The same grid at ``bits``; a llama.cpp type: the type of the same family at ``bits`` (Q4_K -> Q5_K,
        Q4_0 -> Q5_0), ValueError when llama.cpp has none."""
        if self.format:
            return QuantSpec.of_type(llamacpp.with_bits(self.format, bits))
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
