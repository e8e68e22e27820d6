// AVX2 sigmoid for the attention tiles' hidden layers: the AVX2 build's counterpart of
// vec512.h's (GCC leaves the scalar loop over fast_exp unvectorized), and Dice's backward in
// both builds. Included by attention_pooling.cpp inside the AVX2 and AVX-512 builds'
// namespaces. No include guard on purpose.

namespace v256 {

// exp(-z) for z in [-88, 87] (the caller clamps): 2^(n + f), n = round(-z log2 e), f in
// [-1/2, 1/2], 2^f by vec512.h's degree-5 minimax polynomial, 2^n built in the exponent bits
// (n in [-126, 127]: no scalef in AVX2).
inline __m256 exp_neg(__m256 z) {
  const __m256 l2e = _mm256_set1_ps(-1.44269504088896341f);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(z, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_fmsub_ps(z, l2e, n);
  __m256 p = _mm256_set1_ps(1.326472731e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671512991e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550733581e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402224243e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931470037e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 1 / (1 + exp(-z)), z clamped to [-88, 87] (a NaN z becomes -88: the callers take this path
// only for tiles without NaN, as vec512.h's); beyond 87 the result is 1 to float precision.
inline __m256 sigmoid(__m256 z) {
  z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(87.0f));
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_neg(z)));
}

}  // namespace v256
