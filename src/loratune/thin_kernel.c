/* The thin (rank-r) products of a LoRA layer, for loratune's fused path (see thin.py, which holds the torch
 * reference and the fallback). Row-major float32; r is padded to whole vectors where it is the vector dimension
 * (the callers pass padded operands).
 *
 *   project:  U[T×r]  = s · X[T×d] · Mt[d×rp]      (x⊙m·Aᵀ with Mt = Aᵀ; g·B with Mt = B)
 *   expand:   Y[T×d]  = s · U[T×r] · M[r×d] (⊙ a dropout mask) (+ Y)   (u·Bᵀ with M = Bᵀ; (g·B)·A with M = A)
 *   outer:    Gt[d×r] = s · X[T×d]ᵀ · U[T×rp]      (B's gradient gᵀ·u; A's gradient, transposed)
 *
 * A general GEMM library treats these as small, badly shaped problems (one dimension 16 wide) and pays its
 * per-call setup and packing on each; here every output vector is a register accumulator over the long dimension,
 * r = 16 is one AVX-512 register (two AVX2 ones), and nothing is packed. GCC's vector extensions keep the code
 * portable: the same source builds for AVX-512, AVX2 or plain SSE with -march=native. Work is split over torch's
 * OpenMP threads (see native.py) along the dimension that is not reduced.
 */
#include "dropout_mask.h" /* stdint.h, string.h, keep_block */

/* VL lanes per vector: one register of the widest kind the target has (a wider GCC vector than the target's
 * registers is split into several and spilled, which runs slower than a BLAS). The rank is padded to whole
 * vectors (``lt_thin_lanes`` tells the caller how wide). */
#ifdef __AVX512F__
#define VL 16
#define PT 12 /* project: tokens per register tile (of 32 registers) */
#define OT 16 /* outer: columns of X per tile */
#define ET 4  /* expand: tokens per tile, times EC vectors of columns */
#else
#define VL 8
#define PT 12 /* of 16 registers */
#define OT 12
#define ET 4
#endif
#define EC 3
typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4))); /* the same, at any float address */
#define LOADU(p) (*(const vfu *)(p))
/* Split over threads where the call has `work` multiply-adds enough to pay for waking them. */
#define PARALLEL _Pragma("omp parallel for num_threads(threads) schedule(static) if(work > 16384)")

int lt_thin_lanes(void) { return VL; }

/* dst[0:n] = lanes 0..n-1 of a (n <= VL). */
static inline __attribute__((always_inline)) void store_lanes(float *dst, vf a, int n) {
    if (n == VL) *(vfu *)dst = a;
    else memcpy(dst, &a, sizeof(float) * (size_t)n);
}

/* U[t, c0:c0+n] for PT (or tb < PT) tokens, one vector-wide chunk of Mt's columns. */
static inline void project_tile(const float *X, int64_t ldx, const float *Mt, int64_t rp, float *U, int64_t ldu,
                                int64_t d, int n, float s, int tb) {
    vf acc[PT];
    for (int i = 0; i < PT; i++) acc[i] = (vf){0};
    if (tb == PT) { /* a fixed trip count keeps every accumulator in a register */
        for (int64_t j = 0; j < d; j++) {
            const vf m = LOADU(Mt + j * rp);
            for (int i = 0; i < PT; i++) acc[i] += X[i * ldx + j] * m;
        }
    } else {
        for (int64_t j = 0; j < d; j++) {
            const vf m = LOADU(Mt + j * rp);
            for (int i = 0; i < tb; i++) acc[i] += X[i * ldx + j] * m;
        }
    }
    for (int i = 0; i < tb; i++) store_lanes(U + i * ldu, acc[i] * s, n);
}

void lt_thin_project(const float *X, int64_t ldx, const float *Mt, int64_t rp, float *U, int64_t T, int64_t d,
                     int64_t r, float s, int threads) {
    const int64_t work = T * d * rp;
    PARALLEL
    for (int64_t t0 = 0; t0 < T; t0 += PT)
        for (int64_t c = 0; c < r; c += VL)
            project_tile(X + t0 * ldx, ldx, Mt + c, rp, U + t0 * r + c, r, d, r - c < VL ? (int)(r - c) : VL, s,
                         T - t0 < PT ? (int)(T - t0) : PT);
}

