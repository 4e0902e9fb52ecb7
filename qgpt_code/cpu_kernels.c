/* Fused CPU kernels for the float32 decode step: one new token per sequence.
 *
 * A decode step on the CPU spends most of its time streaming weights through matrix products,
 * which PyTorch's BLAS does at memory speed. What is left is a few dozen tiny operations per
 * layer (norms, rotary, cache writes, attention over one query, SwiGLU), and in eager PyTorch
 * each costs more in dispatch than in arithmetic. add_rms_norm, decode_attention and swiglu do
 * that work in three calls per layer, the same math as qgpt_code/model.py in float32; int8_matmul
 * is the matrix product for weight-only int8 layers, which BLAS cannot read.
 *
 * Parallel loops use OpenMP when GCC builds the library: loaded after PyTorch, it binds to the
 * libgomp PyTorch has already loaded (same soname), so they share PyTorch's thread pool and thread
 * count. A Clang build (SIMD only, see native.py) runs them on the calling thread.
 *
 * Built on first use by qgpt_code/native.py; every tensor is contiguous: float32, int64 ids, int8 weights.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Eight floats, loadable from any float address (GCC/Clang vector extension). */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
#define LANES 8

/* The even lanes of a then b, plus their odd lanes: neighbouring lanes added, two vectors packed
 * into one. GCC and Clang spell a two-vector shuffle differently. */
#if defined(__clang__)
#define ADD_NEIGHBOURS(a, b) (__builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) + \
                              __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15))
#else
#define ADD_NEIGHBOURS(a, b) (__builtin_shuffle(a, b, (v8i){0, 2, 4, 6, 8, 10, 12, 14}) + \
                              __builtin_shuffle(a, b, (v8i){1, 3, 5, 7, 9, 11, 13, 15}))
#endif

/* The eight lanes' sums of eight vectors: out[i] = sum of x[i]'s lanes. */
static v8 sum_lanes(const v8 x[LANES]) {
    v8 pairs[4], quads[2];
    for (int i = 0; i < 4; i++) pairs[i] = ADD_NEIGHBOURS(x[2 * i], x[2 * i + 1]);
    for (int i = 0; i < 2; i++) quads[i] = ADD_NEIGHBOURS(pairs[2 * i], pairs[2 * i + 1]);
    return ADD_NEIGHBOURS(quads[0], quads[1]);
}

/* scores[j, t] = q[j] . k[t] * scale for a group of queries q (group, head_dim) and keys
 * k (length, head_dim); scores: (group, length). Eight keys at a time, each with its own
 * accumulator so the multiply-adds do not wait on one another, and every query of the group
 * reads the eight while they are in the L1 cache. */
static void score_keys(const float *q, int64_t group, const float *k, int64_t length, int64_t head_dim,
                       float scale, float *scores) {
    int64_t t = 0;
    if (head_dim % LANES == 0) {
        for (; t + LANES <= length; t += LANES) {
            const float *block = k + t * head_dim;
            for (int64_t line = 0; line < LANES * head_dim; line += 16)  /* the block after next */
                __builtin_prefetch(block + 2 * LANES * head_dim + line);
            for (int64_t j = 0; j < group; j++) {
                v8 acc[LANES] = {{0}};
                for (int64_t i = 0; i < head_dim; i += LANES) {
                    const v8 qi = *(const v8 *)(q + j * head_dim + i);
                    for (int key = 0; key < LANES; key++) acc[key] += qi * *(const v8 *)(block + key * head_dim + i);
                }
                *(v8 *)(scores + j * length + t) = sum_lanes(acc) * scale;
            }
        }
    }
    for (; t < length; t++)
        for (int64_t j = 0; j < group; j++) scores[j * length + t] = dot(q + j * head_dim, k + t * head_dim, head_dim) * scale;
}

#define VALUE_BLOCK 32 /* values per pass: 32 rows of up to 128 floats stay in the L1 cache */

/* y[0 : n * LANES] += sum over t in [t0, t1) of w[t] * v[t, 0 : n * LANES], rows of v `stride`
 * apart. Always inlined with a constant n, so the n accumulators live in registers. */
static inline __attribute__((always_inline)) void accumulate_values(
    float *y, const float *w, const float *v, int64_t t0, int64_t t1, int64_t stride, const int n) {
    v8 acc[LANES];
    for (int c = 0; c < n; c++) acc[c] = *(const v8 *)(y + c * LANES);
    for (int64_t t = t0; t < t1; t++)
        for (int c = 0; c < n; c++) acc[c] += w[t] * *(const v8 *)(v + t * stride + c * LANES);
    for (int c = 0; c < n; c++) *(v8 *)(y + c * LANES) = acc[c];
}

/* y[j] = sum over t < length of weights[j, t] * v[t] for a group of weight rows (group, length)
 * and values v (length, head_dim); y: (group, head_dim). Values are taken VALUE_BLOCK rows at a
 * time and every row of weights uses them while they are in the L1 cache; the outputs are
 * accumulated 64, 32, 16 or 8 at a time in vector registers while the block streams past. */
