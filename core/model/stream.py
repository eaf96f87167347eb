"""A model whose decoder blocks live in their checkpoint until they run (issue 23, first layer of the streamed engine).

``streamed(folder)`` builds the model's skeleton with its parameters on ``meta`` (no memory) and reads each block's
tensors from the safetensors files (``safe_open(...).get_tensor``: memory-mapped) just before the block runs, then
puts them back on ``meta`` when it returns: a forward pass holds one block's weights at a time, plus the parameters
outside the blocks (embeddings, final norm, head), which stay resident. Every whole-model pass of the engine runs a
model through its blocks in order (``core.model.blocks``), so the same hooks serve them all.

``Streamer.overrides``: parameter name -> tensor used instead of the checkpoint's when its block is materialised
(what ``apply_variant`` writes in place today).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..grids import alloc
from .linears import find_blocks


class StreamError(RuntimeError):
    """A checkpoint the streamed engine cannot read (one sentence)."""


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class WeightStore:
    """The tensors of a safetensors checkpoint folder, read by name on demand.

    Read with plain file reads into a fresh tensor, not through a memory map: the pages of a mapped file count in
    the process's resident memory while mapped (a 0.5 GB embedding read through a map peaks at twice its size)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise StreamError(f"{str(self.folder)!r} holds no .safetensors file to stream from")
        self._where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            size = f.stat().st_size
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if not 0 < n <= size - 8:
                        raise ValueError("the header length is past the end of the file")
                    header = json.loads(fh.read(n))
                for k, v in header.items():
                    if k == "__metadata__":
                        continue
                    a, b = (int(x) for x in v["data_offsets"])
                    if v["dtype"] not in _DTYPES:
                        raise ValueError(f"tensor {k} has dtype {v['dtype']}, which the engine does not read")
                    if not 0 <= a <= b or 8 + n + b > size:
                        raise ValueError(f"tensor {k} lies past the end of the file (cut short?)")
                    self._where[k] = (f, _DTYPES[v["dtype"]], tuple(int(d) for d in v["shape"]), 8 + n + a, b - a)
            except (ValueError, KeyError, TypeError) as e:
                raise StreamError(f"{f.name} is not a readable safetensors file ({e})") from e

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (a fresh tensor; StreamError when the file cannot be read there)."""
        f, dtype, shape, offset, nbytes = self._where[name]
        out = torch.empty(shape, dtype=dtype)
        view = out.view(-1).view(torch.uint8).numpy() if nbytes else None
        try:
            with open(f, "rb") as fh:
                fh.seek(offset)
                if view is not None and fh.readinto(view) != nbytes:
                    raise OSError("the file ends early")
        except OSError as e:
            raise StreamError(f"tensor {name!r} of {f.name} cannot be read ({e}); the checkpoint is damaged") from e
        return out


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)


@dataclass
class Streamer:
    """Materialise / release hooks on every block of ``model`` (its parameters on ``meta`` between calls).

    ``aliases``: parameter name -> the checkpoint name it is stored under (tied embeddings); ``resident_blocks``:
    how many blocks hold real weights right now (at most 1 during a forward pass; the tests check it)."""

    model: nn.Module
    store: WeightStore
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    resident_blocks: int = 0
    peak_resident_blocks: int = 0

    def __post_init__(self) -> None:
        self.prefix, self.blocks = find_blocks(self.model)
        self._handles = []
        for i, b in enumerate(self.blocks):
            name = f"{self.prefix}.{i}" if self.prefix else str(i)
            self._handles.append(b.register_forward_pre_hook(self._loader(name)))
            self._handles.append(b.register_forward_hook(self._releaser()))

    def tensor(self, name: str) -> torch.Tensor:
        """Parameter ``name``'s value: the override, else the checkpoint's (in the engine's dtype, on its device)."""
        if name in self.overrides:
            return self.overrides[name].to(self.device)
        key = self.aliases.get(name, name)
        if key not in self.store:
            raise StreamError(f"the checkpoint has no tensor {key!r} that the model needs")
        return self.store.get(key).to(device=self.device, dtype=self.dtype)

    def materialise(self, module: nn.Module, prefix: str) -> None:
        for n, _ in list(module.named_parameters()):
            _set_param(module, n, self.tensor(f"{prefix}.{n}" if prefix else n))

    @staticmethod
    def release(module: nn.Module) -> None:
        for n, p in list(module.named_parameters()):
            _set_param(module, n, torch.empty_like(p, device="meta"))

    def _loader(self, prefix: str):
        def hook(module: nn.Module, args) -> None:
            self.materialise(module, prefix)
            self.resident_blocks += 1
            self.peak_resident_blocks = max(self.peak_resident_blocks, self.resident_blocks)
        return hook

    def _releaser(self):
        def hook(module: nn.Module, args, out) -> None:
            self.release(module)
            self.resident_blocks -= 1
            alloc.give_back()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` with real weights for the duration of the ``with`` (for code that reads its linears)."""
        name = f"{self.prefix}.{i}" if self.prefix else str(i)
        self.materialise(self.blocks[i], name)
        try:
            yield self.blocks[i]
        finally:
            self.release(self.blocks[i])


def _tied_aliases(model: nn.Module, store: WeightStore) -> dict[str, str]:
    """Parameter names missing from the checkpoint that are tied to one it has (``lm_head.weight`` ->
    ``model.embed_tokens.weight`` when the config ties the embeddings), or saved without the base model's prefix."""
    try:
        tied = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    except Exception:  # noqa: BLE001 - a model without tied weights
        tied = {}
    base = getattr(model, "base_model_prefix", "")
    out = {}
    for n, _ in model.named_parameters(remove_duplicate=False):
        if n in store:
            continue
        if n in tied and tied[n] in store:
            out[n] = tied[n]
        elif base and n.startswith(base + ".") and n[len(base) + 1:] in store:
            out[n] = n[len(base) + 1:]
    return out


def streamed(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             trust_remote_code: bool = False) -> tuple[nn.Module, Streamer]:
    """``(model, streamer)``: ``folder``'s model with its blocks streamed from the checkpoint and everything outside
    them resident. StreamError (one sentence) when the folder cannot be streamed."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = Path(folder)
    store = WeightStore(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=bool(trust_remote_code))
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = cls.from_config(config, dtype=dtype, trust_remote_code=bool(trust_remote_code))
    model.eval()
    aliases = _tied_aliases(model, store)
    s = Streamer(model, store, dtype=dtype, device=torch.device(device), aliases=aliases)
    block_params = {id(p) for p in s.blocks.parameters()}
    groups: dict[str, list[str]] = {}  # by the checkpoint tensor they are read from
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in block_params:
            groups.setdefault(aliases.get(n, n), []).append(n)
    for names in groups.values():  # tied parameters stay one tensor
        value = nn.Parameter(s.tensor(names[0]), requires_grad=False)
        for n in names:
            owner, _, leaf = n.rpartition(".")
            (model.get_submodule(owner) if owner else model)._parameters[leaf] = value
    return model, s
