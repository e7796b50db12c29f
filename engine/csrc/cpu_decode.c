/* CPU kernels for a decoder layer's decode step: its matmuls and what lies between them, for
 * float32 models and for bfloat16 ones (bf16 weights and KV cache, float32 arithmetic inside).
 *
 * Why: at decode batch sizes each of these is a few microseconds of arithmetic, but as torch
 * ops they cost tens of microseconds of dispatch, allocation and threading each (a packed
 * oneDNN linear ~14 us a call before any arithmetic), more than the arithmetic itself. Built on
 * first use by engine/cpu_kernels.py (gcc -O3 -march=native -fopenmp, linking the OpenMP
 * runtime torch already loaded) and called through ctypes.
 *
 * Layouts are the engine's: row-major activations, the paged KV cache of one layer viewed as
 * [slots, kv_heads, head_dim] (slot = page * page_size + offset), int32 page tables.
 *
 * bfloat16 is handled as its bits (uint16_t): widening is a 16-bit shift, exact, and works on
 * any x86; narrowing rounds to nearest even as torch does. Kernels that take either dtype are
 * written once as inlined functions of a constant flag, so each dtype gets its own loop.
 * With AVX512-BF16 (Cooper Lake, Sapphire Rapids and later) the bf16 matmul multiplies in
 * bf16 pairs with `vdpbf16ps`; elsewhere it widens the weights and uses float32 FMAs.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define KEY_BLOCK 64 /* keys scored at a time by the online softmax */
#define PARALLEL_WORK (1 << 16) /* below this many multiply-adds a kernel runs on one thread */

/* exp(x) in float32 to about 1 ulp (Cephes' polynomial), written so that loops over it
 * vectorise (libm's expf does not without -ffast-math). Inputs below -87.3 give 2^-126. */
static inline float exp_f32(float input) {
    float x = input < -87.3365447505f ? -87.3365447505f : input; /* not fminf/fmaxf: they */
    x = x > 88.3762626647f ? 88.3762626647f : x;                  /* would not vectorise */
    /* n = round(x / ln 2) by the 1.5 * 2^23 trick: floorf would not vectorise. */
    float n = (x * 1.44269504089f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23}; /* 2^n */
    return input != input ? input : y * scale.value; /* NaN stays NaN (the clamp hides it) */
}

/* bfloat16 <-> float32. Widening is exact; narrowing rounds to nearest even, NaN to a quiet
 * NaN, bit for bit as torch's conversion. Branch-free, so loops over them vectorise. */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t bits; float value; } v = {.bits = (uint32_t)h << 16};
    return v.value;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float value; uint32_t bits; } v = {.value = f};
    uint32_t rounded = (v.bits + 0x7FFFu + ((v.bits >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

/* Element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array, as float32; and the store.
 * Called with a constant flag, the test folds away. */
static inline float load_at(const void *p, int64_t i, const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_at(void *p, int64_t i, float v, const int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* One row of pd_add_rms_norm, activations and weight each float32 or bfloat16. In bfloat16 the
 * sum is rounded before it is normalised, so the output is the norm of the residual stream the
 * next layer reads (as the reference implementations do); the rest is float32 until the store. */
static inline __attribute__((always_inline)) void rms_norm_row(
    const void *input, const void *residual, const void *weight, void *sum, void *out,
    int64_t r, int64_t n, float eps, const int act_bf16, const int weight_bf16) {
    float x[n];
    int64_t at = r * n;
    if (residual != NULL) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float s = load_at(input, at + i, act_bf16) + load_at(residual, at + i, act_bf16);
            store_at(sum, at + i, s, act_bf16);
            x[i] = act_bf16 ? load_at(sum, at + i, 1) : s;
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) x[i] = load_at(input, at + i, act_bf16);
    }
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; i++) squares += (double)x[i] * (double)x[i];
    float inv = 1.0f / sqrtf((float)(squares / (double)n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        store_at(out, at + i, load_at(weight, i, weight_bf16) * (x[i] * inv), act_bf16);
}

/* out = weight * x / rms(x), where x = input + residual (written to `sum`) or, without a
 * residual, the input itself. The mean of squares accumulates in double. Activations (input,
 * residual, sum, out) are bfloat16 if `act_bf16`, else float32; the weight likewise. */
void pd_add_rms_norm(const void *input, const void *residual, const void *weight, void *sum,
                     void *out, int64_t rows, int64_t n, float eps, int32_t act_bf16,
                     int32_t weight_bf16) {
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
#define NORM(a, w) rms_norm_row(input, residual, weight, sum, out, r, n, eps, a, w)
        if (act_bf16)
            weight_bf16 ? NORM(1, 1) : NORM(1, 0);
        else
            weight_bf16 ? NORM(0, 1) : NORM(0, 0);
#undef NORM
    }
}

static inline __attribute__((always_inline)) void silu_mul_row(const void *gate_up, void *out,
                                                               int64_t r, int64_t inter,
                                                               const int bf16) {
    int64_t g = r * 2 * inter, u = g + inter, o = r * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) {
        float gate = load_at(gate_up, g + i, bf16);
        store_at(out, o + i, gate / (1.0f + exp_f32(-gate)) * load_at(gate_up, u + i, bf16),
                 bf16);
    }
}

/* SwiGLU's activation: out[r, i] = silu(gate[r, i]) * up[r, i], gate and up side by side in
 * one [rows, 2 * inter] matmul output; float32, or bfloat16 in and out (float32 inside, one
 * rounding). */
void pd_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t inter, int32_t bf16) {
#pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        if (bf16)
            silu_mul_row(gate_up, out, r, inter, 1);
        else
            silu_mul_row(gate_up, out, r, inter, 0);
    }
}

