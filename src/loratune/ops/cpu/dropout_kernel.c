/* Seeded inverted-dropout masks for loratune, applied in one pass (see dropout.py, which holds the same
 * algorithm in numpy as the reference and the fallback; the two must agree bit for bit).
 *
 * Element i is kept iff its byte b_i > t, or b_i == t and its edge draw e_i >= f, where p·256 = t + f/2³²:
 * P(drop) = p to within 2⁻⁴⁰. b_i is byte i % 8 (little-endian) of word i / 8 of a SplitMix64 stream from
 * `seed`; e_i is the top 32 bits of word i of a second stream from mix64(seed ^ EDGE_KEY). Word j of a stream
 * from s is mix64(s + (j + 1)·GAMMA), so any element's mask comes from its index alone: the backward rebuilds
 * masks instead of saving them.
 */
#include "dropout_mask.h"

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
