// Compute loops of the attention-pooling CPU kernels, included by attention_pooling.cpp once
// per instruction set inside `namespace AP_ISA` under a matching `#pragma GCC target` (as
// dice_kernels.h), so one portable binary carries AVX-512, AVX2 and baseline builds of them.
// Only the kernel's own internal-linkage code lives here: headers are included before the
// pragma, so no inline library function is compiled for a wider unit than the baseline.
// No include guard on purpose.

namespace AP_ISA {

// exp for float: Cody-Waite range reduction + degree-6 polynomial, branch-free so loops over
// it vectorize (relative error ~2e-7). Double keeps std::exp: float64 results are compared at 1e-10.
// The plain clamp turns NaN into -87; KeepNaN clamps |x| <= 88 (exp(-88) flushes to 0) as an
// unsigned min on the bits that lets NaN, whose bits lie above inf's, through to the polynomial,
// which then gives NaN as std::exp does. It costs ~10% more per sigmoid, so only tiles where a
// NaN can occur take it (Workspace::keep_nan).
template <bool KeepNaN>
inline float fast_exp(float x) {
  if constexpr (KeepNaN) {
    uint32_t b;
    std::memcpy(&b, &x, sizeof(b));
    const uint32_t mag = b & 0x7FFFFFFFu;
    b = (mag <= 0x42B00000u || mag > 0x7F800000u ? mag : 0x42B00000u) | (b & 0x80000000u);
    std::memcpy(&x, &b, sizeof(x));
  } else {
    x = std::min(88.0f, std::max(-87.0f, x));
  }
  // round to nearest by adding 1.5 * 2^23 (vectorizes, unlike nearbyint)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
template <bool KeepNaN>
inline double fast_exp(double x) {
  return std::exp(x);
}

template <bool KeepNaN, typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp<KeepNaN>(-x));
}

// C[M, N] = op(A) B (+ C when accumulate): A [M, K] row-major (lda), or stored as [K, M] when
// trans_a; B row-major [K, N]. The AVX-512 and AVX2 float builds run it in register blocks
// (gemm512.h, gemm256.h), the others through gemm_rm.
template <typename T>
void mm(bool trans_a, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
        int64_t ldc, bool accumulate) {
#ifdef AP_V512
  if constexpr (std::is_same_v<T, float>) {
    return gemm512::gemm(M, N, K, A, trans_a ? 1 : lda, trans_a ? lda : 1, B, ldb, C, ldc,
                         accumulate ? gemm512::Init::kC : gemm512::Init::kZero);
  }
#endif
#ifdef AP_V256
  if constexpr (std::is_same_v<T, float>) {
    return gemm256::gemm(M, N, K, A, trans_a ? 1 : lda, trans_a ? lda : 1, B, ldb, C, ldc,
                         accumulate ? gemm256::Init::kC : gemm256::Init::kZero);
  }
#endif
  gemm_rm<T>(trans_a, false, M, N, K, T(1), A, lda, B, ldb, accumulate ? T(1) : T(0), C, ldc);
}

// C[M, N] = bias + A B for every row (bias [N]), A row-major.
template <typename T>
void mm_bias(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias,
             T* C, int64_t ldc) {
#ifdef AP_V512
  if constexpr (std::is_same_v<T, float>) {
    return gemm512::gemm(M, N, K, A, lda, 1, B, ldb, C, ldc, gemm512::Init::kBias, bias);
  }
#endif
#ifdef AP_V256
  if constexpr (std::is_same_v<T, float>) {
    return gemm256::gemm(M, N, K, A, lda, 1, B, ldb, C, ldc, gemm256::Init::kBias, bias);
  }
#endif
  // the bias is added to the finished products, as gemm512 does: added first, it would round
  // every partial sum at its magnitude (DIN's pre-activations are often a bias plus a small spread)
  gemm_rm<T>(false, false, M, N, K, T(1), A, lda, B, ldb, T(0), C, ldc);
  for (int64_t i = 0; i < M; ++i) {
    T* __restrict c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] += bias[j];
  }
}

// The forward's folded layer 0 for one (row, candidate), transposed for mm: AbcT [D, H0].
template <typename T>
void fold_layer0_t(const Mlp<T>& m, const T* __restrict q, T* __restrict AbcT) {
  const int64_t H0 = m.H[0], D = m.D;
  for (int64_t d = 0; d < D; ++d) {
    const T* __restrict wkd = m.WkdT() + d * H0;
    const T* __restrict wp = m.WpT() + d * H0;
    T* __restrict a = AbcT + d * H0;
    const T qd = q[d];
    for (int64_t h = 0; h < H0; ++h) a[h] = wkd[h] + wp[h] * qd;
  }
}

// cbc = (Wq + Wd) q + b0 for one (row, candidate), accumulated over d with h innermost.
template <typename T>
void fold_bias0(const Mlp<T>& m, const T* __restrict q, T* __restrict cbc) {
  const int64_t H0 = m.H[0], D = m.D;
  const T* __restrict WqdT = m.WqdT.data();
  std::fill(cbc, cbc + H0, T(0));
  for (int64_t d = 0; d < D; ++d) {
    const T qd = q[d];
    const T* __restrict w = WqdT + d * H0;
    for (int64_t h = 0; h < H0; ++h) cbc[h] += w[h] * qd;
  }
  const T* __restrict b = m.bias(0);
  for (int64_t h = 0; h < H0; ++h) cbc[h] += b[h];  // last, as in mm_bias
}

// The backward's folded layer 0 for one (row, candidate): Abc = (Wk - Wd) + Wp diag(q) [H0, D].
template <typename T>
void fold_layer0(const Mlp<T>& m, const T* __restrict q, T* __restrict Abc) {
  const int64_t H0 = m.H[0], D = m.D;
  for (int64_t h = 0; h < H0; ++h) {
    const T* __restrict wp = m.Wp + h * 4 * D;
    const T* __restrict wkd = m.W01.data() + h * 2 * D;  // its first half: Wk - Wd
    T* __restrict a = Abc + h * D;
    for (int64_t d = 0; d < D; ++d) a[d] = wkd[d] + wp[d] * q[d];
  }
}

