// SPEC section 1, CPU kernels of din_ops::attention_pooling{,_backward,_stats,_stats_backward}.
//
// Reference: din_ops/reference.py attention_pooling. The kernels never build [B, T, 4D]: the
// first layer is folded per (row, candidate),
//   W0 [q, k, q-k, q*k] = (Wq + Wd) q + (Wk - Wd + Wp diag(q)) k,
// so a position costs D*H0 multiply-adds in layer 0 instead of 4D*H0. Positions of several rows
// are packed into tiles of up to kTile (position, candidate) pairs so layers >= 1 run as one
// GEMM per tile; nothing [N, H] outlives a tile (the backward recomputes the tile).
//
// Work split: rows are cut into at most kSlots ranges of about equal work (balanced_split).
// Each range owns a partial weight-gradient buffer; buffers are reduced in range order, so
// results are bitwise reproducible whatever the thread count.
//
// The compute loops live in attention_kernels.h, built for the baseline, AVX2 and AVX-512 and
// chosen at run time (cpu_isa in common.h).
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "common.h"

namespace din_ops {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;   // (position, candidate) pairs per tile
constexpr int64_t kSlots = 64;   // work ranges (and gradient buffers)

enum class Act { Sigmoid, ReLU, PReLU, Dice, Identity };

Act parse_activation(const std::string& s) {
  if (s == "sigmoid") return Act::Sigmoid;
  if (s == "relu") return Act::ReLU;
  if (s == "prelu") return Act::PReLU;
  if (s == "dice") return Act::Dice;
  if (s == "identity") return Act::Identity;
  TORCH_CHECK(false, "attention_pooling: unknown activation '", s, "'");
}

bool parse_softmax(const std::string& s) {
  TORCH_CHECK(s == "none" || s == "softmax", "attention_pooling: normalization must be 'none' or 'softmax', got '", s, "'");
  return s == "softmax";
}

// Whether x[0, n) holds an inf or a NaN (x - x is 0 only for finite x).
template <typename T>
inline bool has_nonfinite(const T* x, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(x[i] - x[i] == T(0));
  return bad != 0;
}

// Which valid positions exist, independent of the layout: row b owns key rows
// [start[b], start[b] + len[b]) of keys viewed as [P, D]. The attention weight of row b,
// candidate c, position t is at start[b]*C + c*sC + t*sT of the flat attention tensor.
struct Rows {
  int64_t B = 0, C = 1, D = 0, P = 0;
  int64_t T = 0;  // padded length (0 for jagged keys)
  int64_t sC = 1, sT = 1;
  bool jagged = false;
  std::vector<int64_t> start, len;
  int64_t valid = 0;  // sum of len
};

Rows describe_rows(const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
                   const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(query.dim() == 2 || query.dim() == 3, "attention_pooling: query must be [B, D] or [B, C, D]");
  TORCH_CHECK(keys.dim() == 2 || keys.dim() == 3, "attention_pooling: keys must be [B, T, D] or [N, D]");
  Rows r;
  r.B = query.size(0);
  r.C = query.dim() == 3 ? query.size(1) : 1;
  r.D = query.size(-1);
  TORCH_CHECK(keys.size(-1) == r.D, "attention_pooling: keys and query must have the same width D");
  r.start.resize(r.B);
  r.len.resize(r.B);
  if (keys.dim() == 3) {
    TORCH_CHECK(!offsets.has_value(), "attention_pooling: offsets is for jagged keys [N, D]");
    TORCH_CHECK(keys.size(0) == r.B, "attention_pooling: keys must be [B, T, D] with B = query.size(0)");
    const int64_t T = keys.size(1);
    r.T = T;
    r.P = r.B * T;
    r.sC = T;
    r.sT = 1;
    at::Tensor l;
    if (lengths.has_value()) {
      TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == r.B, "attention_pooling: lengths must be [B]");
      l = lengths->to(at::kLong).contiguous();
    }
    for (int64_t b = 0; b < r.B; ++b) {
      const int64_t n = l.defined() ? l.data_ptr<int64_t>()[b] : T;
      TORCH_CHECK(n >= 0 && n <= T, "attention_pooling: lengths[", b, "] = ", n, " is outside [0, T=", T, "]");
      r.start[b] = b * T;
      r.len[b] = n;
      r.valid += n;
    }
  } else {
    TORCH_CHECK(offsets.has_value(), "attention_pooling: jagged keys [N, D] need offsets");
    TORCH_CHECK(!lengths.has_value(), "attention_pooling: lengths is for padded keys [B, T, D]");
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == r.B + 1, "attention_pooling: offsets must be [B + 1]");
    r.jagged = true;
    r.P = keys.size(0);
    r.sC = 1;
    r.sT = r.C;
    const at::Tensor o = offsets->to(at::kLong).contiguous();
    const int64_t* op = o.data_ptr<int64_t>();
    TORCH_CHECK(op[0] == 0, "attention_pooling: offsets[0] must be 0");
    TORCH_CHECK(op[r.B] == r.P, "attention_pooling: offsets[-1] must equal N = keys.size(0)");
    for (int64_t b = 0; b < r.B; ++b) {
      TORCH_CHECK(op[b + 1] >= op[b], "attention_pooling: offsets must be non-decreasing");
      r.start[b] = op[b];
      r.len[b] = op[b + 1] - op[b];
      r.valid += r.len[b];
    }
  }
  return r;
}

