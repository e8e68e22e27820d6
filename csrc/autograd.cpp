// Autograd kernels of din_ops::attention_pooling and din_ops::attention_pooling_stats (SPEC
// section 1), and of their embedding_* forms (section 4). The backward node calls the fused backward operator directly: written as a Python
// formula, the autograd step cost more than the kernels at small shapes (~0.1 ms per call).
// A backward with create_graph=True differentiates the reference computation instead, through
// the function din_ops installs from Python (autograd.h), so every higher derivative is exact.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <utility>

namespace din_ops {
namespace {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

GraphBackward graph_backward = nullptr;

// weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias
constexpr size_t kLists = 7;
using ListArgs = std::array<TensorList, kLists>;
// The forward ops take the lists that may be empty as Tensor[]? (None: empty; csrc/din_ops.cpp).
using OptList = std::optional<TensorList>;
TensorList or_empty(const OptList& l) { return l.value_or(TensorList()); }
using GradTuple = std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                             std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;

std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }
Tensor undef(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

bool any_requires_grad(const Tensor& q, const Tensor& k, const ListArgs& lists) {
  if (q.requires_grad() || k.requires_grad()) return true;
  for (const TensorList& l : lists)
    for (const Tensor& t : l)
      if (t.requires_grad()) return true;
  return false;
}

// Saves query, keys, the output the backward reads, the row description and every list.
void save(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& out,
          const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets, const ListArgs& lists) {
  variable_list saved{q, k, out, undef(lengths), undef(offsets)};
  std::vector<int64_t> sizes;
  for (const TensorList& l : lists) {
    sizes.push_back(static_cast<int64_t>(l.size()));
    saved.insert(saved.end(), l.begin(), l.end());
  }
  ctx->save_for_backward(saved);
  ctx->saved_data["sizes"] = sizes;
  ctx->set_materialize_grads(false);  // an output without a gradient stays undefined
}

struct Saved {
  Tensor q, k, out;
  std::optional<Tensor> lengths, offsets;
  std::vector<Tensor> flat;                        // the lists, one after another
  std::array<std::vector<Tensor>, kLists> lists;
  std::vector<int64_t> sizes;
};

Saved unpack(AutogradContext* ctx) {
  Saved s;
  variable_list v = ctx->get_saved_variables();
  s.q = v[0];
  s.k = v[1];
  s.out = v[2];
  s.lengths = opt(v[3]);
  s.offsets = opt(v[4]);
  s.sizes = ctx->saved_data["sizes"].toIntVector();
  size_t at = 5;
  for (size_t i = 0; i < kLists; ++i) {
    s.lists[i].assign(v.begin() + at, v.begin() + at + s.sizes[i]);
    at += s.sizes[i];
  }
  s.flat.assign(v.begin() + 5, v.end());
  return s;
}

// The gradients of a backward with create_graph=True: [query, keys, every list element].
std::vector<std::optional<Tensor>> with_graph(const char* op, const Tensor& g0, const Tensor& g1, const Saved& s,
                                              const std::vector<std::string>& strs, const std::vector<double>& nums) {
  TORCH_CHECK(graph_backward != nullptr, "din_ops::", op,
              ": a backward with create_graph=True differentiates the reference computation, which needs "
              "the din_ops Python package (import din_ops)");
  std::vector<Tensor> tensors{g0, g1, s.q, s.k, undef(s.lengths), undef(s.offsets)};
  tensors.insert(tensors.end(), s.flat.begin(), s.flat.end());
  auto grads = graph_backward(op, tensors, s.sizes, strs, nums);
  TORCH_CHECK(grads.size() == 2 + s.flat.size(), "din_ops::", op, ": the graph backward returned ", grads.size(),
              " gradients, expected ", 2 + s.flat.size());
  return grads;
}

// Gradients in the order of the forward's arguments: query, keys, lengths, offsets, the list
// elements, then n_options undefined entries for the non-tensor arguments.
variable_list forward_order(const std::vector<std::optional<Tensor>>& g, size_t n_options) {
  variable_list out{undef(g[0]), undef(g[1]), Tensor(), Tensor()};
  for (size_t i = 2; i < g.size(); ++i) out.push_back(undef(g[i]));
  out.resize(out.size() + n_options);
  return out;
}

// Moves the kLists parameter-gradient lists of a fused backward's result, tuple elements
// First.., onto out.
template <size_t First, typename Tuple, typename Out, size_t... I>
void append_lists(Tuple& t, Out& out, std::index_sequence<I...>) {
  (..., [&](std::vector<Tensor>& v) {
    for (Tensor& x : v) out.emplace_back(std::move(x));
  }(std::get<First + I>(t)));
}

template <size_t First, typename Tuple, typename Out>
void append_lists(Tuple& t, Out& out) {
  append_lists<First>(t, out, std::make_index_sequence<kLists>());
}

std::vector<std::optional<Tensor>> fused_order(GradTuple&& t) {
  std::vector<std::optional<Tensor>> g{std::get<0>(t), std::get<1>(t)};
  append_lists<2>(t, g);
  return g;
}

// --- attention_pooling ---------------------------------------------------------------------
using PoolingSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, TensorList, TensorList, OptList,
                                              OptList, OptList, OptList, OptList, c10::string_view,
                                              c10::string_view, double, double);
using PoolingBackwardSig = GradTuple(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                     const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                                     TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                                     TensorList, c10::string_view, c10::string_view, double, double);

const c10::TypedOperatorHandle<PoolingSig>& pooling_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("din_ops::attention_pooling", "").typed<PoolingSig>();
  return op;
}

