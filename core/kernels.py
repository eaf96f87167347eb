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

/* ------------------------------------------------------------------------------------------------ */
/* streaming per-channel statistics of x [T, C] (row-major): one pass per batch                       */
/* ------------------------------------------------------------------------------------------------ */
/* Reorder a[0..n) so that a[0..k) holds the k largest values (1 <= k <= n); returns the smallest of them.
   Hoare partitioning: terminates for any input (NaN included). */
static float select_top(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float x = a[lo], y = a[(lo + hi) / 2], z = a[hi], pivot;  /* median of three */
        if (x < y) { float t = x; x = y; y = t; }
        if (y < z) { y = z; if (x < y) y = x; }
        pivot = y;
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (i <= hi && a[i] > pivot) i++;
            while (j >= lo && a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    float m = a[0];
    for (int64_t i = 1; i < k; i++) m = a[i] < m ? a[i] : m;
    return m;
}

typedef struct {
    const float *x; const float *shift; double *s1, *s2, *s3, *s4, *sabs; float *maxabs;
    float *hi, *lo; int64_t T, C, k, filled, cb, b0, b1; int bad;
} cs_job;

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

/* Candidates of one side (hi: values of x; lo: values of -x) go first to a sequential log of (channel,
   value); a flush sorts the log by channel (counting sort) and feeds each channel's buffer of 2k values in
   channel order, so the per-channel buffers (megabytes for wide layers) are touched sequentially instead of
   once per candidate. A full buffer is cut back to its k largest (quickselect) and its threshold becomes the
   k-th largest; a logged value below the channel's threshold at flush time is dropped (it cannot be among
   the k largest any more). */
typedef struct { int32_t c; float v; } cand_t;

typedef struct {
    cand_t *log, *tmp; int64_t n, cap; int64_t *cnt;  /* cnt: nc + 1 bucket offsets */
    float *buf; int64_t *fill; float *thr; int64_t k, nc;
} side_t;

static void side_flush(side_t *sd) {
    if (sd->n == 0) return;
    const int64_t nc = sd->nc, k = sd->k, k2 = 2 * k;
    int64_t *cnt = sd->cnt;
    for (int64_t c = 0; c <= nc; c++) cnt[c] = 0;
    for (int64_t i = 0; i < sd->n; i++) cnt[sd->log[i].c + 1]++;
    for (int64_t c = 0; c < nc; c++) cnt[c + 1] += cnt[c];
    for (int64_t i = 0; i < sd->n; i++) sd->tmp[cnt[sd->log[i].c]++] = sd->log[i];
    /* cnt[c] is now the end of bucket c */
    int64_t i = 0;
    for (int64_t c = 0; c < nc; c++) {
        float *h = sd->buf + c * k2;
        for (; i < cnt[c]; i++) {
            float v = sd->tmp[i].v;
            if (v < sd->thr[c]) continue;  /* (values equal to the k-th largest change nothing) */
            h[sd->fill[c]++] = v;
            if (sd->fill[c] == k2) { sd->thr[c] = select_top(h, k2, k); sd->fill[c] = k; }
        }
    }
    sd->n = 0;
}

static inline void side_add(side_t *sd, int64_t c, float v) {
    sd->log[sd->n].c = (int32_t)c; sd->log[sd->n].v = v;
    if (++sd->n == sd->cap) side_flush(sd);
}

/* One row segment: vector compares against the per-channel thresholds; only lanes holding a candidate are
   logged. `ge`: also values equal to the threshold (first-batch thresholds). */
static inline void cs_scan_row(const float *xq, int64_t nc, side_t *hs, side_t *ls, int ge) {
    const float *thi = hs->thr, *tlo = ls->thr;  /* tlo holds thresholds of -x */
    int64_t c = 0;
#if defined(__AVX512F__)
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const int ph = ge ? _CMP_GE_OQ : _CMP_GT_OQ;
    for (; c + 16 <= nc; c += 16) {
        __m512 v = _mm512_loadu_ps(xq + c);
        __m512 nv = _mm512_xor_ps(v, sign);
        __mmask16 mh = ge ? _mm512_cmp_ps_mask(v, _mm512_loadu_ps(thi + c), _CMP_GE_OQ)
                          : _mm512_cmp_ps_mask(v, _mm512_loadu_ps(thi + c), _CMP_GT_OQ);
        __mmask16 ml = ge ? _mm512_cmp_ps_mask(nv, _mm512_loadu_ps(tlo + c), _CMP_GE_OQ)
                          : _mm512_cmp_ps_mask(nv, _mm512_loadu_ps(tlo + c), _CMP_GT_OQ);
        (void)ph;
        if (!(mh | ml)) continue;
        unsigned bh = mh, bl = ml;
        while (bh) { int i = __builtin_ctz(bh); bh &= bh - 1; side_add(hs, c + i, xq[c + i]); }
        while (bl) { int i = __builtin_ctz(bl); bl &= bl - 1; side_add(ls, c + i, -xq[c + i]); }
    }
#else
    for (; c + VW <= nc; c += VW) {
        vf v, th, tl;
        memcpy(&v, xq + c, sizeof v); memcpy(&th, thi + c, sizeof th); memcpy(&tl, tlo + c, sizeof tl);
        vf nv = -v;
        vi mh = ge ? (v >= th) : (v > th);
        vi ml = ge ? (nv >= tl) : (nv > tl);
        vi m = mh | ml;
        int any = 0;
        for (int i = 0; i < VW; i++) any |= m[i];
        if (!any) continue;
        for (int i = 0; i < VW; i++) {
            if (mh[i]) side_add(hs, c + i, v[i]);
            if (ml[i]) side_add(ls, c + i, nv[i]);
        }
    }
#endif
    for (; c < nc; c++) {
        float v = xq[c], nv = -v;
        if (ge ? v >= thi[c] : v > thi[c]) side_add(hs, c, v);
        if (ge ? nv >= tlo[c] : nv > tlo[c]) side_add(ls, c, nv);
    }
}

static inline float min_k(const float *h, int64_t k) {
    float m = h[0];
    for (int64_t i = 1; i < k; i++) m = h[i] < m ? h[i] : m;
    return m;
}

/* Channel blocks of j->cb channels (one per thread for the usual widths); every row's contiguous segment is
   streamed, four rows at a time, the block's accumulators in L1/L2.

   Extremes: per channel a buffer of 2k values whose first cnt entries are candidates; a full buffer is cut
   back to its k largest (quickselect). On return each channel holds exactly min(k, seen) values: the k
   largest of x (hi) and of -x (lo), the same multiset as a running topk.
   - Once k values are held (later batches), candidates are values beyond the k-th largest so far,
     checked in the statistics pass: few, and fewer with every batch.
   - Before that (first batch), a first pass takes the statistics only; thresholds come from a row sample
     (the order statistic that ~2k of the batch's values should beat); a second pass keeps the values at or
     beyond them; a channel/side with fewer than k kept is completed by a third pass that keeps the rest of
     its values. Exact in every case; the thresholds only decide how much work it is. */
static void cs_range(cs_job *j) {
    const int64_t T = j->T, C = j->C, k = j->k, cb = j->cb, k2 = 2 * k;
    const int64_t S = T < 256 ? T : 256;  /* sampled rows */
    const int64_t cap = 8 * k * cb + 1024;  /* log entries per side before a flush */
    double *acc = (double *)malloc(sizeof(double) * 5 * (size_t)cb);
    float *fl = (float *)malloc(sizeof(float) * 6 * (size_t)cb);
    int64_t *cnt = (int64_t *)malloc(sizeof(int64_t) * (3 * (size_t)cb + 1));
    float *smp = (float *)malloc(sizeof(float) * (size_t)S * (size_t)cb);
    cand_t *logs = (cand_t *)malloc(sizeof(cand_t) * 3 * (size_t)cap);
    if (!acc || !fl || !cnt || !smp || !logs) {
        free(acc); free(fl); free(cnt); free(smp); free(logs); j->bad = 1; return;
    }
    double *a1 = acc, *a2 = acc + cb, *a3 = acc + 2 * cb, *a4 = acc + 3 * cb, *aa = acc + 4 * cb;
    float *mx = fl, *sh = fl + cb, *thi = fl + 2 * cb, *tlo = fl + 3 * cb, *ohi = fl + 4 * cb, *olo = fl + 5 * cb;
    int64_t *chi = cnt, *clo = cnt + cb, *bucket = cnt + 2 * cb;
    for (int64_t b = j->b0; b < j->b1; b++) {
        const int64_t c0 = b * cb, nc = (C - c0) < cb ? (C - c0) : cb;
        if (nc <= 0) break;
        for (int64_t c = 0; c < nc; c++) {
            a1[c] = a2[c] = a3[c] = a4[c] = aa[c] = 0.0;
            mx[c] = j->maxabs[c0 + c]; sh[c] = j->shift[c0 + c];
        }
        const int64_t filled = j->filled;
        float *hib = j->hi + c0 * k2, *lob = j->lo + c0 * k2;
        for (int64_t c = 0; c < nc; c++) {
            chi[c] = clo[c] = filled;
            thi[c] = filled >= k ? min_k(hib + c * k2, k) : -INFINITY;
            tlo[c] = filled >= k ? min_k(lob + c * k2, k) : -INFINITY;  /* threshold on -x */
        }
        side_t hs = {logs, logs + 2 * cap, 0, cap, bucket, hib, chi, thi, k, nc};
        side_t ls = {logs + cap, logs + 2 * cap, 0, cap, bucket, lob, clo, tlo, k, nc};
        const int steady = filled >= k;
        /* statistics pass (with the candidate scan when thresholds are known) */
        for (int64_t t = 0; t < T;) {
            const int64_t nr = (T - t) >= 4 ? 4 : 1;
            const float *xr = j->x + t * C + c0;
            if (nr == 4) cs_row4(xr, C, nc, sh, a1, a2, a3, a4, aa, mx);
            else cs_row1(xr, nc, sh, a1, a2, a3, a4, aa, mx);
            if (steady)
                for (int64_t r = 0; r < nr; r++) cs_scan_row(xr + r * C, nc, &hs, &ls, 0);
            t += nr;
        }
        if (!steady) {
            if (filled + T <= k2) {  /* few values in all: keep every one */
                for (int64_t t = 0; t < T; t++) {
                    const float *xr = j->x + t * C + c0;
                    for (int64_t c = 0; c < nc; c++) {
                        hib[c * k2 + chi[c]++] = xr[c];
                        lob[c * k2 + clo[c]++] = -xr[c];
                    }
                }
            } else {
                /* sampled thresholds: the q-th largest of S evenly spaced rows, q ~ 2k * S / T */
                int64_t q = (2 * k * S + T - 1) / T;
                if (q < 1) q = 1;
                if (q > S) q = S;
                /* gather the sample transposed ([channel][row]) in tiles of 64 channels (cache friendly); the
                   sampled rows are spread with an odd stride so they do not line up with sequence starts */
                for (int64_t c1 = 0; c1 < nc; c1 += 64) {
                    const int64_t c2 = c1 + 64 < nc ? c1 + 64 : nc;
                    for (int64_t i = 0; i < S; i++) {
                        const int64_t row = (i * T / S + (i * 7) % (T / S > 1 ? T / S : 1)) % T;
                        const float *xr = j->x + row * C + c0;
                        for (int64_t c = c1; c < c2; c++) smp[c * S + i] = xr[c];
                    }
                }
                for (int64_t c = 0; c < nc; c++) {
                    float *p = smp + c * S;
                    thi[c] = select_top(p, S, q);
                    for (int64_t i = 0; i < S; i++) p[i] = -p[i];
                    tlo[c] = select_top(p, S, q);
                }
                for (int64_t t = 0; t < T; t++) cs_scan_row(j->x + t * C + c0, nc, &hs, &ls, 1);
                side_flush(&hs); side_flush(&ls);
                /* The buffer now holds the earlier values and this batch's values >= its threshold: exact when
                   at least k of them are >= the threshold. A channel/side with fewer (threshold too high) gets a
                   third pass that keeps its remaining values of the batch (those below the threshold). */
                int need = 0;
                for (int64_t c = 0; c < nc; c++) {
                    int64_t nh = 0, nl = 0;
                    for (int64_t i = 0; i < chi[c]; i++) nh += hib[c * k2 + i] >= thi[c];
                    for (int64_t i = 0; i < clo[c]; i++) nl += lob[c * k2 + i] >= tlo[c];
                    /* values >= ohi (of x) / olo (of -x) were kept already; -inf disables a side */
                    ohi[c] = nh < k ? thi[c] : -INFINITY;
                    olo[c] = nl < k ? tlo[c] : -INFINITY;
                    if (nh < k) { thi[c] = -INFINITY; need = 1; }
                    if (nl < k) { tlo[c] = -INFINITY; need = 1; }
                }
                if (need)
                    for (int64_t t = 0; t < T; t++) {
                        const float *xr = j->x + t * C + c0;
                        for (int64_t c = 0; c < nc; c++) {
                            float v = xr[c], nv = -v;
                            if (v < ohi[c] && v > thi[c]) side_add(&hs, c, v);
                            if (nv < olo[c] && nv > tlo[c]) side_add(&ls, c, nv);
                        }
                    }
            }
        }
        side_flush(&hs); side_flush(&ls);
        for (int64_t c = 0; c < nc; c++) {
            if (chi[c] > k) select_top(hib + c * k2, chi[c], k);
            if (clo[c] > k) select_top(lob + c * k2, clo[c], k);
            j->s1[c0 + c] = a1[c]; j->s2[c0 + c] = a2[c]; j->s3[c0 + c] = a3[c]; j->s4[c0 + c] = a4[c];
            j->sabs[c0 + c] = aa[c]; j->maxabs[c0 + c] = mx[c];
        }
    }
    free(acc); free(fl); free(cnt); free(smp); free(logs);
}

static void *cs_thread(void *p) { cs_range((cs_job *)p); return 0; }

/* Sums over the T rows of x of (x - shift)^1..4 (powers in float32, sums in float64), of |x| (float64),
   the running max |x| (in place), and the running k largest values per channel of x (hi [C, 2k]) and of
   -x (lo [C, 2k]), each channel's first `filled` entries valid on entry and min(k, filled + T) on return.
   Returns the new fill count. */
int64_t awq_channel_stats(const float *x, const float *shift, double *s1, double *s2, double *s3, double *s4,
                          double *sabs, float *maxabs, float *hi, float *lo, int64_t T, int64_t C, int64_t k,
                          int64_t filled, int nthreads) {
    int bad = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    /* one block of channels per thread (long contiguous row segments measured fastest), multiple of 16 */
    int64_t nb = 1;
    if (nb < nthreads) nb = nthreads;
    int64_t cb = (C + nb - 1) / nb;
    cb = (cb + 15) / 16 * 16;
    nb = (C + cb - 1) / cb;
    if ((int64_t)nthreads > nb) nthreads = (int)nb;
#ifdef _OPENMP
    #pragma omp parallel num_threads(nthreads) reduction(max:bad)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        cs_job job = {x, shift, s1, s2, s3, s4, sabs, maxabs, hi, lo, T, C, k, filled, cb, nb * t / nt,
                      nb * (t + 1) / nt, 0};
        cs_range(&job);
        if (job.bad) bad = 1;
    }
