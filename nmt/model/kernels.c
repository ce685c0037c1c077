/* CPU kernels for training and decoding, compiled on first use by nmt/model/native.py.
 *
 * Each fuses a chain of elementwise operations that PyTorch would run as separate passes
 * over memory into one pass over data that stays in the cache:
 *
 *   attention_*  one decoder step's additive attention (Bahdanau et al. 2015, appendix
 *                A.1.2): the energies e_ij = v_a^T tanh(q_i + k_j), their masked softmax
 *                a_ij and the context c_i = sum_j a_ij h_j, forward and backward;
 *   log_softmax_* a decoding step's log-probabilities; top_k_rows: their k best words;
 *   smoothed_ce_* the label-smoothed cross-entropy of a block of logits and its
 *                gradient, written over the logits;
 *   gru_*        the GRU's gate arithmetic, forward and backward;
 *   dropout_*    dropout, its mask drawn by counter from a seed, forward and backward.
 *
 * Plain C99 with OpenMP (the libgomp that PyTorch loaded), on as many threads as the caller
 * passes: torch.get_num_threads(), which the parallel decoding workers set to one.
 * Arithmetic is in float32 whatever the storage type; bfloat16 is read by shifting its
 * bits and written with round-to-nearest-even, as PyTorch does. exp and tanh are polynomial
 * and rational approximations that the compiler vectorises, where calls to libm would not
 * be; native.py compiles with -ffp-contract=fast, so that their Horner steps are FMAs.
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

/* exp, Cephes-style (relative error about 1e-7). */
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

/* tanh as a [13/6] rational minimax approximation on [-7.9053, 7.9053] (the coefficients
 * of Eigen's float tanh), +-1 beyond: absolute and relative error under 3e-7, and one
 * division, where the exp-based forms take an exp and a division. */
static inline float tanh_rational(float x) {
    x = x < -7.90531110763549805f ? -7.90531110763549805f : (x > 7.90531110763549805f ? 7.90531110763549805f : x);
    float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
}

static inline float sigmoid(float x) { return 0.5f + 0.5f * tanh_rational(0.5f * x); }

/* The additive attention of one decoder step (Bahdanau et al. 2015, section 3.1 and
 * appendix A.1.2), for query rows q_i [B * G, A] (G rows per sentence: the beams), the
 * sentence's keys k_j [B, S, A], v [A] float32, mask [B, S] (0 on padding) and annotations
 * h_j [B, S, K]:
 *
 *   e_ij = v^T tanh(q_i + k_j),  a_ij = softmax_j(e_ij) over real j,  c_i = sum_j a_ij h_j
 *
 * Forward: weights a [B * G, S] float32 (0 on padding) and context c [B * G, K], summed in
 * float32. Padding costs nothing: its energies are never computed. A row without a real
 * position gets zero weights and a zero context. */
#define ATTENTION_ROW(NAME, T, LOAD)                                                            \
    static inline float NAME##_energy(const float *q, const T *k, const float *v, int64_t A) {  \
        float dot = 0.0f;                                                                       \
        _Pragma("omp simd reduction(+:dot)")                                                    \
        for (int64_t a = 0; a < A; a++) dot += v[a] * tanh_rational(q[a] + LOAD(k, a));         \
        return dot;                                                                             \
    }                                                                                           \
    /* The energies' backward at one (i, j), gradient g of e_ij: adds into the query's          \
     * gradient gq, the keys' gk and v's gv. tanh is recomputed, not kept from the forward. */  \
    static inline void NAME##_energy_backward(const float *q, const T *k, const float *v,       \
                                              float g, float *gq, float *gk, float *gv,         \
                                              int64_t A) {                                      \
        _Pragma("omp simd")                                                                     \
        for (int64_t a = 0; a < A; a++) {                                                       \
            float t = tanh_rational(q[a] + LOAD(k, a));                                         \
            float d = g * v[a] * (1.0f - t * t); /* d e / d (q + k) */                          \
            gq[a] += d;                                                                         \
            gk[a] += d;                                                                         \
            gv[a] += g * t;                                                                     \
        }                                                                                       \
    }

ATTENTION_ROW(f32, float, load_f32)
ATTENTION_ROW(bf16, bf16, load_bf16)