static void weigh_values(const float *weights, int64_t group, const float *v, int64_t length, int64_t head_dim,
                         float *y) {
    memset(y, 0, group * head_dim * sizeof(float));
    for (int64_t t0 = 0; t0 < length; t0 += VALUE_BLOCK) {
        const int64_t t1 = t0 + VALUE_BLOCK < length ? t0 + VALUE_BLOCK : length;
        for (int64_t line = 0; line < VALUE_BLOCK * head_dim; line += 16)  /* the next block */
            __builtin_prefetch(v + t1 * head_dim + line);
        for (int64_t j = 0; j < group; j++) {
            const float *w = weights + j * length;
            float *yj = y + j * head_dim;
            int64_t i = 0;
            for (; i + 8 * LANES <= head_dim; i += 8 * LANES) accumulate_values(yj + i, w, v + i, t0, t1, head_dim, 8);
            if (i + 4 * LANES <= head_dim) { accumulate_values(yj + i, w, v + i, t0, t1, head_dim, 4); i += 4 * LANES; }
            if (i + 2 * LANES <= head_dim) { accumulate_values(yj + i, w, v + i, t0, t1, head_dim, 2); i += 2 * LANES; }
            if (i + LANES <= head_dim) { accumulate_values(yj + i, w, v + i, t0, t1, head_dim, 1); i += LANES; }
            for (int64_t t = t0; t < t1; t++)  /* the last head_dim % 8 outputs, if any */
                for (int64_t r = i; r < head_dim; r++) yj[r] += w[t] * v[t * head_dim + r];
        }
    }
}

/* e^x lane by lane for x <= 0 (Cephes' expf: range reduction to [-ln2/2, ln2/2] and a degree-7
 * polynomial; measured within 1 ulp of expf over [-87, 0]). Below -87 it gives e^-87 (~1e-38) instead of smaller
 * numbers, which a softmax's sum cannot tell apart from them. */
static inline v8 exp_nonpositive(v8 x) {
    const v8 lowest = (v8){0} - 87.0f;
    const v8i below = x < lowest;
    x = (v8)(((v8i)x & ~below) | ((v8i)lowest & below));
    const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  /* round(x / ln 2) */
    const v8 nf = __builtin_convertvector(n, v8);
    const v8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8)((n + 127) << 23);  /* times 2^n, built in the exponent bits */
}

/* Each row of scores (rows, length) replaced by its softmax. */
static void softmax_rows(float *scores, int64_t rows, int64_t length) {
    for (int64_t j = 0; j < rows; j++) {
        float *s = scores + j * length, top = -INFINITY, total = 0.0f;
        int64_t t = 0;
        v8 tops = (v8){0} + s[0], totals = {0};
        for (; t + LANES <= length; t += LANES) {
            const v8 x = *(const v8 *)(s + t);
            tops = (v8)(((v8i)tops & (tops >= x)) | ((v8i)x & (tops < x)));
        }
        for (int lane = 0; lane < LANES; lane++) top = tops[lane] > top ? tops[lane] : top;
        for (; t < length; t++) top = s[t] > top ? s[t] : top;
        for (t = 0; t + LANES <= length; t += LANES) {
            const v8 e = exp_nonpositive(*(const v8 *)(s + t) - top);
            *(v8 *)(s + t) = e;
            totals += e;
        }
        for (int lane = 0; lane < LANES; lane++) total += totals[lane];
        for (; t < length; t++) total += s[t] = expf(s[t] - top);
        const float inverse = 1.0f / total;
#pragma omp simd
        for (t = 0; t < length; t++) s[t] *= inverse;
    }
}

/* h += delta (when delta is not NULL), then out = h / rms(h) * weight, row by row.
 * h, delta, out: (batch, dim); weight: (dim,). */
void add_rms_norm(float *h, const float *delta, const float *weight, float *out,
                  int64_t batch, int64_t dim, float eps) {
    for (int64_t b = 0; b < batch; b++) {
        float *x = h + b * dim;
        float *y = out + b * dim;
        if (delta) {
            const float *d = delta + b * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) x[i] += d[i];
        }
        const float inv_rms = 1.0f / sqrtf(dot(x, x, dim) / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) y[i] = x[i] * inv_rms * weight[i];
    }
}

/* out = silu(gate) * up, where each row of gate_up is [gate (hidden) | up (hidden)].
 * gate_up: (batch, 2 * hidden); out: (batch, hidden). */
