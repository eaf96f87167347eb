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

Everything degrades gracefully: no compiler, a failed build, a non-float32 or non-CPU tensor, or
``AWQ_EXPLORER_KERNELS=0`` all mean the plain torch code runs instead (same numbers, slower).
The shared library is cached in ``$AWQ_EXPLORER_KERNEL_DIR`` (default: a per-user folder in the temp dir),
named by a hash of the source, flags and CPU, so a rebuild happens only when one of them changes.
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

_SRC = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>

#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAXT 64
#define VW 16
/* portable GCC/clang vector extensions: the compiler maps them onto AVX-512, AVX2, SSE or NEON */
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
static inline vf vsplat(float x) { vf v; for (int i = 0; i < VW; i++) v[i] = x; return v; }
/* m ? a : b, lane by lane (m is a comparison result: all ones or all zeros) */
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi vsplat_i(int32_t x) { vi v; for (int i = 0; i < VW; i++) v[i] = x; return v; }
static inline vf vabs(vf a) { return (vf)((vi)a & vsplat_i(0x7fffffff)); }

/* ------------------------------------------------------------------------------------------------ */
/* fake quantization                                                                                */
/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    const float *w; const float *s; float *what; float *dw; const int *nbits;
    int64_t out, in, g, r0, r1; int nb, zp; int bad;
} fq_job;

