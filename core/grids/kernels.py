"""Optional fused CPU kernels (plain C, compiled on first use with the system C compiler, called via ctypes).

Why: on CPU the work of an output-error evaluation is one GEMM; the quantizer around it is ~12 elementwise
passes over ``[out, in]`` in torch (each its own parallel region and temporary), which costs as much as the
GEMM itself. Here ``Q(W*s)/s`` and ``Q(W*s)/s - W`` are computed in one pass per quantization group, and the
per-channel statistics of ``collect`` in one pass per batch.

Exactness: the quantizer kernel performs exactly the float32 operations of ``core.quant`` in the same order
(``w*s``; group max/min; ``clamp(max-min, 1e-5) / max_int``; ``clamp(-round(min/scale))``;
``clamp(round(ws/scale) + zero)``; ``(q - zero) * scale``; ``/ s``), IEEE division (no reciprocal), round half
to even (``rintf`` in the default rounding mode), no FMA contraction (``-ffp-contract=off``) and no fast-math.
It is tested bit for bit against the torch path. A group holding NaN/inf makes the kernel report failure and
the caller uses the torch path, so the results are identical in every case.

The C sources are ``core/quant_kernels.c`` and ``core/stats_kernels.c`` (shared ``core/awq_kernels.h``).
They are built for one instruction set: ``$AWQ_EXPLORER_ISA`` = ``avx512`` | ``avx2`` | ``neon`` |
``portable`` (default: the best this CPU runs, ``native_isa()``), with matching ``-march`` options;
``portable`` compiles the explicit vector code out (scalar C). Every ISA gives the same bits.

Everything degrades gracefully: no compiler, a failed build, a non-float32 or non-CPU tensor, or
``AWQ_EXPLORER_KERNELS=0`` all mean the plain torch code runs instead (same numbers, slower).
The shared library is cached in ``$AWQ_EXPLORER_KERNEL_DIR`` (default: a per-user folder in the temp dir),
named by the ISA and a hash of the sources, flags, compiler and CPU, so a rebuild happens only when one of
them changes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch

_DIR = Path(__file__).resolve().parent
SOURCES = ("quant_kernels.c", "stats_kernels.c")  # compiled together into one shared library
HEADERS = ("awq_kernels.h",)
ISAS = ("avx512", "avx2", "neon", "portable")
ISA_LABELS = {"avx512": "AVX-512", "avx2": "AVX2", "neon": "NEON", "portable": "portable"}
_ISA_CODE = {"portable": 0, "avx2": 2, "avx512": 3, "neon": 4}  # what awq_kernels_isa() returns for each
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]


def _arch_flags(isa: str) -> tuple[list[str], ...]:
    """Compiler options for one instruction set, tried in order (the first the compiler accepts is used).

    ``-march=native`` only when that ISA is this CPU's best (a native build on an AVX-512 machine would use
    AVX-512 in an "avx2" build); else the x86-64 micro-architecture levels (v3 = AVX2 + FMA, v4 = AVX-512).
    512-bit vectors measured ~20% faster than the compiler's default 256 on AVX-512 machines.
    """
    native = isa == native_isa()
    if isa == "avx512":
        return ((["-march=native", "-mprefer-vector-width=512"],) if native else ()) + (
            ["-march=x86-64-v4", "-mprefer-vector-width=512"], ["-mavx512f", "-mavx512bw", "-mavx512dq",
                                                                 "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512"])
    if isa == "avx2":
        return ((["-march=native"],) if native else ()) + (
            ["-march=x86-64-v3"], ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"])
    if isa == "neon":
        return (["-mcpu=native"], ["-march=native"], [])  # NEON is part of the aarch64 baseline
    return (["-DAWQ_PORTABLE"],)  # scalar C: the vector-extension code is compiled out


def _read_sources() -> str:
    return "\0".join((_DIR / f).read_text() for f in (*HEADERS, *SOURCES))


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags`` / ARM ``Features`` of /proc/cpuinfo, or macOS sysctl)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                               capture_output=True, text=True, timeout=5)
            return {f.lower().replace(".", "_") for f in r.stdout.split()}
        except (OSError, subprocess.SubprocessError):
            pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (``model name`` of /proc/cpuinfo, macOS brand string, or the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if r.stdout.strip():
                return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def native_isa() -> str:
    """The best kernel instruction set this CPU runs: ``avx512``, ``avx2``, ``neon`` or ``portable``."""
    m = platform.machine().lower()
    if m in ("arm64", "aarch64"):
        return "neon"
    if m in ("x86_64", "amd64"):
        f = _cpu_flags()
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= f:
            return "avx512"
        if {"avx2", "fma"} <= f:
            return "avx2"
    return "portable"


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run, best first (always ends with ``portable``)."""
    return {"avx512": ["avx512", "avx2", "portable"], "avx2": ["avx2", "portable"],
            "neon": ["neon", "portable"]}.get(native_isa(), ["portable"])


