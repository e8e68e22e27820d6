// Branch-free element loads/stores of fp32/fp64/fp16/bf16 in the accumulation type, for loops
// left to the compiler's vectorizer. Included by the per-instruction-set kernel headers
// (dice_kernels.h, mba_kernels.h) inside their namespace. No include guard on purpose.

inline float f32_from_bits(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, sizeof(f));
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof(b));
  return b;
}

// Element loads/stores in the accumulation type. fp16/bf16 go through their bits with the
// branch-free conversions of c10 (fp16_ieee_to_fp32_value, fp16_ieee_from_fp32_value,
// round_to_nearest_even) restated here so the loops that use them vectorize.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline double ld(const double* p, int64_t i) { return p[i]; }
inline float ld(const c10::BFloat16* p, int64_t i) {
  return f32_from_bits(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
inline float ld(const c10::Half* p, int64_t i) {
  const uint32_t w = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * f32_from_bits(15u << 23);
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? f32_to_bits(denormalized)
                                                  : f32_to_bits(normalized)));
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(double* p, int64_t i, double v) { p[i] = v; }
inline void st(c10::BFloat16* p, int64_t i, float v) {
  const uint32_t b = f32_to_bits(v);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
inline void st(c10::Half* p, int64_t i, float v) {
  const uint32_t w = f32_to_bits(v);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (f32_from_bits(w & 0x7FFFFFFFu) * f32_from_bits(239u << 23)) * f32_from_bits(17u << 23);
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  reinterpret_cast<uint16_t*>(p)[i] =
      static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

