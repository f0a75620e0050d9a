#pragma once

// Bottleneck adapters: h -> h + s * up(f(down(.))) with a small inner size. Houlsby et al. (2019)
// put one after the attention and one after the FFN sub-layer; Pfeiffer et al. (2021) only after
// the FFN; the parallel form (He et al., 2022) reads the sub-layer's input instead of its output.
// The up-projection starts at zero so a new adapter is the identity.

#include <torch/arg.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>
#include <peft/core/targets.hpp>

PEFT_NAMESPACE_BEGIN

enum class AdapterKind {
  Houlsby,   ///< after the attention and after the FFN sub-layer (sequential)
  Pfeiffer,  ///< after the FFN sub-layer only (sequential)
  Parallel,  ///< beside the FFN sub-layer: reads its input, adds to its output
};

inline const char* to_string(AdapterKind kind) {
  switch (kind) {
    case AdapterKind::Houlsby:
      return "houlsby";
    case AdapterKind::Pfeiffer:
      return "pfeiffer";
    case AdapterKind::Parallel:
      return "parallel";
  }
  return "?";
}

/// Options of bottleneck adapters; default targets follow the kind.
struct AdapterOptions : TargetOptions<AdapterOptions> {
  explicit AdapterOptions(AdapterKind kind = AdapterKind::Houlsby)
      : TargetOptions(kind == AdapterKind::Houlsby
                          ? std::vector<std::string>{"attn_block", "ffn_block"}
                          : std::vector<std::string>{"ffn_block"}),
        kind_(kind) {}
  TORCH_ARG(AdapterKind, kind);
  /// Inner size = model dimension / reduction_factor (unless bottleneck() is set).
  TORCH_ARG(int64_t, reduction_factor) = 16;
  /// Inner size; 0 = use reduction_factor.
  TORCH_ARG(int64_t, bottleneck) = 0;
  /// "relu", "gelu", "tanh", "silu" or "identity".
  TORCH_ARG(std::string, activation) = "relu";
  /// Multiplies the adapter's output.
  TORCH_ARG(double, scaling) = 1.0;
  /// Standard deviation of the down-projection's initial weights.
  TORCH_ARG(double, init_std) = 1e-2;

 public:
  static constexpr const char* method = "adapter";
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Block; }
  void validate() const {
    check(reduction_factor_ > 0, method, "reduction_factor must be positive, got {}",
          reduction_factor_);
    check(bottleneck_ >= 0, method,
          "bottleneck must be positive (or 0 for reduction_factor), got {}", bottleneck_);
    check(scaling_ > 0, method, "scaling must be positive, got {}", scaling_);
    check(init_std_ >= 0, method, "init_std must not be negative, got {}", init_std_);
    activation_fn(activation_);
  }
  int64_t inner_size(int64_t dim) const {
    const int64_t size = bottleneck_ > 0 ? bottleneck_ : dim / reduction_factor_;
    check(size > 0, method, "reduction_factor {} leaves no units of dimension {}",
          reduction_factor_, dim);
    return size;
  }
  static std::function<torch::Tensor(const torch::Tensor&)> activation_fn(const std::string& name) {
    if (name == "relu") return [](const torch::Tensor& x) { return torch::relu(x); };
    if (name == "gelu") return [](const torch::Tensor& x) { return torch::gelu(x); };
    if (name == "tanh") return [](const torch::Tensor& x) { return torch::tanh(x); };
    if (name == "silu") return [](const torch::Tensor& x) { return torch::silu(x); };
    if (name == "identity") return [](const torch::Tensor& x) { return x; };
    fail(method, "unknown activation \"{}\"; expected relu, gelu, tanh, silu or identity", name);
  }
};

/// One bottleneck adapter at one Block site: `adapter_down` [m, d] and `adapter_up` [d, m].
class AdapterImpl : public MethodImpl {
 public:
  AdapterImpl(const SiteImpl& site, const AdapterOptions& options)
      : MethodImpl("adapter", options.adapter_name()),
        options_(options),
        activation_(AdapterOptions::activation_fn(options.activation())) {
    options.validate();
    const int64_t d = site.out_features(), m = options.inner_size(d);
    adapter_down = register_module("adapter_down", torch::nn::Linear(d, m));
    adapter_up = register_module("adapter_up", torch::nn::Linear(m, d));
    torch::NoGradGuard no_grad;
    adapter_down->weight.normal_(0.0, options.init_std());
    adapter_down->bias.zero_();
    adapter_up->weight.zero_();
    adapter_up->bias.zero_();
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    const auto& source = options_.kind() == AdapterKind::Parallel ? input : output;
    return output + peft::detail::linear(activation_(peft::detail::linear(source, adapter_down)),
                                         adapter_up) *
                        options_.scaling();
  }

  const AdapterOptions& options() const { return options_; }

  torch::nn::Linear adapter_down{nullptr}, adapter_up{nullptr};

 private:
  AdapterOptions options_;
  std::function<torch::Tensor(const torch::Tensor&)> activation_;
};

PEFT_NAMESPACE_END