std::tuple<Tensor, Tensor> call_pooling(const Tensor& q, const Tensor& k, const std::optional<Tensor>& lengths,
                                        const std::optional<Tensor>& offsets, const ListArgs& l,
                                        c10::string_view activation, c10::string_view normalization, double scale,
                                        double eps) {
  at::AutoDispatchBelowADInplaceOrView below;
  return pooling_op().call(q, k, lengths, offsets, l[0], l[1], OptList(l[2]), OptList(l[3]), OptList(l[4]),
                           OptList(l[5]), OptList(l[6]), activation, normalization, scale, eps);
}

struct PoolingFn : public torch::autograd::Function<PoolingFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
                               TensorList weights, TensorList biases, TensorList act_weights, TensorList norm_mean,
                               TensorList norm_var, TensorList norm_weight, TensorList norm_bias,
                               c10::string_view activation, c10::string_view normalization, double scale,
                               double eps) {
    const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
    auto [out, attn] = call_pooling(q, k, lengths, offsets, l, activation, normalization, scale, eps);
    save(ctx, q, k, attn, lengths, offsets, l);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["normalization"] = std::string(normalization);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    return {out, attn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = unpack(ctx);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::string normalization = ctx->saved_data["normalization"].toStringRef();
    const double scale = ctx->saved_data["scale"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    if (at::GradMode::is_enabled())
      return forward_order(with_graph("attention_pooling", grads[0], grads[1], s, {activation, normalization},
                                      {scale, eps}),
                           4);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("din_ops::attention_pooling_backward", "")
                               .typed<PoolingBackwardSig>();
    const Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s.q);
    const std::optional<Tensor> grad_attn = grads[1].defined() ? opt(grads[1].contiguous()) : std::nullopt;
    at::AutoDispatchBelowAutograd below;  // the fused backward's own autograd kernel only raises
    const auto& L = s.lists;
    return forward_order(fused_order(op.call(grad_out, grad_attn, s.out, s.q, s.k, s.lengths, s.offsets, L[0], L[1],
                                             L[2], L[3], L[4], L[5], L[6], activation, normalization, scale, eps)),
                         4);
  }
};