#define ATTENTION_FORWARD(NAME, T, LOAD, STORE, ROW)                                            \
    void NAME(const T *query, const T *keys, const float *v, const uint8_t *mask,               \
              const T *annotations, float *weights, T *context, int64_t B, int64_t G,           \
              int64_t S, int64_t A, int64_t K, int threads) {                                   \
        _Pragma("omp parallel num_threads(threads)")                                            \
        {                                                                                       \
            float *q = malloc((A + K) * sizeof(float)), *c = q + A;                             \
            _Pragma("omp for schedule(static)")                                                 \
            for (int64_t row = 0; row < B * G; row++) {                                         \
                int64_t b = row / G;                                                            \
                const T *k = keys + b * S * A, *h = annotations + b * S * K;                    \
                const uint8_t *m = mask + b * S;                                                \
                float *w = weights + row * S, top = -INFINITY, sum = 0.0f;                      \
                for (int64_t a = 0; a < A; a++) q[a] = LOAD(query, row * A + a);                \
                for (int64_t s = 0; s < S; s++) {                                               \
                    w[s] = m[s] ? ROW##_energy(q, k + s * A, v, A) : 0.0f;                      \
                    if (m[s] && w[s] > top) top = w[s];                                         \
                }                                                                               \
                for (int64_t s = 0; s < S; s++)                                                 \
                    if (m[s]) sum += (w[s] = expf(w[s] - top));                                 \
                float inv = sum > 0.0f ? 1.0f / sum : 0.0f;                                     \
                for (int64_t j = 0; j < K; j++) c[j] = 0.0f;                                    \
                for (int64_t s = 0; s < S; s++) {                                               \
                    if (!m[s]) continue;                                                        \
                    float ws = w[s] *= inv;                                                     \
                    _Pragma("omp simd")                                                         \
                    for (int64_t j = 0; j < K; j++) c[j] += ws * LOAD(h, s * K + j);            \
                }                                                                               \
                for (int64_t j = 0; j < K; j++) STORE(context, row * K + j, c[j]);              \
            }                                                                                   \
            free(q);                                                                            \
        }                                                                                       \
    }

ATTENTION_FORWARD(attention_forward_f32, float, load_f32, store_f32, f32)
ATTENTION_FORWARD(attention_forward_bf16, bf16, load_bf16, store_bf16, bf16)

/* Attention, backward, one query row per sentence (G = 1), from the forward's weights a
 * [B, S] and the gradients of the context grad_context [B, K] and of the weights
 * grad_weights [B, S] float32 (NULL: none): writes the query's gradient grad_query [B, A]
 * float32 and adds the keys' into grad_keys [B, S, A], the annotations' into
 * grad_annotations [B, S, K] (NULL: not computed) and v's into grad_v [A], all float32. */
