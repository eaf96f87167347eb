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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAXT 64
#define VW 16
/* portable GCC/clang vector extensions: the compiler maps them onto AVX-512, AVX2, SSE or NEON */
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
static inline vf vsplat(float x) { vf v; for (int i = 0; i < VW; i++) v[i] = x; return v; }
/* m ? a : b, lane by lane (m is a comparison result: all ones or all zeros) */
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
/* lane i <- lane i + VW/2 (etc.): steps of a reduction tree */
static inline vf vhalf(vf v) { return __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}); }
static inline vf vquart(vf v) { return __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}); }
static inline vf veighth(vf v) { return __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}); }
static inline vf vsixt(vf v) { return __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}); }
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
            /* horizontal reductions as shuffle trees (a finite group's max/min do not depend on the order) */
            vmx = vsel(vhalf(vmx) > vmx, vhalf(vmx), vmx); vmn = vsel(vhalf(vmn) < vmn, vhalf(vmn), vmn);
            vmx = vsel(vquart(vmx) > vmx, vquart(vmx), vmx); vmn = vsel(vquart(vmn) < vmn, vquart(vmn), vmn);
            vmx = vsel(veighth(vmx) > vmx, veighth(vmx), vmx); vmn = vsel(veighth(vmn) < vmn, veighth(vmn), vmn);
            vmx = vsel(vsixt(vmx) > vmx, vsixt(vmx), vmx); vmn = vsel(vsixt(vmn) < vmn, vsixt(vmn), vmn);
            M = vmx[0] > M ? vmx[0] : M; m = vmn[0] < m ? vmn[0] : m;
            vsum += vhalf(vsum); vsum += vquart(vsum); vsum += veighth(vsum); vsum += vsixt(vsum);
            c += vsum[0];
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
    /* chunks of rows handed out dynamically: a thread the OS descheduled (shared machine) does not hold up
       the others */
    const int64_t nchunks = rows < 64 * (int64_t)nthreads ? rows : 64 * (int64_t)nthreads;
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(max:bad)
    for (int64_t ch = 0; ch < nchunks; ch++) {
        fq_job job = {w, s, what, dw, nbits, out, in, g, rows * ch / nchunks, rows * (ch + 1) / nchunks, nb, zp, 0};
        fq_range(&job);
        if (job.bad > bad) bad = job.bad;
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
    const int64_t nchunks = rows < 16 * (int64_t)nthreads ? rows : 16 * (int64_t)nthreads;
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t ch = 0; ch < nchunks; ch++) {
        ss_job job = {y, out, cols, rows * ch / nchunks, rows * (ch + 1) / nchunks};
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

/* ------------------------------------------------------------------------------------------------ */
/* streaming per-channel statistics of x [T, C] (row-major): one pass per batch                       */
/* ------------------------------------------------------------------------------------------------ */
/* Reorder a[0..n) so that a[0..k) holds the k largest values (1 <= k <= n); returns the k-th largest.
   tmp: room for 2n floats. Quickselect; with AVX-512 each partition step moves 16 values with compress
   stores (no data-dependent branches), else Hoare partitioning. Terminates for any input (NaN included:
   it then only has to return something, the caller raises on non-finite statistics). */
static float select_top(float *a, int64_t n, int64_t k, float *tmp) {
    int64_t lo = 0, hi = n;
    const int64_t want = k - 1;
#if defined(__AVX512F__)
    float *tg = tmp, *tl = tmp + n;
    while (hi - lo > 16) {
        float x = a[lo], y = a[(lo + hi) / 2], z = a[hi - 1], pivot;  /* median of three */
        if (x < y) { float t = x; x = y; y = t; }
        if (y < z) { y = z; if (x < y) y = x; }
        pivot = y;
        const __m512 pv = _mm512_set1_ps(pivot);
        int64_t ng = 0, nl = 0;
        for (int64_t i = lo; i < hi; i += 16) {
            const int64_t left = hi - i;
            const __mmask16 tail = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_maskz_loadu_ps(tail, a + i);
            __mmask16 g = _mm512_mask_cmp_ps_mask(tail, v, pv, _CMP_GT_OQ);
            __mmask16 l = tail & (__mmask16)~g;
            _mm512_mask_compressstoreu_ps(tg + ng, g, v); ng += __builtin_popcount(g);
            _mm512_mask_compressstoreu_ps(tl + nl, l, v); nl += __builtin_popcount(l);
        }
        memcpy(a + lo, tg, sizeof(float) * (size_t)ng);
        memcpy(a + lo + ng, tl, sizeof(float) * (size_t)nl);
        const int64_t m = lo + ng;  /* a[lo..m) > pivot >= a[m..hi) (NaN goes right) */
        if (want < m) { hi = m; continue; }
        if (ng > 0) { lo = m; continue; }
        /* the pivot is the range's maximum: split off the values equal to it */
        int64_t ne = 0;
        nl = 0;
        for (int64_t i = m; i < hi; i += 16) {
            const int64_t left = hi - i;
            const __mmask16 tail = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_maskz_loadu_ps(tail, a + i);
            __mmask16 e = _mm512_mask_cmp_ps_mask(tail, v, pv, _CMP_EQ_OQ);
            __mmask16 l = tail & (__mmask16)~e;
            _mm512_mask_compressstoreu_ps(tg + ne, e, v); ne += __builtin_popcount(e);
            _mm512_mask_compressstoreu_ps(tl + nl, l, v); nl += __builtin_popcount(l);
        }
        memcpy(a + m, tg, sizeof(float) * (size_t)ne);
        memcpy(a + m + ne, tl, sizeof(float) * (size_t)nl);
        if (want < m + ne || ne == 0) return a[want];  /* (ne == 0: a NaN pivot; the caller raises) */
        lo = m + ne;
    }
    /* a short range: insertion sort, descending */
    for (int64_t i = lo + 1; i < hi; i++) {
        float v = a[i];
        int64_t j = i - 1;
        while (j >= lo && a[j] < v) { a[j + 1] = a[j]; j--; }
        a[j + 1] = v;
    }
    return a[want];
#else
    (void)tmp;
    int64_t l0 = 0, h0 = n - 1;
    while (l0 < h0) {
        float x = a[l0], y = a[(l0 + h0) / 2], z = a[h0], pivot;
        if (x < y) { float t = x; x = y; y = t; }
        if (y < z) { y = z; if (x < y) y = x; }
        pivot = y;
        int64_t i = l0, j = h0;
        while (i <= j) {
            while (i <= h0 && a[i] > pivot) i++;
            while (j >= l0 && a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) h0 = j;
        else if (want >= i) l0 = i;
        else break;
    }
    (void)lo; (void)hi;
    float mn = a[0];
    for (int64_t i = 1; i < k; i++) mn = a[i] < mn ? a[i] : mn;
    return mn;
#endif
}

static inline void cs_row1(const float *restrict xr, int64_t nc, const float *restrict sh, double *restrict a1,
                           double *restrict a2, double *restrict a3, double *restrict a4, double *restrict aa,
                           float *restrict mx) {
    for (int64_t c = 0; c < nc; c++) {
        float v = xr[c];
        float d = v - sh[c];
        float d2 = d * d;
        a1[c] += (double)d;
        a2[c] += (double)d2;
        a3[c] += (double)(d2 * d);
        a4[c] += (double)(d2 * d2);
        float av = fabsf(v);
        aa[c] += (double)av;
        mx[c] = av > mx[c] ? av : mx[c];
    }
}

/* four rows at once: each accumulator is loaded and stored once per four values, added in row order */
static inline void cs_row4(const float *restrict x0, int64_t C, int64_t nc, const float *restrict sh,
                           double *restrict a1, double *restrict a2, double *restrict a3, double *restrict a4,
                           double *restrict aa, float *restrict mx) {
    const float *restrict x1 = x0 + C, *restrict x2 = x1 + C, *restrict x3 = x2 + C;
    for (int64_t c = 0; c < nc; c++) {
        float s = sh[c];
        float d0 = x0[c] - s, d1 = x1[c] - s, e2 = x2[c] - s, d3 = x3[c] - s;
        float q0 = d0 * d0, q1 = d1 * d1, q2 = e2 * e2, q3 = d3 * d3;
        a1[c] = (((a1[c] + (double)d0) + (double)d1) + (double)e2) + (double)d3;
        a2[c] = (((a2[c] + (double)q0) + (double)q1) + (double)q2) + (double)q3;
        a3[c] = (((a3[c] + (double)(q0 * d0)) + (double)(q1 * d1)) + (double)(q2 * e2)) + (double)(q3 * d3);
        a4[c] = (((a4[c] + (double)(q0 * q0)) + (double)(q1 * q1)) + (double)(q2 * q2)) + (double)(q3 * q3);
        float b0 = fabsf(x0[c]), b1 = fabsf(x1[c]), b2 = fabsf(x2[c]), b3 = fabsf(x3[c]);
        aa[c] = (((aa[c] + (double)b0) + (double)b1) + (double)b2) + (double)b3;
        float m = mx[c];
        m = b0 > m ? b0 : m; m = b1 > m ? b1 : m; m = b2 > m ? b2 : m; m = b3 > m ? b3 : m;
        mx[c] = m;
    }
}

/* Extremes of one channel tile. Per channel and side (hi: values of x, lo: values of -x) a work buffer of
   2k values and a threshold: a value at or beyond the threshold is appended; a full buffer is cut back to
   its k largest (quickselect) and the threshold becomes the k-th largest. The tile is small enough for
   the buffers to stay in L2, so an append is a few ns. */
typedef struct {
    float *buf; int64_t *cnt; float *thr; uint8_t *cut; int64_t k; float *tmp;
} side_t;

static inline void side_add(side_t *sd, int64_t c, float v) {
    const int64_t k2 = 2 * sd->k;
    float *h = sd->buf + c * k2;
    h[sd->cnt[c]++] = v;
    if (sd->cnt[c] == k2) { sd->thr[c] = select_top(h, k2, sd->k, sd->tmp); sd->cnt[c] = sd->k; sd->cut[c] = 1; }
}

/* One row segment: vector compares against the thresholds; the candidates of the row are first gathered with
   compress stores (no data-dependent branches), then appended. `lv`/`lc`: room for 2 * nc + 32 entries. */
static inline void cs_scan_row(const float *restrict xq, int64_t nc, side_t *hs, side_t *ls, float *lv, int32_t *lc) {
    const float *thi = hs->thr, *tlo = ls->thr;  /* tlo: thresholds of -x */
    int64_t c = 0, nh = 0, nl = 0;
    float *lvl = lv + nc + 16;
    int32_t *lcl = lc + nc + 16;
#if defined(__AVX512F__)
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; c + 16 <= nc; c += 16) {
        __m512 v = _mm512_loadu_ps(xq + c), nv = _mm512_xor_ps(v, sign);
        __mmask16 mh = _mm512_cmp_ps_mask(v, _mm512_loadu_ps(thi + c), _CMP_GE_OQ);
        __mmask16 ml = _mm512_cmp_ps_mask(nv, _mm512_loadu_ps(tlo + c), _CMP_GE_OQ);
        __m512i ci = _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)c));
        _mm512_mask_compressstoreu_ps(lv + nh, mh, v);
        _mm512_mask_compressstoreu_epi32(lc + nh, mh, ci);
        nh += __builtin_popcount(mh);
        _mm512_mask_compressstoreu_ps(lvl + nl, ml, nv);
        _mm512_mask_compressstoreu_epi32(lcl + nl, ml, ci);
        nl += __builtin_popcount(ml);
    }
