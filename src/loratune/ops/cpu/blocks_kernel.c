/* Fused forward and backward passes for the blocks between a Llama-family model's linear layers (see blocks.py,
 * which holds the same math in torch as the reference and the fallback).
 *
 * RMSNorm with a frozen weight w, rows of width d:  y = w ⊙ (x · r),  r = 1/sqrt(mean(x²) + eps)
 *   backward:  gx = r · (g ⊙ w) − x · r³ · Σ(g ⊙ w ⊙ x) / d          (one row stays in L1 for both passes)
 * SwiGLU gate:  h = silu(a) ⊙ b,  silu(a) = a · σ(a)
 *   backward:  gb = gh ⊙ silu(a),  ga = gh ⊙ b ⊙ σ(a) · (1 + a · (1 − σ(a)))
 *
 * torch runs these as 5–10 separate passes over the tensors (each op reads and writes all of it, and autograd
 * saves the intermediates); here each is one pass. float32, contiguous rows; work split over OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define CHUNK 4096 /* elements per OpenMP work item in the elementwise kernels */

void lt_rms_norm_fwd(const float *x, const float *w, float *y, float *r, int64_t rows, int64_t d, float eps,
                     int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * d;
        float *yi = y + i * d;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < d; j++) ss += xi[j] * xi[j];
        const float ri = 1.0f / sqrtf(ss / (float)d + eps);
        r[i] = ri;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) yi[j] = w[j] * (xi[j] * ri);
    }
}

void lt_rms_norm_bwd(const float *g, const float *x, const float *w, const float *r, float *gx, int64_t rows,
                     int64_t d, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * d, *gi = g + i * d;
        float *out = gx + i * d;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t j = 0; j < d; j++) dot += gi[j] * w[j] * xi[j];
        const float ri = r[i], c = ri * ri * ri * dot / (float)d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) out[j] = ri * (gi[j] * w[j]) - xi[j] * c;
    }
}

#ifdef __AVX2__
/* σ(a) on 8 lanes: 1 / (1 + e^-a), e^x as in Cephes' expf (x = n·ln2 + t, e^t by a degree-6 polynomial, 2^n put
 * in the exponent bits; within 2 ulp of expf over the clamped range, where σ has saturated to 0 or 1 anyway). */
static inline __m256 sigmoid8(__m256 a) {
    __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), a);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: exact n·hi */
    t = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), t);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, t), t, _mm256_add_ps(t, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, _mm256_mul_ps(p, _mm256_castsi256_ps(e))));
}
#endif

static inline float sigmoid1(float a) { return 1.0f / (1.0f + expf(-a)); }

static void swiglu_fwd_range(const float *restrict a, const float *restrict b, float *restrict h, int64_t n) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        const __m256 av = _mm256_loadu_ps(a + i);
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(av, sigmoid8(av)), _mm256_loadu_ps(b + i)));
    }
#endif
    for (; i < n; i++) h[i] = a[i] * sigmoid1(a[i]) * b[i];
}

static void swiglu_bwd_range(const float *restrict gh, const float *restrict a, const float *restrict b,
                             float *restrict ga, float *restrict gb, int64_t n) {
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 av = _mm256_loadu_ps(a + i), gv = _mm256_loadu_ps(gh + i), s = sigmoid8(av);
        const __m256 silu = _mm256_mul_ps(av, s);
        _mm256_storeu_ps(gb + i, _mm256_mul_ps(gv, silu));
        const __m256 dsilu = _mm256_fmadd_ps(silu, _mm256_sub_ps(one, s), s); /* σ + a·σ·(1 − σ) */
        _mm256_storeu_ps(ga + i, _mm256_mul_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(b + i)), dsilu));
    }
#endif
    for (; i < n; i++) {
        const float s = sigmoid1(a[i]), silu = a[i] * s;
        gb[i] = gh[i] * silu;
        ga[i] = gh[i] * b[i] * (s + silu * (1.0f - s));
    }
}

void lt_swiglu_fwd(const float *a, const float *b, float *h, int64_t n, int threads) {
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t s = c * CHUNK, len = n - s < CHUNK ? n - s : CHUNK;
        swiglu_fwd_range(a + s, b + s, h + s, len);
    }
}

void lt_swiglu_bwd(const float *gh, const float *a, const float *b, float *ga, float *gb, int64_t n, int threads) {
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t s = c * CHUNK, len = n - s < CHUNK ? n - s : CHUNK;
        swiglu_bwd_range(gh + s, a + s, b + s, ga + s, gb + s, len);
    }
}