std::tuple<Tensor, Tensor> attention_pooling_autograd(
    const Tensor& q, const Tensor& k, const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
    TensorList weights, TensorList biases, OptList act_weights_, OptList norm_mean_,
    OptList norm_var_, OptList norm_weight_, OptList norm_bias_, c10::string_view activation, c10::string_view normalization,
    double scale, double eps) {
  const TensorList act_weights = or_empty(act_weights_), norm_mean = or_empty(norm_mean_), norm_var = or_empty(norm_var_),
                   norm_weight = or_empty(norm_weight_), norm_bias = or_empty(norm_bias_);
  const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
  if (!at::GradMode::is_enabled() || !any_requires_grad(q, k, l))
    return call_pooling(q, k, lengths, offsets, l, activation, normalization, scale, eps);
  auto out = PoolingFn::apply(q, k, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var, norm_weight,
                              norm_bias, activation, normalization, scale, eps);
  return {out[0], out[1]};
}

// --- attention_pooling_stats -----------------------------------------------------------------
using StatsSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                            const std::optional<Tensor>&, TensorList, TensorList, OptList, OptList,
                                            OptList, OptList, OptList, c10::string_view, double);
using StatsBackwardSig = GradTuple(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const std::optional<Tensor>&, const std::optional<Tensor>&, TensorList,
                                   TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                                   c10::string_view, double);

std::tuple<Tensor, Tensor> call_stats(const Tensor& q, const Tensor& k, const std::optional<Tensor>& lengths,
                                      const std::optional<Tensor>& offsets, const ListArgs& l,
                                      c10::string_view activation, double eps) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("din_ops::attention_pooling_stats", "").typed<StatsSig>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(q, k, lengths, offsets, l[0], l[1], OptList(l[2]), OptList(l[3]), OptList(l[4]), OptList(l[5]),
                 OptList(l[6]), activation, eps);
}

struct StatsFn : public torch::autograd::Function<StatsFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
                               TensorList weights, TensorList biases, TensorList act_weights, TensorList norm_mean,
                               TensorList norm_var, TensorList norm_weight, TensorList norm_bias,
                               c10::string_view activation, double eps) {
    const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
    auto [mean, var] = call_stats(q, k, lengths, offsets, l, activation, eps);
    save(ctx, q, k, mean, lengths, offsets, l);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["eps"] = eps;
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = unpack(ctx);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const double eps = ctx->saved_data["eps"].toDouble();
    if (at::GradMode::is_enabled())
      return forward_order(with_graph("attention_pooling_stats", grads[0], grads[1], s, {activation}, {eps}), 2);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("din_ops::attention_pooling_stats_backward", "")
                               .typed<StatsBackwardSig>();
    const Tensor gm = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s.out);
    const Tensor gv = grads[1].defined() ? grads[1].contiguous() : at::zeros_like(s.out);
    at::AutoDispatchBelowAutograd below;  // the fused backward's own autograd kernel only raises
    const auto& L = s.lists;
    return forward_order(fused_order(op.call(gm, gv, s.out, s.q, s.k, s.lengths, s.offsets, L[0], L[1], L[2], L[3],
                                             L[4], L[5], L[6], activation, eps)),
                         2);
  }
};

std::tuple<Tensor, Tensor> attention_pooling_stats_autograd(
    const Tensor& q, const Tensor& k, const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
    TensorList weights, TensorList biases, OptList act_weights_, OptList norm_mean_,
    OptList norm_var_, OptList norm_weight_, OptList norm_bias_, c10::string_view activation, double eps) {
  const TensorList act_weights = or_empty(act_weights_), norm_mean = or_empty(norm_mean_), norm_var = or_empty(norm_var_),
                   norm_weight = or_empty(norm_weight_), norm_bias = or_empty(norm_bias_);
  const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
  if (!at::GradMode::is_enabled() || !any_requires_grad(q, k, l))
    return call_stats(q, k, lengths, offsets, l, activation, eps);
  auto out = StatsFn::apply(q, k, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var, norm_weight,
                            norm_bias, activation, eps);
  return {out[0], out[1]};
}

