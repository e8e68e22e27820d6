// The CPU kernels of attention_pooling (csrc/cpu/attention_pooling.cpp) for other CPU kernels:
// embedding_attention_pooling runs them on the keys it gathers, a chunk of rows at a time.
// Arguments and results are those of the op schemas in csrc/din_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace din_ops {
namespace cpu {

// (grad_query, grad_keys, grad weights, biases, act_weights, norm_mean, norm_var, norm_weight,
// norm_bias)
using GradTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::vector<at::Tensor>>;

std::tuple<at::Tensor, at::Tensor> attention_pooling_kernel(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale,
    double eps);

GradTuple attention_pooling_backward_kernel(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& attn,
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, c10::string_view normalization, double scale,
    double eps);

std::tuple<at::Tensor, at::Tensor> attention_pooling_stats_kernel(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& offsets, at::TensorList weights, at::TensorList biases,
    at::TensorList act_weights, at::TensorList norm_mean, at::TensorList norm_var, at::TensorList norm_weight,
    at::TensorList norm_bias, c10::string_view activation, double eps);

GradTuple attention_pooling_stats_backward_kernel(
    const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& mean, const at::Tensor& query,
    const at::Tensor& keys, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& offsets,
    at::TensorList weights, at::TensorList biases, at::TensorList act_weights, at::TensorList norm_mean,
    at::TensorList norm_var, at::TensorList norm_weight, at::TensorList norm_bias, c10::string_view activation,
    double eps);

// The unit that runs attention_pooling's products for inputs of dtype dt on this CPU: "amx",
// "avx512_bf16" (bf16 through oneDNN's brgemm without AMX) or "float" (products in float).
const char* lowp_unit_name(at::ScalarType dt);
// b [K, n] (K even, n <= 64) in brgemm's VNNI layout [K / 2, 64, 2]: ours (own), or torch's
// where it packs (AMX); the tests compare the two
at::Tensor vnni_pack_for_test(const at::Tensor& b, bool own);

}  // namespace cpu
}  // namespace din_ops
