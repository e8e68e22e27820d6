// AVX-512 helpers for the fp32 kernels of fp32/bf16/fp16 data: 16 channels per register, loaded
// and stored in the data's own type and converted in registers (no whole-tensor conversions).
// Included by dice.cpp and mba.cpp inside the `#pragma GCC target` of each AVX-512 build (after
// <immintrin.h> and ATen, so that no other header is compiled for AVX-512), inside a namespace
// per build; called only when cpu_isa() is kAvx512. With DIN_OPS_V512_BF16 defined (a build whose
// target includes avx512bf16, chosen when cpu_avx512_bf16()) floats are rounded to bf16 by
// vcvtneps2bf16. No include guard on purpose.

namespace v512 {

// the first n lanes (n < 16) or all of them: tails of the channel loops are masked, not scalar
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Full vectors go through plain loads and stores: a masked store cannot forward to a later load
// of the same address (the accumulators of a row loop), and a masked access to memory that is
// not in cache is slower than a plain one on some CPUs.
constexpr __mmask16 kAll = static_cast<__mmask16>(0xFFFF);
inline __m256i load16(const void* p, __mmask16 m) {
  return m == kAll ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
}
inline void store16(void* p, __mmask16 m, __m256i v) {
  if (m == kAll) _mm256_storeu_si256(static_cast<__m256i*>(p), v); else _mm256_mask_storeu_epi16(p, m, v);
}
inline __m512 load(const float* p, __mmask16 m) {
  return m == kAll ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load(const c10::BFloat16* p, __mmask16 m) {
  // bf16 is the upper half of a float: widen and shift, exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load16(p, m)), 16));
}
inline __m512 load(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(load16(p, m)); }

inline void store(float* p, __mmask16 m, __m512 v) {
  if (m == kAll) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, m, v);
}
inline void store(c10::BFloat16* p, __mmask16 m, __m512 v) {
#ifdef DIN_OPS_V512_BF16
  // round to nearest even in one instruction; it flushes bf16 denormals (below 1.2e-38) to 0
  store16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  // round to nearest even as c10::BFloat16 does (denormals kept, NaN -> 0x7FC0), in integers
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  store16(p, m, _mm512_cvtepi32_epi16(r));
#endif
}
inline void store(c10::Half* p, __mmask16 m, __m512 v) {
  // F16C's conversion rounds to nearest even and keeps denormals, inf and NaN, like c10::Half
  store16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp(-z) for z in [-88, 88] (the caller clamps: beyond, f below would not be small, as n's
// rounding error grows with |z|): 2^(n + f), n = round(-z log2 e) by adding and subtracting
// 1.5 * 2^23 (one instruction fewer than roundscale), f in [-1/2, 1/2] by one fused
// multiply-subtract, 2^f by a polynomial of kDegree (minimax in relative error on [-1/2, 1/2],
// constant term 1), 2^n by scalef. Relative error of
// degree 5 ~2e-7, a few ulps: the products' gradients sum many sigmoids, and a Taylor polynomial
// of that degree (3e-6) showed in them. Degree 4 (2.8e-6) and 3 (1.0e-4) serve results kept in
// fp16 (half an ulp 4.9e-4) and bf16 (3.9e-3): the loops are bound by their floating-point
// operations, and each degree is two of them.
// 2^f's degree-5 coefficients, highest first (the constant term is 1)
constexpr float kExp2Poly5[5] = {1.326472731e-3f, 9.671512991e-3f, 5.550733581e-2f, 2.402224243e-1f,
                                 6.931470037e-1f};

template <int kDegree = 5>
inline __m512 exp_neg(__m512 z) {
  static_assert(kDegree >= 3 && kDegree <= 5, "exp_neg: degree 3, 4 or 5");
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(z, _mm512_set1_ps(-1.44269504088896341f), magic), magic);
  const __m512 f = _mm512_fmsub_ps(z, _mm512_set1_ps(-1.44269504088896341f), n);
  __m512 p;
  if constexpr (kDegree == 5) {
    p = _mm512_set1_ps(kExp2Poly5[0]);
#pragma GCC unroll 4
    for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly5[i]));
  } else if constexpr (kDegree == 4) {
    p = _mm512_set1_ps(9.582576342e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.590682849e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402410656e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931241155e-1f));
  } else {
    p = _mm512_set1_ps(5.500905961e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.422109693e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.932829022e-1f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + exp(-z)). z is clamped to [-88, 88]: exp(88) is finite, so 1 + exp(-z) has a finite
// reciprocal, and past 88 the result is 1 in float (a NaN z gives a finite p, as in
// dice_kernels.h's vexp; a NaN channel is handled through alpha). The reciprocal is rcp14 (relative
// error 2^-14), refined by one Newton step to about 1 ulp where the result is stored as float:
// a division is the slowest instruction of the loop. bf16/fp16 results keep fewer bits than
// rcp14 gives, and their sums accumulate in float.
template <bool kRefine, int kDegree = 5>
inline __m512 sigmoid(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 d = _mm512_add_ps(one, exp_neg<kDegree>(z));
  const __m512 r = _mm512_rcp14_ps(d);
  return kRefine ? _mm512_fmadd_ps(_mm512_fnmadd_ps(d, r, one), r, r) : r;
}
// The same sigmoid on 8 lanes (AVX-512VL), lane for lane the same arithmetic: the register
// blocks of gemm512.h take a last group of 8 columns or fewer in 256-bit registers, which CPUs
// that split 512-bit operations in two run at half the cost.
inline __m256 exp_neg(__m256 z) {
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(z, _mm256_set1_ps(-1.44269504088896341f), magic), magic);
  const __m256 f = _mm256_fmsub_ps(z, _mm256_set1_ps(-1.44269504088896341f), n);
  __m256 p = _mm256_set1_ps(kExp2Poly5[0]);
#pragma GCC unroll 4
  for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly5[i]));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  return _mm256_scalef_ps(p, n);
}
template <bool kRefine>
inline __m256 sigmoid(__m256 z) {
  const __m256 one = _mm256_set1_ps(1.0f);
  z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  const __m256 d = _mm256_add_ps(one, exp_neg(z));
  const __m256 r = _mm256_rcp14_ps(d);
  return kRefine ? _mm256_fmadd_ps(_mm256_fnmadd_ps(d, r, one), r, r) : r;
}

// The sigmoid whose result is kept in S: float (refined, degree 5), fp16 (degree 4) or bf16
// (degree 3).
template <typename S>
inline __m512 sigmoid(__m512 z) {
  if constexpr (std::is_same_v<S, float>) return sigmoid<true, 5>(z);
  else if constexpr (std::is_same_v<S, c10::Half>) return sigmoid<false, 4>(z);
  else return sigmoid<false, 3>(z);
}

}  // namespace v512
