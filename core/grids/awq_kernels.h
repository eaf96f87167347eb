/* Shared definitions of the fused CPU kernels (core/quant_kernels.c, core/stats_kernels.c).
   Built by core/kernels.py on first use, once per instruction set (AWQ_EXPLORER_ISA):
   avx512 / avx2 / neon: the GCC/clang vector extensions below map onto that ISA's registers, plus a few
   AVX-512 intrinsics where __AVX512F__ is defined; portable (-DAWQ_PORTABLE): plain scalar C only. */
#ifndef AWQ_KERNELS_H
#define AWQ_KERNELS_H

#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifdef AWQ_PORTABLE
#define AWQ_VEC 0
#else
#define AWQ_VEC 1
#endif

#define MAXT 64
/* Vector width in floats: one register of the ISA built for. (A 16-wide type on AVX2 made GCC split every
   operation and pass vectors through memory: the AVX2 quantizer ran 3.5x slower than the AVX-512 one.) */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
/* portable GCC/clang vector extensions: the compiler maps them onto AVX-512, AVX2, SSE or NEON */
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
static inline vf vsplat(float x) { vf v; for (int i = 0; i < VW; i++) v[i] = x; return v; }
/* m ? a : b, lane by lane (m is a comparison result: all ones or all zeros) */
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vi vsplat_i(int32_t x) { vi v; for (int i = 0; i < VW; i++) v[i] = x; return v; }
static inline vf vabs(vf a) { return (vf)((vi)a & vsplat_i(0x7fffffff)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }

/* Horizontal reductions as shuffle trees: lane i meets lane i ^ (VW/2), then i ^ (VW/4), ... (max/min of
   finite values do not depend on the order; the sum only serves as a finiteness test). */
#if VW == 16
#define VSHUF_STEPS(F, v) \
    v = F(v, __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7})); \
    v = F(v, __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11})); \
    v = F(v, __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13})); \
    v = F(v, __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
#elif VW == 8
#define VSHUF_STEPS(F, v) \
    v = F(v, __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3})); \
    v = F(v, __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5})); \
    v = F(v, __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6}));
#else
#define VSHUF_STEPS(F, v) \
    v = F(v, __builtin_shuffle(v, (vi){2, 3, 0, 1})); \
    v = F(v, __builtin_shuffle(v, (vi){1, 0, 3, 2}));
#endif
static inline vf vadd_(vf a, vf b) { return a + b; }
static inline float vhmax(vf v) { VSHUF_STEPS(vmax, v) return v[0]; }
static inline float vhmin(vf v) { VSHUF_STEPS(vmin, v) return v[0]; }
static inline float vhsum(vf v) { VSHUF_STEPS(vadd_, v) return v[0]; }

#endif
