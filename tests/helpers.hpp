#pragma once
// Shared fixtures for the core tests: small stock modules and comparisons. Each test file includes
// the library headers it tests, so that a change to one method rebuilds only the tests of it.

#include <peft/core/parameters.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <limits>
#include <string>

namespace testing {

constexpr int64_t kDim = 16;
constexpr int64_t kHeads = 2;
constexpr int64_t kFF = 32;
constexpr int64_t kLayers = 2;

inline torch::nn::TransformerEncoderLayer stock_layer(double dropout = 0.0, bool gelu = false) {
  auto options =
      torch::nn::TransformerEncoderLayerOptions(kDim, kHeads).dim_feedforward(kFF).dropout(dropout);
  if (gelu) options.activation(torch::kGELU);
  return torch::nn::TransformerEncoderLayer(options);
}

/// A stock encoder; its clones of the layer start with different weights.
inline torch::nn::TransformerEncoder stock_encoder(double dropout = 0.0, bool final_norm = false,
                                                   uint64_t seed = 1) {
  torch::manual_seed(seed);
  auto options = torch::nn::TransformerEncoderOptions(stock_layer(dropout), kLayers);
  if (final_norm) {
    options.norm(torch::nn::AnyModule(torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim}))));
  }
  return torch::nn::TransformerEncoder(options);
}

/// Largest absolute difference between two tensors of one shape.
inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  return (a - b).abs().max().item<double>();
}

/// A causal float mask [L, L] (-inf above the diagonal).
inline torch::Tensor causal_mask(int64_t L) {
  return torch::triu(torch::full({L, L}, -std::numeric_limits<float>::infinity()), 1);
}

/// A key padding mask [N, L]: sample i has its last i % 3 positions padded.
inline torch::Tensor padding_mask(int64_t N, int64_t L) {
  auto mask = torch::zeros({N, L}, torch::kBool);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = L - (i % 3); j < L; ++j) mask[i][j] = true;
  }
  return mask;
}

/// Sets every parameter of a module to random values (so LoRA B, adapter up etc. are non-zero).
inline void randomize(torch::nn::Module& module, double scale = 0.1) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) p.copy_(torch::randn_like(p) * scale);
}

/// Copies of every parameter, to check later that frozen ones did not move.
inline std::vector<torch::Tensor> snapshot(const torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (const auto& p : module.parameters()) out.push_back(p.detach().clone());
  return out;
}

/// The scale task: each sample's tokens are N(0, 1) scaled by 0.5 or 2, and the label says which.
/// Every LayerNorm of a post-norm encoder discards a token's scale, so a head on the frozen
/// encoder's pooled output barely sees it; a method acting before the first LayerNorm (inside
/// attention, on the attention output, or as extra attention context) can carry it through.
struct ScaleTask {
  torch::Tensor x;  // [L, N, E]
  torch::Tensor y;  // [N]
};

inline ScaleTask scale_task(int64_t N = 256, int64_t L = 6) {
  torch::manual_seed(5);
  auto big = torch::rand({N}) < 0.5;
  auto scale = torch::where(big, torch::full({N}, 2.0), torch::full({N}, 0.5));
  return {torch::randn({L, N, kDim}) * scale.view({1, N, 1}), big.to(torch::kLong)};
}

/// Trains `head` on the mean-pooled output of `forward` plus `extra` parameters with Adam for a
/// fixed budget, and returns the last loss.
template <class Forward>
double train_scale_task(Forward forward, std::vector<torch::Tensor> extra, int steps = 300) {
  auto task = scale_task();
  torch::manual_seed(3);
  torch::nn::Linear head(kDim, 2);
  for (auto& p : head->parameters()) extra.push_back(p);
  torch::optim::Adam opt(extra, torch::optim::AdamOptions(1e-2));
  double last = 0;
  for (int step = 0; step < steps; ++step) {
    auto out = forward(task.x);
    auto loss = torch::nn::functional::cross_entropy(head(out.mean(0)), task.y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    last = loss.template item<double>();
  }
  return last;
}

/// The head-only baseline of the scale task on the same frozen encoder.
inline double head_only_baseline() {
  auto encoder = stock_encoder();
  peft::freeze(*encoder);
  return train_scale_task([&](const torch::Tensor& x) { return encoder(x); }, {});
}

}  // namespace testing
