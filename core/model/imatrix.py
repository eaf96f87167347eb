"""llama.cpp importance matrices (imatrix files): write the explorer's activation statistics as one, read any.

What llama.cpp reads (the vendored llama-cpp-python 0.3.36 tree: ``common/imatrix-loader.cpp``, used by
``llama-quantize --imatrix``): a **GGUF** file (what ``llama-imatrix`` writes by default) with, per weight tensor
``<name>`` (``blk.3.attn_q.weight``), an F32 tensor ``<name>.in_sum2`` ``[n_mat, in]`` (per input channel the sum of
x^2 over the tokens the matrix multiplied; ``n_mat`` is 1 except for MoE experts) and an F32 tensor ``<name>.counts``
``[n_mat, 1]`` (those tokens), plus the keys ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (u32; llama-quantize refuses a GGUF imatrix without all three); or, when the file is not
GGUF, the **legacy** binary ``.dat`` (``llama-imatrix --output-format dat``: per entry the name, ``ncall`` and
``(sum / count) * ncall`` per channel, then the chunk count and the dataset name). Both are read here; GGUF is
written.

llama-quantize weights a tensor's rows with ``in_sum2 / count`` computed in float32 (``Imatrix.values``): the mean of
x^2 per input channel. The explorer's analysis keeps each input's per-channel mean and standard deviation over
all calibration tokens (``channels`` table), so the mean of x^2 is ``std^2 + mean^2`` (a sum of two non-negative
terms: no cancellation; float32 storage of mean and std limits it to ~1e-7 relative) and the sum is that times
the token count.
"""
from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .gguf_file import module_to_tensor

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


class ImatrixError(ValueError):
    """An imatrix file or statistics that cannot be used; the message is one readable sentence."""


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix. ``sums[name]``: float32 ``[n_mat, in]`` sums of x^2 per input channel; ``counts[name]``:
    ``[n_mat]`` tokens each sum ran over (the legacy format stores ``ncall`` there and sums already divided by the
    count and multiplied by ``ncall``, so ``values`` is right for both); ``format``: ``"gguf"`` or ``"legacy"``."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    format: str = "gguf"
    _values: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self, name: str) -> np.ndarray:
        """What llama-quantize passes to its quantizers for tensor ``name``: float32 ``[n_mat * in]``, ``sum / count``
        per matrix (1 where the count is 0), as ``tools/quantize/quantize.cpp`` ``load_imatrix`` computes it."""
        if name not in self._values:
            s = self.sums[name].astype(np.float32)
            c = self.counts[name].astype(np.float32).reshape(-1, 1)
            if self.format == "legacy":
                v = np.where(c > 0, s / np.where(c > 0, c, 1), s)
            else:
                v = np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1))
            self._values[name] = v.astype(np.float32).reshape(-1)
        return self._values[name]

    @property
    def values(self) -> dict[str, np.ndarray]:
        """``{tensor name: mean x^2 [in]}`` (``importance`` of every entry)."""
        return {n: self.importance(n) for n in self.names}

    def table(self, top: int = 5) -> pd.DataFrame:
        """What the matrix weights most, one row per tensor: ``tensor``, ``channels``, ``tokens`` (largest count),
        ``mean`` (of mean x^2 over channels), ``max_over_median`` (how uneven the channels are) and ``top_channels``
        (the ``top`` channels with the largest mean x^2, largest first)."""
        rows = []
        for n in self.names:
            v = self.importance(n).astype(np.float64)
            med = float(np.median(v))
            rows.append({"tensor": n, "channels": int(v.size), "tokens": int(self.counts[n].max()),
                         "mean": float(v.mean()), "max_over_median": float(v.max() / med) if med > 0 else float("inf"),
                         "top_channels": [int(i) for i in np.argsort(-v, kind="stable")[:top]]})
        return pd.DataFrame(rows, columns=["tensor", "channels", "tokens", "mean", "max_over_median", "top_channels"])


# ------------------------------------------------------------------------------------------------
# the explorer's statistics -> imatrix
# ------------------------------------------------------------------------------------------------
def mean_sq(analysis: Any, name: str) -> np.ndarray:
    """Mean of x^2 per input channel of linear ``name`` over the analysis' calibration tokens, float64 ``[in]``:
    ``std^2 + mean^2`` of its ``channels`` rows (what an imatrix holds as ``in_sum2 / counts``; no model, no
    Hessian needed)."""
    key = analysis.input_key(name)
    ch = analysis.channels
    rows = ch[ch["input_key"] == key].sort_values("channel")
    if rows.empty:
        raise ImatrixError(f"the analysis holds no channel statistics for the input of {name}")
    mean = rows["mean"].to_numpy(np.float64)
    std = rows["std"].to_numpy(np.float64)
    return std * std + mean * mean


def analysis_stats(analysis: Any) -> dict[str, tuple[np.ndarray, int]]:
    """``{GGUF tensor name: (sum of x^2 per input channel float64 [in], token count)}`` for every quantizable linear
    of an analysis (``mean_sq`` times the token count; its tables and manifest only, the model is not loaded).
    Linears that read the same input (q, k, v) get the same statistics, as llama-imatrix records them per tensor."""
    lin = analysis.linears
    n = int(analysis.manifest.get("n_tokens") or 0)
    if n <= 0:
        raise ImatrixError("the analysis records no calibration token count; re-run the analysis")
    arch = str(analysis.manifest.get("model_type") or "")
    n_blocks = int(lin["block"].max()) + 1 if "block" in lin and len(lin) else 0
    names = lin["name"].tolist()
    mapping = module_to_tensor(names, arch, n_blocks)
    missing = [m for m in names if m not in mapping]
    if missing:
        raise ImatrixError(f"no GGUF tensor name for {len(missing)} linear(s) of this {arch or 'unknown'} model "
                           f"(e.g. {missing[0]}); llama.cpp's name tables do not cover it")
    by_key: dict[str, np.ndarray] = {}
    out: dict[str, tuple[np.ndarray, int]] = {}
    for name, key in zip(names, lin["input_key"]):
        if key not in by_key:
            by_key[key] = mean_sq(analysis, name) * n
        out[mapping[name]] = (by_key[key], n)
    return out