/* The unit of the decode matmul: one vector register of floats, 16 with AVX-512, else 8
 * (AVX2). A register tile is PANEL_ROWS x 2 of them: 12 accumulators, which with the two weight
 * vectors and a broadcast fit AVX2's 16 registers (a tile of 16-float vectors on AVX2 took 24
 * and GCC kept it on the stack: 5-8x slower than oneDNN at decode sizes on an AVX2 EPYC). */
#ifdef __AVX512F__
#define VEC 16
#else
#define VEC 8
#endif
typedef float vec __attribute__((vector_size(4 * VEC)));

static inline vec loadv(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

#define PANEL (2 * VEC) /* output columns per panel of the packed weight: two vectors */
#define PANEL_ROWS 6      /* rows of x per register tile: 12 accumulators */

/* Runs CALL(rows) with the row count a constant (1..PANEL_ROWS): each tile height then keeps its
 * accumulators in registers; with the count a variable GCC keeps them in memory (batch 1 ran
 * 3x slower that way). */
#define WITH_CONSTANT_ROWS(rows, CALL) \
    switch (rows) { \
    case 1: CALL(1); break; \
    case 2: CALL(2); break; \
    case 3: CALL(3); break; \
    case 4: CALL(4); break; \
    case 5: CALL(5); break; \
    default: CALL(PANEL_ROWS); \
    }
_Static_assert(PANEL_ROWS == 6, "WITH_CONSTANT_ROWS spells out 1..PANEL_ROWS");

/* Packs a linear's weight w [n, k] (nn.Linear's layout) for pd_panel_linear: panels of PANEL
 * output columns, each [k][PANEL] (columns past n are zero), so the matmul reads the weight
 * once, front to back. */
void pd_pack_panels(const float *w, int64_t n, int64_t k, float *packed) {
    int64_t panels = (n + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t i = 0; i < k; i++)
            for (int64_t c = 0; c < PANEL; c++) {
                int64_t col = p * PANEL + c;
                packed[(p * k + i) * PANEL + c] = col < n ? w[col * k + i] : 0.0f;
            }
}

/* Adds `rows` rows of x times one panel into acc: each output one FMA chain over k in order (so
 * a row's result does not depend on the rows beside it). Inlined, and called with a constant
 * row count (WITH_CONSTANT_ROWS). */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t k,
                                                             const float *panel, int rows,
                                                             vec acc[PANEL_ROWS][2]) {
    for (int64_t i = 0; i < k; i++) {
        vec w0 = loadv(panel + i * PANEL), w1 = loadv(panel + i * PANEL + VEC);
        for (int r = 0; r < rows; r++) {
            vec b = (vec){0} + x[r * k + i];
            acc[r][0] += b * w0;
            acc[r][1] += b * w1;
        }
    }
}