#define ATTENTION_BACKWARD(NAME, T, LOAD, ROW)                                                  \
    void NAME(const T *query, const T *keys, const float *v, const uint8_t *mask,               \
              const T *annotations, const float *weights, const T *grad_context,                \
              const float *grad_weights, float *grad_query, float *grad_keys,                   \
              float *grad_annotations, float *grad_v, int64_t B, int64_t S, int64_t A,          \
              int64_t K, int threads) {                                                         \
        float *grad_v_parts = calloc((size_t)threads * A, sizeof(float));                       \
        _Pragma("omp parallel num_threads(threads)")                                            \
        {                                                                                       \
            float *gv = grad_v_parts + (size_t)omp_get_thread_num() * A;                        \
            float *q = malloc((2 * A + K + S) * sizeof(float)), *gq = q + A, *gc = gq + A;      \
            float *ge = gc + K;                                                                 \
            _Pragma("omp for schedule(static)")                                                 \
            for (int64_t b = 0; b < B; b++) {                                                   \
                const T *k = keys + b * S * A, *h = annotations + b * S * K;                    \
                const uint8_t *m = mask + b * S;                                                \
                const float *w = weights + b * S;                                               \
                float *gk = grad_keys + b * S * A;                                              \
                float *gh = grad_annotations ? grad_annotations + b * S * K : NULL;             \
                float expected = 0.0f; /* sum_j a_j d/da_j */                                   \
                for (int64_t j = 0; j < K; j++) gc[j] = LOAD(grad_context, b * K + j);          \
                for (int64_t s = 0; s < S; s++) {                                               \
                    float ga = grad_weights ? grad_weights[b * S + s] : 0.0f;                   \
                    if (m[s] && gh) {                                                           \
                        float ws = w[s];                                                        \
                        _Pragma("omp simd reduction(+:ga)")                                     \
                        for (int64_t j = 0; j < K; j++) {                                       \
                            ga += gc[j] * LOAD(h, s * K + j);                                   \
                            gh[s * K + j] += ws * gc[j];                                        \
                        }                                                                       \
                    } else if (m[s]) {                                                          \
                        _Pragma("omp simd reduction(+:ga)")                                     \
                        for (int64_t j = 0; j < K; j++) ga += gc[j] * LOAD(h, s * K + j);       \
                    }                                                                           \
                    ge[s] = ga;                                                                 \
                    expected += w[s] * ga;                                                      \
                }                                                                               \
                for (int64_t a = 0; a < A; a++) {                                               \
                    q[a] = LOAD(query, b * A + a);                                              \
                    gq[a] = 0.0f;                                                               \
                }                                                                               \
                for (int64_t s = 0; s < S; s++) {                                               \
                    float g = w[s] * (ge[s] - expected); /* softmax's backward */               \
                    if (m[s] && g != 0.0f)                                                      \
                        ROW##_energy_backward(q, k + s * A, v, g, gq, gk + s * A, gv, A);       \
                }                                                                               \
                for (int64_t a = 0; a < A; a++) grad_query[b * A + a] = gq[a];                  \
            }                                                                                   \
            free(q);                                                                            \
        }                                                                                       \
        for (int t = 0; t < threads; t++)                                                       \
            for (int64_t a = 0; a < A; a++) grad_v[a] += grad_v_parts[(size_t)t * A + a];       \
        free(grad_v_parts);                                                                     \
    }

ATTENTION_BACKWARD(attention_backward_f32, float, load_f32, f32)
ATTENTION_BACKWARD(attention_backward_bf16, bf16, load_bf16, bf16)

/* log_softmax of every row of logits [R, V] plus bias [V] float32 (NULL: none) into out
 * [R, V] float32: each decoding step's log-probabilities, with the output layer's bias and
 * the conversion from bfloat16 in the same passes. */
#define LOG_SOFTMAX(NAME, T, LOAD)                                                                  \
    void NAME(const T *logits, const float *bias, float *out, int64_t R, int64_t V, int threads) {  \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                           \
        for (int64_t i = 0; i < R; i++) {                                                           \
            const T *x = logits + i * V;                                                            \
            float *o = out + i * V, top = -INFINITY, sum = 0.0f;                                    \
            _Pragma("omp simd reduction(max:top)")                                                  \
            for (int64_t j = 0; j < V; j++) {                                                       \
                o[j] = LOAD(x, j) + (bias ? bias[j] : 0.0f);                                        \
                top = o[j] > top ? o[j] : top;                                                      \
            }                                                                                       \
            _Pragma("omp simd reduction(+:sum)")                                                    \
            for (int64_t j = 0; j < V; j++) sum += exp_poly(o[j] - top);                            \
            float lse = top + logf(sum);                                                            \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < V; j++) o[j] -= lse;                                            \
        }                                                                                           \
    }

LOG_SOFTMAX(log_softmax_f32, float, load_f32)
LOG_SOFTMAX(log_softmax_bf16, bf16, load_bf16)

/* The k largest values of every row of scores [R, V] float32 and their columns, largest
 * first, into values [R, k] and columns [R, k] (k <= 64; equal values in column order):
 * the maxima of blocks of `block` columns in one pass, then the largest among the k blocks
 * with the largest maxima (a value outside them has k block maxima at least as large)
 * and the columns after the last whole block. */
static void insert_top(float x, int64_t j, float *top, int64_t *at, int64_t *n, int64_t k) {
    if (*n == k && !(x > top[k - 1])) return;
    int64_t i = *n < k ? (*n)++ : k - 1;
    for (; i > 0 && x > top[i - 1]; i--) {
        top[i] = top[i - 1];
        at[i] = at[i - 1];
    }
    top[i] = x;
    at[i] = j;
}