// --- embedding_attention_pooling (section 4) -------------------------------------------------
// The tables' gradients are sparse COO tensors built from the fused backward's distinct ids and
// rows. Second-order gradients are not implemented: a backward with create_graph=True raises.
using EmbGradTuple = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                std::vector<Tensor>, std::vector<Tensor>>;
using EmbSig = std::tuple<Tensor, Tensor>(const Tensor&, TensorList, TensorList, const std::optional<Tensor>&,
                                          const std::optional<Tensor>&, at::IntArrayRef, TensorList, TensorList,
                                          OptList, OptList, OptList, OptList, OptList, c10::string_view,
                                          c10::string_view, double, double);
using EmbBackwardSig = EmbGradTuple(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                    TensorList, TensorList, const std::optional<Tensor>&,
                                    const std::optional<Tensor>&, at::IntArrayRef, TensorList, TensorList,
                                    TensorList, TensorList, TensorList, TensorList, TensorList, c10::string_view,
                                    c10::string_view, double, double);
using EmbStatsSig = std::tuple<Tensor, Tensor>(const Tensor&, TensorList, TensorList, const std::optional<Tensor>&,
                                               const std::optional<Tensor>&, at::IntArrayRef, TensorList,
                                               TensorList, OptList, OptList, OptList, OptList, OptList,
                                               c10::string_view, double);
using EmbStatsBackwardSig = EmbGradTuple(const Tensor&, const Tensor&, const Tensor&, const Tensor&, TensorList,
                                         TensorList, const std::optional<Tensor>&, const std::optional<Tensor>&,
                                         at::IntArrayRef, TensorList, TensorList, TensorList, TensorList, TensorList,
                                         TensorList, TensorList, c10::string_view, double);

// Saves query, the output the backward reads, lengths, offsets, then the tables, the ids and
// every list.
void save_emb(AutogradContext* ctx, const Tensor& q, const Tensor& out, const std::optional<Tensor>& lengths,
              const std::optional<Tensor>& offsets, TensorList tables, TensorList ids, at::IntArrayRef padding_idx,
              const ListArgs& lists) {
  variable_list saved{q, out, undef(lengths), undef(offsets)};
  saved.insert(saved.end(), tables.begin(), tables.end());
  saved.insert(saved.end(), ids.begin(), ids.end());
  std::vector<int64_t> sizes{static_cast<int64_t>(tables.size())};
  for (const TensorList& l : lists) {
    sizes.push_back(static_cast<int64_t>(l.size()));
    saved.insert(saved.end(), l.begin(), l.end());
  }
  ctx->save_for_backward(saved);
  ctx->saved_data["sizes"] = sizes;
  ctx->saved_data["padding_idx"] = padding_idx.vec();
  ctx->set_materialize_grads(false);
}

struct EmbSaved {
  Tensor q, out;
  std::optional<Tensor> lengths, offsets;
  std::vector<Tensor> tables, ids;
  std::array<std::vector<Tensor>, kLists> lists;
  std::vector<int64_t> padding_idx;
};

EmbSaved unpack_emb(AutogradContext* ctx, const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "din_ops::", op,
              ": second-order gradients are not supported (backward with create_graph=True); gather the keys "
              "with nn.Embedding and use din_ops.attention_pooling, whose higher derivatives are exact");
  EmbSaved s;
  variable_list v = ctx->get_saved_variables();
  const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
  s.q = v[0];
  s.out = v[1];
  s.lengths = opt(v[2]);
  s.offsets = opt(v[3]);
  size_t at = 4;
  const size_t F = static_cast<size_t>(sizes[0]);
  s.tables.assign(v.begin() + at, v.begin() + at + F);
  at += F;
  s.ids.assign(v.begin() + at, v.begin() + at + F);
  at += F;
  for (size_t i = 0; i < kLists; ++i) {
    s.lists[i].assign(v.begin() + at, v.begin() + at + sizes[i + 1]);
    at += sizes[i + 1];
  }
  s.padding_idx = ctx->saved_data["padding_idx"].toIntVector();
  return s;
}

