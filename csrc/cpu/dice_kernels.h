// Row loops of the Dice CPU kernels (SPEC section 2), included by dice.cpp once per instruction
// set inside `namespace DICE_ISA` under a matching `#pragma GCC target`, so one portable binary
// carries AVX-512, AVX2 and baseline builds of the same code. No include guard on purpose.
// The loops are written for the compiler's vectorizer: the channel dimension is innermost and
// contiguous, the sigmoid's exp is branch-free arithmetic (see vexp).

namespace DICE_ISA {

#include "cvt.h"

// exp(x) for float as straight-line arithmetic (Cephes' expf polynomial, error ~1 ulp), so the
// channel loops vectorize; std::exp is a library call that the vectorizer cannot see through.
inline float vexp(float x) {
  // |x| <= 88 (exp(88) < FLT_MAX; exp(-88) flushes to 0 below) as an unsigned min on the bits:
  // a float min/max (or std::min) here is a branch to GCC without -ffinite-math-only, and the
  // branch stops the AVX2 vectorizer
  const uint32_t b = f32_to_bits(x);
  const uint32_t mag = b & 0x7FFFFFFFu;
  x = f32_from_bits((mag < 0x42B00000u ? mag : 0x42B00000u) | (b & 0x80000000u));
  // round-to-nearest through the 1.5 * 2^23 trick: no rint() call, vectorizes on every ISA
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * f32_from_bits(static_cast<uint32_t>(bits));
}
inline double vexp(double x) { return __builtin_exp(x); }

template <typename A>
inline A sigmoid(A z) {
  return A(1) / (A(1) + vexp(-z));
}

// Mean and M2 (sum of squared deviations) per channel of rows x[0, nb) of a [*, C] block,
// two passes over data that is still in cache.
template <typename S, typename A>
void block_moments(const S* __restrict__ x, int64_t nb, int64_t C, A* __restrict__ mean,
                   A* __restrict__ m2) {
  for (int64_t c = 0; c < C; ++c) mean[c] = A(0);
  for (int64_t i = 0; i < nb; ++i) {
    const S* xi = x + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mean[c] += ld(xi, c);
  }
  const A inv = A(1) / static_cast<A>(nb);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] *= inv;
    m2[c] = A(0);
  }
  for (int64_t i = 0; i < nb; ++i) {
    const S* xi = x + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A d = ld(xi, c) - mean[c];
      m2[c] += d * d;
    }
  }
}

// y = p x + (1 - p) alpha x, p = sigmoid(gamma (x - mean) rstd + beta)  (reference.dice_pointwise)
template <typename S, typename A>
void transform_rows(const S* __restrict__ x, S* __restrict__ y, int64_t nrows, int64_t C,
                    const Coef<A>& k) {
  const A* __restrict__ mu = k.mean;
  const A* __restrict__ rs = k.rstd;
  const A* __restrict__ ga = k.gamma;
  const A* __restrict__ be = k.beta;
  const A* __restrict__ al = k.alpha;
  for (int64_t i = 0; i < nrows; ++i) {
    const S* xi = x + i * C;
    S* yi = y + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A v = ld(xi, c);
      // subtract first: (x - mean) is exact for the single-row case, gamma*rstd*x - shift is not
      const A p = sigmoid<A>(ga[c] * ((v - mu[c]) * rs[c]) + be[c]);
      // p v + (1 - p) alpha v as p (v - alpha v) + alpha v: NaN at v = +-inf like the reference's
      st(yi, c, p * (v - al[c] * v) + al[c] * v);
    }
  }
}

// Backward reductions over rows x[0, nrows): with h = dL/dz = g x (1 - alpha) p (1 - p),
// s_alpha += g x (1 - p), s_h += h, s_hx += h xhat.
template <typename S, typename A>
void backward_reduce_rows(const S* __restrict__ g, const S* __restrict__ x, int64_t nrows,
                          int64_t C, const Coef<A>& k, A* __restrict__ s_alpha,
                          A* __restrict__ s_h, A* __restrict__ s_hx) {
  const A* __restrict__ mu = k.mean;
  const A* __restrict__ rs = k.rstd;
  const A* __restrict__ ga = k.gamma;
  const A* __restrict__ be = k.beta;
  const A* __restrict__ al = k.alpha;
  for (int64_t i = 0; i < nrows; ++i) {
    const S* xi = x + i * C;
    const S* gi = g + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A v = ld(xi, c);
      const A gv = ld(gi, c);
      const A xh = (v - mu[c]) * rs[c];
      const A p = sigmoid<A>(ga[c] * xh + be[c]);
      const A gx = gv * v;
      const A h = gx * (A(1) - al[c]) * p * (A(1) - p);
      s_alpha[c] += gx * (A(1) - p);
      s_h[c] += h;
      s_hx[c] += h * xh;
    }
  }
}

// dx = g (alpha + (1 - alpha) p) + gamma rstd (h [+ k1 + k2 xhat on valid rows in training:
// the terms through the batch mean and variance, k1 = -s_h / n, k2 = -s_hx / n])
// gamma rstd is factored out so that h + k1 cancels before the scaling: exactly 0 for one row.
template <typename S, typename A>
void backward_dx_rows(const S* __restrict__ g, const S* __restrict__ x, S* __restrict__ dx,
                      int64_t nrows, int64_t C, const Coef<A>& k, const A* __restrict__ k1,
                      const A* __restrict__ k2, bool stat_terms) {
  const A* __restrict__ mu = k.mean;
  const A* __restrict__ rs = k.rstd;
  const A* __restrict__ ga = k.gamma;
  const A* __restrict__ be = k.beta;
  const A* __restrict__ al = k.alpha;
  for (int64_t i = 0; i < nrows; ++i) {
    const S* xi = x + i * C;
    const S* gi = g + i * C;
    S* di = dx + i * C;
    if (stat_terms) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A v = ld(xi, c);
        const A gv = ld(gi, c);
        const A xh = (v - mu[c]) * rs[c];
        const A p = sigmoid<A>(ga[c] * xh + be[c]);
        const A oma = A(1) - al[c];
        const A h = gv * v * oma * p * (A(1) - p);
        st(di, c, gv * (al[c] + oma * p) + ga[c] * rs[c] * (h + k1[c] + k2[c] * xh));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A v = ld(xi, c);
        const A gv = ld(gi, c);
        const A xh = (v - mu[c]) * rs[c];
        const A p = sigmoid<A>(ga[c] * xh + be[c]);
        const A oma = A(1) - al[c];
        const A h = gv * v * oma * p * (A(1) - p);
        st(di, c, gv * (al[c] + oma * p) + h * ga[c] * rs[c]);
      }
    }
  }
}

}  // namespace DICE_ISA
