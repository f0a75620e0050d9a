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
#include <peft/core/attach.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

enum class AdapterKind {
  Houlsby,   ///< after the attention and after the FFN sub-layer (sequential)
  Pfeiffer,  ///< after the FFN sub-layer only (sequential)
  Parallel,  ///< beside the FFN sub-layer: reads its input, adds to its output
};

constexpr EnumTable<AdapterKind, 3> enum_table(AdapterKind) {
  return {"adapter_kind",
          "load_adapter",
          {{{AdapterKind::Houlsby, "houlsby"},
            {AdapterKind::Pfeiffer, "pfeiffer"},
            {AdapterKind::Parallel, "parallel"}}}};
}

/// "houlsby", "pfeiffer" or "parallel".
inline const char* to_string(AdapterKind kind) {
  return enum_name(kind);
}

class AdapterImpl;

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
  using Impl = AdapterImpl;
  static constexpr const char* method = "adapter";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Block);
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

// ------------------------------------------------------------------------- options and format

namespace detail {

/// Each site's `adapter_down`/`adapter_up` weights and biases under the site's path; the
/// placement and sizes in the config.
inline void save_adapter_blocks(SaveContext& c) {
  auto first = std::dynamic_pointer_cast<AdapterImpl>(c.methods.front().second);
  const auto& o = first->options();
  std::vector<std::string> targets;
  for (auto& [path, m] : c.methods) {
    auto a = std::dynamic_pointer_cast<AdapterImpl>(m);
    check(a->options().kind() == o.kind() && a->options().activation() == o.activation() &&
              a->options().scaling() == o.scaling() &&
              a->adapter_down->weight.size(0) == first->adapter_down->weight.size(0),
          "save_adapter", "adapter at \"{}\" is set up unlike the one at \"{}\"", path,
          c.methods.front().first);
    targets.push_back(path);
    for (const auto& p : a->named_parameters())
      c.tensors.emplace_back(path + "." + p.key(), p.value());
  }
  c.config["adapter_kind"] = to_string(o.kind());
  c.config["bottleneck"] = first->adapter_down->weight.size(0);
  c.config["activation"] = o.activation();
  c.config["scaling"] = o.scaling();
  c.config["target_modules"] = targets;
}

inline LoadPlan load_adapter_blocks(const LoadContext& c) {
  const auto& cfg = c.config_file;
  const auto targets = config_value<std::vector<std::string>>(c.config, "target_modules", cfg);
  const AdapterKind kind =
      enum_from_name<AdapterKind>(config_value<std::string>(c.config, "adapter_kind", cfg), cfg);
  auto options = AdapterOptions(kind)
                     .bottleneck(config_value<int64_t>(c.config, "bottleneck", cfg))
                     .activation(config_value<std::string>(c.config, "activation", cfg))
                     .scaling(config_value<double>(c.config, "scaling", cfg));
  options.adapter_name(c.adapter);
  options.targets(targets);
  validate_from_file(options, cfg);
  const int64_t m = options.bottleneck();
  auto sites = sites_by_path(c.model);
  LoadPlan plan;
  for (const auto& path : targets) {
    auto it = sites.find(path);
    check(it != sites.end() && AdapterOptions::fits(*it->second), "load_adapter",
          "{}: target \"{}\" is no block site of this model", cfg, path);
    const int64_t d = it->second->out_features();
    auto part = [c, path](bool down, bool weight) {
      return [c, path, down, weight] {
        auto a = c.method_at<AdapterImpl>(path, "adapter");
        auto& linear = down ? a->adapter_down : a->adapter_up;
        return weight ? linear->weight : linear->bias;
      };
    };
    plan.slots.push_back({path + ".adapter_down.weight", {m, d}, part(true, true)});
    plan.slots.push_back({path + ".adapter_down.bias", {m}, part(true, false)});
    plan.slots.push_back({path + ".adapter_up.weight", {d, m}, part(false, true)});
    plan.slots.push_back({path + ".adapter_up.bias", {d}, part(false, false)});
  }
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry adapter_entry() {
  MethodEntry e;
  e.name = "adapter";
  e.summary = "bottleneck adapters after sub-layers (Houlsby et al., 2019; Pfeiffer et al., 2021)";
  e.default_lr = 1e-3;
  e.option_keys = {"adapter_kind", "reduction_factor", "bottleneck",         "activation",
                   "scaling",      "target_modules",   "layers_to_transform"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    const auto kind = enum_from_name<AdapterKind>(
        config_value_or<std::string>(json, "adapter_kind", "houlsby", "options", "adapter"),
        "options");
    auto options =
        AdapterOptions(kind)
            .reduction_factor(
                config_value_or<int64_t>(json, "reduction_factor", 16, "options", "adapter"))
            .bottleneck(config_value_or<int64_t>(json, "bottleneck", 0, "options", "adapter"))
            .activation(
                config_value_or<std::string>(json, "activation", "relu", "options", "adapter"))
            .scaling(config_value_or<double>(json, "scaling", 1.0, "options", "adapter"));
    targets_from_json(json, options, "options", "adapter");
    return peft::attach(model, options);
  };
  e.format = AdapterFormat{"BOTTLENECK_ADAPTER", true, save_adapter_blocks, load_adapter_blocks};
  return e;
}

inline const bool adapter_registered = register_method(adapter_entry());

}  // namespace detail

/// Bottleneck adapters on a stock TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using Adapter = Tuned<Stock, AdapterOptions>;

PEFT_NAMESPACE_END
