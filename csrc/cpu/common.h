// Helpers shared by the CPU kernels: accumulation types, row-major GEMM on top of ATen's BLAS
// wrapper, and the deterministic work split.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace din_ops {
namespace cpu {

// fp16/bf16/fp32 compute in float, fp64 in double.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C. A row-major matrix is its
// transpose in BLAS' column-major view, so this is BLAS' C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  using at::native::TransposeType;
  at::native::cpublas::gemm(trans_b ? TransposeType::Transpose : TransposeType::NoTranspose,
                            trans_a ? TransposeType::Transpose : TransposeType::NoTranspose, N, M,
                            K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// Splits items [0, n) with the given per-item work into at most max_parts contiguous ranges
// of about equal work. The split depends on the data only, never on the thread count, so
// per-range partial sums reduced in range order are bitwise reproducible.
inline std::vector<int64_t> balanced_split(const std::vector<int64_t>& work, int64_t max_parts) {
  const int64_t n = static_cast<int64_t>(work.size());
  std::vector<int64_t> bounds{0};
  if (n == 0) return bounds;
  int64_t total = 0;
  for (auto w : work) total += w;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(max_parts, n));
  int64_t acc = 0, next = 1;
  for (int64_t i = 0; i < n; ++i) {
    acc += work[i];
    // close a range once its share of the total is reached (integer arithmetic: exact)
    if (next < parts && acc * parts >= next * total && i + 1 < n) {
      bounds.push_back(i + 1);
      ++next;
    }
  }
  bounds.push_back(n);
  return bounds;
}

}  // namespace cpu
}  // namespace din_ops
