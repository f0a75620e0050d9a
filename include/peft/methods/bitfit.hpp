#pragma once

// BitFit (Ben Zaken et al., 2022): train only bias terms. Each selected projection gets a
// trainable bias change that starts at zero (so packed q/k/v biases can be tuned one by one and
// the frozen bias is never touched until merge); `layer_norm(true)` also trains the LayerNorm
// weights and biases of the selected layers in place.

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>

PEFT_NAMESPACE_BEGIN

/// Options of BitFit. Default targets: every projection (q, k, v, attention output, FFN in and
/// out); the paper's reduced variant is `.targets({"query", "linear1"})`.
struct BitFitOptions : TargetOptions<BitFitOptions> {
  BitFitOptions() : TargetOptions({"query", "key", "value", "out_proj", "linear1", "linear2"}) {}
  /// Also train the LayerNorm parameters of the selected layers (in place: they are saved with the
  /// adapter, and disabling the adapter does not undo them).
  TORCH_ARG(bool, layer_norm) = false;

 public:
  static constexpr const char* method = "bitfit";
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const {}
};

/// A trainable bias change at one projection: y + bias.
class BitFitImpl : public MethodImpl {
 public:
  BitFitImpl(const SiteImpl& site, const BitFitOptions& options)
      : MethodImpl("bitfit", options.adapter_name()),
        has_frozen_bias_(site.frozen_bias().defined()) {
    bias = register_parameter("bias", torch::zeros({site.out_features()}));
  }

  torch::Tensor apply(const torch::Tensor&, const torch::Tensor& output) override {
    return output + bias;
  }

  bool can_merge() const override { return has_frozen_bias_; }
  torch::Tensor delta_bias() override { return bias; }

  torch::Tensor bias;

 private:
  bool has_frozen_bias_;
};

PEFT_NAMESPACE_END
