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
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Threads for every parallel loop here: 0 (OpenMP's default, PyTorch's thread count) or a number.
 * On a machine busy with other work each fork-join waits for whichever thread the OS has put
 * aside, so cpu_decode.py measures steps both ways and may ask for one thread (see ThreadTuner). */
static int kernel_threads = 0;

void quant_set_threads(int64_t n) { kernel_threads = (int)n; }

#ifdef _OPENMP
#include <omp.h>
static int kernel_thread_count(void) { return kernel_threads > 0 ? kernel_threads : omp_get_max_threads(); }
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
#pragma omp parallel for schedule(static) if (batch * hidden > (1 << 14)) num_threads(kernel_thread_count())
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
#pragma omp parallel for schedule(static) num_threads(kernel_thread_count())
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

    /* Every row's new k and v before any row attends: rows may be consecutive positions of one
     * sequence (speculative decoding feeds guessed tokens that way), each attending to those before it.
     * Row b's go to row pos % block_size of the head in block table[pos / block_size]. */
    for (int64_t b = 0; b < batch; b++) {
        const float *src = qkv + b * width;
        const int64_t *table = tables + b * table_width;
        const int64_t pos = positions[b];
        for (int64_t g = 0; g < n_kv_heads; g++) {
            const int64_t slot =
                ((table[pos / block_size] * n_kv_heads + g) * block_size + pos % block_size) * head_dim;
            rotate(src + (n_heads + g) * head_dim, rope + pos * head_dim, keys + slot, head_dim);
            memcpy(values + slot, src + (n_heads + n_kv_heads + g) * head_dim, head_dim * sizeof(float));
        }
    }

#pragma omp parallel for collapse(2) schedule(static) if (keys_read * n_heads * head_dim > (1 << 16)) num_threads(kernel_thread_count())
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

            for (int64_t j = 0; j < group; j++)
                rotate(src + (g * group + j) * head_dim, rot, q + j * head_dim, head_dim);

            score_keys(q, group, &k, length, scale, scores);
            softmax_rows(scores, group, length);
            weigh_values(scores, group, &v, length, out + (b * n_heads + g * group) * head_dim);
        }
    }
}

/* ---- Block-quantized weights: GGUF's Q4_0, Q4_1 and Q8_0, read as stored -------------------------
 *
 * A row of weights is a run of blocks of 32 values (ggml's layouts, as GGUF files store them):
 *   Q4_0 (18 bytes): fp16 d, 16 bytes of 4-bit q;  w = (q - 8) * d
 *   Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes;      w = q * d + m
 *   Q8_0 (34 bytes): fp16 d, 32 int8 q;             w = q * d
 * In a 4-bit block, byte j holds value j in its low nibble and value j + 16 in its high one.
 *
 * Decoding reads every weight once per token, so reading 4.5-8.5 bits per weight instead of 32 is
 * the whole point. quant_matmul multiplies such rows by activations that it first quantizes per
 * block of 32 to integers qx on a float step dx, with the block's sum sx = dx * sum(qx) (llama.cpp's
 * Q8_1): a block's contribution is then one integer dot product and two multiply-adds,
 *   dw * dx * sum(qw * qx) + mw * sx      (mw = m for Q4_1, -8 * dw for Q4_0, 0 for Q8_0)
 * with qw the stored nibbles (0..15) or int8 values. llama.cpp rounds activations to 8 bits; that
 * moved SmolLM2's logits to a cosine of 0.998 against the float model, so here qx has 16 bits, held
 * as two int8 planes, qx = 256 * hi + lo (hi = round(x / d) with d = max|x| / 127, lo the remainder
 * in steps of d / 256): two integer dot products per block instead of one, cheap next to reading
 * the weights, and the logits' cosine is 0.9999. There are three implementations, chosen at run
 * time by what the CPU can do (or by the caller, for tests): portable C, AVX2 (one block per
 * vector, u8 x s8 products by vpmaddubsw) and AVX-512 with VNNI (two blocks per vector, vpdpbusd).
 * They compute the same sums in different orders: results agree to float32 rounding.
 */

