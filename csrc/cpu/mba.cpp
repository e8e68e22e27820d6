// SPEC section 3: mini-batch aware (MBA) regularization of embedding tables, CPU kernels.
//
// mba_sparse_update_ implements din_ops.reference.mba_sparse_update_ (paper eq. 2.4) in one
// fused pass: the batch's indices are stably sorted together with their positions, so each
// distinct row j becomes a segment whose occurrences are visited in ascending position order
// (duplicate gradient rows are summed in a fixed order, independent of the thread count), and
// every segment is summed, regularized and stepped by the optimizer while its rows are in cache.
// Rows that are not in the batch are never touched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace din_ops {
namespace cpu {
namespace {

enum class Optim { kSgd, kAdagrad, kAdagradRowwise };

// Runs fn(part) for part in [0, nparts), parts handed out dynamically: the random row accesses
// make the time per part uneven, and on a shared machine a descheduled thread then delays only
// its current part instead of a static half of the work. fn must not throw.
template <typename F>
void for_each_part(int64_t nparts, const F& fn) {
#ifdef _OPENMP
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), nparts));
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t part = 0; part < nparts; ++part) fn(part);
    return;
  }
#endif
  for (int64_t part = 0; part < nparts; ++part) fn(part);
}

Optim parse_optimizer(std::string_view name) {
  if (name == "sgd") return Optim::kSgd;
  if (name == "adagrad") return Optim::kAdagrad;
  if (name == "adagrad_rowwise") return Optim::kAdagradRowwise;
  TORCH_CHECK(false, "mba_sparse_update_: optimizer must be 'sgd', 'adagrad' or 'adagrad_rowwise', got '",
              std::string(name), "'");
}

int bit_width(uint64_t v) {
  int b = 0;
  while (v) {
    ++b;
    v >>= 1;
  }
  return b;
}

// The distinct rows of a batch. `packed` holds (row << pos_bits | position) sorted by row, with
// the positions of one row ascending; segment s (row rows[s]) spans
// packed[starts[2s], starts[2s + 1]). The padding row has no segment.
struct Segments {
  std::vector<uint64_t> packed;
  std::vector<int64_t> starts;  // [2U]: (begin, end) per segment
  std::vector<int64_t> rows;
  int pos_bits = 0;
  uint64_t pos_mask = 0;
  int64_t size() const { return static_cast<int64_t>(rows.size()); }
};

// Chunks of the sort: a function of M only, so the work split never depends on the thread count
// (the stable sort's result is unique anyway; this keeps per-chunk histograms small and reused).
int64_t sort_chunks(int64_t M) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, M / 32768));
}

// Stable LSD radix sort of `a` by the key bits [lo, lo + bits): at most 11 bits per pass so the
// per-chunk histograms stay in L1. Two passes for a 1M-row table.
void radix_sort(std::vector<uint64_t>& a, int lo, int bits) {
  const int64_t M = static_cast<int64_t>(a.size());
  if (bits <= 0 || M <= 1) return;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << digit;
  const uint64_t dmask = static_cast<uint64_t>(buckets - 1);
  const int64_t chunks = sort_chunks(M);
  const int64_t chunk_len = (M + chunks - 1) / chunks;
  std::vector<uint64_t> tmp(M);
  std::vector<int64_t> hist(chunks * buckets);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = lo + pass * digit;
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        int64_t* h = hist.data() + c * buckets;
        const int64_t e = std::min(M, (c + 1) * chunk_len);
        for (int64_t i = c * chunk_len; i < e; ++i) ++h[(a[i] >> shift) & dmask];
      }
    });
    // exclusive prefix in (digit, chunk) order: chunk c's items of a digit follow chunk c-1's
    int64_t run = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t n = hist[c * buckets + b];
        hist[c * buckets + b] = run;
        run += n;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        int64_t* h = hist.data() + c * buckets;
        const int64_t e = std::min(M, (c + 1) * chunk_len);
        for (int64_t i = c * chunk_len; i < e; ++i) tmp[h[(a[i] >> shift) & dmask]++] = a[i];
      }
    });
    a.swap(tmp);
  }
}