#endif
    for (; c < nc; c++) {
        float v = xq[c];
        if (v >= thi[c]) { lv[nh] = v; lc[nh++] = (int32_t)c; }
        if (-v >= tlo[c]) { lvl[nl] = -v; lcl[nl++] = (int32_t)c; }
    }
    for (int64_t i = 0; i < nh; i++) side_add(hs, lc[i], lv[i]);
    for (int64_t i = 0; i < nl; i++) side_add(ls, lcl[i], lvl[i]);
}

typedef struct {
    const float *x; float *shift; double *s1, *s2, *s3, *s4, *sabs; float *maxabs;
    float *hi, *lo; int64_t T, C, k, filled; int first;
} cs_args;

#define TILE 512   /* channels per tile: accumulators in L1, extreme buffers (2 x 2k per channel) in L2 */
#define SAMPLE 256 /* rows sampled for first-batch thresholds */

/* One tile of channels [c0, c0 + nc) over all T rows.
   Thresholds: with k values held already (later batches) the k-th largest so far; in the first batch,
   from a row sample (the order statistic that ~3k of the batch's values should reach), and with fewer
   than 2k values in all simply everything. Exactness: afterwards each channel holds the earlier values and
   every value of the batch at or beyond its threshold; when that includes k values at or beyond the
   threshold (or a cut happened, which needs 2k values), the k largest are among them. A channel/side that
   falls short gets one more pass over the batch that keeps the rest of its values. */
