// SPEC section 4: attention_pooling over keys[p] = concat_f tables[f][ids[f][p]], CPU kernels.
//
// The keys are never stored whole. The rows are cut into chunks of about chunk_elems key
// elements; each chunk's keys are gathered into a buffer and the attention_pooling kernels run on
// it. Nothing couples rows but Dice's batch statistics, and those are merged over chunks (stats)
// or handed to each chunk with its share of the batch (stats backward), so the chunking is exact.
// The backward adds each chunk's key gradients into one row per distinct id, never building the
// dense [N, D] key gradient either. Those sums run in position order for every id, whatever the
// thread count: bitwise reproducible.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#include "attention_pooling.h"
#include "common.h"
#include "embedding_attention_pooling.h"

namespace din_ops {
namespace cpu {
namespace {

std::atomic<int64_t> chunk_elems{int64_t(1) << 21};  // keys per chunk: 8 MB in fp32

// Positions ahead whose table row is prefetched (rows of a large table are cache misses).
constexpr int64_t kAhead = 8;

using OptTensorList = std::optional<at::TensorList>;
at::TensorList or_empty(const OptTensorList& l) { return l.value_or(at::TensorList()); }

// The batch: rows, the positions they own, and the tables' columns in the key.
struct Batch {
  int64_t B = 0, C = 1, D = 0;
  int64_t T = 0;  // padded length (0 for jagged ids)
  int64_t P = 0;  // positions: B * T padded, N jagged
  bool jagged = false;
  std::vector<int64_t> start, len;  // per row: first position, valid positions
  std::vector<at::Tensor> tables, ids;  // contiguous; ids int64
  std::vector<int64_t> col, width;  // per table: first key column, D_f
  std::optional<at::Tensor> lengths, offsets;
};

Batch describe(const char* op, const at::Tensor& query, at::TensorList tables, at::TensorList ids,
               const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& offsets) {
  Batch b;
  TORCH_CHECK(query.dim() == 2 || query.dim() == 3, op, ": query must be [B, D] or [B, C, D]");
  b.B = query.size(0);
  b.C = query.dim() == 3 ? query.size(1) : 1;
  b.D = query.size(-1);
  TORCH_CHECK(!tables.empty(), op, ": tables must hold at least one table");
  TORCH_CHECK(tables.size() == ids.size(), op, ": one ids tensor per table (", tables.size(), " tables, ",
              ids.size(), " ids)");
  int64_t width = 0;
  for (size_t f = 0; f < tables.size(); ++f) {
    const at::Tensor& t = tables[f];
    TORCH_CHECK(t.dim() == 2, op, ": tables[", f, "] must be [E, D_f]");
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, ": tables[", f, "] must have query's dtype");
    TORCH_CHECK(t.device() == query.device(), op, ": tables[", f, "] must be on query's device");
    b.col.push_back(width);
    b.width.push_back(t.size(1));
    width += t.size(1);
    b.tables.push_back(t.contiguous());
  }
  TORCH_CHECK(width == b.D, op, ": the tables' widths sum to ", width, ", query has D = ", b.D);
  const at::Tensor& id0 = ids[0];
  TORCH_CHECK(id0.dim() == 1 || id0.dim() == 2, op, ": ids must be [B, T] (padded) or [N] (jagged)");
  for (size_t f = 0; f < ids.size(); ++f) {
    TORCH_CHECK(ids[f].scalar_type() == at::kLong || ids[f].scalar_type() == at::kInt, op, ": ids[", f,
                "] must be int32 or int64");
    TORCH_CHECK(ids[f].sizes() == id0.sizes(), op, ": ids[", f, "] must have the shape of ids[0]");
    b.ids.push_back(ids[f].to(at::kLong).contiguous());
  }
  b.jagged = id0.dim() == 1;
  b.start.resize(b.B);
  b.len.resize(b.B);
  if (!b.jagged) {
    TORCH_CHECK(!offsets.has_value(), op, ": offsets is for jagged ids [N]");
    TORCH_CHECK(id0.size(0) == b.B, op, ": ids must be [B, T] with B = query.size(0)");
    b.T = id0.size(1);
    b.P = b.B * b.T;
    at::Tensor l;
    if (lengths.has_value()) {
      TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == b.B, op, ": lengths must be [B]");
      l = lengths->to(at::kLong).contiguous();
      b.lengths = *lengths;
    }
    for (int64_t r = 0; r < b.B; ++r) {
      b.start[r] = r * b.T;
      b.len[r] = l.defined() ? l.data_ptr<int64_t>()[r] : b.T;
      TORCH_CHECK(b.len[r] >= 0 && b.len[r] <= b.T, op, ": lengths must lie in [0, T]");
    }
  } else {
    TORCH_CHECK(offsets.has_value(), op, ": jagged ids [N] need offsets");
    TORCH_CHECK(!lengths.has_value(), op, ": lengths is for padded ids [B, T]");
    TORCH_CHECK(offsets->dim() == 1 && offsets->size(0) == b.B + 1, op, ": offsets must be [B + 1]");
    b.P = id0.size(0);
    const at::Tensor o = offsets->to(at::kLong).contiguous();
    const int64_t* op_ = o.data_ptr<int64_t>();
    TORCH_CHECK(op_[0] == 0, op, ": offsets[0] must be 0");
    TORCH_CHECK(op_[b.B] == b.P, op, ": offsets[-1] must equal N = ids[0].numel()");
    for (int64_t r = 0; r < b.B; ++r) {
      TORCH_CHECK(op_[r + 1] >= op_[r], op, ": offsets must be non-decreasing");
      b.start[r] = op_[r];
      b.len[r] = op_[r + 1] - op_[r];
    }
    b.offsets = o;
  }
  // ids out of range at valid positions (padding positions of [B, T] ids are not read)
  for (size_t f = 0; f < b.ids.size(); ++f) {
    const int64_t* id = b.ids[f].data_ptr<int64_t>();
    const int64_t E = b.tables[f].size(0);
    bool ok = true;
    for (int64_t r = 0; r < b.B; ++r)
      for (int64_t t = 0; t < b.len[r]; ++t) {
        const int64_t v = id[b.start[r] + t];
        ok &= v >= 0 && v < E;
      }
    TORCH_CHECK(ok, op, ": ids[", f, "] holds ids outside [0, ", E, ") at valid positions");
  }
  return b;
}

// Row bounds of the chunks: whole rows, about chunk_elems key elements each (one row at least).
std::vector<int64_t> chunk_bounds(const Batch& b) {
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  const int64_t limit = chunk_elems.load();
  for (int64_t r = 0; r < b.B; ++r) {
    const int64_t n = (b.jagged ? b.len[r] : b.T) * b.D;
    if (acc > 0 && acc + n > limit) {
      bounds.push_back(r);
      acc = 0;
    }
    acc += n;
  }
  if (b.B > 0) bounds.push_back(b.B);
  if (bounds.size() == 1) bounds.push_back(0);  // B = 0: one empty chunk, for the output shapes
  return bounds;
}

// Rows per parallel task: some 16K positions, so that small batches stay on one thread (a
// parallel region costs more than copying a few thousand rows).
int64_t row_grain(const Batch& b) {
  const int64_t per_row = b.B > 0 ? std::max<int64_t>(1, (b.jagged ? b.P / b.B : b.T)) : 1;
  return std::max<int64_t>(1, (int64_t(1) << 14) / per_row);
}

// A chunk of rows [r0, r1): its gathered keys and its lengths/offsets.
struct Chunk {
  int64_t r0, r1, p0, p1;  // rows; positions [p0, p1) of the whole batch
  at::Tensor keys;
  std::optional<at::Tensor> lengths, offsets;
};

// dst + t * stride <- the row of table tab (row_bytes each) with id[t], for t < n: element
// loops for the usual widths (a memcpy call per row of 18 floats costs more than the copy).
template <typename E>
void copy_rows_as(char* dst, int64_t stride, const char* tab, int64_t row_bytes, const int64_t* id, int64_t n) {
  const int64_t w = row_bytes / static_cast<int64_t>(sizeof(E));
  for (int64_t t = 0; t < n; ++t) {
    if (t + kAhead < n) __builtin_prefetch(tab + id[t + kAhead] * row_bytes);
    const E* __restrict src = reinterpret_cast<const E*>(tab + id[t] * row_bytes);
    E* __restrict out = reinterpret_cast<E*>(dst + t * stride);
    for (int64_t k = 0; k < w; ++k) out[k] = src[k];
  }
}

void copy_rows(char* dst, int64_t stride, const char* tab, int64_t row_bytes, const int64_t* id, int64_t n,
               int64_t es) {
  if (es == 4) return copy_rows_as<uint32_t>(dst, stride, tab, row_bytes, id, n);
  if (es == 2) return copy_rows_as<uint16_t>(dst, stride, tab, row_bytes, id, n);
  if (es == 8) return copy_rows_as<uint64_t>(dst, stride, tab, row_bytes, id, n);
  for (int64_t t = 0; t < n; ++t) std::memcpy(dst + t * stride, tab + id[t] * row_bytes, row_bytes);
}

Chunk gather(const Batch& b, int64_t r0, int64_t r1) {
  Chunk c{r0, r1, 0, 0, {}, std::nullopt, std::nullopt};
  const int64_t nb = r1 - r0;
  c.p0 = r0 < b.B ? b.start[r0] : b.P;
  c.p1 = r1 < b.B ? b.start[r1] : b.P;
  const auto opts = b.tables[0].options();
  c.keys = b.jagged ? at::empty({c.p1 - c.p0, b.D}, opts) : at::empty({nb, b.T, b.D}, opts);
  const int64_t es = c.keys.element_size(), D = b.D;
  char* out = static_cast<char*>(c.keys.data_ptr());
  at::parallel_for(r0, r1, row_grain(b), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = b.len[r];
      char* row = out + (b.start[r] - c.p0) * D * es;
      for (size_t f = 0; f < b.tables.size(); ++f) {
        const int64_t* id = b.ids[f].data_ptr<int64_t>() + b.start[r];
        const char* tab = static_cast<const char*>(b.tables[f].data_ptr());
        const int64_t w = b.width[f] * es, col = b.col[f] * es;
        copy_rows(row + col, D * es, tab, w, id, n, es);
      }
      // padding: never read by the kernels, zeroed so the buffer holds no stale values
      if (!b.jagged) std::memset(row + n * D * es, 0, (b.T - n) * D * es);
    }
  });
  if (b.jagged) {
    c.offsets = b.offsets->narrow(0, r0, nb + 1) - c.p0;
  } else if (b.lengths.has_value()) {
    c.lengths = b.lengths->narrow(0, r0, nb);
  }
  return c;
}

