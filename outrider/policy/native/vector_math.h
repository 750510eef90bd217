/* Vector expf: glibc's libmvec has SIMD variants of expf (AVX2 8-wide, AVX-512 16-wide), which GCC calls from
 * `#pragma omp simd` loops once the function is declared SIMD-enabled, as glibc's own headers do only under
 * -ffast-math (which these kernels avoid: their masks are -inf). native/__init__.py builds with
 * -DOUTRIDER_NO_MVEC, and plain scalar expf, where libmvec is missing. */
#include <math.h>
#ifndef OUTRIDER_NO_MVEC
#pragma omp declare simd notinbranch
extern float expf(float);
#endif