static int cs_tile(const cs_args *A, int64_t c0, int64_t nc, double *acc, float *fl, int64_t *cnts, uint8_t *cuts,
                   float *wb, float *smp, float *tmp, float *lv, int32_t *lc) {
    const int64_t T = A->T, C = A->C, k = A->k, k2 = 2 * k, filled = A->filled;
    double *a1 = acc, *a2 = acc + TILE, *a3 = acc + 2 * TILE, *a4 = acc + 3 * TILE, *aa = acc + 4 * TILE;
    float *mx = fl, *sh = fl + TILE, *thi = fl + 2 * TILE, *tlo = fl + 3 * TILE, *ohi = fl + 4 * TILE,
          *olo = fl + 5 * TILE;
    side_t hs = {wb, cnts, thi, cuts, k, tmp}, ls = {wb + TILE * k2, cnts + TILE, tlo, cuts + TILE, k, tmp};
    for (int64_t c = 0; c < nc; c++) {
        a1[c] = a2[c] = a3[c] = a4[c] = aa[c] = 0.0;
        mx[c] = A->maxabs[c0 + c];
        cnts[c] = cnts[TILE + c] = filled < k ? filled : k;
        cuts[c] = cuts[TILE + c] = 0;
        memcpy(hs.buf + c * k2, A->hi + (c0 + c) * k, sizeof(float) * (size_t)cnts[c]);
        memcpy(ls.buf + c * k2, A->lo + (c0 + c) * k, sizeof(float) * (size_t)cnts[c]);
    }
    const int steady = filled >= k, keep_all = !steady && filled + T <= k2;
    const int64_t S = T < SAMPLE ? T : SAMPLE;
    if (A->first || (!steady && !keep_all)) {
        /* the sample, transposed to [channel][row] in blocks of 16 channels; rows spread over the batch with a
           jitter, so they do not line up with sequence starts */
        const int64_t step = T / S;
        for (int64_t cc = 0; cc < nc; cc += 16) {
            const int64_t ce = cc + 16 < nc ? cc + 16 : nc;
            for (int64_t i = 0; i < S; i++) {
                const int64_t row = i * T / S + (step > 1 ? (i * 7919) % step : 0);
                const float *xr = A->x + row * C + c0;
                for (int64_t c = cc; c < ce; c++) smp[c * S + i] = xr[c];
            }
        }
        if (A->first)  /* shift of the first batch: the sample mean (any value near the mean keeps d accurate) */
            for (int64_t c = 0; c < nc; c++) {
                double m = 0.0;
                for (int64_t i = 0; i < S; i++) m += smp[c * S + i];
                A->shift[c0 + c] = (float)(m / (double)S);
            }
    }
    for (int64_t c = 0; c < nc; c++) sh[c] = A->shift[c0 + c];
    if (steady)
        for (int64_t c = 0; c < nc; c++) {
            float m = hs.buf[c * k2], n = ls.buf[c * k2];
            for (int64_t i = 1; i < k; i++) {
                m = hs.buf[c * k2 + i] < m ? hs.buf[c * k2 + i] : m;
                n = ls.buf[c * k2 + i] < n ? ls.buf[c * k2 + i] : n;
            }
            thi[c] = m; tlo[c] = n;
        }
    else if (keep_all)
        for (int64_t c = 0; c < nc; c++) thi[c] = tlo[c] = -INFINITY;
    else {
        int64_t q = (3 * k * S + T - 1) / T;
        if (q < 1) q = 1;
        if (q > S) q = S;
        for (int64_t c = 0; c < nc; c++) {
            float *p = smp + c * S;
            thi[c] = select_top(p, S, q, tmp);
            for (int64_t i = 0; i < S; i++) p[i] = -p[i];
            tlo[c] = select_top(p, S, q, tmp);
        }
    }
    for (int64_t c = 0; c < nc; c++) { ohi[c] = thi[c]; olo[c] = tlo[c]; }
    /* the pass: statistics and extremes */
    for (int64_t t = 0; t < T;) {
        const int64_t nr = (T - t) >= 4 ? 4 : 1;
        const float *xr = A->x + t * C + c0;
        if (nr == 4) cs_row4(xr, C, nc, sh, a1, a2, a3, a4, aa, mx);
        else cs_row1(xr, nc, sh, a1, a2, a3, a4, aa, mx);
        for (int64_t r = 0; r < nr; r++) cs_scan_row(xr + r * C, nc, &hs, &ls, lv, lc);
        t += nr;
    }
    if (!steady && !keep_all) {
        int need = 0;
        for (int64_t c = 0; c < nc; c++) {
            int64_t nh = 0, nl = 0;
            if (!cuts[c]) for (int64_t i = 0; i < cnts[c]; i++) nh += hs.buf[c * k2 + i] >= ohi[c];
            if (!cuts[TILE + c]) for (int64_t i = 0; i < cnts[TILE + c]; i++) nl += ls.buf[c * k2 + i] >= olo[c];
            /* a short side keeps its values below the old threshold (those at or above it are in already);
               -inf disables a side */
            if (!cuts[c] && nh < k) { thi[c] = -INFINITY; need = 1; } else ohi[c] = -INFINITY;
            if (!cuts[TILE + c] && nl < k) { tlo[c] = -INFINITY; need = 1; } else olo[c] = -INFINITY;
        }
        if (need)
            for (int64_t t = 0; t < T; t++) {
                const float *xr = A->x + t * C + c0;
                for (int64_t c = 0; c < nc; c++) {
                    float v = xr[c], nv = -v;
                    if (v < ohi[c] && v >= thi[c]) side_add(&hs, c, v);
                    if (nv < olo[c] && nv >= tlo[c]) side_add(&ls, c, nv);
                }
            }
    }
    for (int64_t c = 0; c < nc; c++) {
        if (cnts[c] > k) select_top(hs.buf + c * k2, cnts[c], k, tmp);
        if (cnts[TILE + c] > k) select_top(ls.buf + c * k2, cnts[TILE + c], k, tmp);
        const int64_t keep = cnts[c] < k ? cnts[c] : k;
        memcpy(A->hi + (c0 + c) * k, hs.buf + c * k2, sizeof(float) * (size_t)keep);
        memcpy(A->lo + (c0 + c) * k, ls.buf + c * k2, sizeof(float) * (size_t)keep);
        A->s1[c0 + c] = a1[c]; A->s2[c0 + c] = a2[c]; A->s3[c0 + c] = a3[c]; A->s4[c0 + c] = a4[c];
        A->sabs[c0 + c] = aa[c]; A->maxabs[c0 + c] = mx[c];
    }
    return 0;
}

