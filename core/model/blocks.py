"""Running a model block by block: snapshots of the block parameters (restored bit for bit), truncated forwards
that capture what a block's linears and modules receive, and the carried block inputs of official ``run_awq``
(``inps = layer(inps)``). Every whole-model method runs on these."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .linears import find_blocks
from .models import LoadedModel
from .stream import streamer_of


def block_name(prefix: str, i: int) -> str:
    return f"{prefix}.{i}" if prefix else str(i)


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


Snapshot = Mapping[str, torch.Tensor]  # a dict in memory, core.model.stream.Snapshot when streamed


def snapshot(lm: LoadedModel) -> Snapshot:
    """Every parameter inside the transformer blocks as it is now: what a plan may change. In memory: copies on
    the CPU; streamed: the layers over the checkpoint (nothing copied: ``core.model.stream.Snapshot``)."""
    s = streamer_of(lm.model)
    if s is not None:
        return s.snapshot()
    prefix, blocks = find_blocks(lm.model)
    out: Snapshot = {}
    for i, b in enumerate(blocks):
        for n, p in b.named_parameters():
            out[f"{block_name(prefix, i)}.{n}"] = p.detach().to("cpu", copy=True)
    return out


def restore(lm: LoadedModel, snap: Snapshot) -> None:
    """Put the snapshot back, bit for bit (in memory: ``copy_`` of the saved tensors into the same parameters)."""
    s = streamer_of(lm.model)
    if s is not None:
        s.restore(snap)
        return
    params = dict(lm.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for n, v in snap.items():
            params[n].copy_(v)


@contextmanager
def hold(lm: LoadedModel, i: int) -> Iterator[None]:
    """Block ``i``'s weights in memory for the ``with`` (a streamed model; nothing to do for one in memory): code
    that runs a block or its modules many times, or writes into them, reads them once."""
    s = streamer_of(lm.model)
    if s is None:
        yield
    else:
        with s.hold(i):
            yield


def original_weight(lm: LoadedModel, snap: Snapshot, name: str) -> torch.Tensor:
    """``[out, in]`` float32 copy of linear ``name``'s weight as it was when the snapshot was taken."""
    w = snap[f"{name}.weight"]
    m = lm.model.get_submodule(name)
    return (w.T if type(m).__name__ == "Conv1D" else w).float()


# ------------------------------------------------------------------------------------------------
# capture: the inputs of one block's linears and modules on the calibration blocks
# ------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _keep(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_keep(t) for t in v)
    if isinstance(v, list):
        return [_keep(t) for t in v]
    return v


