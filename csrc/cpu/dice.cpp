// SPEC section 2: Dice with per-channel statistics over the valid rows only
// (reference.dice, dice_pointwise, masked_moments). Schemas: csrc/din_ops.cpp.
//
// x is viewed as rows [R, C]: [N, C] (every row valid) or [B, T, C] where row b*T + t is valid
// iff t < lengths[b]. Padding is transformed with the batch statistics but never enters them.
// Forward (training): one pass for the statistics, one for the transform. Backward: one pass
// for the reductions, one for dx. Every reduction is split into parts that depend on the data
// only (never on the thread count) and combined in part order: results are bitwise
// reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"

#ifdef DIN_OPS_MULTI_ISA
#include <immintrin.h>
#endif

namespace din_ops {
namespace cpu {
namespace {

// Per-channel coefficients shared by the row loops of dice_kernels.h.
template <typename A>
struct Coef {
  const A* mean;   // E[s]
  const A* rstd;   // 1 / sqrt(Var[s] + eps)
  const A* gamma;  // affine weight (ones when absent)
  const A* beta;   // affine bias (zeros when absent)
  const A* alpha;
};

#define DICE_ISA isa_base
#include "dice_kernels.h"
#undef DICE_ISA

#ifdef DIN_OPS_MULTI_ISA
// No FMA contraction in the vectorized scalar loops: dx's h + k1 must cancel exactly for one valid
// row (and h be the same rounded value as in the reductions), which a fused h + k1 breaks.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("fp-contract=off")
#define DICE_ISA isa_avx2
#include "dice_kernels.h"
#undef DICE_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define DICE_ISA isa_avx512
#include "dice_kernels.h"
#undef DICE_ISA
#pragma GCC pop_options

// The float-accumulating loops (fp32, bf16, fp16 data) on AVX-512 as explicit vector code: the
// vectorized scalar code above stays compute-bound on half-precision data. Built twice: with the
// avx512bf16 conversion where the CPU has it, and without.
// GCC 12 warns about the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace isa_avx512v {
#include "vec512.h"
#include "dice_kernels512.h"
}  // namespace isa_avx512v
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")
namespace isa_avx512bf {
#define DIN_OPS_V512_BF16 1
#include "vec512.h"
#undef DIN_OPS_V512_BF16
#include "dice_kernels512.h"
}  // namespace isa_avx512bf
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

// Rows per block of the two-pass moments and of the backward partial sums: 64 rows of a
// few hundred channels stay in L1/L2 between the two passes.
constexpr int64_t kBlockRows = 64;
// Number of reduction parts: a constant (not the thread count) keeps the summation order fixed.
constexpr int64_t kMaxParts = 64;

template <typename S, typename A>
struct RowKernels {
  decltype(&isa_base::block_moments<S, A>) moments;
  decltype(&isa_base::transform_rows<S, A>) transform;
  decltype(&isa_base::backward_reduce_rows<S, A>) reduce;
  decltype(&isa_base::backward_dx_rows<S, A>) dx;
};

template <typename S, typename A>
RowKernels<S, A> row_kernels() {
#ifdef DIN_OPS_MULTI_ISA
  switch (cpu_isa()) {
    case Isa::kAvx512:
      // fp32 data: the vectorized scalar loops below are as fast (memory-bound); the explicit
      // loops pay off where the conversions make the loop compute-bound
      if constexpr (std::is_same_v<A, float> && !std::is_same_v<S, float>) {
        if (cpu_avx512_bf16())
          return {isa_avx512bf::block_moments<S>, isa_avx512bf::transform_rows<S>,
                  isa_avx512bf::backward_reduce_rows<S>, isa_avx512bf::backward_dx_rows<S>};
        return {isa_avx512v::block_moments<S>, isa_avx512v::transform_rows<S>,
                isa_avx512v::backward_reduce_rows<S>, isa_avx512v::backward_dx_rows<S>};
      }
      return {isa_avx512::block_moments<S, A>, isa_avx512::transform_rows<S, A>,
              isa_avx512::backward_reduce_rows<S, A>, isa_avx512::backward_dx_rows<S, A>};
    case Isa::kAvx2:
      return {isa_avx2::block_moments<S, A>, isa_avx2::transform_rows<S, A>,
              isa_avx2::backward_reduce_rows<S, A>, isa_avx2::backward_dx_rows<S, A>};
    default:
      break;
  }
#endif
  return {isa_base::block_moments<S, A>, isa_base::transform_rows<S, A>,
          isa_base::backward_reduce_rows<S, A>, isa_base::backward_dx_rows<S, A>};
}

// Which rows of x [R, C] are valid.
struct Layout {
  int64_t R = 0, C = 0, T = 1;
  std::vector<int64_t> len;  // valid rows per batch row (rows b*T .. b*T+len[b]); empty: all
  int64_t count = 0;         // number of valid rows
};

Layout make_layout(const at::Tensor& x, const c10::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "dice: x must be [N, C] or [B, T, C], got ",
              x.sizes());
  Layout L;
  L.C = x.size(-1);
  L.R = x.dim() == 2 ? x.size(0) : x.size(0) * x.size(1);
  L.count = L.R;
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(x.dim() == 3, "dice: lengths needs x [B, T, C]");
    const int64_t B = x.size(0);
    L.T = x.size(1);
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B, "dice: lengths must have shape [",
                B, "], got ", lengths->sizes());
    TORCH_CHECK(lengths->scalar_type() == at::kInt || lengths->scalar_type() == at::kLong,
                "dice: lengths must be int32 or int64");
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    const int64_t* lp = l.data_ptr<int64_t>();
    L.len.assign(lp, lp + B);
    L.count = 0;
    for (int64_t b = 0; b < B; ++b) {
      // re-checked here so a direct torch.ops call cannot read or write out of bounds
      TORCH_CHECK(L.len[b] >= 0 && L.len[b] <= L.T, "dice: lengths[", b, "] = ", L.len[b],
                  " is outside [0, ", L.T, "]");
      L.count += L.len[b];
    }
  }
  return L;
}