#define QK 32
enum { FMT_Q4_0 = 2, FMT_Q4_1 = 3, FMT_Q8_0 = 8 }; /* ggml's type ids (gguf.GGMLQuantizationType) */
enum { ISA_BEST = -1, ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

typedef struct { uint16_t d; uint8_t qs[QK / 2]; } block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;

_Static_assert(sizeof(block_q4_0) == 18 && sizeof(block_q4_1) == 20 && sizeof(block_q8_0) == 34, "ggml layouts");

/* Bytes of one block of `fmt`; 0 for a format these kernels do not know. */
int64_t quant_block_bytes(int64_t fmt) {
    switch (fmt) {
    case FMT_Q4_0: return sizeof(block_q4_0);
    case FMT_Q4_1: return sizeof(block_q4_1);
    case FMT_Q8_0: return sizeof(block_q8_0);
    default: return 0;
    }
}

static inline float half_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

static inline uint16_t float_to_half(float x) {  /* round to nearest even, as numpy's astype(float16) */
    const _Float16 f = (_Float16)x;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
}

/* The block's float weights; out: 32 floats. */
static inline void dequantize_block(int64_t fmt, const uint8_t *block, float *out) {
    if (fmt == FMT_Q8_0) {
        const block_q8_0 *b = (const block_q8_0 *)block;
        const float d = half_to_float(b->d);
        for (int j = 0; j < QK; j++) out[j] = b->qs[j] * d;
        return;
    }
    const uint8_t *qs = fmt == FMT_Q4_1 ? ((const block_q4_1 *)block)->qs : ((const block_q4_0 *)block)->qs;
    const float d = half_to_float(*(const uint16_t *)block);
    const float m = fmt == FMT_Q4_1 ? half_to_float(((const block_q4_1 *)block)->m) : -8.0f * d;
    for (int j = 0; j < QK / 2; j++) {
        out[j] = (qs[j] & 0x0F) * d + m;
        out[j + QK / 2] = (qs[j] >> 4) * d + m;
    }
}


/* Blocks of `fmt` (Q8_0, Q4_0 or Q4_1) for float rows w (rows, in), as ggml's reference quantizers
 * make them: Q8_0 d = max|x| / 127, q = round(x / d); Q4_0 d = -(the value of largest magnitude) / 8,
 * q = min(15, trunc(x / d + 8.5)); Q4_1 d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)). */
void quant_quantize(int64_t fmt, const float *w, uint8_t *out, int64_t rows, int64_t in) {
    const int64_t nb = in / QK, bytes = quant_block_bytes(fmt);
#pragma omp parallel for schedule(static) if (rows * in > (1 << 16)) num_threads(kernel_thread_count())
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < nb; i++) {
            const float *x = w + r * in + i * QK;
            uint8_t *block = out + (r * nb + i) * bytes;
            if (fmt == FMT_Q8_0) {
                block_q8_0 *b = (block_q8_0 *)block;
                float amax = 0.0f;
                for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
                const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
                b->d = float_to_half(d);
                for (int j = 0; j < QK; j++) b->qs[j] = (int8_t)roundf(x[j] * id);
            } else if (fmt == FMT_Q4_0) {
                block_q4_0 *b = (block_q4_0 *)block;
                float amax = 0.0f, max = 0.0f;
                for (int j = 0; j < QK; j++)
                    if (fabsf(x[j]) > amax) amax = fabsf(x[j]), max = x[j];
                const float d = max / -8.0f, id = d ? 1.0f / d : 0.0f;
                b->d = float_to_half(d);
                for (int j = 0; j < QK / 2; j++) {
                    const int lo = (int)(x[j] * id + 8.5f), hi = (int)(x[j + QK / 2] * id + 8.5f);
                    b->qs[j] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
                }
            } else {
                block_q4_1 *b = (block_q4_1 *)block;
                float min = x[0], max = x[0];
                for (int j = 1; j < QK; j++) min = fminf(min, x[j]), max = fmaxf(max, x[j]);
                const float d = (max - min) / 15.0f, id = d ? 1.0f / d : 0.0f;
                b->d = float_to_half(d), b->m = float_to_half(min);
                for (int j = 0; j < QK / 2; j++) {
                    const int lo = (int)((x[j] - min) * id + 0.5f), hi = (int)((x[j + QK / 2] - min) * id + 0.5f);
                    b->qs[j] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
                }
            }
        }
    }
}

