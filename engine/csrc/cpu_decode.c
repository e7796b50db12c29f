/* CPU kernels for a decoder layer's decode step (float32): its matmuls and what lies between
 * them.
 *
 * Why: at decode batch sizes each of these is a few microseconds of arithmetic, but as torch
 * ops they cost tens of microseconds of dispatch, allocation and threading each (a packed
 * oneDNN linear ~14 us a call before any arithmetic), more than the arithmetic itself. Built on
 * first use by engine/cpu_kernels.py (gcc -O3 -march=native -fopenmp, linking the OpenMP
 * runtime torch already loaded) and called through ctypes.
 *
 * Layouts are the engine's: row-major activations, the paged KV cache of one layer viewed as
 * [slots, kv_heads, head_dim] (slot = page * page_size + offset), int32 page tables.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

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

/* out = weight * x / rms(x), where x = input + residual (written to `sum`) or, without a
 * residual, the input itself. The mean of squares accumulates in double. */
void pd_add_rms_norm(const float *input, const float *residual, const float *weight,
                     float *sum, float *out, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *x = input + r * n;
        if (residual != NULL) {
            const float *res = residual + r * n;
            float *s = sum + r * n;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) s[i] = x[i] + res[i];
            x = s;
        }
        double squares = 0.0;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < n; i++) squares += (double)x[i] * (double)x[i];
        float inv = 1.0f / sqrtf((float)(squares / (double)n) + eps);
        float *o = out + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = weight[i] * (x[i] * inv);
    }
}

/* SwiGLU's activation: out[r, i] = silu(gate[r, i]) * up[r, i], gate and up side by side in
 * one [rows, 2 * inter] matmul output. */
void pd_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * inter;
        const float *u = g + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}

/* One vector register of floats, the unit of the decode matmul: sixteen with AVX-512, eight
 * elsewhere (AVX2). A wider vector type than the machine's registers would double the
 * register tile below past AVX2's sixteen registers, and the spilled accumulators made the
 * matmul ~30x slower there. */
#ifdef __AVX512F__
#define VEC 16
#else
#define VEC 8
#endif
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static inline vec loadv(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

#define PANEL (2 * VEC) /* output columns per panel of the packed weight: two vectors */
#define PANEL_ROWS 6 /* rows of x per register tile: 12 accumulators, 15 registers in all */

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
 * a row's result does not depend on the rows beside it). Inlined, and called with the constant
 * PANEL_ROWS for full tiles: with the row count a variable, GCC keeps the accumulators in
 * memory. */
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
    if (rows == PANEL_ROWS)
        panel_rows(x, k, panel, PANEL_ROWS, acc);
    else
        panel_rows(x, k, panel, rows, acc);
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
    const float *row, const float *c, const float *s, float *k_cache, float *v_cache,
    const int32_t *pages, int64_t position, int64_t heads, int64_t kv_heads, int64_t g,
    const int64_t dim, int64_t page_size, float scale, float *out) {
    const int64_t group = heads / kv_heads, n8 = dim / 8;
    int64_t slot = (int64_t)pages[position / page_size] * page_size + position % page_size;
    int64_t at = (slot * kv_heads + g) * dim;
    rotate(row + (heads + g) * dim, c, s, k_cache + at, dim);
    memcpy(v_cache + at, row + (heads + kv_heads + g) * dim, dim * sizeof(float));

    vec8 q[group][n8], acc[group][n8];
    float top[group], total[group], scores[group][KEY_BLOCK], rotated[dim];
    for (int64_t h = 0; h < group; h++) {
        rotate(row + (g * group + h) * dim, c, s, rotated, dim);
        for (int64_t i = 0; i < n8; i++) {
            q[h][i] = load8(rotated + 8 * i) * scale; /* scores come out scaled */
            acc[h][i] = (vec8){0};
        }
        top[h] = -INFINITY;
        total[h] = 0.0f;
    }
    const float *kp[KEY_BLOCK], *vp[KEY_BLOCK];
    int64_t page = 0, offset = 0; /* of the next key: walk the pages, no division per key */
    for (int64_t start = 0; start <= position; start += KEY_BLOCK) {
        int64_t count = position + 1 - start;
        if (count > KEY_BLOCK) count = KEY_BLOCK;
        for (int64_t j = 0; j < count; j++) {
            int64_t key = (((int64_t)pages[page] * page_size + offset) * kv_heads + g) * dim;
            kp[j] = k_cache + key;
            vp[j] = v_cache + key;
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
                            dots[j] += q[h][i] * load8(kp[j0 + j] + 8 * i);
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
                for (int64_t i = 0; i < n8; i++) acc[h][i] += sc[j] * load8(vp[j] + 8 * i);
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
 * cos, sin: [batch, head_dim]; k_cache, v_cache: [slots, kv_heads, head_dim];
 * positions: [batch]; table: [batch, table_stride] page ids; out: [batch, heads, head_dim].
 */
void pd_decode_attention(const float *qkv, int64_t row_stride, const float *cos,
                         const float *sin, float *k_cache, float *v_cache,
                         const int32_t *positions, const int32_t *table, int64_t table_stride,
                         int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         int64_t page_size, float scale, float *out) {
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
#define ATTEND(dim) \
    attend_group(row, c, s, k_cache, v_cache, pages, positions[b], heads, kv_heads, g, dim, \
                 page_size, scale, o)
            switch (head_dim) { /* the head sizes of common models, unrolled */
            case 64: ATTEND(64); break;
            case 128: ATTEND(128); break;
            case 32: ATTEND(32); break;
            default: ATTEND(head_dim);
            }
#undef ATTEND
        }
    }
}