// The attention weights of a chunk's rows within the whole batch's ([B, (C,) T] or [N, (C)]).
at::Tensor attn_rows(const Batch& b, const at::Tensor& attn, const Chunk& c) {
  return b.jagged ? attn.narrow(0, c.p0, c.p1 - c.p0) : attn.narrow(0, c.r0, c.r1 - c.r0);
}

int64_t valid_pairs(const Batch& b, int64_t r0, int64_t r1) {
  int64_t n = 0;
  for (int64_t r = r0; r < r1; ++r) n += b.len[r];
  return n * b.C;
}

// ---------------------------------------------------------------------------------------------
// forward and stats

std::tuple<at::Tensor, at::Tensor> forward_op(
    const at::Tensor& query, at::TensorList tables, at::TensorList ids, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::IntArrayRef padding_idx, at::TensorList weights,
    at::TensorList biases,
    OptTensorList act_weights, OptTensorList norm_mean, OptTensorList norm_var, OptTensorList norm_weight,
    OptTensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale,
    double eps) {
  const Batch b = describe("embedding_attention_pooling", query, tables, ids, lengths, offsets);
  const auto bounds = chunk_bounds(b);
  at::Tensor out, attn;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const Chunk c = gather(b, bounds[i], bounds[i + 1]);
    auto [o, a] = attention_pooling_kernel(query.narrow(0, c.r0, c.r1 - c.r0), c.keys, c.lengths, c.offsets,
                                           weights, biases, or_empty(act_weights), or_empty(norm_mean),
                                           or_empty(norm_var), or_empty(norm_weight), or_empty(norm_bias),
                                           activation, normalization, scale, eps);
    if (bounds.size() == 2) return {o, a};
    if (i == 0) {
      out = at::empty(query.sizes(), o.options());
      auto shape = a.sizes().vec();
      shape[0] = b.jagged ? b.P : b.B;
      attn = at::empty(shape, a.options());
    }
    out.narrow(0, c.r0, c.r1 - c.r0).copy_(o);
    attn_rows(b, attn, c).copy_(a);
  }
  return {out, attn};
}