/* The register tile of one panel for rows [0, rows) of x (rows <= PANEL_ROWS). */
static inline __attribute__((always_inline)) void panel_tile(const float *x, int64_t k,
                                                             const float *panel, int rows,
                                                             vec acc[PANEL_ROWS][2]) {
    for (int r = 0; r < PANEL_ROWS; r++) acc[r][0] = acc[r][1] = (vec){0};
#define ROWS(count) panel_rows(x, k, panel, count, acc)
    WITH_CONSTANT_ROWS(rows, ROWS)
#undef ROWS
}

/* Output columns per panel, for the caller that allocates packed weights. */
int32_t pd_panel_width(void) { return PANEL; }

/* y = x w^T (+ bias) for a decode batch: x [m, k], w packed by pd_pack_panels, y [m, n], all
 * row-major. The threads split the panels; at decode batch sizes this is as fast as oneDNN's
 * packed linear or faster (1.2x at 32 rows, 2.3x at one: it has no per-call setup). */
void pd_panel_linear(const float *x, const float *packed, const float *bias, float *y, int64_t m,
                     int64_t k, int64_t n) {
    int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel if (m * n * k >= PARALLEL_WORK)
    {
        int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
        int64_t end = panels * (part + 1) / parts;
        for (int64_t p = panels * part / parts; p < end; p++) {
            int64_t col0 = p * PANEL, cols = n - col0 < PANEL ? n - col0 : PANEL;
            for (int64_t row0 = 0; row0 < m; row0 += PANEL_ROWS) {
                int rows = m - row0 < PANEL_ROWS ? (int)(m - row0) : PANEL_ROWS;
                vec acc[PANEL_ROWS][2];
                panel_tile(x + row0 * k, k, packed + p * k * PANEL, rows, acc);
                for (int r = 0; r < rows; r++) {
                    float out[PANEL];
                    memcpy(out, acc[r], sizeof out);
                    float *row = y + (row0 + r) * n + col0;
                    for (int64_t c = 0; c < cols; c++)
                        row[c] = bias != NULL ? out[c] + bias[col0 + c] : out[c];
                }
            }
        }
    }
}

/* The bfloat16 matmul. Panels hold PANEL output columns as for float32, but k in pairs:
 * [ceil(k / 2)][PANEL][2], so one vector load holds VEC columns' weights of two consecutive
 * k (the operand layout of `vdpbf16ps`). Read as 32-bit lanes, a lane is (w[k + 1] << 16) |
 * w[k]: a shift widens the even k to float32 and a mask the odd one, so the portable path
 * reads the same layout at one integer op per VEC weights. Half the bytes of the float32
 * panels: decode, which reads every weight once per step, is bound by them. */
typedef uint32_t lanes __attribute__((vector_size(4 * VEC)));

/* Rows per register tile of the bf16 matmul. Widening keeps two more weight vectors live than
 * float32 panels; on AVX2 a tile of 6 rows then spilled accumulators to the stack (16
 * registers), and 4 rows run faster. */
#ifdef __AVX512F__
#define BF16_ROWS PANEL_ROWS
#else
#define BF16_ROWS 4
#endif

void pd_pack_panels_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
    int64_t panels = (n + PANEL - 1) / PANEL, pairs = (k + 1) / 2;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t i = 0; i < pairs; i++)
            for (int64_t c = 0; c < PANEL; c++)
                for (int64_t half = 0; half < 2; half++) {
                    int64_t col = p * PANEL + c, at = 2 * i + half;
                    packed[((p * pairs + i) * PANEL + c) * 2 + half] =
                        col < n && at < k ? w[col * k + at] : 0;
                }
}