template <typename T>
void activate(const Mlp<T>& m, int64_t l, const T* z, T* a, int64_t M, bool keep_nan) {
  const int64_t H = m.H[l];
  const int64_t n = M * H;
  switch (m.act) {
    case Act::Sigmoid:
      if (keep_nan) {
        for (int64_t i = 0; i < n; ++i) a[i] = sigmoid<true>(z[i]);
        break;
      }
#ifdef AP_V512
      if constexpr (std::is_same_v<T, float>) {
        // the tile's hot loop: rcp14 + one Newton step instead of a division (~2e-6 relative)
        for (int64_t i = 0; i < n; i += 16) {
          const __mmask16 lanes = v512::lanes(n - i);
          v512::store(a + i, lanes, v512::sigmoid<true>(v512::load(z + i, lanes)));
        }
        break;
      }
#endif
#ifdef AP_V256
      if constexpr (std::is_same_v<T, float>) {
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(a + i, v256::sigmoid(_mm256_loadu_ps(z + i)));
        for (; i < n; ++i) a[i] = sigmoid<false>(z[i]);
        break;
      }
#endif
      for (int64_t i = 0; i < n; ++i) a[i] = sigmoid<false>(z[i]);
      break;
    case Act::ReLU:
      for (int64_t i = 0; i < n; ++i) a[i] = z[i] < T(0) ? T(0) : z[i];  // NaN stays NaN, as torch.relu
      break;
    case Act::Identity:
      std::memcpy(a, z, n * sizeof(T));
      break;
    case Act::PReLU: {
      const T* al = m.alpha[l].template data_ptr<T>();
      const int64_t as = m.alpha_stride[l];
      for (int64_t i = 0; i < M; ++i)
        for (int64_t h = 0; h < H; ++h) {
          const T v = z[i * H + h];
          a[i * H + h] = v >= T(0) ? v : al[h * as] * v;
        }
      break;
    }
    case Act::Dice: {
      const T* al = m.alpha[l].template data_ptr<T>();
      const T* mu = m.mean[l].template data_ptr<T>();
      const T* va = m.var[l].template data_ptr<T>();
      const T* ga = m.gamma[l].template data_ptr<T>();
      const T* be = m.beta[l].template data_ptr<T>();
      std::vector<T> k1(H), k0(H);  // y = k1 * z + k0: the normalization folded into one affine map
      for (int64_t h = 0; h < H; ++h) {
        const T rstd = dice_rstd(va[h], m.eps);
        k1[h] = ga[h] * rstd;
        k0[h] = be[h] - ga[h] * rstd * mu[h];
      }
#if defined(AP_V512) || defined(AP_V256)
      // the tiles without NaN in vector code (GCC leaves the loop over fast_exp scalar)
      if constexpr (std::is_same_v<T, float>) {
        if (!keep_nan) {
          for (int64_t i = 0; i < M; ++i) {
            const float* zi = z + i * H;
            float* ai = a + i * H;
#ifdef AP_V512
            for (int64_t h = 0; h < H; h += 16) {
              const __mmask16 ln = v512::lanes(H - h);
              const __m512 v = v512::load(zi + h, ln), av = _mm512_mul_ps(v512::load(al + h, ln), v);
              const __m512 p = v512::sigmoid<true>(_mm512_fmadd_ps(v512::load(k1.data() + h, ln), v,
                                                                   v512::load(k0.data() + h, ln)));
              v512::store(ai + h, ln, _mm512_fmadd_ps(p, _mm512_sub_ps(v, av), av));
            }
#else
            int64_t h = 0;
            for (; h + 8 <= H; h += 8) {
              const __m256 v = _mm256_loadu_ps(zi + h), av = _mm256_mul_ps(_mm256_loadu_ps(al + h), v);
              const __m256 p = v256::sigmoid(_mm256_fmadd_ps(_mm256_loadu_ps(k1.data() + h), v,
                                                             _mm256_loadu_ps(k0.data() + h)));
              _mm256_storeu_ps(ai + h, _mm256_fmadd_ps(p, _mm256_sub_ps(v, av), av));
            }
            for (; h < H; ++h) {
              const float v = zi[h], p = sigmoid<false>(k1[h] * v + k0[h]);
              ai[h] = p * (v - al[h] * v) + al[h] * v;
            }
#endif
          }
          break;
        }
      }
#endif
      auto rows = [&](auto keep_nan_t) {
        for (int64_t i = 0; i < M; ++i)
          for (int64_t h = 0; h < H; ++h) {
            const T v = z[i * H + h];
            const T p = sigmoid<decltype(keep_nan_t)::value>(k1[h] * v + k0[h]);
            // p v + (1 - p) alpha v as p (v - alpha v) + alpha v: NaN at v = +-inf like the reference's
            a[i * H + h] = p * (v - al[h] * v) + al[h] * v;
          }
      };
      keep_nan ? rows(std::true_type{}) : rows(std::false_type{});
      break;
    }
  }
}

// Gradient through the activation of layer l: dz = dA * f'(z), accumulating the activation's
// parameter gradients into g (per-range buffer).
template <typename T>
void activate_backward(const Mlp<T>& m, const GradLayout& lay, int64_t l, const T* z, const T* a,
                       const T* dA, T* dz, int64_t M, T* g, bool keep_nan) {
  const int64_t H = m.H[l];
  const int64_t n = M * H;
  switch (m.act) {
    case Act::Sigmoid:
      for (int64_t i = 0; i < n; ++i) dz[i] = dA[i] * a[i] * (T(1) - a[i]);
      break;
    case Act::ReLU:
      for (int64_t i = 0; i < n; ++i) dz[i] = z[i] <= T(0) ? T(0) : dA[i];  // torch passes dA at NaN
      break;
    case Act::Identity:
      std::memcpy(dz, dA, n * sizeof(T));
      break;
    case Act::PReLU: {
      const T* al = m.alpha[l].template data_ptr<T>();
      const int64_t as = m.alpha_stride[l];
      T* ga = g + lay.alpha[l];
      for (int64_t i = 0; i < M; ++i)
        for (int64_t h = 0; h < H; ++h) {
          // torch.where(v >= 0, v, a * v) as autograd sees it: both branches get a gradient,
          // so a NaN alpha (or an inf v) poisons as in the reference
          const T v = z[i * H + h], d = dA[i * H + h];
          const bool pos = v >= T(0);
          const T dneg = pos ? T(0) : d;
          dz[i * H + h] = (pos ? d : T(0)) + al[h * as] * dneg;
          ga[h * as] += dneg * v;
        }
      break;
    }
    case Act::Dice: {
      const T* al = m.alpha[l].template data_ptr<T>();
      const T* mu = m.mean[l].template data_ptr<T>();
      const T* va = m.var[l].template data_ptr<T>();
      const T* gm = m.gamma[l].template data_ptr<T>();
      const T* be = m.beta[l].template data_ptr<T>();
      // the tile's sums in double, then one addition each into the range's buffer: under batch
      // statistics these gradients cancel to a few digits
      std::vector<double> sums(5 * H, 0.0);
      double* g_alpha = sums.data();
      double* g_mean = g_alpha + H;
      double* g_var = g_mean + H;
      double* g_gamma = g_var + H;
      double* g_beta = g_gamma + H;
      std::vector<T> rstd(H);
      for (int64_t h = 0; h < H; ++h) rstd[h] = dice_rstd(va[h], m.eps);
      int64_t h0 = 0;  // channels [0, h0) done in vector code
#if defined(AP_V512) || defined(AP_V256)
      // tiles without NaN: 8 channels at a time, the same float products, summed in double
      if constexpr (std::is_same_v<T, float>) {
        if (!keep_nan) {
          h0 = H / 8 * 8;
          auto add_to = [](double* s, __m256 x) {
            _mm256_storeu_pd(s, _mm256_add_pd(_mm256_loadu_pd(s), _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
            _mm256_storeu_pd(s + 4, _mm256_add_pd(_mm256_loadu_pd(s + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
          };
          const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
          for (int64_t i = 0; i < M; ++i)
            for (int64_t h = 0; h < h0; h += 8) {
              const __m256 v = _mm256_loadu_ps(z + i * H + h), d = _mm256_loadu_ps(dA + i * H + h);
              const __m256 a_ = _mm256_loadu_ps(al + h), g_ = _mm256_loadu_ps(gm + h), rs = _mm256_loadu_ps(rstd.data() + h);
              const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(v, _mm256_loadu_ps(mu + h)), rs);
              const __m256 p = v256::sigmoid(_mm256_add_ps(_mm256_mul_ps(g_, xhat), _mm256_loadu_ps(be + h)));
              const __m256 omp = _mm256_sub_ps(one, p), dv = _mm256_mul_ps(d, v);
              const __m256 u = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dv, _mm256_sub_ps(one, a_)), p), omp);
              const __m256 ugr = _mm256_mul_ps(_mm256_mul_ps(u, g_), rs);
              _mm256_storeu_ps(dz + i * H + h,
                               _mm256_add_ps(_mm256_mul_ps(d, _mm256_add_ps(a_, _mm256_mul_ps(_mm256_sub_ps(one, a_), p))), ugr));
              add_to(g_alpha + h, _mm256_mul_ps(dv, omp));
              add_to(g_gamma + h, _mm256_mul_ps(u, xhat));
              add_to(g_beta + h, u);
              add_to(g_mean + h, _mm256_sub_ps(_mm256_setzero_ps(), ugr));
              add_to(g_var + h, _mm256_sub_ps(_mm256_setzero_ps(),
                                              _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, u), g_), xhat), _mm256_mul_ps(rs, rs))));
            }
        }
      }
#endif
      for (int64_t i = 0; i < M; ++i)
        for (int64_t h = h0; h < H; ++h) {
          const T v = z[i * H + h], d = dA[i * H + h];
          const T xhat = (v - mu[h]) * rstd[h];
          const T p = keep_nan ? sigmoid<true>(gm[h] * xhat + be[h]) : sigmoid<false>(gm[h] * xhat + be[h]);
          const T u = d * v * (T(1) - al[h]) * p * (T(1) - p);  // dL/dy, y the sigmoid's input
          dz[i * H + h] = d * (al[h] + (T(1) - al[h]) * p) + u * gm[h] * rstd[h];
          g_alpha[h] += d * v * (T(1) - p);
          g_gamma[h] += u * xhat;
          g_beta[h] += u;
          g_mean[h] -= u * gm[h] * rstd[h];
          g_var[h] -= T(0.5) * u * gm[h] * xhat * rstd[h] * rstd[h];
        }
      for (int64_t h = 0; h < H; ++h) {
        g[lay.alpha[l] + h] += T(g_alpha[h]);
        g[lay.mean[l] + h] += T(g_mean[h]);
        g[lay.var[l] + h] += T(g_var[h]);
        g[lay.gamma[l] + h] += T(g_gamma[h]);
        g[lay.beta[l] + h] += T(g_beta[h]);
      }
      break;
    }
  }
}