// The MLP in the accumulation type, with layer 0 split into its folded blocks. Layers
// 0..L-1; the activation follows every layer but the last (the last is the output layer of
// the pooling head, or the layer whose pre-activation statistics the stats head wants).
template <typename T>
struct Mlp {
  int64_t D = 0, L = 0;
  std::vector<int64_t> H, fan_in;
  std::vector<at::Tensor> W, b;  // [H_l, fan_in_l], [H_l]
  at::Tensor Wkd, Wqd, WqdT;     // [H0, D]: Wk - Wd, Wq + Wd; [D, H0]: (Wq + Wd)^T
  const T* Wp = nullptr;         // column block 3 of W0, row stride 4D
  Act act = Act::Identity;
  std::vector<at::Tensor> alpha, mean, var, gamma, beta;
  std::vector<int64_t> alpha_stride;
  T eps = 0;
  int64_t maxH = 1;
  bool nonfinite = false;  // a parameter is inf or NaN (or a Dice variance + eps is not > 0)

  const T* w(int64_t l) const { return W[l].data_ptr<T>(); }
  const T* bias(int64_t l) const { return b[l].data_ptr<T>(); }
};

at::Tensor acc(const at::Tensor& t, at::ScalarType s) { return t.to(s).contiguous(); }

// 1 / sqrt(var + eps) of a Dice layer. A variance of -0.0 is the stats op's mark for a batch of
// one valid pair: there the normalized value and its gradient are exactly 0 (h == mean), so the
// scale is 0 rather than 1/sqrt(eps) times a rounding residue of h - mean.
template <typename T>
T dice_rstd(T var, T eps) {
  return var == T(0) && std::signbit(var) ? T(0) : T(1) / std::sqrt(var + eps);
}

