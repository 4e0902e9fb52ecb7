/* Fused CPU kernels for the float32 decode step: one new token per sequence.
 *
 * A decode step on the CPU spends most of its time streaming weights through matrix products,
 * which PyTorch's BLAS does at memory speed. What is left is a few dozen tiny operations per
 * layer (norms, rotary, cache writes, attention over one query, SwiGLU), and in eager PyTorch
 * each costs more in dispatch than in arithmetic. add_rms_norm, decode_attention and swiglu do
 * that work in three calls per layer, the same math as qgpt_code/model.py in float32; int8_matmul
 * is the matrix product for weight-only int8 layers, which BLAS cannot read.
 *
 * The KV cache is paged (qgpt_code/kv_cache.py): a pool of fixed-size blocks, a sequence's anywhere
 * in it, in the order its block table lists. decode_attention reads and writes the cache through the
 * tables, in place: gathering a sequence's blocks into one copy would triple attention's memory traffic.
 *
 * Parallel loops use OpenMP when GCC builds the library: loaded after PyTorch, it binds to the
 * libgomp PyTorch has already loaded (same soname), so they share PyTorch's thread pool and thread
 * count. A Clang build (SIMD only, see native.py) runs them on the calling thread.
 *
 * Built on first use by qgpt_code/native.py; every tensor is contiguous: float32, int64 ids and block
 * tables, int8 weights.
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

/* One kv head's keys or values for one sequence in the paged cache: position t is row
 * t % block_size of block table[t / block_size], and a block's rows for the head are contiguous,
 * (block_size, head_dim). Positions 0..length-1 lie in the first `blocks` blocks of the table. */
typedef struct {
    const float *head;     /* the head's rows in block 0 of the pool: the cache + g * block_size * head_dim */
    const int64_t *table;  /* the sequence's block ids */
    int64_t blocks, block_size, block_stride, head_dim;  /* block_stride: floats from one pool block to the next */
    int64_t ahead_blocks, ahead_rows, touch_blocks;  /* PREFETCH_AHEAD as blocks and rows; TOUCH_AHEAD in blocks */
} paged;

/* A sequence's blocks lie anywhere in the pool, so the hardware prefetcher, which follows addresses,
 * stalls at the start of every block: the kernels prefetch each row's lines PREFETCH_AHEAD positions
 * before reading it. A prefetch to a page missing from the TLB may do nothing, so each block's pages
 * are touched, one prefetch per page, TOUCH_AHEAD positions before that. Measured on an EPYC (blocks
 * of 16, head_dim 64, the cache in DRAM): the line prefetches alone left attention at 1.3x the time
 * of a contiguous cache, with the touches 1.05-1.15x; 40 positions beat 32, 48 and 64. */
#define PREFETCH_AHEAD 40
#define TOUCH_AHEAD 64
#define PAGE_FLOATS 1024 /* 4 KiB */

static paged paged_head(const float *cache, const int64_t *table, int64_t length, int64_t g, int64_t n_kv_heads,
                        int64_t block_size, int64_t head_dim) {
    const int64_t head_size = block_size * head_dim;
    return (paged){cache + g * head_size, table, (length + block_size - 1) / block_size, block_size,
                   n_kv_heads * head_size, head_dim, PREFETCH_AHEAD / block_size, PREFETCH_AHEAD % block_size,
                   (TOUCH_AHEAD + block_size - 1) / block_size};
}

static inline const float *block_rows(const paged *p, int64_t block) {  /* (block_size, head_dim) */
    return p->head + p->table[block] * p->block_stride;
}

/* Rows in block i (all of them but in the last, which may be partial) of positions 0..length-1. */
static inline int64_t rows_in(const paged *p, int64_t i, int64_t length) {
    const int64_t left = length - i * p->block_size;
    return left < p->block_size ? left : p->block_size;
}

/* The prefetches below are always inlined: GCC takes a function that only prefetches for one without
 * effects, and drops its calls. */

/* Prefetch the `count` positions PREFETCH_AHEAD after row `row` of block i (within the first blocks). */
static inline __attribute__((always_inline)) void prefetch_ahead(const paged *p, int64_t i, int64_t row,
                                                                 int64_t count) {
    int64_t block = i + p->ahead_blocks, offset = row + p->ahead_rows;
    if (offset >= p->block_size) { block++; offset -= p->block_size; }
    for (; count > 0 && block < p->blocks; block++, offset = 0) {
        const int64_t run = count < p->block_size - offset ? count : p->block_size - offset;
        const float *rows = block_rows(p, block) + offset * p->head_dim;
        for (int64_t line = 0; line < run * p->head_dim; line += 16) __builtin_prefetch(rows + line);
        count -= run;
    }
}