/* Activations x (n_blocks * 32 floats) as 16-bit blocks in two int8 planes, x ~ (256 * hi + lo) * dx:
 * hi = round(x / d) with d = max|x| / 127, lo = round of the remainder in steps dx = d / 256
 * (clamped to +-127: a remainder of exactly half a step loses 1/256 of d); sx = dx * sum(256 hi + lo).
 * Written so the compiler vectorizes it (nearbyintf: round half to even). */
void quant_activations(const float *x, int64_t n_blocks, int8_t *hi, int8_t *lo, float *dx, float *sx) {
    for (int64_t i = 0; i < n_blocks; i++) {
        const float *xi = x + i * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xi[j]));
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const float v = xi[j] * id, h = nearbyintf(v);
            const float l = fminf(fmaxf(nearbyintf((v - h) * 256.0f), -127.0f), 127.0f);
            hi[i * QK + j] = (int8_t)h, lo[i * QK + j] = (int8_t)l;
            sum += 256 * (int)h + (int)l;
        }
        dx[i] = d / 256.0f, sx[i] = d / 256.0f * (float)sum;
    }
}

/* What one product needs to know about its activations: (batch, in) quantized, nb blocks per row. */
typedef struct {
    const int8_t *hi, *lo;
    const float *d, *s;
    int64_t nb, in;
} qact;

/* Per-block scale and offset of a weight block: w = qw * dw + mw (qw: nibble or int8). */
static inline void block_scale(int64_t fmt, const uint8_t *block, float *dw, float *mw) {
    *dw = half_to_float(*(const uint16_t *)block);
    *mw = fmt == FMT_Q4_1 ? half_to_float(((const block_q4_1 *)block)->m) : fmt == FMT_Q4_0 ? -8.0f * *dw : 0.0f;
}

static inline const uint8_t *block_quants(int64_t fmt, const uint8_t *block) {
    return block + (fmt == FMT_Q4_1 ? 4 : 2);
}

/* y[b * ldy + o] for rows o in [o0, o1) and all b < batch, in portable C. */
static void qrows_portable(int64_t fmt, const uint8_t *w, int64_t row_bytes, const qact *a, int64_t batch,
                           float *y, int64_t ldy, int64_t o0, int64_t o1) {
    const int64_t bytes = quant_block_bytes(fmt);
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = w + o * row_bytes;
        for (int64_t b = 0; b < batch; b++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < a->nb; i++) {
                const uint8_t *block = row + i * bytes, *qs = block_quants(fmt, block);
                const int8_t *hi = a->hi + b * a->in + i * QK, *lo = a->lo + b * a->in + i * QK;
                float dw, mw;
                block_scale(fmt, block, &dw, &mw);
                int32_t sum_hi = 0, sum_lo = 0;
                if (fmt == FMT_Q8_0) {
                    /* int8 through an int8_t pointer: GCC 12 at -march=native (VNNI) vectorized
                     * (int8_t)qs[j] * x[j] into wrong sums, caught by tests/test_cpu_quant.py */
                    const int8_t *qw = (const int8_t *)qs;
                    for (int j = 0; j < QK; j++) sum_hi += qw[j] * hi[j], sum_lo += qw[j] * lo[j];
                } else {
                    for (int j = 0; j < QK / 2; j++) {
                        sum_hi += (qs[j] & 0x0F) * hi[j] + (qs[j] >> 4) * hi[j + QK / 2];
                        sum_lo += (qs[j] & 0x0F) * lo[j] + (qs[j] >> 4) * lo[j + QK / 2];
                    }
                }
                acc += dw * a->d[b * a->nb + i] * (float)(256 * sum_hi + sum_lo) + mw * a->s[b * a->nb + i];
            }
            y[b * ldy + o] = acc;
        }
    }
}

/* The same product with float activations: each block dequantized once (to registers, or here to
 * 32 floats on the stack) and used by every batch row. Exact but for float32 rounding, and at a
 * batch of several rows cheaper than the integer path, whose per-row work is larger. */
