/* Seeded inverted-dropout masks for loratune, applied in one pass (see dropout.py, which holds the same
 * algorithm in numpy as the reference and the fallback; the two must agree bit for bit).
 *
 * Element i is kept iff its byte b_i > t, or b_i == t and its edge draw e_i >= f, where p·256 = t + f/2³²:
 * P(drop) = p to within 2⁻⁴⁰. b_i is byte i % 8 (little-endian) of word i / 8 of a SplitMix64 stream from
 * `seed`; e_i is the top 32 bits of word i of a second stream from mix64(seed ^ EDGE_KEY). Word j of a stream
 * from s is mix64(s + (j + 1)·GAMMA), so any element's mask comes from its index alone: the backward rebuilds
 * masks instead of saving them.
 */
#include <stdint.h>
#include <string.h>

#define GAMMA 0x9E3779B97F4A7C15ULL
#define EDGE_KEY 0xD1B54A32D192ED03ULL
#define BLOCK 512 /* elements per block; a multiple of 8 */

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* keep[0..len) for elements [b0, b0 + len); b0 % 8 == 0, len <= BLOCK. */
static inline void keep_block(uint8_t *keep, uint64_t b0, int len, uint64_t seed, uint8_t t, uint32_t f) {
    const uint64_t ones = 0x0101010101010101ULL, high = ones << 7, tt = ones * t;
    const int words = (len + 7) / 8;
    const uint64_t j0 = b0 / 8;
    uint64_t v[BLOCK / 8], any = 0;
    uint8_t bytes[BLOCK];
    for (int w = 0; w < words; w++) v[w] = mix64(seed + (j0 + w + 1) * GAMMA); /* vectorizes */
    for (int w = 0; w < words; w++) { uint64_t z = v[w] ^ tt; any |= (z - ones) & ~z & high; } /* a byte == t? */
    memcpy(bytes, v, 8 * (size_t)words);
    for (int i = 0; i < len; i++) keep[i] = bytes[i] > t;
    if (!any) return;
    const uint64_t seed2 = mix64(seed ^ EDGE_KEY);
    for (int w = 0; w < words; w++) { /* rare: one byte in 256 */
        const uint64_t z = v[w] ^ tt;
        if (!((z - ones) & ~z & high)) continue;
        for (int i = 8 * w; i < 8 * w + 8 && i < len; i++)
            if (bytes[i] == t) keep[i] = (uint32_t)(mix64(seed2 + (b0 + i + 1) * GAMMA) >> 32) >= f;
    }
}

/* Blocks [start, end) split over `threads` OpenMP threads: the kernel links the libgomp that torch has loaded,
 * so these are torch's own intra-op threads (see dropout.py). */
#define PARALLEL_BLOCKS _Pragma("omp parallel for schedule(static) num_threads(threads) if(end - start > 32768)")

/* keep[i] for i in [start, end); start % 8 == 0. */
void lt_keep_mask(uint8_t *keep, int64_t start, int64_t end, uint64_t seed, uint32_t t, uint32_t f, int threads) {
    PARALLEL_BLOCKS
    for (int64_t b = start; b < end; b += BLOCK)
        keep_block(keep + b, (uint64_t)b, end - b < BLOCK ? (int)(end - b) : BLOCK, seed, (uint8_t)t, f);
}

/* out[i] = x[i] · keep[i] for i in [start, end); start % 8 == 0; out may be x. */
#define APPLY(NAME, T)                                                                                     \
    void NAME(const T *x, T *out, int64_t start, int64_t end, uint64_t seed, uint32_t t, uint32_t f,      \
              int threads) {                                                                               \
        PARALLEL_BLOCKS                                                                                    \
        for (int64_t b = start; b < end; b += BLOCK) {                                                     \
            uint8_t keep[BLOCK];                                                                           \
            const int len = end - b < BLOCK ? (int)(end - b) : BLOCK;                                      \
            keep_block(keep, (uint64_t)b, len, seed, (uint8_t)t, f);                                       \
            for (int i = 0; i < len; i++) out[b + i] = x[b + i] * (T)keep[i];                              \
        }                                                                                                  \
    }
APPLY(lt_dropout_f32, float)
APPLY(lt_dropout_f64, double)
