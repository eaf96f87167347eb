"""The block-streamed engine: a model whose decoder blocks live in their checkpoint until they run.

:func:`streamed` builds the model's skeleton with its parameters on ``meta`` (no memory). Each decoder block's
``forward`` is wrapped so that its tensors are read from the safetensors files just before it runs and put back on
``meta`` when it returns: a pass over the model holds one block's weights at a time. The same wrapper sits on every
module inside a block that owns parameters (so code that calls a block's ``self_attn`` or ``mlp`` directly works),
and on the input embedding and the head: a large embedding reads only the rows of the tokens it is given, a large
head computes the logits in vocabulary chunks, each chunk's rows read from the file.

Nothing writes into the checkpoint. What the in-memory engine wrote into the parameters (a quantized variant, AWQ's
scales folded into the norms, GPTQ's weights) is a stack of *layers* on top of it (:class:`Streamer`), applied when
a block is materialised: a mapping of replacement tensors (kept in memory up to a budget and spilled to a scratch
file beyond it: :class:`Spill`), or a function of the checkpoint's tensor (a ``Recipe``: its scales, clips and grid,
so a quantized whole model never exists in memory). ``core.model.blocks.snapshot`` / ``restore`` save and put back
the stack; ``core.model.linears.set_linear_weight`` on a block that is not materialised writes to the top layer; a
write into a materialised block (held open with :meth:`Streamer.hold`) is kept when the block is released.

With gradients enabled (the planner's Fisher pass) each block runs under ``torch.utils.checkpoint``: its weights
are read again for the backward pass instead of being kept by autograd.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..grids import alloc
from .linears import find_blocks


class StreamError(RuntimeError):
    """A checkpoint the streamed engine cannot read (one sentence)."""


MISSING_TENSOR = "the checkpoint has no tensor"


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# an embedding / head larger than this is read in rows / vocabulary chunks instead of whole
CHUNKED_BYTES = int(os.environ.get("AWQ_EXPLORER_CHUNKED_MB", "256")) * 2**20
HEAD_CHUNK_ROWS = 16384  # vocabulary rows of the head read and multiplied at once
# replacement tensors kept in memory per mapping; beyond, they go to a scratch file (the page cache holds it: reading
# it back costs little, and 128 MiB per mapping kept GPTQ on the 1.5B shape from fitting in 40% of its size)
SPILL_BYTES = int(os.environ.get("AWQ_EXPLORER_SPILL_MB", "16")) * 2**20


# ------------------------------------------------------------------------------------------------
# reading a checkpoint by name
# ------------------------------------------------------------------------------------------------
def _pread_exact(fd: int, out: torch.Tensor, offset: int) -> torch.Tensor:
    """Fill ``out``'s bytes from ``fd`` at ``offset``; OSError if the file ends first."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError("the file ends early")
        view, offset = view[n:], offset + n
    return out


def _read_into(path: Path, offset: int, out: torch.Tensor, what: str) -> torch.Tensor:
    try:
        with open(path, "rb", buffering=0) as fh:
            return _pread_exact(fh.fileno(), out, offset)
    except OSError as e:
        raise StreamError(f"{what} cannot be read from {path.name} ({e}); the file is damaged") from e