template <typename index_t>
void pack_indices(const index_t* idx, int64_t M, int64_t num_rows, int pos_bits, bool with_positions,
                  std::vector<uint64_t>& packed) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, M, 16384, [&](int64_t b, int64_t e) {
    bool local_bad = false;
    for (int64_t i = b; i < e; ++i) {
      const int64_t j = static_cast<int64_t>(idx[i]);
      local_bad |= (j < 0) | (j >= num_rows);
      const uint64_t row = static_cast<uint64_t>(j) & ((uint64_t{1} << 62) - 1);
      packed[i] = with_positions ? (row << pos_bits) | static_cast<uint64_t>(i) : row;
    }
    if (local_bad) bad.store(true, std::memory_order_relaxed);
  });
  // checked again here (and not only in Python) so a direct torch.ops call cannot write out of
  // bounds
  TORCH_CHECK(!bad.load(), "indices must lie in [0, ", num_rows, ")");
}

// Groups the batch's indices by row. With positions, each segment lists its occurrences in
// ascending position order; without, only the distinct rows are needed (the penalty).
Segments make_segments(const at::Tensor& indices, int64_t num_rows, std::optional<int64_t> padding_idx,
                       bool with_positions) {
  TORCH_CHECK(indices.dim() == 1, "indices must be 1-D, got ", indices.dim(), " dimensions");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "indices must be int32 or int64, got ", indices.scalar_type());
  Segments seg;
  const int64_t M = indices.numel();
  if (M == 0) return seg;
  const int key_bits = bit_width(static_cast<uint64_t>(std::max<int64_t>(num_rows - 1, 0)));
  seg.pos_bits = with_positions ? bit_width(static_cast<uint64_t>(M - 1)) : 0;
  TORCH_CHECK(key_bits + seg.pos_bits <= 64, "mba: num_embeddings * batch size too large to sort");
  seg.pos_mask = seg.pos_bits == 64 ? ~uint64_t{0} : (uint64_t{1} << seg.pos_bits) - 1;
  seg.packed.resize(M);
  auto idx = indices.contiguous();
  if (idx.scalar_type() == at::kLong) {
    pack_indices(idx.data_ptr<int64_t>(), M, num_rows, seg.pos_bits, with_positions, seg.packed);
  } else {
    pack_indices(idx.data_ptr<int32_t>(), M, num_rows, seg.pos_bits, with_positions, seg.packed);
  }
  radix_sort(seg.packed, seg.pos_bits, key_bits);

  int64_t pad = -1;
  if (padding_idx.has_value()) {
    pad = *padding_idx < 0 ? *padding_idx + num_rows : *padding_idx;
  }
  const int sh = seg.pos_bits;
  seg.rows.reserve(std::min<int64_t>(M, num_rows));
  seg.starts.reserve(2 * std::min<int64_t>(M, num_rows));
  int64_t i = 0;
  while (i < M) {
    const uint64_t row = seg.packed[i] >> sh;
    int64_t e = i + 1;
    while (e < M && (seg.packed[e] >> sh) == row) ++e;
    if (static_cast<int64_t>(row) != pad) {
      seg.rows.push_back(static_cast<int64_t>(row));
      seg.starts.push_back(i);
      seg.starts.push_back(e);
    }
    i = e;
  }
  return seg;
}

// n_j as read by the reference (`freq[j].to(acc).clamp_min(1)`): n_j == 0 (or below 1) counts
// as 1, so a present row never divides by zero.
std::vector<double> gather_counts(const at::Tensor& freq, const Segments& seg) {
  const int64_t U = seg.size();
  std::vector<double> n(U);
  auto f = freq.contiguous();
  AT_DISPATCH_SWITCH(f.scalar_type(), "mba_freq",
                     AT_DISPATCH_CASE(at::kInt, [&] {
                       const auto* p = f.data_ptr<scalar_t>();
                       for (int64_t s = 0; s < U; ++s) n[s] = static_cast<double>(p[seg.rows[s]]);
                     }) AT_DISPATCH_CASE(at::kLong, [&] {
                       const auto* p = f.data_ptr<scalar_t>();
                       for (int64_t s = 0; s < U; ++s) n[s] = static_cast<double>(p[seg.rows[s]]);
                     }) AT_DISPATCH_CASE(at::kFloat, [&] {
                       const auto* p = f.data_ptr<scalar_t>();
                       for (int64_t s = 0; s < U; ++s) n[s] = static_cast<double>(p[seg.rows[s]]);
                     }) AT_DISPATCH_CASE(at::kDouble, [&] {
                       const auto* p = f.data_ptr<scalar_t>();
                       for (int64_t s = 0; s < U; ++s) n[s] = static_cast<double>(p[seg.rows[s]]);
                     }));
  return n;
}