void top_k_rows(const float *scores, int64_t R, int64_t V, int64_t k, int64_t block, float *values,
                int64_t *columns, int threads) {
    int64_t blocks = V / block;
    _Pragma("omp parallel num_threads(threads)")
    {
        float *maxima = malloc((blocks + 2 * 64) * sizeof(float)), *best_max = maxima + blocks;
        int64_t best_block[64];
        _Pragma("omp for schedule(static)")
        for (int64_t i = 0; i < R; i++) {
            const float *x = scores + i * V;
            for (int64_t b = 0; b < blocks; b++) {
                float m = -INFINITY;
                _Pragma("omp simd reduction(max:m)")
                for (int64_t j = 0; j < block; j++) m = x[b * block + j] > m ? x[b * block + j] : m;
                maxima[b] = m;
            }
            int64_t n = 0;
            for (int64_t b = 0; b < blocks; b++) insert_top(maxima[b], b, best_max, best_block, &n, k);
            for (int64_t c = 1; c < n; c++) /* the chosen blocks in column order */
                for (int64_t d = c; d > 0 && best_block[d - 1] > best_block[d]; d--) {
                    int64_t swap = best_block[d];
                    best_block[d] = best_block[d - 1];
                    best_block[d - 1] = swap;
                }
            float *top = values + i * k;
            int64_t *at = columns + i * k, found = 0;
            for (int64_t c = 0; c < n; c++)
                for (int64_t j = best_block[c] * block; j < (best_block[c] + 1) * block; j++)
                    insert_top(x[j], j, top, at, &found, k);
            for (int64_t j = blocks * block; j < V; j++) insert_top(x[j], j, top, at, &found, k);
        }
        free(maxima);
    }
}

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
 * z, n (rows ld_x and ld_gh apart; gates_x's rows from `split` on read from gx2, its rows
 * ld_x apart too: the two directions of a bidirectional layer, each projected on its own),
 * the previous state h [B, H] (rows ld_h apart) and real [B] (bytes ld_real apart; NULL:
 * all real), where 0 keeps h:
 *
 *   r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r h_n)
 *   h' = n + z (h - n)                       forward: out [B, H]
 *
 * Backward, from grad [B, H] of h': grad_x [B, 3H], grad_gh [B, 3H] and grad_h [B, H], the
 * gates recomputed. */
/* Row b of gates_x: from gx below `split`, from gx2 after (both kernels' convention). */
#define GATES_X_ROW(b) ((b) < split ? gx + (b) * ld_x : gx2 + ((b) - split) * ld_x)

