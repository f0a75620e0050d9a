#pragma once

// BitFit (Ben Zaken et al., 2022): train only bias terms. Each selected projection gets a
// trainable bias change that starts at zero (so packed q/k/v biases can be tuned one by one and
// the frozen bias is never touched until merge); `layer_norm(true)` also trains the LayerNorm
// weights and biases of the selected layers in place.

#include <torch/arg.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

class BitFitImpl;

/// Options of BitFit. Default targets: every projection (q, k, v, attention output, FFN in and
/// out); the paper's reduced variant is `.targets({"query", "linear1"})`.
struct BitFitOptions : TargetOptions<BitFitOptions> {
  BitFitOptions() : TargetOptions({"query", "key", "value", "out_proj", "linear1", "linear2"}) {}
  /// Also train the LayerNorm parameters of the selected layers (in place: they are saved with the
  /// adapter, and disabling the adapter does not undo them).
  TORCH_ARG(bool, layer_norm) = false;

 public:
  using Impl = BitFitImpl;
  static constexpr const char* method = "bitfit";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const {}
  /// With layer_norm(true): the selected layers' LayerNorms train in place.
  void after_attach(torch::nn::Module& model) const {
    if (!layer_norm_) return;
    for (const auto& item : model.named_modules("", /*include_self=*/true)) {
      if (!std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(item.value())) continue;
      const int64_t layer = detail::layer_index(item.key());
      if (!layers().empty() && layer >= 0 &&
          std::find(layers().begin(), layers().end(), layer) == layers().end()) {
        continue;
      }
      for (auto& p : item.value()->parameters()) p.set_requires_grad(true);
    }
  }
};

/// A trainable bias change at one projection: y + bias.
class BitFitImpl : public MethodImpl {
 public:
  BitFitImpl(const SiteImpl& site, const BitFitOptions& options)
      : MethodImpl("bitfit", options.adapter_name()),
        has_frozen_bias_(site.frozen_bias().defined()) {
    // A bias-free architecture (Llama-family decoders) has nothing for BitFit to tune; adding
    // biases it never had would be another method under BitFit's name.
    check(has_frozen_bias_, "bitfit",
          "the {} projection has no bias: BitFit tunes a model's existing biases and this "
          "architecture has none (Llama-family decoders have no biases); use LoRA or another "
          "method",
          site.role());
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

// ------------------------------------------------------------------------- options and format

namespace detail {

/// The LayerNorms of `model` whose parameters train (BitFit's layer_norm option), by path.
inline std::vector<std::string> trainable_layer_norms(torch::nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (!std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(item.value())) continue;
    bool trains = false;
    for (const auto& p : item.value()->parameters()) trains = trains || p.requires_grad();
    if (trains) out.push_back(item.key());
  }
  return out;
}

/// Each site's bias change as `<site>.bias`, and the parameters of the LayerNorms that train.
inline void save_bitfit(SaveContext& c) {
  std::vector<std::string> targets;
  for (auto& [path, m] : c.methods) {
    targets.push_back(path);
    c.tensors.emplace_back(path + ".bias", std::dynamic_pointer_cast<BitFitImpl>(m)->bias);
  }
  auto norms = trainable_layer_norms(c.model);
  for (auto& p : module_parameters(c.model, norms)) c.tensors.push_back(p);
  c.config["target_modules"] = targets;
  c.config["layer_norm_modules"] = norms;
}

inline LoadPlan load_bitfit(const LoadContext& c) {
  const auto& cfg = c.config_file;
  const auto targets = config_value<std::vector<std::string>>(c.config, "target_modules", cfg);
  const auto norms =
      config_value_or<std::vector<std::string>>(c.config, "layer_norm_modules", {}, cfg);
  auto sites = sites_by_path(c.model);
  LoadPlan plan;
  for (const auto& path : targets) {
    auto it = sites.find(path);
    check(it != sites.end() && BitFitOptions::fits(*it->second), "load_adapter",
          "{}: target \"{}\" is no projection site of this model", cfg, path);
    plan.slots.push_back({path + ".bias", {it->second->out_features()}, [c, path] {
                            return c.method_at<BitFitImpl>(path, "bitfit")->bias;
                          }});
  }
  auto modules = c.model.named_modules("", /*include_self=*/false);
  for (const auto& norm : norms) {
    check(modules.contains(norm) &&
              std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(modules[norm]) != nullptr,
          "load_adapter",
          "{}: layer_norm_modules names \"{}\", which is no LayerNorm of this model", cfg, norm);
  }
  std::vector<torch::Tensor> norm_params;
  for (auto& [key, t] : module_parameters(c.model, norms)) {
    auto tensor = t;
    plan.slots.push_back({key, tensor.sizes().vec(), [tensor] { return tensor; }});
    norm_params.push_back(tensor);
  }
  auto options = BitFitOptions();
  options.adapter_name(c.adapter);
  options.targets(targets);
  auto& model = c.model;
  plan.apply = [&model, options, norm_params] {
    attach(model, options);
    for (auto t : norm_params) t.set_requires_grad(true);
  };
  return plan;
}

inline MethodEntry bitfit_entry() {
  MethodEntry e;
  e.name = "bitfit";
  e.summary = "BitFit: only bias terms train (Ben Zaken et al., 2022)";
  e.default_lr = 1e-3;
  e.option_keys = {"layer_norm", "target_modules", "layers_to_transform"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    auto options = BitFitOptions().layer_norm(
        config_value_or<bool>(json, "layer_norm", false, "options", "bitfit"));
    targets_from_json(json, options, "options", "bitfit");
    return peft::attach(model, options);
  };
  e.format = AdapterFormat{"BITFIT", true, save_bitfit, load_bitfit};
  return e;
}

inline const bool bitfit_registered = register_method(bitfit_entry());

}  // namespace detail

/// BitFit on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using BitFit = Tuned<Stock, BitFitOptions>;

PEFT_NAMESPACE_END