static inline vec low_halves(lanes v) { return (vec)(v << 16); }
static inline vec high_halves(lanes v) { return (vec)(v & 0xFFFF0000u); }

static inline lanes load_lanes(const uint16_t *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* As panel_rows, on bf16 panels with float32 x: the weights widened exactly, the same FMA
 * chain over k in order, so the result equals the float32 kernel's on the widened weights. */
static inline __attribute__((always_inline)) void panel_rows_bf16(const float *x, int64_t k,
                                                                  const uint16_t *panel,
                                                                  int rows,
                                                                  vec acc[PANEL_ROWS][2]) {
    int64_t full = k / 2;
    for (int64_t i = 0; i < full; i++) {
        /* The even k over all rows, then the odd: 4 weight vectors live at a time, not 8. */
        const uint16_t *pair = panel + i * 2 * PANEL;
        lanes a = load_lanes(pair), b = load_lanes(pair + 2 * VEC);
        vec a0 = low_halves(a), b0 = low_halves(b);
        for (int r = 0; r < rows; r++) {
            vec x0 = (vec){0} + x[r * k + 2 * i];
            acc[r][0] += x0 * a0;
            acc[r][1] += x0 * b0;
        }
        vec a1 = high_halves(a), b1 = high_halves(b);
        for (int r = 0; r < rows; r++) {
            vec x1 = (vec){0} + x[r * k + 2 * i + 1];
            acc[r][0] += x1 * a1;
            acc[r][1] += x1 * b1;
        }
    }
    if (k % 2) { /* the last pair's odd half is padding */
        const uint16_t *pair = panel + full * 2 * PANEL;
        lanes a = load_lanes(pair), b = load_lanes(pair + 2 * VEC);
        vec a0 = low_halves(a), b0 = low_halves(b);
        for (int r = 0; r < rows; r++) {
            vec x0 = (vec){0} + x[r * k + 2 * full];
            acc[r][0] += x0 * a0;
            acc[r][1] += x0 * b0;
        }
    }
}

#ifdef __AVX512BF16__
/* As panel_rows_bf16 with `vdpbf16ps`: x is rounded to bf16 pairs first (`xp`, [rows][pairs],
 * as the weights' lanes), each instruction adds 16 columns' products of two k (AVX-512:
 * VEC is 16). */
static inline __attribute__((always_inline)) void panel_rows_dpbf16(const uint32_t *xp,
                                                                    int64_t pairs,
                                                                    const uint16_t *panel,
                                                                    int rows,
                                                                    vec acc[PANEL_ROWS][2]) {
    __m512 sum[PANEL_ROWS][2];
    for (int r = 0; r < rows; r++) {
        sum[r][0] = (__m512)acc[r][0];
        sum[r][1] = (__m512)acc[r][1];
    }
    for (int64_t i = 0; i < pairs; i++) {
        __m512i a = _mm512_loadu_si512(panel + i * 2 * PANEL);
        __m512i b = _mm512_loadu_si512(panel + i * 2 * PANEL + 2 * VEC);
        for (int r = 0; r < rows; r++) {
            __m512i x = _mm512_set1_epi32((int)xp[r * pairs + i]);
            sum[r][0] = _mm512_dpbf16_ps(sum[r][0], (__m512bh)x, (__m512bh)a);
            sum[r][1] = _mm512_dpbf16_ps(sum[r][1], (__m512bh)x, (__m512bh)b);
        }
    }
    for (int r = 0; r < rows; r++) {
        acc[r][0] = (vec)sum[r][0];
        acc[r][1] = (vec)sum[r][1];
    }
}
#endif

/* Whether the bf16 matmul multiplies with `vdpbf16ps` (x rounded to bf16 first) in this build;
 * else it widens the weights (x stays float32). */
int32_t pd_panel_bf16_dot(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* y = x w^T (+ bias) for float32 x [m, k] and y [m, n], on bf16 panels from
 * pd_pack_panels_bf16; the bias float32 or bfloat16 (`bias_bf16`). Threads split the panels
 * as in pd_panel_linear. */
void pd_panel_linear_bf16(const float *x, const uint16_t *packed, const void *bias,
                          int32_t bias_bf16, float *y, int64_t m, int64_t k, int64_t n) {
    int64_t panels = (n + PANEL - 1) / PANEL, pairs = (k + 1) / 2;
#ifdef __AVX512BF16__
    uint32_t *xp = malloc((size_t)(m * pairs) * sizeof *xp);
    if (xp == NULL) abort();
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < pairs; i++) {
            uint32_t even = f32_to_bf16(x[r * k + 2 * i]);
            uint32_t odd = 2 * i + 1 < k ? f32_to_bf16(x[r * k + 2 * i + 1]) : 0;
            xp[r * pairs + i] = even | odd << 16;
        }
#endif
#pragma omp parallel if (m * n * k >= PARALLEL_WORK)
    {
        int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
        int64_t end = panels * (part + 1) / parts;
        for (int64_t p = panels * part / parts; p < end; p++) {
            int64_t col0 = p * PANEL, cols = n - col0 < PANEL ? n - col0 : PANEL;
            const uint16_t *panel = packed + p * pairs * 2 * PANEL;
            for (int64_t row0 = 0; row0 < m; row0 += BF16_ROWS) {
                int rows = m - row0 < BF16_ROWS ? (int)(m - row0) : BF16_ROWS;
                vec acc[PANEL_ROWS][2];
                for (int r = 0; r < PANEL_ROWS; r++) acc[r][0] = acc[r][1] = (vec){0};
#ifdef __AVX512BF16__
#define ROWS(count) panel_rows_dpbf16(xp + row0 * pairs, pairs, panel, count, acc)
#else
#define ROWS(count) panel_rows_bf16(x + row0 * k, k, panel, count, acc)
#endif
                WITH_CONSTANT_ROWS(rows, ROWS)
#undef ROWS
                for (int r = 0; r < rows; r++) {
                    float out[PANEL];
                    memcpy(out, acc[r], sizeof out);
                    float *row = y + (row0 + r) * n + col0;
                    for (int64_t c = 0; c < cols; c++)
                        row[c] = bias != NULL ? out[c] + load_at(bias, col0 + c, bias_bf16)
                                              : out[c];
                }
            }
        }
    }
#ifdef __AVX512BF16__
    free(xp);
#endif
}

/* Rotary tables for `rows` positions (int32 or int64): cos and sin of position * inv_freq,
 * times `scaling`, each half repeated, the sin's first half negated for `rotate`. */
void pd_rotary_cos_sin(const void *positions, int32_t positions_int32, int64_t rows,
                       const float *inv_freq, int64_t half, float scaling, float *cos_out,
                       float *sin_out) {
    for (int64_t r = 0; r < rows; r++) {
        float position = positions_int32 ? (float)((const int32_t *)positions)[r]
                                         : (float)((const int64_t *)positions)[r];
        float *c = cos_out + r * 2 * half, *s = sin_out + r * 2 * half;
        for (int64_t i = 0; i < half; i++) {
            float angle = position * inv_freq[i];
            float cosine = cosf(angle) * scaling, sine = sinf(angle) * scaling;
            c[i] = c[half + i] = cosine;
            s[i] = -sine;
            s[half + i] = sine;
        }
    }
}

/* Rotate-half rotary embedding of one head; `sin` carries its first half negated. */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out,
                          int64_t dim) {
    int64_t half = dim / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + x[i + half] * sin[i];
#pragma omp simd
    for (int64_t i = half; i < dim; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* Eight floats: the unit of the attention loops, written with GCC's vector extension so that
 * they compile to whole-vector loads and FMAs on any x86 (left to the auto-vectoriser, the key
 * loops came out as gathers across keys). Head sizes must be multiples of 8. */
typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef int32_t lanes8 __attribute__((vector_size(32)));
typedef uint32_t ulanes8 __attribute__((vector_size(32)));
typedef uint16_t halves8 __attribute__((vector_size(16)));

/* Eight floats from element `i` of a float32 or bfloat16 (widened: zero-extend, shift) cache. */
static inline vec8 load8_kv(const void *cache, int64_t i, const int bf16) {
    if (!bf16) return load8((const float *)cache + i);
    halves8 h;
    memcpy(&h, (const uint16_t *)cache + i, sizeof h);
    return (vec8)(__builtin_convertvector(h, ulanes8) << 16);
}

/* Stores a head of `dim` floats at element `i` of a float32 or bfloat16 cache. */
static inline void store_kv(void *cache, int64_t i, const float *head, int64_t dim,
                            const int bf16) {
    if (!bf16) {
        memcpy((float *)cache + i, head, dim * sizeof(float));
        return;
    }
    uint16_t *out = (uint16_t *)cache + i;
#pragma omp simd
    for (int64_t j = 0; j < dim; j++) out[j] = f32_to_bf16(head[j]);
}

/* Pairwise sums within each half, as AVX's hadd: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, ...]. */
static inline vec8 hadd8(vec8 a, vec8 b) {
    return __builtin_shuffle(a, b, (lanes8){0, 2, 8, 10, 4, 6, 12, 14}) +
           __builtin_shuffle(a, b, (lanes8){1, 3, 9, 11, 5, 7, 13, 15});
}

/* The sums of eight vectors as one vector: eight dot products finished with seven pairwise
 * additions, instead of one horizontal reduction per key. */
static inline vec8 sum8x8(const vec8 d[8]) {
    vec8 low = hadd8(hadd8(d[0], d[1]), hadd8(d[2], d[3]));
    vec8 high = hadd8(hadd8(d[4], d[5]), hadd8(d[6], d[7]));
    return __builtin_shuffle(low, high, (lanes8){0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(low, high, (lanes8){4, 5, 6, 7, 12, 13, 14, 15});
}

/* Attention of one request's query heads sharing KV head `g` (a GQA group) at decode: rotates
 * the new token's key and the group's queries, writes the key and value to the token's slot,
 * then attends to keys [0, position] with an online softmax over blocks of keys (no score
 * buffer, however long the context). Inlined per head size, so `dim` loops are unrolled. */
static inline __attribute__((always_inline)) void attend_group(
    const float *row, const float *c, const float *s, void *k_cache, void *v_cache,
    const int32_t *pages, int64_t position, int64_t heads, int64_t kv_heads, int64_t g,
    const int64_t dim, int64_t page_size, float scale, float *out, const int kv_bf16) {
    const int64_t group = heads / kv_heads, n8 = dim / 8;
    int64_t slot = (int64_t)pages[position / page_size] * page_size + position % page_size;
    int64_t at = (slot * kv_heads + g) * dim;
    float rotated[dim];
    rotate(row + (heads + g) * dim, c, s, rotated, dim);
    store_kv(k_cache, at, rotated, dim, kv_bf16);
    store_kv(v_cache, at, row + (heads + kv_heads + g) * dim, dim, kv_bf16);

    vec8 q[group][n8], acc[group][n8];
    float top[group], total[group], scores[group][KEY_BLOCK];
    for (int64_t h = 0; h < group; h++) {
        rotate(row + (g * group + h) * dim, c, s, rotated, dim);
        for (int64_t i = 0; i < n8; i++) {
            q[h][i] = load8(rotated + 8 * i) * scale; /* scores come out scaled */
            acc[h][i] = (vec8){0};
        }
        top[h] = -INFINITY;
        total[h] = 0.0f;
    }
    int64_t kv_at[KEY_BLOCK]; /* the block's keys' (and values') elements in the caches */
    int64_t page = 0, offset = 0; /* of the next key: walk the pages, no division per key */
    for (int64_t start = 0; start <= position; start += KEY_BLOCK) {
        int64_t count = position + 1 - start;
        if (count > KEY_BLOCK) count = KEY_BLOCK;
        for (int64_t j = 0; j < count; j++) {
            int64_t key = (((int64_t)pages[page] * page_size + offset) * kv_heads + g) * dim;
            kv_at[j] = key;
            if (++offset == page_size) {
                offset = 0;
                page++;
            }
        }
        for (int64_t h = 0; h < group; h++) {
            float *sc = scores[h];
            float block_top = top[h];
            for (int64_t j0 = 0; j0 < count; j0 += 8) { /* eight keys' scores at a time */
                vec8 dots[8];
                for (int64_t j = 0; j < 8; j++) {
                    dots[j] = (vec8){0};
                    if (j0 + j < count)
                        for (int64_t i = 0; i < n8; i++)
                            dots[j] += q[h][i] * load8_kv(k_cache, kv_at[j0 + j] + 8 * i, kv_bf16);
                }
                vec8 eight = sum8x8(dots);
                memcpy(sc + j0, &eight, sizeof eight); /* KEY_BLOCK is a multiple of 8 */
            }
            for (int64_t j = 0; j < count; j++) block_top = sc[j] > block_top ? sc[j] : block_top;
            /* Rescale what came before to the new maximum (nothing before the first block). */
            float rescale = top[h] == -INFINITY ? 0.0f : exp_f32(top[h] - block_top);
            float sum = total[h] * rescale;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < count; j++) {
                sc[j] = exp_f32(sc[j] - block_top);
                sum += sc[j];
            }
            total[h] = sum;
            for (int64_t i = 0; i < n8; i++) acc[h][i] *= rescale;
            for (int64_t j = 0; j < count; j++)
                for (int64_t i = 0; i < n8; i++)
                    acc[h][i] += sc[j] * load8_kv(v_cache, kv_at[j] + 8 * i, kv_bf16);
            top[h] = block_top;
        }
    }
    for (int64_t h = 0; h < group; h++) {
        float *o = out + (g * group + h) * dim;
        float inv = 1.0f / total[h];
        for (int64_t i = 0; i < n8; i++) {
            vec8 v = acc[h][i] * inv;
            memcpy(o + 8 * i, &v, sizeof v);
        }
    }
}

/* One decode step of attention for a batch, reading the paged cache in place (attend_group per
 * request and KV head, in parallel when there is enough work).
 *
 * qkv: [batch, row_stride] rows of q heads, k heads, v heads (head_dim each);
 * cos, sin: [batch, head_dim]; k_cache, v_cache: [slots, kv_heads, head_dim], float32 or
 * bfloat16 (`kv_bf16`: the new K/V rounded once, after rotary; reads widened);
 * positions: [batch]; table: [batch, table_stride] page ids; out: [batch, heads, head_dim].
 * Everything but the cache is float32, and so is the arithmetic.
 */
void pd_decode_attention(const float *qkv, int64_t row_stride, const float *cos,
                         const float *sin, void *k_cache, void *v_cache,
                         const int32_t *positions, const int32_t *table, int64_t table_stride,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         int64_t page_size, float scale, float *out, int32_t kv_bf16) {
    int64_t keys = 0;
    for (int64_t b = 0; b < batch; b++) keys += positions[b] + 1;
    int64_t work = keys * heads * head_dim * 2;

#pragma omp parallel for collapse(2) schedule(static) if (work >= PARALLEL_WORK)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t g = 0; g < kv_heads; g++) {
            const float *row = qkv + b * row_stride;
            const float *c = cos + b * head_dim, *s = sin + b * head_dim;
            const int32_t *pages = table + b * table_stride;
            float *o = out + b * heads * head_dim;
#define ATTEND(dim, bf16) \
    attend_group(row, c, s, k_cache, v_cache, pages, positions[b], heads, kv_heads, g, dim, \
                 page_size, scale, o, bf16)
#define ATTEND_DIMS(bf16) \
    switch (head_dim) { /* the head sizes of common models, unrolled */ \
    case 64: ATTEND(64, bf16); break; \
    case 128: ATTEND(128, bf16); break; \
    case 32: ATTEND(32, bf16); break; \
    default: ATTEND(head_dim, bf16); \
    }
            if (kv_bf16)
                ATTEND_DIMS(1)
            else
                ATTEND_DIMS(0)
#undef ATTEND_DIMS
#undef ATTEND
        }
    }
}