static inline float clampf_(float x, float lo, float hi) {
    /* torch.clamp on finite values: max with lo, then min with hi (the sign of a zero result does not
       reach the output, see the module docstring of core/kernels.py) */
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

/* One quantization group of g weights at one bit-width: scale and zero from the group's (max, min) of w*s
   (or max |w*s| when symmetric), then the exact torch op sequence per element. */
static inline void fq_group(const float *restrict wp, const float *restrict sp, float *restrict hp,
                            float *restrict dp, int64_t g, float M, float m, int nbit, int zp) {
    const float maxint = zp ? (float)((1 << nbit) - 1) : (float)((1 << (nbit - 1)) - 1);
    const float minint = zp ? 0.0f : -(float)(1 << (nbit - 1));
    float scale, zero;
    if (zp) {
        float d = M - m;
        d = d < 1e-5f ? 1e-5f : d;
        scale = d / maxint;
        zero = clampf_(-rintf(m / scale), 0.0f, maxint);
    } else {
        float d = M < 1e-5f ? 1e-5f : M;
        scale = d / maxint;
        zero = 0.0f;
    }
    if (sp) {
        if (dp && hp) {
            for (int64_t jj = 0; jj < g; jj++) {
                float q = clampf_(rintf((wp[jj] * sp[jj]) / scale) + zero, minint, maxint);
                q = ((q - zero) * scale) / sp[jj];
                hp[jj] = q; dp[jj] = q - wp[jj];
            }
        } else if (dp) {
            for (int64_t jj = 0; jj < g; jj++) {
                float q = clampf_(rintf((wp[jj] * sp[jj]) / scale) + zero, minint, maxint);
                dp[jj] = ((q - zero) * scale) / sp[jj] - wp[jj];
            }
        } else {
            for (int64_t jj = 0; jj < g; jj++) {
                float q = clampf_(rintf((wp[jj] * sp[jj]) / scale) + zero, minint, maxint);
                hp[jj] = ((q - zero) * scale) / sp[jj];
            }
        }
    } else {
        if (dp && hp) {
            for (int64_t jj = 0; jj < g; jj++) {
                float q = clampf_(rintf(wp[jj] / scale) + zero, minint, maxint);
                q = (q - zero) * scale;
                hp[jj] = q; dp[jj] = q - wp[jj];
            }
        } else if (dp) {
            for (int64_t jj = 0; jj < g; jj++) {
                float q = clampf_(rintf(wp[jj] / scale) + zero, minint, maxint);
                dp[jj] = (q - zero) * scale - wp[jj];
            }
        } else {
            for (int64_t jj = 0; jj < g; jj++) {
                float q = clampf_(rintf(wp[jj] / scale) + zero, minint, maxint);
                hp[jj] = (q - zero) * scale;
            }
        }
    }
}

/* rows (a, r) in [r0, r1) of A * out; every bit-width in nbits[0..nb) for each; output row index
   ((a * nb + b) * out + r). */
static void fq_range(fq_job *j) {
    const int64_t in = j->in, g = j->g, ng = in / g, out = j->out;
    const int zp = j->zp, nb = j->nb;
    for (int64_t R = j->r0; R < j->r1; R++) {
        const int64_t a = R / out, r = R % out;
        const float *wr = j->w + r * in;
        const float *sr = j->s ? j->s + a * in : 0;
        for (int64_t k = 0; k < ng; k++) {
            const float *wp = wr + k * g;
            const float *sp = sr ? sr + k * g : 0;
            vf vmx = vsplat(-INFINITY), vmn = vsplat(INFINITY), vsum = vsplat(0.0f);
            float M = -INFINITY, m = INFINITY, c = 0.0f;
            int64_t jj = 0;
            for (; jj + VW <= g; jj += VW) {
                vf v; memcpy(&v, wp + jj, sizeof v);
                if (sp) { vf sv; memcpy(&sv, sp + jj, sizeof sv); v = v * sv; }
                vsum += v;  /* non-finite iff a NaN/inf is in the group (or, harmlessly, on overflow) */
                if (!zp) v = vabs(v);
                vmx = vsel(v > vmx, v, vmx);
                if (zp) vmn = vsel(v < vmn, v, vmn);
            }
            for (; jj < g; jj++) {
                float v = sp ? wp[jj] * sp[jj] : wp[jj];
                c += v;
                if (!zp) v = fabsf(v);
                M = v > M ? v : M;
                if (zp) m = v < m ? v : m;
            }
            for (int i = 0; i < VW; i++) {
                M = vmx[i] > M ? vmx[i] : M; m = vmn[i] < m ? vmn[i] : m; c += vsum[i];
            }
            if (!isfinite(c)) { j->bad = 1; return; }  /* NaN or inf in this group: the caller uses torch */
            for (int b = 0; b < nb; b++) {
                const int64_t orow = (a * nb + b) * out + r;
                float *hp = j->what ? j->what + orow * in + k * g : 0;
                float *dp = j->dw ? j->dw + orow * in + k * g : 0;
                fq_group(wp, sp, hp, dp, g, M, m, j->nbits[b], zp);
            }
        }
    }
}

static void *fq_thread(void *p) { fq_range((fq_job *)p); return 0; }

/* s is [A, in] or NULL (A == 1); what / dw are [A, nb, out, in] or NULL, nbits[0..nb) the bit-widths.
   Returns 0 on success, 1 if a group held NaN/inf (outputs incomplete). */
int awq_fake_quant(const float *w, const float *s, float *what, float *dw, int64_t A, int64_t out, int64_t in,
                   int64_t g, const int *nbits, int nb, int zp, int nthreads) {
    int64_t rows = A * out;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if ((int64_t)nthreads > rows) nthreads = (int)rows;
    int bad = 0;
#ifdef _OPENMP
    /* torch's own OpenMP runtime (the same libgomp): its worker threads are already spinning */
    #pragma omp parallel num_threads(nthreads) reduction(max:bad)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        fq_job job = {w, s, what, dw, nbits, out, in, g, rows * t / nt, rows * (t + 1) / nt, nb, zp, 0};
        fq_range(&job);
        bad = job.bad;
    }
#else
    fq_job jobs[MAXT];
    pthread_t th[MAXT];
    int started[MAXT];
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (fq_job){w, s, what, dw, nbits, out, in, g, rows * t / nthreads, rows * (t + 1) / nthreads, nb, zp, 0};
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&th[t], 0, fq_thread, &jobs[t]) == 0;
    for (int t = 1; t < nthreads; t++) if (!started[t]) fq_range(&jobs[t]);
    fq_range(&jobs[0]);
    bad = jobs[0].bad;
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(th[t], 0);
        if (jobs[t].bad > bad) bad = jobs[t].bad;
    }
#endif
    return bad;
}

/* ------------------------------------------------------------------------------------------------ */
/* sum of squares of each row of y [rows, cols] in float64 (fixed order: independent of threads)    */
/* ------------------------------------------------------------------------------------------------ */
typedef struct { const float *y; double *out; int64_t cols, r0, r1; } ss_job;

