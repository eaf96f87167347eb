/* Fused fake quantization Q(W*s)/s (- W) and float64 row sums of squares; see core/kernels.py for the
   exactness contract (the float32 operations of core.quant, in the same order). */
#include "awq_kernels.h"

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
#if AWQ_VEC
            vf vmx = vsplat(-INFINITY), vmn = vsplat(INFINITY), vsum = vsplat(0.0f);
#endif
            float M = -INFINITY, m = INFINITY, c = 0.0f;
            int64_t jj = 0;
#if AWQ_VEC
            for (; jj + VW <= g; jj += VW) {
                vf v; memcpy(&v, wp + jj, sizeof v);
                if (sp) { vf sv; memcpy(&sv, sp + jj, sizeof sv); v = v * sv; }
                vsum += v;  /* non-finite iff a NaN/inf is in the group (or, harmlessly, on overflow) */
                if (!zp) v = vabs(v);
                vmx = vmax(v, vmx);
                if (zp) vmn = vmin(v, vmn);
            }
#endif
            for (; jj < g; jj++) {
                float v = sp ? wp[jj] * sp[jj] : wp[jj];
                c += v;
                if (!zp) v = fabsf(v);
                M = v > M ? v : M;
                if (zp) m = v < m ? v : m;
            }
#if AWQ_VEC
            M = vhmax(vmx) > M ? vhmax(vmx) : M;
            m = vhmin(vmn) < m ? vhmin(vmn) : m;
            c += vhsum(vsum);
#endif
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

/* The instruction set this build's vector code targets (core.kernels checks it against what it asked for):
   0 portable scalar C, 1 generic vector extensions, 2 AVX2, 3 AVX-512, 4 NEON. */
int awq_kernels_isa(void) {
#if !AWQ_VEC
    return 0;
#elif defined(__AVX512F__)
    return 3;
#elif defined(__AVX2__)
    return 2;
#elif defined(__ARM_NEON) || defined(__aarch64__)
    return 4;
#else
    return 1;
#endif
}