template <typename T>
Mlp<T> make_mlp(int64_t D, at::TensorList weights, at::TensorList biases, at::TensorList act_weights,
                at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
                at::TensorList norm_bias, const std::string& activation, double eps) {
  const auto s = c10::CppTypeToScalarType<T>::value;
  Mlp<T> m;
  m.D = D;
  m.L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(m.L >= 1 && static_cast<int64_t>(biases.size()) == m.L, "attention_pooling: weights/biases mismatch");
  m.act = parse_activation(activation);
  m.eps = static_cast<T>(eps);
  int64_t in = 4 * D;
  for (int64_t l = 0; l < m.L; ++l) {
    TORCH_CHECK(weights[l].dim() == 2 && weights[l].size(1) == in, "attention_pooling: weights[", l, "] must be [H, ", in, "]");
    TORCH_CHECK(biases[l].numel() == weights[l].size(0), "attention_pooling: biases[", l, "] must be [H]");
    m.W.push_back(acc(weights[l], s));
    m.b.push_back(acc(biases[l], s));
    m.H.push_back(weights[l].size(0));
    m.fan_in.push_back(in);
    m.maxH = std::max(m.maxH, m.H.back());
    in = m.H.back();
  }
  const at::Tensor& W0 = m.W[0];
  m.Wkd = (W0.narrow(1, D, D) - W0.narrow(1, 2 * D, D)).contiguous();
  m.Wqd = (W0.narrow(1, 0, D) + W0.narrow(1, 2 * D, D)).contiguous();
  m.WqdT = m.Wqd.t().contiguous();
  m.Wp = W0.data_ptr<T>() + 3 * D;
  const int64_t n_act = m.L - 1;
  if (m.act == Act::PReLU || m.act == Act::Dice) {
    TORCH_CHECK(static_cast<int64_t>(act_weights.size()) == n_act, "attention_pooling: one alpha per hidden layer expected");
    for (int64_t l = 0; l < n_act; ++l) {
      TORCH_CHECK(act_weights[l].numel() == m.H[l] || (m.act == Act::PReLU && act_weights[l].numel() == 1),
                  "attention_pooling: alpha[", l, "] must have ", m.H[l], " entries");
      m.alpha.push_back(acc(act_weights[l], s));
      m.alpha_stride.push_back(act_weights[l].numel() == 1 ? 0 : 1);
    }
  }
  if (m.act == Act::Dice) {
    TORCH_CHECK(static_cast<int64_t>(norm_mean.size()) == n_act && static_cast<int64_t>(norm_var.size()) == n_act,
                "attention_pooling: dice needs a mean and a variance per hidden layer");
    TORCH_CHECK(norm_weight.empty() || static_cast<int64_t>(norm_weight.size()) == n_act, "attention_pooling: dice gamma count");
    TORCH_CHECK(norm_bias.empty() || static_cast<int64_t>(norm_bias.size()) == n_act, "attention_pooling: dice beta count");
    for (int64_t l = 0; l < n_act; ++l) {
      TORCH_CHECK(norm_mean[l].numel() == m.H[l] && norm_var[l].numel() == m.H[l], "attention_pooling: dice statistics shape");
      m.mean.push_back(acc(norm_mean[l], s));
      m.var.push_back(acc(norm_var[l], s));
      m.gamma.push_back(norm_weight.empty() ? at::ones({m.H[l]}, W0.options()) : acc(norm_weight[l], s));
      m.beta.push_back(norm_bias.empty() ? at::zeros({m.H[l]}, W0.options()) : acc(norm_bias[l], s));
      const T* va = m.var[l].template data_ptr<T>();
      for (int64_t h = 0; h < m.H[l]; ++h) m.nonfinite |= !(va[h] + m.eps > T(0));
    }
  }
  for (const auto* group : {&m.W, &m.b, &m.alpha, &m.mean, &m.var, &m.gamma, &m.beta})
    for (const at::Tensor& t : *group) m.nonfinite |= has_nonfinite(t.template data_ptr<T>(), t.numel());
  return m;
}

// Offsets of each parameter's gradient inside one flat per-range buffer.
struct GradLayout {
  std::vector<int64_t> W, b, alpha, mean, var, gamma, beta;
  int64_t size = 0;
};

template <typename T>
GradLayout grad_layout(const Mlp<T>& m) {
  GradLayout g;
  auto take = [&](int64_t n) {
    const int64_t o = g.size;
    g.size += n;
    return o;
  };
  for (int64_t l = 0; l < m.L; ++l) g.W.push_back(take(m.H[l] * m.fan_in[l]));
  for (int64_t l = 0; l < m.L; ++l) g.b.push_back(take(m.H[l]));
  for (size_t l = 0; l < m.alpha.size(); ++l) g.alpha.push_back(take(m.alpha[l].numel()));
  for (size_t l = 0; l < m.mean.size(); ++l) {
    g.mean.push_back(take(m.H[l]));
    g.var.push_back(take(m.H[l]));
    g.gamma.push_back(take(m.H[l]));
    g.beta.push_back(take(m.H[l]));
  }
  return g;
}