// Gradients in the order of the forward's arguments: query, each table (sparse), each ids
// tensor, lengths, offsets, padding_idx, the list elements, then n_options non-tensor entries.
variable_list emb_forward_order(EmbGradTuple&& t, const EmbSaved& s, size_t n_options) {
  variable_list out{std::get<0>(t)};
  const auto& idx = std::get<1>(t);
  const auto& val = std::get<2>(t);
  for (size_t f = 0; f < s.tables.size(); ++f)
    out.push_back(at::_sparse_coo_tensor_unsafe(idx[f].unsqueeze(0), val[f], s.tables[f].sizes(),
                                                val[f].options().layout(at::kSparse), /*is_coalesced=*/true));
  out.resize(out.size() + s.ids.size() + 3);  // ids, lengths, offsets, padding_idx: none
  append_lists<3>(t, out);
  out.resize(out.size() + n_options);
  return out;
}

bool any_requires_grad(const Tensor& q, TensorList tables, const ListArgs& lists) {
  for (const Tensor& t : tables)
    if (t.requires_grad()) return true;
  return any_requires_grad(q, Tensor(), lists);
}

std::tuple<Tensor, Tensor> call_emb(const Tensor& q, TensorList tables, TensorList ids,
                                    const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
                                    at::IntArrayRef padding_idx, const ListArgs& l, c10::string_view activation,
                                    c10::string_view normalization, double scale, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ops::embedding_attention_pooling", "")
                             .typed<EmbSig>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(q, tables, ids, lengths, offsets, padding_idx, l[0], l[1], OptList(l[2]), OptList(l[3]),
                 OptList(l[4]), OptList(l[5]), OptList(l[6]), activation, normalization, scale, eps);
}

struct EmbFn : public torch::autograd::Function<EmbFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, TensorList tables, TensorList ids,
                               const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
                               at::IntArrayRef padding_idx, TensorList weights, TensorList biases,
                               TensorList act_weights, TensorList norm_mean, TensorList norm_var,
                               TensorList norm_weight, TensorList norm_bias, c10::string_view activation,
                               c10::string_view normalization, double scale, double eps) {
    const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
    auto [out, attn] = call_emb(q, tables, ids, lengths, offsets, padding_idx, l, activation, normalization, scale,
                                eps);
    save_emb(ctx, q, attn, lengths, offsets, tables, ids, padding_idx, l);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["normalization"] = std::string(normalization);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    return {out, attn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const EmbSaved s = unpack_emb(ctx, "embedding_attention_pooling");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("din_ops::embedding_attention_pooling_backward", "")
                               .typed<EmbBackwardSig>();
    const Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s.q);
    const std::optional<Tensor> grad_attn = grads[1].defined() ? opt(grads[1].contiguous()) : std::nullopt;
    at::AutoDispatchBelowAutograd below;  // the fused backward's own autograd kernel only raises
    const auto& L = s.lists;
    return emb_forward_order(
        op.call(grad_out, grad_attn, s.out, s.q, s.tables, s.ids, s.lengths, s.offsets, s.padding_idx, L[0], L[1],
                L[2], L[3], L[4], L[5], L[6], ctx->saved_data["activation"].toStringRef(),
                ctx->saved_data["normalization"].toStringRef(), ctx->saved_data["scale"].toDouble(),
                ctx->saved_data["eps"].toDouble()),
        s, 4);
  }
};