void swiglu(const float *gate_up, float *out, int64_t batch, int64_t hidden) {
#pragma omp parallel for schedule(static) if (batch * hidden > (1 << 14))
    for (int64_t b = 0; b < batch; b++) {
        const float *gate = gate_up + b * 2 * hidden;
        const float *up = gate + hidden;
        float *y = out + b * hidden;
        for (int64_t i = 0; i < hidden; i++) y[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

typedef int8_t v8c __attribute__((vector_size(8), aligned(1)));

/* Eight int8 as floats. GCC turns the generic conversion into eight scalar ones, so on x86 say it
 * in AVX2: sign-extend to int32, then convert. */
static inline v8 int8_to_float(const int8_t *p) {
#if defined(__AVX2__)
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    return __builtin_convertvector(*(const v8c *)p, v8);
#endif
}

/* y = x @ w^T * scales for int8 weights: x (batch, in) float, w (out, in) int8 with one scale per
 * output row, y (batch, out). Weight-only int8 reads a quarter of float32's bytes, and decoding is
 * bound by those reads. Eight output rows at a time, converted to float as they are read; the
 * blocks are shared among PyTorch's OpenMP threads. */
void int8_matmul(const float *x, const int8_t *w, const float *scales, float *y,
                 int64_t batch, int64_t in, int64_t out) {
    const int64_t blocks = out / LANES;
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        const int8_t *rows = w + block * LANES * in;
        for (int64_t b = 0; b < batch; b++) {  /* the block's rows stay in cache across the batch */
            const float *xb = x + b * in;
            v8 acc[LANES] = {{0}};
            int64_t i = 0;
            for (; i + LANES <= in; i += LANES) {
                const v8 xi = *(const v8 *)(xb + i);
                for (int r = 0; r < LANES; r++)
                    acc[r] += xi * int8_to_float(rows + r * in + i);
            }
            v8 sums = sum_lanes(acc);
            for (; i < in; i++)
                for (int r = 0; r < LANES; r++) sums[r] += xb[i] * rows[r * in + i];
            *(v8 *)(y + b * out + block * LANES) = sums * *(const v8 *)(scales + block * LANES);
        }
    }
    for (int64_t o = blocks * LANES; o < out; o++)  /* the last out % 8 rows */
        for (int64_t b = 0; b < batch; b++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < in; i++) sum += x[b * in + i] * w[o * in + i];
            y[b * out + o] = sum * scales[o];
        }
}

/* Rotate interleaved pairs (x[2i], x[2i+1]) by the angles whose (cos, sin) are rot[2i], rot[2i+1]:
 * the complex product Meta's rotary embedding is. */
static void rotate(const float *x, const float *rot, float *y, int64_t head_dim) {
    for (int64_t i = 0; i < head_dim; i += 2) {
        const float re = x[i], im = x[i + 1], c = rot[i], s = rot[i + 1];
        y[i] = re * c - im * s;
        y[i + 1] = re * s + im * c;
    }
}

/* One layer's attention for one new token per sequence.
 *
 * qkv: (batch, (n_heads + 2 * n_kv_heads) * head_dim), the fused projection: q heads, k heads, v heads.
 * keys, values: this layer's cache, (rows, n_kv_heads, max_seq_len, head_dim).
 * rope: (positions, head_dim / 2, 2) cos and sin of every position's rotary angles.
 * rows, positions: (batch,) each sequence's cache row and the new token's position.
 * out: (batch, n_heads * head_dim). scratch: batch * n_heads * (head_dim + max_seq_len) floats.
 *
 * For each sequence and kv head: rotates that head's k and its group of q heads (query head h uses
 * kv head h / (n_heads / n_kv_heads)), writes k and v at the sequence's position, and attends the
 * group over positions 0..position (the causal mask of a single query: no masked key is read).
 * (sequence, kv head) pairs are
 * independent, so they are shared among PyTorch's OpenMP threads when there is enough work. */
void decode_attention(const float *qkv, float *keys, float *values, const float *rope,
                      const int64_t *rows, const int64_t *positions, float *out, float *scratch,
                      int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                      int64_t max_seq_len) {
    const int64_t width = (n_heads + 2 * n_kv_heads) * head_dim;
    const int64_t group = n_heads / n_kv_heads;
    const float scale = 1.0f / sqrtf((float)head_dim);
    int64_t keys_read = 0;
    for (int64_t b = 0; b < batch; b++) keys_read += positions[b] + 1;

#pragma omp parallel for collapse(2) schedule(static) if (keys_read * n_heads * head_dim > (1 << 16))
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t g = 0; g < n_kv_heads; g++) {
            const float *src = qkv + b * width;
            const int64_t pos = positions[b], length = pos + 1;
            const float *rot = rope + pos * head_dim;
            float *q = scratch + (b * n_kv_heads + g) * group * (head_dim + max_seq_len);  /* (group, hd) */
            float *scores = q + group * head_dim;  /* (group, length): the heads' attention weights */

            const int64_t head_start = ((rows[b] * n_kv_heads + g) * max_seq_len) * head_dim;
            float *k = keys + head_start, *v = values + head_start;
            rotate(src + (n_heads + g) * head_dim, rot, k + pos * head_dim, head_dim);
            memcpy(v + pos * head_dim, src + (n_heads + n_kv_heads + g) * head_dim, head_dim * sizeof(float));
            for (int64_t j = 0; j < group; j++)
                rotate(src + (g * group + j) * head_dim, rot, q + j * head_dim, head_dim);

            score_keys(q, group, k, length, head_dim, scale, scores);
            softmax_rows(scores, group, length);
            weigh_values(scores, group, v, length, head_dim, out + (b * n_heads + g * group) * head_dim);
        }
    }
}
