#pragma once

// The only header that looks at the LibTorch version. Everything that differs between
// LibTorch 1.13 and 2.x is hidden behind the names defined here.

#include <torch/version.h>
#include <torch/nn/options/transformerlayer.h>

#include <functional>
#include <type_traits>

#include <peft/config.hpp>

#define PEFT_TORCH_VERSION (TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR)

// at::scaled_dot_product_attention exists from LibTorch 2.0 on.
#if PEFT_TORCH_VERSION >= 200
#define PEFT_HAS_SDPA 1
#include <ATen/ops/scaled_dot_product_attention.h>
#else
#define PEFT_HAS_SDPA 0
#endif

PEFT_NAMESPACE_BEGIN
namespace detail {

/// The activation a stock TransformerEncoderLayer was built with, as a callable. 1.13 keeps it
/// in a c10::variant, 2.x in a std::variant; both are visited the same way.
inline std::function<torch::Tensor(const torch::Tensor&)> layer_activation(
    const torch::nn::activation_t& activation) {
  using Fn = std::function<torch::Tensor(const torch::Tensor&)>;
  auto pick = [](const auto& a) -> Fn {
    using A = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<A, torch::enumtype::kReLU>) {
      return [](const torch::Tensor& x) { return torch::relu(x); };
    } else if constexpr (std::is_same_v<A, torch::enumtype::kGELU>) {
      return [](const torch::Tensor& x) { return torch::gelu(x); };
    } else {
      return a;
    }
  };
#if PEFT_TORCH_VERSION >= 200
  return std::visit(pick, activation);
#else
  return c10::visit(pick, activation);
#endif
}

}  // namespace detail
PEFT_NAMESPACE_END
