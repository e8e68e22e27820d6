// The Python extension module. Importing din_ops._C loads this library, whose static
// initializers register the operators (din_ops.cpp and the kernels) with the dispatcher.
#include <torch/extension.h>

#include <atomic>
#include <limits>
#include <mutex>

#include "autograd.h"
#include "cpu/attention_pooling.h"
#include "cpu/embedding_attention_pooling.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// The Python function din_ops/_library.py installs for backwards with create_graph=True. Never
// destroyed: autograd may still hold din_ops nodes while the interpreter shuts down.
py::object* graph_backward_fn = nullptr;

std::vector<std::optional<at::Tensor>> call_graph_backward(const std::string& op, const std::vector<at::Tensor>& tensors,
                                                           const std::vector<int64_t>& list_sizes,
                                                           const std::vector<std::string>& strs,
                                                           const std::vector<double>& nums) {
  py::gil_scoped_acquire gil;
  return (*graph_backward_fn)(op, tensors, list_sizes, strs, nums).cast<std::vector<std::optional<at::Tensor>>>();
}

// One pass over an int32/int64 CPU tensor for the host-side value checks of lengths, offsets and
// ids (two reductions and two reads back cost more than a small call's kernel).
template <typename I, typename Fn>
void for_chunks(const at::Tensor& t, Fn&& fn) {
  const I* p = t.data_ptr<I>();
  at::parallel_for(0, t.numel(), int64_t{1} << 16, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

std::pair<int64_t, int64_t> int_range(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong) && t.numel() > 0,
              "_int_range: a non-empty int32/int64 CPU tensor expected");
  const at::Tensor c = t.contiguous();
  std::mutex mu;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "_int_range", [&] {
    for_chunks<index_t>(c, [&](const index_t* p, int64_t b, int64_t e) {
      index_t l = p[b], h = p[b];
      for (int64_t i = b; i < e; ++i) {
        l = std::min(l, p[i]);
        h = std::max(h, p[i]);
      }
      std::lock_guard<std::mutex> g(mu);
      lo = std::min<int64_t>(lo, l);
      hi = std::max<int64_t>(hi, h);
    });
  });
  return {lo, hi};
}

// (offsets[0], offsets[-1], whether offsets never decrease)
std::tuple<int64_t, int64_t, bool> offsets_summary(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong) && t.numel() > 0,
              "_offsets_summary: a non-empty int32/int64 CPU tensor expected");
  const at::Tensor c = t.contiguous();
  std::atomic<bool> ok{true};
  int64_t first = 0, last = 0;
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "_offsets_summary", [&] {
    const index_t* p = c.data_ptr<index_t>();
    first = p[0];
    last = p[c.numel() - 1];
    for_chunks<index_t>(c, [&](const index_t* q, int64_t b, int64_t e) {
      bool good = true;
      for (int64_t i = std::max<int64_t>(b, 1); i < e; ++i) good &= q[i] >= q[i - 1];
      if (!good) ok = false;
    });
  });
  return {first, last, ok.load()};
}

// Whether the arguments of din_ops.attention_pooling pass every check of
// din_ops/ops/attention_pooling.py (check_attention_pooling_args and the value checks of lengths
// and offsets), for the activations without parameters of their own (sigmoid, relu, identity).
// The public function asks this first and runs its Python checks only when it says no, so
// errors keep their messages; a small call's checks cost more in Python than its kernel. It
// must never accept what the Python checks refuse: any doubt is a no.
bool is_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

bool plain(const at::Tensor& t, int64_t dims, at::ScalarType dt, const at::Device& dev) {
  return t.defined() && t.layout() == at::kStrided && t.dim() == dims && t.scalar_type() == dt && t.device() == dev;
}

bool index_tensor(const at::Tensor& t, const at::Device& dev) {
  return t.layout() == at::kStrided && t.dim() == 1 && t.device() == dev &&
         (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong);
}

bool attention_args_ok(const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
                       const std::optional<at::Tensor>& offsets, const std::vector<at::Tensor>& weights,
                       const std::vector<at::Tensor>& biases, const std::string& activation,
                       const std::string& normalization) {
  if (activation != "sigmoid" && activation != "relu" && activation != "identity") return false;
  if (normalization != "none" && normalization != "softmax") return false;
  if (query.layout() != at::kStrided || (query.dim() != 2 && query.dim() != 3) || !is_float(query.scalar_type()))
    return false;
  const auto dt = query.scalar_type();
  const at::Device dev = query.device();
  if (!dev.is_cpu()) return false;  // the value checks read the host
  const int64_t B = query.size(0), D = query.size(-1);
  if (keys.layout() != at::kStrided || keys.scalar_type() != dt || keys.device() != dev) return false;
  if (keys.dim() == 3) {
    if (offsets.has_value() || keys.size(0) != B || keys.size(2) != D) return false;
    if (lengths.has_value()) {
      const at::Tensor& l = *lengths;
      if (!index_tensor(l, dev) || l.size(0) != B) return false;
      if (B > 0) {
        const auto [lo, hi] = int_range(l);
        if (lo < 0 || hi > keys.size(1)) return false;
      }
    }
  } else if (keys.dim() == 2) {
    if (!offsets.has_value() || lengths.has_value() || keys.size(1) != D) return false;
    const at::Tensor& o = *offsets;
    if (!index_tensor(o, dev) || o.size(0) != B + 1) return false;
    const auto [first, last, monotone] = offsets_summary(o);
    if (first != 0 || last != keys.size(0) || !monotone) return false;
  } else {
    return false;
  }
  const size_t L = weights.size();
  if (L == 0 || biases.size() != L || L - 1 > 8) return false;
  int64_t fan_in = 4 * D;
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& b = biases[i];
    if (!plain(w, 2, dt, dev) || !plain(b, 1, dt, dev)) return false;
    const int64_t out = w.size(0);
    if (w.size(1) != fan_in || out == 0 || b.size(0) != out || (i == L - 1 && out != 1)) return false;
    fan_in = out;
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "din_ops C++ kernels (operators are reached through torch.ops.din_ops)";
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("_set_graph_backward", [](py::function fn) {
    delete graph_backward_fn;
    graph_backward_fn = new py::object(std::move(fn));
    din_ops::set_graph_backward(&call_graph_backward);
  });
  m.def("_int_range", &int_range);
  m.def("_attention_args_ok", &attention_args_ok);
  m.def("_offsets_summary", &offsets_summary);
  m.def("_set_embedding_chunk_elems", &din_ops::cpu::set_embedding_chunk_elems);
  // which unit runs attention_pooling's bf16 / fp16 products on this CPU (tests, benchmarks)
  m.def("_lowp_unit", [](const std::string& dtype) {
    TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "_lowp_unit: 'bfloat16' or 'float16'");
    return std::string(din_ops::cpu::lowp_unit_name(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf));
  });
  m.def("_vnni_pack", &din_ops::cpu::vnni_pack_for_test, "b [K, n] in brgemm's VNNI layout (tests)");
  m.attr("with_cuda") =
#ifdef DIN_OPS_WITH_CUDA
      true;
#else
      false;
#endif
}