std::tuple<Tensor, Tensor> embedding_attention_pooling_autograd(
    const Tensor& q, TensorList tables, TensorList ids, const std::optional<Tensor>& lengths,
    const std::optional<Tensor>& offsets, at::IntArrayRef padding_idx, TensorList weights, TensorList biases,
    OptList act_weights_, OptList norm_mean_, OptList norm_var_, OptList norm_weight_, OptList norm_bias_,
    c10::string_view activation, c10::string_view normalization, double scale, double eps) {
  const TensorList act_weights = or_empty(act_weights_), norm_mean = or_empty(norm_mean_), norm_var = or_empty(norm_var_),
                   norm_weight = or_empty(norm_weight_), norm_bias = or_empty(norm_bias_);
  const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
  if (!at::GradMode::is_enabled() || !any_requires_grad(q, tables, l))
    return call_emb(q, tables, ids, lengths, offsets, padding_idx, l, activation, normalization, scale, eps);
  auto out = EmbFn::apply(q, tables, ids, lengths, offsets, padding_idx, weights, biases, act_weights, norm_mean,
                          norm_var, norm_weight, norm_bias, activation, normalization, scale, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> call_emb_stats(const Tensor& q, TensorList tables, TensorList ids,
                                          const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
                                          at::IntArrayRef padding_idx, const ListArgs& l,
                                          c10::string_view activation, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ops::embedding_attention_pooling_stats", "")
                             .typed<EmbStatsSig>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(q, tables, ids, lengths, offsets, padding_idx, l[0], l[1], OptList(l[2]), OptList(l[3]),
                 OptList(l[4]), OptList(l[5]), OptList(l[6]), activation, eps);
}

struct EmbStatsFn : public torch::autograd::Function<EmbStatsFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, TensorList tables, TensorList ids,
                               const std::optional<Tensor>& lengths, const std::optional<Tensor>& offsets,
                               at::IntArrayRef padding_idx, TensorList weights, TensorList biases,
                               TensorList act_weights, TensorList norm_mean, TensorList norm_var,
                               TensorList norm_weight, TensorList norm_bias, c10::string_view activation,
                               double eps) {
    const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
    auto [mean, var] = call_emb_stats(q, tables, ids, lengths, offsets, padding_idx, l, activation, eps);
    save_emb(ctx, q, mean, lengths, offsets, tables, ids, padding_idx, l);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["eps"] = eps;
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const EmbSaved s = unpack_emb(ctx, "embedding_attention_pooling_stats");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("din_ops::embedding_attention_pooling_stats_backward", "")
                               .typed<EmbStatsBackwardSig>();
    const Tensor gm = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s.out);
    const Tensor gv = grads[1].defined() ? grads[1].contiguous() : at::zeros_like(s.out);
    at::AutoDispatchBelowAutograd below;
    const auto& L = s.lists;
    return emb_forward_order(op.call(gm, gv, s.out, s.q, s.tables, s.ids, s.lengths, s.offsets, s.padding_idx, L[0],
                                     L[1], L[2], L[3], L[4], L[5], L[6], ctx->saved_data["activation"].toStringRef(),
                                     ctx->saved_data["eps"].toDouble()),
                             s, 2);
  }
};

std::tuple<Tensor, Tensor> embedding_attention_pooling_stats_autograd(
    const Tensor& q, TensorList tables, TensorList ids, const std::optional<Tensor>& lengths,
    const std::optional<Tensor>& offsets, at::IntArrayRef padding_idx, TensorList weights, TensorList biases,
    OptList act_weights_, OptList norm_mean_, OptList norm_var_, OptList norm_weight_, OptList norm_bias_,
    c10::string_view activation, double eps) {
  const TensorList act_weights = or_empty(act_weights_), norm_mean = or_empty(norm_mean_), norm_var = or_empty(norm_var_),
                   norm_weight = or_empty(norm_weight_), norm_bias = or_empty(norm_bias_);
  const ListArgs l{weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias};
  if (!at::GradMode::is_enabled() || !any_requires_grad(q, tables, l))
    return call_emb_stats(q, tables, ids, lengths, offsets, padding_idx, l, activation, eps);
  auto out = EmbStatsFn::apply(q, tables, ids, lengths, offsets, padding_idx, weights, biases, act_weights, norm_mean,
                               norm_var, norm_weight, norm_bias, activation, eps);
  return {out[0], out[1]};
}

}  // namespace

void set_graph_backward(GraphBackward fn) { graph_backward = fn; }

TORCH_LIBRARY_IMPL(din_ops, Autograd, m) {
  m.impl("attention_pooling", &attention_pooling_autograd);
  m.impl("attention_pooling_stats", &attention_pooling_stats_autograd);
  m.impl("embedding_attention_pooling", &embedding_attention_pooling_autograd);
  m.impl("embedding_attention_pooling_stats", &embedding_attention_pooling_stats_autograd);
}

}  // namespace din_ops