template <typename acc>
inline acc reg_coef(double lam, double n) {
  // the reference's order: n cast to the accumulation type, clamped, then lam / n
  const acc nn = std::max(static_cast<acc>(n), acc(1));
  return static_cast<acc>(lam) / nn;
}

// Contiguous ranges of segments with about equal work (occurrences + a per-row cost): a
// function of the data only.
std::vector<int64_t> split_segments(const Segments& seg, int64_t row_cost, int64_t max_parts) {
  const int64_t U = seg.size();
  std::vector<int64_t> bounds{0};
  if (U == 0) return bounds;
  auto work_before = [&](int64_t s) {  // monotone in s
    return (s == U ? seg.starts[2 * U - 1] : seg.starts[2 * s]) + s * row_cost;
  };
  const int64_t total = work_before(U);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(max_parts, U));
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = total / parts * k + (total % parts) * k / parts;
    int64_t lo = bounds.back(), hi = U;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (work_before(mid) < target) lo = mid + 1; else hi = mid;
    }
    if (lo > bounds.back() && lo < U) bounds.push_back(lo);
  }
  bounds.push_back(U);
  return bounds;
}

// Segments ahead to prefetch: hides the latency of the random row reads. About 2 KiB of rows in
// flight per thread (measured best at 4 segments for 64-wide fp32 rows, weight and gradient;
// more outstanding lines than the fill buffers hold only evict), so narrower rows (bf16/fp16,
// small D) look further ahead.
inline int64_t prefetch_distance(int64_t bytes_per_segment) {
  return std::max<int64_t>(4, std::min<int64_t>(16, 2048 / std::max<int64_t>(bytes_per_segment, 1)));
}
// Runs at least this long are summed in the position-order pre-pass (see update_segments).
constexpr int64_t kHotRun = 16;

inline void prefetch_row(const void* p, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
    if (write) __builtin_prefetch(c + o, 1, 1); else __builtin_prefetch(c + o, 0, 0);
  }
}

// The row loops, built per instruction set (as dice.cpp's) and chosen at run time.
#define MBA_ISA isa_base
#include "mba_kernels.h"
#undef MBA_ISA

#ifdef DIN_OPS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MBA_ISA isa_avx2
#include "mba_kernels.h"
#undef MBA_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define MBA_ISA isa_avx512
#include "mba_kernels.h"
#undef MBA_ISA
#pragma GCC pop_options
#endif

template <typename scalar_t, typename state_t, Optim opt>
void update_segments(scalar_t* weight, const scalar_t* grad, state_t* state, int64_t D,
                     const Segments& seg, const std::vector<double>& counts, double lr, double lam,
                     double eps) {
#ifdef DIN_OPS_MULTI_ISA
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return isa_avx512::update_segments<scalar_t, state_t, opt>(weight, grad, state, D, seg, counts, lr, lam, eps);
    case Isa::kAvx2:
      return isa_avx2::update_segments<scalar_t, state_t, opt>(weight, grad, state, D, seg, counts, lr, lam, eps);
    default:
      break;
  }
#endif
  isa_base::update_segments<scalar_t, state_t, opt>(weight, grad, state, D, seg, counts, lr, lam, eps);
}

template <typename scalar_t, typename acc>
void scale_row(scalar_t* out, const scalar_t* row, acc c, int64_t D) {
#ifdef DIN_OPS_MULTI_ISA
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return isa_avx512::scale_row(out, row, c, D);
    case Isa::kAvx2:
      return isa_avx2::scale_row(out, row, c, D);
    default:
      break;
  }
#endif
  isa_base::scale_row(out, row, c, D);
}

