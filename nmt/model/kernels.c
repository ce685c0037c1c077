/* CPU kernels for training and decoding, compiled on first use by nmt/model/native.py.
 *
 * Each fuses a chain of elementwise operations that PyTorch would run as separate passes
 * over memory into one pass over data that stays in the cache:
 *
 *   energies_*   the additive attention's energies e_ij = v_a^T tanh(q_i + k_j), forward
 *                and backward (Bahdanau et al. 2015, appendix A.1.2);
 *   smoothed_ce_* the label-smoothed cross-entropy of a block of logits and its
 *                gradient, written over the logits.
 *
 * Plain C99 with OpenMP (the libgomp that PyTorch loaded), on as many threads as the caller
 * passes: torch.get_num_threads(), which the parallel decoding workers set to one.
 * Arithmetic is in float32 whatever the storage type; bfloat16 is read by shifting its
 * bits and written with round-to-nearest-even, as PyTorch does.
 * exp is a Cephes-style polynomial (relative error about 1e-7) that the compiler
 * vectorises, where a call to libm's expf would not be.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

typedef uint16_t bf16;

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const bf16 *p, int64_t i) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)p[i] << 16;
    return c.f;
}
static inline void store_f32(float *p, int64_t i, float x) { p[i] = x; }
static inline void store_bf16(bf16 *p, int64_t i, float x) {
    union { uint32_t u; float f; } c;
    c.f = x;
    c.u += 0x7FFFu + ((c.u >> 16) & 1u);  /* round to nearest, ties to even */
    p[i] = (bf16)(c.u >> 16);
}

static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x / ln 2) */
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  /* x - n ln 2, in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;  /* 2^n */
    return p * scale.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* Energies, forward: query [B * G, A] (G rows per sentence), keys [B, S, A], v [A] float32
 * -> energies [B * G, S] float32, e = 2 v^T sigmoid(2 q + 2 k) - sum(v) = v^T tanh(q + k). */
#define ENERGIES_FORWARD(NAME, T, LOAD)                                                         \
    void NAME(const T *query, const T *keys, const float *v, float *energies, int64_t B,        \
              int64_t G, int64_t S, int64_t A, int threads) {                                   \
        float v_sum = 0.0f;                                                                     \
        for (int64_t a = 0; a < A; a++) v_sum += v[a];                                          \
        _Pragma("omp parallel num_threads(threads)")                                            \
        {                                                                                       \
            float *q2 = malloc(A * sizeof(float));                                              \
            _Pragma("omp for schedule(static)")                                                 \
            for (int64_t row = 0; row < B * G; row++) {                                         \
                for (int64_t a = 0; a < A; a++) q2[a] = 2.0f * LOAD(query, row * A + a);        \
                const T *k = keys + (row / G) * S * A;                                          \
                for (int64_t s = 0; s < S; s++) {                                               \
                    float dot = 0.0f;                                                           \
                    _Pragma("omp simd reduction(+:dot)")                                        \
                    for (int64_t a = 0; a < A; a++)                                             \
                        dot += v[a] * sigmoid(q2[a] + 2.0f * LOAD(k, s * A + a));               \
                    energies[row * S + s] = 2.0f * dot - v_sum;                                 \
                }                                                                               \
            }                                                                                   \
            free(q2);                                                                           \
        }                                                                                       \
    }

ENERGIES_FORWARD(energies_forward_f32, float, load_f32)
ENERGIES_FORWARD(energies_forward_bf16, bf16, load_bf16)

/* Energies, backward, one query row per sentence: the energies' gradient grad [B, S]
 * float32 -> the query's gradient grad_query [B, A] float32 (written), the keys' added
 * into grad_keys [B, S, A] float32 and v's into grad_v [A] float32. The sigmoids are
 * recomputed, not kept from the forward pass: an exp costs less than reading them back. */
