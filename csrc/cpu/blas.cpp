// Run-time lookup of the BLAS routines libtorch links (see common.h).
#include <dlfcn.h>

#include <cstdlib>

#include "common.h"

namespace din_ops {
namespace cpu {
namespace blas {

namespace {
void* lookup(const char* name) {
  // DIN_OPS_NO_BLAS=1 forces the plain loops (used to test them).
  const char* off = std::getenv("DIN_OPS_NO_BLAS");
  if (off != nullptr && off[0] == '1') return nullptr;
  return dlsym(RTLD_DEFAULT, name);
}
}  // namespace

sgemm_t sgemm() {
  static const sgemm_t f = reinterpret_cast<sgemm_t>(lookup("sgemm_"));
  return f;
}

dgemm_t dgemm() {
  static const dgemm_t f = reinterpret_cast<dgemm_t>(lookup("dgemm_"));
  return f;
}

namespace {
using set_local_t = int (*)(int);
set_local_t set_threads_local() {
  static const set_local_t f = reinterpret_cast<set_local_t>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return f;
}
}  // namespace

SequentialGuard::SequentialGuard() {
  if (auto f = set_threads_local()) previous_ = f(1);
}

SequentialGuard::~SequentialGuard() {
  if (auto f = set_threads_local()) f(previous_);  // 0 restores the global setting
}

}  // namespace blas
}  // namespace cpu
}  // namespace din_ops
