// The autograd kernels of the din_ops operators whose backward is a fused kernel
// (csrc/autograd.cpp). A backward that runs with create_graph=True needs gradients that carry a
// graph; it hands over to a function that differentiates the reference computation (installed
// from Python by din_ops/ops/*.py through din_ops._C; without it such a backward raises).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace din_ops {

// op: the operator's name ("attention_pooling", "attention_pooling_stats");
// tensors: the output gradients (undefined: none flows), then the op's tensor inputs with each
// list flattened and its length in list_sizes; strs, nums: the op's string and float options.
// Returns the gradients of the op's differentiable tensor inputs in the same order (query,
// keys, then every list element); nullopt where no gradient flows.
using GraphBackward = std::vector<std::optional<at::Tensor>> (*)(
    const std::string& op, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& list_sizes,
    const std::vector<std::string>& strs, const std::vector<double>& nums);

void set_graph_backward(GraphBackward fn);

}  // namespace din_ops
