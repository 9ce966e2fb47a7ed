/* This CPU's fp32 FMA peak, for benchmarks/gemm_ceiling.py: each thread runs ten independent chains of 8-wide fused
 * multiply-adds (enough to cover the FMA latency on every x86 core since Haswell), so the loop is bound by FMA
 * throughput alone. Each chain starts from its own value, so the compiler cannot merge them (the tests check
 * that the result is that of every chain run for every iteration). */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Runs `iters` iterations on each of `threads` threads; returns the sum of the results (so that nothing is
 * optimized away). Floating-point operations done: iters · 10 chains · 8 lanes · 2 per thread. */
double lt_fma_loop(int64_t iters, int threads, int *ran) {
    double total = 0;
    int used = 1;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
#ifdef _OPENMP
#pragma omp single
        used = omp_get_num_threads();
#endif
#ifdef __AVX2__
        const float s = 1.0f + (float)(iters & 7) * 1e-3f;
        __m256 a[10];
        for (int j = 0; j < 10; j++) a[j] = _mm256_set1_ps(s + 0.1f * (float)j);
        const __m256 b0 = _mm256_set1_ps(0.9999f), b1 = _mm256_set1_ps(0.9998f), c = _mm256_set1_ps(1e-7f);
        for (int64_t i = 0; i < iters; i++) {
            a[0] = _mm256_fmadd_ps(a[0], b0, c); a[1] = _mm256_fmadd_ps(a[1], b1, c);
            a[2] = _mm256_fmadd_ps(a[2], b0, c); a[3] = _mm256_fmadd_ps(a[3], b1, c);
            a[4] = _mm256_fmadd_ps(a[4], b0, c); a[5] = _mm256_fmadd_ps(a[5], b1, c);
            a[6] = _mm256_fmadd_ps(a[6], b0, c); a[7] = _mm256_fmadd_ps(a[7], b1, c);
            a[8] = _mm256_fmadd_ps(a[8], b0, c); a[9] = _mm256_fmadd_ps(a[9], b1, c);
        }
        float out[8];
        __m256 t = a[0];
        for (int j = 1; j < 10; j++) t = _mm256_add_ps(t, a[j]);
        _mm256_storeu_ps(out, t);
        total += out[0];
#endif
    }
    *ran = used;
    return total;
}

/* 1 where this build has the AVX2/FMA loop above, 0 where it was compiled without (then there is no peak to show). */
int lt_fma_available(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}