def token_batches(ids: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    per = max(1, int(batch_tokens) // max(1, ids.shape[1]))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def forward(lm: LoadedModel, ids: torch.Tensor) -> Any:
    kw = {"use_cache": False} if lm.is_causal else {}
    return lm.model(input_ids=ids.to(lm.device), **kw)


@dataclass
class Captured:
    """Inputs seen by block ``block`` on the calibration tokens (full precision model)."""

    block: int
    x: dict[str, torch.Tensor]  # linear name -> [tokens, in] (model dtype), for the requested linears
    calls: dict[str, list[tuple[tuple, dict]]]  # module name -> (args, kwargs) per batch


def _capture_hooks(lm: LoadedModel, linears: set[str], modules: set[str]):
    """Forward pre-hooks keeping the inputs of ``linears`` (``[tokens, in]`` rows) and the calls of ``modules``."""
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in modules}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in xs:
                x = args[0] if args else next(iter(kwargs.values()))
                xs[name].append(x.detach().reshape(-1, x.shape[-1]).clone())
            if name in calls:
                calls[name].append((_keep(args), {k: _keep(v) for k, v in kwargs.items()}))
        return fn

    handles = [lm.model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in sorted(set(linears) | set(modules))]
    return xs, calls, handles


def _run_until_stop(lm: LoadedModel, ids: torch.Tensor, batch_tokens: int) -> None:
    """Forward ``ids`` batch by batch until a hook raises ``_Stop`` (a truncated forward: nothing after it runs)."""
    with torch.no_grad():
        for b in token_batches(ids, batch_tokens):
            try:
                forward(lm, b)
            except _Stop:
                pass


def with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """A block call's ``(args, kwargs)`` with its hidden states replaced by ``h`` (the next block's call)."""
    if args:
        return (h,) + tuple(args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: h}


def capture_block(lm: LoadedModel, block: int, ids: torch.Tensor, *, batch_tokens: int,
                  linears: set[str], modules: set[str]) -> Captured:
    """Run the model on ``ids`` up to the end of block ``block`` and keep what these linears / modules got.
    (The straightforward path: ``block + 1`` blocks of forward work; ``BlockInputs`` does the same in one.)"""
    _, blocks = find_blocks(lm.model)
    xs, calls, handles = _capture_hooks(lm, linears, modules)

    def stop(mod, args, out):
        raise _Stop

    handles.append(blocks[block].register_forward_hook(stop))
    try:
        _run_until_stop(lm, ids, batch_tokens)
    finally:
        for h in handles:
            h.remove()
    return Captured(block, {n: torch.cat(v) for n, v in xs.items() if v}, calls)


class BlockInputs:
    """The full-precision inputs of one block after another, as official ``run_awq`` keeps them
    (``inps = layer(inps)``): one truncated model forward for block 0's calls (hidden states and the
    keyword arguments the model passes every block: masks, rotary embeddings), then each block's own forward
    on its cached inputs gives the next block's. Block ``i``'s capture costs one block of forward work
    instead of ``i + 1`` (what :func:`capture_block` does); the values are the same bits."""

    def __init__(self, lm: LoadedModel, ids: torch.Tensor, *, batch_tokens: int):
        self.lm = lm
        _, self.blocks = find_blocks(lm.model)
        self.next_block = 0
        self.calls: list[tuple[tuple, dict]] = []

        def grab(mod, args, kwargs):
            self.calls.append((_keep(args), {k: _keep(v) for k, v in kwargs.items()}))
            raise _Stop

        h = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            _run_until_stop(lm, ids, batch_tokens)
        finally:
            h.remove()

    def capture(self, block: int, *, linears: set[str], modules: set[str]) -> Captured:
        """Run block ``block`` (the blocks must be visited in order, on unmodified weights) on its inputs,
        keeping what these linears / modules got; its outputs become the next block's inputs."""
        if block != self.next_block:
            raise ValueError(f"blocks must be captured in order: expected block {self.next_block}, got {block}")
        xs, calls, handles = _capture_hooks(self.lm, linears, modules)
        nxt: list[tuple[tuple, dict]] = []
        try:
            with torch.no_grad(), hold(self.lm, block):
                for args, kwargs in self.calls:
                    nxt.append(with_hidden(args, kwargs, first_output(self.blocks[block](*args, **kwargs))))
        finally:
            for hd in handles:
                hd.remove()
        self.calls = nxt
        self.next_block = block + 1
        return Captured(block, {n: torch.cat(v) for n, v in xs.items() if v}, calls)


class _Replay(nn.Module):
    """Stands in for a block in the replay pass of :func:`block_major`: returns the last block's output."""

    def __init__(self, out: Any):
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


def block_major(lm: LoadedModel, batches: list[torch.Tensor]) -> Iterator[Any]:
    """The model's outputs on each of ``batches``, computed block by block: every batch goes through block 0,
    then every batch through block 1, ... (a streamed model reads each block once for all of them, instead of once
    per batch), then each batch's embedding-to-head pass is replayed with the blocks standing in by their
    outputs, which runs what comes after the blocks (final norm, head) one batch at a time. Yields what
    ``lm.model(...)`` returns, batch by batch; the same values as :func:`forward` on each batch (same
    operations on the same inputs). Hooks on the blocks fire once, in the block pass."""
    prefix, blocks = find_blocks(lm.model)
    calls: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        calls.append((_keep(args), {k: _keep(v) for k, v in kwargs.items()}))
        raise _Stop

    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    forward(lm, b)
                except _Stop:
                    pass
    finally:
        h.remove()
    last: list[Any] = [None] * len(batches)
    for i in range(len(blocks)):
        with hold(lm, i), torch.no_grad():
            for j, (a, k) in enumerate(calls):
                out = blocks[i](*a, **k)
                calls[j] = with_hidden(a, k, first_output(out))
                if i == len(blocks) - 1:
                    last[j] = out
    del calls
    real = list(blocks)
    for j, b in enumerate(batches):
        try:
            for i in range(len(blocks)):
                blocks[i] = _Replay(last[j])
            with torch.no_grad():
                out = forward(lm, b)
        finally:
            for i, m in enumerate(real):
                blocks[i] = m
        last[j] = None
        yield out