static void frows_portable(int64_t fmt, const uint8_t *w, int64_t row_bytes, const float *x, int64_t in,
                           int64_t batch, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    const int64_t bytes = quant_block_bytes(fmt), nb = in / QK;
    for (int64_t o = o0; o < o1; o++)
        for (int64_t b0 = 0; b0 < batch; b0 += 8) {
            const int64_t tile = batch - b0 < 8 ? batch - b0 : 8;
            float acc[8][QK] = {{0}}, wf[QK];
            for (int64_t i = 0; i < nb; i++) {
                dequantize_block(fmt, w + o * row_bytes + i * bytes, wf);
                for (int64_t b = 0; b < tile; b++) {
                    const float *xb = x + (b0 + b) * in + i * QK;
                    for (int j = 0; j < QK; j++) acc[b][j] += wf[j] * xb[j];
                }
            }
            for (int64_t b = 0; b < tile; b++) {
                float sum = 0.0f;
                for (int j = 0; j < QK; j++) sum += acc[b][j];
                y[(b0 + b) * ldy + o] = sum;
            }
        }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))
#define MAX_TILE 8 /* batch rows per pass over a weight row */

/* A block's 32 weights as bytes in value order: the nibbles (0..15), or the int8 values. */
INLINE TARGET_AVX2 __m256i load_weights_avx2(int64_t fmt, const uint8_t *qs) {
    if (fmt == FMT_Q8_0) return _mm256_loadu_si256((const __m256i *)qs);
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

INLINE TARGET_AVX2 float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* One weight row against `tile` batch rows (a constant where inlined): one block per step; the
 * unpacked block is used by every batch row while it sits in a register. */
INLINE TARGET_AVX2 void qrow_avx2(int64_t fmt, const uint8_t *row, const qact *a, float *y, int64_t ldy,
                                  const int tile) {
    const int64_t bytes = quant_block_bytes(fmt);
    __m256 acc[MAX_TILE];
    float offset[MAX_TILE];
    for (int b = 0; b < tile; b++) acc[b] = _mm256_setzero_ps(), offset[b] = 0.0f;
    for (int64_t i = 0; i < a->nb; i++) {
        const uint8_t *block = row + i * bytes;
        float dw, mw;
        block_scale(fmt, block, &dw, &mw);
        __m256i w = load_weights_avx2(fmt, block_quants(fmt, block));
        const __m256i signs = w;  /* Q8_0: maddubs wants unsigned weights, so |w| times x with w's sign */
        if (fmt == FMT_Q8_0) w = _mm256_sign_epi8(w, w);
        for (int b = 0; b < tile; b++) {
            __m256i hi = _mm256_loadu_si256((const __m256i *)(a->hi + b * a->in + i * QK));
            __m256i lo = _mm256_loadu_si256((const __m256i *)(a->lo + b * a->in + i * QK));
            if (fmt == FMT_Q8_0) hi = _mm256_sign_epi8(hi, signs), lo = _mm256_sign_epi8(lo, signs);
            /* pairs of products (int16), summed into int32 with weights 256 (hi) and 1 (lo) */
            const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, hi), _mm256_set1_epi16(256)),
                                                  _mm256_madd_epi16(_mm256_maddubs_epi16(w, lo), _mm256_set1_epi16(1)));
            acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw * a->d[b * a->nb + i]), acc[b]);
            if (fmt != FMT_Q8_0) offset[b] += mw * a->s[b * a->nb + i];
        }
    }
    for (int b = 0; b < tile; b++) y[b * ldy] = sum8(acc[b]) + offset[b];
}

#define AVX2_TILE 4 /* 4 accumulators + the block + temporaries fit AVX2's 16 registers */

static TARGET_AVX2 void qrows_avx2(int64_t fmt, const uint8_t *w, int64_t row_bytes, const qact *a, int64_t batch,
                                   float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int64_t b = 0; b < batch; b += AVX2_TILE)  /* a tile of x stays in L1 across the task's rows */
        for (int64_t o = o0; o < o1; o++) {
            const qact ab = {a->hi + b * a->in, a->lo + b * a->in, a->d + b * a->nb, a->s + b * a->nb, a->nb, a->in};
            const uint8_t *row = w + o * row_bytes;
            float *yb = y + b * ldy + o;
            const int64_t n = batch - b;
#define CASE(f, t) if (fmt == f && n == t) { qrow_avx2(f, row, &ab, yb, ldy, t); continue; }
#define TILES(f) CASE(f, 1) CASE(f, 2) CASE(f, 3) if (fmt == f) { qrow_avx2(f, row, &ab, yb, ldy, AVX2_TILE); continue; }
            TILES(FMT_Q4_0) TILES(FMT_Q4_1) TILES(FMT_Q8_0)
#undef TILES
#undef CASE
        }
}

