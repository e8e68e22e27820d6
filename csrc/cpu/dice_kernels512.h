// Row loops of the Dice CPU kernels for float accumulation (fp32, bf16, fp16 data) as explicit
// AVX-512 code, the same computations as dice_kernels.h: data converted in registers (vec512.h),
// masked tails, no division. Included by dice.cpp once per AVX-512 build inside that build's
// namespace and `#pragma GCC target`. No include guard on purpose.

template <typename S>
void block_moments(const S* __restrict__ x, int64_t nb, int64_t C, float* __restrict__ mean,
                   float* __restrict__ m2) {
  const __m512 inv = _mm512_set1_ps(1.0f / static_cast<float>(nb));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = v512::lanes(C - c);
    // two accumulators per chain, combined at the end: fixed order, half the add latency
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
      s0 = _mm512_add_ps(s0, v512::load(x + i * C + c, m));
      s1 = _mm512_add_ps(s1, v512::load(x + (i + 1) * C + c, m));
    }
    if (i < nb) s0 = _mm512_add_ps(s0, v512::load(x + i * C + c, m));
    const __m512 mu = _mm512_mul_ps(_mm512_add_ps(s0, s1), inv);
    __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
    for (i = 0; i + 1 < nb; i += 2) {
      const __m512 d0 = _mm512_sub_ps(v512::load(x + i * C + c, m), mu);
      const __m512 d1 = _mm512_sub_ps(v512::load(x + (i + 1) * C + c, m), mu);
      q0 = _mm512_fmadd_ps(d0, d0, q0);
      q1 = _mm512_fmadd_ps(d1, d1, q1);
    }
    if (i < nb) {
      const __m512 d0 = _mm512_sub_ps(v512::load(x + i * C + c, m), mu);
      q0 = _mm512_fmadd_ps(d0, d0, q0);
    }
    v512::store(mean + c, m, mu);
    v512::store(m2 + c, m, _mm512_add_ps(q0, q1));
  }
}

struct VCoef {
  __m512 mu, rs, ga, be, al;
};
inline VCoef vcoef(const Coef<float>& k, int64_t c, __mmask16 m) {
  return {v512::load(k.mean + c, m), v512::load(k.rstd + c, m),
          v512::load(k.gamma + c, m), v512::load(k.beta + c, m),
          v512::load(k.alpha + c, m)};
}

template <typename S>
void transform_rows(const S* __restrict__ x, S* __restrict__ y, int64_t nrows, int64_t C,
                    const Coef<float>& k) {
  // gamma rstd once per call: z = (x - mean) (gamma rstd) + beta, still exactly beta at x = mean
  std::vector<float> gr(C);
  for (int64_t c = 0; c < C; ++c) gr[c] = k.gamma[c] * k.rstd[c];
  for (int64_t i = 0; i < nrows; ++i) {
    const S* xi = x + i * C;
    S* yi = y + i * C;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = v512::lanes(C - c);
      const __m512 v = v512::load(xi + c, m);
      const __m512 z = _mm512_fmadd_ps(_mm512_sub_ps(v, v512::load(k.mean + c, m)),
                                       v512::load(gr.data() + c, m), v512::load(k.beta + c, m));
      const __m512 p = v512::sigmoid<S>(z);
      const __m512 av = _mm512_mul_ps(v512::load(k.alpha + c, m), v);
      v512::store(yi + c, m, _mm512_fmadd_ps(p, _mm512_sub_ps(v, av), av));
    }
  }
}

template <typename S>
void backward_reduce_rows(const S* __restrict__ g, const S* __restrict__ x, int64_t nrows,
                          int64_t C, const Coef<float>& k, float* __restrict__ s_alpha,
                          float* __restrict__ s_h, float* __restrict__ s_hx) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // rows outer (both inputs streamed in address order), the sums in L1
  for (int64_t i = 0; i < nrows; ++i) {
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = v512::lanes(C - c);
      const VCoef q = vcoef(k, c, m);
      const __m512 v = v512::load(x + i * C + c, m);
      const __m512 gv = v512::load(g + i * C + c, m);
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(v, q.mu), q.rs);
      const __m512 p = v512::sigmoid<S>(_mm512_fmadd_ps(q.ga, xh, q.be));
      const __m512 gx = _mm512_mul_ps(gv, v);
      const __m512 omp = _mm512_sub_ps(one, p);
      const __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(gx, _mm512_sub_ps(one, q.al)), p), omp);
      v512::store(s_alpha + c, m, _mm512_fmadd_ps(gx, omp, v512::load(s_alpha + c, m)));
      v512::store(s_h + c, m, _mm512_add_ps(v512::load(s_h + c, m), h));
      v512::store(s_hx + c, m, _mm512_fmadd_ps(h, xh, v512::load(s_hx + c, m)));
    }
  }
}

template <typename S>
void backward_dx_rows(const S* __restrict__ g, const S* __restrict__ x, S* __restrict__ dx,
                      int64_t nrows, int64_t C, const Coef<float>& k, const float* __restrict__ k1,
                      const float* __restrict__ k2, bool stat_terms) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < nrows; ++i) {
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = v512::lanes(C - c);
      const VCoef q = vcoef(k, c, m);
      const __m512 v = v512::load(x + i * C + c, m);
      const __m512 gv = v512::load(g + i * C + c, m);
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(v, q.mu), q.rs);
      const __m512 p = v512::sigmoid<S>(_mm512_fmadd_ps(q.ga, xh, q.be));
      const __m512 oma = _mm512_sub_ps(one, q.al);
      const __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(gv, v), oma), p), _mm512_sub_ps(one, p));
      __m512 t = h;
      if (stat_terms)  // h + k1 first: exactly 0 for one valid row, before the scaling
        t = _mm512_fmadd_ps(v512::load(k2 + c, m), xh, _mm512_add_ps(h, v512::load(k1 + c, m)));
      const __m512 d = _mm512_fmadd_ps(gv, _mm512_fmadd_ps(oma, p, q.al), _mm512_mul_ps(_mm512_mul_ps(q.ga, q.rs), t));
      v512::store(dx + i * C + c, m, d);
    }
  }
}