std::tuple<at::Tensor, at::Tensor> stats_op(
    const at::Tensor& query, at::TensorList tables, at::TensorList ids, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::IntArrayRef padding_idx, at::TensorList weights,
    at::TensorList biases,
    OptTensorList act_weights, OptTensorList norm_mean, OptTensorList norm_var, OptTensorList norm_weight,
    OptTensorList norm_bias, c10::string_view activation, double eps) {
  const Batch b = describe("embedding_attention_pooling_stats", query, tables, ids, lengths, offsets);
  const auto bounds = chunk_bounds(b);
  // Chan et al.'s merge of (count, mean, M2) over the chunks, in double
  at::Tensor mean_all, m2_all, first_mean;
  int64_t n = 0;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const int64_t nc = valid_pairs(b, bounds[i], bounds[i + 1]);
    if (nc == 0 && !(bounds.size() == 2)) continue;
    const Chunk c = gather(b, bounds[i], bounds[i + 1]);
    auto [m, v] = attention_pooling_stats_kernel(query.narrow(0, c.r0, c.r1 - c.r0), c.keys, c.lengths, c.offsets,
                                                 weights, biases, or_empty(act_weights), or_empty(norm_mean),
                                                 or_empty(norm_var), or_empty(norm_weight), or_empty(norm_bias),
                                                 activation, eps);
    if (bounds.size() == 2) return {m, v};
    if (!first_mean.defined()) first_mean = m;
    const at::Tensor md = m.to(at::kDouble), m2 = v.to(at::kDouble).abs() * double(nc);
    if (n == 0) {
      mean_all = md;
      m2_all = m2;
    } else {
      const double na = double(n), nb = double(nc), nt = na + nb;
      const at::Tensor delta = md - mean_all;
      mean_all = mean_all + delta * (nb / nt);
      m2_all = m2_all + m2 + delta * delta * (na * nb / nt);
    }
    n += nc;
  }
  if (n == 0) {  // no valid pair in any chunk: what the kernel gives for an empty batch
    const Chunk c = gather(b, 0, 0);
    return attention_pooling_stats_kernel(query.narrow(0, 0, 0), c.keys, c.lengths, c.offsets, weights, biases,
                                          or_empty(act_weights), or_empty(norm_mean), or_empty(norm_var),
                                          or_empty(norm_weight), or_empty(norm_bias), activation, eps);
  }
  const auto dt = first_mean.scalar_type();
  at::Tensor mean = mean_all.to(dt), var = (m2_all / double(n)).to(dt);
  if (n == 1) var = var.neg();  // one valid pair: -0.0, as the kernel marks it (see din_ops.cpp)
  // a NaN pre-activation stays NaN (M2 of a chunk with NaN is NaN)
  return {mean, var};
}

