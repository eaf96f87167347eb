"""llama.cpp's quantization types as quantizers of the explorer, byte for byte as llama.cpp writes them.

Types: the legacy blocks of 32 (``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``) and the k-quants in super-blocks
of 256 (``Q2_K`` .. ``Q6_K``). ``quantize`` returns the bytes llama-quantize stores for a ``[rows, cols]`` float32
weight (GGUF's ``[cols, rows]`` tensor), with or without importance weights (an imatrix: one weight per input
channel, the mean of x^2 over the calibration tokens):

* the five legacy types without an imatrix go through ``gguf.quants.quantize`` (numpy; llama.cpp's own Python
  package);
* everything else (every k-quant, and every type *with* an imatrix: ``quantize_q4_0`` & co. then run a weighted
  search, ``make_qx_quants`` / ``make_qkx3_quants`` / ``make_qp_quants``) runs llama.cpp's reference C code,
  copied verbatim into ``llamacpp_quants.c`` and compiled on first use with the system C compiler (like
  ``kernels``), because byte-exactness needs its float32 arithmetic in its order (sequential sums,
  ``nearest_int``'s magic-number rounding, software fp16 rounding of the scales).

``tests/test_llamacpp_types.py`` checks both against each other, against ``gguf.quants`` and against the bytes
``llama-quantize`` itself writes (when the binary is built).

Cost: ``bits_per_weight`` from the real block layout (a Q4_0 block is 32 4-bit levels and one fp16 scale: 18
bytes for 32 weights = 4.5 bits; a Q4_K super-block is 144 bytes for 256 weights = 4.5 bits).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import kernels

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LEGACY_TYPES = TYPES[:5]  # blocks of 32, implemented by gguf.quants
K_TYPES = TYPES[5:]  # super-blocks of 256


@dataclass(frozen=True)
class TypeLayout:
    """One llama.cpp type's block: ``block`` weights in ``block_bytes`` bytes; ``bits``: its nominal level bits
    (4 for Q4_0 and Q4_K); ``ggml_id``: ggml's ``enum ggml_type`` value (also GGUF's tensor type id)."""

    block: int
    block_bytes: int
    bits: int
    ggml_id: int


LAYOUTS: dict[str, TypeLayout] = {
    "Q4_0": TypeLayout(32, 18, 4, 2),    # fp16 d + 16 bytes of nibbles
    "Q4_1": TypeLayout(32, 20, 4, 3),    # fp16 d, fp16 m + 16 bytes
    "Q5_0": TypeLayout(32, 22, 5, 6),    # fp16 d + 4 bytes of 5th bits + 16 bytes
    "Q5_1": TypeLayout(32, 24, 5, 7),    # fp16 d, fp16 m + 4 + 16 bytes
    "Q8_0": TypeLayout(32, 34, 8, 8),    # fp16 d + 32 int8
    "Q2_K": TypeLayout(256, 84, 2, 10),  # 16 4-bit scale/min pairs, 64 bytes of 2-bit levels, fp16 d, dmin
    "Q3_K": TypeLayout(256, 110, 3, 11),  # 32 bytes high bits, 64 bytes low bits, 12 bytes 6-bit scales, fp16 d
    "Q4_K": TypeLayout(256, 144, 4, 12),  # fp16 d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    "Q5_K": TypeLayout(256, 176, 5, 13),  # as Q4_K + 32 bytes of 5th bits
    "Q6_K": TypeLayout(256, 210, 6, 14),  # 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, fp16 d
}

# llama-quantize's fallback for a row width its type's block does not divide (src/llama-quant.cpp,
# tensor_type_fallback): the k-quants drop to a block-32 type; a block-32 type that does not fit either gives F16.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
F16 = "F16"
_WITH_MIN = frozenset({"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"})


def check_type(type: str) -> str:
    """The canonical name of a llama.cpp type (case-insensitive: ``q4_k`` -> ``Q4_K``); ValueError naming the
    supported types otherwise."""
    if isinstance(type, str):
        t = type.strip().upper()
        if t in LAYOUTS:
            return t
    raise ValueError(f"unknown llama.cpp type {type!r}; supported: {', '.join(TYPES)}")


def is_type(name: object) -> bool:
    """Whether ``name`` names one of ``TYPES`` (any case)."""
    try:
        check_type(name)  # type: ignore[arg-type]
        return True
    except ValueError:
        return False


def block_size(type: str) -> int:
    """Weights per block along a row: 32 for the legacy types, 256 for the k-quants."""
    return LAYOUTS[check_type(type)].block


def bits_per_weight(type: str) -> float:
    """Storage bits per weight of the block layout (levels, scales and mins): Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0,
    Q8_0 8.5, Q2_K 2.625, Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625."""
    lay = LAYOUTS[check_type(type)]
    return lay.block_bytes * 8 / lay.block


def nominal_bits(type: str) -> int:
    """The bits of one level (4 for Q4_0, Q4_1 and Q4_K; 6 for Q6_K)."""
    return LAYOUTS[check_type(type)].bits


def has_min(type: str) -> bool:
    """Whether the type's blocks store a minimum beside the scale (``x = d*q + m``: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K);
    the others are symmetric (``x = d*q``)."""
    return check_type(type) in _WITH_MIN


def with_bits(type: str, bits: int) -> str:
    """The type of ``type``'s family with ``bits``-bit levels (``Q4_K``, 5 -> ``Q5_K``; ``Q4_1``, 5 -> ``Q5_1``);
    ValueError when llama.cpp has no such type (``Q4_0`` at 3 bits)."""
    t = check_type(type)
    for c in TYPES:
        if LAYOUTS[c].bits == int(bits) and LAYOUTS[c].block == LAYOUTS[t].block and has_min(c) == has_min(t):
            return c
    if t in K_TYPES:
        for c in K_TYPES:
            if LAYOUTS[c].bits == int(bits):
                return c
    raise ValueError(f"llama.cpp has no {bits}-bit type of {t}'s kind; supported: {', '.join(TYPES)}")


def row_bytes(type: str, cols: int) -> int:
    """Bytes of one quantized row ``cols`` wide (``cols`` a multiple of the block)."""
    lay = LAYOUTS[check_type(type)]
    return cols // lay.block * lay.block_bytes


def fallback(type: str, in_features: int) -> str:
    """The type llama-quantize actually writes for a tensor whose rows are ``in_features`` wide.

    From ``tensor_type_fallback`` in the vendored ``src/llama-quant.cpp`` (llama-cpp-python 0.3.36): when the
    type's block does not divide the row width, Q2_K and Q3_K fall back to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1 and
    Q6_K to Q8_0; when that type's block of 32 does not divide it either (or a legacy type's does not), the tensor
    is written as ``"F16"``. The fallback runs after every other choice, so it applies to ``--pure``, to explicit
    ``--tensor-type`` overrides and to the default mixtures alike; the mixtures' own special cases (``attn_v`` /
    ``ffn_down`` getting more bits in Q4_K_M ...) are not applied to ``--pure`` or ``--tensor-type`` tensors, so
    this module does not model them. Example: SmolLM2-135M's 576-wide linears (q, k, v, o, gate, up) cannot
    hold Q4_K's 256-blocks and become Q5_0; only ``ffn_down`` (1536 wide) is Q4_K.
    """
    t = check_type(type)
    n = int(in_features)
    if n % LAYOUTS[t].block == 0:
        return t
    f = _FALLBACK.get(t, t)
    return f if n % LAYOUTS[f].block == 0 else F16


def _check_weight(w: np.ndarray, t: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"a llama.cpp quantizer needs a non-empty [rows, cols] weight, got shape {w.shape}")
    if w.shape[1] % LAYOUTS[t].block:
        raise ValueError(f"{t} needs rows a multiple of {LAYOUTS[t].block} wide; this weight's rows are "
                         f"{w.shape[1]} wide (llama-quantize would write {fallback(t, w.shape[1])})")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError("the weight holds NaN or infinite values; llama.cpp's quantizers need finite weights")
    return w


def _check_imatrix(imatrix: np.ndarray | torch.Tensor, cols: int) -> np.ndarray:
    if isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().cpu().numpy()
    q = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if q.size != cols:
        raise ValueError(f"the importance weights have {q.size} values; the weight has {cols} input channels")
    if not np.isfinite(q).all() or (q < 0).any():
        raise ValueError("importance weights must be finite and non-negative")
    return q


def quantize(w: np.ndarray, type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for ``w`` ``[rows, cols]`` (float32) in ``type``: ``uint8 [rows, row_bytes(type, cols)]``.

    ``imatrix`` ``[cols]``: importance weights (llama-quantize passes the imatrix file's per-channel mean of x^2);
    ``None`` is llama-quantize without ``--imatrix``. ``cols`` must be a multiple of the type's block (see
    ``fallback`` for what llama-quantize writes otherwise).
    """
    t = check_type(type)
    w = _check_weight(w, t)
    if imatrix is None and t in LEGACY_TYPES:
        import gguf.quants
        return np.asarray(gguf.quants.quantize(w, _qtype(t)), dtype=np.uint8).reshape(w.shape[0], -1)
    return quantize_c(w, t, None if imatrix is None else _check_imatrix(imatrix, w.shape[1]))


