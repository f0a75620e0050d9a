#pragma once

// The affine map every peft forward uses for frozen and trainable linear layers.

#include <ATen/ops/linear.h>
#include <torch/nn/modules/linear.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

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

/// The autograd function behind frozen_split_linear().
struct FrozenSplitLinear : torch::autograd::Function<FrozenSplitLinear> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const torch::Tensor& x, const torch::Tensor& weight,
                                                const torch::Tensor& bias, int64_t chunks) {
    const int64_t rows = weight.size(0) / chunks;
    torch::autograd::variable_list out;
    for (int64_t i = 0; i < chunks; ++i) {
      out.push_back(linear(x, weight.narrow(0, i * rows, rows),
                           bias.defined() ? bias.narrow(0, i * rows, rows) : torch::Tensor()));
    }
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["chunks"] = chunks;
    ctx->saved_data["input_sizes"] = x.sizes().vec();
    ctx->saved_data["input_dtype"] = x.scalar_type();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto weight = ctx->saved_data["weight"].toTensor();
    const int64_t chunks = ctx->saved_data["chunks"].toInt();
    const auto sizes = ctx->saved_data["input_sizes"].toIntVector();
    const int64_t rows = weight.size(0) / chunks;
    torch::Tensor grad;
    for (int64_t i = 0; i < chunks; ++i) {
      if (!grads[i].defined()) continue;
      // Under autocast the forward ran in the autocast type; so do the gradients.
      const auto g = grads[i].reshape({-1, rows});
      const auto w = weight.narrow(0, i * rows, rows).to(g.scalar_type());
      if (grad.defined()) {
        grad.addmm_(g, w);
      } else {
        grad = g.mm(w);
      }
    }
    if (grad.defined()) grad = grad.view(sizes).to(ctx->saved_data["input_dtype"].toScalarType());
    return {grad, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

/// x W_i^T + b_i for the `chunks` equal row blocks W_i, b_i of a frozen packed weight and bias
/// (attention's in_proj_weight [3E, E] gives q, k and v), as separate contiguous tensors.
///
/// The same values as linear(x, weight, bias).chunk(chunks, -1), but in training that way keeps
/// the whole packed product alive while any one view of it is, and its backward concatenates
/// the views' gradients before one product with the weight. Here each output is its own tensor
/// (one a method replaces is freed), and the backward accumulates x's gradient, sum_i g_i W_i,
/// in one buffer. No gradient reaches the weight or the bias: use it only for frozen ones.
inline std::vector<torch::Tensor> frozen_split_linear(const torch::Tensor& x,
                                                      const torch::Tensor& weight,
                                                      const torch::Tensor& bias, int64_t chunks) {
  return FrozenSplitLinear::apply(x, weight, bias, chunks);
}

}  // namespace detail
PEFT_NAMESPACE_END