// ---------------------------------------------------------------------------------------------
// backward: per table, the distinct ids and where each position's id went

// Buffers are tensors (PyTorch's allocator) so that memory profiles see them.
struct Distinct {
  at::Tensor ids;  // int64 [U], ascending
  at::Tensor inv;  // int32 [P]: per position of the batch, the index into ids, -1 for none
};

Distinct distinct_ids(const Batch& b, size_t f, int64_t padding_idx) {
  const int64_t E = b.tables[f].size(0);
  const int64_t* id = b.ids[f].data_ptr<int64_t>();
  Distinct d;
  d.inv = at::full({b.P}, -1, at::kInt);
  int32_t* inv = d.inv.data_ptr<int32_t>();
  int64_t nvalid = 0;
  for (int64_t r = 0; r < b.B; ++r) nvalid += b.len[r];
  auto each_valid = [&](auto&& fn) {
    at::parallel_for(0, b.B, row_grain(b), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r)
        for (int64_t t = 0; t < b.len[r]; ++t) fn(b.start[r] + t);
    });
  };
  // Marking the ids present in an [E] array and numbering them in order costs a few passes
  // over 4E bytes; sorting the batch's N ids costs some N log N steps: the array for tables up
  // to a few times N log N rows.
  const int64_t log_n = 64 - __builtin_clzll(static_cast<unsigned long long>(nvalid) | 1);
  if (E <= 4096 || E <= 8 * nvalid * log_n) {
    at::Tensor slot_t = at::zeros({E}, at::kInt);
    int32_t* slot = slot_t.data_ptr<int32_t>();
    for (int64_t r = 0; r < b.B; ++r)
      for (int64_t t = 0; t < b.len[r]; ++t) slot[id[b.start[r] + t]] = 1;
    if (padding_idx >= 0 && padding_idx < E) slot[padding_idx] = 0;
    int32_t u = 0;
    for (int64_t e = 0; e < E; ++e) slot[e] = slot[e] ? u++ : -1;
    d.ids = at::empty({u}, at::kLong);
    int64_t* out = d.ids.data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e)
      if (slot[e] >= 0) out[slot[e]] = e;
    each_valid([&](int64_t p) { inv[p] = slot[id[p]]; });
    return d;
  }
  // a large table: sort the batch's ids
  at::Tensor v_t = at::empty({nvalid}, at::kLong);
  int64_t* v = v_t.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t r = 0; r < b.B; ++r)
    for (int64_t t = 0; t < b.len[r]; ++t) {
      const int64_t x = id[b.start[r] + t];
      if (x != padding_idx) v[n++] = x;
    }
  std::sort(v, v + n);
  n = std::unique(v, v + n) - v;
  d.ids = v_t.narrow(0, 0, n).clone();
  const int64_t* u = d.ids.data_ptr<int64_t>();
  each_valid([&](int64_t p) {
    const int64_t x = id[p];
    if (x == padding_idx) return;
    inv[p] = static_cast<int32_t>(std::lower_bound(u, u + n, x) - u);
  });
  return d;
}

