// SPEC section 1, CPU kernels of din_ops::attention_pooling{,_backward,_stats,_stats_backward}.
//
// Reference: din_ops/reference.py attention_pooling. The kernels never build [B, T, 4D].
// Positions of several rows are packed into tiles of up to kTile (position, candidate) pairs so
// every layer runs as GEMMs over a tile; nothing [N, H] outlives a tile (the backward
// recomputes the tile). Layer 0 takes one of two forms per tile:
//   folded, per (row, candidate): W0 [q, k, q-k, q*k] = (Wq + Wd) q + (Wk - Wd + Wp diag(q)) k,
//     D*H0 multiply-adds per position plus a per-run setup: tiles of long runs;
//   unfolded: [k, k*q] [Wk - Wd | Wp]^T + (Wq + Wd) q, one GEMM over the tile with no per-run
//     setup: tiles of short runs (kFoldMinLen), and always on the matrix unit.
//
// Work split: the forward cuts (row, candidate, position-run) units into at most kSlots ranges
// of about equal work, so one user with many candidates fills every core; the backward and the
// statistics cut at rows (a row's key gradient sums over its candidates). Small calls run
// on the calling thread. Each range owns its partial sums, reduced in range order, and the
// split depends on the data only, so results are bitwise reproducible whatever the thread count.
//
// bf16/fp16 inputs run their products in the input dtype with float accumulation through
// oneDNN's brgemm on the CPU's matrix unit (AMX), and bf16 on AMD's AVX512-BF16 too
// (use_lowp); elsewhere, and under DIN_OPS_CPU_ISA=base, in float. The compute loops live in
// attention_kernels.h, built for the baseline, AVX2 and AVX-512 and chosen at run time (cpu_isa
// in common.h). The AVX-512 and AVX2
// builds run the float products in register blocks (gemm512.h, gemm256.h), and the AVX-512 one
// takes each sigmoid MLP's hidden-layer sigmoid on the registers; the baseline calls the BLAS
// libtorch links.
#include <ATen/EmptyTensor.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <limits>
#include <string>
#include <type_traits>

#include "attention_pooling.h"
#include "common.h"

#if defined(DIN_OPS_MULTI_ISA) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace din_ops {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;   // (position, candidate) pairs per tile
constexpr int64_t kSlots = 64;   // work ranges (and gradient buffers)
// A tile whose runs average fewer positions than this takes layer 0's unfolded form.
// Measured at D=36, hidden (80, 40): the forms cost the same at runs of about 30 positions.
constexpr int64_t kFoldMinLen = 32;
// Multiply-adds a work range must hold to be worth handing to another thread.
constexpr int64_t kMinRangeWork = int64_t{1} << 20;

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

// The kernels' own CPU tensors, allocated without the dispatcher (whose cost, at a few
// microseconds for a call's handful of tensors, exceeds a small call's memory work).
at::Tensor new_empty(at::IntArrayRef shape, at::ScalarType dt) { return at::detail::empty_cpu(shape, dt); }

at::Tensor new_zeros(at::IntArrayRef shape, at::ScalarType dt) {
  at::Tensor t = at::detail::empty_cpu(shape, dt);
  if (t.numel() < (int64_t{1} << 16)) {
    std::memset(t.data_ptr(), 0, t.nbytes());
  } else {
    t.zero_();  // a parallel fill
  }
  return t;
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
    const int64_t* lp = l.defined() ? l.data_ptr<int64_t>() : nullptr;
    int64_t* __restrict start = r.start.data();
    int64_t* __restrict len = r.len.data();
    int64_t valid = 0;
    bool ok = true;
    for (int64_t b = 0; b < r.B; ++b) {
      const int64_t n = lp != nullptr ? lp[b] : T;
      ok &= n >= 0 && n <= T;
      start[b] = b * T;
      len[b] = n;
      valid += n;
    }
    if (!ok)
      for (int64_t b = 0; b < r.B; ++b)
        TORCH_CHECK(len[b] >= 0 && len[b] <= T, "attention_pooling: lengths[", b, "] = ", len[b],
                    " is outside [0, T=", T, "]");
    r.valid = valid;
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

// One layer's weight for bf16/fp16 products with float accumulation on the CPU's matrix unit
// (AMX through at::native::cpublas::brgemm, oneDNN's micro-kernels): B = W^T [K, N] in the
// input dtype, packed in VNNI blocks of kBlockN columns (brgemm takes ld_b in {16, .., 64}),
// K rounded up to even (VNNI pairs rows; the padding row is zero). Blocks of 64 columns, the
// widest: DIN's hidden widths (80, 40) then take 2 and 1 calls, whose fixed cost (the kernel
// lookup, the tile configuration) measured 5-7% of the bf16 headline inference with 32.
constexpr int64_t kBlockN = 64;
constexpr int64_t kRowsM = 32;  // brgemm is called with M rounded up to this: few distinct kernels

struct LowpLayer {
  int64_t K = 0, Kp = 0, N = 0;
  at::Tensor packed;  // [ceil(N / kBlockN), Kp, kBlockN] of the input dtype
};

// B [K, n] (row stride ld_in) into brgemm's VNNI layout [K / 2, ld_out, 2] (K even, columns
// past n zero): oneDNN's packing where torch offers it (AMX); without AMX torch packs nothing,
// and AVX512-BF16's brgemm reads the same layout, written here (own).
void vnni_pack(int64_t K, int64_t n, int64_t ld_in, int64_t ld_out, at::ScalarType dt, const uint16_t* in,
               uint16_t* out, bool own = false) {
  if (!own && at::native::cpublas::could_pack(dt)) return at::native::cpublas::pack(K, n, ld_in, ld_out, dt, dt, in, out);
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* __restrict a = in + k * ld_in;
    uint16_t* __restrict o = out + k * ld_out;
    for (int64_t j = 0; j < n; ++j) {
      o[2 * j] = a[j];
      o[2 * j + 1] = a[ld_in + j];
    }
    std::fill(o + 2 * n, o + 2 * ld_out, uint16_t(0));
  }
}