typedef struct {
    double *acc; float *fl; int64_t *cnts; uint8_t *cuts; float *wb, *smp, *tmp, *lv; int32_t *lc; int bad;
} cs_bufs;

static void cs_free(cs_bufs *B) {
    free(B->acc); free(B->fl); free(B->cnts); free(B->cuts); free(B->wb); free(B->smp); free(B->tmp); free(B->lv);
    free(B->lc);
}

static int cs_alloc(cs_bufs *B, int64_t k) {
    const int64_t k2 = 2 * k;
    B->acc = (double *)malloc(sizeof(double) * 5 * TILE);
    B->fl = (float *)malloc(sizeof(float) * 6 * TILE);
    B->cnts = (int64_t *)malloc(sizeof(int64_t) * 2 * TILE);
    B->cuts = (uint8_t *)malloc(2 * TILE);
    B->wb = (float *)malloc(sizeof(float) * 2 * TILE * (size_t)k2);
    B->smp = (float *)malloc(sizeof(float) * TILE * SAMPLE);
    B->tmp = (float *)malloc(sizeof(float) * (size_t)(2 * (k2 > SAMPLE ? k2 : SAMPLE) + 16));
    B->lv = (float *)malloc(sizeof(float) * (2 * TILE + 64));
    B->lc = (int32_t *)malloc(sizeof(int32_t) * (2 * TILE + 64));
    B->bad = !B->acc || !B->fl || !B->cnts || !B->cuts || !B->wb || !B->smp || !B->tmp || !B->lv || !B->lc;
    return B->bad;
}

