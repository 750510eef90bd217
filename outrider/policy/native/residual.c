/* The lean decoder's glue between matmuls, fused (float32, C-contiguous rows; built by native/__init__.py):
 *
 *   add_rms   h += y (y may be NULL), then out = h / sqrt(sum h^2 + eps2): RMSNorm whose weight and sqrt(H) the
 *             decoder folded into the next projection, with eps2 = H * eps (h, y, out [R, H])
 *   silu_mul  out = silu(gate) * up for gu = [gate | up] (gu [R, 2I], out [R, I]), silu(g) = g / (1 + exp(-g))
 */
#include <stdint.h>

#include "vector_math.h"

void add_rms(float *h, const float *y, float *out, int R, int H, float eps2, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((int64_t)R * H >= 262144)
    for (int r = 0; r < R; r++) {
        float *hr = h + (int64_t)r * H, *o = out + (int64_t)r * H;
        float squares = 0.0f;
        if (y) {
            const float *yr = y + (int64_t)r * H;
#pragma omp simd reduction(+ : squares)
            for (int i = 0; i < H; i++) {
                hr[i] += yr[i];
                squares += hr[i] * hr[i];
            }
        } else {
#pragma omp simd reduction(+ : squares)
            for (int i = 0; i < H; i++) squares += hr[i] * hr[i];
        }
        const float inv = 1.0f / sqrtf(squares + eps2);
#pragma omp simd
        for (int i = 0; i < H; i++) o[i] = hr[i] * inv;
    }
}

void silu_mul(const float *gu, float *out, int R, int I, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((int64_t)R * I >= 65536)
    for (int r = 0; r < R; r++) {
        const float *g = gu + (int64_t)r * 2 * I, *u = g + I;
        float *o = out + (int64_t)r * I;
#pragma omp simd
        for (int i = 0; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