/* Two blocks' 64 weights in value order, one block per 256-bit half. */
INLINE TARGET_AVX512 __m512i load_weights_avx512(int64_t fmt, const uint8_t *qs0, const uint8_t *qs1) {
    if (fmt == FMT_Q8_0)
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)qs0)),
                                  _mm256_loadu_si256((const __m256i *)qs1), 1);
    const __m256i raw = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)qs1), _mm_loadu_si128((const __m128i *)qs0));
    /* lanes of 16 bytes: [low nibbles 0, low 1, high 0, high 1] -> [low 0, high 0, low 1, high 1] */
    const __m512i nibbles = _mm512_and_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1), _mm512_set1_epi8(0x0F));
    return _mm512_shuffle_i64x2(nibbles, nibbles, _MM_SHUFFLE(3, 1, 2, 0));
}

/* As qrow_avx2, two blocks per step (a last odd block in 256 bits). */
INLINE TARGET_AVX512 void qrow_avx512(int64_t fmt, const uint8_t *row, const qact *a, float *y, int64_t ldy,
                                      const int tile) {
    const int64_t bytes = quant_block_bytes(fmt);
    __m512 acc[MAX_TILE];
    float offset[MAX_TILE];
    for (int b = 0; b < tile; b++) acc[b] = _mm512_setzero_ps(), offset[b] = 0.0f;
    int64_t i = 0;
    for (; i + 2 <= a->nb; i += 2) {
        const uint8_t *b0 = row + i * bytes, *b1 = b0 + bytes;
        float dw0, mw0, dw1, mw1;
        block_scale(fmt, b0, &dw0, &mw0);
        block_scale(fmt, b1, &dw1, &mw1);
        __m512i w = load_weights_avx512(fmt, block_quants(fmt, b0), block_quants(fmt, b1));
        __mmask64 negative = 0;
        if (fmt == FMT_Q8_0) negative = _mm512_movepi8_mask(w), w = _mm512_abs_epi8(w);
        for (int b = 0; b < tile; b++) {
            const int64_t k = b * a->nb + i;
            __m512i hi = _mm512_loadu_si512((const void *)(a->hi + b * a->in + i * QK));
            __m512i lo = _mm512_loadu_si512((const void *)(a->lo + b * a->in + i * QK));
            if (fmt == FMT_Q8_0) {
                hi = _mm512_mask_sub_epi8(hi, negative, _mm512_setzero_si512(), hi);
                lo = _mm512_mask_sub_epi8(lo, negative, _mm512_setzero_si512(), lo);
            }
            const __m512i sums = _mm512_dpbusd_epi32(
                _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, hi), 8), w, lo);  /* 256 hi + lo */
            const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dw0 * a->d[k]), _mm512_set1_ps(dw1 * a->d[k + 1]));
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[b]);
            if (fmt != FMT_Q8_0) offset[b] += mw0 * a->s[k] + mw1 * a->s[k + 1];
        }
    }
    if (i < a->nb) {
        const uint8_t *block = row + i * bytes;
        float dw, mw;
        block_scale(fmt, block, &dw, &mw);
        __m256i w = load_weights_avx2(fmt, block_quants(fmt, block));
        const __m256i signs = w;
        if (fmt == FMT_Q8_0) w = _mm256_sign_epi8(w, w);
        for (int b = 0; b < tile; b++) {
            __m256i hi = _mm256_loadu_si256((const __m256i *)(a->hi + b * a->in + i * QK));
            __m256i lo = _mm256_loadu_si256((const __m256i *)(a->lo + b * a->in + i * QK));
            if (fmt == FMT_Q8_0) hi = _mm256_sign_epi8(hi, signs), lo = _mm256_sign_epi8(lo, signs);
            const __m256i sums = _mm256_dpbusd_epi32(
                _mm256_slli_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, hi), 8), w, lo);
            const __m512 part = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_cvtepi32_ps(sums),
                                                                     _mm256_set1_ps(dw * a->d[b * a->nb + i])));
            acc[b] = _mm512_add_ps(acc[b], _mm512_maskz_mov_ps(0x00FF, part));
            if (fmt != FMT_Q8_0) offset[b] += mw * a->s[b * a->nb + i];
        }
    }
    for (int b = 0; b < tile; b++) y[b * ldy] = _mm512_reduce_add_ps(acc[b]) + offset[b];
}