def write_imatrix(path: str | Path, stats: Any, *, dataset: str = "AWQ Explorer calibration text",
                  chunk_size: int | None = None, chunk_count: int | None = None) -> Path:
    """Write an imatrix GGUF that ``llama-quantize --imatrix`` reads; returns ``path``.

    ``stats``: an ``Analysis`` (its calibration statistics, see ``analysis_stats``; chunk size and count default to
    its calibration blocks) or ``{GGUF tensor name: (sum of x^2 [in], token count)}``. Written to a temporary file
    beside ``path`` and renamed into place, so a failure leaves nothing half-written.
    """
    import gguf

    if isinstance(stats, Mapping):
        entries = dict(stats)
    else:
        entries = analysis_stats(stats)
        cal = getattr(getattr(stats, "settings", None), "calibration", None)
        if cal is not None:
            chunk_size = int(chunk_size or cal.seqlen)
            n = int(stats.manifest.get("n_tokens") or 0)
            chunk_count = int(chunk_count or (n // max(1, int(cal.seqlen))))
    if not entries:
        raise ImatrixError("no statistics to write")
    checked: dict[str, tuple[np.ndarray, float]] = {}
    for name, (s, c) in entries.items():
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if not name or s.size == 0 or not np.isfinite(s).all() or (s < 0).any() or not float(c) > 0:
            raise ImatrixError(f"the statistics of {name!r} are not finite non-negative sums over a positive count")
        checked[str(name)] = (s, float(c))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_type("imatrix")  # general.type, as llama-imatrix writes it
        w.add_array(KEY_DATASETS, [str(dataset)])
        w.add_uint32(KEY_CHUNK_COUNT, int(chunk_count or 1))
        w.add_uint32(KEY_CHUNK_SIZE, int(chunk_size or 1))
        for name in sorted(checked):  # llama-imatrix's order: sorted names
            s, c = checked[name]
            w.add_tensor(name + SUM_SUFFIX, s.astype(np.float32).reshape(1, -1))
            w.add_tensor(name + COUNT_SUFFIX, np.array([[c]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ------------------------------------------------------------------------------------------------
# reading (GGUF or legacy .dat)
# ------------------------------------------------------------------------------------------------
def read_imatrix(path: str | Path) -> Imatrix:
    """An imatrix file as llama.cpp reads it (GGUF, else the legacy binary format); ``ImatrixError`` with one
    sentence for a missing, corrupt or non-imatrix file. ``.values``: ``{tensor name: mean x^2 [in]}``."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"no imatrix file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
        tensors = {t.name: t for t in r.tensors}
    except Exception as e:  # noqa: BLE001 - gguf raises many kinds on a damaged file
        raise ImatrixError(f"{path.name} is not a readable GGUF file ({str(e).splitlines()[0][:120]})") from None
    sums, counts = {}, {}
    for tname, t in tensors.items():
        for suffix, into in ((SUM_SUFFIX, sums), (COUNT_SUFFIX, counts)):
            if tname.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ImatrixError(f"{path.name}: {tname} is {t.tensor_type.name}, an imatrix holds F32 tensors")
                into[tname[: -len(suffix)]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise ImatrixError(f"{path.name} holds no imatrix data (no <tensor>.in_sum2 / .counts pairs)")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise ImatrixError(f"{path.name}: sums and counts do not pair up for {unpaired[0]}")
    out_s, out_c = {}, {}
    for name in sums:
        c = np.rint(counts[name]).astype(np.int64)  # llama.cpp rounds the stored counts (std::lround)
        if c.size == 0 or sums[name].size % c.size:
            raise ImatrixError(f"{path.name}: {name} has {sums[name].size} sums for {c.size} count(s)")
        out_s[name] = sums[name].reshape(c.size, -1)
        out_c[name] = c

    def field(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()
    ds = field(KEY_DATASETS)
    datasets = tuple(ds) if isinstance(ds, list) else ((ds,) if isinstance(ds, str) else ())
    return Imatrix(out_s, out_c, datasets, int(field(KEY_CHUNK_COUNT) or 0), int(field(KEY_CHUNK_SIZE) or 0), "gguf")


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path.name} is neither GGUF nor a complete legacy imatrix (.dat) file")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v
    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ImatrixError(f"{path.name} is neither GGUF nor a legacy imatrix (.dat) file")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (n,) = take("<i")
        if n <= 0 or n > 4096:
            raise ImatrixError(f"{path.name}: a corrupt entry name in the legacy imatrix")
        name = bytes(take(f"<{n}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{path.name}: entry {name} has no values")
        vals = np.array(take(f"<{nval}f"), dtype=np.float32)
        sums[name] = vals.reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.int64)
    chunk_count, datasets = 0, ()
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if 0 < n <= len(data) - pos:
                datasets = (bytes(take(f"<{n}s")[0]).decode("utf-8", "replace"),)
    return Imatrix(sums, counts, datasets, int(chunk_count), 0, "legacy")


__all__ = ["Imatrix", "ImatrixError", "mean_sq", "analysis_stats", "write_imatrix", "read_imatrix", "KEY_DATASETS",
           "KEY_CHUNK_COUNT", "KEY_CHUNK_SIZE"]