#define ENERGIES_BACKWARD(NAME, T, LOAD)                                                        \
    void NAME(const T *query, const T *keys, const float *v, const float *grad,                 \
              float *grad_query, float *grad_keys, float *grad_v, int64_t B, int64_t S,         \
              int64_t A, int threads) {                                                         \
        float *grad_v_parts = calloc((size_t)threads * A, sizeof(float));                       \
        _Pragma("omp parallel num_threads(threads)")                                            \
        {                                                                                       \
            float *gv = grad_v_parts + (size_t)omp_get_thread_num() * A;                        \
            float *q2 = malloc(3 * A * sizeof(float)), *v4 = q2 + A, *gq = q2 + 2 * A;          \
            for (int64_t a = 0; a < A; a++) v4[a] = 4.0f * v[a];                                \
            _Pragma("omp for schedule(static)")                                                 \
            for (int64_t b = 0; b < B; b++) {                                                   \
                for (int64_t a = 0; a < A; a++) {                                               \
                    q2[a] = 2.0f * LOAD(query, b * A + a);                                      \
                    gq[a] = 0.0f;                                                               \
                }                                                                               \
                for (int64_t s = 0; s < S; s++) {                                               \
                    const T *k = keys + (b * S + s) * A;                                        \
                    float *gk = grad_keys + (b * S + s) * A, g = grad[b * S + s];               \
                    if (g == 0.0f) continue; /* padding: its weight, and so its gradient, is 0 */ \
                    _Pragma("omp simd")                                                         \
                    for (int64_t a = 0; a < A; a++) {                                           \
                        float sg = sigmoid(q2[a] + 2.0f * LOAD(k, a));                          \
                        float d = g * v4[a] * sg * (1.0f - sg); /* d e / d (q + k) */           \
                        gq[a] += d;                                                             \
                        gk[a] += d;                                                             \
                        gv[a] += g * (2.0f * sg - 1.0f); /* tanh(q + k) */                      \
                    }                                                                           \
                }                                                                               \
                for (int64_t a = 0; a < A; a++) grad_query[b * A + a] = gq[a];                  \
            }                                                                                   \
            free(q2);                                                                           \
        }                                                                                       \
        for (int t = 0; t < threads; t++)                                                       \
            for (int64_t a = 0; a < A; a++) grad_v[a] += grad_v_parts[(size_t)t * A + a];       \
        free(grad_v_parts);                                                                     \
    }

ENERGIES_BACKWARD(energies_backward_f32, float, load_f32)
ENERGIES_BACKWARD(energies_backward_bf16, bf16, load_bf16)

/* Label-smoothed cross-entropy of logits [R, V] plus bias [V] float32, rows whose
 * target is `ignore` skipped:
 * losses [R] float32 gets (1 - eps) (lse - x_gold) + eps (lse - mean(x)), 0 on skipped rows.
 * With grad_bias non-NULL the logits are overwritten with the loss's gradient,
 * softmax(x) - (1 - eps) onehot(gold) - eps / V (0 on skipped rows), and its column sums
 * are added into grad_bias [V] float32. */
#define SMOOTHED_CE(NAME, T, LOAD, STORE)                                                       \
    void NAME(T *logits, const float *bias, int64_t R, int64_t V, const int64_t *target,        \
              int64_t ignore, float eps, float *losses, float *grad_bias, int threads) {        \
        float *bias_parts = grad_bias ? calloc((size_t)threads * V, sizeof(float)) : NULL;      \
        _Pragma("omp parallel num_threads(threads)")                                            \
        {                                                                                       \
            float *gb = bias_parts ? bias_parts + (size_t)omp_get_thread_num() * V : NULL;      \
            float *e = malloc(V * sizeof(float));                                               \
            _Pragma("omp for schedule(static)")                                                 \
            for (int64_t i = 0; i < R; i++) {                                                   \
                T *x = logits + i * V;                                                          \
                int64_t gold = target[i];                                                       \
                if (gold == ignore) {                                                           \
                    losses[i] = 0.0f;                                                           \
                    if (gb)                                                                     \
                        for (int64_t j = 0; j < V; j++) STORE(x, j, 0.0f);                      \
                    continue;                                                                   \
                }                                                                               \
                float top = -INFINITY, total = 0.0f, sum = 0.0f;                                \
                _Pragma("omp simd reduction(max:top) reduction(+:total)")                       \
                for (int64_t j = 0; j < V; j++) {                                               \
                    float l = LOAD(x, j) + bias[j];                                             \
                    top = l > top ? l : top;                                                    \
                    total += l;                                                                 \
                }                                                                               \
                _Pragma("omp simd reduction(+:sum)")                                            \
                for (int64_t j = 0; j < V; j++) {                                               \
                    e[j] = exp_poly(LOAD(x, j) + bias[j] - top);                                \
                    sum += e[j];                                                                \
                }                                                                               \
                float lse = top + logf(sum);                                                    \
                float x_gold = LOAD(x, gold) + bias[gold];                                      \
                losses[i] = (1.0f - eps) * (lse - x_gold) + eps * (lse - total / V);            \
                if (!gb) continue;                                                              \
                float inv = 1.0f / sum, off = eps / V;                                          \
                e[gold] -= (1.0f - eps) * sum;                                                  \
                _Pragma("omp simd")                                                             \
                for (int64_t j = 0; j < V; j++) {                                               \
                    float g = e[j] * inv - off;                                                 \
                    gb[j] += g;                                                                 \
                    STORE(x, j, g);                                                             \
                }                                                                               \
            }                                                                                   \
            free(e);                                                                            \
        }                                                                                       \
        if (bias_parts) {                                                                       \
            for (int t = 0; t < threads; t++)                                                   \
                for (int64_t j = 0; j < V; j++) grad_bias[j] += bias_parts[(size_t)t * V + j];  \
            free(bias_parts);                                                                   \
        }                                                                                       \
    }

SMOOTHED_CE(smoothed_ce_f32, float, load_f32, store_f32)
SMOOTHED_CE(smoothed_ce_bf16, bf16, load_bf16, store_bf16)