LowpLayer pack_lowp(const at::Tensor& Wt, at::ScalarType dt) {
  // Wt: [K, N] float, contiguous
  LowpLayer p;
  p.K = Wt.size(0);
  p.N = Wt.size(1);
  p.Kp = (p.K + 1) / 2 * 2;
  const int64_t nb = (p.N + kBlockN - 1) / kBlockN;
  const at::Tensor w = at::zeros({p.Kp, p.N}, Wt.options().dtype(dt));
  w.narrow(0, 0, p.K).copy_(Wt);
  p.packed = at::zeros({nb, p.Kp, kBlockN}, w.options());
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t n = std::min(kBlockN, p.N - j * kBlockN);
    vnni_pack(p.Kp, n, p.N, kBlockN, dt, static_cast<const uint16_t*>(w.data_ptr()) + j * kBlockN,
              static_cast<uint16_t*>(p.packed.data_ptr()) + j * p.Kp * kBlockN);
  }
  return p;
}

// C[M, N] += A[M, Kp] B (C = A B when !add), A in the input dtype (its padding columns zero),
// M a multiple of kRowsM.
template <typename L>
void lowp_gemm(const LowpLayer& p, int64_t M, const L* A, int64_t lda, float* C, int64_t ldc, bool add = true) {
  const L* B = p.packed.data_ptr<L>();
  for (int64_t j = 0; j * kBlockN < p.N; ++j) {
    const int64_t n = std::min(kBlockN, p.N - j * kBlockN);
    at::native::cpublas::brgemm(M, n, p.Kp, lda, kBlockN, ldc, add, A, B + j * p.Kp * kBlockN, C + j * kBlockN);
  }
}

// Whether oneDNN's brgemm runs bf16 VNNI products here (its micro-kernels for AVX512-BF16 when
// the CPU has no AMX): a one-block product, once; false where brgemm refuses (oneDNN capped
// below AVX-512 by ONEDNN_MAX_CPU_ISA).
bool brgemm_bf16_runs() {
  try {
    const std::vector<uint16_t> a(kRowsM * 2, 0x3f80), b(2 * 16, 0x3f80);  // bf16 ones
    std::vector<float> c(kRowsM * 16, 0.0f);
    at::native::cpublas::brgemm(kRowsM, 16, 2, 2, 16, 16, false, reinterpret_cast<const at::BFloat16*>(a.data()),
                                reinterpret_cast<const at::BFloat16*>(b.data()), c.data());
    at::native::cpublas::brgemm_release();
    return c[0] == 2.0f && c.back() == 2.0f;
  } catch (const c10::Error&) {
    return false;
  }
}

// Whether bf16/fp16 inputs take their products in their own dtype with float accumulation
// through oneDNN's brgemm: on AMX (where torch packs for it), and bf16 on AVX512-BF16 without
// AMX where its dot product is fast (cpu_fast_bf16_dot; weights packed by vnni_pack): on an
// AVX512-BF16 EPYC oneDNN's bf16 products measured 2.6-3x its float ones and the bf16 headline
// inference 1.2x din_ops' float products, where on an AVX512-BF16 Xeon without AMX, products on
// vdpbf16ps measured 0.55-0.66x the float path. Not under DIN_OPS_CPU_ISA=base (float products
// everywhere) or =avx512 (AVX512-BF16 off), nor with torch.backends.mkldnn disabled. fp16 has
// no float-accumulating dot product before AMX-FP16.
bool use_lowp(at::ScalarType dt) {
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  if (cpu_isa() == Isa::kBase || !at::globalContext().userEnabledMkldnn()) return false;
  if (dt == at::kHalf) return at::native::cpublas::could_pack(at::kHalf);
  static const bool bf16 = at::native::cpublas::could_pack(at::kBFloat16) || (cpu_fast_bf16_dot() && brgemm_bf16_runs());
  return bf16;
}

template <typename T>
at::ScalarType lowp_dtype(at::ScalarType dt) {
  return std::is_same_v<T, float> && use_lowp(dt) ? dt : at::ScalarType::Undefined;
}

// The MLP in the accumulation type, with layer 0 split into its folded blocks. Layers
// 0..L-1; the activation follows every layer but the last (the last is the output layer of
// the pooling head, or the layer whose pre-activation statistics the stats head wants).
template <typename T>
struct Mlp {
  int64_t D = 0, L = 0;
  std::vector<int64_t> H, fan_in;
  std::vector<at::Tensor> W, b;  // [H_l, fan_in_l], [H_l]
  // Layer 0's blocks: Wqd = Wq + Wd [H0, D] and W01 = [Wk - Wd | Wp] [H0, 2D] (the backward's;
  // the unfolded form of a tile of short runs multiplies by W01). The forward's products take
  // them transposed, WqdT [D, H0] and W01T [2D, H0], whose halves are WkdT and WpT [D, H0], as
  // they take WT[l] = W_l^T [fan_in, H_l].
  std::vector<T> Wqd, W01, WqdT, W01T;
  const T* WkdT() const { return W01T.data(); }
  const T* WpT() const { return W01T.data() + D * H[0]; }
  std::vector<std::vector<T>> WT;  // [L]; WT[0] empty
  const T* Wp = nullptr;         // column block 3 of W0, row stride 4D
  Act act = Act::Identity;
  std::vector<at::Tensor> alpha, mean, var, gamma, beta;
  std::vector<int64_t> alpha_stride;
  T eps = 0;
  int64_t maxH = 1;
  bool nonfinite = false;  // a parameter is inf or NaN (or a Dice variance + eps is not > 0)
  // bf16/fp16 products on the matrix unit (kUndefined: float products): layer 0's unfolded
  // [Wk - Wd | Wp] and every later layer with at least 16 outputs
  at::ScalarType lowp = at::ScalarType::Undefined;
  std::vector<LowpLayer> lowp_w;  // [L]; empty packed: that layer stays in float
  // The backward's input gradients dA = dZ W on the matrix unit: W_l itself packed (K = H_l),
  // layer 0 as W01 [H0, 2D]; [L] where lowp_w is, empty in forward-only calls (pack_backward).
  std::vector<LowpLayer> lowp_wb;

  const T* w(int64_t l) const { return W[l].data_ptr<T>(); }
  const T* bias(int64_t l) const { return b[l].data_ptr<T>(); }
};

// t in the accumulation type, contiguous (t itself when it already is: no dispatcher calls).
at::Tensor acc(const at::Tensor& t, at::ScalarType s) {
  return t.scalar_type() == s && t.is_contiguous() ? t : t.to(s).contiguous();
}

