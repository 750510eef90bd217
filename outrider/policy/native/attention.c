/* Causal attention for the lean decoder's eager CPU steps, fused: RoPE on the new queries and keys, the new keys
 * and values written into the KV buffer, and softmax(q k^T * scale + bias) v over the visible slots, for every
 * row, head and new position in one pass. Replaces about ten PyTorch ops per layer (among them two batched
 * matmuls that, at a tiny model's sizes, run far below the memory bandwidth). Built by native/__init__.py.
 *
 * Layouts (float32, C-contiguous):
 *   qkv        [B, S, (H + 2*KV) * D]  the fused projection's output for S new positions: all query heads, then
 *                                      the key heads, then the values
 *   cos_table  [P, D]                  RoPE tables; sin_table has its first half negated, so that
 *   sin_table  [P, D]                  rope(x)[d] = x[d]*cos[d] + x[(d + D/2) % D]*sin[d]
 *   positions  [B, S] int64            each new position's row of the tables
 *   keys       [B, KV, L, D]           the KV buffer: the new positions go to slots start .. start+S-1, and the
 *   values     [B, KV, L, D]           one at slot start+s attends over slots 0 .. start+s (causal)
 *   bias       [B, L] or NULL          additive (0 or -inf) per key slot; NULL: every slot is visible
 *   out        [B, S - first, H * D]   outputs of new positions first .. S-1 (query head h reads key head
 *                                      h / (H / KV), as HF's repeat_kv); a query that sees no key gets zeros
 */
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h"

static void rope(const float *x, const float *cos_row, const float *sin_row, int D, float scale, float *dst) {
    const int half = D / 2;
    for (int d = 0; d < half; d++) {
        dst[d] = (x[d] * cos_row[d] + x[d + half] * sin_row[d]) * scale;
        dst[d + half] = (x[d + half] * cos_row[d + half] + x[d] * sin_row[d + half]) * scale;
    }
}

/* KV rows fetched ahead of use, into L2: each unit reads only a few KB of keys and values, too little for the
 * hardware prefetcher to ramp up, so once the KV buffer has left the cache the loads wait on memory (32 rows
 * into L2 measured best at head sizes 32 and 64: about 1.6x faster with the KV buffer out of cache) */
#define PREFETCH_ROWS 32
static inline void prefetch_row(const float *x, int D) {
    for (int d = 0; d < D; d += 16) __builtin_prefetch(x + d, 0, 1);
}

/* softmax(q k_j + bias_j) over j < T, then the weighted sum of the v_j into dst[D]. Always inlined, so that each
 * call site of `attention` with a constant head size gets a copy whose loops the compiler unrolls and keeps in
 * registers; keys are taken four at a time (four independent dot products). */
static inline __attribute__((always_inline)) void attend_one(const float *q, const float *k, const float *v,
                                                             const float *bias, int T, int D, float *scores,
                                                             float *dst, const float *k_next, const float *v_next) {
    const int ahead = PREFETCH_ROWS;
    int j = 0;
    for (; j + 4 <= T; j += 4) {
        const float *k0 = k + (int64_t)j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        for (int r = 0; r < 4; r++)
            prefetch_row(j + r + ahead < T ? k + (int64_t)(j + r + ahead) * D
                                           : k_next + (int64_t)(j + r + ahead - T) * D, D);
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int d = 0; d < D; d++) {
            s0 += q[d] * k0[d];
            s1 += q[d] * k1[d];
            s2 += q[d] * k2[d];
            s3 += q[d] * k3[d];
        }
        scores[j] = s0, scores[j + 1] = s1, scores[j + 2] = s2, scores[j + 3] = s3;
    }
    for (; j < T; j++) {
        const float *kj = k + (int64_t)j * D;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++) s += q[d] * kj[d];
        scores[j] = s;
    }
    float top = -INFINITY;
    for (j = 0; j < T; j++) {
        if (bias) scores[j] += bias[j];
        if (scores[j] > top) top = scores[j];
    }
    for (int d = 0; d < D; d++) dst[d] = 0.0f;
    if (top == -INFINITY) return;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (j = 0; j < T; j++) total += (scores[j] = expf(scores[j] - top));
    for (j = 0; j < T; j++) {
        const float p = scores[j];
        if (p == 0.0f) continue;  /* a masked slot: its key and value are never read into the sum */
        const float *vj = v + (int64_t)j * D;
        prefetch_row(j + ahead < T ? v + (int64_t)(j + ahead) * D : v_next + (int64_t)(j + ahead - T) * D, D);
#pragma omp simd
        for (int d = 0; d < D; d++) dst[d] += p * vj[d];
    }
    const float inv = 1.0f / total;
    for (int d = 0; d < D; d++) dst[d] *= inv;
}

int attention(const float *qkv, const float *cos_table, const float *sin_table, const int64_t *positions,
              float *keys, float *values, const float *bias, float *out, int B, int S, int H, int KV, int D, int L,
              int start, int first, float scale, int threads) {
    const int group = H / KV, row = (H + 2 * KV) * D, n_out = S - first;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(|| : failed)
    for (int unit = 0; unit < B * KV; unit++) {
        const int b = unit / KV, g = unit % KV;
        float *k = keys + (int64_t)unit * L * D, *v = values + (int64_t)unit * L * D;
        /* the next unit's blocks, prefetched while this one computes (past the buffer for the last unit: a
         * prefetch never faults) */
        const float *k_next = k + (int64_t)L * D, *v_next = v + (int64_t)L * D;
        for (int s = 0; s < S; s++) {
            const float *x = qkv + ((int64_t)b * S + s) * row;
            const int64_t pos = positions[(int64_t)b * S + s];
            rope(x + (H + g) * D, cos_table + pos * D, sin_table + pos * D, D, 1.0f, k + (int64_t)(start + s) * D);
            const float *v_new = x + (H + KV + g) * D;
            for (int d = 0; d < D; d++) v[(int64_t)(start + s) * D + d] = v_new[d];
        }
        float *scores = malloc(sizeof(float) * (size_t)(start + S + D));
        if (!scores) { failed = 1; continue; }
        float *q = scores + start + S;
        const float *row_bias = bias ? bias + (int64_t)b * L : NULL;
        for (int s = first; s < S; s++) {
            const float *x = qkv + ((int64_t)b * S + s) * row;
            const int64_t pos = positions[(int64_t)b * S + s];
            for (int h = g * group; h < (g + 1) * group; h++) {
                rope(x + h * D, cos_table + pos * D, sin_table + pos * D, D, scale, q);
                float *dst = out + ((int64_t)b * n_out + (s - first)) * H * D + h * D;
                const int T = start + s + 1;
                switch (D) {  /* the common head sizes, specialised */
                    case 32: attend_one(q, k, v, row_bias, T, 32, scores, dst, k_next, v_next); break;
                    case 64: attend_one(q, k, v, row_bias, T, 64, scores, dst, k_next, v_next); break;
                    case 128: attend_one(q, k, v, row_bias, T, 128, scores, dst, k_next, v_next); break;
                    default: attend_one(q, k, v, row_bias, T, D, scores, dst, k_next, v_next);
                }
            }
        }
        free(scores);
    }
    return failed;
}