static int cs_tiles(const cs_args *A, int64_t t0, int64_t t1, int64_t stride) {
    cs_bufs B;
    int bad = cs_alloc(&B, A->k);
    for (int64_t t = t0; !bad && t < t1; t += stride) {
        const int64_t c0 = t * TILE, nc = A->C - c0 < TILE ? A->C - c0 : TILE;
        bad = cs_tile(A, c0, nc, B.acc, B.fl, B.cnts, B.cuts, B.wb, B.smp, B.tmp, B.lv, B.lc);
    }
    cs_free(&B);
    return bad;
}

typedef struct { const cs_args *A; int64_t t0, t1, stride; int bad; } cs_job;
static void *cs_thread(void *p) { cs_job *j = (cs_job *)p; j->bad = cs_tiles(j->A, j->t0, j->t1, j->stride); return 0; }

/* Sums over the T rows of x of (x - shift)^1..4 (powers in float32, sums in float64) and of |x| (float64),
   the running max |x| (in place), and the running k largest values per channel of x (hi [C, k]) and of -x
   (lo [C, k]): each row's first min(k, filled) entries valid on entry, min(k, filled + T) on return.
   first != 0: the shift is chosen here (a sample mean) and written to shift[]. Returns the new fill count,
   or -1 when out of memory. */