void lt_thin_outer(const float *X, int64_t ldx, const float *U, int64_t rp, float *Gt, int64_t T, int64_t d,
                   int64_t r, float s, int threads) {
    const int64_t work = T * d * rp;
    PARALLEL
    for (int64_t j0 = 0; j0 < d; j0 += OT) {
        const int jb = d - j0 < OT ? (int)(d - j0) : OT;
        for (int64_t c = 0; c < r; c += VL) {
            vf acc[OT];
            for (int i = 0; i < OT; i++) acc[i] = (vf){0};
            if (jb == OT) {
                for (int64_t t = 0; t < T; t++) {
                    const vf u = LOADU(U + t * rp + c);
                    const float *x = X + t * ldx + j0;
                    for (int i = 0; i < OT; i++) acc[i] += x[i] * u;
                }
            } else {
                for (int64_t t = 0; t < T; t++) {
                    const vf u = LOADU(U + t * rp + c);
                    const float *x = X + t * ldx + j0;
                    for (int i = 0; i < jb; i++) acc[i] += x[i] * u;
                }
            }
            const int n = r - c < VL ? (int)(r - c) : VL;
            for (int i = 0; i < jb; i++) store_lanes(Gt + (j0 + i) * r + c, acc[i] * s, n);
        }
    }
}

/* accumulate: Y += the product (else Y = it). masked: each product element multiplied by its keep bit from the
 * dropout draw (seed, t, f) over Y's flattened index (dropout_mask.h), as dropout.py's apply_mask would. */
void lt_thin_expand(const float *U, const float *M, float *Y, int64_t T, int64_t d, int64_t r, float s,
                    int accumulate, int masked, uint64_t seed, uint32_t t, uint32_t f, int threads) {
    const int64_t w = VL * EC, work = T * d * r;
    PARALLEL
    for (int64_t t0 = 0; t0 < T; t0 += ET) {
        const int tb = T - t0 < ET ? (int)(T - t0) : ET;
        uint8_t keep[BLOCK];
        int64_t j0 = 0;
        if (tb == ET) {
            for (; j0 + w <= d; j0 += w) {
                vf acc[ET][EC];
                for (int i = 0; i < ET; i++)
                    for (int e = 0; e < EC; e++) acc[i][e] = (vf){0};
                for (int64_t k = 0; k < r; k++) {
                    vf m[EC];
                    for (int e = 0; e < EC; e++) m[e] = LOADU(M + k * d + j0 + VL * e);
                    for (int i = 0; i < ET; i++) {
                        const float u = U[(t0 + i) * r + k];
                        for (int e = 0; e < EC; e++) acc[i][e] += u * m[e];
                    }
                }
                for (int i = 0; i < ET; i++) {
                    float *y = Y + (t0 + i) * d + j0;
                    if (masked) keep_block(keep, (uint64_t)((t0 + i) * d + j0), (int)w, seed, (uint8_t)t, f);
                    for (int e = 0; e < EC; e++) {
                        vf a = acc[i][e] * s;
                        if (masked) {
                            vf k01;
                            for (int l = 0; l < VL; l++) k01[l] = (float)keep[VL * e + l];
                            a *= k01;
                        }
                        store_lanes(y + VL * e, accumulate ? a + LOADU(y + VL * e) : a, VL);
                    }
                }
            }
        }
        for (int i = 0; i < tb; i++) { /* the columns left over (all of them for a short last tile) */
            const float *u = U + (t0 + i) * r;
            float *y = Y + (t0 + i) * d;
            for (int64_t c0 = j0; c0 < d; c0 += BLOCK) {
                const int n = d - c0 < BLOCK ? (int)(d - c0) : BLOCK;
                if (masked) keep_block(keep, (uint64_t)((t0 + i) * d + c0), n, seed, (uint8_t)t, f);
                for (int c = 0; c < n; c++) {
                    float a = 0.f;
                    for (int64_t k = 0; k < r; k++) a += u[k] * M[k * d + c0 + c];
                    a *= s;
                    if (masked) a *= (float)keep[c];
                    y[c0 + c] = accumulate ? a + y[c0 + c] : a;
                }
            }
        }
    }
}