def quantize_c(w: np.ndarray, type: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``quantize`` through the copied C code for every type (the legacy types too: the tests compare the two)."""
    t = check_type(type)
    w = _check_weight(w, t)
    q = None if imatrix is None else _check_imatrix(imatrix, w.shape[1])
    rows, cols = w.shape
    out = np.empty((rows, row_bytes(t, cols)), dtype=np.uint8)
    lib = _library()
    n = lib.llq_quantize(LAYOUTS[t].ggml_id, w.ctypes.data, out.ctypes.data, rows, cols,
                         None if q is None else q.ctypes.data, max(1, torch.get_num_threads()))
    if n != out.size:
        raise RuntimeError(f"llama.cpp quantizer wrote {n} bytes for {t}, expected {out.size}")
    return out


def dequantize(data: np.ndarray, type: str, shape: tuple[int, int]) -> np.ndarray:
    """The float32 weights ``[rows, cols]`` that ``data`` (``quantize``'s bytes) stands for, as llama.cpp reads
    them (``gguf.quants.dequantize``)."""
    import gguf.quants
    t = check_type(type)
    rows, cols = (int(s) for s in shape)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1)
    if data.shape[1] != row_bytes(t, cols) or cols % LAYOUTS[t].block:
        raise ValueError(f"{data.size} bytes are not a {t} tensor of shape {rows}x{cols}")
    return np.asarray(gguf.quants.dequantize(data, _qtype(t)), dtype=np.float32).reshape(rows, cols)


def fake_quantize(w: torch.Tensor, type: str, imatrix: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """``w`` ``[out, in]`` after llama.cpp stores it in ``type`` and reads it back (same shape, dtype, device).

    A row width the type's block does not divide gets llama-quantize's ``fallback`` type (``F16``: fp16 rounding),
    so the result is the weight the runtime reads. ``imatrix`` ``[in]``: importance weights, or ``None``.
    Runs quantize + dequantize in the C code in one pass (the same numbers as ``dequantize(quantize(...))``, tested;
    the searches call this many times); without a C compiler the legacy types go through gguf.quants.
    """
    if w.dim() != 2:
        raise ValueError(f"fake_quantize needs a [out, in] weight, got shape {tuple(w.shape)}")
    t = fallback(type, w.shape[1])
    if t == F16:
        return w.to(torch.float16).to(w.dtype)
    a = _check_weight(w.detach().to("cpu", torch.float32).numpy(), t)
    q = None if imatrix is None else _check_imatrix(imatrix, a.shape[1])
    try:
        lib = _library()
    except RuntimeError:
        if t not in LEGACY_TYPES or q is not None:
            raise
        out = dequantize(quantize(a, t), t, a.shape)  # no C compiler: gguf.quants (same numbers, slower)
    else:
        out = np.empty_like(a)
        lib.llq_fake_quant(LAYOUTS[t].ggml_id, a.ctypes.data, out.ctypes.data, a.shape[0], a.shape[1],
                           None if q is None else q.ctypes.data, max(1, torch.get_num_threads()))
    return torch.from_numpy(out).to(device=w.device, dtype=w.dtype)


def tool_path(name: str) -> Path | None:
    """A llama.cpp tool (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``): ``$AWQ_EXPLORER_LLAMACPP/<name>``
    if that variable is set, else ``<repo>/.llamacpp/build/bin/<name>`` (what ``tools/build_llamacpp.sh`` builds);
    ``None`` when the file is not there."""
    env = os.environ.get("AWQ_EXPLORER_LLAMACPP", "").strip()
    d = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / ".llamacpp" / "build" / "bin"
    p = d / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def _qtype(t: str):
    import gguf
    return gguf.GGMLQuantizationType[t]


# --- the C library (llamacpp_quants.c): built once per source/compiler, cached beside the fused kernels ------------

_SOURCE = Path(__file__).resolve().parent / "llamacpp_quants.c"
# No -march: llama.cpp builds this code into ggml-base for the baseline ISA (no FMA); -ffp-contract=off keeps any
# compiler from fusing a*b+c, which would change bits.
_FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-fvisibility=hidden"]
_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            _lib = _build()
    return _lib


def _build() -> ctypes.CDLL:
    cc = kernels._compiler()
    if cc is None:
        raise RuntimeError("llama.cpp's k-quants and imatrix quantizers need a C compiler (cc/gcc/clang); none found")
    omp_options = kernels._omp_flags()
    tag = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, *_FLAGS, repr(omp_options), platform.machine()])
                         .encode()).hexdigest()[:16]
    d = kernels._build_dir()
    d.mkdir(parents=True, exist_ok=True)
    so = d / f"llamacpp_quants_{tag}.so"
    err = ""
    if not so.exists():
        fd, tmp = tempfile.mkstemp(prefix=".llamacpp_quants_", suffix=".so", dir=d)
        os.close(fd)
        try:
            for omp in omp_options:
                r = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE), *omp, "-lm"], capture_output=True,
                                   text=True, timeout=180)
                if r.returncode == 0:
                    os.replace(tmp, so)  # atomic: concurrent builders each rename a complete file
                    break
                err = r.stderr.strip()[:300]
            else:
                raise RuntimeError(f"building llama.cpp's quantizers failed ({cc}): {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    lib.llq_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_int]
    lib.llq_quantize.restype = ctypes.c_size_t
    lib.llq_fake_quant.argtypes = lib.llq_quantize.argtypes
    lib.llq_fake_quant.restype = ctypes.c_int
    return lib


__all__ = ["TYPES", "LEGACY_TYPES", "K_TYPES", "LAYOUTS", "TypeLayout", "F16", "check_type", "is_type",
           "block_size", "bits_per_weight", "nominal_bits", "has_min", "with_bits", "row_bytes", "fallback", "quantize", "quantize_c",
           "dequantize", "fake_quantize", "tool_path"]