// dst [cols, rows] = src [rows, cols]^T, both contiguous; 4 x 4 blocks in SSE registers for float.
template <typename T>
void transpose(const T* __restrict src, int64_t rows, int64_t cols, T* __restrict dst) {
  int64_t i0 = 0;
#ifdef __SSE2__
  if constexpr (std::is_same_v<T, float>) {
    for (; i0 + 4 <= rows; i0 += 4) {
      int64_t j = 0;
      for (; j + 4 <= cols; j += 4) {
        __m128 r0 = _mm_loadu_ps(src + i0 * cols + j), r1 = _mm_loadu_ps(src + (i0 + 1) * cols + j);
        __m128 r2 = _mm_loadu_ps(src + (i0 + 2) * cols + j), r3 = _mm_loadu_ps(src + (i0 + 3) * cols + j);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _mm_storeu_ps(dst + j * rows + i0, r0);
        _mm_storeu_ps(dst + (j + 1) * rows + i0, r1);
        _mm_storeu_ps(dst + (j + 2) * rows + i0, r2);
        _mm_storeu_ps(dst + (j + 3) * rows + i0, r3);
      }
      for (; j < cols; ++j)
        for (int64_t i = i0; i < i0 + 4; ++i) dst[j * rows + i] = src[i * cols + j];
    }
  }
#endif
  for (int64_t i = i0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

// Packs the backward's weights for the matrix unit (Mlp::lowp_wb).
template <typename T>
void pack_backward(Mlp<T>& m) {
  if (m.lowp == at::ScalarType::Undefined) return;
  m.lowp_wb.resize(m.L);
  m.lowp_wb[0] = pack_lowp(at::from_blob(m.W01.data(), {m.H[0], 2 * m.D}, m.W[0].options()), m.lowp);
  for (int64_t l = 1; l < m.L; ++l)
    if (m.lowp_w[l].packed.defined()) m.lowp_wb[l] = pack_lowp(m.W[l], m.lowp);
}

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
                at::TensorList norm_bias, const std::string& activation, double eps,
                at::ScalarType lowp = at::ScalarType::Undefined) {
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
  // plain loops and transposes: this runs at every call, and a small call is otherwise mostly
  // this setup
  const int64_t H0 = m.H[0];
  const T* w0 = W0.data_ptr<T>();
  m.Wqd.resize(H0 * D);
  m.W01.resize(H0 * 2 * D);
  m.WqdT.resize(D * H0);
  m.W01T.resize(2 * D * H0);
  for (int64_t h = 0; h < H0; ++h) {
    const T* __restrict row = w0 + h * 4 * D;
    T* __restrict wqd = m.Wqd.data() + h * D;
    T* __restrict w01 = m.W01.data() + h * 2 * D;
    for (int64_t d = 0; d < D; ++d) {
      wqd[d] = row[d] + row[2 * D + d];
      w01[d] = row[D + d] - row[2 * D + d];
      w01[D + d] = row[3 * D + d];
    }
  }
  transpose(m.W01.data(), H0, 2 * D, m.W01T.data());
  transpose(m.Wqd.data(), H0, D, m.WqdT.data());
  m.WT.resize(m.L);
  for (int64_t l = 1; l < m.L; ++l) {
    m.WT[l].resize(m.fan_in[l] * m.H[l]);
    transpose(m.W[l].template data_ptr<T>(), m.H[l], m.fan_in[l], m.WT[l].data());
  }
  m.Wp = w0 + 3 * D;
  if (lowp != at::ScalarType::Undefined) {
    m.lowp = lowp;
    m.lowp_w.resize(m.L);
    const at::Tensor W01 = at::from_blob(m.W01.data(), {H0, 2 * D}, W0.options());
    m.lowp_w[0] = pack_lowp(W01.t().contiguous(), lowp);
    for (int64_t l = 1; l < m.L; ++l)
      if (m.H[l] >= 16) m.lowp_w[l] = pack_lowp(m.W[l].t().contiguous(), lowp);
  }
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

// The per-range double sums of the parameter gradients (GradLayout order). A range's buffer is
// allocated and written by its first tile, so nothing is zeroed, and a range without a tile
// has none.
struct GradParts {
  int64_t size = 0;
  std::vector<std::unique_ptr<double[]>> buf;
  GradParts(int64_t n_ranges, int64_t size) : size(size), buf(n_ranges) {}
  template <typename T>
  void add(int64_t part, const T* __restrict g) {
    if (!buf[part]) {
      buf[part].reset(new double[size]);
      double* __restrict d = buf[part].get();
      for (int64_t i = 0; i < size; ++i) d[i] = g[i];
    } else {
      double* __restrict d = buf[part].get();
      for (int64_t i = 0; i < size; ++i) d[i] += g[i];
    }
  }
};

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
// The unfolded form's buffers: X = [k, k * q] per pair [kTile, 2D], the runs' queries Qs
// [kTile, D] and terms Cs [kTile, H0], and their gradients.
// A vector whose resize leaves its elements uninitialized: every scratch buffer of a tile is
// written before it is read, and zeroing a call's workspace (some 400 KB at a tile of 256
// pairs) cost as much as a short call's arithmetic. Built with DIN_OPS_POISON_SCRATCH, new
// elements are NaN instead, so a read before the write shows in the results (tests).
template <typename T>
struct NoInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <typename U>
  NoInit(const NoInit<U>&) {}
  template <typename U>
  void construct(U* p) {
#ifdef DIN_OPS_POISON_SCRATCH
    ::new (static_cast<void*>(p)) U(std::numeric_limits<U>::quiet_NaN());
#else
    ::new (static_cast<void*>(p)) U;
#endif
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Scratch = std::vector<T, NoInit<T>>;

template <typename T>
struct Workspace {
  std::vector<Scratch<T>> Z, A;
  Scratch<T> Abc, cbc, dA0, dc0, dZ, dZprev;  // Abc: [H0, D] (backward) or [D, H0] (forward)
  Scratch<T> X, Qs, Cs, dX, dW01, dQs;
  Scratch<T> Kt;  // [rows, D]: the tile's keys widened from bf16 (the forward's float products)
  std::vector<uint16_t> Xl, Al;  // bf16/fp16 operands of the matrix unit: [kTile, Kp]
  std::vector<uint16_t> dZl;     // the backward's dZ as such an operand
  std::vector<uint16_t> dZt, Aw, Bp;  // weight gradients on the matrix unit: dZ^T, A, A packed
  // The tile's parameter gradients (GradLayout), added to the range's double sums after each
  // tile: under Dice's batch statistics they cancel to a few digits, and float sums over a whole
  // range would lose them.
  Scratch<T> g;

  T* start_grads() {
    std::fill(g.begin(), g.end(), T(0));
    return g.data();
  }
  std::vector<Segment> segs;
  int64_t M = 0;
  bool keep_nan = false;  // the tile may hold a NaN pre-activation: NaN-keeping sigmoid
  bool unfolded = false;  // layer 0 of the current tile in the unfolded form
  bool keep_x = true;     // the unfolded form keeps X in float (the backward reads it)

  // rows: the most pairs a tile of this call holds (kTile, or fewer for a small call, rounded
  // up to kRowsM for the matrix unit); backward: the buffers of tile_backward too
  Workspace(const Mlp<T>& m, int64_t rows, bool backward) {
    for (int64_t l = 0; l < m.L; ++l) {
      Z.emplace_back(rows * m.H[l]);
      A.emplace_back(l + 1 < m.L ? rows * m.H[l] : 0);
    }
    const int64_t D = m.D, H0 = m.H[0];
    Abc.resize(H0 * D);
    cbc.resize(H0);
    X.resize(rows * 2 * D);
    Qs.resize(rows * D);
    Cs.resize(rows * H0);
    if (backward) {
      dA0.resize(H0 * D);
      dc0.resize(H0);
      dZ.resize(rows * m.maxH);
      dZprev.resize(rows * m.maxH);
      dX.resize(rows * 2 * D);
      dW01.resize(H0 * 2 * D);
      dQs.resize(rows * D);
      g.resize(grad_layout(m).size);
    } else {
      keep_x = false;
      Kt.resize(rows * D);
    }
    if (m.lowp != at::ScalarType::Undefined) {
      int64_t kp = 0;
      for (const LowpLayer& p : m.lowp_w) kp = std::max(kp, p.Kp);
      Xl.assign(rows * m.lowp_w[0].Kp, 0);
      Al.assign(rows * kp, 0);
      if (backward) {
        const int64_t n = std::max(m.maxH, 2 * D), blocks = (n + kBlockN - 1) / kBlockN;
        dZl.assign(rows * ((m.maxH + 1) / 2 * 2), 0);
        dZt.assign(m.maxH * rows, 0);
        Aw.assign(rows * n, 0);
        Bp.assign(blocks * rows * kBlockN, 0);
      }
    }
  }
  ~Workspace() {
    if (!Xl.empty()) at::native::cpublas::brgemm_release();  // the thread's AMX tile state
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

// Tile rows a call needs: kTile, or all its pairs rounded up to kRowsM when fewer.
int64_t tile_rows(const Rows& r) {
  const int64_t pairs = std::max<int64_t>(r.valid * r.C, 1);
  return std::min(kTile, (pairs + kRowsM - 1) / kRowsM * kRowsM);
}

// Inputs of a kernel call in the accumulation type.
template <typename T>
struct Inputs {
  const T* q = nullptr;  // [B, C, D]
  const T* k = nullptr;  // [P, D]
  // bf16 keys as they came (fp16 when kb_half), instead of k, for the forward: they are read
  // once into the matrix unit's operands or the tile's float keys (tile_keys), and once by the
  // pooling
  const uint16_t* kb = nullptr;
  bool kb_half = false;
};

#define AP_ISA isa_base
#include "attention_kernels.h"
#undef AP_ISA

#ifdef DIN_OPS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#include "vec256.h"
#include "gemm256.h"
}  // namespace isa_avx2
#define AP_V256 1
#define AP_ISA isa_avx2
#include "attention_kernels.h"
#undef AP_ISA
#undef AP_V256
#pragma GCC pop_options
#pragma GCC push_options
// 256-bit vectors, as -march=native picks on AVX-512 Xeons: 512-bit ones measured ~6% slower here
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=256")
// AP_V512: the sigmoid of finite tiles in explicit 512-bit code (vec512.h: no division)
// GCC 12 reports its own intrinsics' _mm512_undefined_ps() sources as maybe uninitialized
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace isa_avx512 {
#include "vec512.h"
#include "vec256.h"
#include "gemm512.h"
}  // namespace isa_avx512
#define AP_V512 1
#define AP_ISA isa_avx512
#include "attention_kernels.h"
#undef AP_ISA
#undef AP_V512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// The compute loops of one instruction set, chosen once per call by cpu_isa().
template <typename T>
struct Kernels {
  decltype(&isa_base::tile_forward<T>) tile_forward;
  decltype(&isa_base::tile_backward<T>) tile_backward;
  decltype(&isa_base::pool_forward<T>) pool_forward;
  decltype(&isa_base::pool_segment<T>) pool_segment;
  decltype(&isa_base::pool_backward<T>) pool_backward;
  decltype(&isa_base::tile_moments<T>) tile_moments;
  decltype(&isa_base::stats_dz<T>) stats_dz;
  decltype(&isa_base::widen_bf16<T>) widen_bf16;
  decltype(&isa_base::narrow_bf16<T>) narrow_bf16;
};

#define AP_KERNELS(ns)                                                                       \
  Kernels<T> {                                                                               \
    ns::tile_forward<T>, ns::tile_backward<T>, ns::pool_forward<T>, ns::pool_segment<T>,   \
        ns::pool_backward<T>,                                                                \
        ns::tile_moments<T>, ns::stats_dz<T>, ns::widen_bf16<T>, ns::narrow_bf16<T>          \
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

// A run of positions [t0, t0 + n) of (row b, candidate c), n <= kTile: the unit of the work
// split. Units are in (row, candidate, position) order, so one user with many candidates, or
// one long row, still spreads over every thread, and many short rows pack into one tile.
struct Unit {
  int64_t b, c, t0, n;
};

struct Work {
  std::vector<Unit> units;
  std::vector<int64_t> row_unit;  // [B + 1]: the units of row b are [row_unit[b], row_unit[b + 1])
};

Work make_units(const Rows& r) {
  Work w;
  w.units.reserve(r.B * r.C);
  w.row_unit.resize(r.B + 1);
  for (int64_t b = 0; b < r.B; ++b) {
    w.row_unit[b] = static_cast<int64_t>(w.units.size());
    for (int64_t c = 0; c < r.C; ++c)
      for (int64_t t = 0; t < r.len[b]; t += kTile) w.units.push_back({b, c, t, std::min(kTile, r.len[b] - t)});
  }
  w.row_unit[r.B] = static_cast<int64_t>(w.units.size());
  return w;
}

// Multiply-adds of the MLP per (position, candidate) pair, folded form.
template <typename T>
int64_t pair_work(const Mlp<T>& m) {
  int64_t w = m.D * m.H[0];
  for (int64_t l = 1; l < m.L; ++l) w += m.H[l] * m.fan_in[l];
  return w;
}

// How many ranges items of the given total work are split into: kSlots at most, fewer when the
// call is small (one range runs on the calling thread).
int64_t n_parts(int64_t total_work) { return std::clamp<int64_t>(total_work / kMinRangeWork, 1, kSlots); }

// Ranges of the MLP's passes: as n_parts, and no more than one per kTile / 2 pairs, so tiles
// stay large (a tile's fixed costs, its small GEMM calls and its gradient buffer, are worth
// about 30 pairs of work; ranges of ~8 pairs made the backward at T=1 3-4x slower).
int64_t n_mlp_parts(int64_t total_work, int64_t pairs) {
  return std::clamp<int64_t>(std::min(total_work / kMinRangeWork, pairs / (kTile / 2)), 1, kSlots);
}

// Ranges of units of about equal work, cut anywhere (forward and statistics: nothing is
// accumulated per row). A run's setup is counted as kFoldMinLen / 4 positions.
template <typename T>
std::vector<int64_t> unit_ranges(const Work& w, const Mlp<T>& m) {
  std::vector<int64_t> work(w.units.size());
  int64_t total = 0;
  int64_t pairs = 0;
  for (size_t i = 0; i < w.units.size(); ++i) {
    total += work[i] = w.units[i].n + kFoldMinLen / 4;
    pairs += w.units[i].n;
  }
  return balanced_split(work, n_mlp_parts(total * pair_work(m), pairs));
}

// Ranges of rows of about equal work (backward: a row's key gradient is accumulated by all its
// candidates and runs); row range [rb, re) holds units [row_unit[rb], row_unit[re]). With Dice,
// kSlots ranges whatever the size (so one tile never mixes more rows than that gives): its
// batch-statistics gradients cancel to a few digits, and this split keeps them within the
// float32 error of eager PyTorch (tests/test_compat_deepctr_torch.py).
template <typename T>
std::vector<int64_t> row_ranges(const Rows& r, const Mlp<T>& m) {
  std::vector<int64_t> work(r.B);
  int64_t total = 0;
  for (int64_t b = 0; b < r.B; ++b) total += work[b] = r.C * (r.len[b] + kFoldMinLen / 4);
  return balanced_split(work, m.act == Act::Dice ? kSlots : n_mlp_parts(total * pair_work(m), r.valid * r.C));
}

// fn(lo, hi) over the parts [0, n): on the calling thread when there is one part or serial.
template <typename Fn>
void for_each_part(int64_t n, Fn&& fn, bool serial = false) {
  if (n == 1 || serial) {
    blas::SequentialGuard sequential;
    return fn(0, n);
  }
  at::parallel_for(0, n, 1, fn);
}

// Whether a call on rows is too small to be worth other threads (its ranges then run in order
// on the calling thread: the same ranges, so the same results).
template <typename T>
bool small_call(const Rows& r, const Mlp<T>& m) {
  return (r.valid + r.B * kFoldMinLen / 4) * r.C * pair_work(m) < 2 * kMinRangeWork;
}

// Calls fn(ws) for every tile of the units [u0, u1): their runs packed in order into tiles of
// up to kTile pairs (a unit may be cut between two tiles).
template <typename T, typename Fn>
void for_each_tile(const Work& w, int64_t u0, int64_t u1, Workspace<T>& ws, Fn&& fn) {
  ws.segs.clear();
  ws.M = 0;
  for (int64_t u = u0; u < u1; ++u) {
    const Unit& un = w.units[u];
    int64_t t = 0;
    while (t < un.n) {
      const int64_t n = std::min(un.n - t, kTile - ws.M);
      ws.segs.push_back({un.b, un.c, un.t0 + t, n, ws.M});
      ws.M += n;
      t += n;
      if (ws.M == kTile) {
        fn(ws);
        ws.segs.clear();
        ws.M = 0;
      }
    }
  }
  if (ws.M > 0) fn(ws);
  ws.segs.clear();
  ws.M = 0;
}

// ---------------------------------------------------------------------------------------------
// forward
template <typename T>
void forward_impl(const Rows& r, const Mlp<T>& m, const Inputs<T>& in, bool softmax, T scale, T* attn, T* out) {
  const Work w = make_units(r);
  const auto ranges = unit_ranges(w, m);
  const Kernels<T> K = kernels<T>();
  const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
  // Without softmax a pair is pooled in its tiles, while the keys are in cache, when one range
  // holds all its units; a pair whose units fall into two ranges (two threads) waits for the
  // second pass, as every pair does under softmax.
  std::vector<uint8_t> split;
  if (!softmax) {
    split.assign(r.B * r.C, 0);
    std::vector<int64_t> owner(r.B * r.C, -1);
    for (int64_t part = 0; part < n_ranges; ++part)
      for (int64_t u = ranges[part]; u < ranges[part + 1]; ++u) {
        const int64_t p = w.units[u].b * r.C + w.units[u].c;
        if (owner[p] >= 0 && owner[p] != part) split[p] = 1;
        owner[p] = part;
      }
  }
  for_each_part(n_ranges, [&](int64_t lo, int64_t hi) {
    Workspace<T> ws(m, tile_rows(r), false);
    std::vector<T> wt;
    for (int64_t part = lo; part < hi; ++part)
      for_each_tile(w, ranges[part], ranges[part + 1], ws, [&](Workspace<T>& wk) {
        K.tile_forward(m, r, in, wk);
        const T* s = wk.Z[m.L - 1].data();  // [M, 1]
        for (const Segment& g : wk.segs) {
          T* a = attn + r.start[g.b] * r.C + g.c * r.sC + g.t0 * r.sT;
          for (int64_t i = 0; i < g.n; ++i) a[i * r.sT] = scale * s[g.off + i];
          if (!softmax && !split[g.b * r.C + g.c]) {
            wt.resize(g.n);
            for (int64_t i = 0; i < g.n; ++i) wt[i] = scale * s[g.off + i];
            K.pool_segment(r, in, g, wt.data(), out);
          }
        }
      });
  });
  if (!softmax) {
    for (int64_t p = 0; p < r.B * r.C; ++p) {
      if (split[p]) {
        K.pool_forward(r, in, false, p, p + 1, attn, out);
      } else if (r.len[p / r.C] == 0) {
        std::fill(out + p * r.D, out + (p + 1) * r.D, T(0));  // no run pooled it
      }
    }
    return;
  }
  std::vector<int64_t> pair_len(r.B * r.C);
  int64_t total = 0;
  for (int64_t p = 0; p < r.B * r.C; ++p) total += pair_len[p] = r.len[p / r.C] + 1;
  const auto pairs = balanced_split(pair_len, n_parts(total * 4 * r.D));
  for_each_part(static_cast<int64_t>(pairs.size()) - 1, [&](int64_t lo, int64_t hi) {
    for (int64_t part = lo; part < hi; ++part) K.pool_forward(r, in, softmax, pairs[part], pairs[part + 1], attn, out);
  });
}

// Tensors in the accumulation type (no copy when already there).
struct AccInputs {
  at::Tensor q, k;
};

AccInputs acc_inputs(const at::Tensor& query, const at::Tensor& keys) {
  const auto s = acc_scalar_type(query.scalar_type());
  return {acc(query, s), acc(keys, s)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_pooling_kernel(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale,
    double eps) {
  const Rows r = describe_rows(query, keys, lengths, offsets);
  const bool softmax = parse_softmax(std::string(normalization));
  const auto acc_s = acc_scalar_type(query.scalar_type());
  // bf16 keys are read as they are: into the matrix unit's operands, or widened tile by tile
  // for float products (tile_keys), and by the pooling; no float copy of the keys. fp16 keys
  // alike where their products run in float (the matrix unit's fp16 operands read float keys).
  const bool raw_keys = acc_s == at::kFloat && (keys.scalar_type() == at::kBFloat16 ||
                                                (keys.scalar_type() == at::kHalf && !use_lowp(at::kHalf)));
  const AccInputs ai = raw_keys ? AccInputs{acc(query, acc_s), keys.contiguous()} : acc_inputs(query, keys);
  // every pair's sum is written by its pooling (forward_impl), so nothing is zeroed here
  at::Tensor out = new_empty({r.B, r.C, r.D}, acc_s);
  std::vector<int64_t> attn_shape;
  if (r.jagged) {
    attn_shape = query.dim() == 2 ? std::vector<int64_t>{r.P} : std::vector<int64_t>{r.P, r.C};
  } else {
    const int64_t T = keys.size(1);
    attn_shape = query.dim() == 2 ? std::vector<int64_t>{r.B, T} : std::vector<int64_t>{r.B, r.C, T};
  }
  at::Tensor attn = new_zeros(attn_shape, acc_s);
  AT_DISPATCH_FLOATING_TYPES(acc_s, "attention_pooling_cpu", [&] {
    const Mlp<scalar_t> m = make_mlp<scalar_t>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight,
                                               norm_bias, std::string(activation), eps,
                                 lowp_dtype<scalar_t>(query.scalar_type()));
    TORCH_CHECK(m.H[m.L - 1] == 1, "attention_pooling: the last layer must have one output");
    Inputs<scalar_t> in{ai.q.data_ptr<scalar_t>(), nullptr, nullptr};
    if (raw_keys) {
      in.kb = static_cast<const uint16_t*>(ai.k.data_ptr());
      in.kb_half = keys.scalar_type() == at::kHalf;
    } else {
      in.k = ai.k.data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(r, m, in, softmax, static_cast<scalar_t>(scale), attn.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>());
  });
  const auto dt = query.scalar_type();
  out = out.view(query.sizes());
  return {dt == acc_s ? out : out.to(dt), dt == acc_s ? attn : attn.to(dt)};
}

// ---------------------------------------------------------------------------------------------
// backward (shared by both heads)
namespace {


// Reduces the per-range buffers in range order and writes the gradient tensors. Elements are
// independent, so a large reduction runs in chunks on several threads with the same result.
template <typename T>
GradTuple finish_grads(const Mlp<T>& m, const GradLayout& lay, const GradParts& parts, at::Tensor gq,
                       at::Tensor gk, const at::Tensor& query, const at::Tensor& keys, at::TensorList weights,
                       at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_weight,
                       at::TensorList norm_bias) {
  std::vector<const double*> src;
  for (const auto& p : parts.buf)
    if (p) src.push_back(p.get());
  const auto acc_s = c10::CppTypeToScalarType<T>::value;
  struct Out {
    int64_t off;
    at::Tensor t;  // accumulation type
  };
  std::vector<Out> outs;
  auto take = [&](int64_t off, at::IntArrayRef shape) {
    outs.push_back({off, new_empty(shape, acc_s)});
    return outs.size() - 1;
  };
  std::vector<size_t> iW, ib, ia, imean, ivar, igamma, ibeta;
  for (int64_t l = 0; l < m.L; ++l) iW.push_back(take(lay.W[l], weights[l].sizes()));
  for (int64_t l = 0; l < m.L; ++l) ib.push_back(take(lay.b[l], {m.H[l]}));
  for (size_t l = 0; l < lay.alpha.size(); ++l) ia.push_back(take(lay.alpha[l], act_weights[l].sizes()));
  for (size_t l = 0; l < lay.mean.size(); ++l) {
    imean.push_back(take(lay.mean[l], {m.H[l]}));
    ivar.push_back(take(lay.var[l], {m.H[l]}));
    if (!norm_weight.empty()) igamma.push_back(take(lay.gamma[l], {m.H[l]}));
    if (!norm_bias.empty()) ibeta.push_back(take(lay.beta[l], {m.H[l]}));
  }
  // jobs of up to kChunk elements of one tensor
  constexpr int64_t kChunk = 4096;
  std::vector<std::array<int64_t, 3>> jobs;  // output, first element, end
  for (size_t o = 0; o < outs.size(); ++o)
    for (int64_t i = 0, n = outs[o].t.numel(); i < n; i += kChunk) jobs.push_back({int64_t(o), i, std::min(n, i + kChunk)});
  auto run = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const Out& o = outs[jobs[j][0]];
      T* __restrict dst = o.t.template data_ptr<T>();
      const int64_t i0 = jobs[j][1], i1 = jobs[j][2];
      if (src.empty()) {
        std::fill(dst + i0, dst + i1, T(0));
        continue;
      }
      double sum[kChunk];
      const double* __restrict s0 = src[0] + o.off;
      for (int64_t i = i0; i < i1; ++i) sum[i - i0] = s0[i];
      for (size_t p = 1; p < src.size(); ++p) {
        const double* __restrict sp = src[p] + o.off;
        for (int64_t i = i0; i < i1; ++i) sum[i - i0] += sp[i];
      }
      for (int64_t i = i0; i < i1; ++i) dst[i] = static_cast<T>(sum[i - i0]);
    }
  };
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  if (static_cast<int64_t>(src.size()) * lay.size >= (int64_t{1} << 16) && n_jobs > 1) {
    at::parallel_for(0, n_jobs, 1, run);
  } else {
    run(0, n_jobs);
  }
  const auto dt = query.scalar_type();
  auto as = [](const at::Tensor& t, at::ScalarType s) { return t.scalar_type() == s ? t : t.to(s); };
  auto pick = [&](const std::vector<size_t>& idx, at::ScalarType s) {
    std::vector<at::Tensor> v;
    for (size_t i : idx) v.push_back(as(outs[i].t, s));
    return v;
  };
  const auto st = norm_mean.empty() ? dt : norm_mean[0].scalar_type();
  return {as(gq.view(query.sizes()), dt), as(gk.view(keys.sizes()), dt), pick(iW, dt), pick(ib, dt), pick(ia, dt),
          pick(imean, st), pick(ivar, st), pick(igamma, dt), pick(ibeta, dt)};
}

}  // namespace

at::Tensor vnni_pack_for_test(const at::Tensor& b, bool own) {
  TORCH_CHECK(b.dim() == 2 && b.size(0) % 2 == 0 && b.size(1) <= kBlockN && b.element_size() == 2 && b.is_contiguous(),
              "_vnni_pack: a contiguous [K, n] bf16/fp16 tensor, K even, n <= ", kBlockN);
  TORCH_CHECK(own || at::native::cpublas::could_pack(b.scalar_type()), "_vnni_pack: torch does not pack here");
  at::Tensor out = at::zeros({b.size(0) / 2, kBlockN, 2}, b.options());
  vnni_pack(b.size(0), b.size(1), b.size(1), kBlockN, b.scalar_type(), static_cast<const uint16_t*>(b.data_ptr()),
            static_cast<uint16_t*>(out.data_ptr()), own);
  return out;
}

const char* lowp_unit_name(at::ScalarType dt) {
  return !use_lowp(dt) ? "float" : at::native::cpublas::could_pack(dt) ? "amx" : "avx512_bf16";
}

GradTuple attention_pooling_backward_kernel(
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
  // bf16 keys are widened, and their gradient rounded, one row range at a time in the range's
  // thread (a block that stays in cache while it is used), not as whole [P, D] float tensors
  const bool bf16_keys = keys.scalar_type() == at::kBFloat16 && acc_s == at::kFloat;
  const AccInputs ai = bf16_keys ? AccInputs{acc(query, acc_s), keys.contiguous()} : acc_inputs(query, keys);
  const at::Tensor go = acc(grad_out, acc_s);
  const at::Tensor w = acc(attn, acc_s);
  at::Tensor ga;
  if (grad_attn.has_value() && grad_attn->defined()) {
    TORCH_CHECK(grad_attn->numel() == r.P * r.C, "attention_pooling_backward: grad_attn shape");
    ga = acc(*grad_attn, acc_s);
  }
  at::Tensor gq = new_zeros({r.B * r.C, r.D}, acc_s);
  // every valid position is written by the pooling pass below, the padding is zeroed there
  at::Tensor gk = new_empty({r.P, r.D}, bf16_keys ? at::kBFloat16 : acc_s);
  at::Tensor ds = new_empty({r.P * r.C}, acc_s);
  GradTuple result;
  AT_DISPATCH_FLOATING_TYPES(acc_s, "attention_pooling_backward_cpu", [&] {
    using T = scalar_t;
    Mlp<T> m = make_mlp<T>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                           std::string(activation), eps, lowp_dtype<scalar_t>(query.scalar_type()));
    pack_backward(m);
    const GradLayout lay = grad_layout(m);
    const Work work = make_units(r);
    const auto ranges = row_ranges(r, m);
    const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
    GradParts parts(n_ranges, lay.size);
    const T* pw = w.data_ptr<T>();
    const T* pga = ga.defined() ? ga.data_ptr<T>() : nullptr;
    const T* pgo = go.data_ptr<T>();
    T* pds = ds.data_ptr<T>();
    T* pgq = gq.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const Kernels<T> K = kernels<T>();
    for_each_part(n_ranges, [&](int64_t lo, int64_t hi) {
      Workspace<T> ws(m, tile_rows(r), true);
      Scratch<T> kf, gkf;  // bf16 keys: the range's keys and key gradient in float
      for (int64_t part = lo; part < hi; ++part) {
        const int64_t rb = ranges[part], re = ranges[part + 1];
        if (rb == re) continue;
        Inputs<T> in{ai.q.data_ptr<T>(), nullptr};
        T* pgk = nullptr;
        // the range's key rows [p0, p1), padding included (its gradient rows are zeroed)
        const int64_t p0 = r.start[rb], p1 = r.start[re - 1] + (r.jagged ? r.len[re - 1] : r.T);
        if (bf16_keys) {
          kf.resize((p1 - p0) * r.D);
          gkf.resize((p1 - p0) * r.D);
          K.widen_bf16(reinterpret_cast<const uint16_t*>(ai.k.data_ptr<at::BFloat16>()) + p0 * r.D, (p1 - p0) * r.D,
                       kf.data());
          // indexed by position as the whole tensors are: only [p0, p1) is read or written
          in.k = kf.data() - p0 * r.D;
          pgk = gkf.data() - p0 * r.D;
        } else {
          in.k = ai.k.data_ptr<T>();
          pgk = gk.data_ptr<T>();
        }
        // Pooling and normalization: dL/ds for every valid pair, and the pooling's share of dk.
        K.pool_backward(r, in, softmax, sc, pw, pga, pgo, rb, re, pds, pgk);
        // The MLP, tile by tile.
        for_each_tile(work, work.row_unit[rb], work.row_unit[re], ws, [&](Workspace<T>& wk) {
          K.tile_forward(m, r, in, wk);
          for (const Segment& s : wk.segs) {
            const T* src = pds + r.start[s.b] * r.C + s.c * r.sC + s.t0 * r.sT;
            for (int64_t i = 0; i < s.n; ++i) wk.dZ[s.off + i] = src[i * r.sT];
          }
          K.tile_backward(m, lay, r, in, wk, wk.start_grads(), pgk, pgq);
          parts.add(part, wk.g.data());
        });
        if (bf16_keys)
          K.narrow_bf16(gkf.data(), (p1 - p0) * r.D, reinterpret_cast<uint16_t*>(gk.data_ptr<at::BFloat16>()) + p0 * r.D);
      }
    }, small_call(r, m));
    result = finish_grads<T>(m, lay, parts, gq, gk, query, keys, weights, act_weights, norm_mean, norm_weight,
                             norm_bias);
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// stats head: mean and biased variance of the last layer's pre-activation over valid pairs
std::tuple<at::Tensor, at::Tensor> attention_pooling_stats_kernel(
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
                                 std::string(activation), eps,
                                 lowp_dtype<scalar_t>(query.scalar_type()));
    const Inputs<T> in{ai.q.data_ptr<T>(), ai.k.data_ptr<T>()};
    // The tiles of the backward (row ranges): the gradient of batch statistics cancels to a few
    // digits, so it must see the very pre-activations the statistics were computed from.
    const Work work = make_units(r);
    const auto ranges = row_ranges(r, m);
    const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
    const Kernels<T> K = kernels<T>();
    // per range: count, mean[H], M2[H] (Chan et al.'s pairwise combination, in a fixed order)
    std::vector<int64_t> counts(n_ranges, 0);
    std::vector<std::vector<double>> means(n_ranges, std::vector<double>(H, 0.0)),
        m2s(n_ranges, std::vector<double>(H, 0.0));
    for_each_part(n_ranges, [&](int64_t lo, int64_t hi) {
      Workspace<T> ws(m, tile_rows(r), false);
      std::vector<double> tmean(H), tm2(H);
      for (int64_t part = lo; part < hi; ++part) {
        int64_t& n = counts[part];
        double* mu = means[part].data();
        double* m2 = m2s[part].data();
        for_each_tile(work, work.row_unit[ranges[part]], work.row_unit[ranges[part + 1]], ws, [&](Workspace<T>& wk) {
          K.tile_forward(m, r, in, wk);
          const T* z = wk.Z[m.L - 1].data();
          const int64_t M = wk.M;
          K.tile_moments(z, M, H, tmean.data(), tm2.data());
          const double na = double(n), nb = double(M), nt = na + nb;
          for (int64_t h = 0; h < H; ++h) {
            const double delta = tmean[h] - mu[h];
            mu[h] += delta * nb / nt;
            m2[h] += tm2[h] + delta * delta * na * nb / nt;
          }
          n += M;
        });
      }
    }, small_call(r, m));
    std::vector<double> dm(H, 0.0), dv(H, 0.0);
    int64_t n = 0;
    for (int64_t part = 0; part < n_ranges; ++part) {
      const int64_t nbi = counts[part];
      if (nbi == 0) continue;
      const double na = double(n), nb = double(nbi), nt = na + nb;
      for (int64_t h = 0; h < H; ++h) {
        const double delta = means[part][h] - dm[h];
        dm[h] += delta * nb / nt;
        dv[h] += m2s[part][h] + delta * delta * na * nb / nt;
      }
      n += nbi;
    }
    T* pm = mean.data_ptr<T>();
    T* pv = var.data_ptr<T>();
    for (int64_t h = 0; h < H; ++h) {
      pm[h] = T(dm[h]);
      pv[h] = n > 0 ? T(dv[h] / double(n)) : T(0);
    }
    if (n == 1)  // mark the one-valid-pair batch for the consumers' dice_rstd (NaN stays NaN)
      for (int64_t h = 0; h < H; ++h)
        if (pv[h] == T(0)) pv[h] = -T(0);
  });
  return {mean, var};
}

GradTuple attention_pooling_stats_backward_kernel(
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
    Mlp<T> m = make_mlp<T>(r.D, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                           std::string(activation), eps, lowp_dtype<scalar_t>(query.scalar_type()));
    pack_backward(m);
    const GradLayout lay = grad_layout(m);
    const Inputs<T> in{ai.q.data_ptr<T>(), ai.k.data_ptr<T>()};
    const Work work = make_units(r);
    const auto ranges = row_ranges(r, m);
    const int64_t n_ranges = static_cast<int64_t>(ranges.size()) - 1;
    const Kernels<T> K = kernels<T>();
    GradParts parts(n_ranges, lay.size);
    const T n = T(std::max<int64_t>(r.valid * r.C, 1));
    const T* pgm = gmean.data_ptr<T>();
    const T* pgv = gvar.data_ptr<T>();
    const T* pmu = mu.data_ptr<T>();
    T* pgk = gk.data_ptr<T>();
    T* pgq = gq.data_ptr<T>();
    for_each_part(n_ranges, [&](int64_t lo, int64_t hi) {
      Workspace<T> ws(m, tile_rows(r), true);
      for (int64_t part = lo; part < hi; ++part) {
        for_each_tile(work, work.row_unit[ranges[part]], work.row_unit[ranges[part + 1]], ws, [&](Workspace<T>& wk) {
          K.tile_forward(m, r, in, wk);
          K.stats_dz(wk.Z[m.L - 1].data(), wk.M, H, pgm, pgv, pmu, n, wk.dZ.data());
          K.tile_backward(m, lay, r, in, wk, wk.start_grads(), pgk, pgq);
          parts.add(part, wk.g.data());
        });
      }
    }, small_call(r, m));
    result = finish_grads<T>(m, lay, parts, gq, gk, query, keys, weights, act_weights, norm_mean, norm_weight,
                             norm_bias);
  });
  return result;
}

namespace {

// The forward ops' schemas take the lists that may be empty as Tensor[]?, None meaning empty.
using OptTensorList = std::optional<at::TensorList>;
at::TensorList or_empty(const OptTensorList& l) { return l.value_or(at::TensorList()); }

std::tuple<at::Tensor, at::Tensor> attention_pooling_op(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    OptTensorList act_weights, OptTensorList norm_mean, OptTensorList norm_var, OptTensorList norm_weight,
    OptTensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale,
    double eps) {
  return attention_pooling_kernel(query, keys, lengths, offsets, weights, biases, or_empty(act_weights),
                               or_empty(norm_mean), or_empty(norm_var), or_empty(norm_weight), or_empty(norm_bias),
                               activation, normalization, scale, eps);
}

std::tuple<at::Tensor, at::Tensor> attention_pooling_stats_op(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    OptTensorList act_weights, OptTensorList norm_mean, OptTensorList norm_var, OptTensorList norm_weight,
    OptTensorList norm_bias, c10::string_view activation, double eps) {
  return attention_pooling_stats_kernel(query, keys, lengths, offsets, weights, biases, or_empty(act_weights),
                                     or_empty(norm_mean), or_empty(norm_var), or_empty(norm_weight),
                                     or_empty(norm_bias), activation, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ops, CPU, m) {
  m.impl("attention_pooling", &attention_pooling_op);
  m.impl("attention_pooling_backward", &attention_pooling_backward_kernel);
  m.impl("attention_pooling_stats", &attention_pooling_stats_op);
  m.impl("attention_pooling_stats_backward", &attention_pooling_stats_backward_kernel);
}

}  // namespace cpu
}  // namespace din_ops
