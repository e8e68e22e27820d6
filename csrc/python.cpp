// The Python extension module. Importing din_ops._C loads this library, whose static
// initializers register the operators (din_ops.cpp and the kernels) with the dispatcher.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "din_ops C++ kernels (operators are reached through torch.ops.din_ops)";
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.attr("with_cuda") =
#ifdef DIN_OPS_WITH_CUDA
      true;
#else
      false;
#endif
}