template <typename scalar_t>
double penalty_rows(const scalar_t* w, int64_t D, const Segments& seg, const std::vector<double>& counts,
                    int64_t s0, int64_t s1) {
#ifdef DIN_OPS_MULTI_ISA
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return isa_avx512::penalty_rows(w, D, seg, counts, s0, s1);
    case Isa::kAvx2:
      return isa_avx2::penalty_rows(w, D, seg, counts, s0, s1);
    default:
      break;
  }
#endif
  return isa_base::penalty_rows(w, D, seg, counts, s0, s1);
}

template <typename scalar_t, typename state_t>
void update_dispatch_opt(Optim opt, const at::Tensor& weight, const at::Tensor& grad,
                         const std::optional<at::Tensor>& state, const Segments& seg,
                         const std::vector<double>& counts, double lr, double lam, double eps) {
  const int64_t D = weight.size(1);
  scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  state_t* st = state.has_value() ? state->data_ptr<state_t>() : nullptr;
  switch (opt) {
    case Optim::kSgd:
      update_segments<scalar_t, state_t, Optim::kSgd>(w, g, st, D, seg, counts, lr, lam, eps);
      break;
    case Optim::kAdagrad:
      update_segments<scalar_t, state_t, Optim::kAdagrad>(w, g, st, D, seg, counts, lr, lam, eps);
      break;
    case Optim::kAdagradRowwise:
      update_segments<scalar_t, state_t, Optim::kAdagradRowwise>(w, g, st, D, seg, counts, lr, lam, eps);
      break;
  }
}

void check_freq(const at::Tensor& freq, const at::Tensor& weight) {
  TORCH_CHECK(freq.dim() == 1 && freq.size(0) == weight.size(0), "freq must have shape [",
              weight.size(0), "], got ", freq.sizes());
  const auto ft = freq.scalar_type();
  TORCH_CHECK(ft == at::kInt || ft == at::kLong || ft == at::kFloat || ft == at::kDouble,
              "freq must be int32, int64, float32 or float64, got ", ft);
  TORCH_CHECK(freq.device() == weight.device(), "freq must be on the weight's device");
}

void check_padding(std::optional<int64_t> padding_idx, int64_t N) {
  if (padding_idx.has_value()) {
    TORCH_CHECK(*padding_idx >= -N && *padding_idx < N, "padding_idx must lie in [", -N, ", ", N,
                "), got ", *padding_idx);
  }
}

void mba_sparse_update_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad,
                           const at::Tensor& freq, const std::optional<at::Tensor>& state, double lr,
                           double lam, c10::string_view optimizer, std::optional<int64_t> padding_idx,
                           double eps) {
  const Optim opt = parse_optimizer(std::string_view(optimizer.data(), optimizer.size()));
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [num_embeddings, D], got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous (it is updated in place)");
  const int64_t N = weight.size(0), D = weight.size(1);
  const int64_t M = indices.numel();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == D, "grad must have shape [", M,
              ", ", D, "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "grad must have the weight's dtype ",
              weight.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == weight.device() && indices.device() == weight.device(),
              "grad and indices must be on the weight's device");
  check_freq(freq, weight);
  check_padding(padding_idx, N);
  const auto acc_st = acc_scalar_type(weight.scalar_type());
  if (opt == Optim::kSgd) {
    TORCH_CHECK(!state.has_value(), "state must be None for optimizer 'sgd'");
  } else {
    TORCH_CHECK(state.has_value(), "optimizer '", std::string(optimizer), "' needs a state tensor");
    const auto& st = *state;
    if (opt == Optim::kAdagrad) {
      TORCH_CHECK(st.sizes() == weight.sizes(), "state must have the weight's shape ", weight.sizes(),
                  " for optimizer 'adagrad', got ", st.sizes());
    } else {
      TORCH_CHECK(st.dim() == 1 && st.size(0) == N, "state must have shape [", N,
                  "] for optimizer 'adagrad_rowwise', got ", st.sizes());
    }
    TORCH_CHECK(st.scalar_type() == weight.scalar_type() || st.scalar_type() == acc_st,
                "state must have dtype ", weight.scalar_type(), " or ", acc_st, ", got ", st.scalar_type());
    TORCH_CHECK(st.is_contiguous(), "state must be contiguous (it is updated in place)");
    TORCH_CHECK(st.device() == weight.device(), "state must be on the weight's device");
    TORCH_CHECK(!st.is_same(weight), "state must not alias weight");
  }
  if (M == 0 || D == 0 || N == 0) {
    TORCH_CHECK(M == 0 || N > 0, "indices must lie in [0, ", N, ")");
    return;
  }
  const Segments seg = make_segments(indices, N, padding_idx, /*with_positions=*/true);
  if (seg.size() == 0) return;
  const std::vector<double> counts = gather_counts(freq, seg);
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mba_sparse_update_", [&] {
    if (!state.has_value() || state->scalar_type() == weight.scalar_type()) {
      update_dispatch_opt<scalar_t, scalar_t>(opt, weight, g, state, seg, counts, lr, lam, eps);
    } else {
      using state_t = acc_t<scalar_t>;
      update_dispatch_opt<scalar_t, state_t>(opt, weight, g, state, seg, counts, lr, lam, eps);
    }
  });
}