#else
    cs_job jobs[MAXT]; pthread_t th[MAXT]; int started[MAXT];
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (cs_job){x, shift, s1, s2, s3, s4, sabs, maxabs, hi, lo, T, C, k, filled, cb,
                           nb * t / nthreads, nb * (t + 1) / nthreads, 0};
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&th[t], 0, cs_thread, &jobs[t]) == 0;
    for (int t = 1; t < nthreads; t++) if (!started[t]) cs_range(&jobs[t]);
    cs_range(&jobs[0]);
    for (int t = 0; t < nthreads; t++) {
        if (t > 0 && started[t]) pthread_join(th[t], 0);
        if (jobs[t].bad) bad = 1;
    }
#endif
    if (bad) return -1;  /* out of memory: the caller falls back to torch */
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
            lib.awq_channel_stats.argtypes = [f_p] * 10 + [i64, i64, i64, i64, ctypes.c_int]
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
    x: torch.Tensor, shift: torch.Tensor, max_abs: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, filled: int
) -> tuple[torch.Tensor, int] | None:
    """One pass over a batch ``x [T, C]`` for ``core.collect.ChannelAccumulator``.

    Returns ``(sums [5, C] float64: sum d, d^2, d^3, d^4 with d = x - shift (powers in float32), sum |x|;
    new fill count)`` and updates ``max_abs [C]`` and the extremes ``hi``/``lo [C, 2k]`` (the first
    ``fill count`` entries of each row: the k largest values of x / of -x seen so far, in no order) in
    place; ``None`` when the kernels are unavailable.
    """
    lib = _load()
    if lib is None or x.dim() != 2 or not all(_ok(t) for t in (x, shift, max_abs, hi, lo)):
        return None
    t_, c_ = x.shape
    k = hi.shape[1] // 2
    sums = torch.empty(5, c_, dtype=torch.float64)
    p = [sums[i].data_ptr() for i in range(5)]
    f = lib.awq_channel_stats(x.data_ptr(), shift.data_ptr(), *p, max_abs.data_ptr(), hi.data_ptr(), lo.data_ptr(),
                              t_, c_, k, int(filled), _threads())
    if f < 0:
        return None
    return sums, int(f)
