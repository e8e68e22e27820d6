// Calls din_ops' operators from C++ through the dispatcher, with no Python, and checks
// din_ops::attention_pooling against the DIN formula written out with plain loops.
//
//   din_ops_run PATH/libdin_ops.so   loads the library with dlopen
//   din_ops_run_linked               the library is linked (CMake target din_ops)
//
// Prints "ok" and exits 0 when every check passes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

constexpr int64_t B = 3, T = 4, D = 5, H = 6;
const std::vector<int64_t> kLengths = {4, 0, 2};  // the empty middle row must pool to 0
constexpr double kTol = 1e-5;

// Deterministic values in about [-1, 1], distinct per tensor (no RNG: identical on every libtorch).
std::vector<double> values(int64_t n, double seed) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = std::sin(seed + 0.731 * static_cast<double>(i)) * std::cos(0.37 * seed * i);
  return v;
}

at::Tensor tensor(const std::vector<double>& v, at::IntArrayRef shape, at::ScalarType dtype) {
  return at::tensor(v, at::kDouble).reshape(shape).to(dtype);
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

double max_abs_diff(const at::Tensor& got, const std::vector<double>& want) {
  const at::Tensor g = got.to(at::kDouble).contiguous().reshape({-1});
  if (g.numel() != static_cast<int64_t>(want.size())) return INFINITY;
  double err = 0;
  for (int64_t i = 0; i < g.numel(); ++i) err = std::max(err, std::abs(g.data_ptr<double>()[i] - want[i]));
  return err;
}

// out[b] = sum_{t < len[b]} a(q_b, k_bt) k_bt with a = W1 sigmoid(W0 [q, k, q-k, q*k] + b0) + b1.
bool check_attention_pooling(const c10::OperatorHandle& op, at::ScalarType dtype) {
  const auto q = values(B * D, 1.0), k = values(B * T * D, 2.0);
  const auto w0 = values(H * 4 * D, 3.0), b0 = values(H, 4.0), w1 = values(H, 5.0), b1 = values(1, 6.0);

  std::vector<double> want_out(B * D, 0.0), want_attn(B * T, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < kLengths[b]; ++t) {
      std::vector<double> x(4 * D);
      for (int64_t d = 0; d < D; ++d) {
        const double qd = q[b * D + d], kd = k[(b * T + t) * D + d];
        x[d] = qd;
        x[D + d] = kd;
        x[2 * D + d] = qd - kd;
        x[3 * D + d] = qd * kd;
      }
      double s = b1[0];
      for (int64_t h = 0; h < H; ++h) {
        double z = b0[h];
        for (int64_t i = 0; i < 4 * D; ++i) z += w0[h * 4 * D + i] * x[i];
        s += w1[h] * sigmoid(z);
      }
      want_attn[b * T + t] = s;
      for (int64_t d = 0; d < D; ++d) want_out[b * D + d] += s * k[(b * T + t) * D + d];
    }
  }

  const auto lengths = at::tensor(kLengths, at::kLong);
  const auto list = [](std::vector<at::Tensor> v) { return c10::IValue(c10::List<at::Tensor>(std::move(v))); };
  const auto none = list({});
  std::vector<c10::IValue> stack = {
      tensor(q, {B, D}, dtype),
      tensor(k, {B, T, D}, dtype),
      lengths,
      c10::IValue(),  // offsets: padded layout
      list({tensor(w0, {H, 4 * D}, dtype), tensor(w1, {1, H}, dtype)}),
      list({tensor(b0, {H}, dtype), tensor(b1, {1}, dtype)}),
      none,  // act_weights (sigmoid has none)
      none, none, none, none,  // Dice normalization state
      std::string("sigmoid"),
      std::string("none"),
      1.0,   // scale
      1e-8,  // eps
  };
  op.callBoxed(&stack);
  if (stack.size() != 2) {
    std::printf("attention_pooling returned %zu values, expected 2\n", stack.size());
    return false;
  }
  const at::Tensor out = stack[0].toTensor(), attn = stack[1].toTensor();
  const double err_out = max_abs_diff(out, want_out), err_attn = max_abs_diff(attn, want_attn);
  const bool ok = out.sizes() == at::IntArrayRef{B, D} && attn.sizes() == at::IntArrayRef{B, T} &&
                  out.scalar_type() == dtype && err_out < kTol && err_attn < kTol;
  std::printf("attention_pooling %s: max abs error out %.3g, attn %.3g%s\n", c10::toString(dtype), err_out,
              err_attn, ok ? "" : "  FAILED");
  return ok;
}

// Training-mode Dice over x [N, C], every row valid: p = sigmoid((x - mean) / sqrt(var + eps)),
// y = p x + (1 - p) alpha x with the biased variance.
bool check_dice(const c10::OperatorHandle& op) {
  constexpr int64_t N = 5, C = 3;
  constexpr double eps = 1e-8;
  const auto x = values(N * C, 7.0), alpha = values(C, 8.0);
  std::vector<double> want(N * C);
  for (int64_t c = 0; c < C; ++c) {
    double mean = 0, var = 0;
    for (int64_t n = 0; n < N; ++n) mean += x[n * C + c] / N;
    for (int64_t n = 0; n < N; ++n) var += (x[n * C + c] - mean) * (x[n * C + c] - mean) / N;
    for (int64_t n = 0; n < N; ++n) {
      const double s = x[n * C + c], p = sigmoid((s - mean) / std::sqrt(var + eps));
      want[n * C + c] = p * s + (1 - p) * alpha[c] * s;
    }
  }
  std::vector<c10::IValue> stack = {
      tensor(x, {N, C}, at::kDouble), c10::IValue(), tensor(alpha, {C}, at::kDouble),
      c10::IValue(), c10::IValue(), c10::IValue(), c10::IValue(),  // gamma, beta, running stats
      true, eps,
  };
  op.callBoxed(&stack);
  const double err = stack.size() == 3 ? max_abs_diff(stack[0].toTensor(), want) : INFINITY;
  const bool ok = err < kTol;
  std::printf("dice Double: max abs error %.3g%s\n", err, ok ? "" : "  FAILED");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  auto& dispatcher = c10::Dispatcher::singleton();
  if (argc > 1) {
    // RTLD_GLOBAL: the kernels look up libtorch's BLAS with dlsym(RTLD_DEFAULT, ...).
    if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::printf("cannot load %s: %s\n", argv[1], dlerror());
      return 2;
    }
  }
  if (!dispatcher.findSchema({"din_ops::attention_pooling", ""}).has_value()) {
    std::printf("din_ops::attention_pooling is not registered: pass the path of libdin_ops.so, or link "
                "the library with --no-as-needed\n");
    return 2;
  }
  bool ok = true;
  try {
    const auto pool = dispatcher.findSchemaOrThrow("din_ops::attention_pooling", "");
    ok = check_attention_pooling(pool, at::kFloat) && ok;
    ok = check_attention_pooling(pool, at::kDouble) && ok;

    // The schema of dice is declared with the others; its CPU kernel may not be built yet.
    const auto dice = dispatcher.findSchema({"din_ops::dice", ""});
    if (dice.has_value() && dice->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      ok = check_dice(*dice) && ok;
    } else {
      std::printf("dice: no CPU kernel registered, skipped\n");
    }
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
