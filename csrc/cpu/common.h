// Helpers shared by the CPU kernels: accumulation types, row-major GEMM on top of ATen's BLAS
// wrapper, and the deterministic work split.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
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

// BLAS as libtorch ships it. ATen's own cpublas wrapper is not exported from libtorch, but the
// Fortran sgemm_/dgemm_ of the BLAS it links (MKL on x86) are; they are looked up at run time
// so a libtorch without them falls back to the plain loops below instead of failing to load.
namespace blas {
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*,
                         const int*);
sgemm_t sgemm();
dgemm_t dgemm();

// Keeps the BLAS on the calling thread while alive (MKL_Set_Num_Threads_Local, where
// linked): work run on one thread outside a parallel region must not be threaded by the BLAS,
// whose result would then depend on the thread count.
class SequentialGuard {
 public:
  SequentialGuard();
  ~SequentialGuard();
  SequentialGuard(const SequentialGuard&) = delete;
  SequentialGuard& operator=(const SequentialGuard&) = delete;

 private:
  int previous_ = 0;
};
}  // namespace blas

// Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C, without BLAS.
template <typename T>
void gemm_rm_loops(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                   int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
    for (int64_t p = 0; p < K; ++p) {
      const T a = alpha * (trans_a ? A[p * lda + i] : A[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + p];
      } else {
        const T* b = B + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
}

// Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C. A row-major matrix is its
// transpose in BLAS' column-major view, so this is BLAS' C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  // the Fortran BLAS takes int sizes: anything wider goes to the int64 loops below
  const bool fits_int = std::max({M, N, K, lda, ldb, ldc}) <= int64_t{std::numeric_limits<int>::max()};
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (auto f = blas::sgemm(); f && fits_int) return f(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else if constexpr (std::is_same_v<T, double>) {
    if (auto f = blas::dgemm(); f && fits_int) return f(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
  gemm_rm_loops(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// GCC's `#pragma GCC target` builds the kernels' loops once per x86 instruction set in one
// binary; other compilers get the baseline build only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DIN_OPS_MULTI_ISA 1
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

// The widest instruction set the CPU (and OS) runs, checked once; DIN_OPS_CPU_ISA=base (or
// baseline) | avx2 | avx512 caps it, so the narrower builds can be tested on a wide CPU.
Isa cpu_isa();

// Whether the AVX-512 loops may also use AVX512-BF16's float -> bf16 conversion: the CPU has it
// and cpu_isa() is kAvx512 not capped by DIN_OPS_CPU_ISA (=avx512 keeps the plain AVX-512 build,
// so that it stays tested on such a CPU).
bool cpu_avx512_bf16();

// Whether AVX512-BF16's dot product (vdpbf16ps) does twice the multiply-adds per cycle of a float
// FMA: on AMD's cores that have it (Zen 4 on), not on Intel's, where it does as many (so without
// AMX bf16 products there save nothing, and layer 0's unfolded form doubles their work).
bool cpu_fast_bf16_dot();

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