int64_t awq_channel_stats(const float *x, float *shift, double *s1, double *s2, double *s3, double *s4,
                          double *sabs, float *maxabs, float *hi, float *lo, int64_t T, int64_t C, int64_t k,
                          int64_t filled, int first, int nthreads) {
    cs_args A = {x, shift, s1, s2, s3, s4, sabs, maxabs, hi, lo, T, C, k, filled, first};
    (void)cs_tiles;
    const int64_t ntiles = (C + TILE - 1) / TILE;
    int bad = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if ((int64_t)nthreads > ntiles) nthreads = (int)ntiles;
#ifdef _OPENMP
    /* tiles handed out one by one: a thread the OS descheduled (shared machine) does not hold up the rest;
       each thread allocates its buffers once per call */
    #pragma omp parallel num_threads(nthreads) reduction(max:bad)
    {
        cs_bufs B;
        if (cs_alloc(&B, k)) bad = 1;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntiles; t++)
            if (!B.bad) cs_tile(&A, t * TILE, (C - t * TILE) < TILE ? (C - t * TILE) : TILE, B.acc, B.fl, B.cnts,
                                B.cuts, B.wb, B.smp, B.tmp, B.lv, B.lc);
        cs_free(&B);
    }
#else
    cs_job jobs[MAXT]; pthread_t th[MAXT]; int started[MAXT];
    for (int t = 0; t < nthreads; t++) { jobs[t] = (cs_job){&A, t, ntiles, nthreads, 0}; started[t] = 0; }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&th[t], 0, cs_thread, &jobs[t]) == 0;
    for (int t = 1; t < nthreads; t++) if (!started[t]) cs_thread(&jobs[t]);
    cs_thread(&jobs[0]);
    for (int t = 0; t < nthreads; t++) {
        if (t > 0 && started[t]) pthread_join(th[t], 0);
        bad |= jobs[t].bad;
    }
#endif
    if (bad) return -1;
    int64_t f = filled + T;
    return f < k ? f : k;
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
            lib.awq_channel_stats.argtypes = [f_p] * 10 + [i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
            lib.awq_channel_stats.restype = i64
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
