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


def linear_weight(m: nn.Module) -> torch.Tensor:
    """``[out, in]`` view of a Linear's weight, or the transpose of a GPT-2 Conv1D's ``[in, out]``."""
    return m.weight.data.T if _is_conv1d(m) else m.weight.data


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write ``w [out, in]`` into the module in place, in its own layout, dtype and device."""
    target = m.weight.data
    target.copy_((w.T if _is_conv1d(m) else w).to(dtype=target.dtype, device=target.device))


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
            w = linear_weight(m)
            name = f"{prefix}.{i}.{rel}" if prefix else f"{i}.{rel}"
            out.append(LinearInfo(name, i, family_of(rel), int(w.shape[1]), int(w.shape[0]), _is_conv1d(m)))
    if not out:
        raise ModelLoadError("this model has no linear layers inside its transformer blocks")
    return out