/* Touch every page of the block TOUCH_AHEAD positions (rounded up to blocks) after block i. */
static inline __attribute__((always_inline)) void touch_ahead(const paged *p, int64_t i) {
    if (i + p->touch_blocks >= p->blocks) return;
    const float *rows = block_rows(p, i + p->touch_blocks);
    const int64_t size = p->block_size * p->head_dim;
    for (int64_t page = 0; page < size; page += PAGE_FLOATS) __builtin_prefetch(rows + page);
    __builtin_prefetch(rows + size - 1);  /* the last page, when the rows do not start one */
}

/* scores[j, t] = q[j] . k[t] * scale for a group of queries q (group, head_dim) and the keys of
 * positions 0..length-1; scores: (group, length). Block by block, eight keys at a time, each with
 * its own accumulator so the multiply-adds do not wait on one another, and every query of the group
 * reads the eight while they are in the L1 cache. */
static void score_keys(const float *q, int64_t group, const paged *k, int64_t length, float scale, float *scores) {
    const int64_t head_dim = k->head_dim;
    for (int64_t i = 0; i < k->blocks; i++) {
        const float *keys = block_rows(k, i);
        touch_ahead(k, i);
        const int64_t rows = rows_in(k, i, length);
        float *s = scores + i * k->block_size;
        int64_t t = 0;
        if (head_dim % LANES == 0) {
            for (; t + LANES <= rows; t += LANES) {
                const float *eight = keys + t * head_dim;
                prefetch_ahead(k, i, t, LANES);
                for (int64_t j = 0; j < group; j++) {
                    v8 acc[LANES] = {{0}};
                    for (int64_t d = 0; d < head_dim; d += LANES) {
                        const v8 qd = *(const v8 *)(q + j * head_dim + d);
                        for (int key = 0; key < LANES; key++) acc[key] += qd * *(const v8 *)(eight + key * head_dim + d);
                    }
                    *(v8 *)(s + j * length + t) = sum_lanes(acc) * scale;
                }
            }
        }
        if (t < rows) prefetch_ahead(k, i, t, rows - t);
        for (; t < rows; t++)
            for (int64_t j = 0; j < group; j++)
                s[j * length + t] = dot(q + j * head_dim, keys + t * head_dim, head_dim) * scale;
    }
}

#define VALUE_BLOCK 32 /* values per pass: 32 rows of up to 128 floats stay in the L1 cache */

/* Positions [start, end) of a pass whose values are the rows from `rows` on, in one cache block. */
typedef struct {
    const float *rows;
    int64_t start, end;
} segment;

/* y[0 : n * LANES] += sum over the pass's positions t of w[t] * v[t, d : d + n * LANES], the values
 * in `count` segments. Always inlined with a constant n, so the n accumulators live in registers
 * for the whole pass, across its blocks. */
static inline __attribute__((always_inline)) void accumulate_values(
    float *y, const float *w, const segment *pass, int count, int64_t head_dim, int64_t d, const int n) {
    v8 acc[LANES];
    for (int c = 0; c < n; c++) acc[c] = *(const v8 *)(y + c * LANES);
    for (int s = 0; s < count; s++) {
        const float *v = pass[s].rows + d;
        for (int64_t t = pass[s].start; t < pass[s].end; t++, v += head_dim)
            for (int c = 0; c < n; c++) acc[c] += w[t] * *(const v8 *)(v + c * LANES);
    }
    for (int c = 0; c < n; c++) *(v8 *)(y + c * LANES) = acc[c];
}

/* y[j] = sum over t < length of weights[j, t] * v[t] for a group of weight rows (group, length)
 * and the values of positions 0..length-1; y: (group, head_dim). Values are taken VALUE_BLOCK
 * positions at a time, from as many cache blocks as they lie in, and every row of weights uses them
 * while they are in the L1 cache; the outputs are accumulated 64, 32, 16 or 8 at a time in vector
 * registers while the pass streams past. */
