// Register-blocked fp32 products for the attention tiles, AVX-512: C[M, N] = init + A B with
// A(i, k) = A[i * sai + k * sak] (a row-major A, or a transposed one: the weight gradients'
// dZ^T), B row-major [K, N] and C row-major. The tiles' products are small (N of 36 to 80, K of
// 36 to a tile of 256), where sgemm spends a large share of each call on dispatch and packing;
// here a block of R rows by NV vectors of 16 columns stays in registers over the whole K, each
// step one load of B per vector and one broadcast of A per row. Included by
// attention_pooling.cpp inside the AVX-512 build's namespace after vec512.h. No include guard on
// purpose.

namespace gemm512 {

enum class Init { kZero, kC, kBias };  // accumulators start at 0, at C, or at a bias row

// Where a block's finished sums go: into C (unless C is null), and with kSigmoid their sigmoid
// into S (row stride lds), with bad told whether a sum was inf or NaN (the sigmoid would hide it).
struct Act {
  float* s = nullptr;
  int64_t lds = 0;
  bool bad = false;
};

// kHalf: the last of the NV column groups holds 8 columns or fewer and takes 256-bit registers
// (the same arithmetic per lane): CPUs that run a 512-bit operation as two 256-bit halves (AMD
// Zen 4) then spend half as much on it, and the hidden widths of DIN (40, 72 = 2D, ...) often
// end in such a group.
template <int R, int NV, bool kSigmoid = false, bool kHalf = false>
inline void block(int64_t K, const float* __restrict A, int64_t sai, int64_t sak, const float* __restrict B,
                  int64_t ldb, float* C, int64_t ldc, Init init, const float* bias, __mmask16 tail,
                  Act* act = nullptr) {
  constexpr int NF = kHalf ? NV - 1 : NV;  // groups in 512-bit registers
  constexpr int NA = NF > 0 ? NF : 1;
  const __mmask8 tail8 = static_cast<__mmask8>(tail);
  __m512 acc[R][NA];
  __m256 acch[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NF; ++v) acc[r][v] = _mm512_setzero_ps();
    if constexpr (kHalf) acch[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    __m512 b[NA];
#pragma GCC unroll 8
    for (int v = 0; v < NF; ++v) b[v] = _mm512_maskz_loadu_ps(!kHalf && v == NV - 1 ? tail : v512::kAll, bk + 16 * v);
    [[maybe_unused]] __m256 bh;
    if constexpr (kHalf) bh = _mm256_maskz_loadu_ps(tail8, bk + 16 * NF);
    const float* ak = A + k * sak;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if constexpr (NF > 0) {
        const __m512 a = _mm512_set1_ps(ak[r * sai]);
#pragma GCC unroll 8
        for (int v = 0; v < NF; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
        if constexpr (kHalf) acch[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(a), bh, acch[r]);
      } else {
        acch[r] = _mm256_fmadd_ps(_mm256_set1_ps(ak[r * sai]), bh, acch[r]);
      }
    }
  }
  // the initial value is added to the finished sum, as sgemm's beta = 1 does: a bias added
  // first would round every partial sum at its magnitude
  [[maybe_unused]] __mmask16 bad = 0;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NF; ++v) {
      const __mmask16 m = !kHalf && v == NV - 1 ? tail : v512::kAll;
      __m512 c = acc[r][v];
      if (init == Init::kBias) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(m, bias + 16 * v));
      if (init == Init::kC) c = _mm512_add_ps(c, _mm512_maskz_loadu_ps(m, C + r * ldc + 16 * v));
      if constexpr (kSigmoid) {
        bad |= _mm512_mask_fpclass_ps_mask(m, c, 0x99);  // QNaN, SNaN, +inf, -inf
        v512::store(act->s + r * act->lds + 16 * v, m, v512::sigmoid<true>(c));
        if (C != nullptr) v512::store(C + r * ldc + 16 * v, m, c);
      } else {
        v512::store(C + r * ldc + 16 * v, m, c);
      }
    }
    if constexpr (kHalf) {
      constexpr int64_t o = 16 * NF;
      __m256 c = acch[r];
      if (init == Init::kBias) c = _mm256_add_ps(c, _mm256_maskz_loadu_ps(tail8, bias + o));
      if (init == Init::kC) c = _mm256_add_ps(c, _mm256_maskz_loadu_ps(tail8, C + r * ldc + o));
      if constexpr (kSigmoid) {
        bad |= _mm256_mask_fpclass_ps_mask(tail8, c, 0x99);
        _mm256_mask_storeu_ps(act->s + r * act->lds + o, tail8, v512::sigmoid<true>(c));
        if (C != nullptr) _mm256_mask_storeu_ps(C + r * ldc + o, tail8, c);
      } else {
        _mm256_mask_storeu_ps(C + r * ldc + o, tail8, c);
      }
    }
  }
  if constexpr (kSigmoid) act->bad |= bad != 0;
}