// Chan et al.'s pairwise update: (na, ma, m2a) <- the moments of the union with (nb, mb, m2b).
template <typename A>
void merge_moments(int64_t& na, A* ma, A* m2a, int64_t nb, const A* mb, const A* m2b,
                   int64_t C) {
  if (nb == 0) return;
  if (na == 0) {
    std::memcpy(ma, mb, C * sizeof(A));
    std::memcpy(m2a, m2b, C * sizeof(A));
    na = nb;
    return;
  }
  const int64_t n = na + nb;
  const A fa = static_cast<A>(na) / static_cast<A>(n), fb = static_cast<A>(nb) / static_cast<A>(n);
  const A w = static_cast<A>(na) * fb;
  for (int64_t c = 0; c < C; ++c) {
    const A d = mb[c] - ma[c];
    // a weighted mean, not ma + d fb: an inf mean stays inf (the reference's sum / n), not inf - inf
    ma[c] = ma[c] * fa + mb[c] * fb;
    m2a[c] += m2b[c] + d * d * w;
  }
  na = n;
}

// Mean and biased variance per channel over the valid rows (reference.masked_moments); an
// empty set gives mean 0 and variance 0.
template <typename S, typename A>
void valid_moments(const S* x, const Layout& L, const RowKernels<S, A>& K, A* mean, A* var) {
  const int64_t C = L.C;
  // parts: consecutive blocks of rows, or consecutive batch rows of about equal valid work
  std::vector<int64_t> bounds;
  int64_t nblocks = 0;
  if (L.len.empty()) {
    nblocks = (L.R + kBlockRows - 1) / kBlockRows;
    const int64_t parts = std::max<int64_t>(1, std::min(kMaxParts, nblocks));
    for (int64_t p = 0; p <= parts; ++p) bounds.push_back(p * nblocks / parts);
  } else {
    bounds = balanced_split(L.len, kMaxParts);
  }
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<int64_t> cnt(std::max<int64_t>(parts, 0), 0);
  std::vector<A> pmean(std::max<int64_t>(parts, 0) * C), pm2(std::max<int64_t>(parts, 0) * C);

  at::parallel_for(0, std::max<int64_t>(parts, 0), 1, [&](int64_t p0, int64_t p1) {
    std::vector<A> bm(C), bm2(C);
    for (int64_t p = p0; p < p1; ++p) {
      int64_t& n = cnt[p];
      A* m = pmean.data() + p * C;
      A* m2 = pm2.data() + p * C;
      auto rows = [&](int64_t r0, int64_t nr) {
        for (int64_t i = 0; i < nr; i += kBlockRows) {
          const int64_t nb = std::min(kBlockRows, nr - i);
          K.moments(x + (r0 + i) * C, nb, C, bm.data(), bm2.data());
          merge_moments<A>(n, m, m2, nb, bm.data(), bm2.data(), C);
        }
      };
      if (L.len.empty()) {
        const int64_t r0 = bounds[p] * kBlockRows;
        rows(r0, std::min(L.R, bounds[p + 1] * kBlockRows) - r0);
      } else {
        for (int64_t b = bounds[p]; b < bounds[p + 1]; ++b) rows(b * L.T, L.len[b]);
      }
    }
  });

  int64_t n = 0;
  std::vector<A> m(C, A(0)), m2(C, A(0));
  for (int64_t p = 0; p < parts; ++p)
    merge_moments<A>(n, m.data(), m2.data(), cnt[p], pmean.data() + p * C, pm2.data() + p * C, C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = n > 0 ? m[c] : A(0);
    var[c] = n > 0 ? m2[c] / static_cast<A>(n) : A(0);
  }
}