struct Segment {
  int64_t b, c, t0, n, off;  // row, candidate, first position, count, first tile row
};

// Per-thread scratch: the tile's pre-activations Z[l] and activations A[l] ([kTile, H_l]),
// the folded layer-0 matrix of the current (row, candidate), and backward buffers.
template <typename T>
struct Workspace {
  std::vector<std::vector<T>> Z, A;
  std::vector<T> Abc, cbc, dA0, dc0, dZ, dZprev, kbuf;
  std::vector<Segment> segs;
  int64_t M = 0;
  bool keep_nan = false;  // the tile may hold a NaN pre-activation: NaN-keeping sigmoid

  explicit Workspace(const Mlp<T>& m) {
    for (int64_t l = 0; l < m.L; ++l) {
      Z.emplace_back(kTile * m.H[l]);
      A.emplace_back(l + 1 < m.L ? kTile * m.H[l] : 0);
    }
    Abc.resize(m.H[0] * m.D);
    cbc.resize(m.H[0]);
    dA0.resize(m.H[0] * m.D);
    dc0.resize(m.H[0]);
    dZ.resize(kTile * m.maxH);
    dZprev.resize(kTile * m.maxH);
  }
};

// Inputs of a kernel call in the accumulation type.
template <typename T>
struct Inputs {
  const T* q = nullptr;  // [B, C, D]
  const T* k = nullptr;  // [P, D]
};

#define AP_ISA isa_base
#include "attention_kernels.h"
#undef AP_ISA

#ifdef DIN_OPS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define AP_ISA isa_avx2
#include "attention_kernels.h"
#undef AP_ISA
#pragma GCC pop_options
#pragma GCC push_options
// 256-bit vectors, as -march=native picks on AVX-512 Xeons: 512-bit ones measured ~6% slower here
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=256")
#define AP_ISA isa_avx512
#include "attention_kernels.h"
#undef AP_ISA
#pragma GCC pop_options
#endif

// The compute loops of one instruction set, chosen once per call by cpu_isa().
template <typename T>
struct Kernels {
  decltype(&isa_base::tile_forward<T>) tile_forward;
  decltype(&isa_base::tile_backward<T>) tile_backward;
  decltype(&isa_base::pool_forward<T>) pool_forward;
  decltype(&isa_base::pool_backward<T>) pool_backward;
  decltype(&isa_base::tile_moments<T>) tile_moments;
  decltype(&isa_base::stats_dz<T>) stats_dz;
};

#define AP_KERNELS(ns)                                                                       \
  Kernels<T> {                                                                               \
    ns::tile_forward<T>, ns::tile_backward<T>, ns::pool_forward<T>, ns::pool_backward<T>,   \
        ns::tile_moments<T>, ns::stats_dz<T>                                                 \
  }

template <typename T>
Kernels<T> kernels() {
#ifdef DIN_OPS_MULTI_ISA
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return AP_KERNELS(isa_avx512);
    case Isa::kAvx2:
      return AP_KERNELS(isa_avx2);
    default:
      break;
  }
#endif
  return AP_KERNELS(isa_base);
}
#undef AP_KERNELS

// Calls fn(ws) for every tile of the rows [row_begin, row_end): segments of (row, candidate)
// positions packed in row order into tiles of up to kTile pairs.
template <typename T, typename Fn>
void for_each_tile(const Rows& r, int64_t row_begin, int64_t row_end, Workspace<T>& ws, Fn&& fn) {
  ws.segs.clear();
  ws.M = 0;
  for (int64_t b = row_begin; b < row_end; ++b) {
    for (int64_t c = 0; c < r.C; ++c) {
      int64_t t = 0;
      while (t < r.len[b]) {
        const int64_t n = std::min(r.len[b] - t, kTile - ws.M);
        ws.segs.push_back({b, c, t, n, ws.M});
        ws.M += n;
        t += n;
        if (ws.M == kTile) {
          fn(ws);
          ws.segs.clear();
          ws.M = 0;
        }
      }
    }
  }
  if (ws.M > 0) fn(ws);
  ws.segs.clear();
  ws.M = 0;
}

