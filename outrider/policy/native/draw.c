/* The sampler's token draw at temperature T, fused: per row the log-softmax of logits / T, one token by inverse
 * CDF (the first token whose cumulative probability exceeds u * (1 - 1e-6) times the total), its log-prob, and
 * the distribution's entropy -sum p log p. The same rule as outrider/policy/draw.py, in one pass over each row
 * instead of a dozen vocab-sized PyTorch ops. Built by native/__init__.py.
 *
 *   logits   [B, V] float32, row stride `stride` (elements)
 *   uniform  [B] float32 in [0, 1)
 *   token    [B] int64, logprob [B] and entropy [B] float32: written
 */
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h"

void draw(const float *logits, int64_t stride, int B, int V, float temperature, const float *uniform,
          int64_t *token, float *logprob, float *entropy, int threads) {
    const float inv_t = 1.0f / temperature;
#pragma omp parallel for schedule(static) num_threads(threads) if ((int64_t)B * V >= 65536)
    for (int b = 0; b < B; b++) {
        const float *x = logits + (int64_t)b * stride;
        float on_stack[V <= 4096 ? V : 1];
        float *e = V <= 4096 ? on_stack : malloc(sizeof(float) * (size_t)V);
        float top = -INFINITY;
        for (int i = 0; i < V; i++) {
            const float xi = x[i] * inv_t;
            if (xi > top) top = xi;
        }
        if (!e) {  /* out of memory: the most likely token, flagged by a NaN log-prob */
            for (int i = 0; i < V; i++)
                if (x[i] * inv_t == top) { token[b] = i; break; }
            logprob[b] = entropy[b] = NAN;
            continue;
        }
        float total = 0.0f, weighted = 0.0f;
#pragma omp simd reduction(+ : total, weighted)
        for (int i = 0; i < V; i++) {
            const float z = x[i] * inv_t - top;
            e[i] = expf(z);
            total += e[i];
            weighted += e[i] > 0.0f ? e[i] * z : 0.0f;  /* 0 * -inf would be NaN */
        }
        const float log_total = logf(total), target = uniform[b] * (1.0f - 1e-6f) * total;
        float cumulative = 0.0f;
        int pick = V - 1;
        for (int i = 0; i < V; i++) {
            cumulative += e[i];
            if (cumulative > target) { pick = i; break; }
        }
        if (e != on_stack) free(e);
        token[b] = pick;
        logprob[b] = x[pick] * inv_t - top - log_total;
        /* H = -sum p log p = log_total - sum e z / total, with p = e / total and log p = z - log_total */
        entropy[b] = log_total - weighted / total;
    }
}
