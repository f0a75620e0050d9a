#pragma once

// Prefix tuning (Li & Liang, 2021): every selected attention gets n trainable key and value rows,
// after the projections, in front of the real ones; all queries may attend to them. With
// projection(true) the rows are produced during training by an MLP from a smaller embedding (the
// paper's reparameterisation); fold() replaces the MLP by the rows it produces, for saving and
// inference.

#include <torch/arg.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>

PEFT_NAMESPACE_BEGIN

/// Options of prefix tuning. Default targets: every attention's `prefix` site.
struct PrefixOptions : TargetOptions<PrefixOptions> {
  explicit PrefixOptions(int64_t num_virtual_tokens = 10)
      : TargetOptions({"prefix"}), num_virtual_tokens_(num_virtual_tokens) {}
  /// n: key/value rows per attention.
  TORCH_ARG(int64_t, num_virtual_tokens);
  /// Produce the rows with an MLP (embedding -> Linear -> tanh -> Linear) during training.
  TORCH_ARG(bool, projection) = false;
  /// Hidden size of that MLP.
  TORCH_ARG(int64_t, projection_hidden) = 512;
  /// Standard deviation of the initial rows (or of the MLP's input embedding).
  TORCH_ARG(double, init_std) = 0.02;

 public:
  static constexpr const char* method = "prefix";
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Attention; }
  void validate() const {
    check(num_virtual_tokens_ > 0, method, "num_virtual_tokens must be positive, got {}",
          num_virtual_tokens_);
    check(!projection_ || projection_hidden_ > 0, method,
          "projection_hidden must be positive, got {}", projection_hidden_);
    check(init_std_ >= 0, method, "init_std must not be negative, got {}", init_std_);
  }
};

/// The training-time reparameterisation of prefix rows: embedding [n, E] -> Linear -> tanh ->
/// Linear -> [n, 2E] (keys, then values).
class PrefixProjectionImpl : public torch::nn::Module {
 public:
  PrefixProjectionImpl(int64_t n, int64_t dim, int64_t hidden, double init_std)
      : torch::nn::Module("peft::PrefixProjection") {
    embedding = register_parameter("embedding", torch::randn({n, dim}) * init_std);
    dense_in = register_module("dense_in", torch::nn::Linear(dim, hidden));
    dense_out = register_module("dense_out", torch::nn::Linear(hidden, 2 * dim));
  }
  torch::Tensor forward() { return dense_out->forward(torch::tanh(dense_in->forward(embedding))); }

  torch::Tensor embedding;
  torch::nn::Linear dense_in{nullptr}, dense_out{nullptr};
};
TORCH_MODULE(PrefixProjection);

/// Prefix rows for one attention: `prefix_keys` and `prefix_values`, each [n, E], or before fold()
/// the child `projection` that produces them.
class PrefixImpl : public MethodImpl {
 public:
  PrefixImpl(const SiteImpl& site, const PrefixOptions& options)
      : MethodImpl("prefix", options.adapter_name()) {
    options.validate();
    const int64_t n = options.num_virtual_tokens(), dim = site.out_features();
    if (options.projection()) {
      projection = register_module(
          "projection", PrefixProjection(n, dim, options.projection_hidden(), options.init_std()));
    } else {
      prefix_keys = register_parameter("prefix_keys", torch::randn({n, dim}) * options.init_std());
      prefix_values =
          register_parameter("prefix_values", torch::randn({n, dim}) * options.init_std());
    }
  }

  std::pair<torch::Tensor, torch::Tensor> prefix() override {
    if (!projection) return {prefix_keys, prefix_values};
    auto kv = projection->forward().chunk(2, -1);
    return {kv[0], kv[1]};
  }

  /// Replaces the projection by the rows it currently produces (no-op without one).
  void fold() override {
    if (!projection) return;
    torch::Tensor k, v;
    {
      torch::NoGradGuard no_grad;
      std::tie(k, v) = prefix();
    }
    const bool train = projection->embedding.requires_grad();
    unregister_module("projection");
    projection = nullptr;
    prefix_keys = register_parameter("prefix_keys", k.contiguous(), train);
    prefix_values = register_parameter("prefix_values", v.contiguous(), train);
  }

  /// Whether the rows still come from the projection.
  bool projected() const { return static_cast<bool>(projection); }

  torch::Tensor prefix_keys, prefix_values;
  PrefixProjection projection{nullptr};
};

PEFT_NAMESPACE_END