std::vector<int64_t> row_ranges(const Rows& r) {
  std::vector<int64_t> work(r.B);
  for (int64_t b = 0; b < r.B; ++b) work[b] = r.len[b] * r.C + 4;  // +4: per-row overhead
  return balanced_split(work, kSlots);
}

// ---------------------------------------------------------------------------------------------
// forward
template <typename T>
void forward_impl(const Rows& r, const Mlp<T>& m, const Inputs<T>& in, bool softmax, T scale, T* attn, T* out) {
  const auto ranges = row_ranges(r);
  const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
  const Kernels<T> K = kernels<T>();
  at::parallel_for(0, n_ranges, 1, [&](int64_t lo, int64_t hi) {
    Workspace<T> ws(m);
    for (int64_t part = lo; part < hi; ++part) {
      const int64_t rb = ranges[part], re = ranges[part + 1];
      for_each_tile(r, rb, re, ws, [&](Workspace<T>& w) {
        K.tile_forward(m, r, in, w);
        const T* s = w.Z[m.L - 1].data();  // [M, 1]
        for (const Segment& g : w.segs) {
          T* a = attn + r.start[g.b] * r.C + g.c * r.sC + g.t0 * r.sT;
          for (int64_t i = 0; i < g.n; ++i) a[i * r.sT] = scale * s[g.off + i];
        }
      });
      K.pool_forward(r, in, softmax, rb, re, attn, out);
    }
  });
}

// Tensors in the accumulation type (no copy when already there).
struct AccInputs {
  at::Tensor q, k;
};

