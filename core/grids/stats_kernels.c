/* Streaming per-channel statistics of activations (core.collect): moments, |x| sums, max |x| and the k
   most extreme values per channel, in one pass per batch. */
#include "awq_kernels.h"


/* ------------------------------------------------------------------------------------------------ */
/* streaming per-channel statistics of x [T, C] (row-major): one pass per batch                       */
/* ------------------------------------------------------------------------------------------------ */
#if defined(__AVX512F__) || defined(__AVX2__)
#define SEL_VEC 1
/* Append the values of a[lo..hi) that pass the test (v > pivot, or v == pivot when eq) to tg, the others to
   tl, both in their order: one vector of values per step, the two sides written with compress stores
   (AVX-512) or a permutation from a table (AVX2, which stores a whole register: tg and tl need 8 spare
   floats after their ends). NaN fails both tests, so it goes to tl. */
#if defined(__AVX512F__)
static inline void split_by(const float *a, int64_t lo, int64_t hi, float pivot, int eq, float *tg, int64_t *ng,
                            float *tl, int64_t *nl) {
    const __m512 pv = _mm512_set1_ps(pivot);
    int64_t g0 = 0, l0 = 0;
    for (int64_t i = lo; i < hi; i += 16) {
        const int64_t left = hi - i;
        const __mmask16 tail = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 v = _mm512_maskz_loadu_ps(tail, a + i);
        __mmask16 g = eq ? _mm512_mask_cmp_ps_mask(tail, v, pv, _CMP_EQ_OQ) : _mm512_mask_cmp_ps_mask(tail, v, pv, _CMP_GT_OQ);
        __mmask16 l = tail & (__mmask16)~g;
        _mm512_mask_compressstoreu_ps(tg + g0, g, v); g0 += __builtin_popcount(g);
        _mm512_mask_compressstoreu_ps(tl + l0, l, v); l0 += __builtin_popcount(l);
    }
    *ng = g0; *nl = l0;
}
#else
/* lut8[m]: the lanes set in mask m first, in order (a left-pack permutation for _mm256_permutevar8x32_ps) */
static int32_t lut8[256][8];
static pthread_once_t lut8_once = PTHREAD_ONCE_INIT;
static void lut8_build(void) {
    for (int m = 0; m < 256; m++) {
        int j = 0;
        for (int b = 0; b < 8; b++) if (m >> b & 1) lut8[m][j++] = b;
        for (; j < 8; j++) lut8[m][j] = 0;
    }
}
static inline void split_by(const float *a, int64_t lo, int64_t hi, float pivot, int eq, float *tg, int64_t *ng,
                            float *tl, int64_t *nl) {
    const __m256 pv = _mm256_set1_ps(pivot);
    int64_t g0 = 0, l0 = 0;
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        __m256 v = _mm256_loadu_ps(a + i);
        int g = _mm256_movemask_ps(eq ? _mm256_cmp_ps(v, pv, _CMP_EQ_OQ) : _mm256_cmp_ps(v, pv, _CMP_GT_OQ));
        int l = ~g & 0xFF;
        _mm256_storeu_ps(tg + g0, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)lut8[g])));
        g0 += __builtin_popcount(g);
        _mm256_storeu_ps(tl + l0, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)lut8[l])));
        l0 += __builtin_popcount(l);
    }
    for (; i < hi; i++) {
        const float v = a[i];
        if (eq ? v == pivot : v > pivot) tg[g0++] = v; else tl[l0++] = v;
    }
    *ng = g0; *nl = l0;
}
#endif
#else
#define SEL_VEC 0
#endif

/* Reorder a[0..n) so that a[0..k) holds the k largest values (1 <= k <= n); returns the k-th largest.
   tmp: room for 2n + 32 floats. Quickselect; with AVX-512 or AVX2 each partition step moves a vector of values
   with compress stores or a permutation (no data-dependent branches), else Hoare partitioning. Terminates
   for any input (NaN included: it then only has to return something, the caller raises on non-finite
   statistics). */
