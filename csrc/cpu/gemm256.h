// Register-blocked fp32 products for the attention tiles, AVX2 + FMA: the AVX2 build's
// counterpart of gemm512.h, with the same contract (C[M, N] = init + A B, A(i, k) =
// A[i * sai + k * sak], B and C row-major). sgemm spends most of a tile-sized call (N of 36 to
// 80, K of 36 to a tile of 256) on dispatch and packing; here a block of R rows by NV vectors of
// 8 columns stays in the 16 ymm registers over the whole K. Included by attention_pooling.cpp
// inside the AVX2 build's namespace. No include guard on purpose.

namespace gemm256 {

enum class Init { kZero, kC, kBias };  // accumulators start at 0, at C, or at a bias row

// the first n (<= 8) of a vector's lanes
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int R, int NV>
inline void block(int64_t K, const float* __restrict A, int64_t sai, int64_t sak, const float* __restrict B,
                  int64_t ldb, float* C, int64_t ldc, Init init, const float* bias, __m256i tail) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm256_maskload_ps(bk + 8 * v, tail) : _mm256_loadu_ps(bk + 8 * v);
    const float* ak = A + k * sak;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(ak + r * sai);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  // the initial value is added to the finished sum (see gemm512.h)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const __m256i m = v == NV - 1 ? tail : _mm256_set1_epi32(-1);
      __m256 c = acc[r][v];
      if (init == Init::kBias) c = _mm256_add_ps(c, _mm256_maskload_ps(bias + 8 * v, m));
      if (init == Init::kC) c = _mm256_add_ps(c, _mm256_maskload_ps(C + r * ldc + 8 * v, m));
      _mm256_maskstore_ps(C + r * ldc + 8 * v, m, c);
    }
}

// Rows [0, M) of one panel of NV vectors: blocks of R rows (R * NV accumulators, NV of B, one
// broadcast: at most 16 registers), then 4, 2 and 1 for the rest.
template <int NV>
inline void panel(int64_t M, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
                  float* C, int64_t ldc, Init init, const float* bias, __m256i tail) {
  constexpr int R = NV == 1 ? 12 : 6;
  auto rows = [&](auto r_t, int64_t i) {
    constexpr int Rb = decltype(r_t)::value;
    block<Rb, NV>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, init, bias, tail);
  };
  int64_t i = 0;
  for (; i + R <= M; i += R) rows(std::integral_constant<int, R>{}, i);
  for (; i + 4 <= M; i += 4) rows(std::integral_constant<int, 4>{}, i);
  for (; i + 2 <= M; i += 2) rows(std::integral_constant<int, 2>{}, i);
  for (; i < M; ++i) rows(std::integral_constant<int, 1>{}, i);
}

// One output column of a row-major A: C[i] = init + A[i, :] . B[:, 0], a dot product per row.
inline void column(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, Init init, const float* bias) {
  std::vector<float> b(K);
  for (int64_t k = 0; k < K; ++k) b[k] = B[k * ldb];
  for (int64_t i = 0; i < M; ++i) {
    const float* a = A + i * lda;
    __m256 s = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256i m = lanes(std::min<int64_t>(8, K - k));
      s = _mm256_fmadd_ps(_mm256_maskload_ps(a + k, m), _mm256_maskload_ps(b.data() + k, m), s);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    const float c0 = init == Init::kZero ? 0.0f : init == Init::kBias ? bias[0] : C[i * ldc];
    C[i * ldc] = c0 + _mm_cvtss_f32(h);
  }
}

// C[M, N] = init + A B, N in panels of up to 2 vectors (16 columns).
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B,
                 int64_t ldb, float* C, int64_t ldc, Init init, const float* bias = nullptr) {
  if (M == 0 || N == 0) return;
  if (N == 1 && sak == 1) return column(M, K, A, sai, B, ldb, C, ldc, init, bias);
  // long sums in chunks, each added to C, as gemm512.h
  constexpr int64_t kChunk = 64;
  if (K > 2 * kChunk) {
    for (int64_t k0 = 0; k0 < K; k0 += kChunk)
      gemm(M, N, std::min(kChunk, K - k0), A + k0 * sak, sai, sak, B + k0 * ldb, ldb, C, ldc,
           k0 == 0 ? init : Init::kC, bias);
    return;
  }
  for (int64_t j = 0; j < N; j += 16) {
    const int64_t n = std::min<int64_t>(16, N - j);
    const __m256i tail = lanes(n > 8 ? n - 8 : n);
    const float* pj = bias == nullptr ? nullptr : bias + j;
    if (n > 8) {
      panel<2>(M, K, A, sai, sak, B + j, ldb, C + j, ldc, init, pj, tail);
    } else {
      panel<1>(M, K, A, sai, sak, B + j, ldb, C + j, ldc, init, pj, tail);
    }
  }
}

}  // namespace gemm256