// Fixed ranges for the penalty's partial sums: a function of U only, so the sum is bitwise
// reproducible whatever the thread count.
std::vector<int64_t> fixed_ranges(int64_t U, int64_t rows_per_range) {
  std::vector<int64_t> b;
  for (int64_t s = 0; s < U; s += rows_per_range) b.push_back(s);
  b.push_back(U);
  return b;
}

at::Tensor mba_penalty_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& freq,
                           double lam, std::optional<int64_t> padding_idx) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [num_embeddings, D], got ", weight.sizes());
  const int64_t N = weight.size(0), D = weight.size(1);
  check_freq(freq, weight);
  check_padding(padding_idx, N);
  at::Tensor out = at::zeros({}, weight.options());
  if (indices.numel() == 0) return out;
  TORCH_CHECK(N > 0, "indices must lie in [0, ", N, ")");
  const Segments seg = make_segments(indices, N, padding_idx, /*with_positions=*/false);
  const int64_t U = seg.size();
  if (U == 0 || D == 0) return out;
  const std::vector<double> counts = gather_counts(freq, seg);
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mba_penalty", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const auto ranges = fixed_ranges(U, 1024);
    const int64_t R = static_cast<int64_t>(ranges.size()) - 1;
    std::vector<double> partial(R, 0.0);
    for_each_part(R, [&](int64_t r) {
      partial[r] = penalty_rows(wp, D, seg, counts, ranges[r], ranges[r + 1]);
    });
    double total = 0;
    for (double p : partial) total += p;
    out.fill_(0.5 * lam * total);
  });
  return out;
}

at::Tensor mba_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& indices,
                                    const at::Tensor& freq, double lam, std::optional<int64_t> padding_idx) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [num_embeddings, D], got ", weight.sizes());
  TORCH_CHECK(grad.numel() == 1, "grad must hold one value (the penalty is a scalar), got ", grad.sizes());
  const int64_t N = weight.size(0), D = weight.size(1);
  check_freq(freq, weight);
  check_padding(padding_idx, N);
  // exactly zero on rows outside the batch
  at::Tensor out = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  if (indices.numel() == 0) return out;
  TORCH_CHECK(N > 0, "indices must lie in [0, ", N, ")");
  const Segments seg = make_segments(indices, N, padding_idx, /*with_positions=*/false);
  const int64_t U = seg.size();
  if (U == 0 || D == 0) return out;
  const std::vector<double> counts = gather_counts(freq, seg);
  const double gscale = grad.item<double>();
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "mba_penalty_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc gs = static_cast<acc>(gscale);
    at::parallel_for(0, U, 256, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const int64_t j = seg.rows[s];
        // d/dw_j of (lam / 2) ||w_j||^2 / n_j = lam / n_j * w_j, times the incoming gradient
        const acc c = reg_coef<acc>(lam, counts[s]) * gs;
        scale_row(op + j * D, wp + j * D, c, D);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ops, CPU, m) {
  m.impl("mba_sparse_update_", &mba_sparse_update_cpu);
  m.impl("mba_penalty", &mba_penalty_cpu);
  m.impl("mba_penalty_backward", &mba_penalty_backward_cpu);
}

}  // namespace cpu
}  // namespace din_ops