class WeightStore:
    """The tensors of a safetensors checkpoint folder, read by name on demand.

    Every file's header is checked against the file's size when the store is opened, so a checkpoint cut short is
    refused in one sentence before anything runs. Tensors are read with plain file reads into fresh tensors, not
    through a memory map: the pages of a mapped file count in the process's resident memory while mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: only the shards its index names (repos may hold other copies)
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError) as e:
                raise StreamError(f"{index.name} is not a readable safetensors index ({e})") from e
            files = [f for f in files if f.name in names]
        if not files:
            raise StreamError(f"{str(self.folder)!r} holds no .safetensors file to stream from")
        self._where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
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
                    shape = tuple(int(d) for d in v["shape"])
                    numel = 1
                    for d in shape:
                        numel *= d
                    if not 0 <= a <= b or 8 + n + b > size:
                        raise ValueError(f"tensor {k} lies past the end of the file (cut short?)")
                    if b - a != numel * torch.empty((), dtype=_DTYPES[v["dtype"]]).element_size():
                        raise ValueError(f"tensor {k}'s byte range does not match its shape")
                    self._where[k] = (f, _DTYPES[v["dtype"]], shape, 8 + n + a)
            except (ValueError, KeyError, TypeError) as e:
                raise StreamError(f"{f.name} is not a readable safetensors file ({e})") from e

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def files(self) -> list[Path]:
        return sorted({w[0] for w in self._where.values()})

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def nbytes(self, name: str) -> int:
        f, dtype, shape, _ = self._where[name]
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= d
        return n

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (a fresh tensor; StreamError when the file cannot be read there)."""
        f, dtype, shape, offset = self._where[name]
        return _read_into(f, offset, torch.empty(shape, dtype=dtype), f"tensor {name!r}")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of 2-D tensor ``name`` (one contiguous read)."""
        f, dtype, shape, offset = self._where[name]
        row = shape[1] * torch.empty((), dtype=dtype).element_size()
        return _read_into(f, offset + start * row, torch.empty((stop - start, shape[1]), dtype=dtype),
                          f"rows {start}:{stop} of {name!r}")

    def gather(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (1-D, sorted, unique) of 2-D tensor ``name``, each run of consecutive rows in one read."""
        f, dtype, shape, offset = self._where[name]
        out = torch.empty((int(index.numel()), shape[1]), dtype=dtype)
        row = shape[1] * out.element_size()
        idx = index.tolist()
        i = 0
        with open(f, "rb") as fh:
            while i < len(idx):
                j = i
                while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                    j += 1
                fh.seek(offset + idx[i] * row)
                if fh.readinto(out[i:j + 1].view(-1).view(torch.uint8).numpy()) != (j + 1 - i) * row:
                    raise StreamError(f"rows of {name!r} cannot be read from {f.name}; the file is damaged")
                i = j + 1
        return out


# ------------------------------------------------------------------------------------------------
# replacement tensors, in memory up to a budget and in a scratch file beyond
# ------------------------------------------------------------------------------------------------
def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class Spill(MutableMapping):
    """``{name: tensor}`` that keeps its first ``budget_bytes`` in memory and writes the rest to a scratch file
    (``$AWQ_EXPLORER_SPILL_DIR`` or the system's temporary folder). The file is unlinked as soon as it is created, so
    it goes with the process however that ends (a killed run leaves no gigabytes behind). Reading a spilled tensor
    reads it back into a fresh CPU tensor. The values are not copied: do not change a tensor after storing it."""

    def __init__(self, items: Mapping[str, torch.Tensor] | None = None, *, budget_bytes: int | None = None):
        self.budget = SPILL_BYTES if budget_bytes is None else int(budget_bytes)
        self._mem: dict[str, torch.Tensor] = {}
        self._disk: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self._order: dict[str, None] = {}
        self._mem_bytes = 0
        self._fh: Any = None
        self._end = 0
        self._lock = threading.Lock()
        if items:
            for k, v in items.items():
                self[k] = v

    def _fd(self) -> int:
        if self._fh is None:
            self._fh = tempfile.TemporaryFile(prefix="awqx-spill-", suffix=".bin",
                                              dir=os.environ.get("AWQ_EXPLORER_SPILL_DIR") or None)
            weakref.finalize(self, self._fh.close)
        return self._fh.fileno()

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        if name in self:
            del self[name]
        n = value.numel() * value.element_size()
        with self._lock:
            if self._mem_bytes + n <= self.budget:
                self._mem[name] = value
                self._mem_bytes += n
            else:
                t = value.to("cpu").contiguous()
                if n:
                    _pwrite_all(self._fd(), memoryview(t.view(-1).view(torch.uint8).numpy()), self._end)
                self._disk[name] = (self._end, t.dtype, tuple(t.shape))
                self._end += n
            self._order[name] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._mem:
            return self._mem[name]
        offset, dtype, shape = self._disk[name]
        try:
            return _pread_exact(self._fd(), torch.empty(shape, dtype=dtype), offset)
        except OSError as e:
            raise StreamError(f"spilled tensor {name!r} cannot be read back from the scratch file ({e})") from e

    def __delitem__(self, name: str) -> None:
        with self._lock:
            if name in self._mem:
                v = self._mem.pop(name)
                self._mem_bytes -= v.numel() * v.element_size()
            else:
                del self._disk[name]  # its bytes stay in the file until the mapping goes
            del self._order[name]

    def __contains__(self, name: object) -> bool:
        return name in self._order

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    @property
    def spilled(self) -> int:
        """How many tensors live in the scratch file."""
        return len(self._disk)