// NaN in layer 0 for the positions of a segment whose q or k_t holds an inf or a NaN; whether
// there was one. Out of line: it runs only when some z[t, 0] is not finite.
template <typename T>
__attribute__((noinline, cold)) bool nan_for_nonfinite_inputs(const T* q, const T* k, int64_t n, int64_t D, T* z,
                                                            int64_t H0) {
  const bool bad_q = has_nonfinite(q, D);
  bool any = false;
  for (int64_t i = 0; i < n; ++i)
    if (bad_q || has_nonfinite(k + i * D, D)) {
      std::fill(z + i * H0, z + (i + 1) * H0, std::numeric_limits<T>::quiet_NaN());
      any = true;
    }
  return any;
}

// Rows [0, M) of x [M, cols] rounded to the matrix unit's dtype into out [Mr, ld] (RNE for
// bf16, NaN kept), rows [M, Mr) and columns [cols, ld) zero so the padded product is exact.
inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  // branch-free so the loops over it vectorize; a NaN is kept quiet instead of rounded
  const uint32_t r = (b & 0x7FFFFFFFu) > 0x7F800000u ? (b | 0x400000u) : b + 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(r >> 16);
}

// bf16 values widened (exact) and rounded back (nearest even): the forward's tile keys
// (widen_tile_keys), the backward's per-range float copies of the keys and their gradient.
template <typename T>
void widen_bf16(const uint16_t* __restrict x, int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = T(bf16_value(x[i]));
}

template <typename T>
void narrow_bf16(const T* __restrict x, int64_t n, uint16_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits(static_cast<float>(x[i]));
}

// fp16 bits widened (exact), by c10's conversion
inline float fp16_value(uint16_t b) { return static_cast<float>(c10::Half(b, c10::Half::from_bits())); }

// A key value as the forward reads it (Inputs::kb): bf16, or fp16 when Half
template <bool Half>
inline float key16(uint16_t b) {
  return Half ? fp16_value(b) : bf16_value(b);
}

template <typename T>
void widen_keys16(const Inputs<T>& in, int64_t p0, int64_t n, T* __restrict out) {
  const uint16_t* __restrict x = in.kb + p0;
  if (in.kb_half) {
    for (int64_t i = 0; i < n; ++i) out[i] = T(key16<true>(x[i]));
  } else {
    widen_bf16(x, n, out);
  }
}

// The forward's float products of bf16/fp16 keys (in.k null): the tile's keys widened into
// ws.Kt, which stays in cache while the tile is computed (a float copy of the whole tensor
// would be written to memory and read back).
template <typename T>
void widen_tile_keys(const Rows& r, const Inputs<T>& in, Workspace<T>& ws) {
  if (in.k != nullptr) return;
  for (const Segment& s : ws.segs) widen_keys16(in, (r.start[s.b] + s.t0) * r.D, s.n * r.D, ws.Kt.data() + s.off * r.D);
}

// The float keys of run s of the tile: in place, or in ws.Kt (widen_tile_keys).
template <typename T>
const T* tile_keys(const Rows& r, const Inputs<T>& in, const Workspace<T>& ws, const Segment& s) {
  return in.k != nullptr ? in.k + (r.start[s.b] + s.t0) * r.D : ws.Kt.data() + s.off * r.D;
}

// Whether the matrix unit's operands are rounded in vector code (lowp512).
inline bool vector_roundings() {
#ifdef AP_V512
  return cpu_avx512_bf16();
#else
  return false;
#endif
}

#ifdef AP_V512
// The matrix unit's roundings in vector code with AVX512-BF16's vcvtneps2bf16 (one instruction
// for the ~8 of the integer rounding): every CPU with AMX has it; without it (vector_roundings,
// false under DIN_OPS_CPU_ISA=avx512) the scalar loops run.
#pragma GCC push_options
#pragma GCC target("avx512bf16")
namespace lowp512 {

// v rounded to L (bf16: nearest even, denormals flushed, NaN kept; fp16: F16C's rounding)
template <typename L>
inline void store_lowp(L* p, __mmask16 m, __m512 v) {
  if constexpr (std::is_same_v<L, c10::BFloat16>) {
    v512::store16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  } else {
    v512::store(p, m, v);
  }
}

// to_lowp (below) in vector code
template <typename L>
void to_lowp(const float* x, int64_t M, int64_t cols, int64_t Mr, int64_t ld, uint16_t* out) {
  for (int64_t i = 0; i < M; ++i) {
    L* o = reinterpret_cast<L*>(out + i * ld);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = v512::lanes(cols - j);
      store_lowp(o + j, m, v512::load(x + i * cols + j, m));
    }
    std::fill(out + i * ld + cols, out + (i + 1) * ld, uint16_t(0));
  }
  std::fill(out + M * ld, out + Mr * ld, uint16_t(0));
}

// out [H, Mr] = x^T in L for x [M, H] (16 rows at a time, each column gathered), zero past M
template <typename L>
void transpose_lowp(const float* x, int64_t M, int64_t H, int64_t Mr, uint16_t* out) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(H)));
  for (int64_t i0 = 0; i0 < M; i0 += 16) {
    const __mmask16 m = v512::lanes(M - i0);
    const float* base = x + i0 * H;
    for (int64_t h = 0; h < H; ++h) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, base + h, 4);
      store_lowp(reinterpret_cast<L*>(out + h * Mr + i0), m, v);
    }
  }
  for (int64_t h = 0; h < H; ++h) std::fill(out + h * Mr + M, out + (h + 1) * Mr, uint16_t(0));
}

// Layer 0's operand [k, k * q] in L for the tile's rows, K padding zero, from the keys as
// stored (bf16 keys: their bits copied, then widened for the product) or in float.
template <typename L>
void pack_layer0(const Mlp<float>& m, const Rows& r, const Inputs<float>& in, Workspace<float>& ws) {
  const int64_t D = m.D, Kp = m.lowp_w[0].Kp;
  L* Xl = reinterpret_cast<L*>(ws.Xl.data());
  for (size_t j = 0; j < ws.segs.size(); ++j) {
    const Segment& s = ws.segs[j];
    const float* q = ws.Qs.data() + j * D;
    const int64_t p0 = (r.start[s.b] + s.t0) * D;
    for (int64_t i = 0; i < s.n; ++i) {
      L* x = Xl + (s.off + i) * Kp;
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 mk = v512::lanes(D - d);
        __m512 k;
        if (std::is_same_v<L, c10::BFloat16> && in.kb != nullptr) {
          const __m256i kb = v512::load16(in.kb + p0 + i * D + d, mk);
          v512::store16(x + d, mk, kb);
          k = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(kb), 16));
        } else {
          k = v512::load(in.k + p0 + i * D + d, mk);
          store_lowp(x + d, mk, k);
        }
        store_lowp(x + D + d, mk, _mm512_mul_ps(k, v512::load(q + d, mk)));
      }
      for (int64_t d = 2 * D; d < Kp; ++d) x[d] = L(0);
    }
  }
  const int64_t Mr = (ws.M + kRowsM - 1) / kRowsM * kRowsM;
  std::fill(ws.Xl.begin() + ws.M * Kp, ws.Xl.begin() + Mr * Kp, uint16_t(0));
}

}  // namespace lowp512
#pragma GCC pop_options
#endif