// values[f][inv[f][p]] += table f's columns of gk[p] for the chunk's valid positions, every
// table at once. Each part owns one table's range of distinct ids (tables first: parts of
// different tables never touch the same rows) and walks the positions in order.
template <typename T>
void add_key_grads(const Batch& b, const Chunk& c, const std::vector<Distinct>& distinct, const at::Tensor& gk,
                   std::vector<at::Tensor>& values) {
  const int64_t F = static_cast<int64_t>(distinct.size()), D = b.D;
  int64_t n = 0;
  for (int64_t r = c.r0; r < c.r1; ++r) n += b.len[r];
  // parts per table: the threads shared out, one for chunks of less than 64K elements
  const int64_t per_table =
      (n * D >> 16) == 0 ? 1 : std::max<int64_t>(1, (at::get_num_threads() + F - 1) / F);
  const T* g = gk.data_ptr<T>();
  at::parallel_for(0, F * per_table, (n * D >> 16) == 0 ? F * per_table : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t part = lo; part < hi; ++part) {
      const int64_t f = part / per_table, sub = part % per_table;
      const int64_t U = distinct[f].ids.numel();
      const int64_t u0 = U * sub / per_table, u1 = U * (sub + 1) / per_table;
      if (u0 == u1) continue;
      const int64_t w = b.width[f], col = b.col[f];
      const int32_t* inv = distinct[f].inv.data_ptr<int32_t>();
      T* val = values[f].data_ptr<T>();
      for (int64_t r = c.r0; r < c.r1; ++r) {
        const int64_t local = b.start[r] - c.p0;
        const int32_t* iv = inv + b.start[r];
        for (int64_t t = 0; t < b.len[r]; ++t) {
          // the rows are scattered over the table: fetch a few positions ahead
          if (t + kAhead < b.len[r]) __builtin_prefetch(val + int64_t(iv[t + kAhead]) * w, 1);
          const int64_t u = iv[t];
          if (u < u0 || u >= u1) continue;
          const T* __restrict src = g + (local + t) * D + col;
          T* __restrict dst = val + u * w;
#pragma omp simd
          for (int64_t k = 0; k < w; ++k) dst[k] += src[k];
        }
      }
    }
  });
}