# ------------------------------------------------------------------------------------------------
# layers over the checkpoint
# ------------------------------------------------------------------------------------------------
class Layer:
    """Something on top of the checkpoint: ``replaces(name)`` when it gives the whole value of parameter ``name``
    (then ``get(name)``), else ``apply(name, value)`` transforms the value below it (default: unchanged)."""

    def replaces(self, name: str) -> bool:
        return False

    def get(self, name: str) -> torch.Tensor:
        raise KeyError(name)

    def apply(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value


class Values(Layer):
    """Replacement values by parameter name, in the parameter's own layout."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        self.values = values

    def replaces(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str) -> torch.Tensor:
        return self.values[name]


class Transform(Layer):
    """``fn(name, value) -> value`` for the parameters in ``names`` (a ``Recipe`` applied to the checkpoint)."""

    def __init__(self, names: set[str], fn: Callable[[str, torch.Tensor], torch.Tensor]):
        self.names, self.fn = names, fn

    def apply(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self.fn(name, value) if name in self.names else value


class Snapshot(Mapping):
    """The state of a streamed model's block parameters at :func:`core.model.blocks.snapshot`: the checkpoint and
    the layers on top of it then (nothing is copied). ``snap[name]`` reads the value as it was, on the CPU."""

    def __init__(self, streamer: "Streamer", layers: tuple[Layer, ...]):
        self.streamer, self.layers = streamer, layers

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.streamer.block_params:
            raise KeyError(name)
        return self.streamer.value(name, self.layers, device="cpu")

    def __contains__(self, name: object) -> bool:
        return name in self.streamer.block_params

    def __iter__(self) -> Iterator[str]:
        return iter(self.streamer.block_params)

    def __len__(self) -> int:
        return len(self.streamer.block_params)


# ------------------------------------------------------------------------------------------------
# the streamer
# ------------------------------------------------------------------------------------------------
def _set_param(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class Streamer:
    """Materialise / release wrappers on every block of ``model`` (its block parameters on ``meta`` between calls),
    the layers over the checkpoint, and the streamed embedding and head.

    ``resident_blocks``: blocks holding real weights now; ``peak_resident_blocks``: the most at once (the tests
    check it is 1); ``reads``: tensors read from the checkpoint (for the benchmark)."""

    def __init__(self, model: nn.Module, store: WeightStore, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", aliases: Mapping[str, str] | None = None):
        self.model, self.store = model, store
        self.dtype, self.device = dtype, torch.device(device)
        self.aliases = dict(aliases or {})
        self.layers: list[Layer] = []
        self._writes: Spill | None = None  # the open write layer (sealed by a snapshot)
        self.prefix, self.blocks = find_blocks(model)
        self.resident_blocks = self.peak_resident_blocks = 0
        self.reads = 0
        self.checkpointing = True
        self._refs: dict[int, int] = {}
        self._versions: dict[int, dict[str, tuple[nn.Module, str, int]]] = {}
        self._lock = threading.RLock()
        self.block_params: dict[str, None] = {}
        self._params_of: list[list[tuple[str, nn.Module, str]]] = []
        for i, b in enumerate(self.blocks):
            pre = self.block_name(i)
            ps = []
            for mname, mod in b.named_modules():
                full = f"{pre}.{mname}" if mname else pre
                object.__setattr__(mod, "_awqx_stream", (self, full))
                for leaf, p in mod.named_parameters(recurse=False):
                    ps.append((f"{full}.{leaf}", mod, leaf))
                    self.block_params[f"{full}.{leaf}"] = None
                if mname == "" or any(True for _ in mod.parameters(recurse=False)):
                    self._wrap(mod, i)
            self._params_of.append(ps)

    # -- names and values --------------------------------------------------------------------------
    def block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}" if self.prefix else str(i)

    def key(self, name: str) -> str:
        key = self.aliases.get(name, name)
        if key not in self.store:
            raise StreamError(f"{MISSING_TENSOR} {key!r} that the model needs")
        return key

    def base(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as the checkpoint stores it (its own dtype, on the CPU)."""
        self.reads += 1
        return self.store.get(self.key(name))

    def value(self, name: str, layers: tuple[Layer, ...] | list[Layer] | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
        """Parameter ``name`` through ``layers`` (default: the current ones), in the engine's dtype."""
        layers = tuple(self.layers if layers is None else layers)
        start, v = 0, None
        for k in range(len(layers) - 1, -1, -1):
            if layers[k].replaces(name):
                v, start = layers[k].get(name), k + 1
                break
        if v is None:
            v = self.base(name)
        src = v
        v = v.to(dtype=self.dtype)
        for layer in layers[start:]:
            v = layer.apply(name, v).to(dtype=self.dtype)
        v = v.to(self.device if device is None else device).contiguous()
        if v.data_ptr() == src.data_ptr():  # a layer's own tensor: the block gets a copy it may write into
            v = v.clone()
        return v

    # -- layers --------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        self._writes = None  # later writes go to a new layer: the snapshot's stay as they are
        return Snapshot(self, tuple(self.layers))

    def restore(self, snap: Snapshot) -> None:
        with self._lock:
            self.layers = list(snap.layers)
            self._writes = None
            self._refresh_held()

    def push(self, layer: Layer) -> None:
        with self._lock:
            self.layers.append(layer)
            self._writes = None
            self._refresh_held()

    def write(self, name: str, value: torch.Tensor) -> None:
        """Parameter ``name`` becomes ``value`` (its own layout) from now on."""
        if name not in self.block_params:
            raise KeyError(f"{name!r} is not a parameter inside the model's blocks")
        with self._lock:
            if self._writes is None:
                self._writes = Spill()
                self.layers.append(Values(self._writes))
            self._writes[name] = value.detach().to("cpu", self.dtype)  # host memory: a GPU holds only the block

    # -- materialising --------------------------------------------------------------------------------
    def _materialise(self, i: int) -> None:
        vers = {}
        for name, mod, leaf in self._params_of[i]:
            _set_param(mod, leaf, self.value(name))
            vers[name] = (mod, leaf, mod._parameters[leaf]._version)
        self._versions[i] = vers

    def _release(self, i: int) -> None:
        for name, (mod, leaf, v0) in self._versions.pop(i, {}).items():
            p = mod._parameters[leaf]
            if p._version != v0 and not torch.equal(p.detach(), self.value(name)):
                self.write(name, p.detach())  # written in place while held: kept
            _set_param(mod, leaf, torch.empty_like(p, device="meta"))
        alloc.give_back()

    def _refresh_held(self) -> None:
        for i in list(self._versions):
            self._materialise(i)

    @contextmanager
    def hold(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` with real weights for the ``with`` (nested holds and forwards share one read)."""
        with self._lock:
            n = self._refs.get(i, 0)
            if n == 0:
                self._materialise(i)
                self.resident_blocks += 1
                self.peak_resident_blocks = max(self.peak_resident_blocks, self.resident_blocks)
            self._refs[i] = n + 1
        try:
            yield self.blocks[i]
        finally:
            with self._lock:
                self._refs[i] -= 1
                if self._refs[i] == 0:
                    del self._refs[i]
                    self._release(i)
                    self.resident_blocks -= 1

    def held(self, i: int) -> bool:
        return self._refs.get(i, 0) > 0

    def _wrap(self, mod: nn.Module, i: int) -> None:
        inner = mod.forward
        streamer = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if streamer.held(i):
                return inner(*args, **kwargs)
            if torch.is_grad_enabled() and streamer.checkpointing:
                from torch.utils.checkpoint import checkpoint

                def run(*a: Any, **k: Any) -> Any:
                    with streamer.hold(i):
                        return inner(*a, **k)
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            with streamer.hold(i):
                return inner(*args, **kwargs)
        mod.forward = forward

    def remove(self) -> None:
        for b in self.blocks:
            for mod in b.modules():
                mod.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------------
# the embedding and the head, when large
# ------------------------------------------------------------------------------------------------
def _stream_embedding(emb: nn.Embedding, s: Streamer, key: str) -> None:
    """Only the rows of the tokens given are read (sorted unique ids: one read per run of consecutive ids)."""
    def forward(ids: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(ids.reshape(-1).cpu(), sorted=True, return_inverse=True)
        rows = s.store.gather(key, uniq).to(device=s.device, dtype=s.dtype)
        s.reads += 1
        return torch.nn.functional.embedding(inv.to(s.device).reshape(ids.shape), rows)
    emb.forward = forward


def _stream_head(head: nn.Linear, s: Streamer, key: str, bias: torch.Tensor | None) -> None:
    """Logits in vocabulary chunks of :data:`HEAD_CHUNK_ROWS` rows, each chunk's rows read from the file."""
    def forward(h: torch.Tensor) -> torch.Tensor:
        vocab = s.store.shape(key)[0]
        out = torch.empty(*h.shape[:-1], vocab, dtype=h.dtype, device=h.device)
        for a in range(0, vocab, HEAD_CHUNK_ROWS):
            b = min(vocab, a + HEAD_CHUNK_ROWS)
            w = s.store.rows(key, a, b).to(device=s.device, dtype=s.dtype)
            out[..., a:b] = torch.nn.functional.linear(h, w, None if bias is None else bias[a:b])
            del w
        s.reads += 1
        return out
    head.forward = forward


# ------------------------------------------------------------------------------------------------
# building a streamed model
# ------------------------------------------------------------------------------------------------
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
        elif base and f"{base}.{n}" in store:
            out[n] = f"{base}.{n}"
    return out


def streamed(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             trust_remote_code: bool = False, config: Any = None) -> tuple[nn.Module, Streamer]:
    """``(model, streamer)``: ``folder``'s model with its blocks streamed from the checkpoint (and its embedding
    and head when larger than :data:`CHUNKED_BYTES`), the rest resident on ``device``. StreamError (one sentence)
    when the folder cannot be streamed."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = Path(folder)
    store = WeightStore(folder)
    if config is None:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=bool(trust_remote_code))
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = cls.from_config(config, dtype=dtype, trust_remote_code=bool(trust_remote_code))
    model.eval()
    aliases = _tied_aliases(model, store)
    s = Streamer(model, store, dtype=dtype, device=device, aliases=aliases)
    for n in s.block_params:
        s.key(n)  # every block parameter has a tensor: refused now, not in the middle of a pass
    dev = torch.device(device)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if causal else None
    streamed_out: set[int] = set()
    for mod, kind in ((emb, "embedding"), (head, "head")):
        if mod is None or not isinstance(getattr(mod, "weight", None), nn.Parameter):
            continue
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is mod.weight)
        key = s.key(name)
        numel = 1
        for d in store.shape(key):
            numel *= d
        if numel * torch.empty((), dtype=dtype).element_size() <= CHUNKED_BYTES:
            continue
        if kind == "embedding" and isinstance(mod, nn.Embedding) and mod.padding_idx is None \
                and mod.max_norm is None:
            _stream_embedding(mod, s, key)
            streamed_out.add(id(mod.weight))
        elif kind == "head" and isinstance(mod, nn.Linear):
            bias = None
            if mod.bias is not None:
                bname = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is mod.bias)
                bias = s.base(bname).to(device=dev, dtype=dtype)
                mod._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
            _stream_head(mod, s, key, bias)
            streamed_out.add(id(mod.weight))
    block_ids = {id(p) for p in s.blocks.parameters()}
    groups: dict[str, list[str]] = {}  # by the checkpoint tensor they are read from
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in block_ids and id(p) not in streamed_out and p.is_meta:
            groups.setdefault(s.key(n), []).append(n)
    for key, names in groups.items():  # tied parameters stay one tensor
        value = nn.Parameter(store.get(key).to(device=dev, dtype=dtype), requires_grad=False)
        for n in names:
            owner, _, leaf = n.rpartition(".")
            (model.get_submodule(owner) if owner else model)._parameters[leaf] = value
    for b_name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise StreamError(f"buffer {b_name!r} could not be built without the checkpoint")
        if buf.device != dev:
            owner, _, leaf = b_name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = buf.to(dev)
    return model, s


def streamer_of(model: nn.Module) -> Streamer | None:
    """The :class:`Streamer` of a streamed model (None for a model held in memory)."""
    return getattr(model, "_awqx_streamer", None)


def attach(model: nn.Module, s: Streamer) -> None:
    object.__setattr__(model, "_awqx_streamer", s)


def state_dict(model: nn.Module, snap: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with real values: a streamed model's block parameters read through ``snap``'s layers
    (default: the current ones) and its streamed embedding / head read from the checkpoint, on the CPU. For an
    exporter, which writes the whole model: this holds it in memory once."""
    s = streamer_of(model)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_meta:
            out[k] = v
        elif s is None:
            raise StreamError(f"{k!r} has no value (a model on meta)")
        elif k in s.block_params:
            out[k] = snap[k] if snap is not None else s.value(k, device="cpu")
        else:
            out[k] = s.store.get(s.key(k)).to(dtype=s.dtype)
    return out


class SpillList:
    """A list of tensors kept in a :class:`Spill` (in memory up to ``budget_bytes``, in a scratch file beyond)."""

    def __init__(self, budget_bytes: int | None = None):
        self._spill = Spill(budget_bytes=budget_bytes)
        self._n = 0

    def append(self, t: torch.Tensor) -> None:
        self._spill[str(self._n)] = t
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._spill[str(range(self._n)[i])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self._spill[str(i)] for i in range(self._n))
