"""The quantizable linears of a model: where its transformer blocks are, each linear's family
(q/k/v/o/gate/up/down, mapped from any naming scheme), and reading / writing an ``[out, in]`` weight in the
module's own layout (GPT-2's ``Conv1D`` stores ``[in, out]``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FAMILIES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other")


class ModelLoadError(ValueError):
    """A model source that cannot be opened; the message is one readable sentence."""


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear inside a transformer block.

    ``name`` is its full module path (a stable key everywhere: tables, cache, UI); ``family`` maps the
    architecture's naming onto q/k/v/qkv/o/gate/up/gate_up/down/other.
    """

    name: str
    block: int
    family: str
    in_features: int
    out_features: int
    transposed: bool = False  # GPT-2 Conv1D stores [in, out]


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def is_quantizable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _streamed(m: nn.Module):
    """``(streamer, module name)`` when ``m`` sits in a block of a streamed model (``core.model.stream``)."""
    return m.__dict__.get("_awqx_stream")


def linear_weight(m: nn.Module) -> torch.Tensor:
    """``[out, in]`` view of a Linear's weight, or the transpose of a GPT-2 Conv1D's ``[in, out]``. In a streamed
    model whose block is not in memory, the value read from the checkpoint (through the layers over it)."""
    w = m.weight
    if w.is_meta and _streamed(m) is not None:
        s, name = _streamed(m)
        w = s.value(f"{name}.weight")
    return w.data.T if _is_conv1d(m) else w.data


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write ``w [out, in]`` into the module in its own layout, dtype and device: in place, or, in a streamed
    model whose block is not in memory, as the value its block will be read with (``Streamer.write``)."""
    value = w.T if _is_conv1d(m) else w
    target = m.weight
    if target.is_meta and _streamed(m) is not None:
        s, name = _streamed(m)
        s.write(f"{name}.weight", value.to(dtype=target.dtype))
        return
    with torch.no_grad():  # not through .data: the write must count in the parameter's version
        target.copy_(value.to(dtype=target.dtype, device=target.device))


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into parameter ``name`` of ``model`` (same shape; converted to its dtype and device), in
    place or, in a streamed model whose block is not in memory, as the value its block will be read with."""
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    p = mod._parameters.get(leaf)
    if p is None:
        raise KeyError(f"{name!r} is not a parameter of this model")
    if p.is_meta and _streamed(mod) is not None:
        s, _ = _streamed(mod)
        s.write(name, value.to(dtype=p.dtype))
        return
    with torch.no_grad():
        p.copy_(value.to(dtype=p.dtype, device=p.device))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList whose entries hold quantizable linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if all(any(is_quantizable(s) for s in b.modules()) for b in mod):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise ModelLoadError("this model has no transformer blocks with linear layers to quantize")
    return best


_LEAF = {
    "q": {"q_proj", "query", "q", "wq", "q_lin"},
    "k": {"k_proj", "key", "k", "wk", "k_lin"},
    "v": {"v_proj", "value", "v", "wv", "v_lin"},
    "qkv": {"qkv_proj", "wqkv", "query_key_value", "c_attn", "qkv"},
    "o": {"o_proj", "out_proj", "wo", "out_lin", "attn_out"},
    "gate": {"gate_proj", "w1"},
    "up": {"up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in", "lin1"},
    "gate_up": {"gate_up_proj"},
    "down": {"down_proj", "w2", "fc2", "dense_4h_to_h", "fc_out", "lin2"},
}


def family_of(rel_name: str) -> str:
    """Map a linear's name inside its block onto a module family.

    Handles Llama/Qwen2/Mistral (``q_proj`` ... ``down_proj``), OPT (``out_proj``, ``fc1``, ``fc2``),
    GPT-2 (``c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), BERT (``attention.self.query``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and fused ``qkv_proj`` /
    ``Wqkv`` / ``query_key_value``.
    """
    parts = rel_name.split(".")
    leaf = parts[-1].lower()
    path = rel_name.lower()
    if leaf == "c_proj":
        return "o" if "attn" in path else "down"
    if leaf == "dense":
        if "attention" in path or "attn" in path:
            return "o"
        if "intermediate" in path:
            return "up"
        if "output" in path or "mlp" in path:
            return "down"
        return "other"
    for fam, names in _LEAF.items():
        if leaf in names:
            return fam
    return "other"


def enumerate_linears(model: nn.Module) -> list[LinearInfo]:
    prefix, blocks = find_blocks(model)
    out: list[LinearInfo] = []
    for i, block in enumerate(blocks):
        for rel, m in block.named_modules():
            if not rel or not is_quantizable(m):
                continue
            shape = m.weight.shape[::-1] if _is_conv1d(m) else m.weight.shape  # [out, in]; no read when streamed
            name = f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}"
            out.append(LinearInfo(name, i, family_of(rel), int(shape[1]), int(shape[0]), _is_conv1d(m)))
    if not out:
        raise ModelLoadError("this model has no linear layers inside its transformer blocks")
    return out