// The parameter gradients of all chunks, summed in the accumulation type.
struct GradSum {
  std::vector<std::vector<at::Tensor>> lists;  // gW, gb, ga, gmean, gvar, ggamma, gbeta
  std::vector<std::vector<at::ScalarType>> dtypes;

  void add(const GradTuple& g, at::ScalarType acc) {
    const std::vector<at::Tensor>* in[7] = {&std::get<2>(g), &std::get<3>(g), &std::get<4>(g), &std::get<5>(g),
                                            &std::get<6>(g), &std::get<7>(g), &std::get<8>(g)};
    if (lists.empty()) {
      for (auto* l : in) {
        std::vector<at::Tensor> v;
        std::vector<at::ScalarType> s;
        for (const auto& t : *l) {
          v.push_back(t.to(acc));
          s.push_back(t.scalar_type());
        }
        lists.push_back(v);
        dtypes.push_back(s);
      }
      return;
    }
    for (size_t i = 0; i < 7; ++i)
      for (size_t j = 0; j < in[i]->size(); ++j) lists[i][j].add_((*in[i])[j].to(acc));
  }

  std::vector<at::Tensor> get(size_t i) const {
    std::vector<at::Tensor> out;
    for (size_t j = 0; j < lists[i].size(); ++j) out.push_back(lists[i][j].to(dtypes[i][j]));
    return out;
  }
};

using EmbGradTuple = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Runs `chunk_backward(chunk) -> GradTuple` over the chunks and assembles the sparse gradients.
template <typename Fn>
EmbGradTuple backward_over_chunks(const char* op, const Batch& b, const at::Tensor& query,
                                  at::IntArrayRef padding_idx, Fn&& chunk_backward, bool skip_empty) {
  const size_t F = b.tables.size();
  TORCH_CHECK(padding_idx.size() == F, op, ": padding_idx must hold one entry per table (-1 for none)");
  const auto acc = acc_scalar_type(query.scalar_type());
  std::vector<Distinct> distinct;
  std::vector<at::Tensor> values;
  for (size_t f = 0; f < F; ++f) {
    distinct.push_back(distinct_ids(b, f, padding_idx[f]));
    values.push_back(at::zeros({distinct[f].ids.numel(), b.width[f]}, query.options().dtype(acc)));
  }
  const auto bounds = chunk_bounds(b);
  at::Tensor gq = at::zeros(query.sizes(), query.options());
  GradSum sums;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const bool last = i + 2 == bounds.size();
    if (skip_empty && valid_pairs(b, bounds[i], bounds[i + 1]) == 0 && !(last && sums.lists.empty())) continue;
    const Chunk c = gather(b, bounds[i], bounds[i + 1]);
    const GradTuple g = chunk_backward(c);
    gq.narrow(0, c.r0, c.r1 - c.r0).copy_(std::get<0>(g));
    const at::Tensor gk = std::get<1>(g).to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "embedding_attention_pooling_backward",
                               [&] { add_key_grads<scalar_t>(b, c, distinct, gk, values); });
    sums.add(g, acc);
  }
  std::vector<at::Tensor> indices;
  for (size_t f = 0; f < F; ++f) {
    indices.push_back(distinct[f].ids);
    values[f] = values[f].to(query.scalar_type());
  }
  return {gq, indices, values, sums.get(0), sums.get(1), sums.get(2), sums.get(3), sums.get(4), sums.get(5),
          sums.get(6)};
}