inline void to_lowp(at::ScalarType dt, const float* x, int64_t M, int64_t cols, int64_t Mr, int64_t ld,
                    uint16_t* out) {
#ifdef AP_V512
  if (vector_roundings())
    return dt == at::kBFloat16 ? lowp512::to_lowp<c10::BFloat16>(x, M, cols, Mr, ld, out)
                               : lowp512::to_lowp<c10::Half>(x, M, cols, Mr, ld, out);
#endif
  for (int64_t i = 0; i < M; ++i) {
    const float* __restrict xi = x + i * cols;
    uint16_t* __restrict o = out + i * ld;
    if (dt == at::kBFloat16) {
      for (int64_t j = 0; j < cols; ++j) o[j] = bf16_bits(xi[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) o[j] = c10::Half(xi[j]).x;
    }
    for (int64_t j = cols; j < ld; ++j) o[j] = 0;
  }
  std::fill(out + M * ld, out + Mr * ld, uint16_t(0));
}

// out [H, Mr] = x^T rounded to the matrix unit's dtype for x [M, H], zero past M.
inline void transpose_lowp(at::ScalarType dt, const float* x, int64_t M, int64_t H, int64_t Mr, uint16_t* out) {
#ifdef AP_V512
  if (vector_roundings())
    return dt == at::kBFloat16 ? lowp512::transpose_lowp<c10::BFloat16>(x, M, H, Mr, out)
                               : lowp512::transpose_lowp<c10::Half>(x, M, H, Mr, out);
#endif
  constexpr int64_t kRows = 32;  // transposed in blocks of rows that stay in L1
  for (int64_t i0 = 0; i0 < M; i0 += kRows) {
    const int64_t i1 = std::min(M, i0 + kRows);
    for (int64_t h = 0; h < H; ++h) {
      uint16_t* __restrict o = out + h * Mr;
      if (dt == at::kBFloat16) {
        for (int64_t i = i0; i < i1; ++i) o[i] = bf16_bits(x[i * H + h]);
      } else {
        for (int64_t i = i0; i < i1; ++i) o[i] = c10::Half(x[i * H + h]).x;
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) std::fill(out + h * Mr + M, out + (h + 1) * Mr, uint16_t(0));
}

// C [Mr, N] += buf W_l^T on the matrix unit, buf [Mr, Kp] already in its dtype.
inline void lowp_product(const LowpLayer& p, at::ScalarType dt, int64_t Mr, const uint16_t* buf, float* C,
                         int64_t ldc, bool add = true) {
  if (dt == at::kBFloat16) {
    lowp_gemm(p, Mr, reinterpret_cast<const at::BFloat16*>(buf), p.Kp, C, ldc, add);
  } else {
    lowp_gemm(p, Mr, reinterpret_cast<const at::Half*>(buf), p.Kp, C, ldc, add);
  }
}

// C [Mr, N] = lowp(A [M, K]) B on the matrix unit, B = p: the backward's dA = dZ W. Rounding
// dZ to the input dtype is what a half-precision nn.Linear's backward does too.
inline void lowp_dgrad(const LowpLayer& p, at::ScalarType dt, const float* A, int64_t M, uint16_t* buf, float* C) {
  const int64_t Mr = (M + kRowsM - 1) / kRowsM * kRowsM;
  to_lowp(dt, A, M, p.K, Mr, p.Kp, buf);
  std::fill(C, C + Mr * p.N, 0.0f);
  lowp_product(p, dt, Mr, buf, C, p.N);
}

// C [H, N] += lowp(dZ)^T lowp(A) on the matrix unit: a weight gradient dW = dZ^T A summed over
// the tile's M rows (dZ [M, H], A [M, N] in float). Scratch: dzt [H, Mr], a [Mr, N] and
// packed [ceil(N / kBlockN), Mr, kBlockN] in the input dtype.
template <typename L>
void lowp_wgrad_as(at::ScalarType dt, const float* dz, int64_t M, int64_t H, const float* A, int64_t N,
                   uint16_t* dzt, uint16_t* a, uint16_t* packed, float* C) {
  const int64_t Mr = (M + kRowsM - 1) / kRowsM * kRowsM;  // the product's K: even, zero past M
  transpose_lowp(dt, dz, M, H, Mr, dzt);
  to_lowp(dt, A, M, N, Mr, N, a);
  for (int64_t j = 0; j * kBlockN < N; ++j) {
    const int64_t n = std::min(kBlockN, N - j * kBlockN);
    uint16_t* pj = packed + j * Mr * kBlockN;
    vnni_pack(Mr, n, N, kBlockN, dt, a + j * kBlockN, pj);
    at::native::cpublas::brgemm(H, n, Mr, Mr, kBlockN, N, true, reinterpret_cast<const L*>(dzt),
                                reinterpret_cast<const L*>(pj), C + j * kBlockN);
  }
}

template <typename T>
void lowp_wgrad(const Mlp<T>& m, Workspace<T>& ws, const float* dz, int64_t H, const float* A, int64_t N, float* C) {
  if (m.lowp == at::kBFloat16) {
    lowp_wgrad_as<at::BFloat16>(m.lowp, dz, ws.M, H, A, N, ws.dZt.data(), ws.Aw.data(), ws.Bp.data(), C);
  } else {
    lowp_wgrad_as<at::Half>(m.lowp, dz, ws.M, H, A, N, ws.dZt.data(), ws.Aw.data(), ws.Bp.data(), C);
  }
}

// Whether the backward's dA of layer l runs on the matrix unit.
template <typename T>
bool lowp_backward(const Mlp<T>& m, int64_t l) {
  return std::is_same_v<T, float> && !m.lowp_wb.empty() && m.lowp_wb[l].packed.defined();
}

// C [Mr, N] += lowp(A) W_l^T on the matrix unit (T = float only).
template <typename T>
void lowp_layer(const Mlp<T>& m, int64_t l, const T* A, int64_t M, int64_t cols, uint16_t* buf, T* C, int64_t ldc,
                bool add = true) {
  if constexpr (std::is_same_v<T, float>) {
    const LowpLayer& p = m.lowp_w[l];
    const int64_t Mr = (M + kRowsM - 1) / kRowsM * kRowsM;
    to_lowp(m.lowp, A, M, cols, Mr, p.Kp, buf);
    lowp_product(p, m.lowp, Mr, buf, C, ldc, add);
  }
}

// Layer 0 of a tile in the folded form: per run, Abc and cbc for its (row, candidate), then
// z = k Abc^T + cbc. Cheapest per position (D*H0 multiply-adds), for tiles of long runs.
template <typename T>
void layer0_folded(const Mlp<T>& m, const Rows& r, const Inputs<T>& in, Workspace<T>& ws) {
  const int64_t D = m.D, H0 = m.H[0];
  T* Z0 = ws.Z[0].data();
  for (const Segment& s : ws.segs) {
    const T* q = in.q + (s.b * r.C + s.c) * D;
    fold_layer0_t(m, q, ws.Abc.data());
    fold_bias0(m, q, ws.cbc.data());
    const T* k = tile_keys(r, in, ws, s);
    mm_bias<T>(s.n, H0, D, k, D, ws.Abc.data(), H0, ws.cbc.data(), Z0 + s.off * H0, H0);
  }
}

// Layer 0's operand [k, k * q] in the matrix unit's dtype for the tile's rows (ws.Qs holds the
// runs' queries), K padding zero, from bf16 keys as stored or from float keys; fp16 in vector
// code only (layer0_unfolded).
inline void pack_layer0_lowp(const Mlp<float>& m, const Rows& r, const Inputs<float>& in, Workspace<float>& ws) {
#ifdef AP_V512
  if (vector_roundings())
    return m.lowp == at::kBFloat16 ? lowp512::pack_layer0<c10::BFloat16>(m, r, in, ws)
                                   : lowp512::pack_layer0<c10::Half>(m, r, in, ws);
#endif
  const int64_t D = m.D, Kp = m.lowp_w[0].Kp, M = ws.M, Mr = (M + kRowsM - 1) / kRowsM * kRowsM;
  uint16_t* Xl = ws.Xl.data();
  for (size_t j = 0; j < ws.segs.size(); ++j) {
    const Segment& s = ws.segs[j];
    const float* __restrict q = ws.Qs.data() + j * D;
    const int64_t p0 = (r.start[s.b] + s.t0) * D;
    for (int64_t i = 0; i < s.n; ++i) {
      uint16_t* __restrict x = Xl + (s.off + i) * Kp;
      if (in.kb != nullptr) {
        const uint16_t* __restrict kt = in.kb + p0 + i * D;
        for (int64_t d = 0; d < D; ++d) {
          x[d] = kt[d];
          x[D + d] = bf16_bits(bf16_value(kt[d]) * q[d]);
        }
      } else {
        const float* __restrict kt = in.k + p0 + i * D;
        for (int64_t d = 0; d < D; ++d) {
          x[d] = bf16_bits(kt[d]);
          x[D + d] = bf16_bits(kt[d] * q[d]);
        }
      }
      for (int64_t d = 2 * D; d < Kp; ++d) x[d] = 0;
    }
  }
  std::fill(Xl + M * Kp, Xl + Mr * Kp, uint16_t(0));
}

// Layer 0 of a tile in the unfolded two-product form: z = [k, k * q] [Wk - Wd | Wp]^T +
// (Wq + Wd) q + b0, one GEMM over the tile plus one over its runs' queries. Twice the
// multiply-adds per position of the folded form but no per-run setup: for tiles of short runs.
// With !fill_z on the matrix unit, Z0 gets the products only (the caller adds the run terms Cs);
// with !product in float, Z0 holds the run terms and X is packed, the product left to the caller.
template <typename T>
void layer0_unfolded(const Mlp<T>& m, const Rows& r, const Inputs<T>& in, Workspace<T>& ws, bool fill_z = true,
                     bool product = true) {
  const int64_t D = m.D, H0 = m.H[0], S = static_cast<int64_t>(ws.segs.size());
  T* Qs = ws.Qs.data();
  for (int64_t j = 0; j < S; ++j) {
    const Segment& s = ws.segs[j];
    std::memcpy(Qs + j * D, in.q + (s.b * r.C + s.c) * D, D * sizeof(T));
  }
  T* Cs = ws.Cs.data();
  mm_bias<T>(S, H0, D, Qs, D, m.WqdT.data(), H0, m.bias(0), Cs, H0);
  T* Z0 = ws.Z[0].data();
  T* X = ws.X.data();
  // X goes straight into Xl below when the backward does not need it in float (bf16; fp16 too
  // where the vector roundings run)
  const bool direct = !ws.keep_x && (m.lowp == at::kBFloat16 || (m.lowp == at::kHalf && vector_roundings()));
  // the plain product's run terms are added to its finished sums below (see mm_bias)
  const bool terms_after = product && m.lowp == at::ScalarType::Undefined;
  for (int64_t j = 0; j < S; ++j) {
    const Segment& s = ws.segs[j];
    if (fill_z && !terms_after)
      for (int64_t i = 0; i < s.n; ++i) std::memcpy(Z0 + (s.off + i) * H0, Cs + j * H0, H0 * sizeof(T));
    if (direct) continue;
    const T* k = tile_keys(r, in, ws, s);
    const T* __restrict q = Qs + j * D;
    for (int64_t i = 0; i < s.n; ++i) {
      const T* __restrict kt = k + i * D;
      T* __restrict x = X + (s.off + i) * 2 * D;
      for (int64_t d = 0; d < D; ++d) {
        x[d] = kt[d];
        x[D + d] = kt[d] * q[d];
      }
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (direct) {
      pack_layer0_lowp(m, r, in, ws);
      lowp_product(m.lowp_w[0], m.lowp, (ws.M + kRowsM - 1) / kRowsM * kRowsM, ws.Xl.data(), Z0, H0, fill_z);
      return;
    }
    if (m.lowp != at::ScalarType::Undefined) return lowp_layer(m, 0, X, ws.M, 2 * D, ws.Xl.data(), Z0, H0, fill_z);
  }
  if (!product) return;
  mm<T>(false, ws.M, H0, 2 * D, X, 2 * D, m.W01T.data(), H0, Z0, H0, false);
  if (!fill_z) return;
  for (int64_t j = 0; j < S; ++j) {
    const Segment& s = ws.segs[j];
    const T* __restrict c = Cs + j * H0;
    for (int64_t i = 0; i < s.n; ++i) {
      T* __restrict z = Z0 + (s.off + i) * H0;
      for (int64_t h = 0; h < H0; ++h) z[h] += c[h];
    }
  }
}

#ifdef AP_V512
// tile_forward for float sigmoid MLPs with finite parameters on AVX-512: each hidden layer's
// sigmoid is taken on the products' registers (gemm512's epilogue), so the hidden layers'
// pre-activations are never stored (the sigmoid's backward needs its output only). Returns false,
// having computed nothing that counts, when a layer-0 sum is inf or NaN: the caller then runs the
// general path, which gives those positions NaN as the reference does.
inline bool tile_forward_sigmoid(const Mlp<float>& m, const Rows& r, const Inputs<float>& in, Workspace<float>& ws) {
  const int64_t D = m.D, H0 = m.H[0], M = ws.M;
  ws.keep_nan = false;
  ws.unfolded = ws.M < kFoldMinLen * static_cast<int64_t>(ws.segs.size());
  gemm512::Act act{ws.A[0].data(), H0, false};
  if (ws.unfolded) {
    // X and Z0 = the runs' terms packed by layer0_unfolded, then Z0 + X W01^T with the sigmoid
    layer0_unfolded(m, r, in, ws, true, false);
    gemm512::gemm<true>(M, H0, 2 * D, ws.X.data(), 2 * D, 1, m.W01T.data(), H0, ws.Z[0].data(), H0,
                        gemm512::Init::kC, nullptr, &act);
  } else {
    for (const Segment& s : ws.segs) {
      const float* q = in.q + (s.b * r.C + s.c) * D;
      fold_layer0_t(m, q, ws.Abc.data());
      fold_bias0(m, q, ws.cbc.data());
      const float* k = tile_keys(r, in, ws, s);
      gemm512::Act as{act.s + s.off * H0, H0, false};
      gemm512::gemm<true>(s.n, H0, D, k, D, 1, ws.Abc.data(), H0, nullptr, H0, gemm512::Init::kBias, ws.cbc.data(),
                          &as);
      act.bad |= as.bad;
    }
  }
  if (act.bad) return false;
  for (int64_t l = 1; l < m.L; ++l) {
    const int64_t H = m.H[l], Hin = m.fan_in[l];
    if (l + 1 < m.L) {
      gemm512::Act al{ws.A[l].data(), H, false};
      gemm512::gemm<true>(M, H, Hin, ws.A[l - 1].data(), Hin, 1, m.WT[l].data(), H, nullptr, H, gemm512::Init::kBias,
                          m.bias(l), &al);
    } else {
      mm_bias<float>(M, H, Hin, ws.A[l - 1].data(), Hin, m.WT[l].data(), H, m.bias(l), ws.Z[l].data(), H);
    }
  }
  return true;
}

// The matrix-unit forward below rounds in vector code (lowp512 above); without AVX512-BF16 (or
// under DIN_OPS_CPU_ISA=avx512) tile_forward takes the general path.
#pragma GCC push_options
#pragma GCC target("avx512bf16")
using lowp512::store_lowp;

// The hidden layer's activation on the matrix-unit path: a = sigmoid(z + bias) for rows
// [i0, i0 + n) (bias [H]: b_l, or layer 0's run term), into A in float (null: not kept) and
// into the next layer's operand in L (null: that layer runs in float). The sigmoid is the one
// whose result is kept in L (vec512.h: bf16's exp to 1e-4, rcp14 unrefined), well inside the
// operand's rounding; the backward's float A takes the same values. False at an inf or NaN z.
// With out, the output layer's score of each row too (out->s[i] = a . out->w + out->b): the
// activations then need no float copy.
struct Score {
  const float* w;  // [H]
  float b;
  float* s;  // [M]
};

template <typename L>
bool lowp_sigmoid_rows(const float* z, int64_t H, const float* bias, int64_t i0, int64_t n, float* A, L* Al,
                       int64_t ldl, const Score* out = nullptr) {
  __mmask16 bad = 0;
  for (int64_t i = i0; i < i0 + n; ++i) {
    const float* zi = z + i * H;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 m = v512::lanes(H - h);
      const __m512 v = _mm512_add_ps(v512::load(zi + h, m), v512::load(bias + h, m));
      bad |= _mm512_mask_fpclass_ps_mask(m, v, 0x99);
      const __m512 a = v512::sigmoid<L>(v);
      if (A != nullptr) v512::store(A + i * H + h, m, a);
      if (Al != nullptr) store_lowp(Al + i * ldl + h, m, a);
      if (out != nullptr) dot = _mm512_fmadd_ps(a, v512::load(out->w + h, m), dot);  // 0 past H
    }
    if (out != nullptr) out->s[i] = _mm512_reduce_add_ps(dot) + out->b;
  }
  return bad == 0;
}

// tile_forward for sigmoid MLPs with finite parameters on the matrix unit (bf16/fp16 inputs):
// the products write Z, and one pass per hidden layer adds the bias, takes the sigmoid and
// rounds the next layer's operand (no float copy of the bias into Z, no separate rounding pass).
// Float activations are written only where a float layer or the backward reads them.
// False, as tile_forward_sigmoid, when layer 0 holds an inf or a NaN.
template <typename L>
bool tile_forward_lowp_sigmoid_as(const Mlp<float>& m, const Rows& r, const Inputs<float>& in, Workspace<float>& ws) {
  const int64_t H0 = m.H[0], M = ws.M, Mr = (M + kRowsM - 1) / kRowsM * kRowsM;
  ws.keep_nan = false;
  ws.unfolded = true;
  layer0_unfolded(m, r, in, ws, false);
  L* Al = reinterpret_cast<L*>(ws.Al.data());
  auto on_unit = [&](int64_t l) { return l < m.L && m.lowp_w[l].packed.defined(); };
  auto operand = [&](int64_t l) -> L* { return on_unit(l) ? Al : nullptr; };  // layer l's operand
  auto ld = [&](int64_t l) { return on_unit(l) ? m.lowp_w[l].Kp : 0; };
  // Without the backward, a one-column output layer in float is taken in the last hidden
  // layer's pass when that one runs on the matrix unit (or is layer 0).
  const int64_t last = m.L - 1;
  const bool fuse = !ws.keep_x && m.L >= 2 && m.H[last] == 1 && !on_unit(last) && (last == 1 || on_unit(last - 1));
  const Score score{m.w(last), m.bias(last)[0], ws.Z[last].data()};
  auto fused = [&](int64_t l) { return fuse && l == last - 1 ? &score : nullptr; };
  // layer l's float activations, when the backward or a float layer l + 1 reads them
  auto keep = [&](int64_t l) -> float* {
    return ws.keep_x || (!on_unit(l + 1) && fused(l) == nullptr) ? ws.A[l].data() : nullptr;
  };
  bool ok = true;
  {
    L* al = operand(1);
    for (size_t j = 0; j < ws.segs.size(); ++j) {
      const Segment& s = ws.segs[j];
      ok &= lowp_sigmoid_rows(ws.Z[0].data(), H0, ws.Cs.data() + j * H0, s.off, s.n, keep(0), al, ld(1), fused(0));
    }
  }
  if (!ok) return false;
  for (int64_t l = 1; l < (fuse ? last : m.L); ++l) {
    const int64_t H = m.H[l], Hin = m.fan_in[l];
    L* al = operand(l);
    if (al != nullptr) {
      const int64_t kp = m.lowp_w[l].Kp;
      if (kp > Hin)
        for (int64_t i = 0; i < M; ++i) std::fill(Al + i * kp + Hin, Al + (i + 1) * kp, L(0));  // K padding
      std::fill(Al + M * kp, Al + Mr * kp, L(0));
    }
    if (l + 1 < m.L) {
      if (al != nullptr) {
        lowp_product(m.lowp_w[l], m.lowp, Mr, ws.Al.data(), ws.Z[l].data(), H, false);
        lowp_sigmoid_rows(ws.Z[l].data(), H, m.bias(l), 0, M, keep(l), operand(l + 1), ld(l + 1), fused(l));
      } else {
        gemm512::Act act{ws.A[l].data(), H, false};
        gemm512::gemm<true>(M, H, Hin, ws.A[l - 1].data(), Hin, 1, m.WT[l].data(), H, nullptr, H,
                            gemm512::Init::kBias, m.bias(l), &act);
        // the next layer's operand, when it runs on the matrix unit
        if (L* nl = operand(l + 1))
          for (int64_t i = 0; i < M; ++i)
            for (int64_t h = 0; h < H; h += 16) {
              const __mmask16 mk = v512::lanes(H - h);
              store_lowp(nl + i * ld(l + 1) + h, mk, v512::load(ws.A[l].data() + i * H + h, mk));
            }
      }
    } else if (al != nullptr) {
      float* z = ws.Z[l].data();
      for (int64_t i = 0; i < M; ++i) std::memcpy(z + i * H, m.bias(l), H * sizeof(float));
      lowp_product(m.lowp_w[l], m.lowp, Mr, ws.Al.data(), z, H, true);
    } else {
      mm_bias<float>(M, H, Hin, ws.A[l - 1].data(), Hin, m.WT[l].data(), H, m.bias(l), ws.Z[l].data(), H);
    }
  }
  return true;
}

bool tile_forward_lowp_sigmoid(const Mlp<float>& m, const Rows& r, const Inputs<float>& in, Workspace<float>& ws) {
  return m.lowp == at::kBFloat16 ? tile_forward_lowp_sigmoid_as<c10::BFloat16>(m, r, in, ws)
                                 : tile_forward_lowp_sigmoid_as<c10::Half>(m, r, in, ws);
}
#pragma GCC pop_options
#endif

// Forward through the tile: Z[l] for every layer, A[l] for every layer but the last (the AVX-512
// sigmoid path leaves the hidden layers' Z unset).
template <typename T>
void tile_forward(const Mlp<T>& m, const Rows& r, const Inputs<T>& in, Workspace<T>& ws) {
  if (m.lowp == at::ScalarType::Undefined) widen_tile_keys(r, in, ws);
#ifdef AP_V512
  if constexpr (std::is_same_v<T, float>) {
    if (m.act == Act::Sigmoid && !m.nonfinite && m.L > 1) {
      if (m.lowp == at::ScalarType::Undefined ? tile_forward_sigmoid(m, r, in, ws)
                                              : vector_roundings() && tile_forward_lowp_sigmoid(m, r, in, ws))
        return;
    }
  }
#endif
  const int64_t D = m.D, H0 = m.H[0];
  T* Z0 = ws.Z[0].data();
  ws.keep_nan = m.nonfinite;
  // the folded form's per-run setup costs about kFoldMinLen positions of the unfolded form
  // (the matrix unit takes the unfolded form always: the folded one has a matrix per run)
  ws.unfolded = m.lowp != at::ScalarType::Undefined || ws.M < kFoldMinLen * static_cast<int64_t>(ws.segs.size());
  if (ws.unfolded) {
    layer0_unfolded(m, r, in, ws);
  } else {
    layer0_folded(m, r, in, ws);
  }
  // An inf in q or k_t makes the reference's [q, k, q - k, q * k] layer NaN (inf - inf) for
  // weights of mixed sign, where both forms here may give +-inf: NaN for the whole position.
  // Any inf or NaN of q or k_t reaches z[t, 0] (0 * inf is NaN), so one value per position
  // says whether to look at its inputs.
  int bad = 0;
  for (int64_t i = 0; i < ws.M; ++i) bad |= !(Z0[i * H0] - Z0[i * H0] == T(0));
  if (bad) {
    std::vector<T> kf;  // bf16 keys widened, for this rare path only
    for (const Segment& s : ws.segs) {
      const int64_t p0 = (r.start[s.b] + s.t0) * D;
      const T* k;
      if (in.kb != nullptr) {
        kf.resize(s.n * D);
        widen_keys16(in, p0, s.n * D, kf.data());
        k = kf.data();
      } else {
        k = in.k + p0;
      }
      ws.keep_nan |= nan_for_nonfinite_inputs(in.q + (s.b * r.C + s.c) * D, k, s.n, D, Z0 + s.off * H0, H0);
    }
  }
  const int64_t M = ws.M;
  for (int64_t l = 0; l < m.L; ++l) {
    if (l > 0) {
      const int64_t H = m.H[l], Hin = m.fan_in[l];
      T* z = ws.Z[l].data();
      const T* bl = m.bias(l);
      if (m.lowp != at::ScalarType::Undefined && m.lowp_w[l].packed.defined()) {
        for (int64_t i = 0; i < M; ++i) std::memcpy(z + i * H, bl, H * sizeof(T));
        lowp_layer(m, l, ws.A[l - 1].data(), M, Hin, ws.Al.data(), z, H);
      } else {
        mm_bias<T>(M, H, Hin, ws.A[l - 1].data(), Hin, m.WT[l].data(), H, bl, z, H);
      }
    }
    if (l + 1 < m.L) activate(m, l, ws.Z[l].data(), ws.A[l].data(), M, ws.keep_nan);
  }
}

// Backward of layer 0 in the folded form (dz: [M, H0]).
template <typename T>
void layer0_folded_backward(const Mlp<T>& m, const GradLayout& lay, const Rows& r, const Inputs<T>& in,
                            Workspace<T>& ws, const T* dz, T* g, T* gk, T* gq) {
  const int64_t D = m.D, H0 = m.H[0];
  T* gW0 = g + lay.W[0];
  T* gb0 = g + lay.b[0];
  const T* Wqd = m.Wqd.data();
  for (const Segment& s : ws.segs) {
    const T* q = in.q + (s.b * r.C + s.c) * D;
    fold_layer0<T>(m, q, ws.Abc.data());
    const T* dzs = dz + s.off * H0;
    const int64_t p0 = r.start[s.b] + s.t0;
    // dk += dz Abc; dAbc = dz^T k; dc = sum dz
    mm<T>(false, s.n, D, H0, dzs, H0, ws.Abc.data(), D, gk + p0 * D, D, true);
    mm<T>(true, H0, D, s.n, dzs, H0, in.k + p0 * D, D, ws.dA0.data(), D, false);
    T* dc = ws.dc0.data();
    std::fill(dc, dc + H0, T(0));
    for (int64_t i = 0; i < s.n; ++i)
      for (int64_t h = 0; h < H0; ++h) dc[h] += dzs[i * H0 + h];
    T* __restrict dq = gq + (s.b * r.C + s.c) * D;
    for (int64_t h = 0; h < H0; ++h) {
      const T* __restrict dA = ws.dA0.data() + h * D;
      const T* __restrict wp = m.Wp + h * 4 * D;
      const T* __restrict wqd = Wqd + h * D;
      T* __restrict gq_ = gW0 + h * 4 * D;  // column blocks of W0: q, k, q - k, q * k
      T* __restrict gk_ = gq_ + D;
      T* __restrict gd_ = gq_ + 2 * D;
      T* __restrict gp_ = gq_ + 3 * D;
      const T ch = dc[h];
#pragma GCC ivdep
      for (int64_t d = 0; d < D; ++d) {
        const T cq = ch * q[d];
        gq_[d] += cq;
        gk_[d] += dA[d];
        gd_[d] += cq - dA[d];
        gp_[d] += dA[d] * q[d];
        dq[d] += dA[d] * wp[d] + wqd[d] * ch;
      }
      gb0[h] += ch;
    }
  }
}

// Backward of layer 0 in the unfolded form, reusing the X and Qs that tile_forward packed.
template <typename T>
void layer0_unfolded_backward(const Mlp<T>& m, const GradLayout& lay, const Rows& r, const Inputs<T>& in,
                              Workspace<T>& ws, const T* dz, T* g, T* gk, T* gq) {
  const int64_t D = m.D, H0 = m.H[0], M = ws.M, S = static_cast<int64_t>(ws.segs.size());
  const T* X = ws.X.data();
  const T* Qs = ws.Qs.data();
  T* dW01 = ws.dW01.data();
  T* dX = ws.dX.data();
  // dW01 = dz^T X, dX = dz W01
  if constexpr (std::is_same_v<T, float>) {
    if (lowp_backward(m, 0)) {
      std::fill(dW01, dW01 + H0 * 2 * D, 0.0f);
      lowp_wgrad(m, ws, dz, H0, X, 2 * D, dW01);
      lowp_dgrad(m.lowp_wb[0], m.lowp, dz, M, ws.dZl.data(), dX);
    } else {
      mm<T>(true, H0, 2 * D, M, dz, H0, X, 2 * D, dW01, 2 * D, false);
      mm<T>(false, M, 2 * D, H0, dz, H0, m.W01.data(), 2 * D, dX, 2 * D, false);
    }
  } else {
    mm<T>(true, H0, 2 * D, M, dz, H0, X, 2 * D, dW01, 2 * D, false);
    mm<T>(false, M, 2 * D, H0, dz, H0, m.W01.data(), 2 * D, dX, 2 * D, false);
  }
  T* dCs = ws.Cs.data();  // the forward's run terms are not needed any more
  for (int64_t j = 0; j < S; ++j) {
    const Segment& s = ws.segs[j];
    const T* __restrict q = Qs + j * D;
    const int64_t p0 = r.start[s.b] + s.t0;
    T* __restrict dq = gq + (s.b * r.C + s.c) * D;
    T* __restrict dc = dCs + j * H0;
    std::fill(dc, dc + H0, T(0));
    for (int64_t i = 0; i < s.n; ++i) {
      const T* __restrict dx = dX + (s.off + i) * 2 * D;
      const T* __restrict kt = in.k + (p0 + i) * D;
      T* __restrict dk = gk + (p0 + i) * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] += dx[d] + dx[D + d] * q[d];
        dq[d] += dx[D + d] * kt[d];
      }
      const T* __restrict dzi = dz + (s.off + i) * H0;
      for (int64_t h = 0; h < H0; ++h) dc[h] += dzi[h];
    }
  }
  // the run terms: dWqd = dCs^T Qs, dq += dCs Wqd, db0 += sum dCs
  T* dWqd = ws.dA0.data();
  mm<T>(true, H0, D, S, dCs, H0, Qs, D, dWqd, D, false);
  T* dQs = ws.dQs.data();
  mm<T>(false, S, D, H0, dCs, H0, m.Wqd.data(), D, dQs, D, false);
  for (int64_t j = 0; j < S; ++j) {
    const Segment& s = ws.segs[j];
    T* __restrict dq = gq + (s.b * r.C + s.c) * D;
    const T* __restrict src = dQs + j * D;
    for (int64_t d = 0; d < D; ++d) dq[d] += src[d];
  }
  T* gW0 = g + lay.W[0];
  T* gb0 = g + lay.b[0];
  for (int64_t h = 0; h < H0; ++h) {
    const T* __restrict dkd = dW01 + h * 2 * D;
    const T* __restrict dp = dkd + D;
    const T* __restrict dqd = dWqd + h * D;
    T* __restrict gq_ = gW0 + h * 4 * D;  // column blocks of W0: q, k, q - k, q * k
    T* __restrict gk_ = gq_ + D;
    T* __restrict gd_ = gq_ + 2 * D;
    T* __restrict gp_ = gq_ + 3 * D;
#pragma GCC ivdep
    for (int64_t d = 0; d < D; ++d) {
      gq_[d] += dqd[d];
      gk_[d] += dkd[d];
      gd_[d] += dqd[d] - dkd[d];
      gp_[d] += dp[d];
    }
  }
  // db0 += the runs' column sums, row by row (vectors over h; each column still sums its runs
  // in order from 0: a strided scalar sum per column took 4% of the backward at T = 1)
  T* __restrict cb = ws.dc0.data();  // [H0]: the folded form's buffer, free in this one
  std::fill(cb, cb + H0, T(0));
  for (int64_t j = 0; j < S; ++j) {
    const T* __restrict c = dCs + j * H0;
    for (int64_t h = 0; h < H0; ++h) cb[h] += c[h];
  }
  for (int64_t h = 0; h < H0; ++h) gb0[h] += cb[h];
}

// Backward through the tile, given dZ of the last layer in ws.dZ. Accumulates weight
// gradients into g, key gradients into gk ([P, D]) and query gradients into gq ([B*C, D]).
template <typename T>
void tile_backward(const Mlp<T>& m, const GradLayout& lay, const Rows& r, const Inputs<T>& in,
                   Workspace<T>& ws, T* g, T* gk, T* gq) {
  const int64_t M = ws.M;
  T* dz = ws.dZ.data();
  T* dprev = ws.dZprev.data();
  for (int64_t l = m.L - 1; l >= 1; --l) {
    const int64_t H = m.H[l], Hin = m.fan_in[l];
    // dW_l += dZ_l^T A_{l-1}; db_l += sum_i dZ_l; dA_{l-1} = dZ_l W_l
    if constexpr (std::is_same_v<T, float>) {
      if (lowp_backward(m, l)) {
        lowp_wgrad(m, ws, dz, H, ws.A[l - 1].data(), Hin, g + lay.W[l]);
      } else {
        mm<T>(true, H, Hin, M, dz, H, ws.A[l - 1].data(), Hin, g + lay.W[l], Hin, true);
      }
    } else {
      mm<T>(true, H, Hin, M, dz, H, ws.A[l - 1].data(), Hin, g + lay.W[l], Hin, true);
    }
    T* gb = g + lay.b[l];
    // in double, as in activate_backward, over partial sums of 8 rows (a conversion per
    // element cost as much as the sum)
    std::vector<double> sum(H, 0.0);
    std::vector<T> part(H);
    for (int64_t i0 = 0; i0 < M; i0 += 8) {
      std::fill(part.begin(), part.end(), T(0));
      for (int64_t i = i0; i < std::min(M, i0 + 8); ++i)
        for (int64_t h = 0; h < H; ++h) part[h] += dz[i * H + h];
      for (int64_t h = 0; h < H; ++h) sum[h] += part[h];
    }
    for (int64_t h = 0; h < H; ++h) gb[h] += T(sum[h]);
    if constexpr (std::is_same_v<T, float>) {
      if (lowp_backward(m, l)) {
        lowp_dgrad(m.lowp_wb[l], m.lowp, dz, M, ws.dZl.data(), dprev);
      } else {
        mm<T>(false, M, Hin, H, dz, H, m.w(l), Hin, dprev, Hin, false);
      }
    } else {
      mm<T>(false, M, Hin, H, dz, H, m.w(l), Hin, dprev, Hin, false);
    }
    activate_backward(m, lay, l - 1, ws.Z[l - 1].data(), ws.A[l - 1].data(), dprev, dz, M, g, ws.keep_nan);
  }
  if (ws.unfolded) {
    layer0_unfolded_backward(m, lay, r, in, ws, dz, g, gk, gq);
  } else {
    layer0_folded_backward(m, lay, r, in, ws, dz, g, gk, gq);
  }
}

// o[D] += sum_i w[i * ws] k[i] over the n keys from element p0 on: float keys, or the
// forward's bf16/fp16 keys as stored (Inputs::kb). pool_forward and pool_segment both pool
// through it, so either gives the same sums.
template <typename T>
void pool_keys(const Inputs<T>& in, int64_t p0, int64_t n, int64_t D, const T* w, int64_t ws, T* __restrict o) {
  auto pool = [&](auto key) {
    for (int64_t i = 0; i < n; ++i) {
      const T wt = w[i * ws];
      for (int64_t d = 0; d < D; ++d) o[d] += wt * key(p0 + i * D + d);
    }
  };
  if (in.kb == nullptr) {
    const T* __restrict k = in.k;
    pool([k](int64_t j) { return k[j]; });
  } else if (in.kb_half) {
    const uint16_t* __restrict kb = in.kb;
    pool([kb](int64_t j) { return T(key16<true>(kb[j])); });
  } else {
    const uint16_t* __restrict kb = in.kb;
    pool([kb](int64_t j) { return T(key16<false>(kb[j])); });
  }
}

// Softmax (when asked) of the scores of (row, candidate) pairs [pb, pe) (pair b * C + c)
// and the attention-weighted sum of the row's keys into out (written, not added to).
template <typename T>
void pool_forward(const Rows& r, const Inputs<T>& in, bool softmax, int64_t pb, int64_t pe, T* attn, T* out) {
  const int64_t D = r.D;
  for (int64_t p = pb; p < pe; ++p) {
    const int64_t b = p / r.C, c = p % r.C;
    const int64_t n = r.len[b];
    T* a = attn + r.start[b] * r.C + c * r.sC;
    if (softmax && n > 0) {
      T mx = a[0];
      for (int64_t t = 1; t < n; ++t) mx = std::max(mx, a[t * r.sT]);
      T sum = 0;
      for (int64_t t = 0; t < n; ++t) {
        const T e = std::exp(a[t * r.sT] - mx);
        a[t * r.sT] = e;
        sum += e;
      }
      const T inv = T(1) / sum;
      for (int64_t t = 0; t < n; ++t) a[t * r.sT] *= inv;
    }
    T* __restrict o = out + p * D;
    std::fill(o, o + D, T(0));
    pool_keys(in, r.start[b] * D, n, D, a, r.sT, o);
  }
}

// out[pair] += sum_i w[i] k[t0 + i] for one run of a tile (= for the pair's first run), w its
// attention weights: the pooling without softmax taken while the tile's keys are in cache, in
// pool_forward's order and arithmetic (pool_keys).
template <typename T>
void pool_segment(const Rows& r, const Inputs<T>& in, const Segment& g, const T* w, T* out) {
  T* __restrict o = out + (g.b * r.C + g.c) * r.D;
  if (g.t0 == 0) std::fill(o, o + r.D, T(0));  // the pair's first run: out is not zeroed before
  pool_keys(in, (r.start[g.b] + g.t0) * r.D, g.n, r.D, w, 1, o);
}

// Backward of pooling and normalization for rows [rb, re): dL/ds of every valid pair into pds,
// the pooling's share of dk into pgk (padding rows zeroed).
template <typename T>
void pool_backward(const Rows& r, const Inputs<T>& in, bool softmax, T sc, const T* pw, const T* pga, const T* pgo,
                   int64_t rb, int64_t re, T* pds, T* pgk) {
  const int64_t D = r.D;
  for (int64_t b = rb; b < re; ++b) {
    const int64_t n = r.len[b];
    const T* k = in.k + r.start[b] * D;
    T* dk = pgk + r.start[b] * D;
    for (int64_t c = 0; c < r.C; ++c) {
      const int64_t base = r.start[b] * r.C + c * r.sC;
      const T* g = pgo + (b * r.C + c) * D;
      T dot_sum = 0;
      T wsum = 0;  // softmax: the saved weights' sum (below)
      for (int64_t t = 0; t < n; ++t) {
        const T* kt = k + t * D;
        T dw = pga ? pga[base + t * r.sT] : T(0);
        for (int64_t d = 0; d < D; ++d) dw += g[d] * kt[d];
        pds[base + t * r.sT] = dw;
        dot_sum += pw[base + t * r.sT] * dw;
        const T wt = pw[base + t * r.sT];
        wsum += wt;
        T* dkt = dk + t * D;
        if (c == 0) {
          for (int64_t d = 0; d < D; ++d) dkt[d] = wt * g[d];
        } else {
          for (int64_t d = 0; d < D; ++d) dkt[d] += wt * g[d];
        }
      }
      // softmax: the saved weights divided by their sum, which their rounding to the input
      // dtype (bf16/fp16) moves off 1; uncorrected, that error reaches every score gradient
      // (it was 0.1 of the largest last-layer weight gradient in bf16 tests, 0.006 with this)
      const T inv = softmax && wsum > T(0) ? T(1) / wsum : T(1);
      dot_sum *= inv;
      for (int64_t t = 0; t < n; ++t) {
        T& v = pds[base + t * r.sT];
        v = softmax ? pw[base + t * r.sT] * inv * (v - dot_sum) * sc : v * sc;
      }
    }
    // key rows not written above: the padding (and everything when C == 0)
    const int64_t written = r.C > 0 ? n : 0;
    std::fill(dk + written * D, dk + (r.jagged ? n : r.T) * D, T(0));
  }
}

// Per-channel mean and M2 of a tile's last-layer pre-activations z [M, H], summed in double:
// DIN's pre-activations are often a bias plus a small spread, and a float mean would be off by
// many ulps of |z|, which the normalization divides by the spread (ATen's batch norm on the CPU
// sums in double too).
template <typename T>
void tile_moments(const T* z, int64_t M, int64_t H, double* tmean, double* tm2) {
  std::fill(tmean, tmean + H, 0.0);
  std::fill(tm2, tm2 + H, 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t h = 0; h < H; ++h) tmean[h] += double(z[i * H + h]);
  for (int64_t h = 0; h < H; ++h) tmean[h] /= double(M);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const double dv = double(z[i * H + h]) - tmean[h];
      tm2[h] += dv * dv;
    }
}

// d mean / dz = 1/n, d var / dz = 2 (z - mean) / n
template <typename T>
void stats_dz(const T* z, int64_t M, int64_t H, const T* pgm, const T* pgv, const T* pmu, T n, T* dz) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t h = 0; h < H; ++h) dz[i * H + h] = (pgm[h] + T(2) * pgv[h] * (z[i * H + h] - pmu[h])) / n;
}

}  // namespace AP_ISA