// Parameters in the accumulation type; gamma/beta default to the identity affine map.
template <typename A>
struct Params {
  at::Tensor mean, rstd, gamma, beta, alpha;
  std::vector<char> p_nan;  // channels whose p is NaN (a NaN mean, variance, gamma or beta)
  Coef<A> coef() const {
    return {mean.data_ptr<A>(), rstd.data_ptr<A>(), gamma.data_ptr<A>(), beta.data_ptr<A>(),
            alpha.data_ptr<A>()};
  }
};

void check_vector(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() == C, "dice: ", name, " must have shape [", C, "], got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "dice: ", name, " must be floating point");
}

template <typename A>
Params<A> make_params(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& alpha,
                      const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
                      int64_t C, double eps) {
  const auto st = c10::CppTypeToScalarType<A>::value;
  const auto opts = alpha.options().dtype(st);
  Params<A> P;
  P.mean = mean.to(st).contiguous();
  P.rstd = (var.to(st) + static_cast<A>(eps)).rsqrt().contiguous();
  P.alpha = alpha.to(st).contiguous().view({C});
  if (gamma.has_value() && gamma->defined()) {
    check_vector(*gamma, C, "gamma");
    P.gamma = gamma->to(st).contiguous().view({C});
  } else {
    P.gamma = at::ones({C}, opts);
  }
  if (beta.has_value() && beta->defined()) {
    check_vector(*beta, C, "beta");
    P.beta = beta->to(st).contiguous().view({C});
  } else {
    P.beta = at::zeros({C}, opts);
  }
  // A NaN statistic or affine parameter makes p NaN for the whole channel, which the clamped exp
  // of the row loops would turn into 0 or 1. Per channel it costs nothing: such a channel's alpha
  // is NaN, so y = p (x - alpha x) + alpha x and dx are NaN as in the reference; the alpha
  // gradient, the one sum without alpha, is set after the reduction.
  const A *mu = P.mean.template data_ptr<A>(), *rs = P.rstd.template data_ptr<A>();
  const A *ga = P.gamma.template data_ptr<A>(), *be = P.beta.template data_ptr<A>();
  P.p_nan.assign(C, 0);
  bool any = false;
  for (int64_t c = 0; c < C; ++c) {
    P.p_nan[c] = mu[c] != mu[c] || rs[c] != rs[c] || ga[c] != ga[c] || be[c] != be[c];
    any |= P.p_nan[c] != 0;
  }
  if (any) {
    P.alpha = P.alpha.clone();  // may be the caller's tensor
    A* al = P.alpha.template data_ptr<A>();
    for (int64_t c = 0; c < C; ++c)
      if (P.p_nan[c]) al[c] = std::numeric_limits<A>::quiet_NaN();
  }
  return P;
}

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& lengths, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double eps) {
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "dice: eps must be positive and finite, got ", eps);
  const Layout L = make_layout(x_in, lengths);
  const int64_t C = L.C;
  check_vector(alpha, C, "alpha");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor mean, var;
  if (!training) {
    TORCH_CHECK(running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                    running_var->defined(),
                "dice: eval mode needs running_mean and running_var");
    check_vector(*running_mean, C, "running_mean");
    check_vector(*running_var, C, "running_var");
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous().view({C});
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous().view({C});
  } else {
    mean = at::empty({C}, x.options().dtype(acc));
    var = at::empty({C}, x.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dice", [&] {
    using A = acc_t<scalar_t>;
    const auto K = row_kernels<scalar_t, A>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (training) valid_moments<scalar_t, A>(xp, L, K, mean.data_ptr<A>(), var.data_ptr<A>());
    const Params<A> P = make_params<A>(mean, var, alpha, gamma, beta, C, eps);
    const Coef<A> k = P.coef();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, L.R, row_grain(C), [&](int64_t r0, int64_t r1) {
      K.transform(xp + r0 * C, yp + r0 * C, r1 - r0, C, k);
    });
  });
  return {y.view(x_in.sizes()), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& lengths,
    const at::Tensor& alpha, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean_in, const at::Tensor& var_in,
    bool training, double eps) {
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "dice_backward: eps must be positive and finite");
  const Layout L = make_layout(x_in, lengths);
  const int64_t C = L.C;
  check_vector(alpha, C, "alpha");
  check_vector(mean_in, C, "mean");
  check_vector(var_in, C, "var");
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "dice_backward: grad_y must have shape ",
              x_in.sizes(), ", got ", grad_y.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_y.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(x);
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor s_alpha = at::zeros({C}, x.options().dtype(acc));
  at::Tensor s_h = at::zeros({C}, x.options().dtype(acc));
  at::Tensor s_hx = at::zeros({C}, x.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dice_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto K = row_kernels<scalar_t, A>();
    const Params<A> P = make_params<A>(mean_in, var_in, alpha, gamma, beta, C, eps);
    const Coef<A> k = P.coef();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();

    // pass 1: every position (padding too: its output depends on alpha, gamma, beta and the
    // statistics) adds to the three sums; parts of whole blocks, combined in part order
    const int64_t nblocks = (L.R + kBlockRows - 1) / kBlockRows;
    const int64_t parts = std::min(kMaxParts, nblocks);
    std::vector<A> partial(std::max<int64_t>(parts, 0) * 3 * C, A(0));
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      std::vector<A> blk(3 * C);
      for (int64_t p = p0; p < p1; ++p) {
        A* acc_p = partial.data() + p * 3 * C;
        const int64_t b_end = (p + 1) * nblocks / parts;
        for (int64_t bl = p * nblocks / parts; bl < b_end; ++bl) {
          const int64_t r0 = bl * kBlockRows, nr = std::min(kBlockRows, L.R - r0);
          std::fill(blk.begin(), blk.end(), A(0));
          K.reduce(gp + r0 * C, xp + r0 * C, nr, C, k, blk.data(), blk.data() + C,
                   blk.data() + 2 * C);
          for (int64_t j = 0; j < 3 * C; ++j) acc_p[j] += blk[j];
        }
      }
    });
    A* sa = s_alpha.data_ptr<A>();
    A* sh = s_h.data_ptr<A>();
    A* shx = s_hx.data_ptr<A>();
    for (int64_t p = 0; p < parts; ++p) {
      const A* acc_p = partial.data() + p * 3 * C;
      for (int64_t c = 0; c < C; ++c) {
        sa[c] += acc_p[c];
        sh[c] += acc_p[C + c];
        shx[c] += acc_p[2 * C + c];
      }
    }
    for (int64_t c = 0; c < C && L.R > 0; ++c)
      if (P.p_nan[c]) sa[c] = std::numeric_limits<A>::quiet_NaN();  // a sum of g x (1 - p), p NaN

    // pass 2: dx. The statistics were taken over the valid rows, so only they receive
    // d(mean)/dx = 1/n and d(var)/dx = 2 (x - mean) / n.
    std::vector<A> k1(C, A(0)), k2(C, A(0));
    const bool stat_terms = training && L.count > 0;
    if (stat_terms) {
      const A inv_n = A(1) / static_cast<A>(L.count);
      for (int64_t c = 0; c < C; ++c) {  // gamma rstd is applied in the kernel, after h + k1
        k1[c] = -inv_n * sh[c];
        k2[c] = -inv_n * shx[c];
      }
    }
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, L.R, row_grain(C), [&](int64_t r0, int64_t r1) {
      if (L.len.empty()) {
        K.dx(gp + r0 * C, xp + r0 * C, dp + r0 * C, r1 - r0, C, k, k1.data(), k2.data(),
             stat_terms);
        return;
      }
      // runs of rows with the same validity
      for (int64_t r = r0; r < r1;) {
        const int64_t b = r / L.T, t = r - b * L.T;
        const bool valid = t < L.len[b];
        const int64_t end = std::min(r1, b * L.T + (valid ? L.len[b] : L.T));
        K.dx(gp + r * C, xp + r * C, dp + r * C, end - r, C, k, k1.data(), k2.data(),
             stat_terms && valid);
        r = end;
      }
    });
  });
  const auto pdt = alpha.scalar_type();
  const bool has_gamma = gamma.has_value() && gamma->defined();
  const bool has_beta = beta.has_value() && beta->defined();
  return {dx.view(x_in.sizes()), s_alpha.to(pdt).view(alpha.sizes()),
          has_gamma ? s_hx.to(gamma->scalar_type()).view(gamma->sizes()) : at::zeros({C}, alpha.options()),
          has_beta ? s_h.to(beta->scalar_type()).view(beta->sizes()) : at::zeros({C}, alpha.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ops, CPU, m) {
  m.impl("dice", &dice_forward);
  m.impl("dice_backward", &dice_backward);
}

}  // namespace cpu
}  // namespace din_ops
