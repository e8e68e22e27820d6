// Row loops of the MBA update and penalty (SPEC section 3), included by mba.cpp once per
// instruction set inside `namespace MBA_ISA` under a matching `#pragma GCC target` (as
// dice_kernels.h): fp16/bf16 rows are converted element by element with the branch-free cvt.h
// conversions, so every row loop vectorizes, in the data's own type, without converting tables.
// No include guard on purpose.

namespace MBA_ISA {

#include "cvt.h"

// Sum of squares with kLanes independent partial sums: a single running sum is a serial chain
// of dependent adds (the compiler may not reorder FP adds); fixed lanes keep the order fixed.
constexpr int kLanes = 16;
template <typename acc, typename T>
inline acc sum_squares(const T* __restrict__ x, int64_t D) {
  acc lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc v = ld(x, d + l);
      lanes[l] += v * v;
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    const acc v = ld(x, d);
    lanes[l] += v * v;
  }
  acc s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename scalar_t, typename state_t, Optim opt>
void update_segments(scalar_t* __restrict__ weight, const scalar_t* __restrict__ grad,
                     state_t* __restrict__ state, int64_t D, const Segments& seg,
                     const std::vector<double>& counts, double lr_d, double lam, double eps_d) {
  using acc = acc_t<scalar_t>;
  const acc lr = static_cast<acc>(lr_d);
  const acc eps = static_cast<acc>(eps_d);
  const uint64_t pmask = seg.pos_mask;
  const int64_t U = seg.size();
  const int64_t ahead = prefetch_distance(2 * D * static_cast<int64_t>(sizeof(scalar_t)));

  // Hot rows (runs of at least kHotRun occurrences, the head of a skewed distribution) are summed
  // first in a pass over the batch in position order: their gradient rows are then read in
  // ascending address order (streaming) instead of one random row at a time, into a small
  // buffer that stays in cache. The order of each row's sum is the same ascending position order
  // as in the fused loop below, and each hot row belongs to one thread: deterministic.
  std::vector<int32_t> hot_of_seg;
  std::vector<acc> hot_sum;
  {
    std::vector<int64_t> hot_segs;
    for (int64_t s = 0; s < U; ++s) {
      if (seg.starts[2 * s + 1] - seg.starts[2 * s] >= kHotRun) hot_segs.push_back(s);
    }
    const int64_t H = static_cast<int64_t>(hot_segs.size());
    if (H > 0) {
      const int64_t M = static_cast<int64_t>(seg.packed.size());
      hot_of_seg.assign(U, -1);
      hot_sum.assign(H * D, acc(0));
      std::vector<int32_t> hot_of_pos(M, -1);
      std::vector<int64_t> work(H);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t s = hot_segs[h];
        hot_of_seg[s] = static_cast<int32_t>(h);
        for (int64_t k = seg.starts[2 * s]; k < seg.starts[2 * s + 1]; ++k) {
          hot_of_pos[static_cast<int64_t>(seg.packed[k] & pmask)] = static_cast<int32_t>(h);
        }
        work[h] = seg.starts[2 * s + 1] - seg.starts[2 * s];
      }
      // every part scans the whole position map, so only as many parts as threads
      const auto hb = balanced_split(work, at::get_num_threads());
      for_each_part(static_cast<int64_t>(hb.size()) - 1, [&](int64_t part) {
        const int32_t lo = static_cast<int32_t>(hb[part]), hi = static_cast<int32_t>(hb[part + 1]);
        for (int64_t p = 0; p < M; ++p) {
          const int32_t h = hot_of_pos[p];
          if (h < lo || h >= hi) continue;
          acc* __restrict__ dst = hot_sum.data() + static_cast<int64_t>(h) * D;
          const scalar_t* __restrict__ gr = grad + p * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += ld(gr, d);
        }
      });
    }
  }
  const bool any_hot = !hot_of_seg.empty();