def _loaded_libgomp() -> str | None:
    """The GNU OpenMP runtime this process already runs torch on (its file), if any.

    The kernels then use the *same* runtime and thread pool as torch: separate pthreads would fight torch's
    spinning OpenMP workers for the cores (measured: each GEMM after a kernel call got ~3 ms slower).
    """
    try:
        if "OpenMP" not in torch.__config__.parallel_info():
            return None
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if os.path.basename(path).startswith("libgomp") and ".so" in path and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def _omp_flags() -> list[list[str]]:
    """Link options for OpenMP against torch's libgomp, or nothing (pthreads fallback inside the C code)."""
    gomp = _loaded_libgomp()
    if not gomp:
        return [[]]
    d = os.path.dirname(gomp)
    return [["-fopenmp", gomp, f"-Wl,-rpath,{d}"], []]


_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}  # by requested ISA; None: tried and failed (see _errors)
_errors: dict[str, str] = {}
_built_isa: dict[str, str] = {}  # requested ISA -> what the library reports it was compiled for
_override: str | None = None  # set_isa()
_error: str | None = None


def _enabled() -> bool:
    return os.environ.get("AWQ_EXPLORER_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def requested_isa() -> str:
    """The ISA to build for: ``set_isa``'s, else ``$AWQ_EXPLORER_ISA``, else ``native_isa()``.

    One the CPU cannot run (e.g. ``avx512`` on an AVX2 machine) or an unknown name gives a warning and the
    native ISA: running such code would crash the process with an illegal instruction.
    """
    want = (_override or os.environ.get("AWQ_EXPLORER_ISA", "")).strip().lower().replace("-", "")
    if not want or want == "native":
        return native_isa()
    if want not in ISAS or want not in supported_isas():
        warnings.warn(f"AWQ_EXPLORER_ISA={want!r} is not one this CPU runs ({', '.join(supported_isas())}); "
                      f"using {native_isa()}", RuntimeWarning, stacklevel=3)
        return native_isa()
    return want


def set_isa(isa: str | None) -> None:
    """Use the kernels built for ``isa`` from now on in this process (``None``: back to the default).

    Each ISA's library is built and loaded once and kept; this only switches which one the calls use.
    """
    global _override
    if isa is not None and isa.strip().lower() not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; choose one of {', '.join(ISAS)}")
    _override = isa.strip().lower() if isa is not None else None


def _cpu_tag() -> str:
    return hashlib.sha256(" ".join(sorted(_cpu_flags())).encode()).hexdigest()[:12]


def _build_dir() -> Path:
    d = os.environ.get("AWQ_EXPLORER_KERNEL_DIR")
    if d:
        return Path(d).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"awq-explorer-kernels-{uid}"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _compile(cc: str, isa: str, d: Path, so: Path, omp: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".awq_kernels_", suffix=".so", dir=d)
    os.close(fd)
    err = ""
    try:
        for omp_flags in (_omp_flags() if omp else [[]]):
            for arch in _arch_flags(isa):
                r = subprocess.run([cc, *_FLAGS, *arch, f"-I{_DIR}", "-o", tmp, *(str(_DIR / f) for f in SOURCES),
                                    *omp_flags, "-lm"], capture_output=True, text=True, timeout=180)
                if r.returncode == 0:
                    os.replace(tmp, so)  # atomic: concurrent builders each rename a complete file
                    return
                err = r.stderr.strip()[:300]
        raise RuntimeError(f"{cc} failed: {err}")
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _open(isa: str) -> ctypes.CDLL:
    """Build (if not cached) and load the library for ``isa``; its file name hashes sources, flags, compiler, CPU."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) found")
    tag = hashlib.sha256("\0".join([_read_sources(), cc, *_FLAGS, repr(_arch_flags(isa)), repr(_omp_flags()),
                                     _cpu_tag(), platform.machine(), isa]).encode()).hexdigest()[:16]
    d = _build_dir()
    so = d / f"awq_kernels_{isa}_{tag}.so"
    if not so.exists():
        _compile(cc, isa, d, so)
    try:
        lib = ctypes.CDLL(str(so))
    except OSError:  # e.g. built against a runtime this process cannot load: rebuild without OpenMP
        so = d / f"awq_kernels_{isa}_{tag}_noomp.so"
        if not so.exists():
            _compile(cc, isa, d, so, omp=False)
        lib = ctypes.CDLL(str(so))
    i64, f_p, d_p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
    lib.awq_fake_quant.argtypes = [f_p, f_p, f_p, f_p, i64, i64, i64, i64, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_int]
    lib.awq_fake_quant.restype = ctypes.c_int
    lib.awq_row_sq_sums.argtypes = [f_p, d_p, i64, i64, ctypes.c_int]
    lib.awq_row_sq_sums.restype = None
    lib.awq_channel_stats.argtypes = [f_p] * 10 + [i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.awq_channel_stats.restype = i64
    lib.awq_kernels_isa.argtypes = []
    lib.awq_kernels_isa.restype = ctypes.c_int
    code = lib.awq_kernels_isa()
    _built_isa[isa] = {v: k for k, v in _ISA_CODE.items()}.get(code, "vector")
    return lib


def _load() -> ctypes.CDLL | None:
    global _error
    isa = _override or "default"
    lib = _libs.get(isa, False)
    if lib is not False:
        return lib
    with _lock:
        lib = _libs.get(isa, False)
        if lib is not False:
            return lib
        if not _enabled():
            _error = "disabled by AWQ_EXPLORER_KERNELS=0"
            _libs[isa] = None
            return None
        want = requested_isa()
        try:
            lib = _open(want)
            _built_isa[isa] = _built_isa[want]
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
            _error = _errors[isa] = f"{type(e).__name__}: {e}"
            warnings.warn(f"AWQ Explorer: fused CPU kernels ({want}) unavailable, using plain torch ({_error})",
                          RuntimeWarning, stacklevel=3)
            lib = None
        _libs[isa] = lib
        return lib


def isa() -> str | None:
    """The instruction set the kernels in use were compiled for (``avx512`` ... ``portable``), or ``None``
    when they are unavailable (torch fallback). Builds them on first call."""
    return _built_isa.get(_override or "default") if _load() is not None else None


def isa_label() -> str:
    """``isa()`` for people: "AVX-512", "AVX2", "NEON", "portable" or "torch fallback"."""
    i = isa()
    return ISA_LABELS.get(i, i) if i else "torch fallback"


def available() -> bool:
    """Whether the fused kernels are built and enabled (builds them on first call)."""
    return _load() is not None


def status() -> str:
    return f"fused C kernels ({isa_label()})" if available() else f"torch fallback ({_error})"


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ok(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def fake_quant(
    w: torch.Tensor,
    scales: torch.Tensor | None,
    bits: int | Sequence[int],
    g: int,
    zero_point: bool,
    *,
    w_hat: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
) -> bool:
    """Write ``Q(W*s)/s`` into ``w_hat`` and/or ``Q(W*s)/s - W`` into ``dw``.

    ``w [out, in]``; ``scales [A, in]`` or ``None`` (plain ``Q(W)``, A = 1); ``bits`` one bit-width or several
    (the group max/min of ``W*s`` is then found once for all of them). Outputs are ``[A, len(bits), out, in]``
    (any shape with that many elements). Returns ``False`` (outputs undefined) when the kernels are
    unavailable, a tensor is not contiguous CPU float32, or a group holds NaN/inf: the caller then uses the
    torch path.
    """
    lib = _load()
    if lib is None or w.dim() != 2 or not (_ok(w) and _ok(scales) and _ok(w_hat) and _ok(dw)):
        return False
    if w_hat is None and dw is None:
        return True
    bits = [int(bits)] if isinstance(bits, int) else [int(b) for b in bits]
    if not bits or any(not 2 <= b <= 8 for b in bits):
        return False
    out_f, in_f = w.shape
    a = 1 if scales is None else scales.shape[0]
    if scales is not None and (scales.dim() != 2 or scales.shape[1] != in_f):
        return False
    for t in (w_hat, dw):
        if t is not None and t.numel() != a * len(bits) * out_f * in_f:
            return False
    if g <= 0 or in_f % g:
        return False
    nb = (ctypes.c_int * len(bits))(*bits)
    rc = lib.awq_fake_quant(w.data_ptr(), scales.data_ptr() if scales is not None else None,
                            w_hat.data_ptr() if w_hat is not None else None, dw.data_ptr() if dw is not None else None,
                            a, out_f, in_f, g, ctypes.cast(nb, ctypes.c_void_p), len(bits), int(bool(zero_point)),
                            _threads())
    return rc == 0


def row_sq_sums(y: torch.Tensor) -> torch.Tensor:
    """Float64 ``sum(y[r]**2)`` for each row of a 2-D float32 tensor (squares taken in float64)."""
    lib = _load()
    if lib is None or y.dim() != 2 or not _ok(y):
        return y.double().pow(2).sum(1)
    out = torch.empty(y.shape[0], dtype=torch.float64)
    lib.awq_row_sq_sums(y.data_ptr(), out.data_ptr(), y.shape[0], y.shape[1], _threads())
    return out


def channel_stats_update(
    x: torch.Tensor, shift: torch.Tensor, max_abs: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, filled: int,
    first: bool = False,
) -> tuple[torch.Tensor, int] | None:
    """One pass over a batch ``x [T, C]`` for ``core.collect.ChannelAccumulator``.

    Returns ``(sums [5, C] float64: sum d, d^2, d^3, d^4 with d = x - shift (powers in float32), sum |x|;
    new fill count)``; updates ``max_abs [C]`` and the extremes ``hi`` / ``lo [C, k]`` (each row's first
    ``fill count`` entries: the k largest values of x / of -x seen so far, in no order) in place. With
    ``first`` the kernel picks the shift (a sample mean) and writes it into ``shift``. ``None`` when the
    kernels are unavailable (nothing changed); ``MemoryError`` if the kernel could not allocate its buffers.
    """
    lib = _load()
    if lib is None or x.dim() != 2 or not all(_ok(t) for t in (x, shift, max_abs, hi, lo)):
        return None
    t_, c_ = x.shape
    k = hi.shape[1]
    sums = torch.empty(5, c_, dtype=torch.float64)
    p = [sums[i].data_ptr() for i in range(5)]
    f = lib.awq_channel_stats(x.data_ptr(), shift.data_ptr(), *p, max_abs.data_ptr(), hi.data_ptr(), lo.data_ptr(),
                              t_, c_, k, int(filled), int(bool(first)), _threads())
    if f < 0:
        raise MemoryError("channel statistics kernel: out of memory")
    return sums, int(f)