static float select_top(float *a, int64_t n, int64_t k, float *tmp) {
    int64_t lo = 0, hi = n;
    const int64_t want = k - 1;
#if SEL_VEC
    float *tg = tmp, *tl = tmp + n + 16;
    while (hi - lo > 16) {
        float x = a[lo], y = a[(lo + hi) / 2], z = a[hi - 1], pivot;  /* median of three */
        if (x < y) { float t = x; x = y; y = t; }
        if (y < z) { y = z; if (x < y) y = x; }
        pivot = y;
        int64_t ng, nl;
        split_by(a, lo, hi, pivot, 0, tg, &ng, tl, &nl);
        memcpy(a + lo, tg, sizeof(float) * (size_t)ng);
        memcpy(a + lo + ng, tl, sizeof(float) * (size_t)nl);
        const int64_t m = lo + ng;  /* a[lo..m) > pivot >= a[m..hi) (NaN goes right) */
        if (want < m) { hi = m; continue; }
        if (ng > 0) { lo = m; continue; }
        /* the pivot is the range's maximum: split off the values equal to it */
        int64_t ne;
        split_by(a, m, hi, pivot, 1, tg, &ne, tl, &nl);
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
   compress stores (no data-dependent branches), then appended. `lv`/`lc`: room for 2 * nc + 32 entries (AVX2
   stores a whole register past the last candidate of each side). */
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
#elif defined(__AVX2__)
    /* the same with eight channels per step, the compress stores done by a left-pack permutation (lut8): no
       data-dependent branch, which the first batch (about one candidate in eight values) would mispredict */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    for (; c + 8 <= nc; c += 8) {
        __m256 v = _mm256_loadu_ps(xq + c), nv = _mm256_xor_ps(v, sign);
        int mh = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(thi + c), _CMP_GE_OQ));
        int ml = _mm256_movemask_ps(_mm256_cmp_ps(nv, _mm256_loadu_ps(tlo + c), _CMP_GE_OQ));
        __m256i ci = _mm256_add_epi32(iota, _mm256_set1_epi32((int32_t)c));
        __m256i ph = _mm256_loadu_si256((const __m256i *)lut8[mh]), pl = _mm256_loadu_si256((const __m256i *)lut8[ml]);
        _mm256_storeu_ps(lv + nh, _mm256_permutevar8x32_ps(v, ph));
        _mm256_storeu_si256((__m256i *)(lc + nh), _mm256_permutevar8x32_epi32(ci, ph));
        nh += __builtin_popcount(mh);
        _mm256_storeu_ps(lvl + nl, _mm256_permutevar8x32_ps(nv, pl));
        _mm256_storeu_si256((__m256i *)(lcl + nl), _mm256_permutevar8x32_epi32(ci, pl));
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
    float *hi, *lo; int64_t T, C, k, filled; int first; int64_t tw;
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
    B->tmp = (float *)malloc(sizeof(float) * (size_t)(2 * (k2 > SAMPLE ? k2 : SAMPLE) + 48));
    B->lv = (float *)malloc(sizeof(float) * (2 * TILE + 64));
    B->lc = (int32_t *)malloc(sizeof(int32_t) * (2 * TILE + 64));
    B->bad = !B->acc || !B->fl || !B->cnts || !B->cuts || !B->wb || !B->smp || !B->tmp || !B->lv || !B->lc;
    return B->bad;
}

static int cs_tiles(const cs_args *A, int64_t t0, int64_t t1, int64_t stride) {
    cs_bufs B;
    int bad = cs_alloc(&B, A->k);
    for (int64_t t = t0; !bad && t < t1; t += stride) {
        const int64_t c0 = t * A->tw, nc = A->C - c0 < A->tw ? A->C - c0 : A->tw;
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
    cs_args A = {x, shift, s1, s2, s3, s4, sabs, maxabs, hi, lo, T, C, k, filled, first, TILE};
#if SEL_VEC && !defined(__AVX512F__)
    pthread_once(&lut8_once, lut8_build);
#endif
    (void)cs_tiles;
    int bad = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    /* tiles of equal width (a multiple of 16, at most TILE), as many as a whole number of rounds of the threads
       needs: 576 channels on 2 threads are 2 x 288, not 512 + 64 (each channel's sums do not depend on its tile) */
    int64_t ntiles = (C + TILE - 1) / TILE;
    ntiles = (ntiles + nthreads - 1) / nthreads * nthreads;
    A.tw = ((C + ntiles - 1) / ntiles + 15) / 16 * 16;
    if (A.tw > TILE) A.tw = TILE;
    ntiles = (C + A.tw - 1) / A.tw;
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
            if (!B.bad) cs_tile(&A, t * A.tw, (C - t * A.tw) < A.tw ? (C - t * A.tw) : A.tw, B.acc, B.fl, B.cnts,
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