EmbGradTuple backward_op(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& attn,
                         const at::Tensor& query, at::TensorList tables, at::TensorList ids,
                         const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& offsets,
                         at::IntArrayRef padding_idx, at::TensorList weights, at::TensorList biases,
                         at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var,
                         at::TensorList norm_weight, at::TensorList norm_bias, c10::string_view activation,
                         c10::string_view normalization, double scale, double eps) {
  const char* op = "embedding_attention_pooling_backward";
  const Batch b = describe(op, query, tables, ids, lengths, offsets);
  TORCH_CHECK(grad_out.sizes() == query.sizes(), op, ": grad_out must be shaped like query");
  TORCH_CHECK(attn.size(0) == (b.jagged ? b.P : b.B), op, ": attn shape");
  const bool has_ga = grad_attn.has_value() && grad_attn->defined();
  if (has_ga) TORCH_CHECK(grad_attn->sizes() == attn.sizes(), op, ": grad_attn must be shaped like attn");
  return backward_over_chunks(op, b, query, padding_idx, [&](const Chunk& c) {
    std::optional<at::Tensor> ga;
    if (has_ga) ga = attn_rows(b, *grad_attn, c);
    const int64_t nb = c.r1 - c.r0;
    return attention_pooling_backward_kernel(grad_out.narrow(0, c.r0, nb), ga, attn_rows(b, attn, c),
                                             query.narrow(0, c.r0, nb), c.keys, c.lengths, c.offsets, weights,
                                             biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                             activation, normalization, scale, eps);
  }, false);
}

EmbGradTuple stats_backward_op(const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& mean,
                               const at::Tensor& query, at::TensorList tables, at::TensorList ids,
                               const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& offsets,
                               at::IntArrayRef padding_idx, at::TensorList weights, at::TensorList biases,
                               at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var,
                               at::TensorList norm_weight, at::TensorList norm_bias, c10::string_view activation,
                               double eps) {
  const char* op = "embedding_attention_pooling_stats_backward";
  const Batch b = describe(op, query, tables, ids, lengths, offsets);
  const int64_t n = valid_pairs(b, 0, b.B);
  // each chunk's kernel divides by its own count of valid pairs: hand it its share
  return backward_over_chunks(op, b, query, padding_idx, [&](const Chunk& c) {
    const int64_t nc = valid_pairs(b, c.r0, c.r1);
    const double share = n > 0 ? double(nc) / double(n) : 1.0;
    const int64_t nb = c.r1 - c.r0;
    return attention_pooling_stats_backward_kernel(grad_mean * share, grad_var * share, mean,
                                                   query.narrow(0, c.r0, nb), c.keys, c.lengths, c.offsets, weights,
                                                   biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                                   activation, eps);
  }, true);
}

}  // namespace

int64_t set_embedding_chunk_elems(int64_t elems) {
  TORCH_CHECK(elems > 0, "embedding_attention_pooling: the chunk size must be positive");
  return chunk_elems.exchange(elems);
}

TORCH_LIBRARY_IMPL(din_ops, CPU, m) {
  m.impl("embedding_attention_pooling", &forward_op);
  m.impl("embedding_attention_pooling_backward", &backward_op);
  m.impl("embedding_attention_pooling_stats", &stats_op);
  m.impl("embedding_attention_pooling_stats_backward", &stats_backward_op);
}

}  // namespace cpu
}  // namespace din_ops
