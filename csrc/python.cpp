// The Python extension module. Importing din_ops._C loads this library, whose static
// initializers register the operators (din_ops.cpp and the kernels) with the dispatcher.
#include <torch/extension.h>

#include "autograd.h"
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
  m.def("_set_embedding_chunk_elems", &din_ops::cpu::set_embedding_chunk_elems);
  m.attr("with_cuda") =
#ifdef DIN_OPS_WITH_CUDA
      true;
#else
      false;
#endif
}