/* The GRU of torch.nn.GRU, gate arithmetic only (nmt/model/gru.py: fused_gru_gates), for a
 * batch of B rows: gates_x = W_i x + b_i and gates_h = W_h h + b_h, [B, 3H] in gate order r,
 * z, n (rows ld_x and ld_gh apart), the previous state h [B, H] (rows ld_h apart) and
 * real [B] (bytes ld_real apart; NULL: all real), where 0 keeps h:
 *
 *   r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r h_n)
 *   h' = n + z (h - n)                       forward: out [B, H]
 *
 * Backward, from grad [B, H] of h': grad_x [B, 3H], grad_gh [B, 3H] and grad_h [B, H], the
 * gates recomputed. tanh(x) = 2 sigmoid(2x) - 1. */
#define GRU_FORWARD(NAME, T, LOAD, STORE)                                                      \
    void NAME(const T *gx, int64_t ld_x, const T *gh, int64_t ld_gh, const T *h, int64_t ld_h,  \
              const uint8_t *real, int64_t ld_real, T *out, int64_t B, int64_t H, int threads) { \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(B * H > 32768)")    \
        for (int64_t b = 0; b < B; b++) {                                                      \
            const T *x = gx + b * ld_x, *g = gh + b * ld_gh, *hb = h + b * ld_h;               \
            T *o = out + b * H;                                                                \
            if (real && !real[b * ld_real]) {                                                  \
                for (int64_t j = 0; j < H; j++) STORE(o, j, LOAD(hb, j));                      \
                continue;                                                                      \
            }                                                                                  \
            _Pragma("omp simd")                                                                \
            for (int64_t j = 0; j < H; j++) {                                                  \
                float r = sigmoid(LOAD(x, j) + LOAD(g, j));                                    \
                float z = sigmoid(LOAD(x, H + j) + LOAD(g, H + j));                            \
                float n = 2.0f * sigmoid(2.0f * (LOAD(x, 2 * H + j) + r * LOAD(g, 2 * H + j))) - 1.0f; \
                STORE(o, j, n + z * (LOAD(hb, j) - n));                                        \
            }                                                                                  \
        }                                                                                      \
    }

GRU_FORWARD(gru_forward_f32, float, load_f32, store_f32)
GRU_FORWARD(gru_forward_bf16, bf16, load_bf16, store_bf16)

#define GRU_BACKWARD(NAME, T, LOAD, STORE)                                                     \
    void NAME(const T *gx, int64_t ld_x, const T *gh, int64_t ld_gh, const T *h, int64_t ld_h,  \
              const uint8_t *real, int64_t ld_real, const T *grad, T *grad_x, T *grad_gh,       \
              T *grad_h, int64_t B, int64_t H, int threads) {                                  \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(B * H > 32768)")    \
        for (int64_t b = 0; b < B; b++) {                                                      \
            const T *x = gx + b * ld_x, *g = gh + b * ld_gh, *hb = h + b * ld_h;               \
            const T *go = grad + b * H;                                                        \
            T *dx = grad_x + b * 3 * H, *dg = grad_gh + b * 3 * H, *dh = grad_h + b * H;       \
            if (real && !real[b * ld_real]) { /* padding: the state passes through */          \
                for (int64_t j = 0; j < 3 * H; j++) {                                          \
                    STORE(dx, j, 0.0f);                                                        \
                    STORE(dg, j, 0.0f);                                                        \
                }                                                                              \
                for (int64_t j = 0; j < H; j++) STORE(dh, j, LOAD(go, j));                     \
                continue;                                                                      \
            }                                                                                  \
            _Pragma("omp simd")                                                                \
            for (int64_t j = 0; j < H; j++) {                                                  \
                float r = sigmoid(LOAD(x, j) + LOAD(g, j));                                    \
                float z = sigmoid(LOAD(x, H + j) + LOAD(g, H + j));                            \
                float h_n = LOAD(g, 2 * H + j);                                                \
                float n = 2.0f * sigmoid(2.0f * (LOAD(x, 2 * H + j) + r * h_n)) - 1.0f;        \
                float d = LOAD(go, j), d_n = d * (1.0f - z);                                   \
                float pre_n = d_n * (1.0f - n * n);             /* d / d (x_n + r h_n) */      \
                float pre_r = pre_n * h_n * r * (1.0f - r);                                    \
                float pre_z = d * (LOAD(hb, j) - n) * z * (1.0f - z);                          \
                STORE(dx, j, pre_r);                                                           \
                STORE(dx, H + j, pre_z);                                                       \
                STORE(dx, 2 * H + j, pre_n);                                                   \
                STORE(dg, j, pre_r);                                                           \
                STORE(dg, H + j, pre_z);                                                       \
                STORE(dg, 2 * H + j, pre_n * r);                                               \
                STORE(dh, j, d * z);                                                           \
            }                                                                                  \
        }                                                                                      \
    }

GRU_BACKWARD(gru_backward_f32, float, load_f32, store_f32)
GRU_BACKWARD(gru_backward_bf16, bf16, load_bf16, store_bf16)