  const int64_t row_cost = std::max<int64_t>(1, D / 16);
  const auto bounds = split_segments(seg, row_cost, 8 * at::get_num_threads());
  const int64_t nparts = static_cast<int64_t>(bounds.size()) - 1;
  for_each_part(nparts, [&](int64_t part) {
    std::vector<acc> buf(D);
    {
      const int64_t sb = bounds[part], se = bounds[part + 1];
      for (int64_t s = sb; s < se; ++s) {
        if (s + ahead < se) {
          const int64_t t = s + ahead;
          const int64_t jt = seg.rows[t];
          prefetch_row(weight + jt * D, D * sizeof(scalar_t), true);
          if (opt == Optim::kAdagrad) prefetch_row(state + jt * D, D * sizeof(state_t), true);
          if (opt == Optim::kAdagradRowwise) __builtin_prefetch(state + jt, 1, 1);
          const int64_t kb = seg.starts[2 * t];
          const int64_t ke = (any_hot && hot_of_seg[t] >= 0) ? kb : std::min(seg.starts[2 * t + 1], kb + 8);
          for (int64_t k = kb; k < ke; ++k) {
            prefetch_row(grad + static_cast<int64_t>(seg.packed[k] & pmask) * D, D * sizeof(scalar_t),
                         false);
          }
        }
        const int64_t j = seg.rows[s];
        acc* __restrict__ g = buf.data();
        if (any_hot && hot_of_seg[s] >= 0) {
          g = hot_sum.data() + static_cast<int64_t>(hot_of_seg[s]) * D;  // summed above
        } else {
          const int64_t kb = seg.starts[2 * s], ke = seg.starts[2 * s + 1];
          const scalar_t* gr = grad + static_cast<int64_t>(seg.packed[kb] & pmask) * D;
          for (int64_t d = 0; d < D; ++d) g[d] = ld(gr, d);
          for (int64_t k = kb + 1; k < ke; ++k) {
            gr = grad + static_cast<int64_t>(seg.packed[k] & pmask) * D;
            for (int64_t d = 0; d < D; ++d) g[d] += ld(gr, d);
          }
        }
        const acc c = reg_coef<acc>(lam, counts[s]);
        scalar_t* __restrict__ w = weight + j * D;
        if constexpr (opt == Optim::kSgd) {
          for (int64_t d = 0; d < D; ++d) {
            const acc wd = ld(w, d);
            const acc gd = g[d] + c * wd;
            st(w, d, wd - lr * gd);
          }
        } else if constexpr (opt == Optim::kAdagrad) {
          state_t* __restrict__ sv = state + j * D;
          for (int64_t d = 0; d < D; ++d) {
            const acc wd = ld(w, d);
            const acc gd = g[d] + c * wd;
            const acc sd = ld(sv, d) + gd * gd;
            st(sv, d, sd);
            st(w, d, wd - lr * gd / (std::sqrt(sd) + eps));
          }
        } else {
          for (int64_t d = 0; d < D; ++d) g[d] += c * ld(w, d);
          const acc sq = sum_squares<acc>(g, D);
          const acc sj = ld(state, j) + sq / static_cast<acc>(D);
          st(state, j, sj);
          const acc denom = std::sqrt(sj) + eps;
          for (int64_t d = 0; d < D; ++d) {
            st(w, d, ld(w, d) - lr * g[d] / denom);
          }
        }
      }
    }
  });
}

// Sum over segments [s0, s1) of ||w_j||^2 / n_j (the penalty before lam / 2), in double.
template <typename scalar_t>
double penalty_rows(const scalar_t* w, int64_t D, const Segments& seg, const std::vector<double>& counts,
                    int64_t s0, int64_t s1) {
  using acc = acc_t<scalar_t>;
  const int64_t ahead = prefetch_distance(D * static_cast<int64_t>(sizeof(scalar_t)));
  double sum = 0;
  for (int64_t s = s0; s < s1; ++s) {
    if (s + ahead < s1) prefetch_row(w + seg.rows[s + ahead] * D, D * sizeof(scalar_t), false);
    const acc sq = sum_squares<acc>(w + seg.rows[s] * D, D);
    const acc n = std::max(static_cast<acc>(counts[s]), acc(1));
    sum += static_cast<double>(sq / n);
  }
  return sum;
}

// out = c row (the penalty's gradient on one present row).
template <typename scalar_t, typename acc>
void scale_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ row, acc c, int64_t D) {
  for (int64_t d = 0; d < D; ++d) st(out, d, c * ld(row, d));
}

}  // namespace MBA_ISA