static TARGET_AVX512 void qrows_avx512(int64_t fmt, const uint8_t *w, int64_t row_bytes, const qact *a,
                                       int64_t batch, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int64_t b = 0; b < batch; b += MAX_TILE)  /* a tile of x stays in L1 across the task's rows */
        for (int64_t o = o0; o < o1; o++) {
            const qact ab = {a->hi + b * a->in, a->lo + b * a->in, a->d + b * a->nb, a->s + b * a->nb, a->nb, a->in};
            const uint8_t *row = w + o * row_bytes;
            float *yb = y + b * ldy + o;
            const int64_t n = batch - b;
#define CASE(f, t) if (fmt == f && n == t) { qrow_avx512(f, row, &ab, yb, ldy, t); continue; }
#define TILES(f) CASE(f, 1) CASE(f, 2) CASE(f, 3) CASE(f, 4) CASE(f, 5) CASE(f, 6) CASE(f, 7) \
                 if (fmt == f) { qrow_avx512(f, row, &ab, yb, ldy, MAX_TILE); continue; }
            TILES(FMT_Q4_0) TILES(FMT_Q4_1) TILES(FMT_Q8_0)
#undef TILES
#undef CASE
        }
}

/* A block's 32 weights as floats, values 0..15 in *w0 and 16..31 in *w1. */
INLINE TARGET_AVX512 void dequantize_avx512(int64_t fmt, const uint8_t *block, __m512 *w0, __m512 *w1) {
    float d, m;
    block_scale(fmt, block, &d, &m);
    const uint8_t *qs = block_quants(fmt, block);
    if (fmt == FMT_Q8_0) {
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs))), _mm512_set1_ps(d));
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)))), _mm512_set1_ps(d));
        return;
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0F);
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    *w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))), dv, mv);
    *w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask))), dv, mv);
}

/* One weight row against `tile` float batch rows; two accumulators per row (the two halves of a
 * block), so that one row's multiply-adds do not all wait on each other. */
INLINE TARGET_AVX512 void frow_avx512(int64_t fmt, const uint8_t *row, const float *x, int64_t in, float *y,
                                      int64_t ldy, const int tile) {
    const int64_t bytes = quant_block_bytes(fmt), nb = in / QK;
    __m512 acc0[MAX_TILE], acc1[MAX_TILE];
    for (int b = 0; b < tile; b++) acc0[b] = acc1[b] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512 w0, w1;
        dequantize_avx512(fmt, row + i * bytes, &w0, &w1);
        for (int b = 0; b < tile; b++) {
            const float *xb = x + b * in + i * QK;
            acc0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc0[b]);
            acc1[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc1[b]);
        }
    }
    for (int b = 0; b < tile; b++) y[b * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[b], acc1[b]));
}

static TARGET_AVX512 void frows_avx512(int64_t fmt, const uint8_t *w, int64_t row_bytes, const float *x, int64_t in,
                                       int64_t batch, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int64_t b = 0; b < batch; b += MAX_TILE)  /* a tile of x stays in L1 across the task's rows */
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *row = w + o * row_bytes;
            const float *xb = x + b * in;
            float *yb = y + b * ldy + o;
            const int64_t n = batch - b;
#define CASE(f, t) if (fmt == f && n == t) { frow_avx512(f, row, xb, in, yb, ldy, t); continue; }
#define TILES(f) CASE(f, 1) CASE(f, 2) CASE(f, 3) CASE(f, 4) CASE(f, 5) CASE(f, 6) CASE(f, 7) \
                 if (fmt == f) { frow_avx512(f, row, xb, in, yb, ldy, MAX_TILE); continue; }
            TILES(FMT_Q4_0) TILES(FMT_Q4_1) TILES(FMT_Q8_0)
#undef TILES
#undef CASE
        }
}

/* A block's 32 weights as four vectors of 8 floats, in value order. */
INLINE TARGET_AVX2 void dequantize_avx2(int64_t fmt, const uint8_t *block, __m256 w[4]) {
    float d, m;
    block_scale(fmt, block, &d, &m);
    const uint8_t *qs = block_quants(fmt, block);
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    if (fmt == FMT_Q8_0) {
        for (int k = 0; k < 4; k++)
            w[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k)))), dv);
        return;
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k])), dv, mv);
}

