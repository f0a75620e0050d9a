#pragma once

// The affine map every peft forward uses for frozen and trainable linear layers.

#include <ATen/ops/linear.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <peft/config.hpp>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// x W^T + b through ATen's linear, as PyTorch's Python modules compute it. LibTorch's C++
/// `F::linear` (and so `torch::nn::Linear::forward`) only fuses the bias into the matrix
/// product for 2-D inputs: a [L, N, E] activation goes through matmul and a separate bias add.
/// at::linear folds a contiguous 3-D input into one addmm, in the forward and the backward.
inline torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias = torch::Tensor()) {
  return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
}

/// A stock Linear module's map, computed by linear() above.
inline torch::Tensor linear(const torch::Tensor& x, const torch::nn::Linear& module) {
  return linear(x, module->weight, module->bias);
}

}  // namespace detail
PEFT_NAMESPACE_END
