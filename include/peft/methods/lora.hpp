#pragma once

// LoRA (Hu et al., 2021): a frozen projection W gets a trainable low-rank update,
// y = W x + b + (alpha / r) * B A dropout(x), with A [r, in] and B [out, r]; B starts at zero so a
// new adapter changes nothing. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead.

#include <torch/arg.h>
#include <torch/nn/functional/embedding.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <cstdint>
#include <string>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>

PEFT_NAMESPACE_BEGIN

/// How LoRA's A matrix starts (B always starts at zero).
enum class LoRAInit {
  KaimingUniform,  ///< A ~ kaiming_uniform(a = sqrt(5)), as torch::nn::Linear and Hugging Face
  Gaussian,        ///< A ~ N(0, 1/r)
};

/// Options of LoRA. Default targets: the attention query and value projections.
struct LoRAOptions : TargetOptions<LoRAOptions> {
  explicit LoRAOptions(int64_t r = 8) : TargetOptions({"query", "value"}), r_(r) {}
  /// Rank of the update.
  TORCH_ARG(int64_t, r);
  /// Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
  TORCH_ARG(double, alpha) = 8.0;
  /// Dropout on the input of A during training.
  TORCH_ARG(double, dropout) = 0.0;
  /// Rank-stabilised scaling alpha / sqrt(r).
  TORCH_ARG(bool, rslora) = false;
  TORCH_ARG(LoRAInit, init) = LoRAInit::KaimingUniform;

 public:
  static constexpr const char* method = "lora";
  static bool fits(const SiteImpl& site) {
    return site.kind() == SiteKind::Linear || site.kind() == SiteKind::Embedding;
  }
  void validate() const {
    check(r_ > 0, method, "rank must be positive, got r={}", r_);
    check(alpha_ > 0, method, "alpha must be positive, got alpha={}", alpha_);
    check(dropout_ >= 0 && dropout_ < 1, method, "dropout must be in [0, 1), got dropout={}",
          dropout_);
  }
  /// The factor the low-rank product is multiplied by.
  double scaling() const {
    return rslora_ ? alpha_ / std::sqrt(static_cast<double>(r_)) : alpha_ / static_cast<double>(r_);
  }
};

/// One LoRA update at one Linear or Embedding site. Parameter names follow Hugging Face PEFT:
/// `lora_A.weight` [r, in] and `lora_B.weight` [out, r] on projections; `lora_embedding_A`
/// [r, vocab] and `lora_embedding_B` [dim, r] on embeddings.
class LoRAImpl : public MethodImpl {
 public:
  LoRAImpl(const SiteImpl& site, const LoRAOptions& options)
      : MethodImpl("lora", options.adapter_name()),
        options_(options),
        embedding_(site.kind() == SiteKind::Embedding),
        scaling_(options.scaling()) {
    options.validate();
    const int64_t r = options.r(), in = site.in_features(), out = site.out_features();
    if (embedding_) {
      // Hugging Face's embedding convention: A starts at zero, B random.
      lora_embedding_A = register_parameter("lora_embedding_A", torch::zeros({r, in}));
      lora_embedding_B = register_parameter("lora_embedding_B", torch::randn({out, r}));
    } else {
      lora_A =
          register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in, r).bias(false)));
      lora_B = register_module("lora_B",
                               torch::nn::Linear(torch::nn::LinearOptions(r, out).bias(false)));
      torch::NoGradGuard no_grad;
      if (options.init() == LoRAInit::Gaussian) {
        lora_A->weight.normal_(0.0, 1.0 / static_cast<double>(r));
      }
      lora_B->weight.zero_();
    }
    if (options.dropout() > 0) {
      dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
    }
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    if (embedding_) {
      auto after_a = torch::nn::functional::embedding(input, lora_embedding_A.t());
      return output + torch::matmul(after_a, lora_embedding_B.t()) * scaling_;
    }
    auto x = dropout ? dropout->forward(input) : input;
    return output + lora_B->forward(lora_A->forward(x)) * scaling_;
  }

  bool can_merge() const override { return true; }

  torch::Tensor delta_weight() override {
    if (embedding_) return torch::matmul(lora_embedding_B, lora_embedding_A).t() * scaling_;
    return torch::matmul(lora_B->weight, lora_A->weight) * scaling_;
  }

  const LoRAOptions& options() const { return options_; }
  double scaling() const { return scaling_; }
  bool on_embedding() const { return embedding_; }

  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
  torch::Tensor lora_embedding_A, lora_embedding_B;
  torch::nn::Dropout dropout{nullptr};

 private:
  LoRAOptions options_;
  bool embedding_;
  double scaling_;
};
PEFT_NAMESPACE_END