static void weigh_values(const float *weights, int64_t group, const paged *v, int64_t length, float *y) {
    const int64_t head_dim = v->head_dim, block_size = v->block_size;
    int64_t block = 0, offset = 0;  /* where the pass starts */
    memset(y, 0, group * head_dim * sizeof(float));
    for (int64_t t0 = 0; t0 < length; t0 += VALUE_BLOCK) {
        const int64_t t1 = t0 + VALUE_BLOCK < length ? t0 + VALUE_BLOCK : length;
        segment pass[VALUE_BLOCK];  /* at most one block per position */
        int count = 0;
        for (int64_t t = t0; t < t1; count++) {
            const int64_t run = t1 - t < block_size - offset ? t1 - t : block_size - offset;
            if (offset == 0) touch_ahead(v, block);
            prefetch_ahead(v, block, offset, run);
            pass[count] = (segment){block_rows(v, block) + offset * head_dim, t, t + run};
            t += run, offset += run;
            if (offset == block_size) block++, offset = 0;
        }
        for (int64_t j = 0; j < group; j++) {
            const float *w = weights + j * length;
            float *yj = y + j * head_dim;
            int64_t d = 0;
            for (; d + 8 * LANES <= head_dim; d += 8 * LANES) accumulate_values(yj + d, w, pass, count, head_dim, d, 8);
            if (d + 4 * LANES <= head_dim) { accumulate_values(yj + d, w, pass, count, head_dim, d, 4); d += 4 * LANES; }
            if (d + 2 * LANES <= head_dim) { accumulate_values(yj + d, w, pass, count, head_dim, d, 2); d += 2 * LANES; }
            if (d + LANES <= head_dim) { accumulate_values(yj + d, w, pass, count, head_dim, d, 1); d += LANES; }
            for (int s = 0; s < count && d < head_dim; s++)  /* the last head_dim % 8 outputs, if any */
                for (int64_t t = pass[s].start; t < pass[s].end; t++)
                    for (int64_t r = d; r < head_dim; r++)
                        yj[r] += w[t] * pass[s].rows[(t - pass[s].start) * head_dim + r];
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

/* One layer's attention for one new token per sequence, on the paged cache.
 *
 * qkv: (batch, (n_heads + 2 * n_kv_heads) * head_dim), the fused projection: q heads, k heads, v heads.
 * keys, values: this layer's cache, (n_blocks, n_kv_heads, block_size, head_dim).
 * rope: (positions, head_dim / 2, 2) cos and sin of every position's rotary angles.
 * tables: (batch, table_width) each sequence's block ids: position p is row p % block_size of block
 * tables[b, p / block_size]. positions: (batch,) the new token's position, below max_length.
 * out: (batch, n_heads * head_dim). scratch: batch * n_heads * (head_dim + max_length) floats.
 *
 * For each sequence and kv head: rotates that head's k and its group of q heads (query head h uses
 * kv head h / (n_heads / n_kv_heads)), writes k and v at the sequence's position, and attends the
 * group over positions 0..position (the causal mask of a single query: no masked key is read),
 * block by block in the table's order, reading the cache where it lies (no gathered copy).
 * (sequence, kv head) pairs are independent, so they are shared among PyTorch's OpenMP threads
 * when there is enough work. */
void decode_attention(const float *qkv, float *keys, float *values, const float *rope,
                      const int64_t *tables, int64_t table_width, const int64_t *positions,
                      float *out, float *scratch, int64_t batch, int64_t n_heads, int64_t n_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_length) {
    const int64_t width = (n_heads + 2 * n_kv_heads) * head_dim;
    const int64_t group = n_heads / n_kv_heads;
    const float scale = 1.0f / sqrtf((float)head_dim);
    int64_t keys_read = 0;
    for (int64_t b = 0; b < batch; b++) keys_read += positions[b] + 1;

#pragma omp parallel for collapse(2) schedule(static) if (keys_read * n_heads * head_dim > (1 << 16))
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t g = 0; g < n_kv_heads; g++) {
            const float *src = qkv + b * width;
            const int64_t *table = tables + b * table_width;
            const int64_t pos = positions[b], length = pos + 1;
            const float *rot = rope + pos * head_dim;
            float *q = scratch + (b * n_kv_heads + g) * group * (head_dim + max_length);  /* (group, hd) */
            float *scores = q + group * head_dim;  /* (group, length): the heads' attention weights */
            const paged k = paged_head(keys, table, length, g, n_kv_heads, block_size, head_dim);
            const paged v = paged_head(values, table, length, g, n_kv_heads, block_size, head_dim);

            /* The new token's k and v: row pos % block_size of the head in block table[pos / block_size]. */
            const int64_t slot =
                ((table[pos / block_size] * n_kv_heads + g) * block_size + pos % block_size) * head_dim;
            rotate(src + (n_heads + g) * head_dim, rot, keys + slot, head_dim);
            memcpy(values + slot, src + (n_heads + n_kv_heads + g) * head_dim, head_dim * sizeof(float));
            for (int64_t j = 0; j < group; j++)
                rotate(src + (g * group + j) * head_dim, rot, q + j * head_dim, head_dim);

            score_keys(q, group, &k, length, scale, scores);
            softmax_rows(scores, group, length);
            weigh_values(scores, group, &v, length, out + (b * n_heads + g * group) * head_dim);
        }
    }
}