INLINE TARGET_AVX2 void frow_avx2(int64_t fmt, const uint8_t *row, const float *x, int64_t in, float *y,
                                  int64_t ldy, const int tile) {
    const int64_t bytes = quant_block_bytes(fmt), nb = in / QK;
    __m256 acc0[AVX2_TILE], acc1[AVX2_TILE];
    for (int b = 0; b < tile; b++) acc0[b] = acc1[b] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256 wv[4];
        dequantize_avx2(fmt, row + i * bytes, wv);
        for (int b = 0; b < tile; b++) {
            const float *xb = x + b * in + i * QK;
            acc0[b] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xb), acc0[b]);
            acc1[b] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xb + 8), acc1[b]);
            acc0[b] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xb + 16), acc0[b]);
            acc1[b] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xb + 24), acc1[b]);
        }
    }
    for (int b = 0; b < tile; b++) y[b * ldy] = sum8(_mm256_add_ps(acc0[b], acc1[b]));
}

static TARGET_AVX2 void frows_avx2(int64_t fmt, const uint8_t *w, int64_t row_bytes, const float *x, int64_t in,
                                   int64_t batch, float *y, int64_t ldy, int64_t o0, int64_t o1) {
    for (int64_t b = 0; b < batch; b += AVX2_TILE)  /* a tile of x stays in L1 across the task's rows */
        for (int64_t o = o0; o < o1; o++) {
            const uint8_t *row = w + o * row_bytes;
            const float *xb = x + b * in;
            float *yb = y + b * ldy + o;
            const int64_t n = batch - b;
#define CASE(f, t) if (fmt == f && n == t) { frow_avx2(f, row, xb, in, yb, ldy, t); continue; }
#define TILES(f) CASE(f, 1) CASE(f, 2) CASE(f, 3) if (fmt == f) { frow_avx2(f, row, xb, in, yb, ldy, AVX2_TILE); continue; }
            TILES(FMT_Q4_0) TILES(FMT_Q4_1) TILES(FMT_Q8_0)
#undef TILES
#undef CASE
        }
}

/* Rows r0..r1 of blocks as floats (out: rows of `in`), for the BLAS path: a prompt's products. */
static TARGET_AVX512 void dequantize_rows_avx512(int64_t fmt, const uint8_t *w, float *out, int64_t r0, int64_t r1,
                                                 int64_t in) {
    const int64_t nb = in / QK, bytes = quant_block_bytes(fmt);
    for (int64_t k = r0 * nb; k < r1 * nb; k++) {
        __m512 w0, w1;
#define CASE(f) if (fmt == f) dequantize_avx512(f, w + k * bytes, &w0, &w1);
        CASE(FMT_Q4_0) CASE(FMT_Q4_1) CASE(FMT_Q8_0)
#undef CASE
        _mm512_storeu_ps(out + k * QK, w0);
        _mm512_storeu_ps(out + k * QK + 16, w1);
    }
}

static TARGET_AVX2 void dequantize_rows_avx2(int64_t fmt, const uint8_t *w, float *out, int64_t r0, int64_t r1,
                                             int64_t in) {
    const int64_t nb = in / QK, bytes = quant_block_bytes(fmt);
    for (int64_t k = r0 * nb; k < r1 * nb; k++) {
        __m256 wv[4];
#define CASE(f) if (fmt == f) dequantize_avx2(f, w + k * bytes, wv);
        CASE(FMT_Q4_0) CASE(FMT_Q4_1) CASE(FMT_Q8_0)
#undef CASE
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + k * QK + 8 * j, wv[j]);
    }
}

int64_t quant_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_PORTABLE;
}
#else
int64_t quant_best_isa(void) { return ISA_PORTABLE; }
#endif

#define ROWS_PER_TASK 16