static void ss_range(ss_job *j) {
    for (int64_t r = j->r0; r < j->r1; r++) {
        const float *p = j->y + r * j->cols;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 8 <= j->cols; c += 8)
            for (int i = 0; i < 8; i++) { double v = (double)p[c + i]; acc[i] += v * v; }
        for (; c < j->cols; c++) { double v = (double)p[c]; acc[0] += v * v; }
        j->out[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

static void *ss_thread(void *p) { ss_range((ss_job *)p); return 0; }

void awq_row_sq_sums(const float *y, double *out, int64_t rows, int64_t cols, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if ((int64_t)nthreads > rows) nthreads = rows > 0 ? (int)rows : 1;
#ifdef _OPENMP
    #pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        ss_job job = {y, out, cols, rows * t / nt, rows * (t + 1) / nt};
        ss_range(&job);
    }
#else
    ss_job jobs[MAXT]; pthread_t th[MAXT]; int started[MAXT];
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (ss_job){y, out, cols, rows * t / nthreads, rows * (t + 1) / nthreads};
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&th[t], 0, ss_thread, &jobs[t]) == 0;
    for (int t = 1; t < nthreads; t++) if (!started[t]) ss_range(&jobs[t]);
    ss_range(&jobs[0]);
    for (int t = 1; t < nthreads; t++) if (started[t]) pthread_join(th[t], 0);
#endif
}
"""

_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
# tried in order: the first set the compiler accepts is used (512-bit vectors measured ~20% faster here)
_ARCH_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])


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
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def _enabled() -> bool:
    return os.environ.get("AWQ_EXPLORER_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_tag() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def _compile(cc: str, d: Path, so: Path, omp: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    fd, src = tempfile.mkstemp(prefix=".awq_fused_", suffix=".c", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(_SRC)
    tmp = src[:-2] + ".so"
    err = ""
    try:
        for omp_flags in (_omp_flags() if omp else [[]]):
            for arch in _ARCH_FLAGS:
                r = subprocess.run([cc, *_FLAGS, *arch, "-o", tmp, src, *omp_flags, "-lm"], capture_output=True, text=True,
                                   timeout=120)
                if r.returncode == 0:
                    os.replace(tmp, so)  # atomic: concurrent builders each rename a complete file
                    return
                err = r.stderr.strip()[:300]
        raise RuntimeError(f"{cc} failed: {err}")
    finally:
        for p in (src, tmp):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _error
    if _lib is not None or _tried:
        return _lib
    with _lock:
        if _lib is not None or _tried:
            return _lib
        _tried = True
        if not _enabled():
            _error = "disabled by AWQ_EXPLORER_KERNELS=0"
            return None
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler (cc/gcc/clang) found")
            tag = hashlib.sha256("\0".join([_SRC, cc, *_FLAGS, repr(_ARCH_FLAGS), repr(_omp_flags()), _cpu_tag(),
                                             platform.machine()]).encode()).hexdigest()[:16]
            d = _build_dir()
            so = d / f"awq_fused_{tag}.so"
            if not so.exists():
                _compile(cc, d, so)
            try:
                lib = ctypes.CDLL(str(so))
            except OSError:  # e.g. built against a runtime this process cannot load: rebuild without OpenMP
                so = d / f"awq_fused_{tag}_noomp.so"
                if not so.exists():
                    _compile(cc, d, so, omp=False)
                lib = ctypes.CDLL(str(so))
            i64, f_p, d_p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
            lib.awq_fake_quant.argtypes = [f_p, f_p, f_p, f_p, i64, i64, i64, i64, ctypes.c_void_p, ctypes.c_int,
                                           ctypes.c_int, ctypes.c_int]
            lib.awq_fake_quant.restype = ctypes.c_int
            lib.awq_row_sq_sums.argtypes = [f_p, d_p, i64, i64, ctypes.c_int]
            lib.awq_row_sq_sums.restype = None
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
            _error = f"{type(e).__name__}: {e}"
            warnings.warn(f"AWQ Explorer: fused CPU kernels unavailable, using plain torch ({_error})", RuntimeWarning,
                          stacklevel=3)
            _lib = None
        return _lib


def available() -> bool:
    """Whether the fused kernels are built and enabled (builds them on first call)."""
    return _load() is not None


def status() -> str:
    return "fused C kernels" if available() else f"torch fallback ({_error})"


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ok(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def fake_quant(
    w: torch.Tensor,
    scales: torch.Tensor | None,
    n_bit: int | Sequence[int],
    g: int,
    zero_point: bool,
    *,
    w_hat: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
) -> bool:
    """Write ``Q(W*s)/s`` into ``w_hat`` and/or ``Q(W*s)/s - W`` into ``dw``.

    ``w [out, in]``; ``scales [A, in]`` or ``None`` (plain ``Q(W)``, A = 1); ``n_bit`` one bit-width or several
    (the group max/min of ``W*s`` is then found once for all of them). Outputs are ``[A, len(n_bit), out, in]``
    (any shape with that many elements). Returns ``False`` (outputs undefined) when the kernels are
    unavailable, a tensor is not contiguous CPU float32, or a group holds NaN/inf: the caller then uses the
    torch path.
    """
    lib = _load()
    if lib is None or w.dim() != 2 or not (_ok(w) and _ok(scales) and _ok(w_hat) and _ok(dw)):
        return False
    if w_hat is None and dw is None:
        return True
    bits = [int(n_bit)] if isinstance(n_bit, int) else [int(b) for b in n_bit]
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