AccInputs acc_inputs(const at::Tensor& query, const at::Tensor& keys) {
  const auto s = acc_scalar_type(query.scalar_type());
  return {query.to(s).contiguous(), keys.to(s).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> attention_pooling_cpu(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale,
    double eps) {
  const Rows r = describe_rows(query, keys, lengths, offsets);
  const bool softmax = parse_softmax(std::string(normalization));
  const auto acc_s = acc_scalar_type(query.scalar_type());
  const AccInputs ai = acc_inputs(query, keys);
  auto opts = ai.q.options();
  at::Tensor out = at::zeros({r.B, r.C, r.D}, opts);
  std::vector<int64_t> attn_shape;
  if (r.jagged) {
    attn_shape = query.dim() == 2 ? std::vector<int64_t>{r.P} : std::vector<int64_t>{r.P, r.C};
  } else {
    const int64_t T = keys.size(1);
    attn_shape = query.dim() == 2 ? std::vector<int64_t>{r.B, T} : std::vector<int64_t>{r.B, r.C, T};
  }
  at::Tensor attn = at::zeros(attn_shape, opts);
  AT_DISPATCH_FLOATING_TYPES(acc_s, "attention_pooling_cpu", [&] {
    const Mlp<scalar_t> m = make_mlp<scalar_t>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight,
                                               norm_bias, std::string(activation), eps);
    TORCH_CHECK(m.H[m.L - 1] == 1, "attention_pooling: the last layer must have one output");
    Inputs<scalar_t> in{ai.q.data_ptr<scalar_t>(), ai.k.data_ptr<scalar_t>()};
    forward_impl<scalar_t>(r, m, in, softmax, static_cast<scalar_t>(scale), attn.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>());
  });
  return {out.view(query.sizes()).to(query.scalar_type()), attn.to(query.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// backward (shared by both heads)
using GradTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Reduces the per-range buffers in range order and cuts the result into the gradient tensors.
template <typename T>
GradTuple finish_grads(const Mlp<T>& m, const GradLayout& lay, const std::vector<std::vector<T>>& parts,
                       at::Tensor gq, at::Tensor gk, const at::Tensor& query, const at::Tensor& keys,
                       at::TensorList weights, at::TensorList act_weights, at::TensorList norm_mean,
                       at::TensorList norm_weight, at::TensorList norm_bias) {
  std::vector<T> total(lay.size, T(0));
  for (const auto& p : parts)
    for (int64_t i = 0; i < lay.size; ++i) total[i] += p[i];
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto slice = [&](int64_t off, at::IntArrayRef shape, at::ScalarType dt) {
    at::Tensor t = at::empty(shape, acc_opts);
    std::memcpy(t.data_ptr<T>(), total.data() + off, t.numel() * sizeof(T));
    return t.to(dt);
  };
  const auto dt = query.scalar_type();
  std::vector<at::Tensor> gW, gb, ga, gmean, gvar, ggamma, gbeta;
  for (int64_t l = 0; l < m.L; ++l) {
    gW.push_back(slice(lay.W[l], weights[l].sizes(), dt));
    gb.push_back(slice(lay.b[l], {m.H[l]}, dt));
  }
  for (size_t l = 0; l < lay.alpha.size(); ++l) ga.push_back(slice(lay.alpha[l], act_weights[l].sizes(), dt));
  for (size_t l = 0; l < lay.mean.size(); ++l) {
    gmean.push_back(slice(lay.mean[l], {m.H[l]}, norm_mean[l].scalar_type()));
    gvar.push_back(slice(lay.var[l], {m.H[l]}, norm_mean[l].scalar_type()));
    if (!norm_weight.empty()) ggamma.push_back(slice(lay.gamma[l], {m.H[l]}, dt));
    if (!norm_bias.empty()) gbeta.push_back(slice(lay.beta[l], {m.H[l]}, dt));
  }
  return {gq.view(query.sizes()).to(dt), gk.view(keys.sizes()).to(dt), gW, gb, ga, gmean, gvar, ggamma, gbeta};
}

GradTuple attention_pooling_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& attn,
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale, double eps) {
  const Rows r = describe_rows(query, keys, lengths, offsets);
  const bool softmax = parse_softmax(std::string(normalization));
  TORCH_CHECK(grad_out.numel() == r.B * r.C * r.D, "attention_pooling_backward: grad_out shape");
  TORCH_CHECK(attn.numel() == r.P * r.C, "attention_pooling_backward: attn shape");
  const auto acc_s = acc_scalar_type(query.scalar_type());
  const AccInputs ai = acc_inputs(query, keys);
  const at::Tensor go = grad_out.to(acc_s).contiguous();
  const at::Tensor w = attn.to(acc_s).contiguous();
  at::Tensor ga;
  if (grad_attn.has_value() && grad_attn->defined()) {
    TORCH_CHECK(grad_attn->numel() == r.P * r.C, "attention_pooling_backward: grad_attn shape");
    ga = grad_attn->to(acc_s).contiguous();
  }
  at::Tensor gq = at::zeros({r.B * r.C, r.D}, ai.q.options());
  // every valid position is written by the pooling pass below, the padding is zeroed there
  at::Tensor gk = at::empty({r.P, r.D}, ai.q.options());
  at::Tensor ds = at::empty({r.P * r.C}, ai.q.options());
  GradTuple result;
  AT_DISPATCH_FLOATING_TYPES(acc_s, "attention_pooling_backward_cpu", [&] {
    using T = scalar_t;
    const Mlp<T> m = make_mlp<T>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                 std::string(activation), eps);
    const GradLayout lay = grad_layout(m);
    const Inputs<T> in{ai.q.data_ptr<T>(), ai.k.data_ptr<T>()};
    const auto ranges = row_ranges(r);
    const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
    std::vector<std::vector<T>> parts(n_ranges, std::vector<T>(lay.size, T(0)));
    const T* pw = w.data_ptr<T>();
    const T* pga = ga.defined() ? ga.data_ptr<T>() : nullptr;
    const T* pgo = go.data_ptr<T>();
    T* pds = ds.data_ptr<T>();
    T* pgk = gk.data_ptr<T>();
    T* pgq = gq.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const Kernels<T> K = kernels<T>();
    at::parallel_for(0, n_ranges, 1, [&](int64_t lo, int64_t hi) {
      Workspace<T> ws(m);
      for (int64_t part = lo; part < hi; ++part) {
        const int64_t rb = ranges[part], re = ranges[part + 1];
        // Pooling and normalization: dL/ds for every valid pair, and the pooling's share of dk.
        K.pool_backward(r, in, softmax, sc, pw, pga, pgo, rb, re, pds, pgk);
        // The MLP, tile by tile.
        T* g = parts[part].data();
        for_each_tile(r, rb, re, ws, [&](Workspace<T>& wk) {
          K.tile_forward(m, r, in, wk);
          for (const Segment& s : wk.segs) {
            const T* src = pds + r.start[s.b] * r.C + s.c * r.sC + s.t0 * r.sT;
            for (int64_t i = 0; i < s.n; ++i) wk.dZ[s.off + i] = src[i * r.sT];
          }
          K.tile_backward(m, lay, r, in, wk, g, pgk, pgq);
        });
      }
    });
    result = finish_grads<T>(m, lay, parts, gq, gk, query, keys, weights, act_weights, norm_mean, norm_weight,
                             norm_bias);
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// stats head: mean and biased variance of the last layer's pre-activation over valid pairs
std::tuple<at::Tensor, at::Tensor> attention_pooling_stats_cpu(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, double eps) {
  const Rows r = describe_rows(query, keys, lengths, offsets);
  const auto acc_s = acc_scalar_type(query.scalar_type());
  const AccInputs ai = acc_inputs(query, keys);
  const int64_t H = weights.back().size(0);
  at::Tensor mean = at::zeros({H}, ai.q.options());
  at::Tensor var = at::zeros({H}, ai.q.options());
  AT_DISPATCH_FLOATING_TYPES(acc_s, "attention_pooling_stats_cpu", [&] {
    using T = scalar_t;
    const Mlp<T> m = make_mlp<T>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                 std::string(activation), eps);
    const Inputs<T> in{ai.q.data_ptr<T>(), ai.k.data_ptr<T>()};
    const auto ranges = row_ranges(r);
    const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
    const Kernels<T> K = kernels<T>();
    // per range: count, mean[H], M2[H] (Chan et al.'s pairwise combination, in a fixed order)
    std::vector<int64_t> counts(n_ranges, 0);
    std::vector<std::vector<T>> means(n_ranges, std::vector<T>(H, T(0))), m2s(n_ranges, std::vector<T>(H, T(0)));
    at::parallel_for(0, n_ranges, 1, [&](int64_t lo, int64_t hi) {
      Workspace<T> ws(m);
      std::vector<T> tmean(H), tm2(H);
      for (int64_t part = lo; part < hi; ++part) {
        int64_t& n = counts[part];
        T* mu = means[part].data();
        T* m2 = m2s[part].data();
        for_each_tile(r, ranges[part], ranges[part + 1], ws, [&](Workspace<T>& wk) {
          K.tile_forward(m, r, in, wk);
          const T* z = wk.Z[m.L - 1].data();
          const int64_t M = wk.M;
          K.tile_moments(z, M, H, tmean.data(), tm2.data());
          const T na = T(n), nb = T(M), nt = na + nb;
          for (int64_t h = 0; h < H; ++h) {
            const T delta = tmean[h] - mu[h];
            mu[h] += delta * nb / nt;
            m2[h] += tm2[h] + delta * delta * na * nb / nt;
          }
          n += M;
        });
      }
    });
    T* pm = mean.data_ptr<T>();
    T* pv = var.data_ptr<T>();
    int64_t n = 0;
    for (int64_t part = 0; part < n_ranges; ++part) {
      const int64_t nbi = counts[part];
      if (nbi == 0) continue;
      const T na = T(n), nb = T(nbi), nt = na + nb;
      for (int64_t h = 0; h < H; ++h) {
        const T delta = means[part][h] - pm[h];
        pm[h] += delta * nb / nt;
        pv[h] += m2s[part][h] + delta * delta * na * nb / nt;
      }
      n += nbi;
    }
    if (n > 0)
      for (int64_t h = 0; h < H; ++h) pv[h] /= T(n);
    if (n == 1)  // mark the one-valid-pair batch for the consumers' dice_rstd (NaN stays NaN)
      for (int64_t h = 0; h < H; ++h)
        if (pv[h] == T(0)) pv[h] = -T(0);
  });
  return {mean, var};
}

GradTuple attention_pooling_stats_backward_cpu(
    const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& mean, const at::Tensor& query,
    const at::Tensor& keys, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& offsets,
    at::TensorList weights, at::TensorList biases, at::TensorList act_weights, at::TensorList norm_mean,
    at::TensorList norm_var, at::TensorList norm_weight, at::TensorList norm_bias, c10::string_view activation,
    double eps) {
  const Rows r = describe_rows(query, keys, lengths, offsets);
  const auto acc_s = acc_scalar_type(query.scalar_type());
  const AccInputs ai = acc_inputs(query, keys);
  const int64_t H = weights.back().size(0);
  TORCH_CHECK(grad_mean.numel() == H && grad_var.numel() == H && mean.numel() == H,
              "attention_pooling_stats_backward: statistics must have ", H, " entries");
  const at::Tensor gmean = grad_mean.to(acc_s).contiguous();
  const at::Tensor gvar = grad_var.to(acc_s).contiguous();
  const at::Tensor mu = mean.to(acc_s).contiguous();
  at::Tensor gq = at::zeros({r.B * r.C, r.D}, ai.q.options());
  at::Tensor gk = at::zeros({r.P, r.D}, ai.q.options());
  GradTuple result;
  AT_DISPATCH_FLOATING_TYPES(acc_s, "attention_pooling_stats_backward_cpu", [&] {
    using T = scalar_t;
    const Mlp<T> m = make_mlp<T>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                 std::string(activation), eps);
    const GradLayout lay = grad_layout(m);
    const Inputs<T> in{ai.q.data_ptr<T>(), ai.k.data_ptr<T>()};
    const auto ranges = row_ranges(r);
    const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
    const Kernels<T> K = kernels<T>();
    std::vector<std::vector<T>> parts(n_ranges, std::vector<T>(lay.size, T(0)));
    const T n = T(std::max<int64_t>(r.valid * r.C, 1));
    const T* pgm = gmean.data_ptr<T>();
    const T* pgv = gvar.data_ptr<T>();
    const T* pmu = mu.data_ptr<T>();
    T* pgk = gk.data_ptr<T>();
    T* pgq = gq.data_ptr<T>();
    at::parallel_for(0, n_ranges, 1, [&](int64_t lo, int64_t hi) {
      Workspace<T> ws(m);
      for (int64_t part = lo; part < hi; ++part) {
        T* g = parts[part].data();
        for_each_tile(r, ranges[part], ranges[part + 1], ws, [&](Workspace<T>& wk) {
          K.tile_forward(m, r, in, wk);
          K.stats_dz(wk.Z[m.L - 1].data(), wk.M, H, pgm, pgv, pmu, n, wk.dZ.data());
          K.tile_backward(m, lay, r, in, wk, g, pgk, pgq);
        });
      }
    });
    result = finish_grads<T>(m, lay, parts, gq, gk, query, keys, weights, act_weights, norm_mean, norm_weight,
                             norm_bias);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ops, CPU, m) {
  m.impl("attention_pooling", &attention_pooling_cpu);
  m.impl("attention_pooling_backward", &attention_pooling_backward_cpu);
  m.impl("attention_pooling_stats", &attention_pooling_stats_cpu);
  m.impl("attention_pooling_stats_backward", &attention_pooling_stats_backward_cpu);
}

}  // namespace cpu
}  // namespace din_ops