#define GRU_FORWARD(NAME, T, LOAD, STORE)                                                       \
    void NAME(const T *gx, int64_t ld_x, int64_t split, const T *gx2, const T *gh,              \
              int64_t ld_gh, const T *h, int64_t ld_h, const uint8_t *real, int64_t ld_real,    \
              T *out, int64_t B, int64_t H, int threads) {                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(B * H > 32768)")     \
        for (int64_t b = 0; b < B; b++) {                                                       \
            const T *x = GATES_X_ROW(b);                                                        \
            const T *g = gh + b * ld_gh, *hb = h + b * ld_h;                                    \
            T *o = out + b * H;                                                                 \
            if (real && !real[b * ld_real]) {                                                   \
                for (int64_t j = 0; j < H; j++) STORE(o, j, LOAD(hb, j));                       \
                continue;                                                                       \
            }                                                                                   \
            _Pragma("omp simd")                                                                 \
            for (int64_t j = 0; j < H; j++) {                                                   \
                float r = sigmoid(LOAD(x, j) + LOAD(g, j));                                     \
                float z = sigmoid(LOAD(x, H + j) + LOAD(g, H + j));                             \
                float n = tanh_rational(LOAD(x, 2 * H + j) + r * LOAD(g, 2 * H + j));           \
                STORE(o, j, n + z * (LOAD(hb, j) - n));                                         \
            }                                                                                   \
        }                                                                                       \
    }

GRU_FORWARD(gru_forward_f32, float, load_f32, store_f32)
GRU_FORWARD(gru_forward_bf16, bf16, load_bf16, store_bf16)

#define GRU_BACKWARD(NAME, T, LOAD, STORE)                                                      \
    void NAME(const T *gx, int64_t ld_x, int64_t split, const T *gx2, const T *gh,              \
              int64_t ld_gh, const T *h, int64_t ld_h,                                          \
              const uint8_t *real, int64_t ld_real, const T *grad, T *grad_x, T *grad_gh,       \
              T *grad_h, int64_t B, int64_t H, int threads) {                                   \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if(B * H > 32768)")     \
        for (int64_t b = 0; b < B; b++) {                                                       \
            const T *x = GATES_X_ROW(b);                                                        \
            const T *g = gh + b * ld_gh, *hb = h + b * ld_h;                                    \
            const T *go = grad + b * H;                                                         \
            T *dx = grad_x + b * 3 * H, *dg = grad_gh + b * 3 * H, *dh = grad_h + b * H;        \
            if (real && !real[b * ld_real]) { /* padding: the state passes through */           \
                for (int64_t j = 0; j < 3 * H; j++) {                                           \
                    STORE(dx, j, 0.0f);                                                         \
                    STORE(dg, j, 0.0f);                                                         \
                }                                                                               \
                for (int64_t j = 0; j < H; j++) STORE(dh, j, LOAD(go, j));                      \
                continue;                                                                       \
            }                                                                                   \
            _Pragma("omp simd")                                                                 \
            for (int64_t j = 0; j < H; j++) {                                                   \
                float r = sigmoid(LOAD(x, j) + LOAD(g, j));                                     \
                float z = sigmoid(LOAD(x, H + j) + LOAD(g, H + j));                             \
                float h_n = LOAD(g, 2 * H + j);                                                 \
                float n = tanh_rational(LOAD(x, 2 * H + j) + r * h_n);                          \
                float d = LOAD(go, j), d_n = d * (1.0f - z);                                    \
                float pre_n = d_n * (1.0f - n * n);             /* d / d (x_n + r h_n) */       \
                float pre_r = pre_n * h_n * r * (1.0f - r);                                     \
                float pre_z = d * (LOAD(hb, j) - n) * z * (1.0f - z);                           \
                STORE(dx, j, pre_r);                                                            \
                STORE(dx, H + j, pre_z);                                                        \
                STORE(dx, 2 * H + j, pre_n);                                                    \
                STORE(dg, j, pre_r);                                                            \
                STORE(dg, H + j, pre_z);                                                        \
                STORE(dg, 2 * H + j, pre_n * r);                                                \
                STORE(dh, j, d * z);                                                            \
            }                                                                                   \
        }                                                                                       \
    }

GRU_BACKWARD(gru_backward_f32, float, load_f32, store_f32)
GRU_BACKWARD(gru_backward_bf16, bf16, load_bf16, store_bf16)

/* Dropout (nmt/model/dropout.py): out = x / (1 - p) where element i is kept, 0 elsewhere, for
 * n contiguous elements. Element i is kept when the high 32 bits of mix(seed + i * golden),
 * the finaliser of splitmix64 (Steele et al. 2014), reach threshold = p * 2^32: a generator
 * by counter, so the backward pass, run on the output's gradient with the same seed, drops
 * the same elements without a stored mask. */
static inline uint32_t dropout_bits(uint64_t seed, int64_t i) {
    uint64_t z = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

#define DROPOUT(NAME, T, LOAD, STORE)                                                           \
    void NAME(const T *x, T *out, int64_t n, uint64_t seed, uint32_t threshold, float scale,    \
              int threads) {                                                                    \
        _Pragma("omp parallel for simd num_threads(threads) schedule(static) if(n > 65536)")    \
        for (int64_t i = 0; i < n; i++)                                                         \
            STORE(out, i, dropout_bits(seed, i) >= threshold ? LOAD(x, i) * scale : 0.0f);      \
    }

DROPOUT(dropout_f32, float, load_f32, store_f32)
DROPOUT(dropout_bf16, bf16, load_bf16, store_bf16)
