/* Seeded dropout masks: the definition shared by the kernels that draw them (dropout_kernel.c applies a mask to a
 * tensor; thin_kernel.c applies one inside a LoRA product). dropout.py holds the same algorithm in numpy, and the
 * comment at the top of dropout_kernel.c says what it computes. Included, not compiled on its own.
 */
#ifndef LORATUNE_DROPOUT_MASK_H
#define LORATUNE_DROPOUT_MASK_H
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

/* keep[0..len) for elements [b0, b0 + len), len <= BLOCK. */
static inline void keep_block(uint8_t *keep, uint64_t b0, int len, uint64_t seed, uint8_t t, uint32_t f) {
    const uint64_t ones = 0x0101010101010101ULL, high = ones << 7, tt = ones * t;
    const int off = (int)(b0 % 8), words = (off + len + 7) / 8; /* element b0 is byte `off` of word b0 / 8 */
    const uint64_t j0 = b0 / 8;
    uint64_t v[BLOCK / 8 + 1], any = 0;
    uint8_t bytes[BLOCK + 8];
    for (int w = 0; w < words; w++) v[w] = mix64(seed + (j0 + w + 1) * GAMMA); /* vectorizes */
    for (int w = 0; w < words; w++) { uint64_t z = v[w] ^ tt; any |= (z - ones) & ~z & high; } /* a byte == t? */
    memcpy(bytes, v, 8 * (size_t)words);
    for (int i = 0; i < len; i++) keep[i] = bytes[off + i] > t;
    if (!any) return;
    const uint64_t seed2 = mix64(seed ^ EDGE_KEY);
    for (int w = 0; w < words; w++) { /* rare: one byte in 256 */
        const uint64_t z = v[w] ^ tt;
        if (!((z - ones) & ~z & high)) continue;
        for (int i = 8 * w - off; i < 8 * w + 8 - off && i < len; i++)
            if (i >= 0 && bytes[off + i] == t) keep[i] = (uint32_t)(mix64(seed2 + (b0 + i + 1) * GAMMA) >> 32) >= f;
    }
}
#endif
