/* NF4 dequantization on CPU: packed 4-bit codes and per-block fp32 scales to fp32 or bf16 values (see nf4.py for
 * the format, which holds the same math in torch as the reference and the fallback).
 *
 *   out[i] = NF4[code_i] * scale[i / blocksize]      (one fp32 multiply, as bitsandbytes; bf16: rounded to nearest
 *                                                     even from that fp32 product)
 * code_i is the high nibble of byte i/2 for even i and the low nibble for odd i. The 16 NF4 values fit one AVX-512
 * register (or two AVX2 registers), so a code is looked up by a lane permute rather than a gather. The work is
 * split by blocks over OpenMP threads.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* len values (even, except possibly the last block) of one block from its bytes, into fp32 out. */
static void block_f32(const uint8_t *bytes, float s, float *out, int64_t len) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 table = _mm512_loadu_ps(NF4), vs = _mm512_set1_ps(s);
    const __m512i first16 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i last16 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (; i + 32 <= len; i += 32) {  /* 16 bytes -> 32 values */
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + i / 2)));
        const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), vs);
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), table), vs);
        _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(hi, first16, lo));
        _mm512_storeu_ps(out + i + 16, _mm512_permutex2var_ps(hi, last16, lo));
    }
#elif defined(__AVX2__)
    const __m256 t0 = _mm256_loadu_ps(NF4), t1 = _mm256_loadu_ps(NF4 + 8), vs = _mm256_set1_ps(s);
    for (; i + 16 <= len; i += 16) {  /* 8 bytes -> 16 values */
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + i / 2)));
        const __m256i h = _mm256_srli_epi32(b, 4), l = _mm256_and_si256(b, _mm256_set1_epi32(15));
        /* entries 0-7 from t0, 8-15 from t1: the permute reads the low 3 bits, the blend bit 3 (moved to the sign) */
        const __m256 hv = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, h), _mm256_permutevar8x32_ps(t1, h),
                                                         _mm256_castsi256_ps(_mm256_slli_epi32(h, 28))), vs);
        const __m256 lv = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, l), _mm256_permutevar8x32_ps(t1, l),
                                                         _mm256_castsi256_ps(_mm256_slli_epi32(l, 28))), vs);
        const __m256 a = _mm256_unpacklo_ps(hv, lv), c = _mm256_unpackhi_ps(hv, lv); /* pairs, per 128-bit lane */
        _mm256_storeu_ps(out + i, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(out + i + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
#endif
    for (; i < len; i += 2) {
        const uint8_t b = bytes[i / 2];
        out[i] = NF4[b >> 4] * s;
        if (i + 1 < len) out[i + 1] = NF4[b & 15] * s;
    }
}

static inline uint16_t bf16_rne(float x) {  /* round to nearest even; the values are finite */
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void lt_nf4_dequant_f32(const uint8_t *packed, const float *scales, float *out, int64_t n, int64_t blocksize,
                        int threads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * blocksize, len = (n - start < blocksize) ? n - start : blocksize;
        block_f32(packed + start / 2, scales[b], out + start, len);
    }
}

void lt_nf4_dequant_bf16(const uint8_t *packed, const float *scales, uint16_t *out, int64_t n, int64_t blocksize,
                         int threads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        float tmp[4096];  /* the largest block size */
        const int64_t start = b * blocksize, len = (n - start < blocksize) ? n - start : blocksize;
        block_f32(packed + start / 2, scales[b], tmp, len);
        for (int64_t i = 0; i < len; i++) out[start + i] = bf16_rne(tmp[i]);
    }
}

/* NF4 quantization on CPU, bit for bit nf4.py's torch path (bitsandbytes' rounding): n fp32 values in blocks of
 * blocksize, the last block possibly short. Per full block: m = max|x|, inv = 1/max(m, 1e-38) (fp32 division),
 * t = clamp(x * inv, -1, 1), absmax = m. A short last block: m = max(max|x|, 1e-38), t = clamp(x / m, -1, 1),
 * absmax = m. The code of t is the number of bounds (the 15 midpoints between NF4 values, from the caller) below
 * it, so a value on a bound takes the lower code; codes are packed two per byte, the first in the high nibble, an
 * odd count padded with code 7. Returns 1 if a value is NaN or infinite (the outputs are then meaningless), else 0.
 */
/* The scaled values t[0..len) of one block to codes: the number of bounds below each (vectorized over the values). */
static void nf4_codes(const float *t, const float *bounds, uint8_t *codes, int64_t len) {
    for (int64_t i = 0; i < len; i++) codes[i] = 0;
    for (int k = 0; k < 15; k++) {
        const float bk = bounds[k];
        for (int64_t i = 0; i < len; i++) codes[i] += bk < t[i];
    }
}

int lt_nf4_quant_f32(const float *x, const float *bounds, uint8_t *packed, float *absmax, int64_t n,
                     int64_t blocksize, int threads) {
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    int bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(|:bad)
    for (int64_t b = 0; b < nblocks; b++) {
        float t[4096 + 1];  /* the largest block size, and a pad value */
        uint8_t c[4096 + 1];
        const int64_t start = b * blocksize, len = (n - start < blocksize) ? n - start : blocksize;
        const float *v = x + start;
        float m = 0.0f;
        int nonfinite = 0;
        for (int64_t i = 0; i < len; i++) {
            const float a = v[i] < 0 ? -v[i] : v[i];
            nonfinite |= !(a <= 3.4028234663852886e38f);  /* NaN or infinite */
            m = a > m ? a : m;
        }
        bad |= nonfinite;
        if (len == blocksize) {
            const float inv = 1.0f / (m < 1e-38f ? 1e-38f : m);
            absmax[b] = m;
            for (int64_t i = 0; i < len; i++) {
                const float s = v[i] * inv;
                t[i] = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            }
        } else {
            const float mm = m < 1e-38f ? 1e-38f : m;
            absmax[b] = mm;
            for (int64_t i = 0; i < len; i++) {
                const float s = v[i] / mm;
                t[i] = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            }
            t[len] = 0.0f;  /* an odd count's pad nibble: code 7, the value 0 */
        }
        const int64_t even = len + (len & 1);
        nf4_codes(t, bounds, c, even);
        uint8_t *out = packed + start / 2;
        for (int64_t i = 0; i < even; i += 2) out[i / 2] = (uint8_t)((c[i] << 4) | c[i + 1]);
    }
    return bad;
}