// Rows [0, M) of one panel of NV vectors: blocks of as many rows as the 32 registers hold
// (R * NV accumulators, NV of B, one broadcast), then 4, 2 and 1 for the rest.
template <int NV, bool kSigmoid, bool kHalf>
inline void panel_of(int64_t M, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
                     float* C, int64_t ldc, Init init, const float* bias, __mmask16 tail, Act* act) {
  constexpr int R = NV == 1 ? 12 : NV == 2 ? 12 : NV == 3 ? 8 : NV == 4 ? 6 : 4;
  Act a = act == nullptr ? Act{} : *act;
  auto rows = [&](auto r_t, int64_t i) {
    constexpr int Rb = decltype(r_t)::value;
    Act ai{a.s == nullptr ? nullptr : a.s + i * a.lds, a.lds, false};
    block<Rb, NV, kSigmoid, kHalf>(K, A + i * sai, sai, sak, B, ldb, C == nullptr ? nullptr : C + i * ldc, ldc, init,
                                   bias, tail, &ai);
    a.bad |= ai.bad;
  };
  int64_t i = 0;
  for (; i + R <= M; i += R) rows(std::integral_constant<int, R>{}, i);
  for (; i + 4 <= M; i += 4) rows(std::integral_constant<int, 4>{}, i);
  for (; i + 2 <= M; i += 2) rows(std::integral_constant<int, 2>{}, i);
  for (; i < M; ++i) rows(std::integral_constant<int, 1>{}, i);
  if (act != nullptr) act->bad |= a.bad;
}

template <int NV, bool kSigmoid>
inline void panel(int64_t M, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
                  float* C, int64_t ldc, Init init, const float* bias, __mmask16 tail, Act* act) {
  // a last group of 8 columns or fewer: 256-bit registers for it (block's kHalf)
  if ((tail >> 8) == 0)
    panel_of<NV, kSigmoid, true>(M, K, A, sai, sak, B, ldb, C, ldc, init, bias, tail, act);
  else
    panel_of<NV, kSigmoid, false>(M, K, A, sai, sak, B, ldb, C, ldc, init, bias, tail, act);
}

// One output column of a row-major A: C[i] = init + A[i, :] . B[:, 0] (the pooling head's
// last layer), a dot product per row.
inline void column(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, Init init, const float* bias) {
  std::vector<float> b(K);
  for (int64_t k = 0; k < K; ++k) b[k] = B[k * ldb];
  for (int64_t i = 0; i < M; ++i) {
    const float* a = A + i * lda;
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = v512::lanes(K - k);
      s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b.data() + k), s);
    }
    // lanes summed by swapping halves, quarters, pairs and neighbours (the maskz forms: GCC 12
    // warns about the plain ones' undefined source)
    s = _mm512_add_ps(s, _mm512_maskz_shuffle_f32x4(v512::kAll, s, s, 0x4E));
    s = _mm512_add_ps(s, _mm512_maskz_shuffle_f32x4(v512::kAll, s, s, 0xB1));
    s = _mm512_add_ps(s, _mm512_maskz_permute_ps(v512::kAll, s, 0x4E));
    s = _mm512_add_ps(s, _mm512_maskz_permute_ps(v512::kAll, s, 0xB1));
    const float c0 = init == Init::kZero ? 0.0f : init == Init::kBias ? bias[0] : C[i * ldc];
    C[i * ldc] = c0 + _mm512_cvtss_f32(s);
  }
}

// C[M, N] = init + A B, N in panels of up to 5 vectors (80 columns); with act, the sums' sigmoid
// into act->s as well (C may then be null: the sums are not kept).
template <bool kSigmoid = false>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B,
                 int64_t ldb, float* C, int64_t ldc, Init init, const float* bias = nullptr, Act* act = nullptr) {
  if (M == 0 || N == 0) return;
  if (!kSigmoid && N == 1 && sak == 1) return column(M, K, A, sai, B, ldb, C, ldc, init, bias);
  // Long sums (the weight gradients' K is a tile of positions) in chunks of kChunk, each added
  // to C: float rounding then grows with kChunk + K / kChunk rather than with K.
  constexpr int64_t kChunk = 64;
  if (!kSigmoid && K > 2 * kChunk) {
    for (int64_t k0 = 0; k0 < K; k0 += kChunk)
      gemm<false>(M, N, std::min(kChunk, K - k0), A + k0 * sak, sai, sak, B + k0 * ldb, ldb, C, ldc,
                  k0 == 0 ? init : Init::kC, bias);
    return;
  }
  for (int64_t j = 0; j < N; j += 80) {
    const int64_t n = std::min<int64_t>(80, N - j);
    const int nv = static_cast<int>((n + 15) / 16);
    const __mmask16 tail = v512::lanes(n - 16 * (nv - 1));
    const float* bj = B + j;
    const float* pj = bias == nullptr ? nullptr : bias + j;
    float* cj = C == nullptr ? nullptr : C + j;
    Act aj = act == nullptr ? Act{} : Act{act->s + j, act->lds, false};
    Act* pa = act == nullptr ? nullptr : &aj;
    switch (nv) {
      case 1: panel<1, kSigmoid>(M, K, A, sai, sak, bj, ldb, cj, ldc, init, pj, tail, pa); break;
      case 2: panel<2, kSigmoid>(M, K, A, sai, sak, bj, ldb, cj, ldc, init, pj, tail, pa); break;
      case 3: panel<3, kSigmoid>(M, K, A, sai, sak, bj, ldb, cj, ldc, init, pj, tail, pa); break;
      case 4: panel<4, kSigmoid>(M, K, A, sai, sak, bj, ldb, cj, ldc, init, pj, tail, pa); break;
      default: panel<5, kSigmoid>(M, K, A, sai, sak, bj, ldb, cj, ldc, init, pj, tail, pa); break;
    }
    if (act != nullptr) act->bad |= aj.bad;
  }
}

}  // namespace gemm512