/* out (rows, in) float32 = the weights of `rows` rows of blocks (each in / 32 blocks long). */
void quant_dequantize(int64_t fmt, const uint8_t *w, float *out, int64_t rows, int64_t in) {
    const int64_t nb = in / QK, bytes = quant_block_bytes(fmt), isa = quant_best_isa();
    const int64_t tasks = (rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
#pragma omp parallel for schedule(static) if (rows * in > (1 << 16)) num_threads(kernel_thread_count())
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t r0 = t * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < rows ? r0 + ROWS_PER_TASK : rows;
#if defined(__x86_64__) || defined(__i386__)
        if (isa == ISA_AVX512) { dequantize_rows_avx512(fmt, w, out, r0, r1, in); continue; }
        if (isa == ISA_AVX2) { dequantize_rows_avx2(fmt, w, out, r0, r1, in); continue; }
#endif
        for (int64_t k = r0 * nb; k < r1 * nb; k++) dequantize_block(fmt, w + k * bytes, out + k * QK);
    }
}

enum { METHOD_AUTO = 0, METHOD_INTEGER = 1, METHOD_FLOAT = 2 };
#define FLOAT_MIN_BATCH 2 /* measured: see quant_blocks.py */

/* y[b * ldy + o] = sum_k x[b, k] * W[o, k] for the block-quantized W (out, in): x (batch, in) float32,
 * in a multiple of 32; y's rows are ldy floats apart (a slice of a wider output). isa: ISA_BEST or
 * one this CPU has (quant_best_isa() or below). method: METHOD_INTEGER (activations to 16-bit
 * integers, integer dot products), METHOD_FLOAT (blocks dequantized in registers, float
 * multiply-adds) or METHOD_AUTO (the faster for this batch). Returns 0, or -1 for an unknown format
 * or method, or an ISA the CPU lacks (nothing written). */
int64_t quant_matmul(int64_t fmt, const uint8_t *w, const float *x, float *y, int64_t batch, int64_t in,
                     int64_t out, int64_t ldy, int64_t isa, int64_t method) {
    const int64_t best = quant_best_isa(), bytes = quant_block_bytes(fmt), nb = in / QK;
    if (isa == ISA_BEST) isa = best;
    if (method == METHOD_AUTO) method = batch >= FLOAT_MIN_BATCH ? METHOD_FLOAT : METHOD_INTEGER;
    if (!bytes || isa < ISA_PORTABLE || isa > best || in % QK || method < METHOD_INTEGER || method > METHOD_FLOAT)
        return -1;
    const int64_t row_bytes = nb * bytes, tasks = (out + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    if (method == METHOD_FLOAT) {
#pragma omp parallel for schedule(static) if (out * in * batch > (1 << 15)) num_threads(kernel_thread_count())
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t o0 = t * ROWS_PER_TASK, o1 = o0 + ROWS_PER_TASK < out ? o0 + ROWS_PER_TASK : out;
#if defined(__x86_64__) || defined(__i386__)
            if (isa == ISA_AVX512) { frows_avx512(fmt, w, row_bytes, x, in, batch, y, ldy, o0, o1); continue; }
            if (isa == ISA_AVX2) { frows_avx2(fmt, w, row_bytes, x, in, batch, y, ldy, o0, o1); continue; }
#endif
            frows_portable(fmt, w, row_bytes, x, in, batch, y, ldy, o0, o1);
        }
        return 0;
    }
    int8_t *q = malloc(2 * batch * in + 64);
    float *scales = malloc(2 * batch * nb * sizeof(float) + 64);
    if (!q || !scales) { free(q); free(scales); return -1; }
    quant_activations(x, batch * nb, q, q + batch * in, scales, scales + batch * nb);
    const qact a = {q, q + batch * in, scales, scales + batch * nb, nb, in};
#pragma omp parallel for schedule(static) if (out * in * batch > (1 << 15)) num_threads(kernel_thread_count())
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t o0 = t * ROWS_PER_TASK, o1 = o0 + ROWS_PER_TASK < out ? o0 + ROWS_PER_TASK : out;
#if defined(__x86_64__) || defined(__i386__)
        if (isa == ISA_AVX512) { qrows_avx512(fmt, w, row_bytes, &a, batch, y, ldy, o0, o1); continue; }
        if (isa == ISA_AVX2) { qrows_avx2(fmt, w, row_bytes, &a, batch, y, ldy, o0, o1); continue; }
#endif
        qrows_portable(fmt, w, row_bytes, &a, batch, y, ldy, o0, o1);
    }
    free(q);
    free(scales);
    return 0;
}
